# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Fused inference kernels for the CompoDiff denoiser (Triton), with the equivalent PyTorch computation.

A denoising step runs two query tokens per row through every layer, so each attention is a few hundred
multiply-adds per head wrapped in a dozen tiny kernels (rotary, concatenations, norms, two batched matmuls, a
softmax, transposes). The two kernels below do one attention each in a single launch, reading the projections where
the linear layers wrote them:

* :func:`multi_query_self_attention`: rotary embedding (interleaved pairs, as the reference), the learned null
  key/value, cosine-similarity logits, the relative position bias and the softmax over ``1 + tokens`` keys, for all
  query heads against the single key/value head. One program per row.
* :func:`guidance_cross_attention`: the three classifier-free-guidance branches ``[conditional, negative,
  unconditional]`` against their contexts without materialising them: the conditional branch reads its own
  ``[null, text, image, mask]`` keys/values, the negative branches read the negative text (one row for the whole
  batch, or one per query) with the row's image and mask tokens, the unconditional branch a zero image token (score
  0, value 0: ``to_kv`` has no bias). Row ``r`` of a branch reads context row ``r // samples``, so several samples per
  query share one context. One program per (row, head) for rows with their own text; when one negative text serves
  the batch, a second kernel takes 16 negative-branch rows per program and reads the shared keys once for them.

Between them, :func:`residual_norm` (the output norm of a sub-layer, the residual add and the next sub-layer's input
norm in one pass) and :func:`swiglu` (the feed-forward gate) replace three and two element-wise kernels.

Arithmetic is float32 inside the kernels whatever the storage dtype. The PyTorch functions ``*_reference`` compute
the same thing with ordinary tensor ops; tests compare the two (on CPU through Triton's interpreter,
``TRITON_INTERPRET=1``, and on CUDA).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:  # Triton ships with PyTorch's CUDA wheels; CPU installs go without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fused_attention_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on `device` (CUDA with Triton installed, or Triton's CPU interpreter)."""
    if triton is None:
        return False
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and _interpreting())


def fused_attention_supports(heads: int, head_dim: int, tokens: int) -> bool:
    """Shapes the kernels are written for: power-of-two heads and head width, two query tokens."""
    def power_of_two(value: int) -> bool:
        return value > 0 and value & (value - 1) == 0

    return power_of_two(heads) and power_of_two(head_dim) and tokens == 2


# --------------------------------------------------------------------------------------------- self-attention

def self_attention_tables(rotary_cos: torch.Tensor, rotary_sin: torch.Tensor, position_bias: torch.Tensor, head_dim: int):
    """The kernel's float32 tables: cos/sin padded to the head width (1 and 0 past the rotary features) and the
    position bias ``[heads, tokens, tokens + 1]``."""
    tokens, rotary_dim = rotary_cos.shape
    cos = torch.ones(tokens, head_dim, dtype=torch.float32, device=rotary_cos.device)
    sin = torch.zeros(tokens, head_dim, dtype=torch.float32, device=rotary_cos.device)
    cos[:, :rotary_dim] = rotary_cos.float()
    sin[:, :rotary_dim] = rotary_sin.float()
    return cos.contiguous(), sin.contiguous(), position_bias.float().contiguous()


def multi_query_self_attention_reference(query, key_value, null_kv, cos, sin, position_bias, cosine_scale):
    """PyTorch version of :func:`multi_query_self_attention` (float32 arithmetic, same inputs and output)."""
    rows, tokens, width = query.shape
    head_dim = null_kv.shape[-1]
    heads = width // head_dim

    def rotate(x, position):  # x [..., head_dim]
        pairs = x.unflatten(-1, (-1, 2))
        half = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return x * cos[position] + half * sin[position]

    q = query.float().view(rows, tokens, heads, head_dim)
    key, value = key_value.float().split(head_dim, dim=-1)  # [rows, tokens, head_dim]
    q = torch.stack([rotate(q[:, t], t) for t in range(tokens)], dim=1)
    key = torch.stack([rotate(key[:, t], t) for t in range(tokens)], dim=1)
    null_key, null_value = null_kv.float()
    key = torch.cat((null_key.expand(rows, 1, -1), key), dim=1)
    value = torch.cat((null_value.expand(rows, 1, -1), value), dim=1)
    q = F.normalize(q, dim=-1) * cosine_scale
    key = F.normalize(key, dim=-1)
    scores = torch.einsum("rthd,rkd->rhtk", q, key) + position_bias.float()
    weights = scores.softmax(dim=-1)
    out = torch.einsum("rhtk,rkd->rthd", weights, value)
    return out.reshape(rows, tokens, width).to(query.dtype)


if triton is not None:

    @triton.jit
    def _rotate_pairs(x, cos, sin, SHAPE: tl.constexpr):
        """Rotary embedding of interleaved pairs: ``x`` ``[..., D]`` -> its rotated ``(even, odd)`` halves
        ``[..., D/2]`` (``cos``/``sin`` per pair). Dot products need no re-interleaving."""
        even, odd = tl.split(tl.reshape(x, SHAPE))
        return even * cos - odd * sin, odd * cos + even * sin

    @triton.jit
    def _self_attention_kernel(
        q_ptr, kv_ptr, null_ptr, cos_ptr, sin_ptr, bias_ptr, out_ptr,
        stride_q_row, stride_q_token, stride_kv_row, stride_kv_token, stride_out_row, stride_out_token,
        cosine_scale,
        HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):
        row = tl.program_id(0)
        heads = tl.arange(0, HEADS)
        dims = tl.arange(0, HEAD_DIM)
        pairs = 2 * tl.arange(0, HEAD_DIM // 2)  # the tables repeat each pair's angle: read it once
        # two query tokens (positions 0 and 1); keys: [null, token 0, token 1] (positions 0, 1, 2 of the bias)
        kv0 = kv_ptr + row * stride_kv_row
        kv1 = kv0 + stride_kv_token
        k0e, k0o = _rotate_pairs(tl.load(kv0 + dims).to(tl.float32), tl.load(cos_ptr + pairs), tl.load(sin_ptr + pairs),
                                 (HEAD_DIM // 2, 2))
        k1e, k1o = _rotate_pairs(tl.load(kv1 + dims).to(tl.float32), tl.load(cos_ptr + HEAD_DIM + pairs),
                                 tl.load(sin_ptr + HEAD_DIM + pairs), (HEAD_DIM // 2, 2))
        v0 = tl.load(kv0 + HEAD_DIM + dims).to(tl.float32)
        v1 = tl.load(kv1 + HEAD_DIM + dims).to(tl.float32)
        null_k = tl.load(null_ptr + dims).to(tl.float32)
        null_v = tl.load(null_ptr + HEAD_DIM + dims).to(tl.float32)
        nke, nko = tl.split(tl.reshape(null_k, (HEAD_DIM // 2, 2)))
        inverse = 1.0 / tl.maximum(tl.sqrt(tl.sum(k0e * k0e + k0o * k0o, axis=0)), 1e-12)
        k0e, k0o = k0e * inverse, k0o * inverse
        inverse = 1.0 / tl.maximum(tl.sqrt(tl.sum(k1e * k1e + k1o * k1o, axis=0)), 1e-12)
        k1e, k1o = k1e * inverse, k1o * inverse
        inverse = 1.0 / tl.maximum(tl.sqrt(tl.sum(null_k * null_k, axis=0)), 1e-12)
        nke, nko = nke * inverse, nko * inverse

        offsets = heads[:, None] * HEAD_DIM + dims[None, :]
        for token in tl.static_range(2):
            q_row = q_ptr + row * stride_q_row + token * stride_q_token
            qe, qo = _rotate_pairs(tl.load(q_row + offsets).to(tl.float32),
                                   tl.load(cos_ptr + token * HEAD_DIM + pairs)[None, :],
                                   tl.load(sin_ptr + token * HEAD_DIM + pairs)[None, :], (HEADS, HEAD_DIM // 2, 2))
            norm = tl.sqrt(tl.sum(qe * qe + qo * qo, axis=1))
            factor = cosine_scale / tl.maximum(norm, 1e-12)  # [heads]
            bias = bias_ptr + heads * 6 + token * 3  # [heads, 2, 3]
            s0 = tl.sum(qe * nke[None, :] + qo * nko[None, :], axis=1) * factor + tl.load(bias)
            s1 = tl.sum(qe * k0e[None, :] + qo * k0o[None, :], axis=1) * factor + tl.load(bias + 1)
            s2 = tl.sum(qe * k1e[None, :] + qo * k1o[None, :], axis=1) * factor + tl.load(bias + 2)
            top = tl.maximum(tl.maximum(s0, s1), s2)
            e0 = tl.exp(s0 - top)
            e1 = tl.exp(s1 - top)
            e2 = tl.exp(s2 - top)
            total = e0 + e1 + e2
            out = (e0 / total)[:, None] * null_v[None, :] + (e1 / total)[:, None] * v0[None, :]
            out += (e2 / total)[:, None] * v1[None, :]
            out_row = out_ptr + row * stride_out_row + token * stride_out_token
            tl.store(out_row + offsets, out.to(out_ptr.dtype.element_ty))


SELF_ATTENTION_WARPS = 1


def multi_query_self_attention(query, key_value, null_kv, cos, sin, position_bias, cosine_scale):
    """Self-attention of two query tokens, all heads against one key/value head.

    Args:
        query: `[rows, 2, heads * head_dim]` query projections (before rotary).
        key_value: `[rows, 2, 2 * head_dim]` key and value projections of the two tokens.
        null_kv: `[2, head_dim]` learned null key and value.
        cos, sin: `[2, head_dim]` float32 rotary tables (see :func:`self_attention_tables`).
        position_bias: `[heads, 2, 3]` float32 relative position bias.
        cosine_scale: logit scale of the cosine similarity.

    Returns:
        `[rows, 2, heads * head_dim]` attention output, in `query`'s dtype.
    """
    rows, tokens, width = query.shape
    head_dim = null_kv.shape[-1]
    if query.stride(-1) != 1 or key_value.stride(-1) != 1:
        raise ValueError("`query` and `key_value` must be contiguous in their last dimension.")
    out = torch.empty(rows, tokens, width, dtype=query.dtype, device=query.device)
    if rows:
        _self_attention_kernel[(rows,)](
            query, key_value, null_kv.contiguous(), cos, sin, position_bias, out,
            query.stride(0), query.stride(1), key_value.stride(0), key_value.stride(1), out.stride(0), out.stride(1),
            float(cosine_scale), HEADS=width // head_dim, HEAD_DIM=head_dim, num_warps=SELF_ATTENTION_WARPS,
        )
    return out


# --------------------------------------------------------------------------------------------- cross-attention

def guidance_cross_attention_reference(query, conditional_kv, negative_kv, null_kv, heads, samples):
    """PyTorch version of :func:`guidance_cross_attention` (float32 arithmetic, same inputs and output)."""
    rows3, tokens, width = query.shape
    head_dim = width // heads
    rows = rows3 // 3
    context_rows = torch.arange(rows, device=query.device) // samples
    cond = conditional_kv.float()[context_rows].view(rows, -1, 2, heads, head_dim)  # [R, L+2, 2, H, D]
    negative = negative_kv.float()
    negative = negative.expand(conditional_kv.shape[0], -1, -1) if negative.shape[0] == 1 else negative
    negative = negative[context_rows].view(rows, -1, 2, heads, head_dim)  # [R, L, 2, H, D]
    length = negative.shape[1]
    null = null_kv.float().view(2, 1, head_dim).expand(2, heads, head_dim)
    null = null.expand(rows, 1, 2, heads, head_dim)
    tails = cond[:, length:]  # image and mask tokens
    no_image = tails.clone()
    no_image[:, 0] = 0
    contexts = (
        torch.cat((null, cond), dim=1),
        torch.cat((null, negative, tails), dim=1),
        torch.cat((null, negative, no_image), dim=1),
    )
    outputs = []
    for branch, context in enumerate(contexts):
        key, value = context[:, :, 0].transpose(1, 2), context[:, :, 1].transpose(1, 2)  # [R, H, K, D]
        q = query[branch * rows:(branch + 1) * rows].float().view(rows, tokens, heads, head_dim).transpose(1, 2)
        weights = (q @ key.transpose(-1, -2) * head_dim**-0.5).softmax(dim=-1)
        outputs.append((weights @ value).transpose(1, 2).reshape(rows, tokens, width))
    return torch.cat(outputs).to(query.dtype)


if triton is not None:

    @triton.jit
    def _online_softmax_update(scores, value, top, total, acc):
        """Fold a chunk of keys (scores `[CHUNK]`, values `[CHUNK, D]`) into a running softmax-weighted sum."""
        new_top = tl.maximum(top, tl.max(scores, axis=0))
        rescale = tl.exp(top - new_top)
        weights = tl.exp(scores - new_top)
        total = total * rescale + tl.sum(weights, axis=0)
        acc = acc * rescale + tl.sum(weights[:, None] * value, axis=0)
        return new_top, total, acc

    @triton.jit
    def _guidance_cross_attention_kernel(
        q_ptr, cond_ptr, neg_ptr, null_ptr, out_ptr,
        rows_per_branch, samples, negative_per_query,
        stride_q_row, stride_q_token, stride_cond_row, stride_cond_token, stride_neg_row, stride_neg_token,
        stride_out_row, stride_out_token,
        scale,
        TEXT_LENGTH: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr,
    ):
        # keys: the null key, the text (the row's own or the negative one, by branch) CHUNK tokens at a time, then
        # the image and mask tokens; an online softmax per query token folds them in.
        row = tl.program_id(0)
        head = tl.program_id(1)
        branch = row // rows_per_branch
        context_row = (row % rows_per_branch) // samples
        dims = tl.arange(0, HEAD_DIM)
        key_offsets = head * HEAD_DIM + dims[None, :]
        value_offsets = HEADS * HEAD_DIM + key_offsets
        cond_base = cond_ptr + context_row * stride_cond_row
        if branch == 0:
            text_base = cond_base
            text_stride = stride_cond_token
        else:
            text_base = neg_ptr + context_row * negative_per_query * stride_neg_row
            text_stride = stride_neg_token
        q_base = q_ptr + row * stride_q_row + head * HEAD_DIM + dims
        q0 = tl.load(q_base).to(tl.float32) * scale
        q1 = tl.load(q_base + stride_q_token).to(tl.float32) * scale
        null_key = tl.load(null_ptr + dims).to(tl.float32)
        null_value = tl.load(null_ptr + HEAD_DIM + dims).to(tl.float32)
        top0 = tl.sum(q0 * null_key, axis=0)
        top1 = tl.sum(q1 * null_key, axis=0)
        total0 = top0 * 0.0 + 1.0
        total1 = total0
        acc0 = null_value
        acc1 = null_value
        for start in tl.static_range(0, TEXT_LENGTH, CHUNK):
            tokens = start + tl.arange(0, CHUNK)
            inside = tokens < TEXT_LENGTH
            rows = text_base + tokens[:, None] * text_stride
            key = tl.load(rows + key_offsets, mask=inside[:, None], other=0.0).to(tl.float32)
            value = tl.load(rows + value_offsets, mask=inside[:, None], other=0.0).to(tl.float32)
            scores = tl.where(inside, tl.sum(key * q0[None, :], axis=1), float("-inf"))
            top0, total0, acc0 = _online_softmax_update(scores, value, top0, total0, acc0)
            scores = tl.where(inside, tl.sum(key * q1[None, :], axis=1), float("-inf"))
            top1, total1, acc1 = _online_softmax_update(scores, value, top1, total1, acc1)
        # image and mask tokens, always the row's own; the unconditional branch's image is the zero embedding,
        # whose key and value are zero (score 0)
        tail = tl.arange(0, 2)
        present = ((tail == 1) | (branch != 2))[:, None]
        rows = cond_base + (TEXT_LENGTH + tail)[:, None] * stride_cond_token
        key = tl.load(rows + key_offsets, mask=present, other=0.0).to(tl.float32)
        value = tl.load(rows + value_offsets, mask=present, other=0.0).to(tl.float32)
        top0, total0, acc0 = _online_softmax_update(tl.sum(key * q0[None, :], axis=1), value, top0, total0, acc0)
        top1, total1, acc1 = _online_softmax_update(tl.sum(key * q1[None, :], axis=1), value, top1, total1, acc1)
        out_base = out_ptr + row * stride_out_row + head * HEAD_DIM + dims
        tl.store(out_base, (acc0 / total0).to(out_ptr.dtype.element_ty))
        tl.store(out_base + stride_out_token, (acc1 / total1).to(out_ptr.dtype.element_ty))


if triton is not None:

    @triton.jit
    def _shared_negative_cross_attention_kernel(
        q_ptr, cond_ptr, neg_ptr, null_ptr, out_ptr,
        rows_per_branch, samples, negative_rows,
        stride_q_row, stride_q_token, stride_cond_row, stride_cond_token, stride_neg_token,
        stride_out_row, stride_out_token,
        scale,
        TEXT_LENGTH: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr,
        GROUP: tl.constexpr, IEEE: tl.constexpr,
    ):
        # GROUP query vectors (GROUP/2 rows of the negative and unconditional branches, 2 tokens each) against the
        # one negative text they share: its keys/values are read once per program and met with matrix products;
        # the null key and each row's own image and mask tokens are folded in per query vector.
        block = tl.program_id(0)
        head = tl.program_id(1)
        vectors = tl.arange(0, GROUP)
        local = block * (GROUP // 2) + vectors // 2  # index among the 2R negative-branch rows
        token = vectors % 2
        valid = local < negative_rows
        row = rows_per_branch + local
        unconditional = local >= rows_per_branch
        context_row = (local % rows_per_branch) // samples
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + row[:, None] * stride_q_row + token[:, None] * stride_q_token + head * HEAD_DIM + dims[None, :],
                    mask=valid[:, None], other=0.0)
        q_float = q.to(tl.float32)
        null_key = tl.load(null_ptr + dims).to(tl.float32)
        null_value = tl.load(null_ptr + HEAD_DIM + dims).to(tl.float32)
        top = tl.sum(q_float * null_key[None, :], axis=1) * scale
        total = top * 0.0 + 1.0
        acc = tl.zeros([GROUP, HEAD_DIM], tl.float32) + null_value[None, :]
        for start in tl.static_range(0, TEXT_LENGTH, CHUNK):
            tokens = start + tl.arange(0, CHUNK)
            inside = tokens < TEXT_LENGTH
            rows = neg_ptr + tokens[:, None] * stride_neg_token + head * HEAD_DIM + dims[None, :]
            key = tl.load(rows, mask=inside[:, None], other=0.0)
            value = tl.load(rows + HEADS * HEAD_DIM, mask=inside[:, None], other=0.0)
            if IEEE:
                scores = tl.dot(q, tl.trans(key), input_precision="ieee") * scale
            else:
                scores = tl.dot(q, tl.trans(key)) * scale
            scores = tl.where(inside[None, :], scores, float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, axis=1))
            rescale = tl.exp(top - new_top)
            weights = tl.exp(scores - new_top[:, None])
            total = total * rescale + tl.sum(weights, axis=1)
            if IEEE:
                acc = acc * rescale[:, None] + tl.dot(weights, value.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * rescale[:, None] + tl.dot(weights.to(value.dtype), value)
            top = new_top
        for tail in tl.static_range(2):  # the row's image token (zero for the unconditional branch), its mask token
            if tail == 0:
                present = valid & (unconditional == 0)
            else:
                present = valid
            rows = cond_ptr + context_row[:, None] * stride_cond_row + (TEXT_LENGTH + tail) * stride_cond_token
            rows += head * HEAD_DIM + dims[None, :]
            key = tl.load(rows, mask=present[:, None], other=0.0).to(tl.float32)
            value = tl.load(rows + HEADS * HEAD_DIM, mask=present[:, None], other=0.0).to(tl.float32)
            scores = tl.sum(q_float * key, axis=1) * scale
            new_top = tl.maximum(top, scores)
            rescale = tl.exp(top - new_top)
            weights = tl.exp(scores - new_top)
            total = total * rescale + weights
            acc = acc * rescale[:, None] + weights[:, None] * value
            top = new_top
        out = acc / total[:, None]
        tl.store(out_ptr + row[:, None] * stride_out_row + token[:, None] * stride_out_token + head * HEAD_DIM + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=valid[:, None])


# launch settings of the cross-attention kernel (benchmarks/tune_fused_kernels.py measures the alternatives)
CROSS_ATTENTION_LAUNCH = {"chunk": 16, "num_warps": 1, "shared_group": 64, "shared_chunk": 32, "shared_warps": 4}


def guidance_cross_attention(query, conditional_kv, negative_kv, null_kv, heads: int, samples: int = 1):
    """Cross-attention of the three guidance branches against their (factored) contexts.

    Args:
        query: `[3 * rows, tokens, heads * head_dim]` query projections, branches stacked `[conditional, negative,
            unconditional]`, `rows = context rows * samples`.
        conditional_kv: `[context rows, text_length + 2, 2 * heads * head_dim]` `to_kv` of the conditional context
            `[text, image, mask]`.
        negative_kv: `[1 or context rows, text_length, 2 * heads * head_dim]` `to_kv` of the projected negative text.
        null_kv: `[2, head_dim]` learned null key and value (shared by the heads).
        heads: number of cross-attention heads.
        samples: rows per context row (consecutive rows share a context).

    Returns:
        `[3 * rows, tokens, heads * head_dim]` in `query`'s dtype.
    """
    rows3, tokens, width = query.shape
    head_dim = width // heads
    text_length = negative_kv.shape[1]
    if tokens != 2:
        raise ValueError(f"`query` must hold 2 tokens per row (the noisy embedding and the time token), got {tokens}.")
    if conditional_kv.shape[1] != text_length + 2:
        raise ValueError(
            f"`conditional_kv` must hold the negative text's {text_length} tokens plus image and mask, "
            f"got {conditional_kv.shape[1]} tokens."
        )
    if rows3 % 3 or rows3 // 3 != conditional_kv.shape[0] * samples:
        raise ValueError(
            f"`query` must have 3 x {conditional_kv.shape[0]} x {samples} rows, got {rows3}."
        )
    if query.stride(-1) != 1 or conditional_kv.stride(-1) != 1 or negative_kv.stride(-1) != 1:
        raise ValueError("`query`, `conditional_kv` and `negative_kv` must be contiguous in their last dimension.")
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    launch = CROSS_ATTENTION_LAUNCH
    rows = rows3 // 3
    # One negative text for the batch: its rows meet the shared keys with matrix products (tl.dot needs 16 wide).
    shared = negative_kv.shape[0] == 1 and head_dim >= 16 and launch["shared_group"] > 0
    own_rows = rows if shared else rows3
    if own_rows:
        _guidance_cross_attention_kernel[(own_rows, heads)](
            query, conditional_kv, negative_kv, null_kv.contiguous(), out,
            rows, samples, int(negative_kv.shape[0] != 1),
            query.stride(0), query.stride(1), conditional_kv.stride(0), conditional_kv.stride(1),
            negative_kv.stride(0), negative_kv.stride(1), out.stride(0), out.stride(1),
            head_dim**-0.5,
            TEXT_LENGTH=text_length, HEADS=heads, HEAD_DIM=head_dim, CHUNK=launch["chunk"],
            num_warps=launch["num_warps"],
        )
    if shared and rows:
        group = launch["shared_group"]
        _shared_negative_cross_attention_kernel[(triton.cdiv(2 * rows, group // 2), heads)](
            query, conditional_kv, negative_kv, null_kv.contiguous(), out,
            rows, samples, 2 * rows,
            query.stride(0), query.stride(1), conditional_kv.stride(0), conditional_kv.stride(1), negative_kv.stride(1),
            out.stride(0), out.stride(1),
            head_dim**-0.5,
            TEXT_LENGTH=text_length, HEADS=heads, HEAD_DIM=head_dim, CHUNK=launch["shared_chunk"], GROUP=group,
            IEEE=query.dtype == torch.float32, num_warps=launch["shared_warps"],
        )
    return out



# --------------------------------------------------------------------------------------------- element-wise

def residual_norm_reference(update, residual, out_gain, next_gain, out_eps, next_eps):
    """PyTorch version of :func:`residual_norm`: ``h = residual + LN(update) * out_gain`` (or ``residual + update``
    without `out_gain`), returns ``(h, LN(h) * next_gain)``, rounding where the unfused modules round."""
    width = update.shape[-1]
    if out_gain is not None:
        update = F.layer_norm(update, (width,), out_gain.to(update.dtype), None, out_eps)
    hidden = update + residual
    return hidden, F.layer_norm(hidden, (width,), next_gain.to(hidden.dtype), None, next_eps)


def swiglu_reference(hidden):
    """PyTorch version of :func:`swiglu`: first half times SiLU of the second half of the last dimension."""
    value, gate = hidden.chunk(2, dim=-1)
    return value * F.silu(gate)


if triton is not None:

    @triton.jit
    def _residual_norm_kernel(
        update_ptr, residual_ptr, out_gain_ptr, next_gain_ptr, hidden_ptr, normed_ptr,
        width, out_eps, next_eps,
        HAS_OUT_NORM: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        columns = tl.arange(0, BLOCK)
        inside = columns < width
        dtype = hidden_ptr.dtype.element_ty
        update = tl.load(update_ptr + row * width + columns, mask=inside, other=0.0).to(tl.float32)
        if HAS_OUT_NORM:
            centred = tl.where(inside, update - tl.sum(update, axis=0) / width, 0.0)
            variance = tl.sum(centred * centred, axis=0) / width
            gain = tl.load(out_gain_ptr + columns, mask=inside, other=0.0).to(tl.float32)
            update = (centred * tl.rsqrt(variance + out_eps) * gain).to(dtype).to(tl.float32)
        hidden = (update + tl.load(residual_ptr + row * width + columns, mask=inside, other=0.0).to(tl.float32))
        hidden = hidden.to(dtype)
        tl.store(hidden_ptr + row * width + columns, hidden, mask=inside)
        hidden = hidden.to(tl.float32)
        centred = tl.where(inside, hidden - tl.sum(hidden, axis=0) / width, 0.0)
        variance = tl.sum(centred * centred, axis=0) / width
        gain = tl.load(next_gain_ptr + columns, mask=inside, other=0.0).to(tl.float32)
        tl.store(normed_ptr + row * width + columns, (centred * tl.rsqrt(variance + next_eps) * gain).to(dtype), mask=inside)

    @triton.jit
    def _swiglu_kernel(hidden_ptr, out_ptr, width, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = columns < width
        value = tl.load(hidden_ptr + row * 2 * width + columns, mask=inside, other=0.0).to(tl.float32)
        gate = tl.load(hidden_ptr + row * 2 * width + width + columns, mask=inside, other=0.0).to(tl.float32)
        out = value * gate * tl.sigmoid(gate)
        tl.store(out_ptr + row * width + columns, out.to(out_ptr.dtype.element_ty), mask=inside)


def residual_norm(update, residual, out_gain, next_gain, out_eps: float, next_eps: float):
    """``hidden = residual + LN(update) * out_gain`` (``residual + update`` when `out_gain` is None) and the next
    sub-layer's input ``LN(hidden) * next_gain``, in one pass. Tensors `[..., width]`, contiguous; returns
    `(hidden, normed)`."""
    if update.shape != residual.shape:
        raise ValueError(f"`update` {tuple(update.shape)} and `residual` {tuple(residual.shape)} must have one shape.")
    update, residual = update.contiguous(), residual.contiguous()
    width = update.shape[-1]
    rows = update.numel() // max(width, 1)
    hidden, normed = torch.empty_like(residual), torch.empty_like(residual)
    if rows:
        _residual_norm_kernel[(rows,)](
            update, residual, out_gain if out_gain is not None else next_gain, next_gain, hidden, normed,
            width, float(out_eps), float(next_eps),
            HAS_OUT_NORM=out_gain is not None, BLOCK=triton.next_power_of_2(width), num_warps=4,
        )
    return hidden, normed


def swiglu(hidden):
    """`hidden[..., :F] * silu(hidden[..., F:])` for `hidden` `[..., 2F]` (contiguous), in one pass."""
    hidden = hidden.contiguous()
    width = hidden.shape[-1] // 2
    rows = hidden.numel() // max(2 * width, 1)
    out = torch.empty(*hidden.shape[:-1], width, dtype=hidden.dtype, device=hidden.device)
    if rows:
        block = min(1024, triton.next_power_of_2(width))
        _swiglu_kernel[(rows, triton.cdiv(width, block))](hidden, out, width, BLOCK=block, num_warps=4)
    return out

__all__ = [
    "fused_attention_available",
    "fused_attention_supports",
    "guidance_cross_attention",
    "guidance_cross_attention_reference",
    "multi_query_self_attention",
    "multi_query_self_attention_reference",
    "residual_norm",
    "residual_norm_reference",
    "self_attention_tables",
    "swiglu",
    "swiglu_reference",
]
