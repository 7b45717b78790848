"""``diffusers-cir evaluate``: official CIRR / FashionIQ / CIRCO / GeneCIS numbers for a pipeline folder.

    diffusers-cir evaluate cirr --pipeline models/compodiff --data-root /data/CIRR --output-dir eval/cirr-val
    diffusers-cir evaluate cirr --split test1 --pipeline models/compodiff --data-root /data/CIRR --output-dir eval/cirr-test
    diffusers-cir evaluate fashioniq --pipeline models/lincir --fashioniq-captions searle \\
        --data-root /data/fashionIQ_dataset --output-dir eval/fiq
    diffusers-cir evaluate circo --dry-run --data-root /data/CIRCO --output-dir eval/check   # layout check, no model

Writes metrics.json + metrics.md (labelled splits), rankings, query embeddings and, for hidden-label test
splits, the official submission files. The gallery embeddings are cached (resumable) under the output folder.
"""

from __future__ import annotations


def register(subparsers) -> None:
    from ..evaluation.command_line import add_evaluation_arguments, run_from_args

    parser = subparsers.add_parser(
        "evaluate",
        help="Evaluate a CIR pipeline on CIRR, FashionIQ, CIRCO or GeneCIS (official metrics, submission files).",
        description=__doc__.split("\n\n", 1)[0],
    )
    add_evaluation_arguments(parser)
    parser.set_defaults(func=run_from_args)
