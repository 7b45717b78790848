"""``diffusers-cir push``: upload a pipeline folder, a triplet dataset folder or a metric Space to the Hub.

    diffusers-cir push pipeline models/compodiff-picture-world me/compodiff-picture-world
    diffusers-cir push dataset synthtriplets-embeddings me/synthtriplets-embeddings --private
    diffusers-cir push metric hub/metrics/cirr me/cirr

The folder is checked first (a pipeline loads and gets its model card; a dataset's card names data files that exist;
a Space has its card, app, module and requirements), then uploaded with ``huggingface_hub`` (log in with
``hf auth login`` or pass ``--token``).
"""

from __future__ import annotations

import argparse

KINDS = ("pipeline", "dataset", "metric")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "push", help="Upload a pipeline, a dataset folder or a metric Space to the Hugging Face Hub.",
        description=__doc__.split("\n\n", 1)[0],
    )
    parser.add_argument("kind", choices=KINDS, help="What the folder holds.")
    parser.add_argument("folder", help="The folder to upload.")
    parser.add_argument("repo_id", help="The Hub repo to create or update, e.g. me/my-model.")
    parser.add_argument("--private", action="store_true", help="Create the repo private (an existing repo is kept).")
    parser.add_argument("--token", default=None, help="Hub token (default: the one `hf auth login` stored).")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..utils.hub import push_dataset_to_hub, push_metric_to_hub

    private = True if args.private else None
    if args.kind == "pipeline":
        from ..pipelines.auto import AutoCIRPipeline, read_model_index

        read_model_index(args.folder)  # a folder without model_index.json is named before anything loads
        pipeline = AutoCIRPipeline.from_pretrained(args.folder)
        url = pipeline.push_to_hub(args.repo_id, private=private, token=args.token)
    elif args.kind == "dataset":
        url = push_dataset_to_hub(args.folder, args.repo_id, private=private, token=args.token)
    else:
        url = push_metric_to_hub(args.folder, args.repo_id, private=private, token=args.token)
    print(f"Uploaded {args.folder} to {args.repo_id}: {url}")
    return 0
