"""LDRE's adaptive ensemble of rewritten captions (its CIRCO path): one weight per caption slot, learnt from the whole
query set against the gallery.

LDRE (Yang et al., SIGIR 2024; github.com/yzy-bupt/LDRE ``src/divergent_caption_ensemble.py`` and ``src/args.py``,
read for this module) writes S rewrites of each query's reference (one per sampled caption). On CIRR it averages
their CLIP text features. On CIRCO it weights each slot ``i`` (the i-th rewrite of every query) by how much the
rewrites in that slot push the gallery away from what the captions alone retrieve:

* ``after = normalize(rewrite_i) @ gallery.T`` and ``before = normalize(caption_i) @ gallery.T`` (normalised gallery);
* the drops ``max(before - after, 0)``, their ``top_k`` largest per query, summed over every query: ``s_i``;
* ``weights = softmax(s / max(s) / temperature)`` over the slots (defaults: ``top_k=5``, ``temperature=0.04``);
* each query is ``sum_i weights_i * normalize(rewrite_i)``.

The weights depend on every query and on the gallery, so this runs after all queries are composed
(``CaptionRewritePipeline(..., output_caption_embeds=True)`` gives both inputs), not inside the pipeline. Where no
rewrite lowers any score (every ``s_i`` is 0) the slots are weighted equally (the authors' code divides by zero).

Example:
    >>> import torch
    >>> rewrites, captions, gallery = torch.randn(3, 4, 8), torch.randn(3, 4, 8), torch.randn(20, 8)
    >>> queries, weights = ldre_ensemble(rewrites, captions, gallery)
    >>> tuple(queries.shape), tuple(weights.shape), round(weights.sum().item(), 4)
    ((3, 8), (4,), 1.0)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_finite_tensors, check_float, check_positive_int

__all__ = ["ldre_ensemble"]


def _check_embeds(value, name: str, ndim: int) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if tensor.ndim != ndim or 0 in tensor.shape or not tensor.is_floating_point():
        layout = "(queries, slots, dim)" if ndim == 3 else "(gallery size, dim)"
        raise ValueError(f"`{name}` must be a non-empty float array of shape {layout}, got {tuple(tensor.shape)} "
                         f"of {tensor.dtype}.")
    check_finite_tensors({name: tensor})
    return tensor.float()


def ldre_ensemble(rewrite_embeds, caption_embeds, gallery_embeds, top_k: int = 5, temperature: float = 0.04):
    """Queries ``(Q, D)`` and slot weights ``(S,)`` of LDRE's adaptive ensemble (see the module docstring).

    Args:
        rewrite_embeds: CLIP text embeddings of the rewrites, ``(Q, S, D)`` (raw or normalised).
        caption_embeds: CLIP text embeddings of the reference captions, ``(Q, C, D)`` with ``S`` a multiple of ``C``
            (caption ``j`` stands for rewrites ``j * S / C`` to ``(j + 1) * S / C - 1``).
        gallery_embeds: CLIP image embeddings of the gallery, ``(N, D)``.
        top_k (`int`, defaults to 5): drops counted per query (at most ``N``).
        temperature (`float`, defaults to 0.04): softmax temperature over the slots.
    """
    rewrites = _check_embeds(rewrite_embeds, "rewrite_embeds", 3)
    captions = _check_embeds(caption_embeds, "caption_embeds", 3)
    gallery = _check_embeds(gallery_embeds, "gallery_embeds", 2)
    queries, slots, dim = rewrites.shape
    if captions.shape[0] != queries or captions.shape[2] != dim or slots % captions.shape[1]:
        raise ValueError(
            f"`caption_embeds` {tuple(captions.shape)} must hold the {queries} queries of `rewrite_embeds` "
            f"{tuple(rewrites.shape)}, a number of captions that divides its {slots} slots, and width {dim}."
        )
    if gallery.shape[1] != dim:
        raise ValueError(f"`gallery_embeds` has width {gallery.shape[1]} but the text embeddings {dim}.")
    top_k = min(check_positive_int(top_k, "top_k"), gallery.shape[0])
    temperature = check_float(temperature, "temperature", 0.0, exclusive_minimum=True)

    rewrites = F.normalize(rewrites, dim=-1)
    captions = F.normalize(captions, dim=-1).repeat_interleave(slots // captions.shape[1], dim=1)
    gallery = F.normalize(gallery, dim=-1)
    drops = (captions @ gallery.T - rewrites @ gallery.T).clamp(min=0)  # (Q, S, N)
    scores = drops.topk(top_k, dim=-1).values.sum(dim=(0, 2))  # (S,)
    largest = scores.max()
    weights = torch.softmax((scores / largest if largest > 0 else scores) / temperature, dim=0)
    return (weights[None, :, None] * rewrites).sum(dim=1), weights
