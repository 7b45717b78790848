#!/usr/bin/env python
"""What LDRE's adaptive ensemble adds to an evaluation: ``ldre_ensemble`` against the plain exact ranking of the same
queries (the baseline: one ``queries @ gallery.T`` and a top-50), on random embeddings of a CIRCO-shaped run.

    python benchmarks/bench_ldre_ensemble.py                                   # CIRCO test: 800 x 15 x 123,403 x 1280
    python benchmarks/bench_ldre_ensemble.py --queries 100 --gallery 12340 --threads 1 --repeats 3
    python benchmarks/bench_ldre_ensemble.py --tiny                            # smoke run

The ensemble computes ``slots`` times two score matrices per query (captions and rewrites against the gallery),
a block of queries at a time (``_BLOCK_ELEMENTS`` scores at once instead of ``queries x slots x gallery``); the
baseline one. Prints a table and writes JSON (``benchmarks/results/<machine>/ldre_ensemble_<device>.json``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as harness  # noqa: E402

from diffusers_cir.retrieval import ensemble  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=800, help="Queries (CIRCO test: 800).")
    parser.add_argument("--slots", type=int, default=15, help="Rewrites per query, one per caption (LDRE: 15).")
    parser.add_argument("--gallery", type=int, default=123_403, help="Gallery images (CIRCO: 123,403).")
    parser.add_argument("--dim", type=int, default=1280, help="Embedding width (ViT-bigG/14: 1280).")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny", action="store_true", help="Smoke run: 20 x 15 x 500 x 64, one repeat.")
    parser.add_argument("--machine-label", default=None)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    if args.tiny:
        args.queries, args.gallery, args.dim, args.repeats = 20, 500, 64, 1
    if min(args.queries, args.slots, args.gallery, args.dim, args.repeats, args.threads) < 1:
        parser.error("--queries, --slots, --gallery, --dim, --repeats and --threads must be positive")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    harness.set_threads(args.threads)
    env = harness.environment(device)
    print(f"# LDRE ensemble on {env['device']} ({env['cpu']}), threads {args.threads}, load average "
          f"{env['load_average_at_start']}", flush=True)
    generator = torch.Generator().manual_seed(0)
    rewrites = torch.randn(args.queries, args.slots, args.dim, generator=generator).to(device)
    captions = torch.randn(args.queries, args.slots, args.dim, generator=generator).to(device)
    gallery = torch.nn.functional.normalize(torch.randn(args.gallery, args.dim, generator=generator), dim=-1).to(device)
    plain = torch.nn.functional.normalize(rewrites.mean(dim=1), dim=-1)
    depth = min(50, args.gallery)
    samples = harness.interleaved({
        "plain_ranking": lambda: (plain @ gallery.T).topk(depth, dim=-1),
        "ldre_ensemble": lambda: ensemble.ldre_ensemble(rewrites, captions, gallery),
    }, device, args.repeats, warmup=0 if args.tiny else 1)
    rows = [{"step": name, **harness.summary(values)} for name, values in samples.items()]
    ratio = harness.ratios(samples, "plain_ranking")["ldre_ensemble"]
    rows[1].update(ratio)
    for row in rows:
        harness.print_row(row, ["step", "ms_median", "ms_min", "ratio_of_medians", "median_round_ratio"])
    block = min(args.queries, max(1, ensemble._BLOCK_ELEMENTS // (args.slots * args.gallery)))
    report = {
        "benchmark": "ldre_ensemble", "environment": env, "threads": args.threads, "args": vars(args), "rows": rows,
        "scores_held_at_once": block * args.slots * args.gallery,
        "scores_unblocked": args.queries * args.slots * args.gallery,
    }
    output = harness.results_path(f"ldre_ensemble_{device.type}.json", args.tiny, device, args.machine_label, args.output)
    report["machine_label"] = output.parent.name
    harness.write_results(output, report)
    return report


if __name__ == "__main__":
    main()
