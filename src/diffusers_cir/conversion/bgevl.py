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

__all__ = [
    "BGEVLConversionError",
    "PUBLISHED_RESULTS",
    "convert_bgevl_checkpoint_to_pipeline",
    "is_released_bgevl_folder",
    "released_model_name",
]

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# The authors' modeling file; its name is how a BGE-VL release differs from any other CLIP checkpoint.
_AUTHORS_MODULE = "modeling_mmret_clip"


# Zero-shot results the MegaPairs paper (arXiv:2412.14475, Table 1) reports for the released CLIP models, in percent:
# CIRCO mAP@5 (test split, CIRCO server), CIRR Recall@1 (test1 split, CIRR server), FashionIQ Recall@10 (validation
# split, mean of dress, shirt and toptee).
PUBLISHED_RESULTS = {
    "BGE-VL-large": {"circo_map_at5": 39.2, "cirr_recall_at1": 38.0, "fashioniq_recall_at10": 34.6},
    "BGE-VL-base": {"circo_map_at5": 34.3, "cirr_recall_at1": 36.1, "fashioniq_recall_at10": 31.9},
}
# vision (hidden size, layers, patch size) and projection width of each release (CLIP ViT-L/14 and ViT-B/16)
_RELEASE_SHAPES = {"BGE-VL-large": (1024, 24, 14, 768), "BGE-VL-base": (768, 12, 16, 512)}


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


def released_model_name(config) -> str | None:
    """``"BGE-VL-large"`` / ``"BGE-VL-base"`` when a ``CLIPConfig`` has that release's sizes, else ``None``."""
    vision = config.vision_config
    shape = (vision.hidden_size, vision.num_hidden_layers, vision.patch_size, config.projection_dim)
    return next((name for name, release in _RELEASE_SHAPES.items() if release == shape), None)


def _card(checkpoint_path, output_path, torch_dtype, model_name: str | None, card_name: str):
    from ..utils.model_card import conversion_card

    note = ("Converted from a BGE-VL-CLIP release (VectorSpaceLab/MegaPairs; BAAI/BGE-VL-base, BAAI/BGE-VL-large): the "
            "CLIP checkpoint split into its two towers with stock transformers CLIP, weights unchanged.")
    if model_name is not None:
        numbers = PUBLISHED_RESULTS[model_name]
        note += (
            f" Its sizes are those of {model_name}; for the released weights the MegaPairs paper (Table 1) reports, "
            f"zero-shot, CIRCO mAP@5 {numbers['circo_map_at5']} (test), CIRR R@1 {numbers['cirr_recall_at1']} (test1) "
            f"and FashionIQ R@10 {numbers['fashioniq_recall_at10']} (validation, mean of three categories), under the "
            "authors' protocol: `diffusers-cir evaluate circo --pipeline <this folder> --protocol bgevl --split test "
            "--data-root CIRCO --output-dir runs/circo` (likewise fashioniq, and cirr with --split test1)."
        )
    flags = {"--checkpoint-path": checkpoint_path, "--output": output_path,
             "--dtype": str(torch_dtype).removeprefix("torch.") if torch_dtype else None}
    card = conversion_card("bgevl", flags, [checkpoint_path], license="mit", note=note)
    card.model_name = card_name  # the output's name, not the staging folder's the card is written in
    return card


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
    overwrite_flag: str = "overwrite=True",
    card_name: str | None = None,
):
    """Write a :class:`~diffusers_cir.BGEVLPipeline` folder from a released BGE-VL-CLIP folder.

    Args:
        checkpoint_path: the release folder (``config.json``, ``model.safetensors``, tokenizer and
            ``preprocessor_config.json``), e.g. a ``huggingface_hub.snapshot_download("BAAI/BGE-VL-large")``.
        output_path: the pipeline folder to write (refused if it holds something else; ``overwrite=True`` replaces an
            earlier conversion).
        torch_dtype: precision of the saved weights (default: the checkpoint's).
        card_name: the title of the saved model card (default: the output folder's name).

    Returns:
        The :class:`~diffusers_cir.BGEVLPipeline`.
    """
    from transformers import CLIPImageProcessorPil, CLIPTokenizer

    from ..pipelines.pipeline_bgevl import BGEVLPipeline
    from .output import check_output_folder, replace_output_folder

    folder = Path(checkpoint_path)
    check_output_folder(output_path, overwrite, flag=overwrite_flag)  # before the (long) load
    if not is_released_bgevl_folder(folder):
        raise BGEVLConversionError(
            f"{str(folder)!r} is not a BGE-VL-CLIP release: it needs config.json with model_type 'clip', architecture "
            "CLIPModel and an auto_map naming modeling_MMRet_CLIP, next to model.safetensors (or pytorch_model.bin)."
        )
    for name in ("preprocessor_config.json",):
        if not (folder / name).is_file():
            raise BGEVLConversionError(f"{str(folder)!r} has no {name}: the release's image preprocessing is missing.")
    clip = _load_clip(folder, torch_dtype)
    model_name = released_model_name(clip.config)
    text_encoder, image_encoder = split_clip_model(clip)
    del clip
    pipe = BGEVLPipeline(
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(folder),
        image_encoder=image_encoder,
        # transformers 5's default CLIPImageProcessor resizes with torchvision, which moves pixels by up to 0.015 from
        # the authors' PIL bicubic resize; the PIL backend reproduces them exactly.
        image_processor=CLIPImageProcessorPil.from_pretrained(folder),
    )
    card = _card(checkpoint_path, output_path, torch_dtype, model_name, card_name or Path(output_path).resolve().name)
    with replace_output_folder(output_path, overwrite, flag=overwrite_flag) as staging:
        pipe.save_pretrained(staging, safe_serialization=safe_serialization, model_card=card)
    return pipe


def _convert_released_bgevl(source, output_dir):
    convert_bgevl_checkpoint_to_pipeline(source, output_dir, card_name=Path(source).resolve().name)


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
