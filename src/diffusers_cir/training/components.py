# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""What a training run is built from: frozen encoders, the trained model, its optimizer, LR schedule and EMA."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "build_lr_scheduler",
    "FrozenEncoders",
    "build_optimizer",
    "create_ema",
    "freeze",
    "load_compodiff_components",
    "load_frozen_encoders",
    "pretrained_folder",
    "weight_dtype",
]


def weight_dtype(accelerator) -> torch.dtype:
    """The dtype frozen towers run in under the accelerator's mixed precision."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def freeze(module, accelerator, dtype: torch.dtype):
    """A frozen tower: no gradients, evaluation mode, on the accelerator's device in ``dtype``."""
    return module.requires_grad_(False).to(accelerator.device, dtype=dtype).eval()


def pretrained_folder(name_or_path: str | None, revision: str | None = None) -> str | None:
    """A local folder for a folder or Hub repo id (``None`` stays ``None``)."""
    from ..pipelines.auto import resolve_pretrained_path

    if name_or_path is None:
        return None
    return resolve_pretrained_path(name_or_path, {"revision": revision} if revision else {})


def build_optimizer(args: argparse.Namespace, parameters, learning_rate: float) -> torch.optim.Optimizer:
    """AdamW over ``parameters`` with the ``--adam-*`` flags."""
    return torch.optim.AdamW(
        parameters,
        lr=learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def build_lr_scheduler(args: argparse.Namespace, optimizer, accelerator):
    """``--lr-scheduler`` through diffusers' ``get_scheduler``. The prepared scheduler steps once per process at
    every optimizer step, hence the multiplications."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )


def create_ema(args: argparse.Namespace, model, accelerator):
    """diffusers' ``EMAModel`` of ``model`` on the accelerator's device (``None`` without ``--use-ema``)."""
    from diffusers.training_utils import EMAModel

    if not args.use_ema:
        return None
    ema = EMAModel(
        model.parameters(),
        decay=args.ema_decay,
        use_ema_warmup=args.ema_warmup,
        model_cls=type(model),
        model_config=model.config,
    )
    ema.to(accelerator.device)
    return ema


@dataclass
class FrozenEncoders:
    """The frozen towers of a CompoDiff run (``None`` where there is none), as pipeline components."""

    text_encoder: Any = None
    tokenizer: Any = None
    image_encoder: Any = None
    image_processor: Any = None
    text_encoder_2: Any = None
    tokenizer_2: Any = None

    @property
    def text_conditioner(self):
        from ..models.compodiff_text import CompoDiffTextConditioner

        return CompoDiffTextConditioner(self.text_encoder, self.tokenizer, self.text_encoder_2, self.tokenizer_2)


def _load_text_encoder(path: str, kwargs: dict):
    """A CLIP text model (with its projection when the folder has one) or a T5 encoder, by the folder's config."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, PretrainedConfig, T5EncoderModel

    config = PretrainedConfig.get_config_dict(path, **kwargs)[0]
    if config.get("model_type") in ("t5", "mt5", "umt5"):
        return T5EncoderModel.from_pretrained(path, **kwargs)
    with_projection = "CLIPTextModelWithProjection" in (config.get("architectures") or [])
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel).from_pretrained(path, **kwargs)


def _load_tokenizer(path: str, kwargs: dict, text_encoder):
    """The tokenizer of ``text_encoder``: T5's (SentencePiece) for a T5 encoder, else CLIP's."""
    from transformers import CLIPTokenizer, T5Tokenizer

    from ..models.compodiff_text import is_t5_encoder

    is_t5 = text_encoder is not None and is_t5_encoder(text_encoder)
    return (T5Tokenizer if is_t5 else CLIPTokenizer).from_pretrained(path, **kwargs)


def load_frozen_encoders(args: argparse.Namespace, pretrained: str | None) -> FrozenEncoders:
    """The frozen towers in float32, from the explicit paths or the pretrained pipeline folder (``None`` where neither
    has one): text encoder(s) and tokenizer(s), image encoder and processor."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    def locate(name, explicit):
        if explicit is not None:
            return explicit, {"revision": args.revision}
        if pretrained is not None and os.path.isdir(os.path.join(pretrained, name)):
            return pretrained, {"subfolder": name}
        return None, None

    encoders = FrozenEncoders()
    for suffix in ("", "_2"):
        path, kwargs = locate(f"text_encoder{suffix}", getattr(args, f"text_encoder{suffix}_name_or_path"))
        text_encoder = _load_text_encoder(path, kwargs) if path is not None else None
        path, kwargs = locate(f"tokenizer{suffix}", getattr(args, f"tokenizer{suffix}_name_or_path"))
        setattr(encoders, f"text_encoder{suffix}", text_encoder)
        setattr(encoders, f"tokenizer{suffix}", _load_tokenizer(path, kwargs, text_encoder) if path is not None else None)
    path, kwargs = locate("image_encoder", args.image_encoder_name_or_path)
    encoders.image_encoder = CLIPVisionModelWithProjection.from_pretrained(path, **kwargs) if path is not None else None
    path, kwargs = locate("image_processor", None)
    # A CLIP repo keeps its preprocessor_config.json next to the vision model's weights.
    if path is None and args.image_encoder_name_or_path is not None and os.path.isfile(
        os.path.join(args.image_encoder_name_or_path, "preprocessor_config.json")
    ):
        path, kwargs = args.image_encoder_name_or_path, {}
    encoders.image_processor = CLIPImageProcessor.from_pretrained(path, **kwargs) if path is not None else None
    if encoders.image_encoder is not None and encoders.image_processor is None:
        encoders.image_processor = CLIPImageProcessor()  # OpenAI CLIP's 224 px preprocessing
    return encoders


def _embedding_width(stream) -> int | None:
    features = getattr(stream.dataset, "features", None) or {}
    column = stream.column_mapping.get("target_image_embeds", "target_image_embeds")
    length = getattr(features.get(column), "length", -1)
    return int(length) if length and length > 0 else None


def load_compodiff_components(args: argparse.Namespace, stream):
    """``(transformer, scheduler, encoders)``: CompoDiff's denoiser and scheduler (pretrained, or new from
    ``--transformer-config`` with the widths of the data and the text encoders; ``--transformer-dropout`` set either
    way), and its frozen :class:`FrozenEncoders`."""
    from ..models import CompoDiffTransformer
    from ..schedulers import CompoDiffScheduler

    pretrained = pretrained_folder(args.pretrained_model_name_or_path, args.revision)
    encoders = load_frozen_encoders(args, pretrained)
    if encoders.text_encoder is None or encoders.tokenizer is None:
        raise ValueError(
            "Training needs the frozen text encoder and tokenizer: the pretrained folder has none, so pass "
            "--text-encoder-name-or-path and --tokenizer-name-or-path."
        )
    if (encoders.text_encoder_2 is None) != (encoders.tokenizer_2 is None):
        raise ValueError("A second text encoder needs its tokenizer and the other way round: pass both "
                         "--text-encoder-2-name-or-path and --tokenizer-2-name-or-path.")
    if args.dataset_config_name == "images" and encoders.image_encoder is None:
        raise ValueError("The `images` configuration is encoded on the fly: pass --image-encoder-name-or-path.")
    text_width = encoders.text_conditioner.hidden_size

    overrides = {} if args.transformer_dropout is None else {"dropout": args.transformer_dropout}
    if pretrained is not None:
        transformer = CompoDiffTransformer.from_pretrained(pretrained, subfolder="transformer", **overrides)
        scheduler = CompoDiffScheduler.from_pretrained(pretrained, subfolder="scheduler")
    else:
        config = {**args.transformer_config, **overrides}
        if "embedding_dim" not in config:
            width = _embedding_width(stream) if args.dataset_config_name == "embeddings" else (
                encoders.image_encoder.config.projection_dim)
            if width is None:
                raise ValueError("Cannot infer the embedding width from the data: set embedding_dim in --transformer-config.")
            config["embedding_dim"] = width
        config.setdefault("text_embedding_dim", text_width)
        transformer = CompoDiffTransformer(**config)
        scheduler = CompoDiffScheduler(num_train_timesteps=transformer.config.num_train_timesteps)
    if transformer.config.text_embedding_dim != text_width:
        raise ValueError(
            f"The denoiser reads text of width {transformer.config.text_embedding_dim} but the text encoder"
            f"{'s give' if encoders.text_encoder_2 is not None else ' gives'} {text_width}."
        )
    return transformer, scheduler, encoders
