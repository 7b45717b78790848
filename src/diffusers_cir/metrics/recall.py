"""Recall@K of one target per query, optionally deleting each query's reference from its ranking.

The benchmark modules specialise it: CIRR deletes the reference (:mod:`.cirr`), FashionIQ keeps it
(:mod:`.fashioniq`), CIRCO counts only the target in its Recall@K (:mod:`.circo`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ._inputs import ranks_of_single_positive
from .ranking import check_ks, check_scale, hits_at_k, mean_over_queries

__all__ = ["recall_per_query", "recall_at_k"]


def recall_per_query(
    *,
    target_ids: Any,
    ks: Sequence[int],
    scores: Any | None = None,
    gallery_ids: Any | None = None,
    ranked_ids: Any | None = None,
    exclude_ids: Any | None = None,
) -> dict[str, np.ndarray]:
    """Per-query 0/1 ``recall_at{K}``: is the target within the first K of the ranking?

    Args:
        target_ids: ``[Q]`` target ids.
        ks: cutoffs.
        scores, gallery_ids: ``[Q, G]`` similarities and the ``G`` gallery ids, or
        ranked_ids: ``[Q][L]`` gallery ids best first. A list too short to decide raises a ``ValueError``.
        exclude_ids: optional ``[Q]`` id deleted from each ranking first (the reference, for CIRR).

    Example:

    ```py
    >>> recall_per_query(target_ids=["t"], ks=(1,), ranked_ids=[["r", "t"]], exclude_ids=["r"])["recall_at1"].tolist()
    [True]

    ```
    """
    ks = check_ks(ks, "ks")
    ranks = ranks_of_single_positive(
        positive_ids=target_ids,
        exclude_ids=exclude_ids,
        scores=scores,
        gallery_ids=gallery_ids,
        ranked_ids=ranked_ids,
        metric="Recall@K",
        positive_name="target id",
        exclude_name="excluded id",
    )
    return {f"recall_at{k}": hits_at_k(ranks, k) for k in ks}


def recall_at_k(
    *,
    target_ids: Any,
    ks: Sequence[int],
    scores: Any | None = None,
    gallery_ids: Any | None = None,
    ranked_ids: Any | None = None,
    exclude_ids: Any | None = None,
    scale: str = "percent",
) -> dict[str, float]:
    """Mean of :func:`recall_per_query` over queries, in ``scale`` (``"percent"`` or ``"fraction"``).

    Example:

    ```py
    >>> recall_at_k(target_ids=[1, 2], ks=(1, 2), scores=[[0.9, 0.1, 0.5], [0.9, 0.1, 0.5]], gallery_ids=[0, 1, 2])
    {'recall_at1': 0.0, 'recall_at2': 50.0}

    ```
    """
    factor = check_scale(scale)
    hits = recall_per_query(
        target_ids=target_ids, ks=ks, scores=scores, gallery_ids=gallery_ids, ranked_ids=ranked_ids, exclude_ids=exclude_ids
    )
    return mean_over_queries(hits, factor)
