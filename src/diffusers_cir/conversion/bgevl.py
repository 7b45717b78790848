# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""The released BGE-VL-CLIP checkpoints (BAAI/BGE-VL-base, BAAI/BGE-VL-large) as a :class:`BGEVLPipeline` folder.

A release is a plain CLIP checkpoint folder: ``config.json`` (a ``CLIPConfig`` whose ``auto_map`` points
``AutoModel`` at the authors' ``modeling_MMRet_CLIP.CLIPModel``), ``model.safetensors`` with stock ``CLIPModel`` key
names, and the tokenizer and image-processor files. The authors' class is transformers' CLIP plus four encode methods,
and their own benchmark code loads the weights with stock ``AutoModel`` (no remote code), so stock
``transformers.CLIPModel`` reads it as it is. The conversion loads it that way (refusing a checkpoint with missing
weights rather than leaving them random), splits it into the text and vision towers with their projections, and saves
the pipeline. ``AutoCIRPipeline.from_pretrained(<release folder>)`` runs it once into its cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["BGEVLConversionError", "convert_bgevl_checkpoint_to_pipeline", "is_released_bgevl_folder"]

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# The authors' modeling file; its name is how a BGE-VL release differs from any other CLIP checkpoint.
_AUTHORS_MODULE = "modeling_mmret_clip"


class BGEVLConversionError(ValueError):
    """A folder that is not a complete BGE-VL-CLIP release."""


def _read_config(folder: Path) -> dict | None:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def is_released_bgevl_folder(path) -> bool:
    """A BGE-VL-CLIP release: a CLIP ``config.json`` (``model_type`` ``clip``, architecture ``CLIPModel``) whose
    ``auto_map`` names the authors' ``modeling_MMRet_CLIP`` module, next to a weights file."""
    folder = Path(path)
    if not folder.is_dir() or not any((folder / name).is_file() for name in _WEIGHT_FILES):
        return False
    config = _read_config(folder)
    if config is None or config.get("model_type") != "clip" or "_class_name" in config:
        return False
    auto_map = config.get("auto_map")
    targets = auto_map.values() if isinstance(auto_map, dict) else ()
    names_authors_class = any(isinstance(target, str) and _AUTHORS_MODULE in target.lower() for target in targets)
    return names_authors_class and "CLIPModel" in (config.get("architectures") or ())


def _load_clip(folder: Path, torch_dtype):
    """Stock ``CLIPModel`` (never the remote code), refusing missing or unexpected weights."""
    from transformers import CLIPModel

    kwargs = {} if torch_dtype is None else {"dtype": torch_dtype}
    model, info = CLIPModel.from_pretrained(folder, output_loading_info=True, **kwargs)
    problems = {kind: sorted(info.get(kind) or ()) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        shown = "; ".join(f"{kind}: {', '.join(map(str, keys[:5]))}{' ...' if len(keys) > 5 else ''}"
                          for kind, keys in problems.items())
        raise BGEVLConversionError(
            f"The checkpoint in {str(folder)!r} does not fit its config.json as a CLIPModel ({shown}): it would load "
            "with random weights in their place. Download the release again (all of model.safetensors)."
        )
    return model.eval()


def split_clip_model(model):
    """The text and vision towers of a ``CLIPModel``, each with its projection, holding the same weights."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    config = model.config
    projection_dim = config.projection_dim
    attention = getattr(config, "_attn_implementation", None)
    towers = []
    for tower_class, config_class, sub_config, prefixes in (
        (CLIPTextModelWithProjection, CLIPTextConfig, config.text_config, ("text_model.", "text_projection.")),
        (CLIPVisionModelWithProjection, CLIPVisionConfig, config.vision_config, ("vision_model.", "visual_projection.")),
    ):
        # The sub-configs of a CLIPConfig do not carry projection_dim (it sits on the CLIPConfig): set it, or the
        # tower would be built with the class default (512).
        tower_config = config_class(**{**sub_config.to_dict(), "projection_dim": projection_dim})
        if attention is not None:
            tower_config._attn_implementation = attention
        tower = tower_class(tower_config).to(model.dtype)
        state = {key: value for key, value in model.state_dict().items() if key.startswith(prefixes)}
        tower.load_state_dict(state, strict=True)
        towers.append(tower.eval())
    return tuple(towers)


def convert_bgevl_checkpoint_to_pipeline(
    checkpoint_path: str | os.PathLike,
    output_path: str | os.PathLike,
    torch_dtype=None,
    overwrite: bool = False,
    safe_serialization: bool = True,
):
    """Write a :class:`~diffusers_cir.BGEVLPipeline` folder from a released BGE-VL-CLIP folder.

    Args:
        checkpoint_path: the release folder (``config.json``, ``model.safetensors``, tokenizer and
            ``preprocessor_config.json``), e.g. a ``huggingface_hub.snapshot_download("BAAI/BGE-VL-large")``.
        output_path: the pipeline folder to write (refused if it holds something else; ``overwrite=True`` replaces an
            earlier conversion).
        torch_dtype: precision of the saved weights (default: the checkpoint's).

    Returns:
        The :class:`~diffusers_cir.BGEVLPipeline`.
    """
    from transformers import CLIPImageProcessorPil, CLIPTokenizer

    from ..pipelines.pipeline_bgevl import BGEVLPipeline
    from .output import check_output_folder, replace_output_folder

    folder = Path(checkpoint_path)
    check_output_folder(output_path, overwrite)  # before the (long) load
    if not is_released_bgevl_folder(folder):
        raise BGEVLConversionError(
            f"{str(folder)!r} is not a BGE-VL-CLIP release: it needs config.json with model_type 'clip', architecture "
            "CLIPModel and an auto_map naming modeling_MMRet_CLIP, next to model.safetensors (or pytorch_model.bin)."
        )
    for name in ("preprocessor_config.json",):
        if not (folder / name).is_file():
            raise BGEVLConversionError(f"{str(folder)!r} has no {name}: the release's image preprocessing is missing.")
    text_encoder, image_encoder = split_clip_model(_load_clip(folder, torch_dtype))
    pipe = BGEVLPipeline(
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(folder),
        image_encoder=image_encoder,
        # transformers 5's default CLIPImageProcessor resizes with torchvision, which moves pixels by up to 0.015 from
        # the authors' PIL bicubic resize; the PIL backend reproduces them exactly.
        image_processor=CLIPImageProcessorPil.from_pretrained(folder),
    )
    with replace_output_folder(output_path, overwrite) as staging:
        pipe.save_pretrained(staging, safe_serialization=safe_serialization)
    return pipe


def _convert_released_bgevl(source, output_dir):
    convert_bgevl_checkpoint_to_pipeline(source, output_dir)


def _register_layout() -> None:
    from ..pipelines.auto import ReleasedLayout, register_layout

    register_layout(ReleasedLayout(
        name="bgevl-clip",
        description="the authors' BGE-VL-CLIP release (BAAI/BGE-VL-base, BAAI/BGE-VL-large): a CLIP config.json whose "
        "auto_map names modeling_MMRet_CLIP + model.safetensors + tokenizer and preprocessor files (loaded with stock "
        "transformers CLIP, no remote code)",
        matches=is_released_bgevl_folder,
        convert=_convert_released_bgevl,
    ))


_register_layout()
