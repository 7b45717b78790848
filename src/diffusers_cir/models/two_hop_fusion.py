# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""A two-hop fusion head: MTST's prototypical two-hop alignment (PTHA) on pooled features.

Zhou et al., "Scale Up Composed Image Retrieval Learning via Modification Text Generation" (IEEE TMM 2025). Facts
from the paper and the authors' code (zyinan99/MTST_PTHA at 6a02ee4, ``blip2_qformer_tgir_concatembedding_sim.py``,
MIT): the first hop reads the reference image with the modification text and gives an *implicit prototype* (there:
BLIP-2's 32 Q-Former query states); the same hop reading the *target* with the *reverse* modification text (target
back to reference) must give the same prototype (mean squared error of the token-averaged prototypes, the reverse
branch detached); the second hop reads the prototype with the modification text again (there: the Q-Former's
self-attention over prototype and text tokens) and its output is aligned contrastively with the target.

Here both hops are CLIP4Cir Combiners (:class:`~diffusers_cir.models.clip4cir_combiner.CombinerLayers`) over pooled
features: hop one maps (image, text) to a prototype in the feature space, hop two maps (prototype, text) to the
query. The trainer's ``--objective`` picks the losses (:mod:`diffusers_cir.training.fusion_losses`); a head over
tokens (a Q-Former) can implement :meth:`prototype` and :meth:`compose_prototype` the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from ._dtype_cast import QuietDtypeCastMixin, compute_dtype
from .clip4cir_combiner import (
    CombinerLayers,
    FusionHeadOutput,
    check_features,
    check_head_widths,
)

__all__ = ["TwoHopFusionHead"]


class TwoHopFusionHead(QuietDtypeCastMixin, ModelMixin, ConfigMixin):
    r"""
    Two Combiner hops: (image, text) -> prototype, then (prototype, text) -> composed query (MTST's PTHA).

    Args:
        feature_dim (`int`, defaults to 768): width of the image and text features (and of the prototype).
        projection_dim (`int`, defaults to 3072): projection width of each hop (4x the features, as CLIP4Cir's).
        hidden_dim (`int`, defaults to 6144): hidden width of each hop (8x the features, as CLIP4Cir's).
        dropout (`float`, defaults to 0.5): dropout in both hops while training (CLIP4Cir's value).

    Example:
        >>> import torch
        >>> from diffusers_cir.models.two_hop_fusion import TwoHopFusionHead
        >>> head = TwoHopFusionHead(feature_dim=8, projection_dim=32, hidden_dim=64).eval()
        >>> output = head(torch.randn(2, 8), torch.randn(2, 8))
        >>> tuple(output.composed_embeds.shape), tuple(output.prototype.shape)
        ((2, 8), (2, 8))
    """

    @register_to_config
    def __init__(self, feature_dim: int = 768, projection_dim: int = 3072, hidden_dim: int = 6144, dropout: float = 0.5):
        super().__init__()
        check_head_widths(feature_dim, projection_dim, hidden_dim, dropout)
        self.prototype_hop = CombinerLayers(feature_dim, projection_dim, hidden_dim, dropout)
        self.composition_hop = CombinerLayers(feature_dim, projection_dim, hidden_dim, dropout)

    def prototype(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Hop one: the implicit prototype ``(batch_size, feature_dim)`` of (image, text), not normalised."""
        check_features(image_features, text_features, self.config.feature_dim)
        dtype = compute_dtype(self.prototype_hop.output_layer)
        return self.prototype_hop(image_features.to(dtype), text_features.to(dtype))[0]

    def compose_prototype(self, prototype: torch.Tensor, text_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hop two: ``(composed query (L2-normalised), mixing weight)`` from a prototype and the text."""
        dtype = compute_dtype(self.composition_hop.output_layer)
        combined, mixing = self.composition_hop(prototype.to(dtype), text_features.to(dtype))
        return F.normalize(combined, dim=-1), mixing

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, return_dict: bool = True):
        """
        Args:
            image_features (`torch.Tensor` of shape `(batch_size, feature_dim)`): the reference images' features.
            text_features (`torch.Tensor` of shape `(batch_size, feature_dim)`): the modification texts' features.
            return_dict (`bool`, defaults to `True`): return a [`FusionHeadOutput`] instead of a tuple.
        """
        prototype = self.prototype(image_features, text_features)
        composed, mixing = self.compose_prototype(prototype, text_features)
        if not return_dict:
            return (composed, mixing, prototype)
        return FusionHeadOutput(composed_embeds=composed, mixing_weight=mixing, prototype=prototype)
