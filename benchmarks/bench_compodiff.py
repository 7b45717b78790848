#!/usr/bin/env python
"""CompoDiff inference speed: denoiser (embeddings given), CLIP encoders, and the whole pipeline.

Prints a table (median of repeats) and writes JSON. Full size = the released denoiser (12 layers, width 768, 16 heads
of 64, text width 1280, 140M parameters) with random weights; three-way guidance, 1 sample per query.

    python benchmarks/bench_compodiff.py --device cuda                       # the full study on a GPU
    python benchmarks/bench_compodiff.py --device cpu --batch_sizes 1 --steps 10 --dtypes float32 --skip_encoders
    python benchmarks/bench_compodiff.py --tiny                              # seconds on CPU (run by the tests)

Modes: `reference` recomputes the conditions' projections at every step in float32, as the authors' code does;
`fast` is the pipeline's path (step-independent work once per query, branches batched, the time tokens of all
steps in one call); `graph` is `fast` captured as one CUDA graph (`pipe.enable_cuda_graphs()`);
`compiled-graph` also compiles the transformer blocks first (`enable_cuda_graphs(compile_blocks=True)`);
`compiled` is `fast` with the blocks compiled (`transformer.compile_repeated_blocks(dynamic=False)`, no graph; the CPU
low-latency mode). The `-unfused` modes leave out the device's fast kernels: the fused Triton attention on CUDA, the
weight-major small projections (`compodiff_transformer.project`) on CPU.

The FLOP floor counts, per query, the cross-attention keys/values of the distinct context tokens once and, per network
call, the query tokens of the three branches through every layer; floor time = FLOPs / `--peak_tflops`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch

from diffusers_cir import CompoDiffPipeline, CompoDiffScheduler, CompoDiffTransformer
from diffusers_cir.models import compodiff_transformer

SMALL_ROWS = compodiff_transformer.SMALL_ROW_LINEAR_MAX_ROWS

FULL = dict(embedding_dim=768, text_embedding_dim=1280, num_layers=12, num_attention_heads=16, attention_head_dim=64)
TINY = dict(embedding_dim=32, text_embedding_dim=48, num_layers=2, num_attention_heads=2, attention_head_dim=16)
PEAK_TFLOPS = {("cuda", "bfloat16"): 800.0, ("cuda", "float16"): 800.0, ("cuda", "float32"): 60.0}


def flops_per_query(config: dict, steps: int, text_length: int = 77) -> dict:
    """Matmul FLOPs (2 per multiply-add) of one query with three-way guidance and the reference grid."""
    d, h, dh = config["embedding_dim"], config["num_attention_heads"], config["attention_head_dim"]
    cross_heads, layers = config.get("num_cross_attention_heads", 8), config["num_layers"]
    calls = steps - 1  # the reference grid runs the network steps - 1 times
    # distinct context tokens: the text and the negative text (77 each), the image and the mask token
    context_tokens = 2 * text_length + 2
    context = 2 * context_tokens * d * (2 * cross_heads * dh) * layers + 2 * 2 * text_length * config["text_embedding_dim"] * d
    per_token_layer = 2 * d * (h * dh + 2 * dh + h * dh + cross_heads * dh * 2 + 2 * 4 * d + 4 * d)
    attention = 2 * 2 * (h * 3 * dh + cross_heads * (context_tokens // 2 + 2) * dh)
    step = 3 * 2 * (per_token_layer + attention) * layers + 3 * 2 * d * d  # + final projection
    return {"context": context, "steps": calls * step, "total": context + calls * step}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return times


def make_inputs(batch, config, device, dtype, generator):
    return dict(
        image_embeds=torch.randn(batch, config["embedding_dim"], generator=generator).to(device, dtype),
        prompt_embeds=torch.randn(batch, 77, config["text_embedding_dim"], generator=generator).to(device, dtype),
        negative_prompt_embeds=torch.randn(1, 77, config["text_embedding_dim"], generator=generator).to(device, dtype),
    )


@torch.no_grad()
def reference_style(pipe, inputs, steps, generator_seed):
    """The authors' loop shape: conditions re-projected at every network call, branches concatenated, float32."""
    transformer, scheduler = pipe.transformer, CompoDiffScheduler()
    image, text = inputs["image_embeds"], inputs["prompt_embeds"]
    negative = inputs["negative_prompt_embeds"].expand_as(text)
    batch, device = image.shape[0], image.device
    mask = torch.zeros(batch, 64, 64, device=device, dtype=image.dtype)
    generator = torch.Generator(device).manual_seed(generator_seed)
    x = torch.randn(image.shape, generator=generator, device=device, dtype=image.dtype)
    scheduler.set_timesteps(steps)
    images3, texts3 = torch.cat([image, image, torch.zeros_like(image)]), torch.cat([text, negative, negative])
    masks3 = torch.cat([mask] * 3)
    for t in scheduler.timesteps.tolist():
        timestep = torch.full((3 * batch,), t, device=device)
        out = transformer(torch.cat([x] * 3), timestep, images3, texts3, masks3).predicted_image_embedding
        c, n, u = out.chunk(3)
        x0 = u + (c - n) * 7.5 + (n - u) * 1.5
        x = scheduler.step(x0, t, x, generator=generator).prev_sample
    return x


def bench_denoiser(args, config, device, results):
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        torch.manual_seed(0)
        transformer = CompoDiffTransformer(**config).to(device, dtype).eval()
        pipe = CompoDiffPipeline(transformer=transformer, scheduler=CompoDiffScheduler())
        pipe.set_progress_bar_config(disable=True)
        compiled_pipes = {}
        peak = args.peak_tflops or PEAK_TFLOPS.get((device.type, dtype_name))
        modes = list(args.modes)
        if device.type != "cuda":
            modes = [mode for mode in modes if "graph" not in mode]
        if dtype != torch.float32:
            modes = [mode for mode in modes if mode != "reference"]  # the reference runs in float32
        for steps in args.steps:
            for batch in args.batch_sizes:
                generator = torch.Generator().manual_seed(batch)
                inputs = make_inputs(batch, config, device, dtype, generator)
                for mode in modes:
                    runner = pipe
                    # "-unfused": the PyTorch attention instead of the fused Triton kernels (CUDA), the plain
                    # `x @ W.T` order of the small projections (CPU)
                    unfused = mode.endswith("-unfused") or mode == "reference"
                    transformer.set_fused_attention(not unfused)
                    compodiff_transformer.SMALL_ROW_LINEAR_MAX_ROWS = 0 if unfused else SMALL_ROWS
                    if mode.startswith("graph"):
                        pipe.enable_cuda_graphs()
                    elif mode.startswith("compiled"):
                        if mode not in compiled_pipes:  # a separate copy: compiling is in place
                            compiled = CompoDiffPipeline(transformer=copy.deepcopy(transformer), scheduler=CompoDiffScheduler())
                            compiled.set_progress_bar_config(disable=True)
                            if mode == "compiled-graph":
                                compiled.enable_cuda_graphs(compile_blocks=True)
                            else:
                                compiled.transformer.compile_repeated_blocks(dynamic=False)
                            compiled_pipes[mode] = compiled
                        runner = compiled_pipes[mode]
                    else:
                        pipe.disable_cuda_graphs()
                    if mode == "reference":
                        transformer.set_fused_attention(False)
                        fn = lambda: reference_style(pipe, inputs, steps, 0)  # noqa: E731
                    else:
                        gen = torch.Generator(device).manual_seed(0)
                        fn = lambda: runner(**inputs, num_inference_steps=steps, generator=gen)  # noqa: E731
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    try:
                        times = time_call(fn, device, args.repeats)
                    except torch.OutOfMemoryError:
                        print(f"  out of memory: {mode} {dtype_name} batch {batch}", file=sys.stderr)
                        continue
                    median = statistics.median(times)
                    flops = flops_per_query(config, steps)["total"] * batch
                    row = {
                        "part": "denoiser", "mode": mode, "dtype": dtype_name, "steps": steps, "batch": batch,
                        "ms_median": round(median, 3), "ms_min": round(min(times), 3),
                        "queries_per_s": round(batch / median * 1000, 1),
                        "peak_mem_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
                        "gflop_per_query": round(flops / batch / 1e9, 2),
                    }
                    if peak:
                        floor_ms = flops / (peak * 1e12) * 1000
                        row.update(floor_ms=round(floor_ms, 3), fraction_of_floor=round(floor_ms / median, 3))
                    results.append(row)
                    print_row(row)
        pipe.disable_cuda_graphs()
        del pipe, transformer
        if device.type == "cuda":
            torch.cuda.empty_cache()


@torch.no_grad()
def accuracy_check(config, device, batch=256, steps=10, half_precision_norm_eps=1e-3, same_eps_reference=False):
    """bf16 fast path vs float32 on the same weights and noise: per-query cosine similarity.

    `half_precision_norm_eps=1e-3` is the reference's LayerNorm epsilon in half precision; 1e-5 (the float32 one)
    makes bf16 track float32 where a norm's input variance is small. `same_eps_reference=True` gives the float32
    run that epsilon too, which isolates the rounding of bf16 arithmetic from the change of epsilon.
    """
    torch.manual_seed(0)
    norm_eps = half_precision_norm_eps if same_eps_reference else 1e-5
    transformer = CompoDiffTransformer(**config, norm_eps=norm_eps, half_precision_norm_eps=half_precision_norm_eps)
    transformer = transformer.to(device).eval()
    pipe = CompoDiffPipeline(transformer=transformer, scheduler=CompoDiffScheduler())
    pipe.set_progress_bar_config(disable=True)
    inputs = make_inputs(batch, config, device, torch.float32, torch.Generator().manual_seed(1))
    latents = torch.randn(batch, config["embedding_dim"], generator=torch.Generator().manual_seed(2)).to(device)
    reference = pipe(**inputs, latents=latents, num_inference_steps=steps, generator=torch.Generator(device).manual_seed(3)).image_embeds
    pipe.to(dtype=torch.bfloat16)
    low = pipe(**{k: v.bfloat16() for k, v in inputs.items()}, latents=latents.bfloat16(), num_inference_steps=steps,
               generator=torch.Generator(device).manual_seed(3)).image_embeds
    cosine = torch.nn.functional.cosine_similarity(low.float(), reference.float(), dim=-1)
    return {"part": "accuracy", "half_precision_norm_eps": half_precision_norm_eps, "float32_norm_eps": norm_eps,
            "batch": batch, "steps": steps,
            "min_cosine_bf16_vs_fp32": round(cosine.min().item(), 6),
            "mean_cosine_bf16_vs_fp32": round(cosine.mean().item(), 6)}


def clip_configs(tiny: bool):
    from transformers import CLIPTextConfig, CLIPVisionConfig

    if tiny:
        text = CLIPTextConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=32, patch_size=8, projection_dim=32)
    else:  # CLIP ViT-bigG/14 text tower (hidden states) and ViT-L/14 vision tower, as in CompoDiff-Aesthetic
        text = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                              projection_dim=1280, hidden_act="gelu")
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                  image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    return text, vision


@torch.no_grad()
def bench_encoders_and_pipeline(args, config, device, results):
    for dtype_name in args.pipeline_dtypes or (["float16"] if device.type == "cuda" else ["float32"]):
        bench_pipeline_in(getattr(torch, dtype_name), args, config, device, results)


def bench_pipeline_in(dtype, args, config, device, results):
    """The two CLIP towers, the denoiser and the whole pipeline, all in `dtype`."""
    from transformers import CLIPImageProcessor, CLIPTextModel, CLIPVisionModelWithProjection

    from diffusers_cir.utils import build_offline_clip_tokenizer

    text_config, vision_config = clip_configs(args.tiny)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(text_config).to(device, dtype).eval()
    image_encoder = CLIPVisionModelWithProjection(vision_config).to(device, dtype).eval()
    transformer = CompoDiffTransformer(**config).to(device, dtype).eval()
    size = vision_config.image_size
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    pipe = CompoDiffPipeline(transformer=transformer, scheduler=CompoDiffScheduler(), text_encoder=text_encoder,
                             tokenizer=build_offline_clip_tokenizer(), image_encoder=image_encoder, image_processor=processor)
    pipe.set_progress_bar_config(disable=True)
    if device.type == "cuda" and "graph" in args.modes:
        pipe.enable_cuda_graphs()
    negative, _ = pipe.encode_prompt("", device, do_classifier_free_guidance=False)  # cached once, as a user would
    for batch in args.pipeline_batch_sizes:
        pixel_values = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
        prompts = [f"make it number {i} and red" for i in range(batch)]
        tokens = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        input_ids, attention = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        parts = {
            "text_encoder": lambda: text_encoder(input_ids=input_ids, attention_mask=attention).last_hidden_state,
            "image_encoder": lambda: image_encoder(pixel_values=pixel_values).image_embeds,
        }
        for name, fn in parts.items():
            median = statistics.median(time_call(fn, device, args.repeats))
            row = {"part": name, "dtype": str(dtype).replace("torch.", ""), "batch": batch, "ms_median": round(median, 3),
                   "queries_per_s": round(batch / median * 1000, 1)}
            results.append(row)
            print_row(row)

        def whole():
            text = text_encoder(input_ids=input_ids, attention_mask=attention).last_hidden_state
            image = image_encoder(pixel_values=pixel_values).image_embeds
            return pipe(image_embeds=image, prompt_embeds=text, negative_prompt_embeds=negative, num_inference_steps=10,
                        generator=torch.Generator(device).manual_seed(0)).image_embeds

        denoise_inputs = dict(image_embeds=image_encoder(pixel_values=pixel_values).image_embeds,
                              prompt_embeds=text_encoder(input_ids=input_ids, attention_mask=attention).last_hidden_state,
                              negative_prompt_embeds=negative)
        denoise = statistics.median(time_call(
            lambda: pipe(**denoise_inputs, num_inference_steps=10, generator=torch.Generator(device).manual_seed(0)),
            device, args.repeats))
        median = statistics.median(time_call(whole, device, args.repeats))
        row = {"part": "pipeline (pixels + token ids -> embedding)", "dtype": str(dtype).replace("torch.", ""),
               "batch": batch, "ms_median": round(median, 3), "queries_per_s": round(batch / median * 1000, 1),
               "denoiser_ms": round(denoise, 3), "denoiser_share": round(denoise / median, 3)}
        results.append(row)
        print_row(row)
    del pipe, text_encoder, image_encoder, transformer
    if device.type == "cuda":
        torch.cuda.empty_cache()


def print_row(row: dict) -> None:
    keys = ["part", "mode", "dtype", "steps", "batch", "ms_median", "queries_per_s", "peak_mem_mib", "floor_ms",
            "fraction_of_floor", "denoiser_ms", "denoiser_share", "half_precision_norm_eps", "float32_norm_eps", "min_cosine_bf16_vs_fp32",
            "mean_cosine_bf16_vs_fp32"]
    print(" | ".join(f"{key}={row[key]}" for key in keys if row.get(key) is not None), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="Tiny model on CPU, a few seconds (smoke run).")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8, 64, 256, 1024])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--modes", nargs="+", default=["reference", "fast", "graph"], choices=["reference", "fast", "graph", "compiled", "compiled-graph", "fast-unfused", "graph-unfused"])
    parser.add_argument("--pipeline_batch_sizes", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--pipeline_dtypes", nargs="+", default=None, choices=["float32", "bfloat16", "float16"],
                        help="Precision(s) of the encoder and whole-pipeline section (default float16 on CUDA, "
                             "float32 on CPU).")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak_tflops", type=float, default=None, help="Hardware peak for the FLOP floor.")
    parser.add_argument("--skip_encoders", action="store_true")
    parser.add_argument("--skip_accuracy", action="store_true")
    parser.add_argument("--output", default="benchmarks/results/bench_compodiff.json")
    args = parser.parse_args(argv)
    if args.tiny:
        args.device = "cpu"
        args.batch_sizes, args.steps, args.repeats = [1, 4], [4], 1
        args.pipeline_batch_sizes = [2]
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    config = TINY if args.tiny else FULL
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'} x{os.cpu_count()}"
    print(f"# CompoDiff inference on {hardware}, torch {torch.__version__}, config {config}")
    results: list[dict] = []
    bench_denoiser(args, config, device, results)
    if not args.skip_accuracy and "bfloat16" in args.dtypes:
        for eps, same in ((1e-3, False), (1e-5, False), (1e-3, True)):
            row = accuracy_check(config, device, batch=4 if args.tiny else 256, steps=4 if args.tiny else 10,
                                 half_precision_norm_eps=eps, same_eps_reference=same)
            results.append(row)
            print_row(row)
    if not args.skip_encoders:
        bench_encoders_and_pipeline(args, config, device, results)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as handle:
        json.dump({"hardware": hardware, "torch": torch.__version__, "config": config, "results": results}, handle, indent=1)
    print(f"# wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
