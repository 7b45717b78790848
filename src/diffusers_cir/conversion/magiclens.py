# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Convert the released MagicLens checkpoints (``magic_lens_clip_base.pkl``, ``magic_lens_clip_large.pkl``) into a
:class:`~diffusers_cir.MagicLensPipeline` folder.

The ``.pkl`` is read without unpickling (:mod:`diffusers_cir.conversion.flax_checkpoint`). Its tree is scenic's CLIP
(``params/clip/{visual,text}/...``, blocks ``resblocks_{i}``) and the MagicLens layers
(``params/multimodal_encoder/x_layers_{i}/...``, ``params/contrastive_multimodal_pooler/...``). Every key is mapped
(``params/clip/logit_scale``, which MagicLens never uses, is the only one dropped) and the architecture is read from
the shapes, so base, large and any other size convert alike; ``model_size`` / ``config_path`` only state what the
file should be, and a file that is not that is refused.

Layouts (flax -> torch): a Dense kernel ``[in, out]`` is ``Linear.weight = kernel.T``; flax attention kernels
``[width, heads, head_dim]`` flatten heads-major, ``[heads, head_dim, width]`` for the output; MagicLens's output
projection ``post/w`` is stored ``[D, heads, head_dim]`` and needs no transpose; the patch convolution is HWIO; the
MagicLens LayerNorm multiplies by ``1 + scale``, which is stored as the ``weight`` of a plain LayerNorm.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

__all__ = [
    "MAGICLENS_SIZES",
    "MagicLensConversionError",
    "build_magiclens_components",
    "convert_magiclens_checkpoint_to_pipeline",
    "convert_magiclens_state_dict",
    "infer_magiclens_architecture",
    "magiclens_model_configs",
    "load_magiclens_checkpoint",
]

# CLIP's BPE vocabulary: the text tower's token table must have exactly this many rows.
CLIP_VOCAB_SIZE = 49408
# The size every image is squashed to before the model's own crop and resize (data_utils.process_img(path, 224)).
PREPROCESS_SIZE = 224
_UNUSED_KEYS = frozenset({"params/clip/logit_scale"})


class MagicLensConversionError(ValueError):
    """The checkpoint is not a MagicLens checkpoint of the released layout, or not the one stated."""


def _released(vision: tuple, text: tuple, fusion: tuple) -> dict:
    width, layers, heads, patch, embed = vision
    text_width, text_layers, text_heads = text
    fusion_heads, pooler_heads = fusion
    return {
        "vision": {"hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": layers,
                   "num_attention_heads": heads, "patch_size": patch, "image_size": 224, "projection_dim": embed},
        "text": {"vocab_size": CLIP_VOCAB_SIZE, "hidden_size": text_width, "intermediate_size": 4 * text_width,
                 "num_hidden_layers": text_layers, "num_attention_heads": text_heads, "max_position_embeddings": 77,
                 "projection_dim": embed},
        "fusion": {"embed_dim": embed, "num_layers": 4, "num_attention_heads": fusion_heads,
                   "attention_head_dim": embed // fusion_heads, "ff_dim": 4 * embed,
                   "pooler_num_attention_heads": pooler_heads, "pooler_attention_head_dim": 4 * embed // pooler_heads,
                   "num_query_tokens": 1},
    }


# The two released architectures (magiclens model.py and scenic clip/model.py): ViT-B/16 and ViT-L/14 CLIP.
MAGICLENS_SIZES = {
    "base": _released(vision=(768, 12, 12, 16, 512), text=(512, 12, 8), fusion=(8, 8)),
    "large": _released(vision=(1024, 24, 16, 14, 768), text=(768, 12, 12), fusion=(16, 16)),
}

# scenic CLIP uses quick-GELU and LayerNorm eps 1e-5 in both towers.
_CLIP_COMMON = {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0}
_TEXT_TOKENS = {"bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0}


# --------------------------------------------------------------------------------------------------- architecture


def _count_blocks(shapes: Mapping, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)/")
    indices = {int(match.group(1)) for key in shapes if (match := pattern.match(key))}
    if indices != set(range(len(indices))):
        raise MagicLensConversionError(f"The blocks under {prefix!r} are not numbered 0..n-1: {sorted(indices)}.")
    return len(indices)


def infer_magiclens_architecture(shapes: Mapping[str, tuple]) -> dict:
    """The ``vision`` / ``text`` / ``fusion`` configurations implied by a flat ``{flax key: shape}`` map."""

    def shape(key: str) -> tuple:
        if key not in shapes:
            raise MagicLensConversionError(
                f"The checkpoint has no {key!r}: it is not a MagicLens checkpoint (first keys: {sorted(shapes)[:4]})."
            )
        return tuple(shapes[key])

    visual, text, pooler = "params/clip/visual/", "params/clip/text/", "params/contrastive_multimodal_pooler/"
    width = shape(visual + "class_embedding")[0]
    patch = shape(visual + "conv1/kernel")[0]
    grid = math.isqrt(shape(visual + "positional_embedding")[0] - 1)
    query_shape = shape(visual + "transformer/resblocks_0/attn/query/kernel")
    text_query = shape(text + "transformer/resblocks_0/attn/query/kernel")
    layer_query = shape("params/multimodal_encoder/x_layers_0/self_attention/query/w")
    pool_query = shape(pooler + "pool_attn/query/w")
    embed = shape(pooler + "pooling_attn_query")[1]
    return {
        "vision": {"hidden_size": width, "intermediate_size": shape(visual + "transformer/resblocks_0/mlp/c_fc/kernel")[1],
                   "num_hidden_layers": _count_blocks(shapes, visual + "transformer/resblocks_"),
                   "num_attention_heads": query_shape[1], "patch_size": patch, "image_size": grid * patch,
                   "projection_dim": shape(visual + "proj/kernel")[1]},
        "text": {"vocab_size": shape(text + "token_embedding/embedding")[0],
                 "hidden_size": shape(text + "token_embedding/embedding")[1],
                 "intermediate_size": shape(text + "transformer/resblocks_0/mlp/c_fc/kernel")[1],
                 "num_hidden_layers": _count_blocks(shapes, text + "transformer/resblocks_"),
                 "num_attention_heads": text_query[1],
                 "max_position_embeddings": shape(text + "positional_embedding")[0],
                 "projection_dim": shape(text + "text_projection/kernel")[1]},
        "fusion": {"embed_dim": embed,
                   "num_layers": _count_blocks(shapes, "params/multimodal_encoder/x_layers_"),
                   "num_attention_heads": layer_query[1], "attention_head_dim": layer_query[2],
                   "ff_dim": shape("params/multimodal_encoder/x_layers_0/ff_layer/ffn_layer1/linear/w")[1],
                   "pooler_num_attention_heads": pool_query[1], "pooler_attention_head_dim": pool_query[2],
                   "num_query_tokens": shape(pooler + "pooling_attn_query")[0]},
    }


def _check_stated_architecture(inferred: dict, stated: dict, what: str) -> None:
    differences = [
        f"{part}.{key} {value} vs {inferred[part].get(key)}"
        for part, values in stated.items()
        for key, value in values.items()
        if inferred[part].get(key) != value
    ]
    if differences:
        raise MagicLensConversionError(
            f"The checkpoint is not the MagicLens model that {what} describes (stated vs in the weights): "
            + ", ".join(differences[:8]) + (f", ... ({len(differences)} differences)" if len(differences) > 8 else "")
            + ". Check the file, or leave the size out to convert what the weights hold."
        )


def _stated_by_config_file(config_path: str | os.PathLike) -> tuple[dict, int]:
    """The architecture (and the preprocessing size) an authors'-style ``config.json`` states."""
    try:
        config = json.loads(Path(config_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise MagicLensConversionError(f"`config_path` {str(config_path)!r} could not be read as JSON ({error}).") from error
    if not isinstance(config, dict) or not isinstance(config.get("magiclens"), dict) or not isinstance(config.get("clip"), dict):
        raise MagicLensConversionError(
            f"{config_path} must hold an object with 'magiclens' and 'clip' sections (the MagicLens and scenic CLIP "
            "hyperparameters), as the reference fixtures' config.json does."
        )
    ml, clip = config["magiclens"], config["clip"]
    vision_heads = clip.get("vision_num_heads")
    if vision_heads is None and clip.get("vision_features") and clip.get("vision_head_dim"):
        vision_heads = clip["vision_features"] // clip["vision_head_dim"]  # scenic's fixed 64-wide vision heads
    fields = {
        "fusion": {"embed_dim": ml.get("embed_dim"), "num_layers": ml.get("num_layers"),
                   "num_attention_heads": ml.get("num_heads"), "ff_dim": ml.get("ff_hidden_size"),
                   "num_query_tokens": ml.get("num_query_token"),
                   "pooler_num_attention_heads": ml.get("pooler_num_heads"),
                   "pooler_attention_head_dim": ml.get("pooler_dim_per_head"),
                   "attention_head_dim": ml.get("mm_dim_per_head")},
        "vision": {"hidden_size": clip.get("vision_features"), "num_hidden_layers": clip.get("vision_num_layers"),
                   "patch_size": clip.get("vision_patch_size"), "image_size": clip.get("image_resolution"),
                   "num_attention_heads": vision_heads, "projection_dim": clip.get("embed_dim")},
        "text": {"hidden_size": clip.get("text_features"), "num_hidden_layers": clip.get("text_num_layers"),
                 "num_attention_heads": clip.get("text_num_heads"), "vocab_size": clip.get("vocab_size"),
                 "max_position_embeddings": clip.get("context_length"), "projection_dim": clip.get("embed_dim")},
    }
    stated = {part: {key: value for key, value in values.items() if value is not None} for part, values in fields.items()}
    size = config.get("preprocess_size", PREPROCESS_SIZE)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise MagicLensConversionError(f"{config_path}: 'preprocess_size' must be a positive integer, got {size!r}.")
    return stated, size


# --------------------------------------------------------------------------------------------------- key mapping


def _dense(value: torch.Tensor) -> torch.Tensor:
    return value.T


def _heads_in(value: torch.Tensor) -> torch.Tensor:  # [width, heads, head_dim] -> Linear.weight [heads*head_dim, width]
    return value.reshape(value.shape[0], -1).T


def _heads_out(value: torch.Tensor) -> torch.Tensor:  # [heads, head_dim, width] -> Linear.weight [width, heads*head_dim]
    return value.reshape(-1, value.shape[-1]).T


def _flat(value: torch.Tensor) -> torch.Tensor:
    return value.reshape(-1)


def _post(value: torch.Tensor) -> torch.Tensor:  # MagicLens post/w [D, heads, head_dim] is already [out, in]
    return value.reshape(value.shape[0], -1)


def _one_plus(value: torch.Tensor) -> torch.Tensor:  # MagicLens LayerNorm: x_hat * (1 + scale) + bias
    return 1.0 + value


def _conv(value: torch.Tensor) -> torch.Tensor:  # HWIO -> OIHW
    return value.permute(3, 2, 0, 1)


def _same(value: torch.Tensor) -> torch.Tensor:
    return value


_BLOCK_RULES = [  # inside scenic's resblocks_{i}
    (r"attn/(query|key|value)/kernel", lambda m: f"self_attn.{m[1][0]}_proj.weight", _heads_in),
    (r"attn/(query|key|value)/bias", lambda m: f"self_attn.{m[1][0]}_proj.bias", _flat),
    (r"attn/out/kernel", lambda m: "self_attn.out_proj.weight", _heads_out),
    (r"attn/out/bias", lambda m: "self_attn.out_proj.bias", _same),
    (r"ln_([12])/scale", lambda m: f"layer_norm{m[1]}.weight", _same),
    (r"ln_([12])/bias", lambda m: f"layer_norm{m[1]}.bias", _same),
    (r"mlp/c_fc/kernel", lambda m: "mlp.fc1.weight", _dense),
    (r"mlp/c_fc/bias", lambda m: "mlp.fc1.bias", _same),
    (r"mlp/c_proj/kernel", lambda m: "mlp.fc2.weight", _dense),
    (r"mlp/c_proj/bias", lambda m: "mlp.fc2.bias", _same),
]

_MAGICLENS_ATTENTION = [  # inside self_attention/ and pool_attn/
    (r"(query|key|value)/w", lambda m: f"to_{m[1][0]}.weight", _heads_in),
    (r"(query|key|value)/b", lambda m: f"to_{m[1][0]}.bias", _flat),
    (r"post/w", lambda m: "to_out.weight", _post),
    (r"post/b", lambda m: "to_out.bias", _same),
]

_TOP_RULES = [
    ("image_encoder", r"params/clip/visual/class_embedding", "vision_model.embeddings.class_embedding", _same),
    ("image_encoder", r"params/clip/visual/conv1/kernel", "vision_model.embeddings.patch_embedding.weight", _conv),
    ("image_encoder", r"params/clip/visual/positional_embedding", "vision_model.embeddings.position_embedding.weight", _same),
    ("image_encoder", r"params/clip/visual/ln_pre/(scale|bias)", "vision_model.pre_layrnorm.{p}", _same),
    ("image_encoder", r"params/clip/visual/ln_post/(scale|bias)", "vision_model.post_layernorm.{p}", _same),
    ("image_encoder", r"params/clip/visual/proj/kernel", "visual_projection.weight", _dense),
    ("text_encoder", r"params/clip/text/token_embedding/embedding", "text_model.embeddings.token_embedding.weight", _same),
    ("text_encoder", r"params/clip/text/positional_embedding", "text_model.embeddings.position_embedding.weight", _same),
    ("text_encoder", r"params/clip/text/ln_final/(scale|bias)", "text_model.final_layer_norm.{p}", _same),
    ("text_encoder", r"params/clip/text/text_projection/kernel", "text_projection.weight", _dense),
    ("fusion", r"params/contrastive_multimodal_pooler/pooling_attn_query", "pooler.query", _same),
    ("fusion", r"params/contrastive_multimodal_pooler/pool_attn/per_dim_scale/per_dim_scale",
     "pooler.attention.per_dim_scale", _same),
    ("fusion", r"params/contrastive_multimodal_pooler/pool_attn_ln/(scale|bias)", "pooler.norm.{p}", None),
    ("fusion", r"params/multimodal_encoder/x_layers_(\d+)/layer_norm/(scale|bias)", "layers.{i}.norm.{p}", None),
    ("fusion", r"params/multimodal_encoder/x_layers_(\d+)/ff_layer/layer_norm/(scale|bias)",
     "layers.{i}.feed_forward.norm.{p}", None),
    ("fusion", r"params/multimodal_encoder/x_layers_(\d+)/ff_layer/ffn_layer([12])/linear/w",
     "layers.{i}.feed_forward.linear_{n}.weight", _dense),
    ("fusion", r"params/multimodal_encoder/x_layers_(\d+)/ff_layer/ffn_layer([12])/bias/b",
     "layers.{i}.feed_forward.linear_{n}.bias", _same),
]


def _map_clip_block(key: str) -> tuple[str, str, Callable] | None:
    match = re.fullmatch(r"params/clip/(visual|text)/transformer/resblocks_(\d+)/(.+)", key)
    if match is None:
        return None
    component, tower = ("image_encoder", "vision_model") if match[1] == "visual" else ("text_encoder", "text_model")
    for pattern, target, transform in _BLOCK_RULES:
        inner = re.fullmatch(pattern, match[3])
        if inner:
            return component, f"{tower}.encoder.layers.{match[2]}.{target(inner)}", transform
    return None


def _map_magiclens_attention(key: str) -> tuple[str, str, Callable] | None:
    match = re.fullmatch(
        r"params/(?:multimodal_encoder/x_layers_(\d+)/self_attention|contrastive_multimodal_pooler/pool_attn)/(.+)", key
    )
    if match is None:
        return None
    prefix = f"layers.{match[1]}.attention" if match[1] is not None else "pooler.attention"
    for pattern, target, transform in _MAGICLENS_ATTENTION:
        inner = re.fullmatch(pattern, match[2])
        if inner:
            return "fusion", f"{prefix}.{target(inner)}", transform
    return None


def map_magiclens_key(key: str) -> tuple[str, str, Callable] | None:
    """``(component, torch key, transform)`` of a flax key, or ``None`` for a key that is not MagicLens's."""
    for mapper in (_map_clip_block, _map_magiclens_attention):
        mapped = mapper(key)
        if mapped is not None:
            return mapped
    for component, pattern, target, transform in _TOP_RULES:
        match = re.fullmatch(pattern, key)
        if match is None:
            continue
        groups = list(match.groups())
        parameter = groups.pop() if groups and groups[-1] in ("scale", "bias") else None
        fields = {"i": groups[0] if groups else None, "n": groups[1] if len(groups) > 1 else None,
                  "p": {"scale": "weight", "bias": "bias", None: None}[parameter]}
        if transform is None:  # a MagicLens LayerNorm: the gain is 1 + scale
            transform = _one_plus if parameter == "scale" else _same
        return component, target.format(**fields), transform
    return None


def convert_magiclens_state_dict(
    flat: Mapping[str, torch.Tensor], release: bool = False
) -> dict[str, dict[str, torch.Tensor]]:
    """Map a flat flax tree ``{"params/...": tensor}`` to ``{component: state dict}`` (``image_encoder``,
    ``text_encoder``, ``fusion``). Unknown keys raise; ``params/clip/logit_scale`` is dropped. Works on ``meta``
    tensors too (to check a key and shape map without the weights). ``release=True`` empties ``flat`` as it goes, so
    that a full-size checkpoint is not held twice."""
    converted: dict[str, dict[str, torch.Tensor]] = {"image_encoder": {}, "text_encoder": {}, "fusion": {}}
    unknown = []
    for key in list(flat):
        value = flat.pop(key) if release else flat[key]
        if key in _UNUSED_KEYS:
            continue
        mapped = map_magiclens_key(key)
        if mapped is None:
            unknown.append(key)
            continue
        component, target, transform = mapped
        converted[component][target] = transform(value).contiguous()
    if unknown:
        raise MagicLensConversionError(
            f"{len(unknown)} keys of the checkpoint are not MagicLens weights (another model?): {sorted(unknown)[:8]}."
        )
    return converted


# --------------------------------------------------------------------------------------------------- models


def magiclens_model_configs(architecture: dict):
    """``(CLIPVisionConfig, CLIPTextConfig, MagicLensFusion kwargs)`` of an architecture (see :data:`MAGICLENS_SIZES`)."""
    from transformers import CLIPTextConfig, CLIPVisionConfig

    vision = CLIPVisionConfig(**architecture["vision"], **_CLIP_COMMON)
    text = CLIPTextConfig(**architecture["text"], **_CLIP_COMMON, **_TEXT_TOKENS)
    return vision, text, dict(architecture["fusion"])


def empty_magiclens_models(architecture: dict) -> dict[str, torch.nn.Module]:
    """The three models of ``architecture`` on the ``meta`` device (no memory, no initialisation)."""
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    from ..models.magiclens_fusion import MagicLensFusion

    vision, text, fusion = magiclens_model_configs(architecture)
    with torch.device("meta"):
        return {
            "image_encoder": CLIPVisionModelWithProjection(vision),
            "text_encoder": CLIPTextModelWithProjection(text),
            "fusion": MagicLensFusion(**fusion),
        }


def _check_state_dicts(models: Mapping[str, torch.nn.Module], converted: Mapping[str, Mapping]) -> None:
    for name, model in models.items():
        expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
        got = {key: tuple(value.shape) for key, value in converted[name].items()}
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        wrong = [f"{key}: checkpoint {got[key]}, model {expected[key]}" for key in sorted(set(got) & set(expected))
                 if got[key] != expected[key]]
        if missing or extra or wrong:
            raise MagicLensConversionError(
                f"The checkpoint does not fill the MagicLens {name}: missing {missing[:5]}, unexpected {extra[:5]}, "
                f"shapes {wrong[:5]}."
            )


def _fill_position_ids(model: torch.nn.Module) -> None:
    """transformers' CLIP keeps ``position_ids`` as non-persistent buffers, which a state dict does not carry: after
    a meta-device build they are recreated (0..n-1); any other buffer left empty is a mistake."""
    for name, buffer in list(model.named_buffers()):
        if not buffer.is_meta:
            continue
        assert name.endswith("position_ids"), f"buffer {name} was not loaded"
        owner, _, leaf = name.rpartition(".")
        values = torch.arange(buffer.shape[-1]).expand(buffer.shape).clone()
        model.get_submodule(owner).register_buffer(leaf, values, persistent=False)


def build_magiclens_components(
    flat: Mapping[str, torch.Tensor],
    torch_dtype: torch.dtype | None = None,
    architecture: dict | None = None,
    release: bool = False,
) -> dict[str, torch.nn.Module]:
    """``image_encoder``, ``text_encoder`` and ``fusion`` with the checkpoint's weights (``flat``: the flattened
    flax tree; emptied as it is read with ``release=True``). Built on the meta device and filled in place: no random
    initialisation, no second copy."""
    architecture = architecture or infer_magiclens_architecture({key: tuple(value.shape) for key, value in flat.items()})
    if architecture["text"]["vocab_size"] != CLIP_VOCAB_SIZE:
        raise MagicLensConversionError(
            f"The text tower has {architecture['text']['vocab_size']} token embeddings; CLIP's BPE tokenizer, which "
            f"MagicLens uses, has {CLIP_VOCAB_SIZE}."
        )
    converted = convert_magiclens_state_dict(flat, release=release)
    models = empty_magiclens_models(architecture)
    _check_state_dicts(models, converted)
    dtype = torch_dtype or torch.float32
    for name, model in models.items():
        model.load_state_dict({key: value.to(dtype) for key, value in converted[name].items()}, strict=True, assign=True)
        _fill_position_ids(model)
        model.eval()
    return models


# --------------------------------------------------------------------------------------------------- files


def load_magiclens_checkpoint(checkpoint_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The flattened variables tree (``{"params/clip/...": tensor}``) of a released ``.pkl``, read safely."""
    from .flax_checkpoint import flatten_tree, load_pickled_flax_checkpoint

    return flatten_tree(load_pickled_flax_checkpoint(checkpoint_path))


def stated_architecture(model_size: str | None = None, config_path: str | os.PathLike | None = None) -> tuple[dict | None, int]:
    """What ``model_size`` or ``config_path`` says the checkpoint is, and the preprocessing size."""
    if model_size is not None and config_path is not None:
        raise ValueError("Pass `model_size` or `config_path`, not both.")
    if model_size is not None:
        if model_size not in MAGICLENS_SIZES:
            raise ValueError(f"`model_size` must be one of {sorted(MAGICLENS_SIZES)}, got {model_size!r}.")
        return MAGICLENS_SIZES[model_size], PREPROCESS_SIZE
    if config_path is not None:
        return _stated_by_config_file(config_path)
    return None, PREPROCESS_SIZE


def convert_magiclens_checkpoint_to_pipeline(
    checkpoint_path: str | os.PathLike,
    output_path: str | os.PathLike,
    model_size: str | None = None,
    config_path: str | os.PathLike | None = None,
    torch_dtype: torch.dtype | None = None,
    overwrite: bool = False,
    overwrite_flag: str = "overwrite=True",
):
    """Convert a released MagicLens ``.pkl`` into a :class:`~diffusers_cir.MagicLensPipeline` folder.

    ``model_size`` (``"base"`` / ``"large"``) or ``config_path`` (an authors'-style ``config.json`` with ``magiclens``
    and ``clip`` sections, and ``preprocess_size``) state what the checkpoint should be; without them the architecture
    is read from the weights. ``output_path`` ends up holding exactly the new pipeline (written next to it and swapped
    in; see :mod:`diffusers_cir.conversion.output`).

    Example:
        >>> from diffusers_cir.conversion.magiclens import convert_magiclens_checkpoint_to_pipeline
        >>> pipe = convert_magiclens_checkpoint_to_pipeline(  # doctest: +SKIP
        ...     "magic_lens_clip_large.pkl", "magiclens-large", model_size="large")
    """
    from ..pipelines.image_processing_magiclens import MagicLensImageProcessor
    from ..pipelines.pipeline_magiclens import MagicLensPipeline
    from ..utils import build_offline_clip_tokenizer
    from .output import check_output_folder, replace_output_folder

    stated, preprocess_size = stated_architecture(model_size, config_path)
    check_output_folder(output_path, overwrite, flag=overwrite_flag)  # before the (long) conversion
    flat = load_magiclens_checkpoint(checkpoint_path)
    architecture = infer_magiclens_architecture({key: tuple(value.shape) for key, value in flat.items()})
    if stated is not None:
        _check_stated_architecture(architecture, stated, f"model_size={model_size!r}" if model_size else str(config_path))
    models = build_magiclens_components(flat, torch_dtype=torch_dtype, architecture=architecture, release=True)
    pipe = MagicLensPipeline(
        **models,
        tokenizer=build_offline_clip_tokenizer(model_max_length=architecture["text"]["max_position_embeddings"], pad_token="!"),
        image_processor=MagicLensImageProcessor(squash_size=preprocess_size, image_size=architecture["vision"]["image_size"]),
    )
    card = _conversion_card(checkpoint_path, output_path, model_size, config_path, torch_dtype, architecture)
    with replace_output_folder(output_path, overwrite, overwrite_flag) as staging:
        pipe.save_pretrained(staging, safe_serialization=True, model_card=card)
    return pipe


# What the authors' weights are published to reach (zero-shot), for the card of a converted release.
_PUBLISHED = {
    "base": "CIRCO mAP@5 23.1 (test; 22.3 for the released weights per the authors' README), CIRR R@1 27.0 (test), "
    "FashionIQ R@10 26.3 (val, mean of the 3 categories)",
    "large": "CIRCO mAP@5 29.6 (test; 29.5 for the released weights per the authors' README), CIRR R@1 30.1 (test), "
    "FashionIQ R@10 30.7 (val, mean of the 3 categories)",
}


def _conversion_card(checkpoint_path, output_path, model_size, config_path, torch_dtype, architecture):
    from ..utils.model_card import conversion_card

    size = next((name for name, released in MAGICLENS_SIZES.items() if released == architecture), None)
    note = (
        "Converted from the authors' released MagicLens weights (google-deepmind/magiclens), read without unpickling; "
        "the model reproduces the authors' JAX code to 1e-5 on the normalised embeddings."
    )
    if size is not None:
        note += (
            f" Published zero-shot results of MagicLens-{size[0].upper()} (CLIP), as the MegaPairs paper (arXiv:2412.14475, "
            f"Table 1) quotes the MagicLens paper: {_PUBLISHED[size]}. Protocol and sources: hub/models/magiclens in "
            "diffusers-cir."
        )
    card = conversion_card(
        "magiclens",
        {"--checkpoint-path": checkpoint_path, "--model-size": model_size, "--config-path": config_path,
         "--output": output_path, "--dtype": str(torch_dtype).removeprefix("torch.") if torch_dtype else None},
        [checkpoint_path],
        license="cc-by-4.0",  # google-deepmind/magiclens: materials other than code are CC BY 4.0
        note=note,
    )
    card.model_name = Path(output_path).resolve().name  # not the staging folder's name the card is written in
    return card


# --------------------------------------------------------------------------------------------------- layout


def _checkpoint_in(path: Path) -> Path | None:
    from .flax_checkpoint import looks_like_pickled_flax_checkpoint

    if path.is_file():
        return path if path.suffix == ".pkl" and looks_like_pickled_flax_checkpoint(path) else None
    if path.is_dir():
        found = [file for file in sorted(path.glob("*.pkl")) if looks_like_pickled_flax_checkpoint(file)]
        return found[0] if len(found) == 1 else None
    return None


def is_released_magiclens(path) -> bool:
    """A released MagicLens ``.pkl`` (a pickled flax checkpoint), or a folder holding exactly one."""
    return _checkpoint_in(Path(path)) is not None


def _convert_released_magiclens(source, output_dir, model_size=None, config_path=None, torch_dtype=None):
    source = Path(source)
    checkpoint = _checkpoint_in(source)
    if config_path is None and model_size is None and source.is_dir() and (source / "config.json").is_file():
        config_path = source / "config.json"  # the fixtures' layout: checkpoint.pkl + config.json
    convert_magiclens_checkpoint_to_pipeline(
        checkpoint, output_dir, model_size=model_size, config_path=config_path, torch_dtype=torch_dtype
    )


def _register_layout() -> None:
    from ..pipelines.auto import ReleasedLayout, register_layout

    register_layout(ReleasedLayout(
        name="magiclens-released",
        description="the authors' MagicLens release: magic_lens_clip_{base,large}.pkl (a pickled flax checkpoint), or "
        "a folder with one .pkl (and an optional config.json); model_size= or config_path= state what it is",
        matches=is_released_magiclens,
        convert=_convert_released_magiclens,
        options=("model_size", "config_path", "torch_dtype"),
        path_options=("config_path",),
    ))


_register_layout()
