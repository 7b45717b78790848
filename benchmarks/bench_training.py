#!/usr/bin/env python
"""Training throughput of the CompoDiff denoiser: samples/s and step time of the training step of
``examples/train_compodiff.py`` (condition dropout, scheduler noising, x0 prediction, MSE, backward, gradient
clipping, AdamW, optionally EMA) on precomputed embeddings, through accelerate's mixed precision.

    python benchmarks/bench_training.py --device cuda                 # full size, bf16, batch 256 and 1024
    python benchmarks/bench_training.py --tiny --device cpu           # the synthetic-world denoiser on CPU

Full size = the released CompoDiff: width 768, 12 layers, 16 heads of 64, text width 1280 (77 tokens), 8 cross-attention
heads. "Precomputed embeddings" means image embeddings *and* text hidden states come from the data (the frozen CLIP
encoders are not part of the step). Prints a table and writes JSON (default ``benchmarks/results/training.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

FULL = dict(embedding_dim=768, text_embedding_dim=1280, num_layers=12, num_attention_heads=16, attention_head_dim=64)
TINY = dict(embedding_dim=64, text_embedding_dim=64, num_layers=2, num_attention_heads=2, attention_head_dim=32,
            num_cross_attention_heads=2)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="The synthetic-world denoiser (64 wide, 2 layers).")
    parser.add_argument("--batch-sizes", default=None, help="Comma-separated (default: 256,1024 full; 256 tiny).")
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default=None,
                        help="Default: bf16 on CUDA, no on CPU.")
    parser.add_argument("--steps", type=int, default=None, help="Timed steps per batch size (default 30 GPU, 10 CPU).")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ema", action="store_true", help="Include the EMA update in the step.")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "training.json"))
    args = parser.parse_args(argv)
    if args.batch_sizes is None:
        args.batch_sizes = "256" if args.tiny else "256,1024"
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if not args.batch_sizes or min(args.batch_sizes) <= 0:
        parser.error("--batch-sizes must be positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible; use --device cpu (with --tiny)")
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if args.device.startswith("cuda") else "no"
    if args.steps is None:
        args.steps = 30 if args.device.startswith("cuda") else 10
    return args


def bench_batch_size(args, config: dict, batch_size: int) -> dict:
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    from diffusers_cir import CompoDiffScheduler, CompoDiffTransformer
    from diffusers_cir.training import ConditionDropout, compodiff_loss

    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=not args.device.startswith("cuda"))
    device = accelerator.device
    torch.manual_seed(0)
    model = CompoDiffTransformer(**config)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ema = EMAModel(model.parameters(), decay=0.9999) if args.ema else None
    model, optimizer = accelerator.prepare(model, optimizer)
    if ema is not None:
        ema.to(device)
    scheduler = CompoDiffScheduler()
    dropout = ConditionDropout()
    dim, text_dim = config["embedding_dim"], config["text_embedding_dim"]
    generator = torch.Generator(device=device).manual_seed(0)
    # Precomputed data, on the device as a loader with pinned memory would deliver it.
    target = torch.nn.functional.normalize(torch.randn(batch_size, dim, device=device), dim=-1) * dim**0.5
    reference = torch.nn.functional.normalize(torch.randn(batch_size, dim, device=device), dim=-1)
    text = torch.randn(batch_size, 77, text_dim, device=device)
    null_text = torch.randn(1, 77, text_dim, device=device)

    def step():
        image, hidden, _, _ = dropout.apply(reference, text, null_text, generator=generator)
        loss = compodiff_loss(model, scheduler, target, image, hidden, generator=generator)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(accelerator.unwrap_model(model).parameters())
        return loss

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        synchronize()
        times.append(time.perf_counter() - start)
    if not torch.isfinite(loss):
        raise RuntimeError(f"Non-finite loss at batch {batch_size}: the benchmark step is broken.")
    result = {
        "batch_size": batch_size,
        "step_ms_mean": 1000 * statistics.fmean(times),
        "step_ms_median": 1000 * statistics.median(times),
        "samples_per_second": batch_size / statistics.median(times),
        "parameters": sum(p.numel() for p in accelerator.unwrap_model(model).parameters()),
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    accelerator.free_memory()
    del model, optimizer, ema
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = TINY if args.tiny else FULL
    rows = []
    for batch_size in args.batch_sizes:
        rows.append(bench_batch_size(args, config, batch_size))
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    report = {
        "benchmark": "compodiff_training_step",
        "model": "tiny" if args.tiny else "full",
        "config": config,
        "device": args.device,
        "device_name": device_name,
        "cpu_threads": torch.get_num_threads(),
        "mixed_precision": args.mixed_precision,
        "ema": args.ema,
        "gradient_checkpointing": args.gradient_checkpointing,
        "steps": args.steps,
        "torch": torch.__version__,
        "results": rows,
    }
    header = f"{'batch':>6} {'step ms (median)':>17} {'step ms (mean)':>15} {'samples/s':>11}"
    if args.device.startswith("cuda"):
        header += f" {'peak GiB':>9}"
    print(f"CompoDiff training step, {report['model']} denoiser ({rows[0]['parameters']:,} parameters), "
          f"{device_name}, mixed precision {args.mixed_precision}, {torch.get_num_threads()} CPU threads")
    print(header)
    for row in rows:
        line = (f"{row['batch_size']:>6} {row['step_ms_median']:>17.2f} {row['step_ms_mean']:>15.2f} "
                f"{row['samples_per_second']:>11.1f}")
        if "peak_memory_gib" in row:
            line += f" {row['peak_memory_gib']:>9.2f}"
        print(line)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
        print(f"Wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
