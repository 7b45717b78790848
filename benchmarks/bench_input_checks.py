#!/usr/bin/env python
"""What the input checks of a CompoDiff call cost, against the call itself.

A 10-step call on embeddings (batch 1: `image_embeds`, `prompt_embeds`, `negative_prompt_embeds`, as a gallery search
composes queries) with the tiny and the full-size denoiser (random weights, `bench_compodiff.FULL`: 12 layers, width
768, text width 1280). Timed: the whole call; `check_inputs` alone (every boundary check, the finiteness of every tensor
argument included); `check_tensor_data` alone (NaN/inf and meta-device detection: one reduction per tensor, one host
synchronisation). Prints a table (median of repeats) and writes JSON.

    python benchmarks/bench_input_checks.py                      # CPU, one thread
    python benchmarks/bench_input_checks.py --threads 2 --repeats 30
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_compodiff import FULL, TINY  # noqa: E402

from diffusers_cir import CompoDiffPipeline, CompoDiffScheduler, CompoDiffTransformer  # noqa: E402
from diffusers_cir.pipelines.inputs import check_tensor_data  # noqa: E402


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def bench(name: str, config: dict, steps: int, repeats: int) -> dict:
    torch.manual_seed(0)
    transformer = CompoDiffTransformer(**config).eval()
    pipe = CompoDiffPipeline(transformer=transformer, scheduler=CompoDiffScheduler())
    pipe.set_progress_bar_config(disable=True)
    inputs = {
        "image_embeds": torch.randn(1, config["embedding_dim"]),
        "prompt_embeds": torch.randn(1, 77, config["text_embedding_dim"]),
        "negative_prompt_embeds": torch.randn(1, 77, config["text_embedding_dim"]),
    }

    def call():
        return pipe(**inputs, num_inference_steps=steps, generator=torch.Generator().manual_seed(0)).image_embeds

    def checks():
        return pipe.check_inputs(
            None, None, None, None, inputs["image_embeds"], inputs["prompt_embeds"], inputs["negative_prompt_embeds"],
            None, steps, 7.5, 1.5, 1, 1, 0.0, torch.Generator(), None, None, "pt", ["latents"],
        )

    def tensor_data():
        check_tensor_data(dict(inputs))

    with torch.no_grad():
        call_ms, checks_ms, data_ms = (median_ms(fn, repeats) for fn in (call, checks, tensor_data))
    return {
        "model": name, "steps": steps, "batch": 1, "call_ms": round(call_ms, 3), "check_inputs_ms": round(checks_ms, 4),
        "check_tensor_data_ms": round(data_ms, 4), "check_inputs_share": round(checks_ms / call_ms, 5),
        "check_tensor_data_share": round(data_ms / call_ms, 5),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--models", nargs="+", default=["tiny", "full"], choices=["tiny", "full"])
    parser.add_argument("--output", default="benchmarks/results/amd-epyc-2core/bench_input_checks.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hardware = f"{platform.processor() or platform.machine()} x{os.cpu_count()} (CPU, {args.threads} thread(s))"
    print(f"# CompoDiff input checks vs a {args.steps}-step call, batch 1, on {hardware}, torch {torch.__version__}")
    print(f"{'model':6} {'call ms':>10} {'check_inputs ms':>16} {'share':>8} {'tensor data ms':>15} {'share':>8}")
    results = []
    for name in args.models:
        row = bench(name, TINY if name == "tiny" else FULL, args.steps, args.repeats)
        results.append(row)
        print(f"{name:6} {row['call_ms']:10.2f} {row['check_inputs_ms']:16.4f} {row['check_inputs_share']:8.3%} "
              f"{row['check_tensor_data_ms']:15.4f} {row['check_tensor_data_share']:8.3%}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as handle:
        json.dump({"hardware": hardware, "torch": torch.__version__, "threads": args.threads, "results": results},
                  handle, indent=1)
    print(f"# wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
