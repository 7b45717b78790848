# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""What a composition-network run is built from: the encoders (from a pipeline folder, a CLIP or BLIP-2 checkpoint,
a folder of tower subfolders, or open_clip), the head, LoRA adapters on the towers (peft), and a text-feature cache."""

from __future__ import annotations

import argparse
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from ..pipelines import composition_encoders as encoders
from .arguments import flag

__all__ = ["Encoders", "TextFeatureCache", "add_lora", "apply_image_preprocessing", "load_encoders", "merged_tower",
           "recorded_image_preprocessing"]


@dataclass
class Encoders:
    """The towers of a run, the head of a pipeline folder it continues (or ``None``), and where they came from;
    ``model`` is a whole model that composes by itself (FashionBLIP-2's BLIP-2) in place of pooled towers."""

    text_encoder: Any
    tokenizer: Any
    image_encoder: Any = None
    image_processor: Any = None
    fusion_head: Any = None
    source: str = ""
    model: Any = None


def _model_type(folder: str) -> str | None:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle).get("model_type")


def _from_pipeline_folder(folder: str) -> Encoders:
    from ..pipelines.auto import AutoCIRPipeline
    from ..pipelines.pipeline_composition import CompositionNetworkPipeline

    pipeline = AutoCIRPipeline.from_pretrained(folder)
    if isinstance(pipeline, CompositionNetworkPipeline):
        return Encoders(pipeline.text_encoder, pipeline.tokenizer, pipeline.image_encoder, pipeline.image_processor,
                        pipeline.fusion_head, folder)
    if getattr(pipeline, "text_encoder", None) is None or getattr(pipeline, "tokenizer", None) is None:
        raise ValueError(
            f"{flag('pretrained_model_name_or_path')} {folder!r} holds a {type(pipeline).__name__}, which has no "
            "CLIP-style text tower and tokenizer to train a composition head over: pass a CLIP checkpoint, a folder "
            "of a pipeline with CLIP towers (composition networks, CompoDiff, LinCIR, BGE-VL), or, for a "
            "FashionBLIP2Pipeline folder, --method fashionblip2."
        )
    # Another pipeline's towers (CompoDiff, LinCIR, ...): its CLIP pair, a new head.
    return Encoders(pipeline.text_encoder, pipeline.tokenizer, getattr(pipeline, "image_encoder", None),
                    getattr(pipeline, "image_processor", None), None, folder)


def _from_subfolders(folder: str) -> Encoders:
    from transformers import (
        AutoImageProcessor,
        AutoTokenizer,
        CLIPTextModelWithProjection,
        CLIPVisionModelWithProjection,
    )

    def part(name):
        return os.path.join(folder, name) if os.path.isdir(os.path.join(folder, name)) else None

    text_encoder = CLIPTextModelWithProjection.from_pretrained(part("text_encoder"))
    tokenizer = AutoTokenizer.from_pretrained(part("tokenizer") or part("text_encoder"))
    image_encoder = image_processor = None
    if part("image_encoder"):
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(part("image_encoder"))
        image_processor = AutoImageProcessor.from_pretrained(part("image_processor") or part("image_encoder"))
    return Encoders(text_encoder, tokenizer, image_encoder, image_processor, None, folder)


def _from_checkpoint(folder: str, model_type: str) -> Encoders:
    from transformers import AutoImageProcessor, AutoTokenizer

    if model_type == "clip":
        from transformers import CLIPTextModelWithProjection as Text
        from transformers import CLIPVisionModelWithProjection as Vision
    elif model_type == "blip-2":
        from transformers import Blip2TextModelWithProjection as Text
        from transformers import Blip2VisionModelWithProjection as Vision
    else:
        raise ValueError(f"{folder} holds a {model_type!r} model; the trainer reads CLIP and BLIP-2 checkpoints.")
    processor = AutoImageProcessor.from_pretrained(folder) if os.path.isfile(
        os.path.join(folder, "preprocessor_config.json")) else None
    return Encoders(Text.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), Vision.from_pretrained(folder),
                    processor, None, folder)


def load_encoders(args: argparse.Namespace) -> Encoders:
    """The towers of ``--pretrained-model-name-or-path`` or ``--open-clip-model`` (float32, evaluation mode)."""
    from .components import pretrained_folder

    if args.open_clip_model is not None:
        parts = encoders.load_open_clip_components(args.open_clip_model, args.open_clip_pretrained)
        return Encoders(**parts, source=f"open_clip:{args.open_clip_model}:{args.open_clip_pretrained}")
    folder = pretrained_folder(args.pretrained_model_name_or_path, args.revision)
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        loaded = _from_pipeline_folder(folder)
    elif os.path.isdir(os.path.join(folder, "text_encoder")):
        loaded = _from_subfolders(folder)
    else:
        model_type = _model_type(folder)
        if model_type is None:
            raise ValueError(
                f"{flag('pretrained_model_name_or_path')} {args.pretrained_model_name_or_path!r} is neither a pipeline "
                "folder (model_index.json), a folder with text_encoder/ (tokenizer/, image_encoder/) subfolders, nor "
                "a CLIP or BLIP-2 checkpoint (config.json)."
            )
        loaded = _from_checkpoint(folder, model_type)
    loaded.source = args.pretrained_model_name_or_path
    encoders.encoder_kind(loaded.text_encoder, loaded.image_encoder)
    return loaded


def recorded_image_preprocessing(args: argparse.Namespace, uses_embeddings: bool) -> tuple[str, float | None] | None:
    """``(name, target ratio)`` the training embeddings were made with, as the dataset card of ``--train-data-dir``
    records it (``examples/precompute_embeddings.py``); ``None`` when the run reads no embeddings or the card records
    nothing. A contradicting ``--image-preprocessing`` / ``--target-ratio`` is a ``ValueError`` naming both."""
    from ..data.precompute import describe_preprocessing, recorded_embeddings_preprocessing

    if not uses_embeddings or not os.path.isdir(args.train_data_dir):
        return None
    recorded = recorded_embeddings_preprocessing(args.train_data_dir)
    if recorded is None:
        return None
    asked = args.image_preprocessing or ("targetpad" if args.target_ratio is not None else None)
    contradicts = asked is not None and asked != recorded[0]
    contradicts = contradicts or (args.target_ratio is not None and float(args.target_ratio) != recorded[1])
    if contradicts:
        given = " ".join(f"{flag(name)} {getattr(args, name)}" for name in ("image_preprocessing", "target_ratio")
                         if getattr(args, name) is not None)
        raise ValueError(
            f"{given} contradicts the embeddings of {flag('train_data_dir')} {args.train_data_dir!r}, which were made "
            f"with {describe_preprocessing(*recorded)} preprocessing (its dataset card's embeddings_image_preprocessing"
            "): the saved pipeline must preprocess queries and gallery the way its training features were made. Drop "
            "the flag, or precompute the embeddings again with it (examples/precompute_embeddings.py)."
        )
    return recorded


def apply_image_preprocessing(args: argparse.Namespace, parts: Encoders, method, reads_pixels: bool,
                              recorded: tuple[str, float | None] | None = None) -> str | None:
    """Give ``parts`` the image processor ``--image-preprocessing`` / ``--target-ratio`` ask for (or the method's
    default: its authors' preprocessing when the run encodes pixels and the encoders' processor can take it, else the
    encoders' own); ``recorded`` (:func:`recorded_image_preprocessing`: how the training embeddings were made) takes
    the place of both flags. The processor trains and is saved with the pipeline. Returns what was chosen, for the
    log."""
    from ..retrieval.image_processing_targetpad import image_processor_for, resizes_and_crops_like_clip

    if parts.image_processor is None or parts.model is not None:
        return None
    choice, target_ratio = recorded if recorded is not None else (args.image_preprocessing, args.target_ratio)
    if choice is None and target_ratio is not None:
        choice = "targetpad"
    if choice is None and reads_pixels and method.image_preprocessing is not None:
        if resizes_and_crops_like_clip(parts.image_processor):
            choice = method.image_preprocessing
    if choice is None:
        return f"the encoders' own ({type(parts.image_processor).__name__})"
    try:
        parts.image_processor = image_processor_for(parts.image_processor, choice, target_ratio)
    except ValueError as error:
        source = f"{flag('image_preprocessing')} {choice}" if recorded is None else (
            f"{flag('train_data_dir')} {args.train_data_dir!r} (its embeddings were made with {choice} preprocessing)")
        raise ValueError(f"{source}: {error}") from None
    ratio = getattr(parts.image_processor, "target_ratio", None)
    return choice if choice == "clip" else f"targetpad (target ratio {ratio})"


def add_lora(tower, args: argparse.Namespace, kind: str):
    """``tower`` wrapped by peft with LoRA adapters (only they train)."""
    from peft import LoraConfig, get_peft_model

    from .fusion_arguments import DEFAULT_LORA_TARGETS

    config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=args.lora_target_modules or DEFAULT_LORA_TARGETS[kind])
    try:
        return get_peft_model(tower, config)
    except ValueError as error:  # no layer matched the pattern
        raise ValueError(f"{flag('lora_target_modules')}: {error}") from None


def merged_tower(tower):
    """The plain tower of a (possibly) LoRA-wrapped one, adapters merged into its weights."""
    return tower.merge_and_unload() if hasattr(tower, "merge_and_unload") else tower


class TextFeatureCache:
    """Text features of a frozen text tower, kept for up to ``max_entries`` distinct texts (least recently used out)."""

    def __init__(self, text_encoder, tokenizer, max_entries: int, device, dtype):
        self.text_encoder, self.tokenizer, self.max_entries = text_encoder, tokenizer, max_entries
        self.device, self.dtype = device, dtype
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def encode(self, texts: list[str]) -> torch.Tensor:
        tokens = encoders.tokenize_texts(self.tokenizer, self.text_encoder, texts)
        return encoders.text_features(
            self.text_encoder, tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)).float()

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        if self.max_entries == 0:
            return self.encode(texts)
        missing = [text for text in dict.fromkeys(texts) if text not in self._cache]
        if missing:
            for text, feature in zip(missing, self.encode(missing)):
                self._cache[text] = feature
        rows = []
        for text in texts:
            self._cache.move_to_end(text)
            rows.append(self._cache[text])
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return torch.stack(rows)
