#!/usr/bin/env python
"""Throughput of the MLLM embedder (E5-V / BGE-VL-MLLM) and the training-free caption -> LLM -> CLIP pipeline.

Models are built from configs with random weights (no download):

- ``full`` (GPU): the published shapes. MLLM: LLaVA-NeXT-8B as E5-V (Llama-3-8B language model, 128,256-token
  vocabulary, CLIP ViT-L/14-336 tower, anyres tiles up to 672 x 672). Caption pipeline: BLIP-2 FlanT5-XXL (EVA
  ViT-g/14, Q-Former, T5-XXL), a Llama-3-8B-shaped chat LLM and OpenCLIP ViT-bigG/14 towers.
- ``reduced`` (CPU): the same token counts (336-pixel tiles, 14-pixel patches, 576 image tokens per tile for the MLLM;
  32 Q-Former queries for BLIP-2; the recipes' generation lengths) with narrow, shallow towers (256-wide vision,
  512-wide language models, 4 layers each), so a 2-core CPU runs it in minutes.

Random weights never emit an end-of-sequence token, so every caption and rewrite runs to the recipe's maximum length
(CIReVL: 30-token captions with 5 beams, 80-token greedy rewrites; LDRE: 15 sampled 30-token captions and 15 sampled
60-token rewrites per query): the caption pipeline's figures are its worst case.

Measured (median of ``--repeats`` timed runs after ``--warmup`` runs), per batch size:

- ``mllm gallery``: ``MLLMEmbeddingPipeline.encode_image`` (images/s) on 640 x 480 pictures;
- ``mllm query``: ``MLLMEmbeddingPipeline(image=..., prompt=...)`` (queries/s);
- ``<recipe> cold``: ``CaptionRewritePipeline`` with no caption cache (captioning, rewriting and CLIP; queries/s);
- ``<recipe> warm``: the same with every caption already cached (rewriting and CLIP only; queries/s);
- ``clip gallery``: the CLIP vision tower on the gallery (images/s).

On CUDA every timing is bracketed by ``torch.cuda.synchronize()`` and the rate is per GPU (one device). Prints a table
and writes JSON under ``benchmarks/results/<machine label>/`` (``--smoke``: ``benchmarks/results/tiny/``)::

    python benchmarks/bench_mllm.py --device cuda                  # full size, bf16, one GPU
    python benchmarks/bench_mllm.py --device cpu                   # reduced size, float32
    python benchmarks/bench_mllm.py --device cpu --smoke           # seconds: checks the script runs
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_EDITS = ["is red and has two of them", "is drawn as a pencil sketch", "shows it on a beach at night", "is upside down"]

# Model shapes. "vision" is a CLIP vision config, "text" a Llama config.
LLAVA = {
    "full": dict(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14),
        text=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128320),
    ),
    "reduced": dict(
        vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, image_size=336, patch_size=14),
        text=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, vocab_size=32064),
    ),
    "smoke": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=56, patch_size=14),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=512),
    ),
}
PINPOINTS = {"full": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]], "reduced": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]], "smoke": [[56, 112], [112, 56], [112, 112]]}
CAPTION = {
    "full": dict(
        vision=dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16, image_size=224, patch_size=14),
        qformer=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, encoder_hidden_size=1408),
        t5=dict(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64, vocab_size=32128, feed_forward_proj="gated-gelu"),
        llm=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128320),
        clip_text=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280),
        clip_vision=dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48, num_attention_heads=16, image_size=224, patch_size=14, projection_dim=1280),
    ),
    "reduced": dict(
        vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, image_size=224, patch_size=14),
        qformer=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4, encoder_hidden_size=256),
        t5=dict(d_model=512, d_ff=1024, d_kv=64, num_layers=4, num_heads=8, vocab_size=32128, feed_forward_proj="gated-gelu"),
        llm=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, vocab_size=32064),
        clip_text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, projection_dim=256),
        clip_vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, image_size=224, patch_size=14, projection_dim=256),
    ),
    "smoke": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=56, patch_size=14),
        qformer=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, encoder_hidden_size=32),
        t5=dict(d_model=32, d_ff=64, d_kv=16, num_layers=1, num_heads=2, vocab_size=512, feed_forward_proj="gated-gelu"),
        llm=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=512),
        clip_text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, projection_dim=32),
        clip_vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=56, patch_size=14, projection_dim=32),
    ),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=["full", "reduced"], default=None, help="Model shapes (default: full on CUDA, reduced on CPU).")
    parser.add_argument("--smoke", action="store_true", help="Minute shapes, one repeat: checks that the script runs.")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="Default bfloat16 on CUDA, float32 on CPU.")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="Queries (or images) per call.")
    parser.add_argument("--recipes", nargs="+", default=["cirevl-circo", "ldre"])
    parser.add_argument("--parts", nargs="+", choices=["mllm", "caption"], default=["mllm", "caption"])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--label", default=None, help="Machine label: the results folder (default from the hardware).")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/<label>/mllm_<device>_<size>.json).")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False.")
    args.size = "smoke" if args.smoke else args.size or ("full" if args.device == "cuda" else "reduced")
    args.dtype = _DTYPES[args.dtype or ("bfloat16" if args.device == "cuda" else "float32")]
    args.batch_sizes = args.batch_sizes or {"full": [1, 8, 32], "reduced": [1, 4], "smoke": [2]}[args.size]
    args.repeats = args.repeats or (1 if args.smoke else 3)
    args.label = args.label or machine_label(args.device)
    if args.output is None:
        here = os.path.dirname(os.path.abspath(__file__))
        folder = "tiny" if args.smoke else args.label  # smoke runs stay local (benchmarks/results/tiny is ignored)
        args.output = os.path.join(here, "results", folder, f"mllm_{args.device}_{args.size}.json")
    return args


def machine_label(device: str) -> str:
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        name = f"{_cpu_model()}-{os.cpu_count()}core"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------------------------ building


def _tokenizer(specials: list[str], chat: bool = False):
    """A byte-level BPE trained here on a few sentences (any text tokenises); token ids beyond it decode to nothing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [f"a photo of a dog that {edit}" for edit in _EDITS] + ["Image Content: Instruction: Edited Description:"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus * 3, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat:
        wrapped.chat_template = (
            "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
            "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
        )
    return wrapped


_SPECIALS = ["<pad>", "<s>", "</s>", "<image>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def _build(cls, config, device, dtype):
    with torch.device(device):
        return cls._from_config(config, dtype=dtype).eval().requires_grad_(False)


def build_mllm(size: str, device, dtype):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    from diffusers_cir import MLLMEmbeddingPipeline

    shapes = LLAVA[size]
    tokenizer = _tokenizer(_SPECIALS)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**shapes["vision"]),
        text_config=LlamaConfig(**shapes["text"], max_position_embeddings=8192, pad_token_id=0),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_grid_pinpoints=PINPOINTS[size],
        vision_feature_layer=-2,
    )
    side = shapes["vision"]["image_size"]
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}, image_grid_pinpoints=PINPOINTS[size]),
        tokenizer=tokenizer, patch_size=shapes["vision"]["patch_size"], vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    pipe = MLLMEmbeddingPipeline(model=_build(LlavaNextForConditionalGeneration, config, device, dtype), processor=processor, prompts="e5-v")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_caption_pipeline(size: str, device, dtype):
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
    )

    from diffusers_cir import CaptionRewritePipeline
    from diffusers_cir.utils import build_offline_clip_tokenizer

    shapes = CAPTION[size]
    blip_tokenizer = _tokenizer(_SPECIALS)
    t5 = T5Config(**shapes["t5"], pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
    blip = Blip2Config(
        vision_config=shapes["vision"], qformer_config={**shapes["qformer"], "vocab_size": 30522}, text_config=t5.to_dict(),
        num_query_tokens=32, image_token_index=blip_tokenizer.convert_tokens_to_ids("<image>"),
    )
    side = shapes["vision"]["image_size"]
    llm_tokenizer = _tokenizer(_SPECIALS, chat=True)
    llm_config = LlamaConfig(**shapes["llm"], max_position_embeddings=8192, pad_token_id=0, eos_token_id=2)
    clip_side = shapes["clip_vision"]["image_size"]
    text_config = CLIPTextConfig(**shapes["clip_text"], vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    pipe = CaptionRewritePipeline(
        captioner=_build(Blip2ForConditionalGeneration, blip, device, dtype),
        caption_processor=Blip2Processor(image_processor=BlipImageProcessor(size={"height": side, "width": side}), tokenizer=blip_tokenizer, num_query_tokens=32),
        llm=_build(LlamaForCausalLM, llm_config, device, dtype), llm_tokenizer=llm_tokenizer,
        text_encoder=_build(CLIPTextModelWithProjection, text_config, device, dtype), tokenizer=build_offline_clip_tokenizer(),
        image_encoder=_build(CLIPVisionModelWithProjection, CLIPVisionConfig(**shapes["clip_vision"]), device, dtype),
        image_processor=CLIPImageProcessor(size={"shortest_edge": clip_side}, crop_size={"height": clip_side, "width": clip_side}),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------------------ timing


def pictures(count: int, seed: int = 0, size=(640, 480)) -> list:
    import PIL.Image

    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 256, size=(size[1] // 16, size[0] // 16, 3), dtype=np.uint8)).resize(size) for _ in range(count)]


def _synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(function, device, repeats: int, warmup: int, before=None) -> dict:
    """Wall-clock seconds of each timed call (``samples_s``), their median, and the median CPU seconds of this process
    per call (on a shared CPU the second is what the work costs; the first also holds the time other processes took
    the cores). ``before`` runs ahead of every call, untimed."""
    for _ in range(warmup):
        if before:
            before()
        function()
    durations, cpu = [], []
    for _ in range(repeats):
        if before:
            before()
        _synchronize(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        function()
        _synchronize(device)
        durations.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"seconds": statistics.median(durations), "cpu_seconds": statistics.median(cpu), "samples_s": durations}


def _row(part: str, batch: int, package: dict, baseline: dict, baseline_name: str, **extra) -> dict:
    """One measurement against its baseline; `*_per_cpu_s` count this process's CPU time instead of the wall clock
    (what the work costs when other processes share the cores)."""
    row = {
        "part": part, "batch_size": batch, "per_s": batch / package["seconds"], "seconds": package["seconds"],
        "per_cpu_s": batch / package["cpu_seconds"], "cpu_seconds": package["cpu_seconds"], "baseline": baseline_name,
        "baseline_per_s": batch / baseline["seconds"], "baseline_seconds": baseline["seconds"],
        "baseline_per_cpu_s": batch / baseline["cpu_seconds"], "baseline_cpu_seconds": baseline["cpu_seconds"],
        "ratio_package_to_baseline": baseline["seconds"] / package["seconds"],
        "ratio_package_to_baseline_cpu": baseline["cpu_seconds"] / package["cpu_seconds"],
        "samples_s": {"package": package["samples_s"], "baseline": baseline["samples_s"]}, **extra,
    }
    print(f"  measured {part} (batch {batch}): {row['per_s']:.3f}/s wall, {row['per_cpu_s']:.3f}/s CPU", flush=True)
    return row


def _authors_embedding(pipe, prompts: list[str], images: list, device):
    """E5-V's and BGE-VL-MLLM's own formula on plain transformers: the full model with every hidden state and every
    position's logits, then ``hidden_states[-1][:, -1]``."""
    inputs = pipe.processor(text=prompts, images=images, return_tensors="pt", padding=True, padding_side="left").to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(pipe.model.dtype)
    return pipe.model(**inputs, output_hidden_states=True).hidden_states[-1][:, -1]


def bench_mllm(args, device) -> list[dict]:
    pipe = build_mllm(args.size, device, args.dtype)
    baseline = "plain transformers, the authors' formula: model(..., output_hidden_states=True).hidden_states[-1][:, -1]"
    rows = []
    for batch in args.batch_sizes:
        images = pictures(batch, seed=batch)
        texts = [_EDITS[i % len(_EDITS)] for i in range(batch)]
        composed = [pipe.prompts.composed_prompt.replace("{text}", text) for text in texts]
        with torch.inference_mode():
            gallery = measure(lambda: pipe.encode_image(images, batch_size=batch), device, args.repeats, args.warmup)
            gallery_base = measure(lambda: _authors_embedding(pipe, [pipe.prompts.image_prompt] * batch, images, device), device, args.repeats, args.warmup)
            query = measure(lambda: pipe(image=images, prompt=texts, batch_size=batch), device, args.repeats, args.warmup)
            query_base = measure(lambda: _authors_embedding(pipe, composed, images, device), device, args.repeats, args.warmup)
            difference = (pipe(image=images, prompt=texts).image_embeds.float() - _authors_embedding(pipe, composed, images, device).float()).abs().max().item()
        tokens = pipe.processor(text=[pipe.prompts.image_prompt], images=images[:1], return_tensors="pt").input_ids.shape[1]
        rows.append(_row("mllm gallery", batch, gallery, gallery_base, baseline, prompt_tokens=tokens))
        rows.append(_row("mllm query", batch, query, query_base, baseline, max_abs_difference=difference))
    return rows


def bench_caption(args, device) -> list[dict]:
    from diffusers_cir import CaptionRewritePipeline
    from diffusers_cir.pipelines.caption_rewrite_recipes import REWRITE_RECIPES

    base = build_caption_pipeline(args.size, device, args.dtype)
    rows = []
    for recipe in args.recipes:
        settings = REWRITE_RECIPES[recipe]
        if args.smoke:  # minute shapes, few tokens
            settings = dataclasses.replace(settings, num_captions=min(settings.num_captions, 2), caption_max_new_tokens=4, rewrite_max_new_tokens=4)
        pipe = CaptionRewritePipeline(**base.components, recipe=settings)
        pipe.set_progress_bar_config(disable=True)
        for batch in args.batch_sizes:
            images = pictures(batch, seed=100 + batch)
            texts = [_EDITS[i % len(_EDITS)] for i in range(batch)]
            with torch.inference_mode(), tempfile.TemporaryDirectory() as cache:

                def no_cache():
                    pipe.caption_cache_dir = None

                def cached():
                    pipe.caption_cache_dir = cache

                batched = lambda: pipe(image=images, prompt=texts, caption_batch_size=batch, rewrite_batch_size=batch * settings.num_captions)  # noqa: E731
                # The authors' scripts loop: one generate() per image and per (caption, instruction).
                one_by_one = lambda: pipe(image=images, prompt=texts, caption_batch_size=1, rewrite_batch_size=1)  # noqa: E731
                cold = measure(batched, device, args.repeats, args.warmup, before=no_cache)
                cold_base = measure(one_by_one, device, args.repeats, 0, before=no_cache)
                cached()
                batched()  # fills the cache
                warm = measure(batched, device, args.repeats, 0, before=cached)
            rows.append(_row(f"{recipe} cold", batch, cold, cold_base, "the same models, one generate() per image and per caption"))
            rows.append(_row(f"{recipe} warm", batch, warm, cold, "the same call with no caption cache (cold)"))
    for batch in args.batch_sizes:
        images = pictures(batch, seed=200 + batch)
        with torch.inference_mode():
            package = measure(lambda: base.encode_image(images, batch_size=batch), device, args.repeats, args.warmup)
            plain = measure(
                lambda: base.image_encoder(pixel_values=base.image_processor(images=images, return_tensors="pt").pixel_values.to(device, base.image_encoder.dtype)).image_embeds,
                device, args.repeats, args.warmup,
            )
        rows.append(_row("clip gallery", batch, package, plain, "plain transformers CLIP vision tower and image processor"))
    return rows


def _load_average():
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    import transformers

    environment = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpus_used": 1 if device.type == "cuda" else 0,
        "dtype": str(args.dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "load_average_before": _load_average(),
    }
    rows = []
    if "mllm" in args.parts:
        rows += bench_mllm(args, device)
    if "caption" in args.parts:
        rows += bench_caption(args, device)
    environment["load_average_after"] = _load_average()
    result = {
        "benchmark": "mllm",
        "machine_label": args.label,
        "environment": environment,
        "size": args.size,
        "shapes": {"mllm": LLAVA[args.size], "caption": CAPTION[args.size]},
        "repeats": args.repeats,
        "warmup": args.warmup,
        "statistic": "median over repeats: wall seconds per call (seconds, per_s) and process CPU seconds (cpu_seconds)",
        "rows": rows,
    }
    print(f"device: {environment['device']} ({environment['cpu']}, {environment['cpu_cores']} cores), threads: "
          f"{environment['threads']}, dtype: {environment['dtype']}, size: {args.size}, median of {args.repeats}")
    print("per second: wall clock | per CPU second: this process's CPU time (1 thread); ratio = package / baseline")
    print(f"{'part':<20} {'batch':>5} {'per s':>8} {'base/s':>8} {'ratio':>6} {'per cpu s':>10} {'base/cpu s':>10} {'ratio':>6}")
    for row in rows:
        print(f"{row['part']:<20} {row['batch_size']:>5} {row['per_s']:>8.3f} {row['baseline_per_s']:>8.3f} "
              f"{row['ratio_package_to_baseline']:>6.2f} {row['per_cpu_s']:>10.3f} {row['baseline_per_cpu_s']:>10.3f} "
              f"{row['ratio_package_to_baseline_cpu']:>6.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
