#!/usr/bin/env python
"""Where the time goes in one CompoDiff sampling run (torch.profiler): top operators and kernel count.

    python benchmarks/profile_compodiff.py --device cuda --batch 1024 --dtype bfloat16
"""

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from diffusers_cir import CompoDiffPipeline, CompoDiffScheduler, CompoDiffTransformer

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_compodiff import FULL, TINY, make_inputs  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--compile_blocks", action="store_true", help="torch.compile every block first (eager run).")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = TINY if args.tiny else FULL
    pipe = CompoDiffPipeline(transformer=CompoDiffTransformer(**config).to(device, dtype).eval(), scheduler=CompoDiffScheduler())
    pipe.set_progress_bar_config(disable=True)
    if args.compile_blocks:
        for block in pipe.transformer.blocks:
            block.compile(dynamic=False)
    inputs = make_inputs(args.batch, config, device, dtype, torch.Generator().manual_seed(0))
    run = lambda: pipe(**inputs, num_inference_steps=args.steps)  # noqa: E731
    run()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))
    if device.type == "cuda":
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        total_us = sum(e.time_range.elapsed_us() for e in kernels)
        print(f"# CUDA kernels in one run: {len(kernels)}, {total_us / 1e3:.2f} ms of kernel time "
              f"({total_us / max(len(kernels), 1):.1f} us each on average)")
        by_name: dict = {}
        for event in kernels:
            count, time_us = by_name.get(event.name, (0, 0.0))
            by_name[event.name] = (count + 1, time_us + event.time_range.elapsed_us())
        print(f"{'kernel time ms':>14} {'count':>6}  kernel")
        for name, (count, time_us) in sorted(by_name.items(), key=lambda item: -item[1][1])[: args.rows]:
            print(f"{time_us / 1e3:14.3f} {count:6d}  {name[:110]}")


if __name__ == "__main__":
    main()
