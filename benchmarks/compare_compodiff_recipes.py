#!/usr/bin/env python
"""The CompoDiff paper's stage-2 recipe against the training script's own defaults, on the synthetic CIR world.

Both runs train the same denoiser (2 layers, 2 heads of 32, as the training tests on this world) from scratch on the
same data (the world's triplets and its gallery as text-to-image pairs) for the same number of steps with the same
per-device batch, through ``examples/train_compodiff.py``'s loop; then both compose the world's held-out ``test``
queries (compositions never seen in training) and Recall@K against the whole gallery is measured at the same guidance.

    python benchmarks/compare_compodiff_recipes.py                          # tiny world, 1000 steps
    python benchmarks/compare_compodiff_recipes.py --world default --steps 2500

What differs between the rows is only what ``--recipe paper_stage2`` sets (``--print-config`` lists it): learning
rate 1e-5 (vs 1e-4), weight decay 6e-2 (vs 0), denoiser dropout 0.1 (vs none), EMA 0.9999 (vs none), independent
condition dropout 0.1 / 0.1 (vs disjoint 0.1 / 0.1 / 0.1), and the objective mix. The world has no images, so no
masks: the paper's 30% inpainting share cannot be trained, and its 40% triplets / 30% text-to-image keep their 4:3
proportion (``triplet=0.4,text_to_image=0.3``; the defaults: ``triplet=0.7,text_to_image=0.3``). The paper's batch
(2048) and steps (200K) are replaced by the same values for both rows, and its architecture and CLIP-L/14 text by
the world's. Its lr is meant for a stage-1 model and 200K steps of batch 2048: from scratch and for a few thousand
steps, a lower lr is expected to lose; this script measures by how much.

Prints a table and writes JSON (``benchmarks/results/<machine>/compare_compodiff_recipes.json``; the tiny world's
under ``benchmarks/results/tiny/``). Measured on the 2-core AMD EPYC (1 thread, default world, 2000 steps of 256):
R@1 0.033 (defaults) vs 0.001 (paper stage 2) at w_T 2.0, both below the image-only baseline (0.054) at this budget.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import environment, results_path, write_results  # noqa: E402

PAPER_STAGE2_WITHOUT_MASKS = "triplet=0.4,text_to_image=0.3"
# The world's embeddings are 64 wide: a denoiser of its size (the paper's 12 layers of 16 x 64 would not train on CPU).
TRANSFORMER_CONFIG = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 32, "num_cross_attention_heads": 2}
TRAIN_TRIPLETS = {"tiny": 20_000, "default": 200_000}
GUIDANCE = {"paper (w_T 7.5, w_I 1.5)": {"guidance_scale": 7.5, "image_guidance_scale": 1.5},
            "demo (w_T 2.0, w_I 1.5)": {"guidance_scale": 2.0, "image_guidance_scale": 1.5}}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", choices=["tiny", "default"], default="tiny")
    parser.add_argument("--steps", type=int, default=1000, help="Training steps of each run (default 1000).")
    parser.add_argument("--train-batch-size", type=int, default=256, help="Rows per step of each run (default 256).")
    parser.add_argument("--train-triplets", type=int, default=None,
                        help="Training triplets to write (default 20,000 tiny, 200,000 default).")
    parser.add_argument("--recipes", default="defaults,paper_stage2",
                        help="Comma-separated rows: 'defaults' and/or recipe names (default: defaults,paper_stage2).")
    parser.add_argument("--num-inference-steps", type=int, default=10, help="Sampling steps (the paper's 10).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
    parser.add_argument("--work-dir", default=None, help="Keep the data and models here (default: a temporary one).")
    parser.add_argument("--output", default=None, help="JSON path (default: benchmarks/results/<machine>/... for the "
                        "default world, benchmarks/results/tiny/... for the tiny one).")
    args = parser.parse_args(argv)
    if args.steps <= 0 or args.train_batch_size <= 0:
        parser.error("--steps and --train-batch-size must be positive")
    args.recipes = [name.strip() for name in args.recipes.split(",") if name.strip()]
    from diffusers_cir.training.recipes import PAPER_RECIPES

    unknown = [name for name in args.recipes if name != "defaults" and name not in PAPER_RECIPES]
    if unknown or not args.recipes:
        parser.error(f"--recipes takes 'defaults' and names from {sorted(PAPER_RECIPES)}, got {unknown or 'none'}")
    return args


def training_argv(name: str, data_dir: str, output_dir: str, args: argparse.Namespace) -> list[str]:
    """The script's flags for one row: the world's data and denoiser, the shared budget, then the row's recipe."""
    from diffusers_cir.demo.embedding_world import world_training_data_argv

    argv = world_training_data_argv(data_dir, TRANSFORMER_CONFIG)
    position = argv.index("--objective_ratios")
    del argv[position:position + 2]  # each row's own mix (the defaults', or the recipe's)
    argv += [
        "--train_batch_size", str(args.train_batch_size),
        "--max_train_steps", str(args.steps),
        "--checkpointing_steps", str(args.steps),
        "--checkpoints_total_limit", "1",
        "--text_embedding_cache_size", "30000",
        "--shuffle_buffer_size", "10000",
        "--report_to", "none",
        "--seed", str(args.seed),
        "--output_dir", output_dir,
    ]
    if name != "defaults":
        argv += ["--recipe", name]
        if name == "paper_stage2":
            argv += ["--objective_ratios", PAPER_STAGE2_WITHOUT_MASKS]
    return argv


def evaluate(world, pipeline_dir: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Recall@1/5/10 (fractions) of the held-out test queries at each guidance of :data:`GUIDANCE`."""
    from diffusers_cir.pipelines import CompoDiffPipeline
    from diffusers_cir.retrieval.compose import compose_queries

    pipeline = CompoDiffPipeline.from_pretrained(pipeline_dir)
    pipeline.set_progress_bar_config(disable=True)
    test = world.triplets("test")
    references = world.image_embeds[torch.from_numpy(test.reference_indices)]
    recalls = {}
    for label, guidance in GUIDANCE.items():
        queries = compose_queries(pipeline, list(test.modification_texts), reference_embeds=references,
                                  batch_size=1000, seed=args.seed, num_inference_steps=args.num_inference_steps,
                                  **guidance)
        recalls[label] = world.recall_at_k(queries, test)
    return recalls


def run_row(name: str, world, data_dir: str, work_dir: Path, args: argparse.Namespace) -> dict:
    from diffusers_cir.training import main as train
    from diffusers_cir.training import parse_args as parse_training_args
    from diffusers_cir.training.compodiff_arguments import resolve_args

    output_dir = str(work_dir / name)
    shutil.rmtree(output_dir, ignore_errors=True)
    argv = training_argv(name, data_dir, output_dir, args)
    resolved = parse_training_args(argv)
    sources = resolve_args(argv)[2]
    differs = ("learning_rate", "adam_weight_decay", "transformer_dropout", "use_ema", "ema_decay",
               "condition_dropout", "text_drop_prob", "image_drop_prob", "both_drop_prob", "objective_ratios",
               "lr_scheduler", "lr_warmup_steps", "max_grad_norm")
    started = time.perf_counter()
    summary = train(resolved)
    seconds = time.perf_counter() - started
    return {
        "row": name,
        "config": {key: getattr(resolved, key) for key in differs},
        "sources": {key: sources[key] for key in differs},
        "objective_rows": summary["objective_rows"],
        "train_seconds": seconds,
        "recall": evaluate(world, output_dir, args),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers_cir.demo.embedding_world import build_world, write_training_data

    device = torch.device("cpu")
    started_environment = environment(device)  # the load average before the runs
    world = build_world(args.world, args.seed)
    triplets = args.train_triplets or TRAIN_TRIPLETS[args.world]
    temporary = None if args.work_dir else tempfile.TemporaryDirectory(prefix="compare-compodiff-recipes-")
    work_dir = Path(args.work_dir or temporary.name)
    try:
        data_dir = write_training_data(world, work_dir / "data", triplets, args.seed)
        rows = [run_row(name, world, data_dir, work_dir, args) for name in args.recipes]
        baselines = world.recall_at_k
        test = world.triplets("test")
        baseline = {name: baselines(queries, test) for name, queries in world.baseline_queries(test).items()}
    finally:
        if temporary is not None:
            temporary.cleanup()

    report = {
        "benchmark": "compare_compodiff_recipes",
        "world": args.world,
        "world_items": world.num_items,
        "test_queries": len(test),
        "train_triplets": triplets,
        "steps": args.steps,
        "train_batch_size": args.train_batch_size,
        "num_inference_steps": args.num_inference_steps,
        "seed": args.seed,
        **started_environment,
        "cpu_threads": torch.get_num_threads(),
        "rows": rows,
        "baselines": baseline,
    }
    print(f"CompoDiff recipes on the synthetic world ({args.world}: {world.num_items} items, {len(test)} held-out "
          f"test queries), {args.steps} steps of batch {args.train_batch_size} each, {torch.get_num_threads()} CPU "
          f"threads")
    header = f"{'row':<14} {'guidance':<24} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'train s':>8}"
    print(header)
    print("-" * len(header))
    for row in rows:
        for label, values in row["recall"].items():
            print(f"{row['row']:<14} {label:<24} {values['recall_at1']:>6.3f} {values['recall_at5']:>6.3f} "
                  f"{values['recall_at10']:>6.3f} {row['train_seconds']:>8.0f}")
    for name, values in baseline.items():
        print(f"{name:<14} {'-':<24} {values['recall_at1']:>6.3f} {values['recall_at5']:>6.3f} "
              f"{values['recall_at10']:>6.3f} {'-':>8}")
    write_results(results_path("compare_compodiff_recipes.json", args.world == "tiny", device, output=args.output),
                  report)
    return report


if __name__ == "__main__":
    main()
