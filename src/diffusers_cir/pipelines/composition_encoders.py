# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""The frozen encoders a composition network reads, whichever library they come from: one feature per image and
one per text, in a shared space.

Three backbones, recognised by the classes of the towers:

========== =================================================== ================================================
backbone   towers                                              features
========== =================================================== ================================================
``clip``   transformers ``CLIPVisionModelWithProjection`` +    ``image_embeds`` / ``text_embeds`` (projected,
           ``CLIPTextModelWithProjection``, ``CLIPTokenizer``  not normalised)
``open_clip`` :class:`~diffusers_cir.models.OpenCLIPVisionEncoder` open_clip's ``encode_image`` / ``encode_text``
           + :class:`~diffusers_cir.models.OpenCLIPTextEncoder` (token ids padded to the context length)
``blip2``  transformers ``Blip2VisionModelWithProjection`` +   the mean of the 32 normalised Q-Former query
           ``Blip2TextModelWithProjection``, BERT tokenizer    embeddings / the normalised ``[CLS]`` embedding
========== =================================================== ================================================

BLIP-2's own image-text score takes the maximum over the query embeddings, which no single vector reproduces; the
mean is this family's pooled image feature (a head that keeps the 32 tokens, such as FashionBLIP-2's multi-head
matching, reads ``image_embeds`` itself). A tower wrapped by peft (LoRA while training) is recognised by its base
model.
"""

from __future__ import annotations

import torch

__all__ = [
    "ENCODER_KINDS",
    "base_model",
    "encoder_kind",
    "feature_dim",
    "image_features",
    "image_input_size",
    "load_open_clip_components",
    "text_features",
    "tokenize_texts",
]

ENCODER_KINDS = ("clip", "open_clip", "blip2")


def base_model(module):
    """The model inside a peft wrapper (``PeftModel``), or ``module`` itself."""
    get_base_model = getattr(module, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else module


def _kind_of(module, role: str) -> str:
    from transformers import (
        Blip2TextModelWithProjection,
        Blip2VisionModelWithProjection,
        CLIPTextModelWithProjection,
        CLIPVisionModelWithProjection,
    )

    from ..models.open_clip_text import OpenCLIPTextEncoder
    from ..models.open_clip_vision import OpenCLIPVisionEncoder

    kinds = {
        "image": ((CLIPVisionModelWithProjection, "clip"), (OpenCLIPVisionEncoder, "open_clip"),
                  (Blip2VisionModelWithProjection, "blip2")),
        "text": ((CLIPTextModelWithProjection, "clip"), (OpenCLIPTextEncoder, "open_clip"),
                 (Blip2TextModelWithProjection, "blip2")),
    }[role]
    model = base_model(module)
    for cls, kind in kinds:
        if isinstance(model, cls):
            return kind
    names = ", ".join(cls.__name__ for cls, _ in kinds)
    raise ValueError(
        f"The {role} encoder is a {type(model).__name__}; a composition network reads one of {names} (a tower with "
        "its projection into the shared space)."
    )


def encoder_kind(text_encoder=None, image_encoder=None) -> str:
    """``"clip"``, ``"open_clip"`` or ``"blip2"``; both towers (when given) must be of the same backbone."""
    kinds = {role: _kind_of(module, role) for role, module in (("text", text_encoder), ("image", image_encoder))
             if module is not None}
    if not kinds:
        raise ValueError("No encoder given: a composition network needs at least its text encoder.")
    if len(set(kinds.values())) > 1:
        raise ValueError(
            f"The text encoder is a {kinds['text']} tower and the image encoder a {kinds['image']} one: both must come "
            "from the same model, so that their features share a space."
        )
    return next(iter(kinds.values()))


def _is_open_clip(model) -> bool:
    from ..models.open_clip_text import OpenCLIPTextEncoder
    from ..models.open_clip_vision import OpenCLIPVisionEncoder

    return isinstance(model, (OpenCLIPTextEncoder, OpenCLIPVisionEncoder))


def feature_dim(encoder) -> int:
    """Width of the features a tower (text or image) gives."""
    model = base_model(encoder)
    if _is_open_clip(model):
        return model.embed_dim
    if hasattr(model.config, "projection_dim"):  # CLIP towers
        return int(model.config.projection_dim)
    return int(model.config.image_text_hidden_size)  # BLIP-2 towers


def image_input_size(image_encoder) -> int:
    """The square pixel size the image tower reads."""
    model = base_model(image_encoder)
    if _is_open_clip(model):
        return model.image_size
    return int(getattr(model.config, "vision_config", model.config).image_size)


def text_max_length(tokenizer, text_encoder) -> int:
    """The longest token sequence the text tower reads (CLIP: 77; BLIP-2: the Q-Former's positions)."""
    model = base_model(text_encoder)
    if hasattr(model, "context_length"):
        return int(model.context_length)
    config = getattr(model.config, "qformer_config", None) or getattr(model.config, "text_config", None) or model.config
    positions = int(getattr(config, "max_position_embeddings", tokenizer.model_max_length))
    return min(int(tokenizer.model_max_length), positions)


def tokenize_texts(tokenizer, text_encoder, texts: list[str]) -> dict:
    """``input_ids`` and ``attention_mask`` for ``texts`` as the text tower reads them, and ``lengths`` (tokens each
    text kept: equal to the maximum when it was cut). CLIP towers pool at the first end-of-text token behind a causal
    mask, so they are padded to the longest text only; open_clip's fixed mask needs the whole context length."""
    kind = _kind_of(text_encoder, "text")
    max_length = text_max_length(tokenizer, text_encoder)
    padding = "max_length" if kind == "open_clip" else "longest"
    tokens = tokenizer(list(texts), padding=padding, max_length=max_length, truncation=True, return_tensors="pt")
    return {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask,
            "lengths": tokens.attention_mask.sum(dim=1).tolist(), "max_length": max_length}


def text_features(text_encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(batch_size, feature_dim)`` text features (not normalised for CLIP and open_clip; BLIP-2's are unit vectors)."""
    kind = _kind_of(text_encoder, "text")
    if kind == "clip":
        return text_encoder(input_ids=input_ids).text_embeds
    if kind == "open_clip":
        return text_encoder(input_ids=input_ids).text_embeds
    return text_encoder(input_ids=input_ids, attention_mask=attention_mask).text_embeds[:, 0]


def image_features(image_encoder, pixel_values: torch.Tensor) -> torch.Tensor:
    """``(batch_size, feature_dim)`` image features: the gallery embeddings of the composition family."""
    kind = _kind_of(image_encoder, "image")
    if kind in ("clip", "open_clip"):
        return image_encoder(pixel_values=pixel_values).image_embeds
    return image_encoder(pixel_values=pixel_values).image_embeds.mean(dim=1)


def load_open_clip_components(model_name: str, pretrained: str | None = None) -> dict:
    """``image_encoder``, ``image_processor``, ``text_encoder`` and ``tokenizer`` of an open_clip CLIP, with its weights
    (``pretrained``: a local checkpoint file or an open_clip pretrained tag, as ``open_clip.create_model`` takes).

    Example:

    ```py
    >>> parts = load_open_clip_components("RN50x4", pretrained="RN50x4.pt")  # doctest: +SKIP
    >>> pipe = Clip4CirPipeline(fusion_head=Clip4CirCombiner(feature_dim=640), **parts)  # doctest: +SKIP

    ```
    """
    import open_clip

    from ..models._open_clip import open_clip_config, open_clip_image_processor
    from ..models.open_clip_text import OpenCLIPTextEncoder
    from ..models.open_clip_vision import OpenCLIPVisionEncoder
    from ..utils import build_offline_clip_tokenizer

    model = open_clip.create_model(model_name, pretrained=pretrained).eval()
    config = open_clip_config(model_name, model)
    image_encoder, text_encoder = OpenCLIPVisionEncoder(config), OpenCLIPTextEncoder(config)
    image_encoder.visual.load_state_dict(model.visual.state_dict())
    text_state = {key: value for key, value in model.state_dict().items() if not key.startswith("visual.")}
    text_encoder.clip.load_state_dict(text_state)
    return {
        "image_encoder": image_encoder.eval(),
        "image_processor": open_clip_image_processor(model),
        "text_encoder": text_encoder.eval(),
        "tokenizer": build_offline_clip_tokenizer(model_max_length=text_encoder.context_length),
    }
