# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""An open_clip text tower as a diffusers model: saved and loaded with the pipeline, open_clip's own modules inside.

The tower is an open_clip CLIP without its ``visual`` module; ``forward`` is its ``encode_text``. open_clip's causal
mask has the fixed context length, so token ids are padded to it (``context_length``, 77 for CLIP). The tokenizer is
CLIP's (``transformers.CLIPTokenizer``, :func:`diffusers_cir.utils.build_offline_clip_tokenizer`): the tower pools at
the first end-of-text token, which the causal mask makes independent of the padding after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from ._dtype_cast import QuietDtypeCastMixin
from ._open_clip import build_open_clip_model

__all__ = ["OpenCLIPTextEncoder", "OpenCLIPTextEncoderOutput"]


@dataclass
class OpenCLIPTextEncoderOutput(BaseOutput):
    """Output of :class:`OpenCLIPTextEncoder`.

    Args:
        text_embeds (`torch.Tensor` of shape `(batch_size, embed_dim)`): open_clip's ``encode_text`` (projected, not
            normalised).
    """

    text_embeds: torch.Tensor


class OpenCLIPTextEncoder(QuietDtypeCastMixin, ModelMixin, ConfigMixin):
    r"""
    The text tower of an open_clip CLIP: token ids (padded to ``context_length``) -> projected text features.

    Args:
        model_config (`dict`):
            The open_clip model configuration (``open_clip.get_model_config(name)``, plus ``quick_gelu`` for OpenAI
            weights); the image tower is not kept.

    Example:
        >>> import torch
        >>> from diffusers_cir.models.open_clip_text import OpenCLIPTextEncoder
        >>> config = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8},
        ...           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
        >>> tower = OpenCLIPTextEncoder(config).eval()
        >>> tower(torch.full((2, 77), 49407)).text_embeds.shape
        torch.Size([2, 16])
    """

    _skip_layerwise_casting_patterns = ("attn",)

    @register_to_config
    def __init__(self, model_config: dict):
        super().__init__()
        model = build_open_clip_model(model_config)
        model.visual = None  # the image tower lives in OpenCLIPVisionEncoder
        self.clip = model

    @property
    def embed_dim(self) -> int:
        """Width of the text features (the CLIP joint space)."""
        return int(self.config.model_config["embed_dim"])

    @property
    def context_length(self) -> int:
        """The number of token positions the tower reads (its causal mask has this size)."""
        return int(self.clip.context_length)

    @property
    def vocab_size(self) -> int:
        return int(self.clip.vocab_size)

    def forward(self, input_ids: torch.Tensor, return_dict: bool = True):
        """
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, context_length)`): CLIP token ids.
            return_dict (`bool`, defaults to `True`): return an [`OpenCLIPTextEncoderOutput`] or a tuple.
        """
        if input_ids.ndim != 2 or input_ids.shape[1] != self.context_length:
            raise ValueError(
                f"`input_ids` must have shape (batch_size, {self.context_length}) (open_clip's context length), got "
                f"{tuple(input_ids.shape)}: tokenize with padding='max_length', max_length={self.context_length}."
            )
        text_embeds = self.clip.encode_text(input_ids)
        if not return_dict:
            return (text_embeds,)
        return OpenCLIPTextEncoderOutput(text_embeds=text_embeds)
