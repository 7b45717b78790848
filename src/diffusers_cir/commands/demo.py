"""``diffusers-cir demo``: composed image retrieval end to end, offline, on CPU, on the synthetic world."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from . import non_negative_int


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="Offline end-to-end demo on the synthetic CIR world (CompoDiff vs baselines).",
        description=(
            "Builds the seeded synthetic CIR world, gets a CompoDiff prior (the checkpoint shipped with the package, "
            "or one trained now with --train), indexes the gallery with faiss, composes the held-out test queries and "
            "prints Recall@K for CompoDiff and the image-only, text-only and image+text-sum baselines, with example "
            "queries. Everything runs on CPU without network access."
        ),
    )
    parser.add_argument("--quick", action="store_true", help="Fewer queries (1,000) for a fast check.")
    parser.add_argument("--num-queries", type=int, default=None, help="Test queries to run (default: all).")
    parser.add_argument(
        "--examples", type=non_negative_int, default=3, help="Example queries to print with their top results.")
    parser.add_argument(
        "--train", action="store_true",
        help="Train the prior now with the real training loop (about 10 minutes on 2 CPU cores) instead of loading "
        "the shipped checkpoint.",
    )
    parser.add_argument("--steps", type=int, default=None, help="Training steps with --train (default 2500).")
    parser.add_argument(
        "--train-triplets", type=int, default=None,
        help="With --train: training triplets to write (default 200,000; 20,000 for the tiny world).",
    )
    parser.add_argument("--output-dir", type=str, default=None, help="With --train: keep the data and model here.")
    parser.add_argument(
        "--update-shipped-checkpoint", action="store_true",
        help="With --train: write the trained denoiser (float16) as the package's shipped demo checkpoint.",
    )
    parser.add_argument(
        "--checkpoint", type=str, default=None, help="A demo checkpoint folder to load instead (not with --train).")
    parser.add_argument("--world", choices=["default", "tiny"], default="default")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="World and query seed. Default: 0.")
    parser.add_argument("--json", type=str, default=None, help="Also write the measurements to this JSON file.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from diffusers_cir.demo import SHIPPED_CHECKPOINT, DemoRecipe, export_checkpoint, format_result, run_demo

    if args.update_shipped_checkpoint and not args.train:
        raise SystemExit("--update-shipped-checkpoint needs --train (it ships what this command trains).")
    # Training options without --train, or a checkpoint to load with it, were silently ignored.
    if not args.train:
        given = [flag for flag, value in (("--steps", args.steps), ("--train-triplets", args.train_triplets),
                                          ("--output-dir", args.output_dir)) if value is not None]
        if given:
            raise SystemExit(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --train (without it the "
                             "demo loads a trained checkpoint and trains nothing).")
    elif args.checkpoint is not None:
        raise SystemExit("--checkpoint loads a trained demo checkpoint, --train trains a new one: give one of them.")
    if args.num_queries is not None and args.num_queries <= 0:
        raise SystemExit(f"--num-queries must be positive, got {args.num_queries}.")
    num_queries = args.num_queries if args.num_queries is not None else (1000 if args.quick else None)
    recipe = DemoRecipe(world=args.world, seed=args.seed)
    if args.train_triplets is not None:
        if args.train_triplets <= 0:
            raise SystemExit(f"--train-triplets must be positive, got {args.train_triplets}.")
        recipe.num_train_triplets = args.train_triplets
    if args.steps is not None:
        if args.steps <= 0:
            raise SystemExit(f"--steps must be positive, got {args.steps}.")
        recipe.max_train_steps = args.steps
        recipe.validation_steps = min(recipe.validation_steps, args.steps)

    temporary = None
    work_dir = args.output_dir
    if args.train and work_dir is None:
        temporary = tempfile.TemporaryDirectory(prefix="diffusers-cir-demo-")
        work_dir = temporary.name
    try:
        try:
            result = run_demo(
                world_name=args.world,
                num_queries=num_queries,
                num_examples=args.examples,
                train=args.train,
                recipe=recipe,
                work_dir=work_dir,
                checkpoint=args.checkpoint or SHIPPED_CHECKPOINT,
                seed=args.seed,
            )
        except FileNotFoundError as error:  # no shipped checkpoint: say what to run instead
            print(f"diffusers-cir demo: {error}", file=sys.stderr)
            return 1
        print()
        print(format_result(result))
        if args.train and args.update_shipped_checkpoint:
            info = {
                "command": "diffusers-cir demo --train --update-shipped-checkpoint"
                + (f" --steps {args.steps}" if args.steps else ""),
                "world": args.world,
                "seed": args.seed,
                "max_train_steps": recipe.max_train_steps,
                "train_batch_size": recipe.train_batch_size,
                "training_argv": recipe.training_argv("<data>", "<output>"),
                "recall": result.recalls,
            }
            target = export_checkpoint(os.path.join(work_dir, "compodiff"), SHIPPED_CHECKPOINT, info)
            print(f"\nShipped checkpoint updated: {target}")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)  # as `search --json` does
            with open(args.json, "w", encoding="utf-8") as handle:
                json.dump(
                    {"recalls": result.recalls, "examples": result.examples, "num_queries": result.num_queries,
                     "gallery_size": result.gallery_size, "seconds": result.seconds, "source": result.source},
                    handle,
                    indent=2,
                )
    finally:
        if temporary is not None:
            temporary.cleanup()
    return 0
