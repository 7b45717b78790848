# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""The models a generation run uses, loaded once per process (:func:`load_components`) or built tiny in code
(:func:`diffusers_cir.generation.tiny_components`).

Only what the run's strategies and stages need is loaded: the CLIP model for the keyword band and the filters, one or
more Stable Diffusion pipelines for image pairs, diffusers' safety checker for the NSFW filter, ClipSeg for masks, the
caption-editing LM for LLM triplets, and a vision-language model (plus an instruction LM for FACap) for given pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import CAPTION_STRATEGIES, GenerationConfig

DEFAULT_MODELS = {
    "clip": "openai/clip-vit-large-patch14",
    "stable_diffusion": ["stable-diffusion-v1-5/stable-diffusion-v1-5"],
    "safety_checker": "CompVis/stable-diffusion-safety-checker",
    "clipseg": "CIDAS/clipseg-rd64-refined",
}


@dataclass
class GenerationComponents:
    """Loaded models; ``names`` says which (recorded in the dataset card)."""

    clip_model: Any = None
    clip_processor: Any = None
    image_pipelines: dict[str, Any] = field(default_factory=dict)  # name -> StableDiffusionPipeline
    safety_checker: Any = None
    safety_feature_extractor: Any = None
    clipseg_model: Any = None
    clipseg_processor: Any = None
    caption_editor: Any = None
    caption_editor_tokenizer: Any = None
    vlm: Any = None
    vlm_processor: Any = None
    instruction_llm: Any = None
    instruction_llm_tokenizer: Any = None
    tagger: Any = None
    names: dict[str, Any] = field(default_factory=dict)

    def check_for(self, config: GenerationConfig) -> None:
        """Refuse a run whose stages need a model that is not here, naming it and the command-line flag."""
        needs = []
        strategies = set(config.strategies)
        generated = strategies & set(CAPTION_STRATEGIES)
        if "keyword" in strategies or generated or config.filters.filter_given_pairs:
            needs.append(("clip_model", "a CLIP model (--clip-model)"))
        if generated:
            needs.append(("image_pipelines", "a Stable Diffusion pipeline (--sd-model)"))
        if config.filters.nsfw:
            needs.append(("safety_checker", "a safety checker (--safety-checker), or --no-nsfw-filter"))
        if config.masks.enabled and generated:
            needs.append(("clipseg_model", "a ClipSeg model (--clipseg-model), or --no-masks"))
        if "llm" in strategies:
            needs.append(("caption_editor", "a caption-editing causal LM (--caption-editor)"))
        if strategies & {"mtst", "facap"}:
            needs.append(("vlm", "a vision-language model (--vlm)"))
        if "facap" in strategies:
            needs.append(("instruction_llm", "an instruction LM for FACap (--instruction-llm)"))
        if "keyword" in strategies:
            needs.append(("tagger", "a part-of-speech tagger"))
        missing = [what for name, what in needs if not getattr(self, name)]
        if missing:
            raise ValueError(f"Strategies {list(config.strategies)} need {'; '.join(missing)}.")


def _dtype(name: str | None):
    import torch

    return None if name in (None, "auto") else {"float32": torch.float32, "float16": torch.float16,
                                                "bfloat16": torch.bfloat16}[name]


def load_components(config: GenerationConfig, models: dict[str, Any], device=None, torch_dtype: str | None = None
                    ) -> GenerationComponents:
    """Load what ``config`` needs from ``models`` (names or folders; see :data:`DEFAULT_MODELS` for the keys:
    ``clip``, ``stable_diffusion`` (a list), ``safety_checker``, ``clipseg``, ``caption_editor``,
    ``caption_editor_adapter``, ``vlm``, ``instruction_llm``, ``tagger``, ``spacy_model``), onto ``device``.

    ``torch_dtype`` (``float16``, ``bfloat16``, ``float32``) applies to the diffusion pipelines and the language
    models; CLIP, ClipSeg and the safety checker stay in float32 (their scores are compared with fixed thresholds).
    """
    models = {**DEFAULT_MODELS, **{k: v for k, v in models.items() if v is not None}}
    dtype = _dtype(torch_dtype)
    strategies = set(config.strategies)
    _check_language_models(models, strategies)  # before anything large loads
    generated = strategies & set(CAPTION_STRATEGIES)
    parts = GenerationComponents()
    names: dict[str, Any] = {}
    if "keyword" in strategies or generated or config.filters.filter_given_pairs:
        from transformers import CLIPModel, CLIPProcessor

        parts.clip_model = CLIPModel.from_pretrained(models["clip"]).to(device).eval()
        parts.clip_processor = CLIPProcessor.from_pretrained(models["clip"])
        names["clip"] = models["clip"]
    if generated:
        from diffusers import StableDiffusionPipeline

        for name in models["stable_diffusion"]:
            pipe = StableDiffusionPipeline.from_pretrained(name, torch_dtype=dtype, safety_checker=None,
                                                           requires_safety_checker=False)
            pipe.set_progress_bar_config(disable=True)
            parts.image_pipelines[name] = pipe.to(device)
        names["stable_diffusion"] = list(models["stable_diffusion"])
    if config.filters.nsfw:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        parts.safety_checker = StableDiffusionSafetyChecker.from_pretrained(models["safety_checker"]).to(device).eval()
        parts.safety_feature_extractor = CLIPImageProcessor.from_pretrained(models["safety_checker"])
        names["safety_checker"] = models["safety_checker"]
    if config.masks.enabled and generated:
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        parts.clipseg_model = CLIPSegForImageSegmentation.from_pretrained(models["clipseg"]).to(device).eval()
        parts.clipseg_processor = CLIPSegProcessor.from_pretrained(models["clipseg"])
        names["clipseg"] = models["clipseg"]
    _load_language_models(parts, names, models, strategies, dtype, device)
    if "keyword" in strategies:
        from .keyword_triplets import load_tagger

        parts.tagger = load_tagger(models.get("tagger") or config.keyword.tagger,
                                   models.get("spacy_model") or config.keyword.spacy_model)
        names["tagger"] = getattr(parts.tagger, "name", type(parts.tagger).__name__)
    parts.names = names
    return parts


def _check_language_models(models, strategies) -> None:
    if "llm" in strategies and not models.get("caption_editor"):
        raise ValueError("LLM triplets need a caption-editing causal LM: pass --caption-editor (a transformers causal "
                         "LM fine-tuned with examples/generation/finetune_caption_editor.py).")
    if strategies & {"mtst", "facap"} and not models.get("vlm"):
        raise ValueError("MTST and FACap need a vision-language model: pass --vlm (an image-text-to-text model).")
    if "facap" in strategies and not models.get("instruction_llm"):
        raise ValueError("FACap needs an instruction-following causal LM: pass --instruction-llm.")


def _load_language_models(parts, names, models, strategies, dtype, device) -> None:
    if "llm" in strategies:
        from .llm_triplets import load_caption_editor

        parts.caption_editor, parts.caption_editor_tokenizer = load_caption_editor(
            models["caption_editor"], models.get("caption_editor_adapter"), torch_dtype=dtype, device=device)
        names["caption_editor"] = models["caption_editor"]
        if models.get("caption_editor_adapter"):
            names["caption_editor_adapter"] = models["caption_editor_adapter"]
    if strategies & {"mtst", "facap"}:
        from .pair_texts import load_vision_language_model

        parts.vlm, parts.vlm_processor = load_vision_language_model(models["vlm"], torch_dtype=dtype, device=device)
        names["vlm"] = models["vlm"]
    if "facap" in strategies:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        parts.instruction_llm = AutoModelForCausalLM.from_pretrained(models["instruction_llm"], dtype=dtype)
        parts.instruction_llm = parts.instruction_llm.to(device).eval()
        parts.instruction_llm_tokenizer = AutoTokenizer.from_pretrained(models["instruction_llm"])
        names["instruction_llm"] = models["instruction_llm"]
