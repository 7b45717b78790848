#!/usr/bin/env python
"""Cost of the content checksums of training checkpoints: hash throughput, and their share of a checkpoint save.

    python benchmarks/bench_checksums.py                       # throughput + checkpoints of the tiny and small denoiser
    python benchmarks/bench_checksums.py --models tiny,small,full --repeats 5

1. Throughput (MB/s, median of repeats) of the candidate hashes on an in-memory buffer, and of
   ``diffusers_cir.utils.checksums.file_digest`` (memory-mapped) on a file in the page cache, as right after a save.
2. A real checkpoint (``diffusers_cir.training.checkpoints.save_checkpoint`` pieces: ``accelerator.save_state`` of a
   CompoDiff denoiser with AdamW state, the loop state and the EMA as safetensors + JSON), then ``write_manifest`` on it
   and ``verify_manifest`` as a resume does: milliseconds and the checksum's share of the save.

Prints a table and writes JSON (default ``benchmarks/results/checksums.json``).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time

import torch

MODELS = {
    # the demo's denoiser (diffusers_cir.demo)
    "tiny": {"embedding_dim": 64, "text_embedding_dim": 64, "num_layers": 2, "num_attention_heads": 2,
             "attention_head_dim": 32, "num_cross_attention_heads": 2},
    "small": {"embedding_dim": 512, "text_embedding_dim": 512, "num_layers": 6, "num_attention_heads": 8,
              "attention_head_dim": 64},
    # the released CompoDiff size (about 1.8 GB of checkpoint with AdamW and EMA)
    "full": {"embedding_dim": 768, "text_embedding_dim": 1280, "num_layers": 12, "num_attention_heads": 16,
             "attention_head_dim": 64},
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--buffer-mib", type=int, default=256, help="Size of the throughput buffer and file.")
    parser.add_argument("--models", default="tiny,small", help=f"Comma-separated, from {sorted(MODELS)}.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "checksums.json"))
    args = parser.parse_args(argv)
    args.models = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in args.models if name not in MODELS]
    if unknown or not args.models:
        parser.error(f"--models must name some of {sorted(MODELS)}, got {unknown or args.models}")
    if args.buffer_mib < 1 or args.repeats < 1:
        parser.error("--buffer-mib and --repeats must be positive")
    return args


def median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hash_throughput(buffer_mib: int, repeats: int, folder: str) -> list[dict]:
    from diffusers_cir.utils.checksums import file_digest

    data = os.urandom(buffer_mib * 1024 * 1024)
    view = memoryview(data)
    candidates = {"blake2b": lambda: hashlib.blake2b(view, digest_size=16).hexdigest(),
                  "sha256": lambda: hashlib.sha256(view).hexdigest()}
    try:
        import xxhash

        candidates = {"xxh3_64": lambda: xxhash.xxh3_64(view).hexdigest(),
                      "xxh3_128": lambda: xxhash.xxh3_128(view).hexdigest(), **candidates}
    except ImportError:
        pass
    rows = [{"hash": name, "source": "memory", "mb_per_second": len(data) / 1e6 / median_seconds(run, repeats)}
            for name, run in candidates.items()]
    path = os.path.join(folder, "buffer.bin")
    with open(path, "wb") as handle:
        handle.write(data)
    for algorithm in ("xxh3_128", "blake2b") if "xxh3_128" in candidates else ("blake2b",):
        seconds = median_seconds(functools.partial(file_digest, path, algorithm), repeats)
        rows.append({"hash": algorithm, "source": "file (page cache, mmap)",
                     "mb_per_second": len(data) / 1e6 / seconds})
    os.remove(path)
    return rows


def checkpoint_cost(name: str, repeats: int, folder: str) -> dict:
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    from diffusers_cir.models import CompoDiffTransformer
    from diffusers_cir.training.checkpoints import CheckpointState
    from diffusers_cir.training.state import GeneratorState
    from diffusers_cir.utils.checksums import verify_manifest, write_manifest

    accelerator = Accelerator()
    model = CompoDiffTransformer(**MODELS[name])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for parameter in model.parameters():  # one step, so that AdamW has its two moments per parameter
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    ema = EMAModel(model.parameters(), model_cls=CompoDiffTransformer, model_config=model.config)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = CheckpointState(accelerator)
    state.register("noise_generator", GeneratorState(torch.Generator().manual_seed(0)), per_rank=True)
    state.register("ema", ema, per_rank=False)

    target = os.path.join(folder, f"checkpoint-{name}")

    def save():
        shutil.rmtree(target, ignore_errors=True)
        accelerator.save_state(target)
        state.save(target)

    save_seconds = median_seconds(save, repeats)
    write_seconds = median_seconds(lambda: write_manifest(target), repeats)
    verify_seconds = median_seconds(lambda: verify_manifest(target), repeats)
    size = sum(entry.stat().st_size for entry in os.scandir(target) if entry.is_file())
    shutil.rmtree(target)
    return {
        "model": name,
        "parameters": sum(p.numel() for p in accelerator.unwrap_model(model).parameters()),
        "checkpoint_mb": size / 1e6,
        "save_ms": save_seconds * 1e3,
        "checksum_write_ms": write_seconds * 1e3,
        "checksum_verify_ms": verify_seconds * 1e3,
        "checksum_share_of_save": write_seconds / (save_seconds + write_seconds),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        throughput = hash_throughput(args.buffer_mib, args.repeats, folder)
        checkpoints = [checkpoint_cost(name, args.repeats, folder) for name in args.models]
    from diffusers_cir.utils.checksums import default_algorithm

    report = {
        "benchmark": "checkpoint_checksums",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "algorithm": default_algorithm(),
        "repeats": args.repeats,
        "throughput": throughput,
        "checkpoints": checkpoints,
    }
    print(f"Hash throughput ({report['cpu']}, {report['cpu_count']} CPUs, median of {args.repeats}, "
          f"{args.buffer_mib} MiB)")
    print(f"{'hash':>10} {'source':>32} {'MB/s':>9}")
    for row in throughput:
        print(f"{row['hash']:>10} {row['source']:>32} {row['mb_per_second']:>9.0f}")
    print(f"\nCheckpoint save with {report['algorithm']} checksums (model, AdamW, EMA, loop state)")
    print(f"{'model':>6} {'params':>12} {'MB':>8} {'save ms':>9} {'checksum ms':>12} {'verify ms':>10} {'share':>7}")
    for row in checkpoints:
        print(f"{row['model']:>6} {row['parameters']:>12,} {row['checkpoint_mb']:>8.1f} {row['save_ms']:>9.1f} "
              f"{row['checksum_write_ms']:>12.1f} {row['checksum_verify_ms']:>10.1f} "
              f"{row['checksum_share_of_save']:>7.1%}")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
        print(f"Wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
