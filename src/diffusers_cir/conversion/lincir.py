"""Convert released textual-inversion projections (LinCIR, SEARLE, Pic2Word) to a
:class:`~diffusers_cir.models.textual_inversion_projection.TextualInversionProjection`, and assemble a
:class:`~diffusers_cir.pipelines.LinCIRPipeline` folder from one.

Released layouts (a ``torch.save`` pickle, read here with ``weights_only=True`` so that no code runs):

- LinCIR (``navervision/zeroshot-cir-models``, ``lincir_large.pt`` ...) and SEARLE: ``{'Phi': state_dict}``
  (sometimes with an ``'epoch'`` entry) where ``state_dict`` is an ``nn.Sequential`` of
  ``Linear, GELU, Dropout, Linear, GELU, Dropout, Linear``: keys ``layers.0.*``, ``layers.3.*``, ``layers.6.*``.
- Pic2Word: ``{'state_dict_img2text': state_dict, 'state_dict': <CLIP>, ...}`` with keys
  ``layers.{i}.0.*`` (``Linear, Dropout, ReLU`` blocks) and ``fc_out.*``, often prefixed ``module.``.
- A bare state dict of either kind, or one already in this package's layout.

Every tensor of the source state dict is mapped or the conversion fails naming the leftovers: nothing is
silently dropped. Dropout cannot be read from weights; the method's published value is used unless given.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import torch

from ..models.textual_inversion_projection import TextualInversionProjection
from ..pipelines.auto import resolve_pretrained_path
from .output import check_output_folder, replace_output_folder

# Dropout the authors trained with (LinCIR's train_phi.py default `--phi_dropout 0.5`, SEARLE's 0.5,
# Pic2Word's IM2TEXT default 0.1). It only matters if the converted model is trained further.
_DEFAULT_DROPOUT = {"phi": 0.5, "pic2word": 0.1, "diffusers": 0.5}
_ACTIVATION = {"phi": "gelu", "pic2word": "relu"}

_PHI_KEY = re.compile(r"layers\.(\d+)\.(weight|bias)$")
_PIC2WORD_HIDDEN_KEY = re.compile(r"layers\.(\d+)\.0\.(weight|bias)$")
_PIC2WORD_OUT_KEY = re.compile(r"fc_out\.(weight|bias)$")
_DIFFUSERS_KEY = re.compile(r"(hidden_layers\.\d+|output_layer)\.(weight|bias)$")


class LinCIRConversionError(ValueError):
    """The file is not a phi / Pic2Word projection checkpoint of a known layout (or is incomplete)."""


def load_original_phi_checkpoint(checkpoint: str | os.PathLike | Mapping) -> tuple[dict[str, torch.Tensor], str]:
    """Return ``(state_dict, layout)`` of a released projection checkpoint.

    Args:
        checkpoint: a path to a ``.pt``/``.pth``/``.bin``/``.safetensors`` file, or the already loaded object.

    Returns:
        The projection's state dict (``module.`` prefixes removed) and its layout: ``"phi"`` (LinCIR/SEARLE),
        ``"pic2word"`` or ``"diffusers"``.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"`checkpoint` {path!r} is not a file (expected e.g. LinCIR's `lincir_large.pt`).")
        try:
            if path.endswith(".safetensors"):
                from safetensors.torch import load_file

                loaded = load_file(path)
            else:
                loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle with code in it, a truncated file...: the library errors omit the path
            raise LinCIRConversionError(
                f"Could not read {path!r} as plain tensors (safetensors, or torch.load with weights_only=True): {error}"
            ) from error
        if not isinstance(loaded, Mapping):
            raise LinCIRConversionError(f"{path!r} holds a {type(loaded).__name__}, not a checkpoint dict.")
    elif isinstance(checkpoint, Mapping):
        loaded = checkpoint
    else:
        raise TypeError(f"`checkpoint` must be a path or a mapping, got {type(checkpoint).__name__}.")

    if "Phi" in loaded:
        state_dict, layout = loaded["Phi"], "phi"
    elif "state_dict_img2text" in loaded:
        state_dict, layout = loaded["state_dict_img2text"], "pic2word"
    elif loaded and all(torch.is_tensor(value) for value in loaded.values()):
        state_dict, layout = loaded, None
    else:
        raise LinCIRConversionError(
            "Unrecognised checkpoint: expected a dict with 'Phi' (LinCIR/SEARLE), 'state_dict_img2text' "
            f"(Pic2Word) or a bare state dict; got top-level keys {sorted(map(str, loaded))[:10]}."
        )
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise LinCIRConversionError(f"The {layout or 'bare'} state dict of the checkpoint is empty or not a mapping.")

    state_dict = {(key[len("module.") :] if key.startswith("module.") else key): value for key, value in state_dict.items()}
    if layout is None:
        if any(_DIFFUSERS_KEY.match(key) for key in state_dict):
            layout = "diffusers"
        elif any(_PIC2WORD_OUT_KEY.match(key) for key in state_dict):
            layout = "pic2word"
        else:
            layout = "phi"
    return state_dict, layout


def convert_phi_state_dict(
    state_dict: Mapping[str, torch.Tensor], layout: str = "phi", dropout: float | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """Map a released projection state dict to ``(diffusers_state_dict, config)`` of
    :class:`TextualInversionProjection`; the config (widths, depth, activation) is read from the weights."""
    if layout not in _DEFAULT_DROPOUT:
        raise ValueError(f"`layout` must be one of {sorted(_DEFAULT_DROPOUT)}, got {layout!r}.")

    linears: dict[int, dict[str, torch.Tensor]] = {}  # position -> {"weight", "bias"}
    output: dict[str, torch.Tensor] = {}
    unmatched = []
    for key, tensor in state_dict.items():
        if layout == "phi" and (match := _PHI_KEY.match(key)):
            linears.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
        elif layout == "pic2word" and (match := _PIC2WORD_HIDDEN_KEY.match(key)):
            linears.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
        elif layout == "pic2word" and (match := _PIC2WORD_OUT_KEY.match(key)):
            output[match.group(1)] = tensor
        elif layout == "diffusers" and (match := _DIFFUSERS_KEY.match(key)):
            module = match.group(1)
            if module == "output_layer":
                output[match.group(2)] = tensor
            else:
                linears.setdefault(int(module.split(".")[1]), {})[match.group(2)] = tensor
        else:
            unmatched.append(key)
    if unmatched:
        raise LinCIRConversionError(f"Keys not part of a {layout!r} projection (nothing was converted): {sorted(unmatched)}.")

    if layout == "phi":
        # An nn.Sequential: the Linear modules in index order, the last one is the output layer.
        if not linears:
            raise LinCIRConversionError("No `layers.<i>.weight` keys found in the 'Phi' state dict.")
        last = max(linears)
        output = linears.pop(last)
    positions = sorted(linears)
    if not positions or not output:
        raise LinCIRConversionError(
            f"A projection needs at least one hidden layer and an output layer; found hidden {positions}, "
            f"output keys {sorted(output)}."
        )
    for position in positions + ["output"]:
        parts = output if position == "output" else linears[position]
        if set(parts) != {"weight", "bias"}:
            raise LinCIRConversionError(f"Layer {position!r} needs a weight and a bias, found {sorted(parts)}.")
    # The layers are mapped by their order, so a missing one would silently give a shallower projection.
    if layout == "phi":  # nn.Sequential(Linear, GELU, Dropout, ..., Linear): Linear modules at 0, 3, 6, ...
        found, expected, where = positions + [last], [3 * i for i in range(len(positions) + 1)], "layers.<i>"
    else:
        found, expected = positions, list(range(len(positions)))
        where = "layers.<i>.0" if layout == "pic2word" else "hidden_layers.<i>"
    if found != expected:
        raise LinCIRConversionError(
            f"The {layout!r} projection's linear layers are at {where} for i in {found}, expected {expected}: "
            "a layer is missing from the checkpoint."
        )

    weights = [linears[p]["weight"] for p in positions] + [output["weight"]]
    for previous, current in zip(weights, weights[1:]):
        if current.ndim != 2 or current.shape[1] != previous.shape[0]:
            raise LinCIRConversionError(
                f"Layer widths do not chain: a layer of shape {tuple(previous.shape)} is followed by one of "
                f"shape {tuple(current.shape)}."
            )
    hidden_dims = {weight.shape[0] for weight in weights[:-1]}
    if len(hidden_dims) != 1:
        raise LinCIRConversionError(f"All hidden layers must have one width, found {sorted(hidden_dims)}.")

    config = {
        "input_dim": int(weights[0].shape[1]),
        "hidden_dim": int(weights[0].shape[0]),
        "output_dim": int(weights[-1].shape[0]),
        "num_hidden_layers": len(positions),
        "activation": _ACTIVATION.get(layout, "gelu"),
        "dropout": float(_DEFAULT_DROPOUT[layout] if dropout is None else dropout),
    }
    converted = {}
    for index, position in enumerate(positions):
        converted[f"hidden_layers.{index}.weight"] = linears[position]["weight"]
        converted[f"hidden_layers.{index}.bias"] = linears[position]["bias"]
    converted["output_layer.weight"] = output["weight"]
    converted["output_layer.bias"] = output["bias"]
    return converted, config


def convert_lincir_phi_checkpoint(
    checkpoint: str | os.PathLike | Mapping,
    output_dir: str | os.PathLike | None = None,
    dropout: float | None = None,
    activation: str | None = None,
    normalize_input: bool = False,
    torch_dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> TextualInversionProjection:
    """Load a released phi (LinCIR / SEARLE) or Pic2Word projection as a :class:`TextualInversionProjection`.

    Args:
        checkpoint: path to the released file (e.g. ``lincir_large.pt``) or its loaded content.
        output_dir: if given, ``save_pretrained`` the model there (``config.json`` + ``diffusion_pytorch_model.safetensors``).
        dropout: dropout probability to record (defaults to the method's published training value).
        activation: override the activation read from the layout (``"gelu"`` for phi, ``"relu"`` for Pic2Word).
        normalize_input: set when the checkpoint was trained with LinCIR's ``--l2_normalize``.
        torch_dtype: cast the weights (default: keep float32).
        overwrite: replace an ``output_dir`` that holds an earlier conversion; a non-empty ``output_dir`` is refused
            otherwise. The folder ends up holding exactly the new model (see :mod:`diffusers_cir.conversion.output`).

    Example:
        >>> import torch
        >>> from diffusers_cir.conversion.lincir import convert_lincir_phi_checkpoint
        >>> sequential = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Dropout(0.5),
        ...                                  torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Dropout(0.5),
        ...                                  torch.nn.Linear(32, 16))
        >>> phi = convert_lincir_phi_checkpoint({"Phi": {f"layers.{k}": v for k, v in sequential.state_dict().items()}})
        >>> phi.config.input_dim, phi.config.hidden_dim, phi.config.output_dim
        (8, 32, 16)
    """
    if output_dir is not None:
        check_output_folder(output_dir, overwrite)
    state_dict, layout = load_original_phi_checkpoint(checkpoint)
    converted, config = convert_phi_state_dict(state_dict, layout=layout, dropout=dropout)
    if activation is not None:
        config["activation"] = activation
    config["normalize_input"] = bool(normalize_input)

    model = TextualInversionProjection(**config)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:  # cannot happen when the shapes chain; kept as a guard against silent loss
        raise LinCIRConversionError(f"Conversion mismatch: missing {missing}, unexpected {unexpected}.")
    model.eval()
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    if output_dir is not None:
        with replace_output_folder(output_dir, overwrite) as staging:
            model.save_pretrained(staging, safe_serialization=True)
    return model


def _tower_subfolder(folder: str, name: str) -> str:
    return name if os.path.isdir(os.path.join(folder, name)) else ""


def _load_tower(model_class, folder: str, subfolder: str, tower: str, torch_dtype=None):
    """Load one CLIP tower from its own folder or from a full ``CLIPModel`` folder, refusing partial loads.

    In a full ``CLIPModel`` config the projection width is a top-level field and the tower's sub-config may hold
    transformers' default instead (then the projection would be silently re-initialised at the wrong width), so
    the top-level value is copied into the sub-config.
    """
    from transformers import CLIPConfig

    path = os.path.join(folder, subfolder)
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"No CLIP config at {config_path}.")
    with open(config_path, encoding="utf-8") as handle:
        model_type = json.load(handle).get("model_type")
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    if model_type == "clip":
        clip_config = CLIPConfig.from_pretrained(path)
        tower_config = getattr(clip_config, f"{tower}_config")
        tower_config.projection_dim = clip_config.projection_dim
        kwargs["config"] = tower_config
    model, info = model_class.from_pretrained(path, output_loading_info=True, **kwargs)
    incomplete = sorted(info.get("missing_keys", ())) + sorted(str(key) for key in info.get("mismatched_keys", ()))
    if incomplete:
        raise LinCIRConversionError(f"The CLIP {tower} tower in {path} lacks (or has mis-shaped) weights: {incomplete}.")
    return model


def load_clip_text_encoder(folder: str | os.PathLike, torch_dtype: torch.dtype | None = None):
    """``CLIPTextModelWithProjection`` from a ``text_encoder/`` subfolder, a text-tower folder or a full ``CLIPModel``."""
    from transformers import CLIPTextModelWithProjection

    folder = os.fspath(folder)
    return _load_tower(CLIPTextModelWithProjection, folder, _tower_subfolder(folder, "text_encoder"), "text", torch_dtype)


def load_clip_tokenizer(folder: str | os.PathLike):
    from transformers import CLIPTokenizer

    folder = os.fspath(folder)
    return CLIPTokenizer.from_pretrained(os.path.join(folder, _tower_subfolder(folder, "tokenizer")))


def load_clip_image_encoder(folder: str | os.PathLike, torch_dtype: torch.dtype | None = None):
    """``(CLIPVisionModelWithProjection, CLIPImageProcessor)`` from ``image_encoder/`` + ``image_processor/``
    subfolders or a full ``CLIPModel`` folder; ``(None, None)`` when the folder holds no vision tower."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    folder = os.fspath(folder)
    subfolder = _tower_subfolder(folder, "image_encoder")
    config_path = os.path.join(folder, subfolder, "config.json")
    if not os.path.isfile(config_path):
        return None, None
    with open(config_path, encoding="utf-8") as handle:
        model_type = json.load(handle).get("model_type")
    if model_type not in ("clip", "clip_vision_model"):
        return None, None
    image_encoder = _load_tower(CLIPVisionModelWithProjection, folder, subfolder, "vision", torch_dtype)
    image_processor = CLIPImageProcessor.from_pretrained(os.path.join(folder, _tower_subfolder(folder, "image_processor")))
    return image_encoder, image_processor


def build_lincir_pipeline(
    phi: TextualInversionProjection,
    clip_model_name_or_path: str | os.PathLike,
    tokenizer_name_or_path: str | os.PathLike | None = None,
    with_image_encoder: bool = True,
    torch_dtype: torch.dtype | None = None,
    **pipeline_kwargs,
):
    """Assemble a :class:`~diffusers_cir.pipelines.LinCIRPipeline` from a converted phi and a CLIP model.

    ``clip_model_name_or_path`` is a local folder (or Hub id) of a transformers CLIP checkpoint, either a full
    ``CLIPModel`` (``openai/clip-vit-large-patch14``: both towers are read from it) or a folder with
    ``text_encoder/``, ``tokenizer/`` (and optionally ``image_encoder/``, ``image_processor/``) subfolders.
    A Hub id is resolved with ``huggingface_hub.snapshot_download`` first (diffusers' loaders reject
    unknown libraries). The tokenizer defaults to the one stored with the CLIP model; the LinCIR ViT-bigG
    model uses SDXL's ``tokenizer_2`` (pad token ``"!"``), pass its folder as ``tokenizer_name_or_path``.
    """
    from ..pipelines.pipeline_lincir import LinCIRPipeline

    folder = resolve_pretrained_path(clip_model_name_or_path, {})
    text_encoder = load_clip_text_encoder(folder, torch_dtype)
    tokenizer = load_clip_tokenizer(resolve_pretrained_path(tokenizer_name_or_path, {}) if tokenizer_name_or_path else folder)
    image_encoder = image_processor = None
    if with_image_encoder:
        image_encoder, image_processor = load_clip_image_encoder(folder, torch_dtype)
        if image_encoder is None:
            raise LinCIRConversionError(
                f"{folder} holds no CLIP vision tower; pass `with_image_encoder=False` (`--no_image_encoder`) to build "
                "a pipeline that runs on precomputed image embeddings."
            )
    if phi.config.input_dim != text_encoder.config.projection_dim or phi.config.output_dim != text_encoder.config.hidden_size:
        raise LinCIRConversionError(
            f"phi maps {phi.config.input_dim} -> {phi.config.output_dim} but the CLIP text tower has projection "
            f"width {text_encoder.config.projection_dim} and hidden width {text_encoder.config.hidden_size}: "
            "pair the checkpoint with the CLIP model it was trained for (ViT-L/14: 768/768, ViT-bigG/14: 1280/1280)."
        )
    if torch_dtype is not None:
        phi = phi.to(torch_dtype)
    return LinCIRPipeline(
        phi=phi,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        image_encoder=image_encoder,
        image_processor=image_processor,
        **pipeline_kwargs,
    )


_RELEASED_SUFFIXES = (".pt", ".pth")


def _released_phi_file(path) -> "os.PathLike | None":
    """The released LinCIR / SEARLE / Pic2Word file at ``path``: the file itself, or the one such file of a folder."""
    from pathlib import Path

    path = Path(path)
    if path.is_file():
        return path if path.suffix in _RELEASED_SUFFIXES else None
    if path.is_dir() and not (path / "model_index.json").exists() and not (path / "config.json").exists():
        files = [file for file in path.iterdir() if file.is_file() and file.suffix in _RELEASED_SUFFIXES]
        return files[0] if len(files) == 1 else None
    return None


def _convert_released_phi(
    source, output_dir, clip_model_name_or_path=None, tokenizer_name_or_path=None, with_image_encoder=True,
    normalize_input=False, dropout=None, activation=None, prompt_template=None, placeholder_token=None,
    torch_dtype=None,
):
    if clip_model_name_or_path is None:
        raise ValueError(
            f"{str(source)!r} is a released LinCIR / SEARLE / Pic2Word projection: pass the CLIP model it was trained "
            "for as `clip_model_name_or_path=` (e.g. a local copy of openai/clip-vit-large-patch14)."
        )
    phi = convert_lincir_phi_checkpoint(
        _released_phi_file(source), dropout=dropout, activation=activation, normalize_input=normalize_input,
        torch_dtype=torch_dtype,
    )
    pipeline_kwargs = {}
    if prompt_template is not None:
        pipeline_kwargs["prompt_template"] = prompt_template
    if placeholder_token is not None:
        pipeline_kwargs["placeholder_token"] = placeholder_token
    pipeline = build_lincir_pipeline(
        phi, clip_model_name_or_path, tokenizer_name_or_path=tokenizer_name_or_path,
        with_image_encoder=with_image_encoder, torch_dtype=torch_dtype, **pipeline_kwargs,
    )
    pipeline.placeholder_token_id  # noqa: B018 - refuses a placeholder the tokenizer splits, before saving
    pipeline.save_pretrained(output_dir, safe_serialization=True, model_card=lincir_conversion_card(
        source, output_dir, clip_model_name_or_path, tokenizer_name_or_path, not with_image_encoder, normalize_input,
        dropout, activation, prompt_template, placeholder_token, torch_dtype))


def lincir_conversion_card(checkpoint_path, output_dir, clip_model_name_or_path, tokenizer_name_or_path=None,
                           no_image_encoder=False, normalize_input=False, dropout=None, activation=None,
                           prompt_template=None, placeholder_token=None, torch_dtype=None):
    """The model card info of a converted LinCIR / SEARLE / Pic2Word pipeline (its sources and the command)."""
    from ..utils.model_card import conversion_card

    flags = {"--checkpoint_path": checkpoint_path, "--output_dir": output_dir,
             "--clip_model_name_or_path": clip_model_name_or_path, "--tokenizer_name_or_path": tokenizer_name_or_path,
             "--no_image_encoder": no_image_encoder, "--normalize_input": normalize_input, "--dropout": dropout,
             "--activation": activation, "--prompt_template": prompt_template, "--placeholder_token": placeholder_token,
             "--dtype": str(torch_dtype).removeprefix("torch.") if torch_dtype else None}
    return conversion_card(
        "lincir", flags, [checkpoint_path, clip_model_name_or_path],
        note="Converted from a released textual-inversion projection (LinCIR, SEARLE or Pic2Word); the license is the "
        "one of that release and of the CLIP model.",
    )


def _register_layout() -> None:
    from ..pipelines.auto import ReleasedLayout, register_layout

    register_layout(ReleasedLayout(
        name="lincir-phi",
        description="a released LinCIR / SEARLE phi or Pic2Word img2text checkpoint (.pt / .pth file, or a folder "
        "holding one); the CLIP model as clip_model_name_or_path=",
        matches=lambda path: _released_phi_file(path) is not None,
        convert=_convert_released_phi,
        options=("clip_model_name_or_path", "tokenizer_name_or_path", "with_image_encoder", "normalize_input", "dropout",
                 "activation", "prompt_template", "placeholder_token", "torch_dtype"),
        path_options=("clip_model_name_or_path", "tokenizer_name_or_path"),
    ))


_register_layout()
