# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""The MagicLens fusion model: CLIP image and text embeddings -> one multimodal embedding.

MagicLens (Zhang et al., ICML 2024) embeds a query (reference image + instruction) and a gallery item (image + the
empty text) with the same weights. The CLIP towers give one projected, un-normalised embedding per image and per
text; this model fuses the pair:

    x = [image_embed, text_embed]                        (a 2-token sequence, no position or type embedding)
    x = num_layers x { a = x + attention(LN(x)); x = a + W2 relu(W1 LN_ff(a)) }
    e = LN_pool(pooler_attention(query, x))[:, 0]        (a learned query attends to the 2 tokens)

Facts of the authors' layers (google-deepmind/magiclens ``layers.py``) that differ from a plain transformer:

* LayerNorm gain ``1 + scale`` with eps 1e-6 (the converter stores ``1 + scale`` as ``weight``);
* attention logits are capped, ``50 * tanh(logits / 50)``, before the float32 softmax;
* the pooler works in width ``pooler_num_attention_heads * pooler_attention_head_dim`` (4 x ``embed_dim`` in the
  releases) and scales its queries per dimension, ``q * 1.442695041 / sqrt(head_dim) * softplus(per_dim_scale)``,
  instead of by ``1 / sqrt(head_dim)``;
* the feed-forward activation is ReLU; the encoder has no final norm.

The embedding is returned un-normalised; MagicLens compares L2-normalised embeddings by dot product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from ._dtype_cast import QuietDtypeCastMixin

# 1 / softplus(0): lingvo's per-dimension scale is exactly 1 / sqrt(head_dim) while per_dim_scale is 0.
_INVERSE_SOFTPLUS_ZERO = 1.442695041


@dataclass
class MagicLensFusionOutput(BaseOutput):
    """Output of :class:`MagicLensFusion`.

    Args:
        embeds (`torch.Tensor` of shape `(batch_size, embed_dim)`):
            The multimodal embedding (the pooler's first query token), not normalised.
        last_hidden_state (`torch.Tensor` of shape `(batch_size, 2, embed_dim)`):
            The encoder output: the image token, then the text token.
        pooler_output (`torch.Tensor` of shape `(batch_size, num_query_tokens, embed_dim)`):
            Every query token of the pooler, after its LayerNorm.
        hidden_states (`tuple(torch.Tensor)`, *optional*):
            The encoder input and the output of each layer (with `output_hidden_states=True`).
        pooler_attentions (`torch.Tensor` of shape `(batch_size, pooler_heads, num_query_tokens, 2)`, *optional*):
            The pooler's attention probabilities (with `output_attentions=True`).
    """

    embeds: torch.Tensor
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    pooler_attentions: torch.Tensor | None = None


class MagicLensAttention(nn.Module):
    """Multi-head attention with a tanh logit cap; optional per-dimension query scaling (the pooler's)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        logit_cap: float,
        per_dim_scale: bool = False,
    ):
        super().__init__()
        inner_dim = num_heads * head_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.logit_cap = logit_cap
        self.to_q = nn.Linear(dim, inner_dim)
        self.to_k = nn.Linear(dim, inner_dim)
        self.to_v = nn.Linear(dim, inner_dim)
        self.to_out = nn.Linear(inner_dim, dim)
        self.per_dim_scale = nn.Parameter(torch.zeros(head_dim)) if per_dim_scale else None

    def _heads(self, states: torch.Tensor) -> torch.Tensor:
        batch, length, _ = states.shape
        return states.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def _scale_queries(self, query: torch.Tensor) -> torch.Tensor:
        if self.per_dim_scale is None:
            return query * self.head_dim**-0.5
        scale = _INVERSE_SOFTPLUS_ZERO / self.head_dim**0.5 * F.softplus(self.per_dim_scale.float())
        return query * scale.to(query.dtype)

    def forward(self, query_states: torch.Tensor, key_value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        query = self._scale_queries(self._heads(self.to_q(query_states)))
        key = self._heads(self.to_k(key_value_states))
        value = self._heads(self.to_v(key_value_states))
        logits = query @ key.transpose(-1, -2)
        logits = self.logit_cap * torch.tanh(logits / self.logit_cap)
        probs = logits.float().softmax(dim=-1).to(value.dtype)
        context = (probs @ value).transpose(1, 2).flatten(2)
        return self.to_out(context), probs


class MagicLensFeedForward(nn.Module):
    """Pre-norm ReLU MLP (the residual is added by the layer)."""

    def __init__(self, dim: int, inner_dim: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.linear_1 = nn.Linear(dim, inner_dim)
        self.linear_2 = nn.Linear(inner_dim, dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.relu(self.linear_1(self.norm(hidden_states))))


class MagicLensEncoderLayer(nn.Module):
    """Pre-norm self-attention and feed-forward, each with its residual."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, ff_dim: int, eps: float, logit_cap: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.attention = MagicLensAttention(dim, num_heads, head_dim, logit_cap)
        self.feed_forward = MagicLensFeedForward(dim, ff_dim, eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = self.norm(hidden_states)
        hidden_states = hidden_states + self.attention(normed, normed)[0]
        return hidden_states + self.feed_forward(hidden_states)


class MagicLensAttentionPooler(nn.Module):
    """Learned query tokens attend to the encoder output (un-normalised keys and values), then a LayerNorm."""

    def __init__(self, dim: int, num_query_tokens: int, num_heads: int, head_dim: int, eps: float, logit_cap: float):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(num_query_tokens, dim))
        self.attention = MagicLensAttention(dim, num_heads, head_dim, logit_cap, per_dim_scale=True)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        query = self.query.to(hidden_states.dtype).unsqueeze(0).expand(hidden_states.shape[0], -1, -1)
        pooled, probs = self.attention(query, hidden_states)
        return self.norm(pooled), probs


class MagicLensFusion(QuietDtypeCastMixin, ModelMixin, ConfigMixin):
    r"""
    Fuses a CLIP image embedding and a CLIP text embedding into one MagicLens embedding.

    Args:
        embed_dim (`int`, defaults to 768):
            Width of the CLIP joint space and of this model (512 for MagicLens-B, 768 for MagicLens-L).
        num_layers (`int`, defaults to 4):
            Self-attention layers over the (image, text) pair.
        num_attention_heads (`int`, defaults to 16):
            Heads of those layers (8 for MagicLens-B).
        attention_head_dim (`int`, *optional*):
            Width of each head; defaults to `embed_dim // num_attention_heads`.
        ff_dim (`int`, defaults to 3072):
            Inner width of the feed-forward networks (4 x `embed_dim` in the releases).
        pooler_num_attention_heads (`int`, defaults to 16):
            Heads of the attention pooler.
        pooler_attention_head_dim (`int`, *optional*):
            Width of each pooler head; defaults to `4 * embed_dim // pooler_num_attention_heads` (the authors'
            pooler works in width 4 x `embed_dim`).
        num_query_tokens (`int`, defaults to 1):
            Learned pooler queries; the first one gives the embedding.
        norm_eps (`float`, defaults to 1e-6):
            Epsilon of every LayerNorm.
        attention_logit_cap (`float`, defaults to 50.0):
            Attention logits are capped as `cap * tanh(logits / cap)`.

    Example:
        >>> import torch
        >>> from diffusers_cir.models.magiclens_fusion import MagicLensFusion
        >>> fusion = MagicLensFusion(embed_dim=32, num_layers=2, num_attention_heads=4, ff_dim=64,
        ...                          pooler_num_attention_heads=4)
        >>> fusion(torch.randn(3, 32), torch.randn(3, 32)).embeds.shape
        torch.Size([3, 32])
    """

    @register_to_config
    def __init__(
        self,
        embed_dim: int = 768,
        num_layers: int = 4,
        num_attention_heads: int = 16,
        attention_head_dim: int | None = None,
        ff_dim: int = 3072,
        pooler_num_attention_heads: int = 16,
        pooler_attention_head_dim: int | None = None,
        num_query_tokens: int = 1,
        norm_eps: float = 1e-6,
        attention_logit_cap: float = 50.0,
    ):
        super().__init__()
        if attention_head_dim is None:
            if embed_dim % num_attention_heads:
                raise ValueError(
                    f"`embed_dim` {embed_dim} is not divisible by `num_attention_heads` {num_attention_heads}: pass "
                    "`attention_head_dim`."
                )
            attention_head_dim = embed_dim // num_attention_heads
        if pooler_attention_head_dim is None:
            if 4 * embed_dim % pooler_num_attention_heads:
                raise ValueError(
                    f"4 x `embed_dim` ({4 * embed_dim}) is not divisible by `pooler_num_attention_heads` "
                    f"{pooler_num_attention_heads}: pass `pooler_attention_head_dim`."
                )
            pooler_attention_head_dim = 4 * embed_dim // pooler_num_attention_heads
        self.register_to_config(attention_head_dim=attention_head_dim, pooler_attention_head_dim=pooler_attention_head_dim)
        self.layers = nn.ModuleList(
            MagicLensEncoderLayer(embed_dim, num_attention_heads, attention_head_dim, ff_dim, norm_eps, attention_logit_cap)
            for _ in range(num_layers)
        )
        self.pooler = MagicLensAttentionPooler(
            embed_dim, num_query_tokens, pooler_num_attention_heads, pooler_attention_head_dim, norm_eps,
            attention_logit_cap,
        )

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        return_dict: bool = True,
    ) -> MagicLensFusionOutput | tuple:
        r"""
        Args:
            image_embeds (`torch.Tensor` of shape `(batch_size, embed_dim)`):
                Projected CLIP image embeddings, not normalised.
            text_embeds (`torch.Tensor` of shape `(batch_size, embed_dim)`):
                Projected CLIP text embeddings, not normalised (of the empty text for gallery items).
            output_hidden_states (`bool`): also return the encoder input and each layer's output.
            output_attentions (`bool`): also return the pooler's attention probabilities.
            return_dict (`bool`): return a [`MagicLensFusionOutput`] instead of a tuple.
        """
        hidden_states = torch.stack([image_embeds, text_embeds], dim=1)
        all_hidden_states = [hidden_states]
        for layer in self.layers:
            hidden_states = layer(hidden_states)
            all_hidden_states.append(hidden_states)
        pooled, probs = self.pooler(hidden_states)
        output = MagicLensFusionOutput(
            embeds=pooled[:, 0],
            last_hidden_state=hidden_states,
            pooler_output=pooled,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            pooler_attentions=probs if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()
