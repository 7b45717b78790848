# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""What the open_clip tower wrappers share: building an open_clip CLIP from its configuration, and reading one.

A saved wrapper records the model's whole open_clip configuration (the JSON of ``open_clip.get_model_config`` plus the
activation the weights were trained with), not a registry name, so that a folder loads with any open_clip release
that can build the architecture.
"""

from __future__ import annotations

from typing import Any

_UNSUPPORTED_TEXT = ("hf_model_name", "hf_tokenizer_name")


def build_open_clip_model(model_config: dict):
    """An ``open_clip.CLIP`` (or ``CustomTextCLIP``) built from ``model_config``, with random weights."""
    import open_clip

    if not isinstance(model_config, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(model_config):
        raise ValueError(
            "`model_config` must be an open_clip model configuration (a dict with `embed_dim`, `vision_cfg` and "
            f"`text_cfg`, as `open_clip.get_model_config(name)` returns), got {model_config!r}."
        )
    config = dict(model_config)
    text_cfg = config.get("text_cfg") or {}
    unsupported = [key for key in _UNSUPPORTED_TEXT if text_cfg.get(key)]
    if unsupported:
        raise ValueError(
            f"open_clip models whose text tower comes from Hugging Face ({', '.join(unsupported)}) are not supported: "
            "their tokenizer is not CLIP's. Use a CLIP-tokenizer model (OpenAI, LAION ViT and ResNet CLIPs)."
        )
    custom_text = bool(config.pop("custom_text", False))
    for key in ("multimodal_cfg", "hf_tokenizer_name"):
        config.pop(key, None)
    model_class = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    return model_class(**config)


def open_clip_config(model_name: str, model) -> dict[str, Any]:
    """The configuration to rebuild ``model`` (an open_clip model created from ``model_name``): the registry's JSON
    plus ``quick_gelu`` when the model runs QuickGELU (OpenAI's weights do; their registry entries do not say so)."""
    import open_clip
    from open_clip.transformer import QuickGELU

    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ValueError(f"open_clip knows no model {model_name!r}; `open_clip.list_models()` lists the names.")
    config = dict(config)
    if any(isinstance(module, QuickGELU) for module in model.modules()):
        config["quick_gelu"] = True
    return config


def open_clip_image_processor(model):
    """A ``transformers.CLIPImageProcessorPil`` doing open_clip's evaluation transform of ``model``: resize the
    shortest side with PIL (bicubic by default; torchvision resizes PIL images with PIL, so the PIL backend gives
    open_clip's pixels), center crop, normalise with the model's mean and std."""
    import open_clip
    from PIL import Image
    from transformers import CLIPImageProcessorPil

    settings = open_clip.get_model_preprocess_cfg(model)
    size = settings.get("size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    resize_mode = settings.get("resize_mode", "shortest")
    interpolation = settings.get("interpolation", "bicubic")
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}.get(interpolation)
    if resize_mode != "shortest" or height != width or resample is None:
        raise ValueError(
            f"open_clip's preprocessing of this model (resize_mode={resize_mode!r}, size={size!r}, "
            f"interpolation={interpolation!r}) is not a shortest-side resize and square center crop, which is what "
            "CLIPImageProcessor does; such models are not supported."
        )
    mean = settings.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = settings.get("std", open_clip.OPENAI_DATASET_STD)
    return CLIPImageProcessorPil(
        size={"shortest_edge": height}, crop_size={"height": height, "width": width}, resample=resample,
        image_mean=list(mean), image_std=list(std),
    )
