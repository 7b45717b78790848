#!/usr/bin/env python
"""Where the time goes in one CompoDiff sampling run (torch.profiler): top operators, and the matrix-product share.

    python benchmarks/profile_compodiff.py --device cuda --batch 1024 --dtype bfloat16
    python benchmarks/profile_compodiff.py --device cpu --batch 64 --dtype float32 --threads 1 \
        --reference-code /tmp/CompoDiff          # the authors' loop profiled too, same weights

The matrix-product share is the self time of the operators that multiply matrices (mm, addmm, bmm, the int8
products) over the self time of all operators: the rest is the small operations (norms, softmax, copies, views,
elementwise arithmetic) that a batch leaves memory- or launch-bound. `--output` writes both profiles' shares and top
operators as JSON.
"""

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import _harness as harness  # noqa: E402
from bench_compodiff import FULL, TINY, make_inputs, make_pipe  # noqa: E402

from diffusers_cir import CompoDiffTransformer  # noqa: E402

MATMUL_OPERATORS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_int_mm",
                    "onednn::qlinear_pointwise", "aten::_weight_int8pack_mm", "mkldnn::_linear_pointwise"}


def cpu_profile(run, rows: int) -> dict:
    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    averages = prof.key_averages()
    total = sum(event.self_cpu_time_total for event in averages)
    matmul = sum(event.self_cpu_time_total for event in averages if event.key in MATMUL_OPERATORS)
    top = sorted(averages, key=lambda event: -event.self_cpu_time_total)[:rows]
    return {
        "self_cpu_ms": round(total / 1e3, 2), "matmul_ms": round(matmul / 1e3, 2),
        "matmul_share": round(matmul / total, 3), "operator_calls": int(sum(event.count for event in averages)),
        "top": [{"operator": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 2), "calls": e.count,
                 "share": round(e.self_cpu_time_total / total, 3)} for e in top],
    }


def print_profile(name: str, result: dict) -> None:
    print(f"## {name}: {result['self_cpu_ms']} ms of operator self time, {result['operator_calls']} operator calls, "
          f"matrix products {result['matmul_ms']} ms = {result['matmul_share']:.1%}")
    for row in result["top"]:
        print(f"{row['self_ms']:10.2f} ms {row['share']:6.1%} {row['calls']:7d}  {row['operator']}")


def cuda_profile(run, rows: int) -> None:
    run()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows))
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.time_range.elapsed_us() for e in kernels)
    print(f"# CUDA kernels in one run: {len(kernels)}, {total_us / 1e3:.2f} ms of kernel time "
          f"({total_us / max(len(kernels), 1):.1f} us each on average)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (default 1).")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--int8", action="store_true", help="Profile the int8 CPU path (quantize_for_cpu) too.")
    parser.add_argument("--compile_blocks", action="store_true", help="torch.compile every block first (eager run).")
    parser.add_argument("--reference-code", default=None, help="A checkout of navervision/CompoDiff: profile it too.")
    parser.add_argument("--output", default=None, help="JSON file for the CPU profiles.")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu":
        harness.set_threads(args.threads)
    runs = {}
    if args.reference_code:
        import compodiff_authors

        config = compodiff_authors.TINY_CONFIG if args.tiny else compodiff_authors.FULL_CONFIG
        authors, transformer = compodiff_authors.build_pair(args.reference_code, config)
        width, text_width = config["embed_dim"], compodiff_authors.TEXT_WIDTH
        generator = torch.Generator().manual_seed(0)
        inputs = {"image_embeds": torch.randn(args.batch, width, generator=generator),
                  "prompt_embeds": torch.randn(args.batch, 77, text_width, generator=generator),
                  "negative_prompt_embeds": torch.randn(1, 77, text_width, generator=generator)}
        runs["authors"] = lambda: compodiff_authors.authors_sample(authors, inputs, args.steps, seed=0)
    else:
        config = TINY if args.tiny else FULL
        transformer = CompoDiffTransformer(**config)
        inputs = make_inputs(args.batch, config, device, dtype, torch.Generator().manual_seed(0))
    pipe = make_pipe(transformer.to(device, dtype).eval())
    if args.compile_blocks:
        for block in pipe.transformer.blocks:
            block.compile(dynamic=False)
    runs["package"] = lambda: pipe(**inputs, num_inference_steps=args.steps)
    if args.int8:
        import copy

        from diffusers_cir import quantize_for_cpu

        quantized = copy.deepcopy(transformer)
        quantize_for_cpu(quantized)
        int8_pipe = make_pipe(quantized)
        runs["package-int8"] = lambda: int8_pipe(**inputs, num_inference_steps=args.steps)
    with torch.no_grad():
        if device.type == "cuda":
            cuda_profile(runs["package"], args.rows)
            return
        results = {name: cpu_profile(run, args.rows) for name, run in runs.items()}
    for name, result in results.items():
        print_profile(name, result)
    if args.output:
        harness.write_results(harness.results_path("", False, device, output=args.output), {
            "benchmark": "profile_compodiff", "environment": harness.environment(device), "threads": args.threads,
            "batch": args.batch, "steps": args.steps, "dtype": args.dtype, "profiles": results})


if __name__ == "__main__":
    main()
