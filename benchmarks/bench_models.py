#!/usr/bin/env python
"""Query and gallery encoding throughput of full-size CIR models with random weights (no download).

Models (``--models``; each entry builds a pipeline of the package and, where one exists, the baseline the authors'
own benchmark code runs, with the same weights):

- ``BGE-VL-L``: CLIP ViT-L/14 sizes (vision 1024 x 24 layers, patch 14, 224 px; text 768 x 12; projection 768;
  427.6M parameters), ``BGEVLPipeline``. Baseline: stock ``transformers.CLIPModel`` as the authors' evaluation
  scripts load it (``get_image_features`` / ``get_text_features``, summed and normalised by hand).
- ``BGE-VL-B``: CLIP ViT-B/16 sizes (149.6M parameters), same baseline.
- ``MagicLens-L``: the released MagicLens-L architecture (CLIP ViT-L/14 towers, 4 fusion layers, attention pooler;
  465.4M parameters), ``MagicLensPipeline``. The authors' code is JAX (not installable offline here), so the baseline
  is the same model run as the authors' ``inference.py`` drives it: every text, the gallery's empty one included,
  tokenised to the full 77-token context and encoded for every item; the package pads to the longest text of the
  batch and encodes the gallery's empty text once per call.
- ``MagicLens-B``: the released MagicLens-B architecture (CLIP ViT-B/16; 166.4M parameters), same baseline.
- ``tiny`` and ``tiny-magiclens`` (``--tiny``): 2-layer, 32-wide models that run in seconds (smoke test of this
  script).

Measured per batch size, package and baseline interleaved in the same process (round after round, so that a noisy
shared machine slows both alike), median of ``--repeats`` after ``--warmup``:

- ``gallery``: images per second from decoded PIL images (PIL CLIP preprocessing and the vision tower);
- ``query``: composed queries per second from PIL images and prompt strings (tokeniser, both towers, the sum);
- ``query-cached``: composed queries per second from the references' cached gallery embeddings (``image_embeds=``,
  the retrieval path: the text tower only). Not for MagicLens, which fuses the reference's pixels with the text.

Every row also records the largest difference between the package's and the baseline's outputs. Prints a table and
writes JSON (hardware, thread count, versions, every sample)::

    python benchmarks/bench_models.py --models BGE-VL-L --threads 1 --repeats 3 --batch-sizes 1 8
    python benchmarks/bench_models.py --device cuda                          # float16 towers on a GPU
    python benchmarks/bench_models.py --models MagicLens-L --threads 1 --repeats 3 --batch-sizes 1 8 \
        --output benchmarks/results/<label>/bench_models_magiclens_cpu.json
    python benchmarks/bench_models.py --tiny                                 # seconds, smoke test (not kept)

Full-size results go to ``benchmarks/results/<machine label>/`` (committed); ``--tiny`` ones to
``benchmarks/results/tiny/`` (ignored by git).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"

_CLIP_SHAPES = {
    # name: (text config, vision config, projection_dim)
    "BGE-VL-L": (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
                 dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=224, patch_size=14), 768),
    "BGE-VL-B": (dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
                 dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, patch_size=16), 512),
    "tiny": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
             dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8), 24),
}
# MagicLens models: name -> released size in diffusers_cir.conversion.magiclens.MAGICLENS_SIZES, or an architecture.
_MAGICLENS = {
    "MagicLens-L": "large",
    "MagicLens-B": "base",
    "tiny-magiclens": {
        "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       patch_size=8, image_size=32, projection_dim=24),
        "text": dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=77, projection_dim=24),
        "fusion": dict(embed_dim=24, num_layers=2, num_attention_heads=4, ff_dim=96, pooler_num_attention_heads=4,
                       num_query_tokens=1),
    },
}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_EDITS = ["is made of glass", "has two of them on a beach", "is drawn as a pencil sketch", "is blue and smaller",
          "shows the same scene at night with the lights on", "is upside down"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=None, help=f"Subset of {sorted([*_CLIP_SHAPES, *_MAGICLENS])}.")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                        help="Tower dtype (default float16 on CUDA, float32 on CPU).")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default 1 on CPU).")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=None, help="Timed rounds per measurement (median reported).")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--tiny", action="store_true", help="The tiny model only, few rounds (smoke test).")
    parser.add_argument("--machine-label", default=None, help="Results sub-folder (default: from the CPU or GPU name).")
    parser.add_argument("--output", type=Path, default=None, help="JSON file (default: results/<label>/bench_models_<device>.json).")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False.")
    for name in ("threads", "repeats", "warmup"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            parser.error(f"--{name} must be {'>= 0' if name == 'warmup' else 'positive'}, got {value}.")
    if args.batch_sizes is not None and min(args.batch_sizes) < 1:
        parser.error(f"--batch-sizes must be positive, got {args.batch_sizes}.")
    args.models = args.models or (["tiny", "tiny-magiclens"] if args.tiny else ["BGE-VL-L"])
    known = sorted([*_CLIP_SHAPES, *_MAGICLENS])
    unknown = sorted(set(args.models) - set(known))
    if unknown:
        parser.error(f"Unknown --models {unknown}; choose from {known}.")
    args.batch_sizes = args.batch_sizes or ([4] if args.tiny else [1, 8] if args.device == "cpu" else [1, 64, 256])
    args.repeats = args.repeats or (2 if args.tiny else 5)
    args.warmup = 1 if args.warmup is None else args.warmup
    args.dtype = _DTYPES[args.dtype or ("float16" if args.device == "cuda" else "float32")]
    if args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    return args


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        model_names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = model_names[0].strip() if model_names else cpu
    except OSError:
        pass
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        # on a shared machine the other processes' load is what the interleaving cannot remove: record it
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def machine_label(env: dict) -> str:
    name = env["device"] if env["device"] != "cpu" else f"{env['cpu']}-{env['cpu_cores']}core"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ------------------------------------------------------------------------------------------------ models


def build_bgevl(name: str, device: torch.device, dtype: torch.dtype):
    """(pipeline, stock CLIPModel with the same weights) with random weights of the named sizes."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from diffusers_cir import BGEVLPipeline
    from diffusers_cir.conversion.bgevl import split_clip_model
    from diffusers_cir.utils import build_offline_clip_tokenizer

    text, vision, projection_dim = _CLIP_SHAPES[name]
    config = CLIPConfig(
        text_config=dict(text, vocab_size=49408, max_position_embeddings=77, eos_token_id=2, hidden_act="quick_gelu"),
        vision_config=dict(vision, hidden_act="quick_gelu"), projection_dim=projection_dim,
    )
    torch.manual_seed(0)
    clip = CLIPModel(config).eval()
    text_encoder, image_encoder = split_clip_model(clip)
    size = vision["image_size"]
    pipe = BGEVLPipeline(
        text_encoder=text_encoder, tokenizer=build_offline_clip_tokenizer(), image_encoder=image_encoder,
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
    ).to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, clip.to(device=device, dtype=dtype)


def _images(count: int, seed: int = 0):
    """Decoded photos of typical sizes (the gallery and the references): smooth colour fields with edges."""
    import PIL.Image

    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        width, height = (640, 480) if index % 2 == 0 else (500, 375)
        coarse = rng.integers(0, 256, size=(height // 32, width // 32, 3), dtype=np.uint8)
        images.append(PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.BILINEAR))
    return images


def _prompts(count: int) -> list[str]:
    return [f"{_EDITS[i % len(_EDITS)]} and {_EDITS[(i // len(_EDITS)) % len(_EDITS)]}" for i in range(count)]


# ------------------------------------------------------------------------------------------------ timing


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(functions: dict, device: torch.device, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each function, measured round after round (each round calls every function once)."""
    samples = {name: [] for name in functions}
    for round_index in range(warmup + repeats):
        for name, function in functions.items():
            _synchronize(device)
            start = time.perf_counter()
            function()
            _synchronize(device)
            if round_index >= warmup:
                samples[name].append(time.perf_counter() - start)
    return samples


def _features(output):
    return output if torch.is_tensor(output) else output.pooler_output  # transformers 5 may return a model output


def bgevl_measures(pipe, clip, batch_size: int, device: torch.device) -> dict:
    """``{measure: (package call, baseline call)}``; each call returns its embeddings."""
    import torch.nn.functional as F

    images, prompts = _images(batch_size), _prompts(batch_size)
    processor, tokenizer = pipe.image_processor, pipe.tokenizer
    reference_embeds = pipe.encode_image(images)

    def baseline_image():
        pixel_values = processor(images=images, return_tensors="pt").pixel_values.to(device=device, dtype=clip.dtype)
        return _features(clip.get_image_features(pixel_values=pixel_values))

    def baseline_text():
        tokens = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
        return _features(clip.get_text_features(**tokens))

    return {
        "gallery": (lambda: pipe.encode_image(images, batch_size=batch_size), baseline_image),
        "query": (lambda: pipe(image=images, prompt=prompts, batch_size=batch_size).image_embeds,
                  lambda: F.normalize(baseline_text().float() + baseline_image().float(), dim=-1)),
        "query-cached": (lambda: pipe(image_embeds=reference_embeds, prompt=prompts, batch_size=batch_size).image_embeds,
                         lambda: F.normalize(baseline_text().float() + reference_embeds.float(), dim=-1)),
    }


def build_magiclens(name: str, device: torch.device, dtype: torch.dtype):
    """A ``MagicLensPipeline`` with random weights of the named architecture."""
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    from diffusers_cir import MagicLensFusion, MagicLensImageProcessor, MagicLensPipeline
    from diffusers_cir.conversion.magiclens import MAGICLENS_SIZES, magiclens_model_configs
    from diffusers_cir.utils import build_offline_clip_tokenizer

    architecture = _MAGICLENS[name]
    architecture = MAGICLENS_SIZES[architecture] if isinstance(architecture, str) else architecture
    vision, text, fusion = magiclens_model_configs(architecture)
    torch.manual_seed(0)
    pipe = MagicLensPipeline(
        image_encoder=CLIPVisionModelWithProjection(vision).eval(), text_encoder=CLIPTextModelWithProjection(text).eval(),
        tokenizer=build_offline_clip_tokenizer(pad_token="!"), fusion=MagicLensFusion(**fusion).eval(),
        image_processor=MagicLensImageProcessor(image_size=vision.image_size),
    ).to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def magiclens_measures(pipe, batch_size: int) -> dict:
    """``{measure: (package call, baseline call)}``: the pipeline, and the same model fed as the authors'
    ``inference.py`` feeds it (every text at the full context, the empty text encoded for every gallery item)."""
    images, prompts = _images(batch_size), _prompts(batch_size)
    context = pipe.context_length

    def authors(texts):
        image_embeds = pipe.encode_pixels(pipe.image_processor(images).pixel_values)
        return pipe.fuse(image_embeds, pipe.encode_text(pipe.tokenize(texts, pad_to=context)))

    return {
        "gallery": (lambda: pipe.encode_image(images, batch_size=batch_size), lambda: authors([""] * batch_size)),
        "query": (lambda: pipe(image=images, prompt=prompts, batch_size=batch_size).image_embeds,
                  lambda: authors(prompts)),
    }


_BASELINES = {
    "bgevl": "stock transformers CLIPModel, the same weights and preprocessing",
    "magiclens": "the same MagicLens model fed as the authors' inference.py feeds it (77-token texts; the empty text "
    "encoded for every gallery item)",
}


def run_model(name: str, args, device: torch.device) -> list[dict]:
    if name in _MAGICLENS:
        pipe, family = build_magiclens(name, device, args.dtype), "magiclens"
        measures = lambda batch_size: magiclens_measures(pipe, batch_size)  # noqa: E731
    else:
        (pipe, clip), family = build_bgevl(name, device, args.dtype), "bgevl"
        measures = lambda batch_size: bgevl_measures(pipe, clip, batch_size, device)  # noqa: E731
    parameters = sum(p.numel() for module in pipe.components.values() if isinstance(module, torch.nn.Module)
                     for p in module.parameters())
    rows = []
    for batch_size in args.batch_sizes:
        with torch.inference_mode():
            for measure, (package, baseline) in measures(batch_size).items():
                difference = (package().float() - baseline().float()).abs().max().item()
                samples = interleaved({"package": package, "baseline": baseline}, device, args.repeats, args.warmup)
                package_s, baseline_s = (float(np.median(samples[key])) for key in ("package", "baseline"))
                rows.append({
                    "model": name, "parameters": parameters, "measure": measure, "batch_size": batch_size,
                    "package_ms": 1e3 * package_s, "baseline_ms": 1e3 * baseline_s,
                    "package_per_s": batch_size / package_s, "baseline_per_s": batch_size / baseline_s,
                    "ratio_package_to_baseline": package_s / baseline_s, "max_abs_difference": difference,
                    "baseline": _BASELINES[family], "samples_s": samples,
                })
                print(_format_row(rows[-1]), flush=True)
    return rows


_HEADER = f"{'model':<14} {'params':>7} {'measure':<13} {'batch':>5} {'package ms':>11} {'items/s':>8} {'baseline ms':>12} {'ratio':>6} {'max diff':>9}"


def _format_row(row: dict) -> str:
    return (f"{row['model']:<14} {row['parameters'] / 1e6:>6.1f}M {row['measure']:<13} {row['batch_size']:>5} "
            f"{row['package_ms']:>11.1f} {row['package_per_s']:>8.2f} {row['baseline_ms']:>12.1f} "
            f"{row['ratio_package_to_baseline']:>6.2f} {row['max_abs_difference']:>9.1e}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    env = environment(device, args.dtype)
    label = args.machine_label or ("tiny" if args.tiny else machine_label(env))
    output = args.output or RESULTS / label / f"bench_models_{args.device}.json"
    print(f"CIR model encoding throughput on {env['device']} ({env['cpu']}, {env['threads']} threads, {env['dtype']}); "
          f"median of {args.repeats} interleaved rounds after {args.warmup} warm-up")
    print(_HEADER)
    print("-" * len(_HEADER))
    rows = []
    for name in args.models:
        rows += run_model(name, args, device)
    result = {"benchmark": "models", "machine_label": label, "environment": env, "repeats": args.repeats,
              "warmup": args.warmup, "baselines": sorted({row["baseline"] for row in rows}), "rows": rows}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
