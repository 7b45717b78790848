# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""The composition-network objectives: in-batch contrastive losses and MTST's prototype alignment.

* CLIP4Cir: ``cross_entropy(logit_scale * normalize(query) @ normalize(target_image).T)`` with the batch's other targets
  as negatives (logit scale 100, i.e. temperature 0.01).
* SCOT: the same with the modified captions' text features as the targets, and each query's original caption as
  one more negative (the query must move away from what the reference already is).
* MTST: the image contrastive loss with label smoothing 0.1, plus the mean squared error between the first-hop
  prototype of (reference, text) and of (target, reverse text), the reverse branch detached (weight 0.4).

A target that occurs several times in one batch (the same image or the same caption) is the positive of each of its
rows and is not counted as a negative of any of them; with distinct targets this is the plain loss of the papers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["contrastive_loss", "duplicate_mask", "prototype_alignment_loss"]


def duplicate_mask(keys: list) -> torch.Tensor:
    """``[B, B]`` bool: ``True`` where row ``j``'s target equals row ``i``'s and ``j != i``."""
    ids = {}
    codes = torch.tensor([ids.setdefault(key, len(ids)) for key in keys])
    same = codes[:, None] == codes[None, :]
    return same & ~torch.eye(len(keys), dtype=torch.bool)


def contrastive_loss(
    queries: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    label_smoothing: float = 0.0,
    extra_negatives: torch.Tensor | None = None,
    duplicates: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of each query against the batch's targets (row ``i``'s target is its positive).

    Args:
        queries: ``[B, D]`` composed queries (L2-normalised by the head).
        targets: ``[B, D]`` target features (normalised here).
        temperature: logits are cosine similarities divided by it.
        label_smoothing: as ``torch.nn.functional.cross_entropy``'s, spread over the classes each row keeps.
        extra_negatives: ``[B, D]``: one more negative per row (SCOT's original caption), normalised here.
        duplicates: ``[B, B]`` bool (:func:`duplicate_mask`): targets left out of each row's negatives.
    """
    queries = queries.float()
    logits = queries @ F.normalize(targets.float(), dim=-1).T / temperature
    keep = torch.ones_like(logits, dtype=torch.bool)
    if duplicates is not None:
        keep = ~duplicates.to(logits.device)
    if extra_negatives is not None:
        extra = (queries * F.normalize(extra_negatives.float(), dim=-1)).sum(dim=-1, keepdim=True) / temperature
        logits = torch.cat([logits, extra], dim=1)
        keep = torch.cat([keep, torch.ones_like(extra, dtype=torch.bool)], dim=1)
    log_probs = torch.log_softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)
    rows = torch.arange(queries.shape[0], device=logits.device)
    nll = -log_probs[rows, rows]
    if not label_smoothing:
        return nll.mean()
    smooth = -(log_probs.masked_fill(~keep, 0.0).sum(dim=-1) / keep.sum(dim=-1))
    return ((1 - label_smoothing) * nll + label_smoothing * smooth).mean()


def prototype_alignment_loss(prototype: torch.Tensor, reverse_prototype: torch.Tensor) -> torch.Tensor:
    """MTST's cycle: mean squared error between the two prototypes, no gradient through the reverse one."""
    return F.mse_loss(prototype.float(), reverse_prototype.detach().float())
