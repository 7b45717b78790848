# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""A released LLaVA-NeXT embedder folder (E5-V ``royokong/e5-v``, BGE-VL-MLLM ``BAAI/BGE-VL-MLLM-S1``/``-S2``) as an
:class:`~diffusers_cir.MLLMEmbeddingPipeline` folder.

The release is one transformers folder (``config.json`` with ``model_type: llava_next``, safetensors shards, the
processor's files). The pipeline folder has a ``model/`` and a ``processor/`` sub-folder and a ``model_index.json``
naming the prompt set. Nothing is converted numerically: the weight files are hard-linked into ``model/`` (copied
when the cache is on another file system), so assembling a 16 GB model costs no space and a second of time.

What is adjusted, and why:

* ``config.json``: ``architectures`` becomes ``LlavaNextForConditionalGeneration`` and ``auto_map`` is dropped, so
  nothing points at remote code (BGE-VL-MLLM's ``LLaVANextForEmbedding`` subclasses that class without new weights);
* the processor: a processor saved before transformers expanded image tokens itself lacks ``patch_size``,
  ``vision_feature_select_strategy`` and ``num_additional_image_tokens``; they are set from the model's config (the
  CLIP vision tower's patch size, its strategy, one class token for a CLIP tower) when, and only when, the saved files
  do not name them.

The prompt set is ``prompts=`` when given; otherwise ``bge-vl-mllm`` for a config naming ``LLaVANextForEmbedding``
and ``e5-v`` for a Llama-3 language model (E5-V's base); any other folder needs ``prompts=``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

__all__ = ["convert_llava_next_embedder", "default_prompts_for", "is_llava_next_folder"]

logger = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_MODEL_FILES = ("config.json", "generation_config.json")
_PROCESSOR_CONFIGS = ("processor_config.json", "preprocessor_config.json")
_PROCESSOR_KEYS = ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens")
# Vision towers whose sequence carries one class token before the patches (LLaVA-NeXT ships CLIP ones).
_CLASS_TOKEN_TOWERS = {"clip_vision_model": 1, "siglip_vision_model": 0}


def _read_config(path: Path) -> dict | None:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def is_llava_next_folder(path) -> bool:
    """A transformers LLaVA-NeXT folder: ``config.json`` with ``model_type: llava_next`` and weight files."""
    path = Path(path)
    if not path.is_dir():
        return False
    config = _read_config(path)
    if config is None or config.get("model_type") != "llava_next":
        return False
    return any(file.suffix in _WEIGHT_SUFFIXES for file in path.iterdir())


def default_prompts_for(config: dict) -> str | None:
    """The prompt preset a released config implies, or ``None`` when it implies none."""
    if "LLaVANextForEmbedding" in (config.get("architectures") or []):
        return "bge-vl-mllm"
    if (config.get("text_config") or {}).get("model_type") == "llama":
        return "e5-v"
    return None


def _link_or_copy(source: Path, target: Path) -> bool:
    """Hard-link ``source`` (a Hub snapshot's symlink resolved to its blob) at ``target``; copy when the file systems
    differ. Returns whether it was copied."""
    resolved = source.resolve()
    try:
        os.link(resolved, target)
        return False
    except OSError:
        shutil.copyfile(resolved, target)
        return True


def _write_model_folder(source: Path, target: Path, config: dict) -> None:
    target.mkdir(parents=True)
    config = dict(config)
    config["architectures"] = ["LlavaNextForConditionalGeneration"]
    config.pop("auto_map", None)
    (target / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    copied = 0
    for file in sorted(source.iterdir()):
        if file.name in _MODEL_FILES[1:] or file.name.endswith(".index.json"):
            shutil.copyfile(file.resolve(), target / file.name)
        elif file.suffix in _WEIGHT_SUFFIXES:
            copied += _link_or_copy(file, target / file.name) * file.resolve().stat().st_size
    if copied:
        logger.info("The weights were copied (%.1f GB): the cache is on another file system than %s.", copied / 1e9, source)


def _saved_processor_keys(source: Path) -> set[str]:
    keys: set[str] = set()
    for name in _PROCESSOR_CONFIGS:
        try:
            saved = json.loads((source / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(saved, dict):
            keys |= set(saved)
    return keys


def _write_processor_folder(source: Path, target: Path, config: dict) -> None:
    from transformers import LlavaNextProcessor

    processor = LlavaNextProcessor.from_pretrained(source)
    saved = _saved_processor_keys(source)
    vision = config.get("vision_config") or {}
    derived = {
        "patch_size": vision.get("patch_size"),
        "vision_feature_select_strategy": config.get("vision_feature_select_strategy", "default"),
        "num_additional_image_tokens": _CLASS_TOKEN_TOWERS.get(vision.get("model_type", "clip_vision_model")),
    }
    for key in _PROCESSOR_KEYS:
        if key not in saved:
            if derived[key] is None:
                raise ValueError(
                    f"{source} has no {key!r} in its processor files and its config.json does not determine one: "
                    "set it on the processor and save it into the folder."
                )
            setattr(processor, key, derived[key])
    image_token_id = config.get("image_token_id", config.get("image_token_index"))
    if image_token_id is not None and processor.image_token_id != image_token_id:
        raise ValueError(
            f"{source}: the processor's image token {processor.image_token!r} has id {processor.image_token_id}, but "
            f"config.json expects {image_token_id}."
        )
    processor.save_pretrained(target)


def convert_llava_next_embedder(source, output_dir, prompts: str | dict | None = None) -> Path:
    """Write the pipeline folder of the released LLaVA-NeXT folder ``source`` into ``output_dir`` (a new folder).

    Args:
        source: the released folder (a Hub snapshot or a local copy).
        output_dir: where the pipeline folder goes; must not exist yet.
        prompts: a preset name of :data:`~diffusers_cir.pipelines.pipeline_mllm_embedding.MLLM_PROMPT_PRESETS` or the
            prompt fields; by default the one the config implies (see the module docstring).
    """
    import diffusers

    from ..pipelines.pipeline_mllm_embedding import MLLMPrompts

    source, output_dir = Path(source), Path(output_dir)
    if not is_llava_next_folder(source):
        raise ValueError(f"{source} is not a LLaVA-NeXT folder (config.json with model_type 'llava_next' and weights).")
    config = _read_config(source)
    prompts = prompts if prompts is not None else default_prompts_for(config)
    if prompts is None:
        from ..pipelines.pipeline_mllm_embedding import MLLM_PROMPT_PRESETS

        raise ValueError(
            f"{source} is a LLaVA-NeXT folder of no known embedder (neither BGE-VL-MLLM nor a Llama-3 E5-V): pass "
            f"`prompts=` (a preset of {sorted(MLLM_PROMPT_PRESETS)} or the prompt fields)."
        )
    resolved = MLLMPrompts.resolve(prompts).check()
    output_dir.mkdir(parents=True)
    _write_model_folder(source, output_dir / "model", config)
    _write_processor_folder(source, output_dir / "processor", config)
    index = {
        "_class_name": "MLLMEmbeddingPipeline",
        "_diffusers_version": diffusers.__version__,
        "model": ["transformers", "LlavaNextForConditionalGeneration"],
        "processor": ["transformers", "LlavaNextProcessor"],
        "prompts": {field: getattr(resolved, field) for field in resolved.__dataclass_fields__},
    }
    (output_dir / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return output_dir


def _register_layout() -> None:
    from ..pipelines.auto import ReleasedLayout, register_layout

    register_layout(ReleasedLayout(
        name="llava-next-embedder",
        description="a LLaVA-NeXT embedder as released (E5-V royokong/e5-v, BAAI/BGE-VL-MLLM-S1/-S2): config.json with "
        "model_type llava_next + safetensors + processor files; prompts= picks the prompt set",
        matches=is_llava_next_folder,
        convert=convert_llava_next_embedder,
        options=("prompts",),
    ))


_register_layout()
