"""The CPU sections of bench_compodiff.py: int8 denoiser variants, the int8 kernels, the CLIP towers, end to end.

Every comparison runs the float32 model and its int8 copy (``diffusers_cir.quantize_for_cpu``) interleaved in one
process, and reports the cosine similarity of their outputs on the same inputs.
"""

from __future__ import annotations

import copy

import _harness as harness
import torch

from diffusers_cir import CompoDiffPipeline, CompoDiffScheduler, CompoDiffTransformer, quantize_for_cpu
from diffusers_cir.models import cpu_int8

# Int8 selections of the denoiser ("default": `quantize_for_cpu`'s own choice, everything run per network call).
INT8_VARIANTS = {
    "default": {},
    "all-linear": {"exclude": [], "include": None, "all": True},
    "feed-forward+queries": {"include": ["blocks.*.ff.*", "blocks.*.to_q"]},
    "feed-forward": {"include": ["blocks.*.ff.*"]},
}


def quantized_copy(model: torch.nn.Module, variant: str = "default") -> tuple[torch.nn.Module, list[str]]:
    options = dict(INT8_VARIANTS[variant])
    copied = copy.deepcopy(model)
    if options.pop("all", False):  # every linear layer, the float32 ones the class keeps included
        copied._keep_float32_on_cpu_int8 = []
    return copied, quantize_for_cpu(copied, **options)


def make_pipe(transformer, **components) -> CompoDiffPipeline:
    pipe = CompoDiffPipeline(transformer=transformer, scheduler=CompoDiffScheduler(), **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cosine_row(reference: torch.Tensor, output: torch.Tensor) -> dict:
    cosine = cpu_int8.cosine_to(reference, output)
    return {"min_cosine_to_float32": round(cosine.min().item(), 6), "mean_cosine_to_float32": round(cosine.mean().item(), 6),
            "compared": int(cosine.numel())}


@torch.no_grad()
def int8_accuracy(transformer: CompoDiffTransformer, variants: list[str], queries: int, steps: int, make_inputs) -> list[dict]:
    """Float32 against each int8 variant on `queries` random queries (same noise): per-query cosine."""
    width = transformer.config.embedding_dim
    inputs = make_inputs(queries, transformer.config, torch.device("cpu"), torch.float32, torch.Generator().manual_seed(11))
    latents = torch.randn(queries, width, generator=torch.Generator().manual_seed(12))

    def run(model):
        return make_pipe(model)(**inputs, latents=latents, num_inference_steps=steps,
                                generator=torch.Generator().manual_seed(13)).image_embeds

    reference = run(transformer)
    rows = []
    for variant in variants:
        quantized, names = quantized_copy(transformer, variant)
        rows.append({"part": "int8-accuracy", "variant": variant, "quantized_layers": len(names), "queries": queries,
                     "steps": steps, **cosine_row(reference, run(quantized))})
        harness.print_row(rows[-1], ["part", "variant", "quantized_layers", "queries", "min_cosine_to_float32",
                                     "mean_cosine_to_float32"])
    return rows


@torch.no_grad()
def int8_speed(transformer, variants, batch_sizes, steps, threads, repeats, make_inputs) -> list[dict]:
    """The float32 package path against each int8 variant, interleaved, per batch size."""
    pipes = {"float32": make_pipe(transformer)}
    for variant in variants:
        pipes[f"int8 {variant}"] = make_pipe(quantized_copy(transformer, variant)[0])
    rows = []
    for batch in batch_sizes:
        inputs = make_inputs(batch, transformer.config, torch.device("cpu"), torch.float32, torch.Generator().manual_seed(batch))
        functions = {name: (lambda pipe=pipe: pipe(**inputs, num_inference_steps=steps,
                                                   generator=torch.Generator().manual_seed(0)))
                     for name, pipe in pipes.items()}
        samples = harness.interleaved(functions, torch.device("cpu"), repeats)
        versus = harness.ratios(samples, "float32")
        for name, values in samples.items():
            row = {"part": "int8-denoiser", "mode": name, "threads": threads, "batch": batch, "steps": steps,
                   **harness.summary(values), **versus.get(name, {})}
            row["queries_per_s"] = round(batch / row["ms_median"] * 1000, 2)
            rows.append(row)
            harness.print_row(row, ["part", "mode", "threads", "batch", "ms_median", "ms_min", "queries_per_s",
                                    "ratio_of_medians", "median_round_ratio"])
    return rows


def _kernel_candidates(rows_in: int, in_features: int, out_features: int) -> dict:
    """Ways to compute one projection: float32, the package's int8 layer (each backend), torch's weight-only int8
    and int4 kernels, and torchao's configurations when torchao is importable."""
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    x = torch.randn(rows_in, in_features, generator=generator)
    candidates = {"float32": (linear, x)}
    layer = cpu_int8.Int8DynamicLinear.from_linear(linear)
    for backend in ("onednn", "int_mm"):
        if cpu_int8.int8_backend() == "onednn" or backend == "int_mm":
            forced = copy.deepcopy(layer)
            forced._packed = None
            candidates[f"int8 rows x int8 weights ({backend})"] = (_forced(forced, backend), x)
    int8_weight, scale = cpu_int8.quantize_weight(linear.weight)
    candidates["int8 weight-only (aten _weight_int8pack_mm)"] = (
        lambda rows: torch.ops.aten._weight_int8pack_mm(rows, int8_weight, scale), x)
    try:
        import torchao  # noqa: F401
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

        for name, config in (("torchao int8 weight-only", Int8WeightOnlyConfig()),
                             ("torchao int8 dynamic", Int8DynamicActivationInt8WeightConfig())):
            model = torch.nn.Sequential(copy.deepcopy(linear))
            quantize_(model, config)
            candidates[name] = (model, x)
    except ImportError:
        pass
    return candidates


def _forced(layer: cpu_int8.Int8DynamicLinear, backend: str):
    """The layer's product on one backend (the benchmark compares them; the layer itself picks the fastest)."""
    def run(rows):
        quantized, scale = cpu_int8.quantize_rows(rows)
        saved = cpu_int8._BACKEND
        cpu_int8._BACKEND = backend
        try:
            return layer.integer_product(quantized).mul_(scale).mul_(layer.weight_scale)
        finally:
            cpu_int8._BACKEND = saved
    return run


@torch.no_grad()
def int8_kernels(shapes, threads, repeats) -> list[dict]:
    """One projection per shape `(rows, in, out)`: time and cosine of every candidate against float32."""
    rows = []
    for rows_in, in_features, out_features in shapes:
        candidates = _kernel_candidates(rows_in, in_features, out_features)
        reference = candidates["float32"][0](candidates["float32"][1])
        functions = {name: (lambda fn=fn, x=x: fn(x)) for name, (fn, x) in candidates.items()}
        samples = harness.interleaved(functions, torch.device("cpu"), repeats, warmup=2)
        versus = harness.ratios(samples, "float32")
        for name, (fn, x) in candidates.items():
            row = {"part": "int8-kernel", "kernel": name, "threads": threads, "shape": [rows_in, in_features, out_features],
                   **harness.summary(samples[name]), **versus.get(name, {}),
                   "min_cosine_to_float32": round(cpu_int8.cosine_to(reference, fn(x)).min().item(), 6)}
            row.pop("samples_ms")
            rows.append(row)
            harness.print_row(row, ["part", "kernel", "threads", "shape", "ms_median", "ratio_of_medians",
                                    "min_cosine_to_float32"])
    return rows


# --------------------------------------------------------------------------------------------- CLIP towers


def build_towers(tiny: bool):
    """Random-weight CLIP towers of CompoDiff-Aesthetic: ViT-bigG/14 text (hidden states), ViT-L/14 vision."""
    from bench_compodiff import clip_configs
    from transformers import CLIPImageProcessor, CLIPTextModel, CLIPVisionModelWithProjection

    from diffusers_cir.utils import build_offline_clip_tokenizer

    text_config, vision_config = clip_configs(tiny)
    torch.manual_seed(0)
    size = vision_config.image_size
    return {
        "text_encoder": CLIPTextModel(text_config).eval(),
        "image_encoder": CLIPVisionModelWithProjection(vision_config).eval(),
        "tokenizer": build_offline_clip_tokenizer(),
        "image_processor": CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
    }


def _tower_inputs(towers, count: int):
    size = towers["image_encoder"].config.image_size
    pixels = torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(21))
    prompts = [f"make it number {i} and red, as a pencil sketch on a beach" for i in range(count)]
    tokens = towers["tokenizer"](prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    return pixels, tokens


@torch.no_grad()
def tower_rows(towers, int8_towers, threads, repeats, accuracy_inputs: int) -> list[dict]:
    """Each tower at batch 1, float32 against int8 interleaved; cosine on `accuracy_inputs` inputs (text: every
    token's hidden state, which the denoiser reads; vision: the image embedding)."""
    pixels, tokens = _tower_inputs(towers, accuracy_inputs)
    calls = {
        "text_encoder": lambda tower, n: tower(input_ids=tokens.input_ids[:n], attention_mask=tokens.attention_mask[:n]).last_hidden_state,
        "image_encoder": lambda tower, n: tower(pixel_values=pixels[:n]).image_embeds,
    }
    rows = []
    for name, call in calls.items():
        accuracy = cosine_row(call(towers[name], accuracy_inputs), call(int8_towers[name], accuracy_inputs))
        samples = harness.interleaved({"float32": lambda: call(towers[name], 1), "int8": lambda: call(int8_towers[name], 1)},
                                      torch.device("cpu"), repeats)
        versus = harness.ratios(samples, "float32")
        for mode, values in samples.items():
            row = {"part": name, "mode": mode, "threads": threads, "batch": 1, **harness.summary(values),
                   **versus.get(mode, {}), **(accuracy if mode == "int8" else {})}
            rows.append(row)
            harness.print_row(row, ["part", "mode", "threads", "batch", "ms_median", "ratio_of_medians",
                                    "min_cosine_to_float32", "mean_cosine_to_float32"])
    return rows


@torch.no_grad()
def end_to_end_rows(pipes: dict, threads: int, repeats: int, accuracy_queries: int) -> list[dict]:
    """One query from pixels and a prompt (text tower + vision tower + denoiser, the negative prompt's hidden
    states cached as a user would): float32 against int8, interleaved; cosine of the composed embeddings."""
    float_pipe = pipes["float32"]
    towers = {"text_encoder": float_pipe.text_encoder, "image_encoder": float_pipe.image_encoder}
    pixels, _ = _tower_inputs(towers | {"tokenizer": float_pipe.tokenizer}, max(accuracy_queries, 1))
    prompts = [f"make it number {i} and red, as a pencil sketch on a beach" for i in range(max(accuracy_queries, 1))]
    negatives = {name: pipe.encode_prompt("", do_classifier_free_guidance=False)[0] for name, pipe in pipes.items()}

    def query(name, count):
        return pipes[name](image=pixels[:count], prompt=prompts[:count], negative_prompt_embeds=negatives[name],
                           num_inference_steps=10, generator=torch.Generator().manual_seed(0)).image_embeds

    accuracy = cosine_row(query("float32", accuracy_queries), query("int8", accuracy_queries))
    samples = harness.interleaved({name: (lambda name=name: query(name, 1)) for name in pipes}, torch.device("cpu"), repeats)
    versus = harness.ratios(samples, "float32")
    rows = []
    for name, values in samples.items():
        row = {"part": "end-to-end (pixels + prompt -> composed embedding)", "mode": name, "threads": threads, "batch": 1,
               "steps": 10, **harness.summary(values), **versus.get(name, {}), **(accuracy if name == "int8" else {})}
        rows.append(row)
        harness.print_row(row, ["part", "mode", "threads", "ms_median", "ratio_of_medians", "min_cosine_to_float32"])
    return rows


def shares(rows: list[dict]) -> list[dict]:
    """Per thread count and precision: each network's batch-1 median against the end-to-end median."""
    result = []
    for end in (row for row in rows if row["part"].startswith("end-to-end")):
        denoiser_mode = "float32" if end["mode"] == "float32" else "int8 default"
        parts = {}
        for row in rows:
            if row.get("threads") != end["threads"] or row.get("batch") != 1:
                continue
            if row["part"] in ("text_encoder", "image_encoder") and row["mode"] == end["mode"]:
                parts[row["part"]] = row["ms_median"]
            elif row["part"] == "int8-denoiser" and row["mode"] == denoiser_mode:
                parts["denoiser"] = row["ms_median"]
        if parts:
            result.append({"part": "end-to-end shares", "mode": end["mode"], "threads": end["threads"],
                           "end_to_end_ms": end["ms_median"], **{f"{name}_ms": ms for name, ms in parts.items()},
                           **{f"{name}_share": round(ms / end["ms_median"], 3) for name, ms in parts.items()}})
            print(" | ".join(f"{key}={value}" for key, value in result[-1].items()), flush=True)
    return result
