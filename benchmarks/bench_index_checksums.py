#!/usr/bin/env python
"""Cost of verifying a saved GalleryIndex against its content checksums, on a large exact index.

    python benchmarks/bench_index_checksums.py                        # 1M x 768 float32 Flat (about 3.1 GB on disk)
    python benchmarks/bench_index_checksums.py --rows 100000 --repeats 5

Builds a ``Flat`` index of ``--rows`` random unit vectors in a temporary folder (``--folder``; removed at the end), saves
it (which writes ``checksums.json``), then times, median of ``--repeats``:

1. the checksum part of the save (``write_manifest`` over the saved files) against the whole save;
2. ``GalleryIndex.load`` with and without ``verify_checksums``, read into memory and memory-mapped (``mmap=True``),
   with the files in the page cache (as right after a build) and evicted from it first (``posix_fadvise
   DONTNEED`` on the index files only, so the verification reads them from disk: the case of a huge on-disk index).

Prints a table and writes JSON (default ``benchmarks/results/amd-epyc-2core/bench_index_checksums.json``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="Indexed vectors. Default: 1,000,000.")
    parser.add_argument("--dim", type=int, default=768, help="Vector width. Default: 768.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", default=None, help="Where the temporary index goes (default: the system temp).")
    parser.add_argument(
        "--output", default=os.path.join(os.path.dirname(__file__), "results", "amd-epyc-2core", "bench_index_checksums.json"))
    args = parser.parse_args(argv)
    if args.rows < 1 or args.dim < 1 or args.repeats < 1:
        parser.error("--rows, --dim and --repeats must be positive")
    return args


def median_seconds(function, repeats: int, before=None) -> float:
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(functions: dict, repeats: int, before=None) -> dict:
    """Median seconds of each function, the functions taking turns within every repeat: on a shared machine the
    load changes over a run, and timing one variant's repeats after the other's measured that change (the in-memory
    load from evicted files once came out 8 s faster verified than unverified)."""
    times = {key: [] for key in functions}
    for _ in range(repeats):
        for key, function in functions.items():
            times[key].append(median_seconds(function, 1, before))
    return {key: statistics.median(values) for key, values in times.items()}


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (platform.processor() says only "x86_64" on Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def evict(folder: Path) -> None:
    """Drop the page-cache pages of the index files (only these files: the machine is shared)."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def warm(folder: Path) -> None:
    """Read the index files once, so that they are in the page cache."""
    from diffusers_cir.utils.checksums import file_digest

    for path in folder.iterdir():
        if path.is_file():
            file_digest(path)


def build(rows: int, dim: int, folder: Path) -> float:
    """Save a Flat index of ``rows`` random unit vectors into ``folder``; returns the save's seconds."""
    from diffusers_cir.retrieval import GalleryIndex

    index = GalleryIndex(dim, factory="Flat", model="random")
    rng = np.random.default_rng(0)
    chunk = 100_000
    for start in range(0, rows, chunk):
        index.add(rng.standard_normal((min(chunk, rows - start), dim), dtype=np.float32))
    started = time.perf_counter()
    index.save(folder)
    return time.perf_counter() - started


def main(argv=None) -> dict:
    args = parse_args(argv)
    from diffusers_cir.retrieval import GalleryIndex
    from diffusers_cir.retrieval.index import MANIFEST_NAME
    from diffusers_cir.utils.checksums import MANIFEST_NAME as CHECKSUMS_NAME
    from diffusers_cir.utils.checksums import (
        default_algorithm,
        read_manifest,
        write_manifest,
    )

    base = Path(tempfile.mkdtemp(prefix="bench-index-checksums-", dir=args.folder))
    try:
        folder = base / "index"
        save_seconds = build(args.rows, args.dim, folder)
        files = list(read_manifest(folder, CHECKSUMS_NAME)["files"])
        size = sum((folder / name).stat().st_size for name in files if name != MANIFEST_NAME)
        checksum_seconds = median_seconds(lambda: write_manifest(folder, files=files, name=CHECKSUMS_NAME), args.repeats)
        rows = []
        for mmap in (False, True):
            for cache in ("page cache", "evicted"):
                before = (lambda: evict(folder)) if cache == "evicted" else None
                if before is None:
                    warm(folder)
                timings = interleaved_medians(
                    {verify: functools.partial(GalleryIndex.load, folder, mmap=mmap, verify_checksums=verify)
                     for verify in (True, False)},
                    args.repeats, before,
                )
                rows.append({
                    "mmap": mmap, "cache": cache, "load_verified_s": timings[True], "load_unverified_s": timings[False],
                    "verification_s": timings[True] - timings[False],
                    "verified_over_unverified": timings[True] / timings[False],
                })
    finally:
        shutil.rmtree(base, ignore_errors=True)

    report = {
        "benchmark": "index_checksums",
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "algorithm": default_algorithm(),
        "rows": args.rows,
        "dim": args.dim,
        "index_gb": size / 1e9,
        "repeats": args.repeats,
        "save_s": save_seconds,
        "checksum_write_s": checksum_seconds,
        "checksum_share_of_save": checksum_seconds / save_seconds,
        "loads": rows,
    }
    print(f"Flat index {args.rows:,} x {args.dim} ({size / 1e9:.2f} GB), {report['algorithm']}, {report['cpu']}, "
          f"{report['cpu_count']} CPUs, OMP_NUM_THREADS={report['threads']}, median of {args.repeats}")
    print(f"save {save_seconds:.2f} s, of which checksums {checksum_seconds:.2f} s "
          f"({report['checksum_share_of_save']:.0%}; {size / 1e9 / checksum_seconds:.1f} GB/s)")
    print(f"{'load':>8} {'files':>11} {'verified s':>11} {'unverified s':>13} {'verify s':>9} {'ratio':>6}")
    for row in rows:
        print(f"{'mmap' if row['mmap'] else 'memory':>8} {row['cache']:>11} {row['load_verified_s']:>11.2f} "
              f"{row['load_unverified_s']:>13.2f} {row['verification_s']:>9.2f} {row['verified_over_unverified']:>6.2f}")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
        print(f"Wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
