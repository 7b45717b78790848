# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""CLIP4Cir's Combiner: the fusion head that composes a reference image feature and a text feature into a query.

Baldrati et al., "Effective conditioned and composed image retrieval combining CLIP-based features" (CVPR 2022 demo)
and "Composed Image Retrieval using Contrastive Learning and Task-oriented CLIP-based Features" (ACM TOMM 2023).
Facts from the papers and the authors' repository (ABaldrati/CLIP4Cir at dfed9f7, ``src/combiner.py``):

* the text and image features are each projected by a linear layer with ReLU and dropout (0.5);
* the two projections are concatenated; one branch (linear, ReLU, dropout 0.5, linear) makes a residual, another
  (linear, ReLU, dropout 0.5, linear, sigmoid) a mixing coefficient ``lambda`` per query;
* the query is ``normalize(residual + lambda * text + (1 - lambda) * image)``, on the raw (unnormalised) features;
* with CLIP RN50x4 (features of width 640) the projection is 2560 wide and the hidden layers 5120 (4x and 8x).

The layer names are the authors', so their released state dicts load with :meth:`CombinerLayers.load_state_dict`.
SCOT's composition network is a Combiner too (see :class:`~diffusers_cir.SCOTPipeline`), and MTST's two hops
run one each (:class:`~diffusers_cir.models.two_hop_fusion.TwoHopFusionHead`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from ._dtype_cast import QuietDtypeCastMixin, compute_dtype

__all__ = ["Clip4CirCombiner", "CombinerLayers", "FusionHeadOutput", "check_head_widths"]


@dataclass
class FusionHeadOutput(BaseOutput):
    """Output of a fusion head (:class:`Clip4CirCombiner`, :class:`~diffusers_cir.models.TwoHopFusionHead`).

    Args:
        composed_embeds (`torch.Tensor` of shape `(batch_size, feature_dim)`):
            The composed queries, L2-normalised, in the space of the image features.
        mixing_weight (`torch.Tensor` of shape `(batch_size, 1)`):
            The Combiner's ``lambda``: the weight of the text feature in the residual sum (of the last hop).
        prototype (`torch.Tensor` of shape `(batch_size, feature_dim)`, *optional*):
            A two-hop head's first hop (MTST's implicit prototype); `None` for a one-hop head.
    """

    composed_embeds: torch.Tensor
    # Optional so that the output can be rebuilt from a dict, as accelerate's mixed-precision output cast does.
    mixing_weight: torch.Tensor | None = None
    prototype: torch.Tensor | None = None


def check_head_widths(feature_dim, projection_dim, hidden_dim, dropout) -> None:
    """The configuration checks the fusion heads share (a bool is an int in Python: `True` as a width would build
    a 1-wide layer)."""
    for name, value in (("feature_dim", feature_dim), ("projection_dim", projection_dim), ("hidden_dim", hidden_dim)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"`dropout` must be a number in [0, 1), got {dropout!r}.")


class CombinerLayers(nn.Module):
    """The Combiner's layers, named as in the authors' code; ``forward`` returns the unnormalised residual sum and
    the mixing coefficient."""

    def __init__(self, feature_dim: int, projection_dim: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.text_projection_layer = nn.Linear(feature_dim, projection_dim)
        self.image_projection_layer = nn.Linear(feature_dim, projection_dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.combiner_layer = nn.Linear(projection_dim * 2, hidden_dim)
        self.output_layer = nn.Linear(hidden_dim, feature_dim)
        self.dropout3 = nn.Dropout(dropout)
        self.dynamic_scalar = nn.Sequential(
            nn.Linear(projection_dim * 2, hidden_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, 1), nn.Sigmoid()
        )

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        text_projected = self.dropout1(F.relu(self.text_projection_layer(text_features)))
        image_projected = self.dropout2(F.relu(self.image_projection_layer(image_features)))
        joint = torch.cat((text_projected, image_projected), dim=-1)
        residual = self.output_layer(self.dropout3(F.relu(self.combiner_layer(joint))))
        mixing = self.dynamic_scalar(joint)
        return residual + mixing * text_features + (1 - mixing) * image_features, mixing


def check_features(image_features, text_features, feature_dim: int) -> None:
    for name, value in (("image_features", image_features), ("text_features", text_features)):
        if not torch.is_tensor(value) or value.ndim != 2 or value.shape[-1] != feature_dim:
            got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(f"`{name}` must be a tensor of shape (batch_size, {feature_dim}), got {got}.")
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(
            f"`image_features` has {image_features.shape[0]} rows and `text_features` {text_features.shape[0]}: one "
            "of each per query."
        )


class Clip4CirCombiner(QuietDtypeCastMixin, ModelMixin, ConfigMixin):
    r"""
    CLIP4Cir's Combiner: (reference image feature, text feature) -> composed query feature.

    Args:
        feature_dim (`int`, defaults to 640):
            Width of the image and text features (the CLIP joint space: 640 for RN50x4, 768 for ViT-L/14).
        projection_dim (`int`, defaults to 2560):
            Width of each feature's projection (the paper's 2560 for RN50x4, 4x the feature width).
        hidden_dim (`int`, defaults to 5120):
            Width of the hidden layers of both branches (the paper's 5120 for RN50x4, 8x the feature width).
        dropout (`float`, defaults to 0.5):
            Dropout after the projections and in both branches (the paper's 0.5), while training.

    Example:
        >>> import torch
        >>> from diffusers_cir.models.clip4cir_combiner import Clip4CirCombiner
        >>> head = Clip4CirCombiner(feature_dim=8, projection_dim=32, hidden_dim=64).eval()
        >>> output = head(torch.randn(3, 8), torch.randn(3, 8))
        >>> tuple(output.composed_embeds.shape), bool(torch.allclose(output.composed_embeds.norm(dim=-1), torch.ones(3)))
        ((3, 8), True)
    """

    @register_to_config
    def __init__(self, feature_dim: int = 640, projection_dim: int = 2560, hidden_dim: int = 5120, dropout: float = 0.5):
        super().__init__()
        check_head_widths(feature_dim, projection_dim, hidden_dim, dropout)
        self.combiner = CombinerLayers(feature_dim, projection_dim, hidden_dim, dropout)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, return_dict: bool = True):
        """
        Args:
            image_features (`torch.Tensor` of shape `(batch_size, feature_dim)`):
                The reference images' features as the image encoder gives them (not normalised, as in CLIP4Cir).
            text_features (`torch.Tensor` of shape `(batch_size, feature_dim)`):
                The modification texts' features as the text encoder gives them.
            return_dict (`bool`, defaults to `True`): return a [`FusionHeadOutput`] instead of a tuple.
        """
        check_features(image_features, text_features, self.config.feature_dim)
        dtype = compute_dtype(self.combiner.output_layer)
        combined, mixing = self.combiner(image_features.to(dtype), text_features.to(dtype))
        composed = F.normalize(combined, dim=-1)
        if not return_dict:
            return (composed, mixing)
        return FusionHeadOutput(composed_embeds=composed, mixing_weight=mixing)
