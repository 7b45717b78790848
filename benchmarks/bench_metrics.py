#!/usr/bin/env python
"""Time the CIR metrics at scale: 100k queries x 1M gallery items, from top-50 ranked lists.

Each row times one ``diffusers_cir.metrics`` call on synthetic rankings (ids drawn from a 1M-image gallery,
targets planted in about half of the lists): CIRR Recall@K with the reference deleted and Recall_subset@K,
FashionIQ Recall@10/50, CIRCO mAP@K with 1-14 ground truths per query, GeneCIS Recall@K over 15 candidates;
plus CIRR with string ids and CIRR from a score matrix for comparison. Prints a table and writes JSON.

    python benchmarks/bench_metrics.py                       # 100k queries, 1M gallery, 3 repeats
    python benchmarks/bench_metrics.py --num-queries 10000 --output benchmarks/results/metrics_small.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from diffusers_cir import metrics


def unique_rankings(rng: np.random.Generator, num_queries: int, depth: int, gallery_size: int) -> np.ndarray:
    """[num_queries, depth] distinct gallery ids per row (a random arithmetic progression, shuffled)."""
    step = gallery_size // (depth + 1)
    start = rng.integers(0, gallery_size, size=num_queries)
    ids = (start[:, None] + step * np.arange(depth)[None, :]) % gallery_size
    order = np.argsort(rng.random((num_queries, depth)), axis=1)
    return np.take_along_axis(ids, order, axis=1).astype(np.int64)


def plant(rng: np.random.Generator, rankings: np.ndarray, gallery_size: int, exclude_column: int | None = None):
    """A target per row: a listed id (a random position) for half of the rows, an unlisted id otherwise."""
    num_queries, depth = rankings.shape
    listed = rng.random(num_queries) < 0.5
    columns = rng.integers(0, depth, size=num_queries)
    if exclude_column is not None:
        columns = np.where(columns == exclude_column, (columns + 1) % depth, columns)
    unlisted = (rankings.max(axis=1) + 1) % gallery_size  # never listed: not in the progression
    unlisted = np.where(np.isin(unlisted, rankings[:, :1]), (unlisted + 1) % gallery_size, unlisted)
    return np.where(listed, rankings[np.arange(num_queries), columns], unlisted)


def timed(function, repeats: int) -> tuple[float, float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), result


def build_cases(num_queries: int, gallery_size: int, seed: int, score_queries: int, score_gallery: int):
    rng = np.random.default_rng(seed)
    top51 = unique_rankings(rng, num_queries, 51, gallery_size)
    references = np.where(rng.random(num_queries) < 0.7, top51[:, 0], gallery_size - 1 - top51[:, 0])
    targets = plant(rng, top51, gallery_size, exclude_column=0)
    targets = np.where(targets == references, (targets + 1) % gallery_size, targets)
    subset = unique_rankings(rng, num_queries, 5, gallery_size)
    subset[:, 0] = np.where(rng.random(num_queries) < 0.3, targets, subset[:, 0])
    top50 = top51[:, 1:]
    fiq_targets = plant(rng, top50, gallery_size)
    counts = rng.integers(1, 15, size=num_queries)
    ground_truths = [[int(t)] + rng.integers(0, gallery_size, size=c - 1).tolist() for t, c in zip(fiq_targets, counts)]
    ground_truths = [list(dict.fromkeys(row)) for row in ground_truths]
    candidate_scores = rng.standard_normal((num_queries, 15)).astype(np.float32)
    string_top51 = top51.astype(str)
    score_matrix = torch.from_numpy(rng.standard_normal((score_queries, score_gallery)).astype(np.float32))
    score_targets = rng.integers(1, score_gallery, size=score_queries)

    return [
        ("CIRR R@{1,5,10,50}, reference deleted (top-51 int ids)", lambda: metrics.compute_cirr_metrics(
            target_ids=targets, reference_ids=references, ranked_ids=top51, subset_ks=())),
        ("CIRR R_subset@{1,2,3} (top-5 subset lists)", lambda: metrics.compute_cirr_metrics(
            target_ids=targets, reference_ids=references, ranked_ids=top51, ranked_subset_ids=subset, recall_ks=())),
        ("CIRR R@K, string ids (top-51)", lambda: metrics.compute_cirr_metrics(
            target_ids=targets.astype(str), reference_ids=references.astype(str), ranked_ids=string_top51, subset_ks=())),
        ("FashionIQ R@{10,50} (top-50)", lambda: metrics.fashioniq_recall_at_k(target_ids=fiq_targets, ranked_ids=top50)),
        ("CIRCO mAP@{5,10,25,50} + R@K (top-50, 1-14 GTs)", lambda: metrics.compute_circo_metrics(
            ground_truth_ids=ground_truths, ranked_ids=top50)),
        ("GeneCIS R@{1,2,3} (15 candidates)", lambda: metrics.genecis_recall_at_k(candidate_scores)),
        (f"CIRR R@K from scores ({score_queries} x {score_gallery})", lambda: metrics.compute_cirr_metrics(
            target_ids=score_targets, reference_ids=np.zeros(score_queries, dtype=np.int64), scores=score_matrix,
            gallery_ids=np.arange(score_gallery), subset_ks=())),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-queries", type=int, default=100_000)
    parser.add_argument("--gallery-size", type=int, default=1_000_000)
    parser.add_argument("--score-queries", type=int, default=2_000, help="Rows of the score-matrix comparison case.")
    parser.add_argument("--score-gallery", type=int, default=100_000, help="Columns of the score-matrix case.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results" / "bench_metrics.json")
    args = parser.parse_args(argv)

    print(f"Building synthetic top-50 rankings: {args.num_queries:,} queries, gallery of {args.gallery_size:,} ids...")
    cases = build_cases(args.num_queries, args.gallery_size, args.seed, args.score_queries, args.score_gallery)
    rows = []
    for name, function in cases:
        median, best, result = timed(function, args.repeats)
        queries = args.score_queries if "from scores" in name else args.num_queries
        rows.append({"case": name, "median_s": median, "min_s": best, "queries_per_s": queries / median,
                     "result": {key: round(value, 4) for key, value in result.items()}})
        print(f"  {name}: {median:.3f} s")

    width = max(len(row["case"]) for row in rows)
    print(f"\n| {'case':<{width}} | median s | min s | queries/s |")
    print(f"|{'-' * (width + 2)}|---------:|------:|----------:|")
    for row in rows:
        print(f"| {row['case']:<{width}} | {row['median_s']:8.3f} | {row['min_s']:5.3f} | {row['queries_per_s']:9,.0f} |")

    report = {
        "benchmark": "diffusers_cir.metrics at scale",
        "num_queries": args.num_queries,
        "gallery_size": args.gallery_size,
        "ranked_list_depth": 50,
        "repeats": args.repeats,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "numpy": np.__version__, "torch": torch.__version__},
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"\nWrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
