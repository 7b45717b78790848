#!/usr/bin/env python
"""CompoDiff inference speed: the denoiser against the authors' code, the int8 CPU path, the CLIP towers, end to end.

Prints a table (medians over interleaved rounds) and writes JSON (hardware, thread count, load average, versions,
every sample). Full size = the released denoiser (12 layers, width 768, 16 heads of 64, text width 1280, 140M
parameters) and the CLIP towers of CompoDiff-Aesthetic (ViT-bigG/14 text, ViT-L/14 vision), all with random weights
(nothing is downloaded); three-way guidance, 10 steps, one sample per query.

    # CPU, everything, at 1 and 2 threads, against the authors' code (see compodiff_authors.py for the checkout):
    python benchmarks/bench_compodiff.py --device cpu --threads 1 2 --reference-code /tmp/CompoDiff
    python benchmarks/bench_compodiff.py --device cuda                      # the GPU study (modes below)
    python benchmarks/bench_compodiff.py --tiny                             # seconds (run by the tests)

Sections (`--sections`; CPU default: all but `pipeline`, CUDA default: denoiser accuracy pipeline):

- `denoiser`: the package's modes, interleaved. `fast` is the pipeline's path (step-independent work once per
  query, branches batched, the time tokens of all steps in one call); `reference-shaped` runs the package's modules in
  the authors' loop shape (conditions re-projected in float32 at every call; not their code: see `authors`);
  `compiled` compiles the blocks (`transformer.compile_repeated_blocks(dynamic=False)`); on CUDA `graph` captures
  one CUDA graph (`pipe.enable_cuda_graphs()`), `compiled-graph` compiles first; the `-unfused` modes leave out the
  fused Triton attention (CUDA) and the weight-major small projections (CPU).
- `authors` (needs `--reference-code DIR`, a checkout of github.com/navervision/CompoDiff): the authors' own
  `CompoDiff.sample` and this package's pipeline (float32, and int8 with `--compare-modes`), the same weights loaded
  into both through the converter, interleaved; their outputs are compared first (max difference, cosine).
- `int8`: `diffusers_cir.quantize_for_cpu` on the denoiser: cosine to float32 of every query of `--accuracy-queries`
  random queries per variant (which layers are int8), the speed of each variant against float32, and the kernels
  one projection can run on (float32, the package's int8 layer, torch's and torchao's weight-only int8).
- `towers`: the CLIP text and vision towers at batch 1, float32 against int8, with their cosine.
- `end-to-end`: one query from pixels and a prompt through the pipeline (both towers and the denoiser; the negative
  prompt's hidden states cached), float32 against int8 (all three networks), with the composed embeddings' cosine.
- `accuracy`: bf16 against float32 (GPU study; CPU when `--dtypes` has bfloat16). `pipeline`: the towers and the
  whole pipeline on CUDA in float16 at large batches (denoiser share).

Threads: `--threads` (default 1 on CPU), set explicitly for every section; several values repeat the CPU sections at
each. Full-size results go to `benchmarks/results/<machine label>/bench_compodiff_<device>.json` (committed), `--tiny`
ones to `benchmarks/results/tiny/` (ignored by git); `--output` overrides both.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys

import _harness as harness
import torch

from diffusers_cir import CompoDiffPipeline, CompoDiffScheduler, CompoDiffTransformer
from diffusers_cir.models import compodiff_transformer

SMALL_ROWS = compodiff_transformer.SMALL_ROW_LINEAR_MAX_ROWS
AGREEMENT_MIN_COSINE = 0.9999  # float32 package vs the authors' float32 code on the same weights and noise

FULL = dict(embedding_dim=768, text_embedding_dim=1280, num_layers=12, num_attention_heads=16, attention_head_dim=64)
TINY = dict(embedding_dim=32, text_embedding_dim=48, num_layers=2, num_attention_heads=2, attention_head_dim=16)
PEAK_TFLOPS = {("cuda", "bfloat16"): 800.0, ("cuda", "float16"): 800.0, ("cuda", "float32"): 60.0}
CPU_SECTIONS = ["denoiser", "authors", "int8", "towers", "end-to-end"]
CUDA_SECTIONS = ["denoiser", "accuracy", "pipeline"]
ROW_KEYS = ["part", "mode", "dtype", "threads", "steps", "batch", "ms_median", "queries_per_s", "ratio_of_medians",
            "peak_mem_mib", "floor_ms", "fraction_of_floor", "max_abs_difference", "min_cosine",
            "denoiser_ms", "denoiser_share", "half_precision_norm_eps", "min_cosine_bf16_vs_fp32"]


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


def make_inputs(batch, config, device, dtype, generator):
    return dict(
        image_embeds=torch.randn(batch, config["embedding_dim"], generator=generator).to(device, dtype),
        prompt_embeds=torch.randn(batch, 77, config["text_embedding_dim"], generator=generator).to(device, dtype),
        negative_prompt_embeds=torch.randn(1, 77, config["text_embedding_dim"], generator=generator).to(device, dtype),
    )


def make_pipe(transformer) -> CompoDiffPipeline:
    pipe = CompoDiffPipeline(transformer=transformer, scheduler=CompoDiffScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def reference_shaped(pipe, inputs, steps, generator_seed):
    """The authors' loop shape on the package's modules: conditions re-projected at every network call, branches
    concatenated, float32. Not the authors' code (the `authors` section runs that)."""
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


def _mode_runner(mode, pipe, transformer, compiled_pipes, inputs, steps, device):
    """A zero-argument call running one denoiser mode (the fused-kernel and small-row switches set inside it)."""
    unfused = mode.endswith("-unfused") or mode == "reference-shaped"
    runner = pipe
    if mode.startswith("compiled"):
        if mode not in compiled_pipes:  # a separate copy: compiling is in place
            compiled = make_pipe(copy.deepcopy(transformer))
            if mode == "compiled-graph":
                compiled.enable_cuda_graphs(compile_blocks=True)
            else:
                compiled.transformer.compile_repeated_blocks(dynamic=False)
            compiled_pipes[mode] = compiled
        runner = compiled_pipes[mode]

    def run():
        transformer.set_fused_attention(not unfused)
        compodiff_transformer.SMALL_ROW_LINEAR_MAX_ROWS = 0 if unfused else SMALL_ROWS
        if mode.startswith("graph"):
            pipe.enable_cuda_graphs()
        else:
            pipe.disable_cuda_graphs()
        if mode == "reference-shaped":
            return reference_shaped(pipe, inputs, steps, 0)
        return runner(**inputs, num_inference_steps=steps, generator=torch.Generator(device).manual_seed(0))

    return run


def bench_denoiser(args, config, device, threads, results):
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        torch.manual_seed(0)
        transformer = CompoDiffTransformer(**config).to(device, dtype).eval()
        pipe, compiled_pipes = make_pipe(transformer), {}
        peak = args.peak_tflops or PEAK_TFLOPS.get((device.type, dtype_name))
        modes = [m for m in args.modes if device.type == "cuda" or "graph" not in m]
        if dtype != torch.float32:
            modes = [mode for mode in modes if mode != "reference-shaped"]  # the authors' loop runs in float32
        for steps in args.steps:
            for batch in args.batch_sizes:
                inputs = make_inputs(batch, config, device, dtype, torch.Generator().manual_seed(batch))
                functions = {m: _mode_runner(m, pipe, transformer, compiled_pipes, inputs, steps, device) for m in modes}
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    samples = harness.interleaved(functions, device, args.repeats)
                except torch.OutOfMemoryError:
                    print(f"  out of memory: {dtype_name} batch {batch}", file=sys.stderr)
                    continue
                versus = harness.ratios(samples, modes[0]) if len(modes) > 1 else {}
                flops = flops_per_query(config, steps)["total"] * batch
                for mode in modes:
                    median = statistics.median(samples[mode])
                    row = {"part": "denoiser", "mode": mode, "dtype": dtype_name, "threads": threads, "steps": steps,
                           "batch": batch, **harness.summary(samples[mode]), **versus.get(mode, {}),
                           "ratio_baseline": modes[0], "queries_per_s": round(batch / median * 1000, 1),
                           "gflop_per_query": round(flops / batch / 1e9, 2)}
                    if device.type == "cuda":
                        row["peak_mem_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                    if peak:
                        floor_ms = flops / (peak * 1e12) * 1000
                        row.update(floor_ms=round(floor_ms, 3), fraction_of_floor=round(floor_ms / median, 3))
                    results.append(row)
                    harness.print_row(row, ROW_KEYS)
        compodiff_transformer.SMALL_ROW_LINEAR_MAX_ROWS = SMALL_ROWS
        transformer.set_fused_attention(True)
        pipe.disable_cuda_graphs()
        del pipe, transformer, compiled_pipes
        if device.type == "cuda":
            torch.cuda.empty_cache()


@torch.no_grad()
def bench_authors(args, threads, results):
    """The authors' `CompoDiff.sample` against the package (same weights), agreement first, then interleaved."""
    import compodiff_authors
    from compodiff_cpu import quantized_copy

    config = compodiff_authors.TINY_CONFIG if args.tiny else compodiff_authors.FULL_CONFIG
    authors, transformer = compodiff_authors.build_pair(args.reference_code, config)
    pipes = {"package": make_pipe(transformer)}
    if "package-int8" in args.compare_modes:
        pipes["package-int8"] = make_pipe(quantized_copy(transformer)[0])
    if "package-compiled" in args.compare_modes:
        pipes["package-compiled"] = make_pipe(copy.deepcopy(transformer))
        pipes["package-compiled"].transformer.compile_repeated_blocks(dynamic=False)
    width = config["embed_dim"]
    for batch in args.authors_batch_sizes:
        generator = torch.Generator().manual_seed(100 + batch)
        inputs = {"image_embeds": torch.randn(batch, width, generator=generator),
                  "prompt_embeds": torch.randn(batch, 77, compodiff_authors.TEXT_WIDTH, generator=generator),
                  "negative_prompt_embeds": torch.randn(1, 77, compodiff_authors.TEXT_WIDTH, generator=generator)}
        functions = {"authors": lambda: compodiff_authors.authors_sample(authors, inputs, 10, seed=0)}
        for name, pipe in pipes.items():
            functions[name] = (lambda pipe=pipe: pipe(**inputs, num_inference_steps=10,
                                                      generator=torch.Generator().manual_seed(0)).image_embeds)
        expected = functions["authors"]()
        agreement = {}
        for name in pipes:
            output = functions[name]()
            agreement[name] = {"max_abs_difference": float(f"{(output - expected).abs().max().item():.3g}"),
                               "min_cosine": round(torch.nn.functional.cosine_similarity(output, expected).min().item(), 6)}
        if agreement["package"]["min_cosine"] < AGREEMENT_MIN_COSINE:
            raise RuntimeError(f"The package and the authors' code disagree at batch {batch}: {agreement['package']} "
                               "(same weights, same noise): the comparison would time different computations.")
        samples = harness.interleaved(functions, torch.device("cpu"), args.repeats)
        versus = harness.ratios(samples, "authors")
        for name, values in samples.items():
            row = {"part": "denoiser vs authors' code", "mode": name, "dtype": "float32", "threads": threads,
                   "steps": 10, "batch": batch, **harness.summary(values), **versus.get(name, {}),
                   "ratio_baseline": "authors", **agreement.get(name, {})}
            row["queries_per_s"] = round(batch / row["ms_median"] * 1000, 2)
            results.append(row)
            harness.print_row(row, ROW_KEYS)


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
    pipe = make_pipe(transformer.to(device).eval())
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
def bench_cuda_pipeline(args, config, device, results):
    """The two CLIP towers, the denoiser and the whole pipeline on CUDA, in each `--pipeline-dtypes` precision."""
    from compodiff_cpu import build_towers

    for dtype_name in args.pipeline_dtypes or ["float16"]:
        dtype = getattr(torch, dtype_name)
        towers = build_towers(args.tiny)
        text_encoder, image_encoder = towers["text_encoder"].to(device, dtype), towers["image_encoder"].to(device, dtype)
        torch.manual_seed(0)
        transformer = CompoDiffTransformer(**config).to(device, dtype).eval()
        pipe = CompoDiffPipeline(transformer=transformer, scheduler=CompoDiffScheduler(), **towers)
        pipe.set_progress_bar_config(disable=True)
        if "graph" in args.modes:
            pipe.enable_cuda_graphs()
        negative, _ = pipe.encode_prompt("", device, do_classifier_free_guidance=False)  # cached once, as a user would
        size = image_encoder.config.image_size
        for batch in args.pipeline_batch_sizes:
            pixel_values = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
            tokens = pipe.tokenizer([f"make it number {i} and red" for i in range(batch)], padding="max_length",
                                    max_length=77, truncation=True, return_tensors="pt")
            input_ids, attention = tokens.input_ids.to(device), tokens.attention_mask.to(device)
            text = lambda: text_encoder(input_ids=input_ids, attention_mask=attention).last_hidden_state  # noqa: E731
            image = lambda: image_encoder(pixel_values=pixel_values).image_embeds  # noqa: E731
            denoise_inputs = dict(image_embeds=image(), prompt_embeds=text(), negative_prompt_embeds=negative)
            functions = {
                "text_encoder": text, "image_encoder": image,
                "denoiser": lambda: pipe(**denoise_inputs, num_inference_steps=10, generator=torch.Generator(device).manual_seed(0)),
                "pipeline": lambda: pipe(image_embeds=image(), prompt_embeds=text(), negative_prompt_embeds=negative,
                                         num_inference_steps=10, generator=torch.Generator(device).manual_seed(0)),
            }
            samples = harness.interleaved(functions, device, args.repeats)
            medians = {name: statistics.median(values) for name, values in samples.items()}
            for name, values in samples.items():
                row = {"part": name, "dtype": dtype_name, "batch": batch, **harness.summary(values),
                       "queries_per_s": round(batch / medians[name] * 1000, 1)}
                if name == "pipeline":
                    row.update(denoiser_ms=round(medians["denoiser"], 3),
                               denoiser_share=round(medians["denoiser"] / medians["pipeline"], 3))
                results.append(row)
                harness.print_row(row, ROW_KEYS)
        del pipe, text_encoder, image_encoder, transformer
        torch.cuda.empty_cache()


@torch.no_grad()
def bench_cpu_int8(args, config, threads, results, state):
    """The `int8` section: accuracy per variant (once), the kernels and the speed per variant (per thread count)."""
    import compodiff_cpu

    if "transformer" not in state:
        torch.manual_seed(0)
        state["transformer"] = CompoDiffTransformer(**config).eval()
        results.extend(compodiff_cpu.int8_accuracy(state["transformer"], args.int8_variants, args.accuracy_queries,
                                                   args.accuracy_steps, make_inputs))
    shapes = [(4, 32, 256)] if args.tiny else [(6, 768, 6144), (6, 3072, 768), (77, 1280, 5120)]
    results.extend(compodiff_cpu.int8_kernels(shapes, threads, max(args.repeats, 5)))
    results.extend(compodiff_cpu.int8_speed(state["transformer"], args.int8_variants, args.int8_batch_sizes, 10,
                                            threads, args.repeats, make_inputs))


@torch.no_grad()
def bench_cpu_towers_and_end_to_end(args, config, threads, results, state):
    import compodiff_cpu

    if "pipes" not in state:
        towers = compodiff_cpu.build_towers(args.tiny)
        torch.manual_seed(0)
        transformer = state["transformer"] if "transformer" in state else CompoDiffTransformer(**config).eval()
        float_pipe = compodiff_cpu.make_pipe(transformer, **towers)
        int8_pipe = compodiff_cpu.make_pipe(compodiff_cpu.quantized_copy(transformer)[0], **{
            **towers, "text_encoder": compodiff_cpu.quantized_copy(towers["text_encoder"])[0],
            "image_encoder": compodiff_cpu.quantized_copy(towers["image_encoder"])[0]})
        state["pipes"] = {"float32": float_pipe, "int8": int8_pipe}
    pipes = state["pipes"]
    count = args.end_to_end_queries
    if "towers" in args.sections:
        results.extend(compodiff_cpu.tower_rows(
            {"text_encoder": pipes["float32"].text_encoder, "image_encoder": pipes["float32"].image_encoder,
             "tokenizer": pipes["float32"].tokenizer},
            {"text_encoder": pipes["int8"].text_encoder, "image_encoder": pipes["int8"].image_encoder},
            threads, args.repeats, count))
    if "end-to-end" in args.sections:
        results.extend(compodiff_cpu.end_to_end_rows(pipes, threads, args.repeats, count))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="Tiny models on CPU, a few seconds (smoke run).")
    parser.add_argument("--sections", nargs="+", default=None, choices=sorted(set(CPU_SECTIONS + CUDA_SECTIONS)))
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="CPU intra-op threads (default 1).")
    parser.add_argument("--reference-code", default=None, help="A checkout of github.com/navervision/CompoDiff.")
    parser.add_argument("--compare-modes", nargs="+", default=["package", "package-int8"],
                        choices=["package", "package-int8", "package-compiled"])
    parser.add_argument("--authors-batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--batch-sizes", "--batch_sizes", type=int, nargs="+", default=None)
    parser.add_argument("--steps", type=int, nargs="+", default=None)
    parser.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--modes", nargs="+", default=None, choices=["reference-shaped", "fast", "graph", "compiled",
                                                                     "compiled-graph", "fast-unfused", "graph-unfused"])
    parser.add_argument("--int8-variants", nargs="+", default=None, choices=["default", "all-linear",
                                                                             "feed-forward+queries", "feed-forward"])
    parser.add_argument("--int8-batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--accuracy-queries", type=int, default=None, help="Queries of the int8 cosine check (256).")
    parser.add_argument("--accuracy-steps", type=int, default=10)
    parser.add_argument("--end-to-end-queries", type=int, default=None,
                        help="Inputs of the towers' and the end-to-end cosine checks (default 8; tiny 2).")
    parser.add_argument("--pipeline-batch-sizes", "--pipeline_batch_sizes", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--pipeline-dtypes", "--pipeline_dtypes", nargs="+", default=None,
                        choices=["float32", "bfloat16", "float16"], help="CUDA `pipeline` section precision(s).")
    parser.add_argument("--repeats", type=int, default=None, help="Interleaved timed rounds (median reported).")
    parser.add_argument("--peak-tflops", "--peak_tflops", type=float, default=None, help="Hardware peak for the FLOP floor.")
    parser.add_argument("--machine-label", default=None, help="Results sub-folder (default: from the CPU or GPU name).")
    parser.add_argument("--output", default=None, help="JSON file (default: results/<label>/bench_compodiff_<device>.json).")
    parser.add_argument("--append", action="store_true",
                        help="Add this run's rows to an existing results file (another run: its own environment).")
    args = parser.parse_args(argv)
    if args.tiny:
        args.device = "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False.")
    for name in ("threads", "batch_sizes", "authors_batch_sizes", "steps", "int8_batch_sizes", "pipeline_batch_sizes"):
        if getattr(args, name) is not None and min(getattr(args, name)) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}.")
    for name in ("repeats", "accuracy_queries", "accuracy_steps", "end_to_end_queries"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}.")
    cpu, tiny = args.device == "cpu", args.tiny
    args.sections = args.sections or (CPU_SECTIONS if cpu else CUDA_SECTIONS)
    if "authors" in args.sections and args.reference_code is None:
        if "authors" in (argv or sys.argv[1:]):
            parser.error("--sections authors needs --reference-code DIR (a checkout of navervision/CompoDiff).")
        args.sections = [section for section in args.sections if section != "authors"]
        print("# no --reference-code: the comparison with the authors' code is skipped", file=sys.stderr)
    args.batch_sizes = args.batch_sizes or ([1, 4] if tiny else [1, 8, 64] if cpu else [1, 8, 64, 256, 1024])
    args.authors_batch_sizes = args.authors_batch_sizes or ([1, 4] if tiny else [1, 8, 64])
    args.int8_batch_sizes = args.int8_batch_sizes or ([1] if tiny or cpu else [1])
    args.steps = args.steps or ([4] if tiny else [10] if cpu else [10, 50])
    args.dtypes = args.dtypes or (["float32"] if cpu else ["float32", "bfloat16"])
    args.modes = args.modes or (["fast", "reference-shaped"] if cpu else ["fast", "reference-shaped", "graph"])
    args.int8_variants = args.int8_variants or (["default", "all-linear"] if tiny else list(
        ["default", "all-linear", "feed-forward+queries", "feed-forward"]))
    args.accuracy_queries = args.accuracy_queries or (8 if tiny else 256)
    args.repeats = args.repeats or (1 if tiny else 5)
    args.end_to_end_queries = args.end_to_end_queries or (2 if tiny else 8)
    args.threads = args.threads if cpu else [torch.get_num_threads()]
    return args


def _results_writer(args, device, config, env):
    """Writes the results file after every section (a run killed later keeps what it measured). With `--append`,
    the rows of earlier runs in the file are kept before this run's, each run with its environment."""
    output = harness.results_path(f"bench_compodiff_{device.type}.json", args.tiny, device, args.machine_label, args.output)
    earlier = {"runs": [], "results": []}
    if args.append and output.is_file():
        earlier = json.loads(output.read_text(encoding="utf-8"))
        if earlier.get("config") != config:
            raise SystemExit(f"--append: {output} holds another model configuration ({earlier.get('config')}).")
        earlier.setdefault("runs", [])
    run = {"environment": env, "threads": args.threads, "repeats": args.repeats, "sections": args.sections,
           "argv": sys.argv[1:], "reference_code": str(args.reference_code) if args.reference_code else None}

    def write(results: list[dict], finished: bool = False) -> None:
        harness.write_results(output, {
            "benchmark": "compodiff", "machine_label": output.parent.name, "config": config,
            "threads": sorted({*earlier.get("threads", []), *args.threads}),
            "runs": earlier["runs"] + [dict(run, finished=finished, run=len(earlier["runs"]))],
            "results": earlier["results"] + [dict(row, run=len(earlier["runs"])) for row in results],
        })

    return write


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    config = TINY if args.tiny else FULL
    env = harness.environment(device)
    print(f"# CompoDiff inference on {env['device']} ({env['cpu']}), torch {torch.__version__}, threads "
          f"{args.threads}, load average {env['load_average_at_start']}, sections {args.sections}")
    write = _results_writer(args, device, config, env)
    results: list[dict] = []
    state: dict = {}  # models built once and reused across thread counts
    for threads in args.threads:
        if device.type == "cpu":
            harness.set_threads(threads)
        if "denoiser" in args.sections:
            bench_denoiser(args, config, device, threads, results)
            write(results)
        if "authors" in args.sections:
            bench_authors(args, threads, results)
            write(results)
        if device.type == "cpu" and "int8" in args.sections:
            bench_cpu_int8(args, config, threads, results, state)
            write(results)
        if device.type == "cpu" and {"towers", "end-to-end"} & set(args.sections):
            bench_cpu_towers_and_end_to_end(args, config, threads, results, state)
            write(results)
        gc.collect()
    if "accuracy" in args.sections and "bfloat16" in args.dtypes:
        for eps, same in ((1e-3, False), (1e-5, False), (1e-3, True)):
            row = accuracy_check(config, device, batch=4 if args.tiny else 256, steps=4 if args.tiny else 10,
                                 half_precision_norm_eps=eps, same_eps_reference=same)
            results.append(row)
            harness.print_row(row, ROW_KEYS)
    if device.type == "cpu":
        import compodiff_cpu

        results.extend(compodiff_cpu.shares(results))
    if "pipeline" in args.sections and device.type == "cuda":
        bench_cuda_pipeline(args, config, device, results)
    write(results, finished=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
