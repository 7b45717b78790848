# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Prompt-to-Prompt attention control (Hertz et al., 2022) as diffusers attention processors.

A caption pair is drawn as one batch, reference and target next to each other and from the same initial noise. In
the first steps of the denoising, the target's attention maps are replaced by the reference's, so the target keeps
the reference's layout and only what the captions change is drawn anew; the two images come out similar, not
identical. Two maps are shared, each for its own share of the steps:

* cross-attention (image queries -> caption tokens), for ``cross_replace`` of the steps. The target's tokens are
  aligned to the reference's (``difflib`` over token ids): a token both captions share, or a swapped word of the same
  token length, takes the reference's map for that token; a token only the target has keeps its own (P2P's "replace"
  and "refine" edits in one rule);
* self-attention, for ``self_replace`` of the steps, and only in layers with at most ``max_self_tokens`` queries
  (P2P shares it at 16x16 and below for 512-pixel images).

As in P2P, only the text-conditioned half of a classifier-free-guidance batch is edited. Layers and steps where
nothing is edited run ``torch.nn.functional.scaled_dot_product_attention``; attention probabilities are only
materialised where they are edited (P2P's local blending is not implemented).

Example:
    >>> from diffusers_cir.generation.prompt_to_prompt import token_alignment
    >>> token_alignment([0, 5, 6, 1], [0, 5, 7, 1])  # a swapped token keeps the reference's map
    [0, 1, 2, 3]
    >>> token_alignment([0, 5, 1], [0, 5, 8, 9, 1])  # inserted tokens keep their own (-1)
    [0, 1, -1, -1, 2]
"""

from __future__ import annotations

import contextlib
import difflib
from typing import Sequence

import torch
import torch.nn.functional as F


def token_alignment(source_ids: Sequence[int], target_ids: Sequence[int]) -> list[int]:
    """For each target token, the index of the reference token whose attention map it takes, or -1 (its own)."""
    mapping = [-1] * len(target_ids)
    matcher = difflib.SequenceMatcher(a=list(source_ids), b=list(target_ids), autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal" or (tag == "replace" and i2 - i1 == j2 - j1):
            for offset in range(j2 - j1):
                mapping[j1 + offset] = i1 + offset
    return mapping


class PromptToPromptController:
    """The state the processors share: pairs in the batch, token maps, per-pair step counts and the current step.

    The batch the UNet sees is ``[source_0, target_0, source_1, target_1, ...]`` (with classifier-free guidance, the
    unconditional copy of it first). Pass :meth:`step_callback` as the pipeline's ``callback_on_step_end``.

    Args:
        token_maps: ``[num_pairs, text_length]`` reference token index per target token (-1: own map).
        cross_steps, self_steps: per pair, how many of the first denoising steps share cross / self attention.
        max_self_tokens: self-attention is shared only in layers with at most this many queries.
    """

    def __init__(self, token_maps: torch.Tensor, cross_steps: Sequence[int], self_steps: Sequence[int],
                 max_self_tokens: int = 256):
        assert token_maps.ndim == 2 and len(cross_steps) == len(self_steps) == token_maps.shape[0]
        self.num_pairs = token_maps.shape[0]
        self.token_maps = token_maps.long()
        self.cross_steps = torch.as_tensor(list(cross_steps))
        self.self_steps = torch.as_tensor(list(self_steps))
        self.max_self_tokens = max_self_tokens
        self.step = 0

    def step_callback(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        self.step = step + 1
        return {}

    def active_pairs(self, is_cross: bool, num_queries: int) -> torch.Tensor | None:
        """Bool ``[num_pairs]`` of the pairs edited in this layer now, or None when none is."""
        if not is_cross and num_queries > self.max_self_tokens:
            return None
        active = self.step < (self.cross_steps if is_cross else self.self_steps)
        return active if bool(active.any()) else None

    def edit(self, probs: torch.Tensor, heads: int, is_cross: bool, active: torch.Tensor) -> torch.Tensor:
        """``probs`` ``[batch * heads, queries, keys]`` with the active targets' maps replaced."""
        batch = probs.shape[0] // heads
        offset = batch - 2 * self.num_pairs  # the conditional half comes last
        assert offset in (0, 2 * self.num_pairs), (batch, self.num_pairs)
        probs = probs.view(batch, heads, *probs.shape[1:]).clone()
        pairs = probs[offset:].view(self.num_pairs, 2, heads, *probs.shape[2:])
        source, target = pairs[:, 0], pairs[:, 1]
        active = active.to(probs.device)[:, None, None, None]
        if is_cross:
            maps = self.token_maps.to(probs.device)
            assert maps.shape[1] == probs.shape[-1], (maps.shape, probs.shape)
            index = maps.clamp(min=0)[:, None, None, :].expand_as(source)
            mapped = torch.gather(source, -1, index)
            use = active & (maps >= 0)[:, None, None, :]
            edited = torch.where(use, mapped, target)
        else:
            edited = torch.where(active, source, target)
        probs[offset:].view(self.num_pairs, 2, heads, *probs.shape[2:])[:, 1] = edited
        return probs.view(batch * heads, *probs.shape[2:])


class PromptToPromptAttnProcessor:
    """A diffusers attention processor that hands its maps to a :class:`PromptToPromptController`.

    It computes what diffusers' ``AttnProcessor`` computes (same pre- and post-processing of the hidden states), with
    explicit attention probabilities where the controller edits them and ``scaled_dot_product_attention`` elsewhere.
    """

    def __init__(self, controller: PromptToPromptController):
        self.controller = controller

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))

        active = self.controller.active_pairs(is_cross, query.shape[1])
        if active is None:
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           scale=attn.scale)
        else:
            probs = attn.get_attention_scores(query, key, attention_mask)
            probs = self.controller.edit(probs, attn.heads, is_cross, active)
            hidden_states = torch.bmm(probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextlib.contextmanager
def apply_prompt_to_prompt(unet, controller: PromptToPromptController):
    """Run ``unet`` with Prompt-to-Prompt processors in every attention layer; the original ones come back after."""
    original = unet.attn_processors
    unet.set_attn_processor(PromptToPromptAttnProcessor(controller))
    try:
        yield controller
    finally:
        unet.set_attn_processor(original)
