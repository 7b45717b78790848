# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Triplet generation: the SynthTriplets18M recipe (CompoDiff), MTST and FACap-style annotation, at scale.

One module per stage, plain functions over small dataclasses (:mod:`.config`):

1. :mod:`.keyword_triplets`: keyword caption triplets (POS tagger, CLIP band, the 47 :mod:`.templates`);
2. :mod:`.llm_triplets`: caption triplets sampled from a causal LM (:mod:`.finetune` trains one with LoRA);
3. :mod:`.image_pairs`: Stable Diffusion image pairs with Prompt-to-Prompt (:mod:`.prompt_to_prompt`);
4. :mod:`.filters`: the five CLIP filters and the NSFW filter, counted per filter;
5. :mod:`.masks`: ClipSeg masks of the changed term at 64x64;
6. :mod:`.pair_texts`: MTST and FACap texts for given image pairs (:mod:`.sources` reads them);
7. :mod:`.output`: Parquet shards in the SynthTriplets layout and the dataset card;
8. :mod:`.runner`: shards over accelerate processes, resume, lock, progress, throughput;
9. :mod:`.contact_sheet`: an HTML page of generated triplets.

:mod:`.tiny` builds tiny random versions of every model in code (tests, ``diffusers-cir generate --demo``).

Example:
    >>> from diffusers_cir.generation import GenerationConfig, load_components, run_generation
    >>> config = GenerationConfig(strategies=("keyword",), captions="captions.txt", items_per_shard=500)
    >>> result = run_generation(config, load_components(config, {}), "my_triplets")  # doctest: +SKIP
    >>> print(result.format())  # doctest: +SKIP
"""

from __future__ import annotations

from .._lazy import lazy_names

_LAZY_NAMES = {
    "GenerationConfig": "config",
    "KeywordConfig": "config",
    "LLMConfig": "config",
    "ImagePairConfig": "config",
    "FilterConfig": "config",
    "MaskConfig": "config",
    "PairTextConfig": "config",
    "KEYWORD_TEMPLATES": "templates",
    "fill_template": "templates",
    "draw_instruction": "templates",
    "CaptionTriplet": "records",
    "Candidate": "records",
    "KeywordVocabulary": "keyword_triplets",
    "build_keyword_vocabulary": "keyword_triplets",
    "make_keyword_triplet": "keyword_triplets",
    "sample_caption_triplets": "llm_triplets",
    "load_caption_editor": "llm_triplets",
    "FinetuneConfig": "finetune",
    "finetune_caption_editor": "finetune",
    "PromptToPromptAttnProcessor": "prompt_to_prompt",
    "PromptToPromptController": "prompt_to_prompt",
    "apply_prompt_to_prompt": "prompt_to_prompt",
    "PairRequest": "image_pairs",
    "draw_image_pairs": "image_pairs",
    "apply_filters": "filters",
    "compute_clip_scores": "filters",
    "nsfw_flags": "filters",
    "clipseg_masks": "masks",
    "mtst_texts": "pair_texts",
    "facap_texts": "pair_texts",
    "load_captions": "sources",
    "load_image_pairs": "sources",
    "GenerationComponents": "components",
    "load_components": "components",
    "GenerationResult": "runner",
    "run_generation": "runner",
    "write_contact_sheet": "contact_sheet",
    "tiny_components": "tiny",
    "run_demo": "demo",
}

__all__ = sorted(_LAZY_NAMES)


__getattr__, __dir__ = lazy_names(__name__, {name: f".{module}" for name, module in _LAZY_NAMES.items()}, globals())
