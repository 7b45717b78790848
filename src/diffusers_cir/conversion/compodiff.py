# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Convert the released CompoDiff checkpoints (transformers-style ``config.json`` + ``pytorch_model.bin``) to
a :class:`~diffusers_cir.CompoDiffTransformer` (and, with :func:`convert_compodiff_checkpoint_to_pipeline`, to a
pipeline folder).

The released layout wraps the denoiser in a transformers ``PreTrainedModel``: ``model.net.*`` are the denoiser
weights and ``model.noise_scheduler.*`` are schedule buffers, which :class:`~diffusers_cir.CompoDiffScheduler`
recomputes (they are dropped; the published checkpoint also carries a misspelled ``biass`` buffer there).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import torch

from ..models.compodiff_transformer import CompoDiffTransformer

# Released config.json field -> CompoDiffTransformer argument.
CONFIG_FIELDS = {
    "embed_dim": "embedding_dim",
    "model_depth": "num_layers",
    "model_dim": "attention_head_dim",
    "model_heads": "num_attention_heads",
    "timesteps": "num_train_timesteps",
}

# Regex on the key with its "model.net." prefix removed -> our key (with \1 = layer index where present).
_KEY_RULES: list[tuple[str, str]] = [
    (r"to_text_embeds\.0\.(weight|bias)", r"text_proj.\1"),
    (r"to_time_embeds\.0\.1\.net\.0\.0\.(weight|bias)", r"time_embedding.linear_1.\1"),
    (r"to_time_embeds\.0\.1\.net\.1\.0\.(weight|bias)", r"time_embedding.linear_2.\1"),
    (r"to_time_embeds\.0\.1\.net\.2\.(weight|bias)", r"time_embedding.linear_3.\1"),
    (r"to_mask_embeds\.1\.net\.0\.0\.(weight|bias)", r"mask_embedding.linear_1.\1"),
    (r"to_mask_embeds\.1\.net\.1\.0\.(weight|bias)", r"mask_embedding.linear_2.\1"),
    (r"to_mask_embeds\.1\.net\.2\.(weight|bias)", r"mask_embedding.linear_3.\1"),
    (r"transformer\.rel_pos_bias\.relative_attention_bias\.weight", r"relative_position_bias.weight"),
    (r"transformer\.norm\.g", r"norm_out.weight"),
    (r"transformer\.project_out\.weight", r"proj_out.weight"),
    (r"transformer\.layers\.(\d+)\.0\.null_kv", r"blocks.\1.self_attn.null_kv"),
    (r"transformer\.layers\.(\d+)\.0\.norm\.g", r"blocks.\1.self_attn.norm.weight"),
    (r"transformer\.layers\.(\d+)\.0\.to_q\.weight", r"blocks.\1.self_attn.to_q.weight"),
    (r"transformer\.layers\.(\d+)\.0\.to_kv\.weight", r"blocks.\1.self_attn.to_kv.weight"),
    (r"transformer\.layers\.(\d+)\.0\.to_out\.0\.weight", r"blocks.\1.self_attn.to_out.weight"),
    (r"transformer\.layers\.(\d+)\.0\.to_out\.1\.g", r"blocks.\1.self_attn.out_norm.weight"),
    (r"transformer\.layers\.(\d+)\.1\.null_kv", r"blocks.\1.cross_attn.null_kv"),
    (r"transformer\.layers\.(\d+)\.1\.norm\.g", r"blocks.\1.cross_attn.norm.weight"),
    (r"transformer\.layers\.(\d+)\.1\.to_q\.weight", r"blocks.\1.cross_attn.to_q.weight"),
    (r"transformer\.layers\.(\d+)\.1\.to_kv\.weight", r"blocks.\1.cross_attn.to_kv.weight"),
    (r"transformer\.layers\.(\d+)\.1\.to_out\.0\.weight", r"blocks.\1.cross_attn.to_out.weight"),
    (r"transformer\.layers\.(\d+)\.1\.to_out\.1\.g", r"blocks.\1.cross_attn.out_norm.weight"),
    (r"transformer\.layers\.(\d+)\.2\.0\.g", r"blocks.\1.ff.norm.weight"),
    (r"transformer\.layers\.(\d+)\.2\.1\.weight", r"blocks.\1.ff.proj_in.weight"),
    (r"transformer\.layers\.(\d+)\.2\.5\.weight", r"blocks.\1.ff.proj_out.weight"),
]
_COMPILED_RULES = [(re.compile(pattern + r"$"), target) for pattern, target in _KEY_RULES]
_ROTARY_KEY = re.compile(r"transformer\.layers\.(\d+)\.0\.rotary_emb\.freqs$")
_NET_PREFIX = "model.net."
_SCHEDULE_PREFIX = "model.noise_scheduler."
# The schedule buffers of the released checkpoints (recomputed by CompoDiffScheduler, so dropped), plus the
# misspelled `biass` buffer some of them carry. Any other `model.noise_scheduler.*` key is reported, not dropped.
_SCHEDULE_BUFFERS = frozenset(
    {
        "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
        "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
        "p2_loss_weight", "biass",
    }
)


class CompoDiffConversionError(ValueError):
    """The checkpoint is not a CompoDiff checkpoint of the released layout (or is incomplete)."""


def load_original_checkpoint(checkpoint_path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read ``config.json`` and the state dict of a released checkpoint folder (or a single weights file).

    ``.bin``/``.pt`` files are loaded with ``weights_only=True``: a pickle from the internet must not run code.
    """
    if os.path.isdir(checkpoint_path):
        folder = checkpoint_path
        candidates = ["model.safetensors", "pytorch_model.bin", "pytorch_model.pt"]
        weights = next((os.path.join(folder, name) for name in candidates if os.path.isfile(os.path.join(folder, name))), None)
        if weights is None:
            raise FileNotFoundError(
                f"No weights in {folder!r}: expected one of {candidates} (the layout of navervision/CompoDiff-*)."
            )
    elif os.path.isfile(checkpoint_path):
        folder, weights = os.path.dirname(checkpoint_path), checkpoint_path
    else:
        raise FileNotFoundError(f"`checkpoint_path` {checkpoint_path!r} is neither a folder nor a file.")

    config = {}
    config_file = os.path.join(folder, "config.json")
    if os.path.isfile(config_file):
        try:
            with open(config_file, encoding="utf-8") as handle:
                config = json.load(handle)
        except ValueError as error:
            raise CompoDiffConversionError(f"{config_file!r} is not valid JSON: {error}") from error
        if not isinstance(config, Mapping):
            raise CompoDiffConversionError(f"{config_file!r} must hold a JSON object, got {type(config).__name__}.")

    if weights.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            state_dict = load_file(weights)
        except Exception as error:  # SafetensorError does not name the file
            raise CompoDiffConversionError(f"Could not read {weights!r} as a safetensors file: {error}") from error
    else:
        try:
            state_dict = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle with code in it, or not a torch file at all
            raise CompoDiffConversionError(
                f"Could not load {weights!r} as plain tensors (weights_only=True): {error}"
            ) from error
    if isinstance(state_dict, Mapping) and "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, Mapping):
        raise CompoDiffConversionError(f"{weights!r} does not hold a state dict (got {type(state_dict).__name__}).")
    return config, dict(state_dict)


def _infer_config(original_config: Mapping, net_state: Mapping[str, torch.Tensor]) -> dict:
    """Our config from the released config.json, completed and checked against the weight shapes."""
    config: dict = {}
    for original, ours in CONFIG_FIELDS.items():
        if original in original_config:
            config[ours] = int(original_config[original])

    def shape(key):
        if key not in net_state:
            raise CompoDiffConversionError(f"The checkpoint has no `model.net.{key}`: not a CompoDiff checkpoint.")
        return tuple(net_state[key].shape)

    dim, text_dim = shape("to_text_embeds.0.weight")
    layers = {int(m.group(1)) for key in net_state if (m := re.match(r"transformer\.layers\.(\d+)\.", key))}
    head_dim = shape("transformer.layers.0.0.null_kv")[1]
    inferred = {
        "embedding_dim": dim,
        "text_embedding_dim": text_dim,
        "num_layers": len(layers),
        "attention_head_dim": head_dim,
        "num_attention_heads": shape("transformer.layers.0.0.to_q.weight")[0] // head_dim,
        "num_cross_attention_heads": shape("transformer.layers.0.1.to_q.weight")[0] // head_dim,
        "mask_size": int(round(shape("to_mask_embeds.1.net.0.0.weight")[1] ** 0.5)),
        "relative_position_buckets": shape("transformer.rel_pos_bias.relative_attention_bias.weight")[0],
        "ff_mult": shape("transformer.layers.0.2.5.weight")[1] // dim,
    }
    if "transformer.layers.0.0.rotary_emb.freqs" in net_state:
        inferred["rotary_dim"] = 2 * shape("transformer.layers.0.0.rotary_emb.freqs")[0]
    for key, value in inferred.items():
        if key in config and config[key] != value:
            raise CompoDiffConversionError(
                f"config.json says {key}={config[key]} but the weights imply {value}: config and weights do not match."
            )
        config[key] = value
    return config


def convert_compodiff_state_dict(
    state_dict: Mapping[str, torch.Tensor], original_config: Mapping | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Map a released state dict to ``(config, state_dict)`` of :class:`CompoDiffTransformer`.

    Every key is either mapped or deliberately dropped (the known ``model.noise_scheduler.*`` buffers; the per-layer copies of
    the shared rotary frequencies, after checking they agree). Unknown keys raise, so a wrong file cannot convert
    "successfully" into a half-initialised model.
    """
    net_state, unknown = {}, []
    for key, value in state_dict.items():
        if key.startswith(_NET_PREFIX):
            net_state[key[len(_NET_PREFIX) :]] = value
        elif not (key.startswith(_SCHEDULE_PREFIX) and key[len(_SCHEDULE_PREFIX) :] in _SCHEDULE_BUFFERS):
            unknown.append(key)
    if not net_state:
        raise CompoDiffConversionError(
            "No `model.net.*` weights found: this is not a released CompoDiff checkpoint "
            f"(first keys: {list(state_dict)[:5]})."
        )
    config = _infer_config(original_config or {}, net_state)

    converted: dict[str, torch.Tensor] = {}
    rotary: torch.Tensor | None = None
    for key, value in net_state.items():
        if _ROTARY_KEY.match(key):
            if rotary is None:
                rotary = value
            elif not torch.equal(rotary, value):
                raise CompoDiffConversionError(f"`{key}` differs from layer 0's rotary frequencies; they must be shared.")
            continue
        for pattern, target in _COMPILED_RULES:
            if pattern.match(key):
                converted[pattern.sub(target, key)] = value
                break
        else:
            unknown.append(_NET_PREFIX + key)
    if unknown:
        raise CompoDiffConversionError(f"Unknown keys in the checkpoint (not CompoDiff?): {sorted(unknown)[:10]}")
    _check_schedule(state_dict, config.get("num_train_timesteps", 1000))
    if rotary is not None:
        converted["rotary_frequencies"] = rotary
    return config, converted


def _check_schedule(state_dict: Mapping[str, torch.Tensor], num_train_timesteps: int) -> None:
    """The schedule buffers are dropped because CompoDiffScheduler recomputes them: make sure they agree."""
    stored = state_dict.get(_SCHEDULE_PREFIX + "alphas_cumprod")
    if stored is None:
        return
    from ..schedulers.scheduling_compodiff import CompoDiffScheduler

    expected = CompoDiffScheduler(num_train_timesteps=num_train_timesteps).alphas_cumprod
    if stored.shape != expected.shape or (stored.float() - expected).abs().max() > 1e-6:
        raise CompoDiffConversionError(
            "The checkpoint's noise schedule (`model.noise_scheduler.alphas_cumprod`) is not the cosine schedule "
            "that CompoDiffScheduler computes; sampling it with this package would be wrong."
        )


def convert_compodiff_checkpoint(checkpoint_path: str, torch_dtype: torch.dtype | None = None) -> CompoDiffTransformer:
    """Load a released CompoDiff checkpoint folder (or weights file) as a :class:`CompoDiffTransformer`.

    Example:
        >>> from diffusers_cir.conversion import convert_compodiff_checkpoint
        >>> transformer = convert_compodiff_checkpoint("CompoDiff-Aesthetic/")  # doctest: +SKIP
        >>> transformer.save_pretrained("compodiff-aesthetic-diffusers/transformer")  # doctest: +SKIP
    """
    original_config, state_dict = load_original_checkpoint(checkpoint_path)
    config, converted = convert_compodiff_state_dict(state_dict, original_config)
    model = CompoDiffTransformer(**config)
    expected = set(model.state_dict())
    missing = sorted(expected - set(converted))
    if missing:
        raise CompoDiffConversionError(f"The checkpoint is incomplete; missing weights for: {missing[:10]}")
    for key, value in converted.items():
        target = model.state_dict()[key]
        if tuple(value.shape) != tuple(target.shape):
            raise CompoDiffConversionError(
                f"Shape mismatch for {key}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}."
            )
    model.load_state_dict(converted, strict=True)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    return model.eval()


def convert_compodiff_checkpoint_to_pipeline(
    checkpoint_path: str,
    output_path: str,
    text_encoder_path: str | None = None,
    image_encoder_path: str | None = None,
    torch_dtype: torch.dtype | None = None,
    safe_serialization: bool = True,
    overwrite: bool = False,
):
    """Convert a released checkpoint into a complete :class:`~diffusers_cir.CompoDiffPipeline` folder.

    ``text_encoder_path`` / ``image_encoder_path`` are local transformers folders (or Hub ids, where the Hub is
    reachable) of the CLIP towers the model was trained with: for CompoDiff-Aesthetic the open_clip ViT-bigG/14 text
    tower (hidden states, width 1280; with its tokenizer) and the OpenAI ViT-L/14 vision tower (with its image
    processor). Without them the folder holds the denoiser and scheduler and runs on precomputed embeddings.

    ``output_path`` ends up holding exactly the new pipeline: it is written next to it and swapped in at the end (a
    failed conversion leaves it as it was). A non-empty ``output_path`` is refused unless ``overwrite=True``, and
    even then unless it holds an earlier conversion (see :mod:`diffusers_cir.conversion.output`).

    Example:
        >>> from diffusers_cir.conversion import convert_compodiff_checkpoint_to_pipeline
        >>> pipe = convert_compodiff_checkpoint_to_pipeline(  # doctest: +SKIP
        ...     "CompoDiff-Aesthetic/", "compodiff-aesthetic-diffusers",
        ...     text_encoder_path="CLIP-ViT-bigG-14-laion2B-39B-b160k", image_encoder_path="clip-vit-large-patch14")
    """
    from ..pipelines.pipeline_compodiff import CompoDiffPipeline
    from ..schedulers.scheduling_compodiff import CompoDiffScheduler
    from ..utils.model_card import conversion_card
    from .output import check_output_folder, replace_output_folder

    check_output_folder(output_path, overwrite)  # before the (long) conversion
    transformer = convert_compodiff_checkpoint(checkpoint_path, torch_dtype=torch_dtype)
    components = dict(
        transformer=transformer,
        scheduler=CompoDiffScheduler(num_train_timesteps=transformer.config.num_train_timesteps),
    )
    if text_encoder_path is not None:
        from transformers import CLIPTextModel, CLIPTokenizer

        text_encoder = CLIPTextModel.from_pretrained(text_encoder_path, torch_dtype=torch_dtype)
        if text_encoder.config.hidden_size != transformer.config.text_embedding_dim:
            raise CompoDiffConversionError(
                f"The text encoder at {text_encoder_path!r} has hidden size {text_encoder.config.hidden_size}, but the "
                f"denoiser expects {transformer.config.text_embedding_dim}."
            )
        components.update(text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(text_encoder_path))
    if image_encoder_path is not None:
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        image_encoder = CLIPVisionModelWithProjection.from_pretrained(image_encoder_path, torch_dtype=torch_dtype)
        if image_encoder.config.projection_dim != transformer.config.embedding_dim:
            raise CompoDiffConversionError(
                f"The image encoder at {image_encoder_path!r} projects to {image_encoder.config.projection_dim}, but the "
                f"denoiser works on {transformer.config.embedding_dim}-wide embeddings."
            )
        components.update(
            image_encoder=image_encoder, image_processor=CLIPImageProcessor.from_pretrained(image_encoder_path)
        )
    pipe = CompoDiffPipeline(**components)
    card = conversion_card(
        "compodiff",
        {"--checkpoint_path": checkpoint_path, "--output_path": output_path, "--text_encoder_path": text_encoder_path,
         "--image_encoder_path": image_encoder_path, "--dtype": str(torch_dtype).removeprefix("torch.") if torch_dtype else None},
        [checkpoint_path, text_encoder_path, image_encoder_path],
        license="apache-2.0",  # navervision/CompoDiff's license
        note="Converted from the authors' released CompoDiff checkpoint (navervision/CompoDiff); the CLIP towers keep "
        "their own licenses.",
    )
    with replace_output_folder(output_path, overwrite) as staging:
        pipe.save_pretrained(staging, safe_serialization=safe_serialization, model_card=card)
    return pipe


_RELEASED_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pt")


def is_released_compodiff_folder(path) -> bool:
    """The authors' release layout: ``config.json`` with CompoDiff's keys next to a weights file."""
    from pathlib import Path

    path = Path(path)
    if not path.is_dir() or not any((path / name).is_file() for name in _RELEASED_WEIGHTS):
        return False
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"embed_dim", "model_depth"} <= set(config) and "_class_name" not in config


def _convert_released_compodiff(source, output_dir, text_encoder_path=None, image_encoder_path=None, torch_dtype=None):
    convert_compodiff_checkpoint_to_pipeline(
        str(source), str(output_dir), text_encoder_path=text_encoder_path, image_encoder_path=image_encoder_path,
        torch_dtype=torch_dtype,
    )


def _register_layout() -> None:
    from ..pipelines.auto import ReleasedLayout, register_layout

    register_layout(ReleasedLayout(
        name="compodiff-released",
        description="the authors' CompoDiff release (navervision/CompoDiff-*): config.json with embed_dim/model_depth "
        "+ pytorch_model.bin; CLIP towers as text_encoder_path= / image_encoder_path=",
        matches=is_released_compodiff_folder,
        convert=_convert_released_compodiff,
        options=("text_encoder_path", "image_encoder_path", "torch_dtype"),
        path_options=("text_encoder_path", "image_encoder_path"),
    ))


_register_layout()
