# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""An open_clip image tower as a diffusers model: saved and loaded with the pipeline, open_clip's own modules inside.

transformers has no ResNet CLIP (CLIP4Cir's RN50x4) and converting ViTs would change their numerics by rounding;
wrapping open_clip's ``visual`` module keeps every open_clip CLIP exactly as open_clip computes it. The folder holds
``config.json`` (the open_clip configuration) and the weights as safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from ._dtype_cast import QuietDtypeCastMixin
from ._open_clip import build_open_clip_model

__all__ = ["OpenCLIPVisionEncoder", "OpenCLIPVisionEncoderOutput"]


@dataclass
class OpenCLIPVisionEncoderOutput(BaseOutput):
    """Output of :class:`OpenCLIPVisionEncoder`.

    Args:
        image_embeds (`torch.Tensor` of shape `(batch_size, embed_dim)`): open_clip's ``encode_image`` (projected,
            not normalised).
    """

    image_embeds: torch.Tensor


class OpenCLIPVisionEncoder(QuietDtypeCastMixin, ModelMixin, ConfigMixin):
    r"""
    The image tower of an open_clip CLIP (``model.visual``): pixel values -> projected image features.

    Args:
        model_config (`dict`):
            The open_clip model configuration (``open_clip.get_model_config(name)``, plus ``quick_gelu`` for OpenAI
            weights); only the image tower is built and kept.

    Example:
        >>> import torch
        >>> from diffusers_cir.models.open_clip_vision import OpenCLIPVisionEncoder
        >>> config = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8},
        ...           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
        >>> tower = OpenCLIPVisionEncoder(config).eval()
        >>> tower(torch.randn(2, 3, 32, 32)).image_embeds.shape
        torch.Size([2, 16])
    """

    # open_clip's attention reads its projection weights directly, which layerwise casting keeps in storage dtype.
    _skip_layerwise_casting_patterns = ("attn",)

    @register_to_config
    def __init__(self, model_config: dict):
        super().__init__()
        self.visual = build_open_clip_model(model_config).visual

    @property
    def embed_dim(self) -> int:
        """Width of the image features (the CLIP joint space)."""
        return int(self.config.model_config["embed_dim"])

    @property
    def image_size(self) -> int:
        size = self.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def forward(self, pixel_values: torch.Tensor, return_dict: bool = True):
        """
        Args:
            pixel_values (`torch.Tensor` of shape `(batch_size, 3, image_size, image_size)`): normalised pixels.
            return_dict (`bool`, defaults to `True`): return an [`OpenCLIPVisionEncoderOutput`] or a tuple.
        """
        parameter = next(self.visual.parameters())
        image_embeds = self.visual(pixel_values.to(parameter.dtype))
        if not return_dict:
            return (image_embeds,)
        return OpenCLIPVisionEncoderOutput(image_embeds=image_embeds)
