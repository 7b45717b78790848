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
(``CaptionRewritePipeline(..., output_caption_embeds=True)`` gives both inputs), not inside the pipeline:
:func:`compose_ldre_queries` composes a query set through the one compose path and ensembles it (what
``diffusers-cir evaluate`` ranks an LDRE pipeline on CIRCO with). Where no
rewrite lowers any score (every ``s_i`` is 0) the slots are weighted equally (the authors' code divides by zero).

Example:
    >>> import torch
    >>> rewrites, captions, gallery = torch.randn(3, 4, 8), torch.randn(3, 4, 8), torch.randn(20, 8)
    >>> queries, weights = ldre_ensemble(rewrites, captions, gallery)
    >>> tuple(queries.shape), tuple(weights.shape), round(weights.sum().item(), 4)
    ((3, 8), (4,), 1.0)
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..checks import check_finite_tensors, check_float, check_positive_int
from .compose import composed_batches
from .index import normalize_embeddings

__all__ = ["compose_ldre_queries", "ldre_ensemble"]

_BLOCK_ELEMENTS = 1 << 24  # scores held at once while the slot weights are computed (64 MiB of float32)


def _check_embeds(value, name: str, ndim: int) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if tensor.ndim != ndim or 0 in tensor.shape or not tensor.is_floating_point():
        layout = "(queries, slots, dim)" if ndim == 3 else "(gallery size, dim)"
        raise ValueError(f"`{name}` must be a non-empty float array of shape {layout}, got {tuple(tensor.shape)} "
                         f"of {tensor.dtype}.")
    check_finite_tensors({name: tensor})
    return tensor.float()


def ldre_ensemble(
    rewrite_embeds, caption_embeds, gallery_embeds, top_k: int = 5, temperature: float = 0.04, show_progress: bool = False
):
    """Queries ``(Q, D)`` and slot weights ``(S,)`` of LDRE's adaptive ensemble (see the module docstring).

    Args:
        rewrite_embeds: CLIP text embeddings of the rewrites, ``(Q, S, D)`` (raw or normalised).
        caption_embeds: CLIP text embeddings of the reference captions, ``(Q, C, D)`` with ``S`` a multiple of ``C``
            (caption ``j`` stands for rewrites ``j * S / C`` to ``(j + 1) * S / C - 1``).
        gallery_embeds: CLIP image embeddings of the gallery, ``(N, D)``.
        top_k (`int`, defaults to 5): drops counted per query (at most ``N``).
        temperature (`float`, defaults to 0.04): softmax temperature over the slots.
        show_progress (`bool`, defaults to `False`): a progress bar over the blocks of queries (the score matrices of
            a CIRCO-sized run take minutes on a CPU).

    The computation runs where `rewrite_embeds` is (on a GPU for CUDA tensors); the weights come back on the CPU.
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
    captions = F.normalize(captions.to(rewrites.device), dim=-1)
    gallery = F.normalize(gallery.to(rewrites.device), dim=-1)
    scores = torch.zeros(slots)
    # The (queries, slots, gallery) drops a block of queries at a time: CIRCO's 800 test queries x 15 slots x 123k
    # gallery images would be 6 GB of float32 at once, and each query's top-k is its own.
    block = max(1, _BLOCK_ELEMENTS // (slots * gallery.shape[0]))
    for start in tqdm(range(0, queries, block), desc="LDRE slot weights", unit="block", disable=not show_progress):
        before = (captions[start : start + block] @ gallery.T).repeat_interleave(slots // captions.shape[1], dim=1)
        drops = (before - rewrites[start : start + block] @ gallery.T).clamp(min=0)
        scores += drops.topk(top_k, dim=-1).values.sum(dim=(0, 2)).cpu()
    largest = scores.max()
    weights = torch.softmax((scores / largest if largest > 0 else scores) / temperature, dim=0)
    return (weights.to(rewrites.device)[None, :, None] * rewrites).sum(dim=1), weights


def compose_ldre_queries(
    pipeline,
    prompts: Sequence[str],
    gallery_embeds: torch.Tensor,
    *,
    reference_images: Sequence,
    top_k: int = 5,
    temperature: float = 0.04,
    batch_size: int = 32,
    show_progress: bool = False,
    **call_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LDRE's CIRCO queries: a CaptionRewritePipeline's rewrites and captions of every query, composed through the
    one compose path (:func:`~diffusers_cir.retrieval.compose.composed_batches`), then :func:`ldre_ensemble` against
    ``gallery_embeds``. Returns the L2-normalised queries ``(Q, D)`` (float32, CPU), which replace the mean of the
    rewrites, and the slot weights ``(S,)``.

    Args:
        pipeline: a CaptionRewritePipeline (anything whose call takes ``output_caption_embeds`` and returns
            ``rewrite_embeds`` and ``caption_embeds``).
        prompts: one modification text per query (the weights are learnt over all of them).
        gallery_embeds: ``(N, D)`` gallery embeddings (raw or normalised).
        reference_images: the ``Q`` reference images, indexed per batch.
        top_k, temperature: as in :func:`ldre_ensemble`.
        batch_size, show_progress, call_kwargs: as in :func:`~diffusers_cir.retrieval.compose_queries`.

    The ensemble's score matrices (queries x slots x gallery) are computed on the pipeline's device, as the authors
    compute them on their GPU: on a CPU, CIRCO's test set takes minutes.
    """
    several = [row for row, prompt in enumerate(prompts) if not isinstance(prompt, str)]
    if several:
        raise ValueError(
            f"LDRE's ensemble weighs the rewrites of one text per query, but query {several[0]} has several texts "
            "(a FashionIQ protocol joining the captions in both orders): use a protocol with one text per query."
        )
    rewrites, captions = [None] * len(prompts), [None] * len(prompts)
    batches = composed_batches(pipeline, prompts, reference_images=reference_images, batch_size=batch_size,
                               show_progress=show_progress, output_caption_embeds=True, **call_kwargs)
    for rows, output in batches:
        if getattr(output, "rewrite_embeds", None) is None or getattr(output, "caption_embeds", None) is None:
            raise ValueError(f"{type(pipeline).__name__} gives no `rewrite_embeds` and `caption_embeds`: LDRE's "
                             "ensemble needs a CaptionRewritePipeline.")
        for position, row in enumerate(rows):
            rewrites[row] = torch.as_tensor(output.rewrite_embeds[position]).float().cpu()
            captions[row] = torch.as_tensor(output.caption_embeds[position]).float().cpu()
    device = getattr(pipeline, "_execution_device", None) or torch.device("cpu")
    queries, weights = ldre_ensemble(torch.stack(rewrites).to(device), torch.stack(captions).to(device),
                                     torch.as_tensor(gallery_embeds).to(device), top_k, temperature, show_progress)
    return torch.from_numpy(normalize_embeddings(queries, "the LDRE ensemble queries")), weights
