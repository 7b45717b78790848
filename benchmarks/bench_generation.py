#!/usr/bin/env python
"""Triplet generation throughput per stage, with real-size random-weight models (no download).

Every stage of ``diffusers-cir generate`` is timed on models of the sizes a real run loads, built from their
configurations with random weights (throughput does not depend on the weights' values; only LLM output lengths would,
so the LLM and VLM always generate exactly ``--max_new_tokens``):

- ``keyword``: captions/s through the built-in tagger and the keyword triplet step; terms/s through the CLIP
  ViT-L/14 text tower (the band's features); seconds of the band search over ``--vocabulary`` terms;
- ``llm``: captions/s sampled from an OPT-shaped causal LM (``--llm``: opt-125m, opt-1.3b, opt-6.7b as in the paper);
- ``image pairs``: pairs/s from Stable Diffusion 1.5 (UNet 860M, VAE, CLIP ViT-L/14 text) at ``--resolution`` with
  ``--steps`` DDIM steps and classifier-free guidance, with the Prompt-to-Prompt processors, and without them
  (diffusers' default processor, same process) for the processors' overhead;
- ``filters``: pairs/s through the CLIP ViT-L/14 scores (two images, three to five texts) and images/s through the
  safety checker (ViT-L/14 vision tower);
- ``masks``: masks/s from ClipSeg rd64 (CLIP ViT-B/16 towers);
- ``mtst``: pairs/s of forward + reverse texts from a LLaVA-1.5-shaped VLM (CLIP ViT-L/14-336 + a Qwen2-0.5B-sized
  language model).

Each number is the median of ``--repeats`` timed runs after one warm-up. The summary estimates keyword triplets per
hour per device for the recipe measured (``--num_seeds`` image pairs per caption triplet; before the filters drop any).

    python benchmarks/bench_generation.py                                  # CPU: small resolution, 2 steps
    python benchmarks/bench_generation.py --device cuda --resolution 512 --steps 50 --llm opt-6.7b --dtype float16
    python benchmarks/bench_generation.py --quick                          # smoke test of this script (tiny sizes)

Prints a table and writes JSON (``benchmarks/results/<machine label>/generation_<device>.json``; ``--quick``:
``benchmarks/results/tiny/``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch

CLIP_L14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                     pad_token_id=49407, hidden_act="quick_gelu")
CLIP_L14_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="quick_gelu")
CLIP_B16_TEXT = dict(CLIP_L14_TEXT, hidden_size=512, intermediate_size=2048, num_attention_heads=8)
CLIP_B16_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=16, hidden_act="quick_gelu")
OPT = {  # facebook/opt-* shapes
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12),
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32),
    "opt-6.7b": dict(hidden_size=4096, num_hidden_layers=32, ffn_dim=16384, num_attention_heads=32),
}
QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096)
TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=64, num_attention_heads=4)  # --quick only
SD15_UNET = dict(sample_size=64, cross_attention_dim=768)  # the rest of UNet2DConditionModel's defaults are SD 1.5's
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2, sample_size=512,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)

CAPTIONS = (
    "a photo of a red cup on a wooden table next to a window", "a dog running on the beach at sunset",
    "an oil painting of a small house in the snow", "a bowl of apples and pears on a kitchen counter",
    "a man riding a bicycle through a busy city street", "a cat sleeping on a blue sofa in a living room",
    "a sailing boat on a calm lake with mountains behind it", "a bird sitting on the branch of an old tree",
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--resolution", type=int, default=256, help="Stable Diffusion image side. Default: 256.")
    parser.add_argument("--steps", type=int, default=2, help="Denoising steps per image pair. Default: 2.")
    parser.add_argument("--pairs", type=int, default=1, help="Image pairs per denoising batch. Default: 1.")
    parser.add_argument("--num_seeds", type=int, default=4, help="Image pairs per caption triplet (estimate).")
    parser.add_argument("--llm", choices=sorted(OPT), default="opt-125m")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="LLM / VLM tokens per answer. Default: 32.")
    parser.add_argument("--batch_size", type=int, default=2, help="Captions / pairs per LLM, VLM, CLIP call.")
    parser.add_argument("--vocabulary", type=int, default=4096, help="Terms in the band search. Default: 4096.")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
    parser.add_argument("--stages", nargs="+", default=["keyword", "llm", "image_pairs", "filters", "masks", "mtst"])
    parser.add_argument("--machine_label", default=None, help="Results folder name. Default: from the hardware.")
    parser.add_argument("--quick", action="store_true", help="Tiny models, one repeat (smoke test of this script).")
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def hardware(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "processor": _cpu_name(),
            "load_average_at_start": os.getloadavg()}  # a shared machine: other processes' load skews every number
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def machine_label(info: dict) -> str:
    if "gpu" in info:
        return info["gpu"].lower().replace("nvidia ", "").replace(" ", "-")
    name = info["processor"].lower().replace("(r)", "").replace("(tm)", "")
    return "-".join(name.split()[:2]) + f"-{info['cpu_count']}core"  # e.g. amd-epyc-2core


def timed(function, repeats: int, device) -> float:
    """Median seconds of ``function()`` over ``repeats`` runs after one warm-up."""
    function()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _free(*objects) -> None:
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _clip(args, device):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from diffusers_cir.utils import build_offline_clip_tokenizer

    text, vision = (dict(CLIP_L14_TEXT, **TINY), dict(CLIP_L14_VISION, **TINY)) if args.quick \
        else (CLIP_L14_TEXT, CLIP_L14_VISION)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)).to(device).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=build_offline_clip_tokenizer())
    return model, processor


def _images(count: int, size: int):
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(size, size, 3, generator=generator) * 255).byte().numpy())
            for _ in range(count)]


# --------------------------------------------------------------------------------------------- stages
def bench_keyword(args, device, rows):
    import numpy as np

    from diffusers_cir.generation.keyword_triplets import (
        KeywordVocabulary,
        band_candidates,
        encode_terms,
        make_keyword_triplet,
    )
    from diffusers_cir.text.keywords import RuleBasedKeywordExtractor

    tagger = RuleBasedKeywordExtractor()
    captions = list(CAPTIONS) * 64
    terms = sorted({t for c in CAPTIONS for t in c.split() if len(t) > 3})
    vocabulary = KeywordVocabulary(terms, [1] * len(terms), {t: [(u, 0.6) for u in terms if u != t] for t in terms})
    seconds = timed(lambda: [make_keyword_triplet(c, tagger, vocabulary, np.random.default_rng(i))
                             for i, c in enumerate(captions)], args.repeats, device)
    rows.append(("keyword", "tag + keyword triplet (builtin tagger)", len(captions) / seconds, "captions/s"))
    model, processor = _clip(args, device)
    words = [f"term{i}" for i in range(min(args.vocabulary, 256))]
    seconds = timed(lambda: encode_terms(model, processor, words, batch_size=256, device=device), args.repeats, device)
    rows.append(("keyword", "CLIP ViT-L/14 text features of terms", len(words) / seconds, "terms/s"))
    embeddings = torch.nn.functional.normalize(torch.randn(args.vocabulary, 768, device=device), dim=-1)
    names = [f"t{i}" for i in range(args.vocabulary)]
    seconds = timed(lambda: band_candidates(names, embeddings, (0.05, 0.07), 64), args.repeats, device)
    rows.append(("keyword", f"band search over {args.vocabulary} terms", args.vocabulary / seconds, "terms/s"))
    _free(model)


def bench_llm(args, device, rows):
    from transformers import OPTConfig, OPTForCausalLM

    from diffusers_cir.generation import tiny

    tokenizer = tiny.tiny_byte_level_tokenizer()
    quick = dict(hidden_size=64, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4)
    shape = quick if args.quick else OPT[args.llm]
    config = OPTConfig(vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=shape["hidden_size"],
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, **shape)
    model = OPTForCausalLM(config).to(device, getattr(torch, args.dtype)).eval()
    tokenizer.padding_side = "left"
    prompts = [c + "\n##\n" for c in CAPTIONS[: args.batch_size]]

    def sample():
        inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
        with torch.inference_mode():
            model.generate(**inputs, do_sample=True, top_p=0.9, max_new_tokens=args.max_new_tokens,
                           min_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)

    seconds = timed(sample, args.repeats, device)
    rows.append(("llm", f"{args.llm} sampling, {args.max_new_tokens} new tokens", len(prompts) / seconds, "captions/s"))
    _free(model)


def _stable_diffusion(args, device):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffusers_cir.generation import tiny
    from diffusers_cir.utils import build_offline_clip_tokenizer

    if args.quick:
        return tiny.tiny_stable_diffusion_pipeline().to(device)
    dtype = getattr(torch, args.dtype)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**SD15_UNET), vae=AutoencoderKL(**SD15_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L14_TEXT)), tokenizer=build_offline_clip_tokenizer(),
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bench_image_pairs(args, device, rows):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from diffusers_cir.generation.config import ImagePairConfig
    from diffusers_cir.generation.image_pairs import PairRequest, draw_image_pairs, image_size

    pipe = _stable_diffusion(args, device)
    size = 32 if args.quick else args.resolution
    config = ImagePairConfig(num_inference_steps=args.steps, batch_size=args.pairs, height=size, width=size)
    requests = [PairRequest(CAPTIONS[i % 8], CAPTIONS[(i + 1) % 8], seed=i, self_replace=0.5)
                for i in range(args.pairs)]
    p2p = timed(lambda: draw_image_pairs(pipe, requests, config), args.repeats, device)
    height, width = image_size(pipe, config)

    def plain():  # diffusers' own processor, same pairs as one batch of prompts
        pipe.unet.set_attn_processor(AttnProcessor2_0())
        prompts = [t for r in requests for t in (r.reference_caption, r.target_caption)]
        pipe(prompt=prompts, num_inference_steps=args.steps, height=height, width=width, output_type="pil",
             generator=torch.Generator("cpu").manual_seed(0))

    baseline = timed(plain, args.repeats, device)
    label = f"SD 1.5 {height}px, {args.steps} steps, {args.pairs} pair(s)/batch"
    rows.append(("image pairs", f"{label}, Prompt-to-Prompt", args.pairs / p2p, "pairs/s"))
    rows.append(("image pairs", f"{label}, diffusers' processor (baseline)", args.pairs / baseline, "pairs/s"))
    rows.append(("image pairs", "Prompt-to-Prompt time / baseline time", p2p / baseline, "ratio"))
    _free(pipe)


def bench_filters(args, device, rows):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    from diffusers_cir.generation.filters import compute_clip_scores, nsfw_flags
    from diffusers_cir.generation.records import Candidate

    model, processor = _clip(args, device)
    images = _images(2 * args.batch_size, 256)
    candidates = [Candidate("keyword", i, 0, images[2 * i], images[2 * i + 1], "replace cup with vase",
                            CAPTIONS[i % 8], CAPTIONS[(i + 1) % 8], "cup", "vase") for i in range(args.batch_size)]
    seconds = timed(lambda: compute_clip_scores(model, processor, candidates, batch_size=32, device=device),
                    args.repeats, device)
    rows.append(("filters", "CLIP ViT-L/14 scores (2 images, 5 texts)", len(candidates) / seconds, "pairs/s"))
    _free(model)
    vision = dict(CLIP_L14_VISION, **TINY) if args.quick else CLIP_L14_VISION
    checker = StableDiffusionSafetyChecker(CLIPConfig(text_config=CLIP_L14_TEXT, vision_config=vision,
                                                      projection_dim=768)).to(device).eval()
    seconds = timed(lambda: nsfw_flags(checker, CLIPImageProcessor(), images, device=device), args.repeats, device)
    rows.append(("filters", "NSFW safety checker (ViT-L/14)", len(images) / seconds, "images/s"))
    _free(checker)


def bench_masks(args, device, rows):
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessor

    from diffusers_cir.generation.masks import clipseg_masks
    from diffusers_cir.utils import build_offline_clip_tokenizer

    text, vision = (dict(CLIP_B16_TEXT, **TINY), dict(CLIP_B16_VISION, **TINY)) if args.quick \
        else (CLIP_B16_TEXT, CLIP_B16_VISION)
    model = CLIPSegForImageSegmentation(CLIPSegConfig(text_config=text, vision_config=vision, projection_dim=512,
                                                      reduce_dim=64, extract_layers=[0, 1] if args.quick
                                                      else [3, 6, 9])).to(device).eval()
    processor = CLIPSegProcessor(image_processor=ViTImageProcessor(size={"height": 352, "width": 352},
                                                                   image_mean=[0.485, 0.456, 0.406],
                                                                   image_std=[0.229, 0.224, 0.225]),
                                 tokenizer=build_offline_clip_tokenizer())
    images = _images(args.batch_size, 256)
    seconds = timed(lambda: clipseg_masks(model, processor, images, ["vase"] * len(images)), args.repeats, device)
    rows.append(("masks", "ClipSeg rd64 (ViT-B/16), 64x64", len(images) / seconds, "masks/s"))
    _free(model)


def bench_mtst(args, device, rows):
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from diffusers_cir.generation import tiny
    from diffusers_cir.generation.config import PairTextConfig
    from diffusers_cir.generation.pair_texts import mtst_texts

    if args.quick:
        model, processor = tiny.tiny_vision_language_model()
    else:
        tokenizer = tiny.tiny_byte_level_tokenizer()
        vision = dict(CLIP_L14_VISION, image_size=336)
        config = LlavaConfig(vision_config=CLIPVisionConfig(**vision),
                             text_config=LlamaConfig(**QWEN2_05B, pad_token_id=tokenizer.pad_token_id,
                                                     eos_token_id=tokenizer.eos_token_id),
                             image_token_id=tokenizer.convert_tokens_to_ids(tiny.IMAGE_TOKEN),
                             vision_feature_layer=-2, vision_feature_select_strategy="default")
        model = LlavaForConditionalGeneration(config).to(device, getattr(torch, args.dtype)).eval()
        processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 336},
                                                                      crop_size={"height": 336, "width": 336}),
                                   tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1, chat_template=tiny._CHAT_TEMPLATE)
    model.generation_config.min_new_tokens = args.max_new_tokens  # random weights: force the full answer length
    images = _images(2 * args.batch_size, 256)
    pairs = [(images[2 * i], images[2 * i + 1]) for i in range(args.batch_size)]
    config = PairTextConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    seconds = timed(lambda: mtst_texts(model, processor, pairs, config), args.repeats, device)
    rows.append(("mtst", f"LLaVA-1.5-shaped (ViT-L/14-336 + 0.5B LM), forward + reverse, {args.max_new_tokens} "
                 "tokens each", len(pairs) / seconds, "pairs/s"))
    _free(model)


def estimate(rows, num_seeds: int) -> float | None:
    """Keyword triplets per hour per device: caption step + num_seeds x (image pair + CLIP scores + 2 NSFW images) +
    one mask, before any filter drops anything."""
    rate = {(stage, unit): value for stage, name, value, unit in rows if "baseline" not in name and unit != "ratio"}
    try:
        seconds = (1 / rate[("keyword", "captions/s")]
                   + num_seeds * (1 / rate[("image pairs", "pairs/s")] + 1 / rate[("filters", "pairs/s")]
                                  + 2 / rate[("filters", "images/s")])
                   + 1 / rate[("masks", "masks/s")])
    except KeyError:
        return None
    return 3600 / seconds


def write_result(path: str, args, info: dict, label: str, rows: list, seconds: dict) -> dict:
    result = {
        "benchmark": "bench_generation", "hardware": info, "machine_label": label,
        "settings": {k: v for k, v in vars(args).items() if k not in ("output_json",)},
        "results": [{"stage": s, "what": n, "value": v, "unit": u} for s, n, v, u in rows],
        "stage_wall_seconds": seconds,  # model building, warm-up and every repeat
        "load_average_now": os.getloadavg(),
        "keyword_triplets_per_hour_estimate": estimate(rows, args.num_seeds),
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    info = hardware(device)
    label = args.machine_label or machine_label(info)
    # --quick runs stay local (results/tiny/ is ignored); full-size results go under the machine's label
    output = args.output_json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                              "tiny" if args.quick else label, f"generation_{device.type}.json")
    rows: list[tuple] = []
    seconds: dict[str, float] = {}
    benches = {"keyword": bench_keyword, "llm": bench_llm, "image_pairs": bench_image_pairs,
               "filters": bench_filters, "masks": bench_masks, "mtst": bench_mtst}
    for stage in args.stages:
        started = time.perf_counter()
        benches[stage](args, device, rows)
        seconds[stage] = round(time.perf_counter() - started, 1)
        print(f"[{stage}: {seconds[stage]:.0f} s] " + "; ".join(f"{n}: {v:.4g} {u}" for s, n, v, u in rows
                                                              if s.replace(" ", "_") == stage), file=sys.stderr)
        result = write_result(output, args, info, label, rows, seconds)  # after every stage: a long run keeps its part
    print(f"\n{'stage':<12} {'what':<72} {'value':>12}  unit")
    for stage, name, value, unit in rows:
        print(f"{stage:<12} {name:<72} {value:>12.4g}  {unit}")
    per_hour = result["keyword_triplets_per_hour_estimate"]
    if per_hour is not None:
        print(f"\nestimate: {per_hour:,.0f} keyword triplets per hour per {args.device} device "
              f"({args.num_seeds} pairs per triplet, before filtering)")
    print(f"wrote {output}")
    return result


if __name__ == "__main__":
    main()
