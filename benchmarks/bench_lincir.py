#!/usr/bin/env python
"""Throughput of LinCIR: query encoding (phi + CLIP text tower) and language-only training (captions/s).

Configurations are built from configs with random weights (no download):

- ``ViT-L/14``: CLIP-L text tower (768 hidden, 12 layers, 12 heads, projection 768), phi 768 -> 3072 -> 768.
- ``ViT-bigG/14``: OpenCLIP bigG text tower (1280 hidden, 32 layers, 20 heads, projection 1280), phi 1280 -> 5120 -> 1280.
- ``tiny`` (``--tiny``): a 2-layer, 32-wide tower that runs in seconds on a CPU (smoke test of this script).

Measured, per batch size:

- ``query``: ``LinCIRPipeline(image_embeds=..., prompt_input_ids=...)``: phi, pseudo-token substitution, text tower
  and projection on pre-tokenised prompts (queries/s);
- ``query+tok``: the same from prompt strings, tokenisation included (queries/s);
- ``train``: one self-masking-projection step (frozen tower forward on captions, phi, tower forward/backward on
  the masked captions, AdamW) on pre-collated batches (captions/s), padded as the collator does by default (to the
  longest caption of the batch; the token widths are printed and stored as ``input_width`` / ``masked_width``);
- ``collate`` (once, CPU): keyword masking + tokenisation by :class:`~diffusers_cir.text.SelfMaskingCollator`
  with the built-in keyword rule (captions/s per data-loader worker).

On CUDA the towers run in half precision (``--dtype float16`` by default, phi trains in float32 under autocast)
and every timing is bracketed by ``torch.cuda.synchronize()``. Prints a table and writes JSON::

    python benchmarks/bench_lincir.py --device cuda                     # H100: both configurations
    python benchmarks/bench_lincir.py --device cpu --tiny               # seconds, smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

CONFIGS = {
    "ViT-L/14": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu"),
    "ViT-bigG/14": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280, hidden_act="gelu"),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=24, hidden_act="quick_gelu"),
}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

_SUBJECTS = ["dog", "red car", "wooden chair", "woman in a coat", "city street at night", "bowl of fruit", "old clock"]
_EDITS = ["is made of glass", "has two of them on a beach", "is drawn as a pencil sketch", "is blue and smaller", "is upside down"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="Only the tiny configuration, few iterations (CPU smoke test).")
    parser.add_argument("--configs", nargs="+", default=None, help=f"Subset of {sorted(CONFIGS)}.")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="Tower dtype (default float16 on CUDA, float32 on CPU).")
    parser.add_argument("--query_batch_sizes", type=int, nargs="+", default=None)
    parser.add_argument("--train_batch_sizes", type=int, nargs="+", default=None)
    parser.add_argument("--iters", type=int, default=None, help="Timed iterations per measurement.")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False.")
    if args.tiny:
        args.configs = args.configs or ["tiny"]
        args.query_batch_sizes = args.query_batch_sizes or [8]
        args.train_batch_sizes = args.train_batch_sizes or [8]
        args.iters, args.warmup = args.iters or 2, args.warmup if args.warmup is not None else 1
    else:
        args.configs = args.configs or ["ViT-L/14", "ViT-bigG/14"]
        args.query_batch_sizes = args.query_batch_sizes or [1, 64, 512]
        args.train_batch_sizes = args.train_batch_sizes or [256]
        args.iters, args.warmup = args.iters or 10, args.warmup if args.warmup is not None else 3
    unknown = [name for name in args.configs if name not in CONFIGS]
    if unknown:
        parser.error(f"Unknown --configs {unknown}; choose from {sorted(CONFIGS)}.")
    args.dtype = _DTYPES[args.dtype or ("float16" if args.device == "cuda" else "float32")]
    if args.output_json is None:
        suffix = "_tiny" if args.tiny else ""
        args.output_json = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"lincir_{args.device}{suffix}.json")
    return args


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(function, device: torch.device, iters: int, warmup: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        function()
    _synchronize(device)
    durations = []
    for _ in range(iters):
        start = time.perf_counter()
        function()
        _synchronize(device)
        durations.append(time.perf_counter() - start)
    durations.sort()
    return durations[len(durations) // 2]


def _prompts(count: int) -> list[str]:
    return [f"{_EDITS[i % len(_EDITS)]} and {_EDITS[(i // len(_EDITS)) % len(_EDITS)]}" for i in range(count)]


def _captions(count: int) -> list[str]:
    return [f"a photo of a {_SUBJECTS[i % len(_SUBJECTS)]} that {_EDITS[(i // 3) % len(_EDITS)]}" for i in range(count)]


def build_pipeline(name: str, device: torch.device, dtype: torch.dtype):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from diffusers_cir.models.textual_inversion_projection import TextualInversionProjection
    from diffusers_cir.pipelines.pipeline_lincir import LinCIRPipeline
    from diffusers_cir.utils import build_offline_clip_tokenizer

    shape = CONFIGS[name]
    text_config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, **shape)
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(text_config).to(device=device, dtype=dtype).eval().requires_grad_(False)
    projection_dim = shape["projection_dim"]
    phi = TextualInversionProjection(input_dim=projection_dim, hidden_dim=4 * projection_dim, output_dim=shape["hidden_size"])
    phi = phi.to(device) if dtype == torch.float32 else phi.to(device=device, dtype=dtype)
    pipeline = LinCIRPipeline(phi=phi.eval(), text_encoder=text_encoder, tokenizer=build_offline_clip_tokenizer())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def bench_queries(pipeline, batch_size: int, device, iters: int, warmup: int) -> dict:
    prompts = _prompts(batch_size)
    image_embeds = torch.randn(batch_size, pipeline.phi.config.input_dim, device=device)
    input_ids = pipeline._tokenize([pipeline.config.prompt_template.format(text=p) for p in prompts]).to(device)

    def pretokenised():
        pipeline(image_embeds=image_embeds, prompt_input_ids=input_ids, batch_size=batch_size)

    def from_strings():
        pipeline(image_embeds=image_embeds, prompt=prompts, batch_size=batch_size)

    with torch.inference_mode():
        seconds = _time(pretokenised, device, iters, warmup)
        seconds_tokenised = _time(from_strings, device, iters, warmup)
    return {"query_per_s": batch_size / seconds, "query_with_tokenizer_per_s": batch_size / seconds_tokenised}


def bench_training(pipeline, batch_size: int, device, dtype, iters: int, warmup: int) -> dict:
    from diffusers_cir.models.textual_inversion_projection import TextualInversionProjection
    from diffusers_cir.text import SelfMaskingCollator, self_masking_projection_loss

    collator = SelfMaskingCollator(pipeline.tokenizer, seed=0)
    batch = collator(_captions(batch_size))
    input_ids, masked_input_ids = batch["input_ids"].to(device), batch["masked_input_ids"].to(device)
    config = pipeline.phi.config
    phi = TextualInversionProjection(input_dim=config.input_dim, hidden_dim=config.hidden_dim, output_dim=config.output_dim)
    phi = phi.to(device).train()  # trained in float32
    optimizer = torch.optim.AdamW(phi.parameters(), lr=1e-4, weight_decay=0.01)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step():
        with autocast:
            loss = self_masking_projection_loss(phi, pipeline.text_encoder, input_ids, masked_input_ids, collator.placeholder_token_id)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    seconds = _time(step, device, iters, warmup)
    return {"train_captions_per_s": batch_size / seconds, "input_width": input_ids.shape[1], "masked_width": masked_input_ids.shape[1]}


def bench_collate(tokenizer, batch_size: int = 256, iters: int = 3) -> float:
    from diffusers_cir.text import SelfMaskingCollator

    collator = SelfMaskingCollator(tokenizer, seed=0)
    captions = _captions(batch_size)
    seconds = _time(lambda: collator(captions), torch.device("cpu"), iters, 1)
    return batch_size / seconds


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    rows = []
    environment = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dtype": str(args.dtype).replace("torch.", ""),
    }
    for name in args.configs:
        pipeline = build_pipeline(name, device, args.dtype)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for batch_size in args.query_batch_sizes:
            rows.append({"config": name, "measure": "query", "batch_size": batch_size, **bench_queries(pipeline, batch_size, device, args.iters, args.warmup)})
        for batch_size in args.train_batch_sizes:
            rows.append({"config": name, "measure": "train", "batch_size": batch_size, **bench_training(pipeline, batch_size, device, args.dtype, args.iters, args.warmup)})
        if device.type == "cuda":
            rows[-1]["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        del pipeline
        if device.type == "cuda":
            torch.cuda.empty_cache()
    from diffusers_cir.utils import build_offline_clip_tokenizer

    collate_per_s = bench_collate(build_offline_clip_tokenizer(), batch_size=32 if args.tiny else 256)

    print(f"LinCIR throughput on {environment['device']} ({environment['dtype']} towers)")
    header = f"{'config':<12} {'measure':<7} {'batch':>6} {'queries/s':>11} {'q/s +tok':>10} {'captions/s':>11}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['config']:<12} {row['measure']:<7} {row['batch_size']:>6} "
            f"{row.get('query_per_s', float('nan')):>11.1f} {row.get('query_with_tokenizer_per_s', float('nan')):>10.1f} "
            f"{row.get('train_captions_per_s', float('nan')):>11.1f}"
        )
    for row in rows:
        if "input_width" in row:
            print(
                f"{row['config']} train batch {row['batch_size']}: captions padded to {row['input_width']} tokens, "
                f"masked captions to {row['masked_width']} (the batch's longest, not model_max_length)"
            )
    print(f"keyword masking + tokenisation (CPU, one worker): {collate_per_s:.0f} captions/s")

    result = {"benchmark": "lincir", "environment": environment, "iters": args.iters, "warmup": args.warmup, "rows": rows, "collate_captions_per_s": collate_per_s}
    os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
    with open(args.output_json, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    print(f"wrote {args.output_json}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
