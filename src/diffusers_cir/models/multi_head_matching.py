# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""FashionBLIP-2's multi-head query-candidate matching, in a form a vector index can serve.

BLIP-2 describes an image by its Q-Former query tokens (32 in the released models) and scores an image-text pair by
the best-matching token. FashionBLIP-2 (Garderes et al., SIGIR GENNEXT 2025) matches a composed query with a
candidate image over several heads so that fine-grained details (a collar, a print) each get a say. Here each head
pools the token states with a learned attention query and projects the pooled state; the query side (the Q-Former's
tokens after they read the reference image together with the modification text) and the candidate side (the tokens
of the candidate image alone) have their own pooling and projection. Every head's vector is unit-norm and the heads
are concatenated and scaled by ``1/sqrt(num_heads)``, so the inner product of a query and a candidate is the *mean
of the heads' cosine similarities*: one vector per image, searchable by faiss, and exactly the multi-head score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from ..checks import check_choice

__all__ = ["MultiHeadMatchingHead", "MultiHeadMatchingOutput"]


@dataclass
class MultiHeadMatchingOutput(BaseOutput):
    """Output of :class:`MultiHeadMatchingHead`.

    Args:
        embeds (`torch.Tensor` of shape `(batch_size, num_heads * head_dim)`):
            Unit-norm head vectors, concatenated and scaled by `1/sqrt(num_heads)` (a unit vector overall).
        head_weights (`torch.Tensor` of shape `(batch_size, num_heads, num_tokens)`, *optional*):
            Each head's attention over the token states.
    """

    embeds: torch.Tensor
    head_weights: torch.Tensor | None = None


class _HeadPooling(nn.Module):
    """``num_heads`` attention poolings over token states, each followed by its own projection."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int):
        super().__init__()
        self.pool_queries = nn.Parameter(torch.randn(num_heads, hidden_size) / math.sqrt(hidden_size))
        self.projection = nn.Parameter(torch.randn(num_heads, hidden_size, head_dim) / math.sqrt(hidden_size))
        self.bias = nn.Parameter(torch.zeros(num_heads, head_dim))

    def forward(self, states: torch.Tensor, mask: torch.Tensor | None):
        scores = torch.einsum("bth,nh->bnt", states, self.pool_queries) / math.sqrt(states.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, :].bool(), torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=-1)
        pooled = torch.einsum("bnt,bth->bnh", weights, states)
        heads = torch.einsum("bnh,nhd->bnd", pooled, self.projection) + self.bias
        return heads, weights


class MultiHeadMatchingHead(ModelMixin, ConfigMixin):
    r"""
    Multi-head query-candidate matching over Q-Former token states (see the module docstring).

    Args:
        hidden_size (`int`): width of the Q-Former's token states.
        num_heads (`int`, defaults to 4): matching heads (our choice; the paper's count is not restated here).
        head_dim (`int`, defaults to 64): width of each head's vector (our choice).
    """

    @register_to_config
    def __init__(self, hidden_size: int, num_heads: int = 4, head_dim: int = 64):
        super().__init__()
        for name, value in {"hidden_size": hidden_size, "num_heads": num_heads, "head_dim": head_dim}.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        self.query = _HeadPooling(hidden_size, num_heads, head_dim)
        self.candidate = _HeadPooling(hidden_size, num_heads, head_dim)

    @property
    def embedding_dim(self) -> int:
        return self.config.num_heads * self.config.head_dim

    def forward(self, states: torch.Tensor, side: str = "candidate", attention_mask: torch.Tensor | None = None,
                return_dict: bool = True):
        """Embed token states of one side.

        Args:
            states (`torch.Tensor` of shape `(batch_size, num_tokens, hidden_size)`): Q-Former token states.
            side (`str`): `"query"` (reference image + modification text) or `"candidate"` (a gallery image).
            attention_mask (`torch.Tensor` of shape `(batch_size, num_tokens)`, *optional*): 1 for tokens to pool.
            return_dict (`bool`, defaults to `True`): a [`MultiHeadMatchingOutput`] or a tuple.
        """
        check_choice(side, "side", ("query", "candidate"))
        if states.ndim != 3 or states.shape[-1] != self.config.hidden_size:
            raise ValueError(f"`states` must be (batch_size, num_tokens, {self.config.hidden_size}); got "
                             f"{tuple(states.shape)}.")
        pooling = self.query if side == "query" else self.candidate
        heads, weights = pooling(states.to(pooling.projection.dtype), attention_mask)
        embeds = F.normalize(heads, dim=-1).flatten(1) / math.sqrt(self.config.num_heads)
        if not return_dict:
            return (embeds, weights)
        return MultiHeadMatchingOutput(embeds=embeds, head_weights=weights)
