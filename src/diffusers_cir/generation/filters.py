# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Stage 4: the CLIP filters of SynthTriplets18M and the NSFW filter, with counts kept per filter.

CompoDiff's appendix ("Filtering process") keeps a generated triplet when, with CLIP:

* ``image_caption``: each image matches its own caption (>= 0.2);
* ``image_image``: reference and target images are similar (>= 0.70);
* ``directional``: the change between the images points the way the change between the captions does (>= 0.2;
  cosine of ``target_image - reference_image`` with ``target_caption - reference_caption``, as InstructPix2Pix);
* ``keyword_image`` (keyword triplets): the images contain their keyword (>= 0.20; read here as the reference image
  against the source keyword and the target image against the target keyword, both);
* ``instruction_image`` (LLM triplets): the target image agrees with the instruction (>= 0.20);

then, here, an NSFW filter: diffusers' ``StableDiffusionSafetyChecker`` on both images (the arXiv appendix's filtering
paragraph names only the five CLIP filters; generated images need one all the same). Filters run in that order; a
candidate is counted against the first filter it fails, so the counts read as a funnel. Scores are recorded in the
output rows (columns ``clip_*``), so a dataset can be re-filtered later with stricter thresholds.

Example:
    >>> from diffusers_cir.generation.config import FilterConfig
    >>> from diffusers_cir.generation.filters import applicable_filters
    >>> applicable_filters("keyword", FilterConfig())
    ['image_caption', 'image_image', 'directional', 'keyword_image', 'nsfw']
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .config import CAPTION_STRATEGIES, FilterConfig
from .records import Candidate

FILTER_ORDER = ("image_caption", "image_image", "directional", "keyword_image", "instruction_image", "nsfw")
# Score names (columns clip_<name> of the output rows).
SCORE_NAMES = (
    "image_image", "reference_caption", "target_caption", "directional", "source_keyword", "target_keyword",
    "instruction",
)


def _pooled(output):
    """Projected features from ``get_*_features``: a tensor (transformers 4) or an output's ``pooler_output`` (5)."""
    return output if hasattr(output, "ndim") else output.pooler_output


def _model_device_dtype(model, device=None):
    parameter = next(model.parameters())
    return (device or parameter.device), parameter.dtype


def encode_texts(model, processor, texts: Sequence[str], batch_size: int = 64, device=None, progress: bool = False,
                 description: str = "encoding texts"):
    """L2-normalised CLIP text features ``[N, D]`` (float32, on the model's device); texts truncated to the tower's
    length."""
    import torch
    from tqdm.auto import tqdm

    device, _ = _model_device_dtype(model, device)
    tokenizer = getattr(processor, "tokenizer", processor)
    chunks = []
    for start in tqdm(range(0, len(texts), batch_size), desc=description, disable=not progress):
        batch = tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            features = _pooled(model.get_text_features(input_ids=batch["input_ids"].to(device),
                                                       attention_mask=batch["attention_mask"].to(device)))
        chunks.append(torch.nn.functional.normalize(features.float(), dim=-1))
    if not chunks:
        return torch.zeros(0, model.config.projection_dim, device=device)
    return torch.cat(chunks)


def encode_images(model, processor, images: Sequence, batch_size: int = 32, device=None):
    """L2-normalised CLIP image features ``[N, D]`` (float32, on the model's device) of PIL images."""
    import torch

    device, dtype = _model_device_dtype(model, device)
    image_processor = getattr(processor, "image_processor", processor)
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = image_processor(images=list(images[start : start + batch_size]), return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            features = _pooled(model.get_image_features(pixel_values=pixels.to(device, dtype)))
        chunks.append(torch.nn.functional.normalize(features.float(), dim=-1))
    return torch.cat(chunks)


def _cosine(a, b):
    import torch

    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def _text_scores(model, processor, texts: list[str | None], images, batch_size, device):
    """Cosine of each image with its text; NaN where the text is None."""
    import torch

    scores = torch.full((len(texts),), float("nan"))
    present = [i for i, text in enumerate(texts) if text]
    if present:
        features = encode_texts(model, processor, [texts[i] for i in present], batch_size, device)
        scores[present] = _cosine(images[present], features).cpu()
    return scores


def compute_clip_scores(model, processor, candidates: Sequence[Candidate], batch_size: int = 32, device=None) -> None:
    """Fill ``candidate.scores`` with every CLIP score its texts allow (see :data:`SCORE_NAMES`)."""
    import torch

    if not candidates:
        return
    references = encode_images(model, processor, [c.reference_image for c in candidates], batch_size, device)
    targets = encode_images(model, processor, [c.target_image for c in candidates], batch_size, device)
    scores = {"image_image": _cosine(references, targets).cpu()}
    reference_captions = [c.reference_caption for c in candidates]
    target_captions = [c.target_caption for c in candidates]
    scores["reference_caption"] = _text_scores(model, processor, reference_captions, references, batch_size, device)
    scores["target_caption"] = _text_scores(model, processor, target_captions, targets, batch_size, device)
    both = [i for i, c in enumerate(candidates) if c.reference_caption and c.target_caption]
    scores["directional"] = torch.full((len(candidates),), float("nan"))
    if both:
        captions = encode_texts(model, processor, [reference_captions[i] for i in both] + [target_captions[i] for i in
                                                                                         both], batch_size, device)
        caption_change = captions[len(both):] - captions[: len(both)]
        scores["directional"][both] = _cosine(targets[both] - references[both], caption_change).cpu()
    scores["source_keyword"] = _text_scores(model, processor, [c.source_keyword for c in candidates], references,
                                            batch_size, device)
    scores["target_keyword"] = _text_scores(model, processor, [c.target_keyword for c in candidates], targets,
                                            batch_size, device)
    scores["instruction"] = _text_scores(model, processor, [c.modification_text for c in candidates], targets,
                                         batch_size, device)
    for index, candidate in enumerate(candidates):
        candidate.scores.update({name: float(values[index]) for name, values in scores.items()
                                 if not torch.isnan(values[index])})


def nsfw_flags(checker, feature_extractor, images: Sequence, batch_size: int = 32, device=None) -> list[bool]:
    """Whether diffusers' ``StableDiffusionSafetyChecker`` flags each PIL image."""
    import torch

    device, dtype = _model_device_dtype(checker, device)
    flags: list[bool] = []
    for start in range(0, len(images), batch_size):
        batch = list(images[start : start + batch_size])
        pixels = feature_extractor(images=batch, return_tensors="pt")["pixel_values"].to(device, dtype)
        placeholders = [np.zeros((1, 1, 3), dtype=np.float32) for _ in batch]  # the checker blanks flagged ones
        with torch.inference_mode():
            _, has_nsfw = checker(clip_input=pixels, images=placeholders)
        flags.extend(bool(flag) for flag in has_nsfw)
    return flags


def applicable_filters(method: str, config: FilterConfig) -> list[str]:
    """The filters a triplet of ``method`` goes through, in order (a threshold of None turns a filter off).

    Generated pairs (keyword, llm) get the paper's filters; given pairs (mtst, facap) only the NSFW filter unless
    ``filter_given_pairs``, and then only the CLIP filters their texts allow.
    """
    generated = method in CAPTION_STRATEGIES
    use_clip = generated or config.filter_given_pairs
    has_captions = method in ("keyword", "llm", "facap")
    wanted = {
        "image_caption": use_clip and has_captions,
        "image_image": use_clip,
        "directional": use_clip and has_captions,
        "keyword_image": use_clip and method == "keyword",
        "instruction_image": use_clip and (method == "llm" or not generated),
    }
    names = [name for name in FILTER_ORDER[:-1] if wanted[name] and getattr(config, name) is not None]
    return names + (["nsfw"] if config.nsfw else [])


def passes(candidate: Candidate, name: str, config: FilterConfig) -> bool:
    """Whether ``candidate`` passes CLIP filter ``name`` (its scores must be computed)."""
    threshold = getattr(config, name)
    scores = candidate.scores
    if name == "image_caption":
        return scores["reference_caption"] >= threshold and scores["target_caption"] >= threshold
    if name == "image_image":
        return scores["image_image"] >= threshold
    if name == "directional":
        return scores["directional"] >= threshold
    if name == "keyword_image":
        return scores["source_keyword"] >= threshold and scores["target_keyword"] >= threshold
    if name == "instruction_image":
        return scores["instruction"] >= threshold
    raise AssertionError(f"not a CLIP filter: {name}")


def apply_filters(
    candidates: Sequence[Candidate], method: str, config: FilterConfig, nsfw=None
) -> tuple[list[Candidate], dict[str, dict[str, int]]]:
    """The candidates that pass every applicable filter, and ``{filter: {"in": n, "kept": k}}`` in filter order.

    ``nsfw(images) -> [bool]`` flags images (both images of every candidate still in); it must be given when the NSFW
    filter applies.
    """
    counts: dict[str, dict[str, int]] = {}
    remaining = list(candidates)
    for name in applicable_filters(method, config):
        before = len(remaining)
        if name == "nsfw":
            if nsfw is None:
                raise ValueError("The NSFW filter is on but no safety checker was given: load one, or turn it off "
                                 "(FilterConfig(nsfw=False), CLI --no-nsfw-filter).")
            flags = nsfw([c.reference_image for c in remaining] + [c.target_image for c in remaining]) if remaining \
                else []
            half = len(remaining)
            remaining = [c for i, c in enumerate(remaining) if not (flags[i] or flags[half + i])]
        else:
            remaining = [c for c in remaining if passes(c, name, config)]
        counts[name] = {"in": before, "kept": len(remaining)}
    return remaining, counts
