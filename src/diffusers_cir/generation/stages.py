# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""One chunk of items through every stage: caption triplets -> image pairs -> filters -> masks (caption strategies),
or pair texts -> filters (given image pairs). The runner (:mod:`.runner`) cuts shards into chunks and writes rows.

Everything random about an item is drawn from generators seeded by ``(seed, strategy, item index, stage)``
(:func:`item_rng`), and batched samplers are seeded by the first item of their chunk, so the rows of an item do not
depend on the process that makes them or on what ran before.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from .filters import applicable_filters, apply_filters, compute_clip_scores, nsfw_flags
from .image_pairs import PairRequest, draw_image_pairs
from .records import Candidate

_STRATEGY_CODES = {"keyword": 1, "llm": 2, "mtst": 3, "facap": 4}
_STAGE_CODES = {"caption": 1, "image": 2, "text": 3}


def item_rng(seed: int, strategy: str, index: int, stage: str) -> np.random.Generator:
    """The generator of one item's draws in one stage."""
    return np.random.default_rng(np.random.SeedSequence([seed, _STRATEGY_CODES[strategy], index, _STAGE_CODES[stage]]))


def item_seed(seed: int, strategy: str, index: int, stage: str) -> int:
    """A 31-bit seed for one item (or the batch an item starts) in one stage."""
    sequence = np.random.SeedSequence([seed, _STRATEGY_CODES[strategy], index, _STAGE_CODES[stage]])
    return int(sequence.generate_state(1, np.uint32)[0] >> 1)


@dataclass
class ChunkResult:
    """Candidates that became rows, counts per stage and filter, and seconds per stage."""

    kept: list[Candidate] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


class _Timer:
    def __init__(self, seconds: dict, name: str):
        self.seconds, self.name = seconds, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.seconds[self.name] = self.seconds.get(self.name, 0.0) + time.perf_counter() - self.start


def _caption_triplets(context, strategy: str, captions: list[str], start: int) -> list[tuple[int, Any]]:
    config, parts = context.config, context.components
    present = [(start + i, caption) for i, caption in enumerate(captions) if caption]
    if strategy == "keyword":
        from .keyword_triplets import make_keyword_triplet

        made = [(index, make_keyword_triplet(caption, parts.tagger, context.vocabulary,
                                             item_rng(config.seed, strategy, index, "caption")))
                for index, caption in present]
    else:
        from .llm_triplets import sample_caption_triplets

        sampled = sample_caption_triplets(parts.caption_editor, parts.caption_editor_tokenizer,
                                          [c for _, c in present], config.llm,
                                          seed=item_seed(config.seed, strategy, start, "caption"))
        made = [(index, triplet) for (index, _), triplet in zip(present, sampled)]
    return [(index, triplet) for index, triplet in made if triplet is not None]


def _image_candidates(context, strategy: str, triplets: list[tuple[int, Any]]) -> list[Candidate]:
    """Every seed's image pair of every triplet, drawn with the generator the item drew."""
    config, pipelines = context.config, context.components.image_pipelines
    names = list(pipelines)
    low, high = config.image.self_replace_range
    planned = []  # (generator name, candidate without images, request)
    for index, triplet in triplets:
        rng = item_rng(config.seed, strategy, index, "image")
        name = names[int(rng.integers(len(names)))]
        for sample in range(config.image.num_seeds):
            seed, self_replace = int(rng.integers(2**31 - 1)), float(rng.uniform(low, high))
            request = PairRequest(triplet.reference_caption, triplet.target_caption, seed, self_replace,
                                  config.image.cross_replace)
            candidate = Candidate(
                strategy=strategy, item_index=index, sample_index=sample, reference_image=None, target_image=None,
                modification_text=triplet.modification_text, reference_caption=triplet.reference_caption,
                target_caption=triplet.target_caption, source_keyword=triplet.source_keyword,
                target_keyword=triplet.target_keyword, template_index=triplet.template_index, generator=name,
                seed=seed, cross_replace=config.image.cross_replace, self_replace=self_replace,
            )
            planned.append((name, candidate, request))
    for name in names:  # one pipeline's requests together; each keeps its own seed, so the grouping changes nothing
        mine = [(c, r) for n, c, r in planned if n == name]
        if mine:
            images = draw_image_pairs(pipelines[name], [r for _, r in mine], config.image)
            for (candidate, _), (reference, target) in zip(mine, images):
                candidate.reference_image, candidate.target_image = reference, target
    return [candidate for _, candidate, _ in planned]


def _filter(context, strategy: str, candidates: list[Candidate], result: ChunkResult) -> list[Candidate]:
    config, parts = context.config, context.components
    clip_filters = [name for name in applicable_filters(strategy, config.filters) if name != "nsfw"]
    if parts.clip_model is not None and (clip_filters or strategy in ("keyword", "llm")):
        compute_clip_scores(parts.clip_model, parts.clip_processor, candidates, config.filters.batch_size)
    nsfw = None
    if config.filters.nsfw:
        nsfw = partial(nsfw_flags, parts.safety_checker, parts.safety_feature_extractor,
                       batch_size=config.filters.batch_size)
    kept, counts = apply_filters(candidates, strategy, config.filters, nsfw)
    result.counts["filters"] = counts
    return kept


def _best_per_item(candidates: list[Candidate], keep: int) -> list[Candidate]:
    """Per item, the ``keep`` candidates with the highest directional similarity (then the lowest seed index)."""
    by_item: dict[int, list[Candidate]] = {}
    for candidate in candidates:
        by_item.setdefault(candidate.item_index, []).append(candidate)
    best = []
    for index in sorted(by_item):
        ranked = sorted(by_item[index], key=lambda c: (-c.scores.get("directional", float("-inf")), c.sample_index))
        best.extend(sorted(ranked[:keep], key=lambda c: c.sample_index))
    return best


def caption_chunk(context, strategy: str, start: int, stop: int) -> ChunkResult:
    """Items ``[start, stop)`` of a caption strategy through every stage."""
    config, parts = context.config, context.components
    result = ChunkResult()
    captions = context.sources[strategy].texts(start, stop)
    present = sum(1 for caption in captions if caption)
    result.counts["items"] = len(captions)
    result.counts["empty_inputs"] = len(captions) - present
    with _Timer(result.seconds, "caption triplets"):
        triplets = _caption_triplets(context, strategy, captions, start)
    result.counts["caption_triplets"] = {"in": present, "kept": len(triplets)}
    context.advance("caption triplets", len(captions))
    with _Timer(result.seconds, "image pairs"):
        candidates = _image_candidates(context, strategy, triplets)
    result.counts["image_pairs"] = len(candidates)
    context.advance("image pairs", len(captions))
    with _Timer(result.seconds, "filters"):
        kept = _filter(context, strategy, candidates, result)
        best = _best_per_item(kept, config.image.keep_per_triplet)
    result.counts["best_per_triplet"] = {"in": len(kept), "kept": len(best)}
    context.advance("filters", len(captions))
    if config.masks.enabled:
        from .masks import add_masks

        with _Timer(result.seconds, "masks"):
            add_masks(parts.clipseg_model, parts.clipseg_processor, best, config.masks.size, config.masks.threshold,
                      config.masks.batch_size)
        result.counts["masks"] = {"in": len(best), "kept": sum(1 for c in best if c.mask is not None)}
        context.advance("masks", len(captions))
    result.kept = best
    return result


def pair_chunk(context, strategy: str, start: int, stop: int) -> ChunkResult:
    """Image pairs ``[start, stop)`` through the text stage (MTST or FACap) and the filters."""
    from .pair_texts import facap_texts, mtst_texts

    config, parts = context.config, context.components
    result = ChunkResult()
    source = context.sources[strategy]
    with _Timer(result.seconds, "read images"):
        pairs = source.images(start, stop)
    result.counts["items"] = len(pairs)
    seed = item_seed(config.seed, strategy, start, "text")
    with _Timer(result.seconds, "pair texts"):
        if strategy == "mtst":
            texts = [(None, None, forward, reverse) for forward, reverse in
                     mtst_texts(parts.vlm, parts.vlm_processor, pairs, config.pairs, seed)]
        else:
            texts = [(ref, tgt, text, None) for ref, tgt, text in facap_texts(
                parts.vlm, parts.vlm_processor, parts.instruction_llm, parts.instruction_llm_tokenizer, pairs,
                config.pairs, seed)]
    generator = f"given pairs ({parts.names.get('vlm', 'vlm')})"
    candidates = [
        Candidate(strategy=strategy, item_index=start + i, sample_index=0, reference_image=reference,
                  target_image=target, modification_text=text, reference_caption=ref_caption or None,
                  target_caption=tgt_caption or None, reverse_modification_text=reverse or None, generator=generator)
        for i, ((reference, target), (ref_caption, tgt_caption, text, reverse)) in enumerate(zip(pairs, texts))
        if text
    ]
    result.counts["pair_texts"] = {"in": len(pairs), "kept": len(candidates)}
    context.advance("pair texts", len(pairs))
    with _Timer(result.seconds, "filters"):
        result.kept = _filter(context, strategy, candidates, result)
    context.advance("filters", len(pairs))
    return result
