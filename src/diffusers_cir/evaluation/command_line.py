"""Command-line arguments shared by ``diffusers-cir evaluate`` and ``examples/evaluate_cir.py``.

Only the standard library and ``diffusers_cir.checks`` are imported at module level so that ``diffusers-cir --help``
stays fast; the choices below are checked against the library constants by the tests.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from ..checks import argparse_type, check_choice, check_int, check_seed

positive_int = argparse_type(check_int, minimum=1)
non_negative_int = argparse_type(check_int, minimum=0)

__all__ = ["add_evaluation_arguments", "run_from_args", "read_id_list"]

BENCHMARK_CHOICES = ("cirr", "fashioniq", "circo", "genecis", "fine_cirr", "fine_fashioniq")
CAPTION_STYLE_CHOICES = ("clip4cir", "searle")
DTYPE_CHOICES = ("bfloat16", "float16", "float32")
REWRITE_ENSEMBLE_CHOICES = ("ldre", "mean")


def add_evaluation_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the evaluation options to ``parser``."""
    parser.add_argument("benchmark", choices=BENCHMARK_CHOICES, help="Benchmark to evaluate on.")
    parser.add_argument("--data-root", required=True, type=Path,
                        help="Benchmark folder in its official layout (e.g. the CIRR folder holding cirr/captions/).")
    parser.add_argument("--output", "--output-dir", dest="output_dir", required=True, type=Path, help="Where metrics, rankings and submissions go.")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", "--pipeline", dest="pipeline", type=Path,
                       help="CIR pipeline: a saved folder (model_index.json), a Hub id or a released layout.")
    model.add_argument("--dry-run", action="store_true",
                       help="Use a model-free stand-in encoder (random embedding per image id) to check the data "
                            "layout and the output files; the scores are meaningless.")
    parser.add_argument("--split", default="val", help="Split as named by the benchmark files (CIRR test: 'test1').")
    parser.add_argument("--subset", nargs="+", default=None,
                        help="FashionIQ (and Fine-FashionIQ) categories or GeneCIS tasks (default: all).")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="Gallery-embedding cache (default: <output-dir>/embedding_cache); reused across runs.")
    parser.add_argument("--protocol", default=None,
                        help="How the benchmark is evaluated: its official protocol by default, or a named variant: "
                             "'bgevl' (CIRCO, FashionIQ, CIRR), the BGE-VL authors' query texts and 75-token "
                             "truncation; 'magiclens' (CIRCO, FashionIQ), the MagicLens authors' query texts. "
                             "metrics.json and metrics.md say which one ran.")
    parser.add_argument("--rewrite-ensemble", type=argparse_type(check_choice, str, choices=REWRITE_ENSEMBLE_CHOICES),
                        default=None, metavar="{ldre,mean}",
                        help="How a CaptionRewritePipeline's rewrites become one query: 'ldre', LDRE's adaptive "
                             "ensemble (slot weights learnt over the whole query set against the gallery); 'mean', "
                             "their mean. Default: as the LDRE authors rank, 'ldre' for an LDRE-recipe pipeline on "
                             "CIRCO, 'mean' otherwise. metrics.json and metrics.md say which one ran.")
    parser.add_argument("--fashioniq-captions", choices=CAPTION_STYLE_CHOICES, default=None,
                        help="FashionIQ caption joining: CLIP4Cir's single prompt (default), or SEARLE/LinCIR's two "
                             "orders averaged.")
    parser.add_argument("--prompt-template", default="{}", help="Wraps every query text, e.g. 'a photo of $ that {}'.")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="Queries composed per pipeline call.")
    parser.add_argument("--image-batch-size", type=positive_int, default=64, help="Images per image-encoder call.")
    parser.add_argument("--num-workers", type=non_negative_int, default=0, help="Image-decoding worker processes.")
    parser.add_argument("--num-inference-steps", type=positive_int, default=None, help="CompoDiff sampler steps.")
    parser.add_argument("--negative-prompt", default=None, help="CompoDiff negative text.")
    parser.add_argument("--guidance-scale", type=float, default=None, help="CompoDiff text guidance.")
    parser.add_argument("--image-guidance-scale", type=float, default=None, help="CompoDiff image guidance.")
    parser.add_argument("--seed", type=argparse_type(check_seed), default=0, help="Seed of the composed batches (CompoDiff samples).")
    parser.add_argument("--device", default=None, help="Device (default: cuda when available).")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="Pipeline weights dtype.")
    parser.add_argument("--gallery-ids", type=Path, default=None,
                        help="CIRCO only: file of gallery ids (JSON list or one per line) instead of the COCO image info.")
    parser.add_argument("--image-root", type=Path, default=None,
                        help="GeneCIS only: COCO val2017 (object tasks) or Visual Genome (attribute tasks) image folder.")
    parser.add_argument("--write-submissions", action="store_true",
                        help="Also write the server submission files on labelled splits (always written for test splits).")
    parser.add_argument("--no-progress", action="store_true", help="Hide progress bars.")
    parser.add_argument("--html", action="store_true",
                        help="Also write report.html next to metrics.json: the metrics, Recall@K curves and queries with "
                        "their top results (pictures when the images are in --data-root).")
    return parser


def read_id_list(path: Path) -> list:
    """Ids from a JSON list or a text file with one id per line (digit strings become ints).

    Example:

    ```py
    >>> import tempfile, os
    >>> with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
    ...     _ = handle.write("12\\n7\\n")
    >>> read_id_list(Path(handle.name)); os.remove(handle.name)
    [12, 7]

    ```
    """
    if not path.is_file():
        raise FileNotFoundError(f"--gallery-ids file {path} does not exist.")
    text = path.read_text()
    try:
        ids = json.loads(text)
        if not isinstance(ids, list):
            raise ValueError(f"{path} holds JSON but not a list of ids.")
    except json.JSONDecodeError:
        ids = [line.strip() for line in text.splitlines() if line.strip()]
    return [int(i) if isinstance(i, str) and i.isdigit() else i for i in ids]


# Pipeline-call options: flag -> argument of the pipeline call (and attribute of the parsed arguments).
PIPELINE_CALL_FLAGS = {
    "--num-inference-steps": "num_inference_steps",
    "--negative-prompt": "negative_prompt",
    "--guidance-scale": "guidance_scale",
    "--image-guidance-scale": "image_guidance_scale",
}


def _pipeline_call_kwargs(args: argparse.Namespace) -> dict:
    """The pipeline-call options given on the command line; refused, naming their flags, when the pipeline class in
    ``--pipeline`` does not take them (LinCIR has no sampler): read from ``model_index.json``, before loading."""
    from ..retrieval.encoders import check_pipeline_options

    given = {flag: getattr(args, name) for flag, name in PIPELINE_CALL_FLAGS.items() if getattr(args, name) is not None}
    if args.pipeline is not None:
        check_pipeline_options(args.pipeline, {flag: PIPELINE_CALL_FLAGS[flag] for flag in given})
    return {PIPELINE_CALL_FLAGS[flag]: value for flag, value in given.items()}


def _protocol(benchmark: str, name: str):
    """The named protocol of ``benchmark``, refused by flag (with the choices) before anything loads."""
    from .protocols import get_protocol

    return get_protocol(benchmark, name, argument="--protocol")


def _pipeline_from_args(args: argparse.Namespace):
    import torch

    from ..retrieval.encoders import load_pipeline
    from .encoders import IdHashEncoder

    if args.dry_run:
        return IdHashEncoder()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_pipeline(args.pipeline, device=device, torch_dtype=None if args.dtype is None else getattr(torch, args.dtype))


def run_from_args(args: argparse.Namespace, pipeline=None) -> int:
    """Run the evaluation described by parsed arguments (``pipeline``: a ready pipeline, else loaded from
    ``--pipeline``, or the stand-in of ``--dry-run``); prints the metrics table and returns an exit code."""
    from .runner import metrics_markdown, run_evaluation

    loader_kwargs = {}
    try:
        if args.fashioniq_captions is not None and args.benchmark != "fashioniq":
            raise ValueError("--fashioniq-captions applies to FashionIQ only (the other benchmarks have one caption per "
                             "query).")
        if args.gallery_ids is not None:
            if args.benchmark != "circo":
                raise ValueError("--gallery-ids applies to CIRCO only (CIRR and FashionIQ galleries come from their "
                                 "split files).")
            loader_kwargs["gallery_ids"] = read_id_list(args.gallery_ids)
        if args.image_root is not None:
            if args.benchmark != "genecis":
                raise ValueError("--image-root applies to GeneCIS only (the other benchmarks keep images in their "
                                 "folder).")
            loader_kwargs["image_root"] = args.image_root
        if args.protocol is not None and args.fashioniq_captions is not None:
            raise ValueError("--fashioniq-captions names a FashionIQ protocol itself: pass it or --protocol, not both.")
        protocol = args.protocol if args.protocol is None else _protocol(args.benchmark, args.protocol)
        call_kwargs = _pipeline_call_kwargs(args)
        if protocol is not None and args.pipeline is not None:  # a saved folder is checked before it loads
            from ..retrieval.encoders import check_pipeline_options

            check_pipeline_options(args.pipeline, {f"--protocol {protocol.name} ({name})": name
                                                   for name in protocol.call_kwargs})
        if args.rewrite_ensemble is not None and args.pipeline is not None:  # only a CaptionRewritePipeline has rewrites
            from ..retrieval.encoders import check_pipeline_options

            check_pipeline_options(args.pipeline, {f"--rewrite-ensemble {args.rewrite_ensemble}": "output_caption_embeds"})
        if pipeline is None:
            # Loaded by run_evaluation once the arguments and the annotation files are known to be good.
            pipeline = functools.partial(_pipeline_from_args, args)
        result = run_evaluation(
            pipeline,
            args.benchmark,
            args.data_root,
            args.split,
            output_dir=args.output_dir,
            subsets=args.subset,
            cache_dir=args.cache_dir,
            protocol=protocol,
            caption_style=args.fashioniq_captions,
            prompt_template=args.prompt_template,
            query_batch_size=args.batch_size,
            image_batch_size=args.image_batch_size,
            num_workers=args.num_workers,
            seed=args.seed,
            call_kwargs=call_kwargs,
            write_submissions=True if args.write_submissions else None,
            loader_kwargs=loader_kwargs,
            rewrite_ensemble=args.rewrite_ensemble,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError) as error:
        # Missing files and bad inputs are the user's to fix: say what, without a traceback.
        print(f"diffusers-cir evaluate: error: {error}", file=sys.stderr)
        return 2
    print(metrics_markdown(result.report))
    print(f"\nWrote {', '.join(str(path) for path in result.files.values())}")
    if getattr(args, "html", False):
        from ..report.evaluation import write_evaluation_report

        print(f"Wrote {write_evaluation_report(args.output_dir, args.data_root, loader_kwargs=loader_kwargs)}")
    return 0
