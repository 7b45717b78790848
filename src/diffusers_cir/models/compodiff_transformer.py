# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""The CompoDiff denoiser: a transformer that predicts a clean CLIP image embedding.

Where the facts come from: the CompoDiff paper gives the design (a transformer that denoises the image embedding
and reads its conditions through cross-attention, predicting x0) and, in its hyperparameter table, depth 12 with 16
heads of 64. The details below are not in the paper: they are from the authors' released code (navervision/CompoDiff)
and the reference description in our parity fixtures, which the converted released weights are tested against:

* two query tokens ``[x_t, time_embedding]``; the prediction is the first token after the stack, the final
  (max-stabilised) norm and a bias-free projection;
* a context ``[text tokens (77 x 1280 in the released models, projected), reference image embedding, mask token]``
  that the query tokens read through cross-attention (8 heads, one learned null key/value shared by the heads);
* self-attention over the two query tokens is multi-query (one key/value head), cosine-similarity attention with
  logits ``16 * cos``, rotary embedding on the first ``min(32, head_dim)`` dims, a learned null key/value and a
  T5-style relative position bias;
* gain-only LayerNorms (eps 1e-5 in float32, 1e-3 in half precision), SwiGLU feed-forward.

Everything that depends only on the context (text projection, mask embedding and the cross-attention keys/values
of every layer) is computed by :meth:`CompoDiffTransformer.encode_context` and can be reused across denoising steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders.peft import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from . import fused_inference
from ._dtype_cast import QuietDtypeCastMixin, compute_dtype, layerwise_casting_enabled

# The reference's LayerNorm takes its larger epsilon in half precision; float32 and float64 keep the small one.
HALF_PRECISION = (torch.float16, torch.bfloat16)


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """Attention softmax in float32 for half precision, in the scores' own dtype for float32 and float64."""
    return torch.promote_types(dtype, torch.float32)


# A few rows on CPU: MKL's sgemm splits `x @ W.T` over the rows of `x`, so with a handful of rows (single queries:
# 3 guidance branches x 2 tokens) one thread does all the work while the others wait; as `(W @ x.T).T` the weight's
# output features are split instead. On 2 AVX2 cores (benchmarks/bench_compodiff.py --device cpu) this takes a
# 6144 x 768 projection of 6 rows from 3.7 to 1.7 ms; from about 256 rows on the two orders are equal, and with one
# thread there is nothing to split.
SMALL_ROW_LINEAR_MAX_ROWS = 128


@torch.compiler.assume_constant_result  # read once when compiled (a plain call would break the graph)
def _cpu_threads() -> int:
    return torch.get_num_threads()


def project(layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """`layer(hidden_states)`, computed as `(W @ x.T).T` for a few float32 rows in CPU inference (see above).

    Only for a plain `nn.Linear` with no hooks: a PEFT-wrapped layer, an offloading hook or any training (grad
    enabled) goes through the module itself.
    """
    if (
        type(layer) is nn.Linear
        and hidden_states.device.type == "cpu"
        and hidden_states.dtype == layer.weight.dtype == torch.float32
        and not torch.is_grad_enabled()
        and hidden_states.numel() <= SMALL_ROW_LINEAR_MAX_ROWS * hidden_states.shape[-1]
        and _cpu_threads() > 1
        and not (layer._forward_hooks or layer._forward_pre_hooks or "_hf_hook" in layer.__dict__)
    ):
        rows = hidden_states.reshape(-1, hidden_states.shape[-1])
        output = torch.mm(layer.weight, rows.T).T.contiguous()
        if layer.bias is not None:
            output += layer.bias
        return output.view(*hidden_states.shape[:-1], output.shape[-1])
    return layer(hidden_states)


@dataclass
class CompoDiffTransformerOutput(BaseOutput):
    """
    Args:
        predicted_image_embedding (`torch.Tensor` of shape `(batch_size, embedding_dim)`):
            The predicted clean CLIP image embedding (x0), not normalised.
    """

    predicted_image_embedding: torch.Tensor


@dataclass
class GuidanceKeyValues:
    """Cross-attention keys/values of one layer for the three guidance branches, factored.

    Rows are `[conditional (R), negative (R), unconditional (R)]`. The conditional rows keep their full keys/values;
    the two negative branches share the null + negative-text part (`shared_*`, one row for the whole batch when
    every query has the same negative text, else one per query) and differ only in their image and mask tokens
    (`tail_*`, zero keys/values for the zero image). Attention over these is exactly attention over the
    concatenated keys, without ever materialising the shared part per row.
    """

    cond_key: torch.Tensor  # [R, heads, 1 + L + 2, head_dim]
    cond_value: torch.Tensor
    shared_key: torch.Tensor  # [1 or R, heads, 1 + L, head_dim]
    shared_value: torch.Tensor
    tail_key: torch.Tensor  # [2R, heads, 2, head_dim]
    tail_value: torch.Tensor

    @property
    def rows(self) -> int:
        return 3 * self.cond_key.shape[0]

    def repeat_interleave(self, repeats: int) -> "GuidanceKeyValues":
        def per_branch(tensor, branches):
            return torch.cat([part.repeat_interleave(repeats, 0) for part in tensor.chunk(branches)])

        shared = self.shared_key.shape[0] != 1
        return GuidanceKeyValues(
            self.cond_key.repeat_interleave(repeats, 0), self.cond_value.repeat_interleave(repeats, 0),
            self.shared_key.repeat_interleave(repeats, 0) if shared else self.shared_key,
            self.shared_value.repeat_interleave(repeats, 0) if shared else self.shared_value,
            per_branch(self.tail_key, 2), per_branch(self.tail_value, 2),
        )


@dataclass
class FusedGuidanceKeyValues:
    """Cross-attention inputs of one layer for the three guidance branches, as the fused kernel reads them.

    `conditional_kv` is `to_kv` of the conditional context `[text, image, mask]`, `negative_kv` `to_kv` of the
    projected negative text (one row for the batch or one per query); the kernel assembles the three branches' keys
    (null key first, zero image token for the unconditional branch) while reading. Consecutive `samples` rows of a
    branch share one context row.
    """

    conditional_kv: torch.Tensor  # [C, L + 2, 2 * heads * head_dim]
    negative_kv: torch.Tensor  # [1 or C, L, 2 * heads * head_dim]
    samples: int = 1
    # the layer's self-attention query and key/value weights stacked (one projection instead of two), when both
    # are plain bias-free linear layers (not, for instance, wrapped by an unfused LoRA adapter)
    self_attention_qkv_weight: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return 3 * self.conditional_kv.shape[0] * self.samples

    def repeat_interleave(self, repeats: int) -> "FusedGuidanceKeyValues":
        return FusedGuidanceKeyValues(
            self.conditional_kv, self.negative_kv, self.samples * repeats, self.self_attention_qkv_weight
        )


@dataclass
class CompoDiffContext:
    """Step-independent state of a batch of queries (see :meth:`CompoDiffTransformer.encode_context`).

    ``cross_attention_kv`` holds, for every layer, the keys and values ``[batch, heads, 1 + context_len, head_dim]``
    of the cross-attention, the learned null key/value already prepended, or their factored
    :class:`GuidanceKeyValues` form (:meth:`CompoDiffTransformer.encode_guidance_context`).
    """

    cross_attention_kv: list
    # float32 rotary cos/sin `[2, head_dim]` and position bias `[heads, 2, 3]` of the fused self-attention kernel;
    # set by `encode_guidance_context` when it chose the fused kernels, `None` otherwise.
    self_attention_tables: tuple | None = None

    @property
    def batch_size(self) -> int:
        first = self.cross_attention_kv[0]
        return first.rows if isinstance(first, (GuidanceKeyValues, FusedGuidanceKeyValues)) else first[0].shape[0]

    def repeat_interleave(self, repeats: int) -> "CompoDiffContext":
        layers = []
        for layer in self.cross_attention_kv:
            if isinstance(layer, (GuidanceKeyValues, FusedGuidanceKeyValues)):
                layers.append(layer.repeat_interleave(repeats))
            else:
                layers.append((layer[0].repeat_interleave(repeats, 0), layer[1].repeat_interleave(repeats, 0)))
        return CompoDiffContext(layers, self.self_attention_tables)


class GainLayerNorm(nn.Module):
    """LayerNorm with a gain and no bias, whose epsilon depends on the input precision (as in the reference).

    With ``stable=True`` the input is first divided by its (detached) maximum over the last dimension, which keeps
    half-precision activations in range before the final norm.
    """

    def __init__(self, dim: int, eps: float = 1e-5, half_precision_eps: float = 1e-3, stable: bool = False):
        super().__init__()
        self.eps = eps
        self.half_precision_eps = half_precision_eps
        self.stable = stable
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        eps = self.half_precision_eps if hidden_states.dtype in HALF_PRECISION else self.eps
        if self.stable:
            hidden_states = hidden_states / hidden_states.amax(dim=-1, keepdim=True).detach()
        return F.layer_norm(hidden_states, hidden_states.shape[-1:], self.weight.to(hidden_states.dtype), None, eps)


class ConditionMLP(nn.Module):
    """``in -> 2*dim -> 2*dim -> dim`` with SiLU after the first two linears (time and mask embeddings).

    The reference runs this MLP in float32 whatever the model precision; we do the same and cast back.
    """

    def __init__(self, in_features: int, dim: int):
        super().__init__()
        hidden = 2 * dim
        self.linear_1 = nn.Linear(in_features, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)
        self.linear_3 = nn.Linear(hidden, dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(self.linear_1)
        hidden_states = F.silu(project(self.linear_1, hidden_states.to(dtype)))
        hidden_states = F.silu(project(self.linear_2, hidden_states))
        return project(self.linear_3, hidden_states)


def sinusoidal_timestep_embedding(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """``[sin, cos]`` of ``t * exp(-i * log(10000) / (dim/2 - 1))``, in float32."""
    half = dim // 2
    exponent = torch.arange(half, device=timestep.device, dtype=torch.float32) * (-math.log(10000) / (half - 1))
    arguments = timestep.float()[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([arguments.sin(), arguments.cos()], dim=-1)


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's unidirectional bucketing: keys after the query share bucket 0, far keys share log-spaced buckets."""
    distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    large = max_exact + (
        torch.log(distance.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    large = large.clamp(max=num_buckets - 1)
    return torch.where(is_small, distance, large)


def apply_rotary_embedding(hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs ``(x0, x1)`` of the first ``cos.shape[-1]`` features; the rest pass through."""
    rotary_dim = cos.shape[-1]
    rotated, passthrough = hidden_states[..., :rotary_dim], hidden_states[..., rotary_dim:]
    pairs = rotated.unflatten(-1, (-1, 2))
    rotate_half = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    rotated = rotated * cos + rotate_half * sin
    return torch.cat((rotated, passthrough), dim=-1)


class CompoDiffSelfAttention(nn.Module):
    """Multi-query cosine-similarity self-attention over the query tokens (see module docstring)."""

    def __init__(self, dim: int, heads: int, head_dim: int, cosine_sim_scale: float, dropout: float = 0.0, eps=(1e-5, 1e-3)):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        self.cosine_sim_scale = cosine_sim_scale
        self.dropout = dropout
        self.norm = GainLayerNorm(dim, *eps)
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * head_dim, bias=False)
        self.null_kv = nn.Parameter(torch.randn(2, head_dim))
        self.to_out = nn.Linear(heads * head_dim, dim, bias=False)
        self.out_norm = GainLayerNorm(dim, *eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        position_bias: torch.Tensor,
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        hidden_states = self.norm(hidden_states)
        query = project(self.to_q, hidden_states).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        key, value = project(self.to_kv, hidden_states).chunk(2, dim=-1)
        cos, sin = rotary
        query = apply_rotary_embedding(query, cos, sin)
        key = apply_rotary_embedding(key, cos, sin)
        null_key, null_value = self.null_kv.to(hidden_states.dtype).unbind(0)
        key = torch.cat((null_key.expand(batch, 1, -1), key), dim=1)
        value = torch.cat((null_value.expand(batch, 1, -1), value), dim=1)
        # Cosine similarity: normalise, then put the whole logit scale on the query.
        query = F.normalize(query, dim=-1) * self.cosine_sim_scale
        key = F.normalize(key, dim=-1)
        # Multi-query attention over a handful of tokens: with the heads folded into the query rows, one batched
        # matmul against the single key head does it, without expanding keys/values to every head (SDPA would,
        # and falls back to its unfused path for this shape).
        scores = torch.bmm(query.reshape(batch, self.heads * length, self.head_dim), key.transpose(1, 2))
        scores = scores.view(batch, self.heads, length, length + 1) + position_bias.to(scores.dtype)
        weights = scores.softmax(dim=-1, dtype=_softmax_dtype(scores.dtype)).to(value.dtype)
        weights = F.dropout(weights, p=self.dropout, training=self.training)
        attention = torch.bmm(weights.view(batch, self.heads * length, length + 1), value)
        attention = attention.view(batch, self.heads, length, self.head_dim).transpose(1, 2)
        attention = attention.reshape(batch, length, self.heads * self.head_dim)
        return self.out_norm(project(self.to_out, attention))


class CompoDiffCrossAttention(nn.Module):
    """Dot-product cross-attention from the query tokens to the (pre-projected) context."""

    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float = 0.0, eps=(1e-5, 1e-3)):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        self.dropout = dropout
        self.norm = GainLayerNorm(dim, *eps)
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * head_dim, bias=False)
        self.null_kv = nn.Parameter(torch.randn(2, head_dim))
        self.to_out = nn.Linear(heads * head_dim, dim, bias=False)
        self.out_norm = GainLayerNorm(dim, *eps)

    def context_key_value(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[batch, heads, 1 + length, head_dim]`` of a context, null key/value prepended."""
        batch, length, _ = context.shape
        key, value = project(self.to_kv, context).view(batch, length, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        null_key, null_value = self.null_kv.to(context.dtype).unbind(0)
        key = torch.cat((null_key.expand(batch, self.heads, 1, -1), key), dim=2)
        value = torch.cat((null_value.expand(batch, self.heads, 1, -1), value), dim=2)
        return key, value

    def forward(self, hidden_states: torch.Tensor, key_values) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        query = project(self.to_q, self.norm(hidden_states)).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        if isinstance(key_values, GuidanceKeyValues):
            attention = self._guidance_attention(query, key_values)
        else:
            key, value = (tensor.to(query.dtype) for tensor in key_values)
            if torch.is_grad_enabled():
                # training: SDPA's fused kernels save memory in the backward pass
                attention = F.scaled_dot_product_attention(
                    query, key, value, dropout_p=self.dropout if self.training else 0.0
                )
            else:
                attention = self._rowwise_attention(query, key, value)
        attention = attention.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim)
        return self.out_norm(project(self.to_out, attention))

    def _rowwise_attention(self, query, key, value):
        """Each row against its own keys. For two query tokens a batched matmul reads every cached key/value once,
        at memory speed, where fused attention kernels waste their tiles on the tiny query length."""
        batch, heads, length, _ = query.shape
        rows = batch * heads
        scores = torch.bmm(
            query.reshape(rows, length, self.head_dim), key.reshape(rows, -1, self.head_dim).transpose(1, 2)
        ) * (self.head_dim**-0.5)
        weights = scores.softmax(dim=-1, dtype=_softmax_dtype(scores.dtype)).to(value.dtype)
        return torch.bmm(weights, value.reshape(rows, -1, self.head_dim)).view(batch, heads, length, -1)

    def _guidance_attention(self, query, kv: GuidanceKeyValues):
        dtype = query.dtype
        per_branch = kv.cond_key.shape[0]
        conditional = self._rowwise_attention(query[:per_branch], kv.cond_key.to(dtype), kv.cond_value.to(dtype))
        negative = query[per_branch:]  # [2R, heads, length, head_dim]: the negative then the unconditional rows
        rows, heads, length, width = negative.shape
        scale = width**-0.5
        shared_key, shared_value = kv.shared_key.to(dtype), kv.shared_value.to(dtype)
        if shared_key.shape[0] == 1:
            # one negative text for the batch: every row's queries against the same keys, one GEMM per head
            stacked = negative.permute(1, 0, 2, 3).reshape(heads, rows * length, width)
            shared_scores = torch.bmm(stacked, shared_key[0].transpose(1, 2))
            shared_scores = shared_scores.view(heads, rows, length, -1).permute(1, 0, 2, 3)
        else:
            # one negative text per query, used by its negative and unconditional rows
            stacked = negative.view(2, rows // 2, heads, length, width).permute(1, 2, 0, 3, 4)
            stacked = stacked.reshape((rows // 2) * heads, 2 * length, width)
            shared_scores = torch.bmm(stacked, shared_key.flatten(0, 1).transpose(1, 2))
            shared_scores = shared_scores.view(rows // 2, heads, 2, length, -1).permute(2, 0, 1, 3, 4)
            shared_scores = shared_scores.reshape(rows, heads, length, -1)
        tail_key, tail_value = kv.tail_key.to(dtype), kv.tail_value.to(dtype)
        tail_scores = torch.matmul(negative, tail_key.transpose(-1, -2))
        scores = torch.cat((shared_scores, tail_scores), dim=-1) * scale
        weights = scores.softmax(dim=-1, dtype=_softmax_dtype(scores.dtype)).to(dtype)
        shared_length = shared_key.shape[2]
        shared_weights, tail_weights = weights[..., :shared_length], weights[..., shared_length:]
        if shared_key.shape[0] == 1:
            stacked = shared_weights.permute(1, 0, 2, 3).reshape(heads, rows * length, shared_length)
            shared_out = torch.bmm(stacked, shared_value[0]).view(heads, rows, length, width).permute(1, 0, 2, 3)
        else:
            stacked = shared_weights.view(2, rows // 2, heads, length, shared_length).permute(1, 2, 0, 3, 4)
            stacked = stacked.reshape((rows // 2) * heads, 2 * length, shared_length)
            shared_out = torch.bmm(stacked, shared_value.flatten(0, 1))
            shared_out = shared_out.view(rows // 2, heads, 2, length, width).permute(2, 0, 1, 3, 4)
            shared_out = shared_out.reshape(rows, heads, length, width)
        negative_out = shared_out + torch.matmul(tail_weights, tail_value)
        return torch.cat((conditional, negative_out))


class CompoDiffFeedForward(nn.Module):
    """LayerNorm, Linear(dim, 2*mult*dim), SwiGLU (first half times SiLU of the second), Linear(mult*dim, dim)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0, eps=(1e-5, 1e-3)):
        super().__init__()
        self.norm = GainLayerNorm(dim, *eps)
        self.proj_in = nn.Linear(dim, 2 * mult * dim, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(mult * dim, dim, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states, gate = project(self.proj_in, self.norm(hidden_states)).chunk(2, dim=-1)
        return project(self.proj_out, self.dropout(hidden_states * F.silu(gate)))


class CompoDiffBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        cross_attention_heads: int,
        cosine_sim_scale: float,
        ff_mult: int,
        dropout: float,
        eps: tuple[float, float] = (1e-5, 1e-3),
    ):
        super().__init__()
        self.self_attn = CompoDiffSelfAttention(dim, heads, head_dim, cosine_sim_scale, dropout, eps)
        self.cross_attn = CompoDiffCrossAttention(dim, cross_attention_heads, head_dim, dropout, eps)
        self.ff = CompoDiffFeedForward(dim, ff_mult, dropout, eps)

    def forward(self, hidden_states, rotary_cos, rotary_sin, position_bias, context_key_values):
        hidden_states = self.self_attn(hidden_states, (rotary_cos, rotary_sin), position_bias) + hidden_states
        hidden_states = self.cross_attn(hidden_states, context_key_values) + hidden_states
        return self.ff(hidden_states) + hidden_states


class CompoDiffTransformer(QuietDtypeCastMixin, ModelMixin, ConfigMixin, PeftAdapterMixin):
    r"""
    The CompoDiff denoiser. Given a noisy CLIP image embedding ``x_t``, a timestep and the conditions (reference image
    embedding, text hidden states, a 64x64 mask) it predicts the clean embedding ``x0``.

    Parameters:
        embedding_dim (`int`, defaults to 768): Width of the CLIP image embedding (and of the transformer).
        text_embedding_dim (`int`, defaults to 1280): Width of the CLIP text hidden states used as condition.
        num_layers (`int`, defaults to 12): Number of transformer blocks.
        num_attention_heads (`int`, defaults to 16): Query heads of the self-attention.
        attention_head_dim (`int`, defaults to 64): Width of every attention head.
        num_cross_attention_heads (`int`, defaults to 8): Heads of the cross-attention.
        mask_size (`int`, defaults to 64): Side of the square mask condition.
        num_train_timesteps (`int`, defaults to 1000): Diffusion timesteps of the schedule it was trained with.
        rotary_dim (`int`, *optional*): Features rotated by the rotary embedding (default ``min(32, head_dim)``).
        ff_mult (`int`, defaults to 4): Feed-forward expansion.
        cosine_sim_scale (`float`, defaults to 16): Logit scale of the cosine-similarity self-attention.
        relative_position_buckets (`int`, defaults to 32), relative_position_max_distance (`int`, defaults to 128):
            T5 relative position bias of the self-attention.
        dropout (`float`, defaults to 0.0): Attention and feed-forward dropout (training only).
        norm_eps (`float`, defaults to 1e-5): LayerNorm epsilon in float32.
        half_precision_norm_eps (`float`, defaults to 1e-3): LayerNorm epsilon in bf16/fp16, as in the reference.
            Where a norm's input variance is comparable to it (random weights: ~5e-4 after cross-attention), half
            precision then departs from float32 by design; set it to `norm_eps` to make bf16 track float32.

    Example:
        >>> import torch
        >>> from diffusers_cir import CompoDiffTransformer
        >>> model = CompoDiffTransformer(embedding_dim=64, text_embedding_dim=32, num_layers=2,
        ...                              num_attention_heads=2, attention_head_dim=16)
        >>> out = model(torch.randn(2, 64), torch.tensor([10, 500]), image_embeds=torch.randn(2, 64),
        ...             text_hidden_states=torch.randn(2, 77, 32), mask=torch.zeros(2, 64, 64))
        >>> out.predicted_image_embedding.shape
        torch.Size([2, 64])
    """

    _supports_gradient_checkpointing = True
    _repeated_blocks = ["CompoDiffBlock"]  # `compile_repeated_blocks()` compiles these (regional compilation)
    _no_split_modules = ["CompoDiffBlock"]
    # `quantize_for_cpu` keeps these in float32: the condition layers run once per query (not per network call) and
    # the output projection is small, so int8 would buy little time for its share of the error
    _keep_float32_on_cpu_int8 = ["text_proj", "time_embedding.*", "mask_embedding.*", "proj_out"]

    @register_to_config
    def __init__(
        self,
        embedding_dim: int = 768,
        text_embedding_dim: int = 1280,
        num_layers: int = 12,
        num_attention_heads: int = 16,
        attention_head_dim: int = 64,
        num_cross_attention_heads: int = 8,
        mask_size: int = 64,
        num_train_timesteps: int = 1000,
        rotary_dim: int | None = None,
        ff_mult: int = 4,
        cosine_sim_scale: float = 16.0,
        relative_position_buckets: int = 32,
        relative_position_max_distance: int = 128,
        dropout: float = 0.0,
        norm_eps: float = 1e-5,
        half_precision_norm_eps: float = 1e-3,
    ):
        super().__init__()
        eps = (norm_eps, half_precision_norm_eps)
        rotary_dim = min(32, attention_head_dim) if rotary_dim is None else rotary_dim
        if rotary_dim % 2 or rotary_dim > attention_head_dim:
            raise ValueError(
                f"`rotary_dim` must be even and at most `attention_head_dim` ({attention_head_dim}), got {rotary_dim}."
            )
        self.text_proj = nn.Linear(text_embedding_dim, embedding_dim)
        self.time_embedding = ConditionMLP(embedding_dim, embedding_dim)
        self.mask_embedding = ConditionMLP(mask_size * mask_size, embedding_dim)
        self.relative_position_bias = nn.Embedding(relative_position_buckets, num_attention_heads)
        # A (frozen) parameter, as in the reference, so the parameter count matches the released model.
        frequencies = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
        self.rotary_frequencies = nn.Parameter(frequencies, requires_grad=False)
        self.blocks = nn.ModuleList(
            [
                CompoDiffBlock(
                    embedding_dim,
                    num_attention_heads,
                    attention_head_dim,
                    num_cross_attention_heads,
                    cosine_sim_scale,
                    ff_mult,
                    dropout,
                    eps,
                )
                for _ in range(num_layers)
            ]
        )
        self.norm_out = GainLayerNorm(embedding_dim, *eps, stable=True)
        self.proj_out = nn.Linear(embedding_dim, embedding_dim, bias=False)
        self.gradient_checkpointing = False
        self.fused_attention = True

    def set_fused_attention(self, enabled: bool) -> None:
        """Use (default) or not the fused Triton attention kernels in guided inference where they can run (CUDA
        with Triton; see `diffusers_cir.models.fused_inference`). Disabled, the PyTorch path runs everywhere."""
        self.fused_attention = bool(enabled)

    def _fused_attention_usable(self, device: torch.device) -> bool:
        config = self.config
        return (
            self.fused_attention
            and not self.training
            and not torch.is_grad_enabled()
            and fused_inference.fused_attention_available(device)
            and fused_inference.fused_attention_supports(config.num_attention_heads, config.attention_head_dim, 2)
            and fused_inference.fused_attention_supports(config.num_cross_attention_heads, config.attention_head_dim, 2)
            # the kernels read weights directly, which layerwise casting keeps in their storage dtype between calls
            and not layerwise_casting_enabled(self)
        )

    # ------------------------------------------------------------------ inputs

    def _as_batch_vector(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        width = self.config.embedding_dim
        if tensor.ndim == 3 and tensor.shape[1] == 1:
            tensor = tensor[:, 0]
        if tensor.ndim != 2 or tensor.shape[-1] != width:
            raise ValueError(
                f"`{name}` must have shape [batch, {width}] or [batch, 1, {width}], got {tuple(tensor.shape)}."
            )
        return tensor

    def _check_mask(self, mask: torch.Tensor | None, batch: int, reference: torch.Tensor) -> torch.Tensor:
        size = self.config.mask_size
        if mask is None:
            return reference.new_zeros(batch, size, size)
        if mask.ndim == 4 and mask.shape[1] == 1:
            mask = mask[:, 0]
        if mask.ndim != 3 or mask.shape[1:] != (size, size) or mask.shape[0] != batch:
            raise ValueError(f"`mask` must have shape [{batch}, {size}, {size}], got {tuple(mask.shape)}.")
        return mask

    # ------------------------------------------------------------------ context

    def encode_context(
        self,
        image_embeds: torch.Tensor,
        text_hidden_states: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> CompoDiffContext:
        """Everything that does not depend on the denoising step, computed once per query.

        Args:
            image_embeds: `[batch, embedding_dim]` (or `[batch, 1, embedding_dim]`) reference image embeddings;
                zeros for "no image".
            text_hidden_states: `[batch, length, text_embedding_dim]` CLIP text last hidden states.
            mask: `[batch, mask_size, mask_size]`; `None` means an all-zero mask.
        """
        image_embeds = self._as_batch_vector("image_embeds", image_embeds)
        batch = image_embeds.shape[0]
        if (
            text_hidden_states.ndim != 3
            or text_hidden_states.shape[0] != batch
            or text_hidden_states.shape[-1] != self.config.text_embedding_dim
        ):
            raise ValueError(
                f"`text_hidden_states` must have shape [{batch}, length, {self.config.text_embedding_dim}], "
                f"got {tuple(text_hidden_states.shape)}."
            )
        mask = self._check_mask(mask, batch, image_embeds)
        dtype = compute_dtype(self.text_proj)
        text_tokens = project(self.text_proj, text_hidden_states.to(dtype))
        mask_token = self.mask_embedding(mask.flatten(1)).to(dtype)
        context = torch.cat((text_tokens, image_embeds.to(dtype)[:, None], mask_token[:, None]), dim=1)
        return CompoDiffContext([block.cross_attn.context_key_value(context) for block in self.blocks])

    def encode_guidance_context(
        self,
        image_embeds: torch.Tensor,
        text_hidden_states: torch.Tensor,
        negative_text_hidden_states: torch.Tensor,
        mask: torch.Tensor | None = None,
        fused: bool | None = None,
    ) -> CompoDiffContext:
        """Context of the three guidance branches `[text+image, negative+image, negative+zero image]` (3 x batch rows).

        Equal to `encode_context` on the concatenated branches, but each distinct token is projected once: the two
        negative branches share their text and mask keys/values, a negative text given once (`[1, L, H]`) is
        projected once for the whole batch, and the zero image token has zero keys/values (`to_kv` has no bias).

        `fused` (default: where they can run, see `set_fused_attention`) prepares the layers for the fused Triton
        attention kernels instead: one `to_kv` projection of each context per layer, read in place by the kernel.
        """
        image_embeds = self._as_batch_vector("image_embeds", image_embeds)
        batch = image_embeds.shape[0]
        text_dim = self.config.text_embedding_dim
        for name, text in (("text_hidden_states", text_hidden_states), ("negative_text_hidden_states", negative_text_hidden_states)):
            if text.ndim != 3 or text.shape[-1] != text_dim or text.shape[0] not in (1, batch):
                raise ValueError(f"`{name}` must have shape [{batch} or 1, length, {text_dim}], got {tuple(text.shape)}.")
        if text_hidden_states.shape[0] != batch:
            text_hidden_states = text_hidden_states.expand(batch, -1, -1)
        mask = self._check_mask(mask, batch, image_embeds)
        dtype = compute_dtype(self.text_proj)
        conditional = torch.cat(
            (
                project(self.text_proj, text_hidden_states.to(dtype)),
                image_embeds.to(dtype)[:, None],
                self.mask_embedding(mask.flatten(1)).to(dtype)[:, None],
            ),
            dim=1,
        )
        negative_text = project(self.text_proj, negative_text_hidden_states.to(dtype))
        length = conditional.shape[1] - 2
        if fused is None:
            fused = self._fused_attention_usable(image_embeds.device) and negative_text.shape[1] == length
        if fused:
            tables = fused_inference.self_attention_tables(
                *self._rotary_and_bias(2, image_embeds.device, torch.float32), self.config.attention_head_dim
            )
            layers = []
            for block in self.blocks:
                to_q, to_kv = block.self_attn.to_q, block.self_attn.to_kv
                stacked = None
                if type(to_q) is nn.Linear and type(to_kv) is nn.Linear and to_q.bias is None and to_kv.bias is None:
                    stacked = torch.cat((to_q.weight, to_kv.weight))
                layers.append(
                    FusedGuidanceKeyValues(
                        block.cross_attn.to_kv(conditional), block.cross_attn.to_kv(negative_text), 1, stacked
                    )
                )
            return CompoDiffContext(layers, tables)
        layers = []
        for block in self.blocks:
            attention = block.cross_attn
            key, value = attention.context_key_value(conditional)  # [B, heads, 1 + L + 2, head_dim]
            shared_key, shared_value = attention.context_key_value(negative_text)  # [B or 1, heads, 1 + L, head_dim]
            tokens = slice(1 + length, None)  # the image and mask tokens
            image_and_mask_key, image_and_mask_value = key[:, :, tokens], value[:, :, tokens]
            # the zero image has zero keys/values: to_kv has no bias
            no_image = torch.ones_like(image_and_mask_key)
            no_image[:, :, 0] = 0
            layers.append(
                GuidanceKeyValues(
                    key, value, shared_key, shared_value,
                    torch.cat((image_and_mask_key, image_and_mask_key * no_image)),
                    torch.cat((image_and_mask_value, image_and_mask_value * no_image)),
                )
            )
        return CompoDiffContext(layers)

    def _fused_blocks(self, tokens: torch.Tensor, context: CompoDiffContext) -> torch.Tensor:
        """The blocks with the fused kernels: per block two attention kernels, three residual+norm passes, one
        SwiGLU and the projections (the same arithmetic as the modules, see `fused_inference`). Only the first
        token's output is read, so the last feed-forward runs on that token alone."""

        def eps(norm: GainLayerNorm) -> float:
            return norm.half_precision_eps if tokens.dtype in HALF_PRECISION else norm.eps

        tables = context.self_attention_tables
        blocks = list(self.blocks)
        hidden, normed = tokens, blocks[0].self_attn.norm(tokens)
        for index, (block, key_values) in enumerate(zip(blocks, context.cross_attention_kv)):
            attention, cross, feed_forward = block.self_attn, block.cross_attn, block.ff
            if key_values.self_attention_qkv_weight is not None:
                projected = F.linear(normed, key_values.self_attention_qkv_weight)
                width = attention.heads * attention.head_dim
                query, key_value = projected[..., :width], projected[..., width:]
            else:
                query, key_value = attention.to_q(normed), attention.to_kv(normed)
            update = attention.to_out(
                fused_inference.multi_query_self_attention(
                    query, key_value, attention.null_kv.to(tokens.dtype), *tables, attention.cosine_sim_scale
                )
            )
            hidden, normed = fused_inference.residual_norm(
                update, hidden, attention.out_norm.weight, cross.norm.weight, eps(attention.out_norm), eps(cross.norm)
            )
            update = cross.to_out(
                fused_inference.guidance_cross_attention(
                    cross.to_q(normed), key_values.conditional_kv, key_values.negative_kv,
                    cross.null_kv.to(tokens.dtype), cross.heads, key_values.samples,
                )
            )
            hidden, normed = fused_inference.residual_norm(
                update, hidden, cross.out_norm.weight, feed_forward.norm.weight, eps(cross.out_norm), eps(feed_forward.norm)
            )
            if index + 1 == len(blocks):  # nothing reads the time token after the last block
                hidden, normed = hidden[:, :1], normed[:, :1]
            update = feed_forward.proj_out(fused_inference.swiglu(feed_forward.proj_in(normed)))
            if index + 1 < len(blocks):
                following = blocks[index + 1].self_attn.norm
                hidden, normed = fused_inference.residual_norm(update, hidden, None, following.weight, 0.0, eps(following))
            else:
                hidden = update + hidden
        return hidden

    def _rotary_and_bias(self, length: int, device: torch.device, dtype: torch.dtype):
        positions = torch.arange(length, device=device, dtype=torch.float32)
        angles = positions[:, None] * self.rotary_frequencies.float()[None, :]
        angles = angles.repeat_interleave(2, dim=-1)
        query_positions = torch.arange(length, device=device)
        key_positions = torch.arange(length + 1, device=device)
        buckets = relative_position_bucket(
            key_positions[None, :] - query_positions[:, None],
            self.config.relative_position_buckets,
            self.config.relative_position_max_distance,
        )
        bias = self.relative_position_bias(buckets).permute(2, 0, 1)  # [heads, queries, keys]
        return angles.cos().to(dtype), angles.sin().to(dtype), bias.to(dtype)

    def embed_timesteps(self, timestep: torch.Tensor) -> torch.Tensor:
        """Time tokens `[n, embedding_dim]` (model dtype) of `n` timesteps: the sinusoidal embedding through the
        float32 time MLP. `forward(..., timestep_embeds=...)` takes them precomputed."""
        if not torch.is_tensor(timestep):
            timestep = torch.as_tensor(timestep, device=self.time_embedding.linear_1.weight.device)
        if timestep.ndim != 1:
            raise ValueError(f"`timestep` must have shape [n], got {tuple(timestep.shape)}.")
        time_token = self.time_embedding(sinusoidal_timestep_embedding(timestep, self.config.embedding_dim))
        return time_token.to(compute_dtype(self.proj_out))

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | int | float,
        image_embeds: torch.Tensor | None = None,
        text_hidden_states: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        return_dict: bool = True,
        context: CompoDiffContext | None = None,
        timestep_embeds: torch.Tensor | None = None,
    ) -> CompoDiffTransformerOutput | tuple[torch.Tensor]:
        """
        Args:
            hidden_states: `[batch, embedding_dim]` or `[batch, 1, embedding_dim]` noisy embedding x_t.
            timestep: integer timestep(s), a scalar or `[batch]`.
            image_embeds, text_hidden_states, mask: the conditions (see :meth:`encode_context`).
            context: a precomputed :class:`CompoDiffContext`, used instead of the three conditions.
            timestep_embeds: `[1 or batch, embedding_dim]`, the time tokens of `timestep` precomputed with
                :meth:`embed_timesteps` (a sampler embeds all its steps in one call); `timestep` is then not read.

        Returns:
            `CompoDiffTransformerOutput` with `predicted_image_embedding` `[batch, embedding_dim]`.
        """
        squeeze_back = hidden_states.ndim == 3
        hidden_states = self._as_batch_vector("hidden_states", hidden_states)
        batch = hidden_states.shape[0]
        if context is None:
            if image_embeds is None or text_hidden_states is None:
                raise ValueError("Pass `image_embeds` and `text_hidden_states` (or a precomputed `context`).")
            context = self.encode_context(image_embeds, text_hidden_states, mask)
        elif context.batch_size != batch:
            raise ValueError(f"`context` holds {context.batch_size} queries but `hidden_states` has {batch}.")

        dtype = compute_dtype(self.proj_out)
        if timestep_embeds is None:
            timestep = torch.as_tensor(timestep, device=hidden_states.device)
            if timestep.ndim == 0:
                timestep = timestep.reshape(1)  # one shared timestep: embed it once, broadcast below
            elif timestep.shape != (batch,):
                raise ValueError(f"`timestep` must be a scalar or have shape [{batch}], got {tuple(timestep.shape)}.")
            time_token = self.embed_timesteps(timestep)
        else:
            width = self.config.embedding_dim
            if timestep_embeds.ndim != 2 or timestep_embeds.shape[0] not in (1, batch) or timestep_embeds.shape[1] != width:
                raise ValueError(
                    f"`timestep_embeds` must have shape [1 or {batch}, {width}], got {tuple(timestep_embeds.shape)}."
                )
            time_token = timestep_embeds.to(dtype)
        time_token = time_token.expand(batch, -1)
        tokens = torch.stack((hidden_states.to(dtype), time_token), dim=1)
        if context.self_attention_tables is None:
            rotary_cos, rotary_sin, position_bias = self._rotary_and_bias(tokens.shape[1], tokens.device, dtype)
        else:  # the fused kernels take the float32 tables made once per context
            rotary_cos = rotary_sin = position_bias = None

        if context.self_attention_tables is not None:
            if torch.is_grad_enabled():
                raise ValueError(
                    "This `context` was prepared for the fused inference kernels, which have no backward pass: run "
                    "under `torch.no_grad()` or encode it with `fused=False`."
                )
            tokens = self._fused_blocks(tokens, context)
        else:
            for block, context_key_values in zip(self.blocks, context.cross_attention_kv):
                arguments = (tokens, rotary_cos, rotary_sin, position_bias, context_key_values)
                if torch.is_grad_enabled() and self.gradient_checkpointing:
                    tokens = self._gradient_checkpointing_func(block, *arguments)
                else:
                    tokens = block(*arguments)

        prediction = project(self.proj_out, self.norm_out(tokens[:, 0]))
        if squeeze_back:
            prediction = prediction[:, None]
        if not return_dict:
            return (prediction,)
        return CompoDiffTransformerOutput(predicted_image_embedding=prediction)
