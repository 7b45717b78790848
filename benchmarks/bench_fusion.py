#!/usr/bin/env python
"""Training throughput of the composition-network methods (CLIP4Cir, SCOT, MTST): samples/s of the training step of
``examples/train_fusion.py`` itself (``diffusers_cir.training.train_fusion.train_step``: the towers' features, the head,
the method's objective, backward, gradient clipping, AdamW), per method, regime and batch size.

    python benchmarks/bench_fusion.py --device cpu                  # RN50x4 sizes (CLIP4Cir's backbone) on CPU
    python benchmarks/bench_fusion.py --device cuda --regimes features,text-tower,image-tower
    python benchmarks/bench_fusion.py --tiny                        # the synthetic world's sizes

Regimes: ``features``: reference and target features precomputed, text features cached (the head alone: what a run on
an ``embeddings`` configuration with ``--text-feature-cache-size`` does); ``text-tower``: the frozen text tower encodes
every text of every step (no cache; SCOT encodes three texts per row, MTST two); ``image-tower``: the frozen image tower
also encodes the references and targets from pixels (an ``images`` configuration). Towers are open_clip RN50x4's
architecture (640-wide features, 288 px images) with random weights: the arithmetic of the real model, nothing
downloaded. Each step is timed alone; the table gives the median over ``--steps`` after ``--warmup``. Prints a table and
writes JSON (default ``benchmarks/results/fusion.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from types import SimpleNamespace

import torch

METHODS = ("clip4cir", "scot", "mtst")
REGIMES = ("features", "text-tower", "image-tower")
WORDS = ["red", "blue", "green", "long", "short", "sleeves", "collar", "buttons", "pattern", "striped", "dotted",
         "floral", "darker", "lighter", "wider", "tighter", "longer", "shorter", "cotton", "silk", "leather", "logo",
         "text", "print", "pocket", "zipper", "hood", "belt"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="The synthetic world's towers (64-wide features).")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--regimes", default=None, help="Comma-separated (default: features,text-tower; CUDA adds "
                        "image-tower).")
    parser.add_argument("--batch-sizes", default="1024,4096",
                        help="Comma-separated batch sizes of the features regime (4096: CLIP4Cir's Combiner batch).")
    parser.add_argument("--text-batch-size", type=int, default=None,
                        help="Batch of the text-tower regime (default: 64 CPU, 1024 CUDA).")
    parser.add_argument("--image-batch-size", type=int, default=None,
                        help="Batch of the image-tower regime (default: 8 CPU, 256 CUDA).")
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default=None,
                        help="Default: bf16 on CUDA, no on CPU.")
    parser.add_argument("--steps", type=int, default=None, help="Timed steps (default 20 CUDA, 5 CPU).")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "fusion.json"))
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible; use --device cpu")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown or not args.methods:
        parser.error(f"--methods takes {', '.join(METHODS)}; got {unknown or 'none'}")
    args.regimes = [r.strip() for r in (args.regimes or ("features,text-tower,image-tower" if cuda else
                                                         "features,text-tower")).split(",") if r.strip()]
    if set(args.regimes) - set(REGIMES) or not args.regimes:
        parser.error(f"--regimes takes {', '.join(REGIMES)}")
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        parser.error("--batch-sizes must be comma-separated integers")
    if min(args.batch_sizes) < 2:
        parser.error("--batch-sizes must be at least 2 (the other rows are the negatives)")
    args.text_batch_size = args.text_batch_size or (1024 if cuda else 64)
    args.image_batch_size = args.image_batch_size or (256 if cuda else 8)
    if min(args.text_batch_size, args.image_batch_size) < 2:
        parser.error("--text-batch-size and --image-batch-size must be at least 2")
    args.mixed_precision = args.mixed_precision or ("bf16" if cuda else "no")
    args.steps = args.steps or (20 if cuda else 5)
    return args


def build_towers(tiny: bool):
    """``(text_encoder, tokenizer, image_encoder, image size)``: RN50x4's open_clip towers or the tiny world's."""
    from diffusers_cir import OpenCLIPTextEncoder, OpenCLIPVisionEncoder
    from diffusers_cir.utils import build_offline_clip_tokenizer

    torch.manual_seed(0)
    if tiny:
        config = {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}
    else:
        import open_clip

        config = {**open_clip.get_model_config("RN50x4"), "quick_gelu": True}  # OpenAI's weights run QuickGELU
    text, image = OpenCLIPTextEncoder(config).eval(), OpenCLIPVisionEncoder(config).eval()
    return text, build_offline_clip_tokenizer(), image, image.image_size


def texts(count: int, seed: int) -> list[str]:
    """Distinct modification-like texts of 8 to 16 words."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for row in range(count):
        length = 8 + int(torch.randint(0, 9, (1,), generator=generator))
        words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (length,), generator=generator)]
        rows.append(f"{row} " + " ".join(words))
    return rows


def make_batch(batch_size: int, width: int, image_size: int, regime: str, device) -> dict:
    batch = {"ids": [str(i) for i in range(batch_size)], "texts": texts(batch_size, 1),
             "target_texts": texts(batch_size, 2), "reference_texts": texts(batch_size, 3), "reverse_texts": texts(batch_size, 4)}
    if regime == "image-tower":
        batch["reference_pixel_values"] = torch.randn(batch_size, 3, image_size, image_size, device=device)
        batch["target_pixel_values"] = torch.randn(batch_size, 3, image_size, image_size, device=device)
    else:
        batch["reference_embeds"] = torch.randn(batch_size, width, device=device)
        batch["target_embeds"] = torch.randn(batch_size, width, device=device)
    return batch


def build_run(args, method_name: str, regime: str, towers):
    """A :class:`~diffusers_cir.training.train_fusion.FusionRun` as ``setup_run`` builds it, on in-memory towers."""
    from accelerate import Accelerator

    from diffusers_cir.training.components import build_optimizer, freeze, weight_dtype
    from diffusers_cir.training.fusion_components import Encoders, TextFeatureCache
    from diffusers_cir.training.fusion_methods import FUSION_METHODS, build_head
    from diffusers_cir.training.train_fusion import FusionRun

    method = FUSION_METHODS[method_name]
    text_encoder, tokenizer, image_encoder, _ = towers
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=not args.device.startswith("cuda"))
    dtype = weight_dtype(accelerator)
    run_args = SimpleNamespace(
        method=method_name, objective=method.objective, temperature=method.defaults["temperature"],
        label_smoothing=method.defaults["label_smoothing"], caption_negatives=method.defaults["caption_negatives"],
        reverse_text_weight=method.defaults["reverse_text_weight"], max_grad_norm=1.0, learning_rate=2e-5,
        adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.0, adam_epsilon=1e-8, projection_dim=None,
        hidden_dim=None, head_dropout=0.5,
    )
    torch.manual_seed(0)
    head = build_head(method.head, text_encoder.embed_dim, run_args)
    parts = Encoders(freeze(text_encoder, accelerator, dtype), tokenizer, freeze(image_encoder, accelerator, dtype))
    optimizer = build_optimizer(run_args, head.parameters(), run_args.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    head, optimizer, scheduler = accelerator.prepare(head.train(), optimizer, scheduler)
    run = FusionRun(args=run_args, accelerator=accelerator, log=None, method=method, head=head, parts=parts,
                    kind="open_clip", dtype=dtype, optimizer=optimizer, lr_scheduler=scheduler,
                    dropout_generator=torch.Generator().manual_seed(0))
    cache = 10**9 if regime == "features" else 0
    run.text_features = TextFeatureCache(parts.text_encoder, tokenizer, cache, accelerator.device, dtype)
    return run


def bench(args, method_name: str, regime: str, batch_size: int, towers) -> dict:
    from diffusers_cir.training.train_fusion import train_step

    run = build_run(args, method_name, regime, towers)
    device = run.accelerator.device
    batch = make_batch(batch_size, towers[0].embed_dim, towers[3], regime, device)
    if regime == "features":  # the cache is warm, as after the first pass over the data
        for key in ("texts", "target_texts", "reference_texts", "reverse_texts"):
            run.text_features(batch[key])

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        train_step(run, batch)
    synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss, _ = train_step(run, batch)
        synchronize()
        times.append(time.perf_counter() - start)
    if not torch.isfinite(torch.tensor(loss)):
        raise RuntimeError(f"Non-finite loss ({method_name}, {regime}, batch {batch_size}): the step is broken.")
    head = run.accelerator.unwrap_model(run.head)
    result = {"method": method_name, "regime": regime, "batch_size": batch_size,
              "step_ms_median": 1000 * statistics.median(times), "step_ms_mean": 1000 * statistics.fmean(times),
              "samples_per_second": batch_size / statistics.median(times), "head": type(head).__name__,
              "head_parameters": sum(p.numel() for p in head.parameters())}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    run.accelerator.free_memory()
    return result


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    towers = build_towers(args.tiny)
    rows = []
    for method in args.methods:
        for regime in args.regimes:
            sizes = {"features": args.batch_sizes, "text-tower": [args.text_batch_size],
                     "image-tower": [args.image_batch_size]}[regime]
            for size in sizes:
                rows.append(bench(args, method, regime, size, towers))
                print(f"  {method} {regime} batch {size}: {rows[-1]['samples_per_second']:.1f} samples/s", flush=True)
    report = {
        "benchmark": "fusion_training_step", "towers": "tiny" if args.tiny else "open_clip RN50x4 (random weights)",
        "feature_dim": towers[0].embed_dim, "image_size": towers[3], "device": args.device,
        "device_name": device_name(args.device), "cpu_threads": torch.get_num_threads(),
        "mixed_precision": args.mixed_precision, "steps": args.steps, "warmup": args.warmup, "torch": torch.__version__,
        "results": rows,
    }
    print(f"Composition-network training step, {report['towers']} towers (features {report['feature_dim']}), "
          f"{report['device_name']}, mixed precision {args.mixed_precision}, {report['cpu_threads']} CPU threads, "
          f"median of {args.steps} steps")
    header = f"{'method':<9} {'regime':<12} {'head':<17} {'batch':>6} {'step ms':>9} {'samples/s':>10}"
    print(header + (f" {'peak GiB':>9}" if args.device.startswith("cuda") else ""))
    for row in rows:
        line = (f"{row['method']:<9} {row['regime']:<12} {row['head']:<17} {row['batch_size']:>6} "
                f"{row['step_ms_median']:>9.1f} {row['samples_per_second']:>10.1f}")
        print(line + (f" {row['peak_memory_gib']:>9.2f}" if "peak_memory_gib" in row else ""))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
        print(f"Wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
