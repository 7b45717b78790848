#!/usr/bin/env python
"""Training throughput of the composition-network methods (CLIP4Cir, SCOT, MTST, FashionBLIP-2): samples/s of the
training step of ``examples/train_fusion.py`` itself (``diffusers_cir.training.train_fusion.train_step``: the towers'
features, the head, the method's objective, backward, gradient clipping, AdamW), per method, regime and batch size.

    python benchmarks/bench_fusion.py --device cpu --threads 1      # RN50x4 sizes (CLIP4Cir's backbone) on CPU
    python benchmarks/bench_fusion.py --device cuda --regimes features,text-tower,image-tower
    python benchmarks/bench_fusion.py --tiny                        # the synthetic world's sizes

Regimes: ``features``: reference and target features precomputed, text features cached (the head alone: what a run on
an ``embeddings`` configuration with ``--text-feature-cache-size`` does); ``text-tower``: the frozen text tower encodes
every text of every step (no cache; SCOT encodes three texts per row, MTST two); ``image-tower``: the frozen image tower
also encodes the references and targets from pixels (an ``images`` configuration). Towers are open_clip RN50x4's
architecture (640-wide features, 288 px images) with random weights: the arithmetic of the real model, nothing
downloaded.

FashionBLIP-2 (regime ``pixels``: it always reads the reference and target pixels) runs the trainer's own
``prepare_fashionblip2`` (peft LoRA on the Q-Former's query/value projections, the trainer's defaults: rank 8, a
matching head of 4 x 64) and its loss: the frozen vision tower on both images, the Q-Former on the reference's patches
with the text and on the target's, the head, backward through the Q-Former's adapters. The Q-Former has BLIP-2's real
sizes (12 layers, 768 wide, 32 query tokens, cross-attention every 2nd layer); the vision tower is
``--fashionblip2-vision``: ``vit-b16`` (ViT-B/16 at 224 px: 12 layers, 768 wide, 197 tokens; the default on CPU, where
BLIP-2's ViT-g is out of reach, so the Q-Former's cross-attention reads 768-wide patches instead of 1408) or
``eva-vit-g`` (BLIP-2's EVA ViT-g: 39 layers, 1408 wide, 224 px, patch 14, 257 tokens; the default on CUDA). Random
weights, nothing downloaded; a BERT WordPiece tokenizer over the benchmark's words (the texts' token counts are real,
the vocabulary is not).

Each step is timed alone; the table gives the median over ``--steps`` after ``--warmup``. Prints a table and writes JSON
(default ``benchmarks/results/fusion.json``).
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

METHODS = ("clip4cir", "scot", "mtst", "fashionblip2")
REGIMES = ("features", "text-tower", "image-tower")
# BLIP-2's vision towers (transformers' Blip2VisionConfig fields) the FashionBLIP-2 rows can run over.
FASHIONBLIP2_VISION = {
    "vit-b16": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                "image_size": 224, "patch_size": 16},
    "eva-vit-g": {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39, "num_attention_heads": 16,
                  "image_size": 224, "patch_size": 14},
    "tiny": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4,
             "image_size": 32, "patch_size": 8},
}
TINY_QFORMER = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                "max_position_embeddings": 64}
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
    parser.add_argument("--fashionblip2-batch-sizes", default=None,
                        help="Comma-separated batch sizes of the FashionBLIP-2 rows (default: 4,8 CPU, 32,128 CUDA).")
    parser.add_argument("--fashionblip2-vision", choices=["vit-b16", "eva-vit-g"], default=None,
                        help="FashionBLIP-2's vision tower (default: vit-b16 on CPU, eva-vit-g on CUDA; --tiny: tiny).")
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
    try:
        args.fashionblip2_batch_sizes = [int(b) for b in (args.fashionblip2_batch_sizes or
                                                          ("32,128" if cuda else "4,8")).split(",")]
    except ValueError:
        parser.error("--fashionblip2-batch-sizes must be comma-separated integers")
    if min(args.batch_sizes + args.fashionblip2_batch_sizes) < 2:
        parser.error("--batch-sizes and --fashionblip2-batch-sizes must be at least 2 (the other rows are the "
                     "negatives)")
    args.fashionblip2_vision = "tiny" if args.tiny else args.fashionblip2_vision or ("eva-vit-g" if cuda else "vit-b16")
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


def time_steps(args, run, batch) -> dict:
    """The median and mean of ``--steps`` calls of the trainer's ``train_step`` after ``--warmup`` (and peak memory)."""
    from diffusers_cir.training.train_fusion import train_step

    device = run.accelerator.device

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
        raise RuntimeError(f"Non-finite loss ({run.method.name}, batch {len(batch['ids'])}): the step is broken.")
    size = len(batch["ids"])
    result = {"batch_size": size, "step_ms_median": 1000 * statistics.median(times),
              "step_ms_mean": 1000 * statistics.fmean(times), "samples_per_second": size / statistics.median(times)}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def bench(args, method_name: str, regime: str, batch_size: int, towers) -> dict:
    run = build_run(args, method_name, regime, towers)
    device = run.accelerator.device
    batch = make_batch(batch_size, towers[0].embed_dim, towers[3], regime, device)
    if regime == "features":  # the cache is warm, as after the first pass over the data
        for key in ("texts", "target_texts", "reference_texts", "reverse_texts"):
            run.text_features(batch[key])
    timing = time_steps(args, run, batch)
    head = run.accelerator.unwrap_model(run.head)
    parameters = sum(p.numel() for p in head.parameters())
    result = {"method": method_name, "regime": regime, **timing, "head": type(head).__name__,
              "head_parameters": parameters, "trainable_parameters": parameters}
    run.accelerator.free_memory()
    return result


# --------------------------------------------------------------------------------------------------- FashionBLIP-2
def fashionblip2_config(vision: str):
    """A ``Blip2Config`` with BLIP-2's Q-Former (or the tiny one) over the ``vision`` tower of FASHIONBLIP2_VISION."""
    from transformers import Blip2Config

    vision_config = FASHIONBLIP2_VISION[vision]
    qformer = {**(TINY_QFORMER if vision == "tiny" else {}), "encoder_hidden_size": vision_config["hidden_size"],
               "use_qformer_text_input": True}
    queries = 4 if vision == "tiny" else 32  # BLIP-2's 32 query tokens
    return Blip2Config(vision_config=vision_config, qformer_config=qformer, num_query_tokens=queries)


def bert_tokenizer(folder: str):
    """A BERT WordPiece tokenizer whose vocabulary holds every word and number the benchmark's texts use."""
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *(str(i) for i in range(1024))]
    path = os.path.join(folder, "vocab.txt")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(words) + "\n")
    return BertTokenizer(vocab=path, model_max_length=512)


def build_fashionblip2_run(args, config, tokenizer):
    """The run ``setup_run`` builds for ``--method fashionblip2`` (the trainer's defaults), on an in-memory BLIP-2:
    the trainer's ``prepare_fashionblip2`` adds the adapters and prepares the trainee, optimizer and scheduler."""
    import logging

    from accelerate import Accelerator
    from transformers import Blip2ForImageTextRetrieval

    from diffusers_cir.training.components import weight_dtype
    from diffusers_cir.training.fashionblip2 import prepare_fashionblip2
    from diffusers_cir.training.fusion_arguments import build_argument_parser
    from diffusers_cir.training.fusion_components import Encoders
    from diffusers_cir.training.fusion_methods import FUSION_METHODS, build_head
    from diffusers_cir.training.train_fusion import FusionRun

    run_args = build_argument_parser("fashionblip2").parse_args(
        ["--method", "fashionblip2", "--pretrained-model-name-or-path", "random", "--train-data-dir", "unused",
         "--output-dir", "unused"])
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=not args.device.startswith("cuda"))
    torch.manual_seed(0)
    model = Blip2ForImageTextRetrieval(config).eval()
    width = int(config.qformer_config.hidden_size)
    head = build_head(run_args.head, width, run_args)
    run = FusionRun(args=run_args, accelerator=accelerator, log=logging.getLogger("bench_fusion"),
                    method=FUSION_METHODS["fashionblip2"], head=head,
                    parts=Encoders(None, tokenizer, model=model, source="random weights"),
                    kind=type(model).__name__, dtype=weight_dtype(accelerator),
                    dropout_generator=torch.Generator().manual_seed(0))
    prepare_fashionblip2(run)
    return run


def bench_fashionblip2(args, batch_size: int, config, tokenizer) -> dict:
    run = build_fashionblip2_run(args, config, tokenizer)
    device, size = run.accelerator.device, int(config.vision_config.image_size)
    generator = torch.Generator().manual_seed(batch_size)
    batch = {"ids": [str(i) for i in range(batch_size)], "texts": texts(batch_size, 1),
             "reference_pixel_values": torch.randn(batch_size, 3, size, size, generator=generator).to(device),
             "target_pixel_values": torch.randn(batch_size, 3, size, size, generator=generator).to(device)}
    timing = time_steps(args, run, batch)
    trainee = run.accelerator.unwrap_model(run.head)
    result = {"method": "fashionblip2", "regime": "pixels", **timing, "head": type(trainee.head).__name__,
              "head_parameters": sum(p.numel() for p in trainee.head.parameters()),
              "trainable_parameters": sum(p.numel() for p in trainee.parameters() if p.requires_grad),
              "model_parameters": sum(p.numel() for p in trainee.parameters())}
    run.accelerator.free_memory()
    return result


def fashionblip2_description(vision: str, config) -> dict:
    qformer = config.qformer_config
    return {"vision": {"tiny": "tiny", "vit-b16": "ViT-B/16 sizes, 224 px (random weights; BLIP-2's is EVA ViT-g)",
                       "eva-vit-g": "BLIP-2's EVA ViT-g sizes (random weights)"}[vision],
            "vision_config": FASHIONBLIP2_VISION[vision],
            "qformer": {"num_hidden_layers": qformer.num_hidden_layers, "hidden_size": qformer.hidden_size,
                        "cross_attention_frequency": qformer.cross_attention_frequency,
                        "encoder_hidden_size": qformer.encoder_hidden_size,
                        "num_query_tokens": config.num_query_tokens},
            "lora": "the trainer's defaults: rank 8 on the Q-Former's query/value projections; matching head 4 x 64"}


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
    import tempfile

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_average = [round(value, 2) for value in os.getloadavg()] if hasattr(os, "getloadavg") else None
    clip_methods = [method for method in args.methods if method != "fashionblip2"]
    towers = build_towers(args.tiny) if clip_methods else None
    rows = []
    for method in clip_methods:
        for regime in args.regimes:
            sizes = {"features": args.batch_sizes, "text-tower": [args.text_batch_size],
                     "image-tower": [args.image_batch_size]}[regime]
            for size in sizes:
                rows.append(bench(args, method, regime, size, towers))
                print(f"  {method} {regime} batch {size}: {rows[-1]['samples_per_second']:.1f} samples/s", flush=True)
    fashionblip2 = None
    if "fashionblip2" in args.methods:
        config = fashionblip2_config(args.fashionblip2_vision)
        fashionblip2 = fashionblip2_description(args.fashionblip2_vision, config)
        with tempfile.TemporaryDirectory() as folder:
            tokenizer = bert_tokenizer(folder)
        for size in args.fashionblip2_batch_sizes:
            rows.append(bench_fashionblip2(args, size, config, tokenizer))
            print(f"  fashionblip2 pixels batch {size}: {rows[-1]['samples_per_second']:.1f} samples/s", flush=True)
    report = {
        "benchmark": "fusion_training_step",
        "towers": None if towers is None else "tiny" if args.tiny else "open_clip RN50x4 (random weights)",
        "feature_dim": None if towers is None else towers[0].embed_dim,
        "image_size": None if towers is None else towers[3], "fashionblip2": fashionblip2, "device": args.device,
        "device_name": device_name(args.device), "cpu_threads": torch.get_num_threads(),
        "load_average_at_start": load_average, "mixed_precision": args.mixed_precision, "steps": args.steps,
        "warmup": args.warmup, "torch": torch.__version__, "results": rows,
    }
    print_table(args, report)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
        print(f"Wrote {args.output}")
    return report


def print_table(args, report: dict) -> None:
    towers = f"{report['towers']} towers (features {report['feature_dim']})" if report["towers"] else ""
    if report["fashionblip2"]:
        towers += ("; " if towers else "") + f"FashionBLIP-2: BLIP-2 Q-Former over {report['fashionblip2']['vision']}"
    print(f"Composition-network training step, {towers}, {report['device_name']}, mixed precision "
          f"{args.mixed_precision}, {report['cpu_threads']} CPU threads, median of {args.steps} steps")
    header = f"{'method':<12} {'regime':<12} {'head':<21} {'batch':>6} {'step ms':>9} {'samples/s':>10}"
    print(header + (f" {'peak GiB':>9}" if args.device.startswith("cuda") else ""))
    for row in report["results"]:
        line = (f"{row['method']:<12} {row['regime']:<12} {row['head']:<21} {row['batch_size']:>6} "
                f"{row['step_ms_median']:>9.1f} {row['samples_per_second']:>10.2f}")
        print(line + (f" {row['peak_memory_gib']:>9.2f}" if "peak_memory_gib" in row else ""))


if __name__ == "__main__":
    main()
