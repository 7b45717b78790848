"""FashionIQ: Recall@10 and Recall@50 per category (dress, shirt, toptee), and their unweighted averages.

Definitions (``DEFINITIONS.md`` §2, CLIP4Cir ``src/validate.py`` 21-57 = SEARLE 74-108 = LinCIR 75-109):

* Each category is evaluated on its own gallery: all ids of ``split.<category>.val.json``.
* The reference ("candidate") is **not** removed, although it is in the gallery.
* ``R@K(category) = mean_q 1[rank(target) <= K]``; the averages are unweighted means over the three
  categories, and ``average_recall = (average R@10 + average R@50) / 2`` (CLIP4Cir ``clip_fine_tune.py`` 205-209).

How the two captions of a triplet are joined into a query changes the query, not the metric; it lives with
the loader: :func:`diffusers_cir.data.benchmarks.join_fashioniq_captions`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ..utils.benchmark_names import FASHIONIQ_CATEGORIES
from .ranking import check_ks, check_scale
from .recall import recall_at_k, recall_per_query

__all__ = [
    "FASHIONIQ_CATEGORIES",
    "FASHIONIQ_RECALL_KS",
    "fashioniq_per_query",
    "fashioniq_recall_at_k",
    "fashioniq_average_recall",
    "compute_fashioniq_metrics",
]

FASHIONIQ_RECALL_KS = (10, 50)


def fashioniq_per_query(
    *,
    target_ids: Any,
    scores: Any | None = None,
    gallery_ids: Any | None = None,
    ranked_ids: Any | None = None,
    ks: Sequence[int] = FASHIONIQ_RECALL_KS,
) -> dict[str, np.ndarray]:
    """Per-query 0/1 ``recall_at{K}`` for one category; the reference stays in the ranking.

    Example:

    ```py
    >>> fashioniq_per_query(target_ids=["b"], ranked_ids=[["a", "b"]], ks=(1, 2))["recall_at2"].tolist()
    [True]

    ```
    """
    return recall_per_query(target_ids=target_ids, ks=ks, scores=scores, gallery_ids=gallery_ids, ranked_ids=ranked_ids)


def fashioniq_recall_at_k(
    *,
    target_ids: Any,
    scores: Any | None = None,
    gallery_ids: Any | None = None,
    ranked_ids: Any | None = None,
    ks: Sequence[int] = FASHIONIQ_RECALL_KS,
    scale: str = "percent",
) -> dict[str, float]:
    """``recall_at{K}`` of one FashionIQ category, from ``scores`` + ``gallery_ids`` or ``ranked_ids``.

    Example:

    ```py
    >>> fashioniq_recall_at_k(target_ids=["b", "c"], scores=[[0.9, 0.8, 0.1], [0.9, 0.8, 0.1]],
    ...                       gallery_ids=["a", "b", "c"], ks=(2,))
    {'recall_at2': 50.0}

    ```
    """
    return recall_at_k(
        target_ids=target_ids, ks=ks, scores=scores, gallery_ids=gallery_ids, ranked_ids=ranked_ids, scale=scale
    )


def fashioniq_average_recall(per_category: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Flatten per-category results and add the unweighted averages over categories.

    Returns ``{category}_recall_at{K}`` for each category, ``average_recall_at{K}`` (mean over categories)
    and ``average_recall`` (mean of the ``average_recall_at{K}``; (R@10 + R@50)/2 for the standard Ks).

    Example:

    ```py
    >>> fashioniq_average_recall({"dress": {"recall_at10": 30.0, "recall_at50": 50.0},
    ...                           "shirt": {"recall_at10": 20.0, "recall_at50": 40.0}})["average_recall"]
    35.0

    ```
    """
    if not per_category:
        raise ValueError("`per_category` is empty; pass at least one category's results.")
    names = [set(result) for result in per_category.values()]
    if any(name_set != names[0] for name_set in names):
        raise ValueError(f"Every category must report the same metrics, got {[sorted(n) for n in names]}.")
    metrics: dict[str, float] = {}
    for category, result in per_category.items():
        for name, value in result.items():
            metrics[f"{category}_{name}"] = float(value)
    averages = {f"average_{name}": float(np.mean([result[name] for result in per_category.values()])) for name in sorted(
        names[0], key=lambda name: int(name.rsplit("at", 1)[-1]) if name.rsplit("at", 1)[-1].isdigit() else 0)}
    metrics.update(averages)
    metrics["average_recall"] = float(np.mean(list(averages.values())))
    return metrics


def compute_fashioniq_metrics(
    categories: Mapping[str, Mapping[str, Any]],
    *,
    ks: Sequence[int] = FASHIONIQ_RECALL_KS,
    scale: str = "percent",
) -> dict[str, float]:
    """Per-category recall and averages; ``categories`` maps a category to :func:`fashioniq_recall_at_k` inputs.

    The official categories are :data:`FASHIONIQ_CATEGORIES`; any other name is scored the same way (a custom
    split), and the averages are over the categories given. An error in one category's inputs names it.

    Example:

    ```py
    >>> compute_fashioniq_metrics({
    ...     "dress": {"target_ids": ["b"], "ranked_ids": [["a", "b"]]},
    ...     "shirt": {"target_ids": ["c"], "ranked_ids": [["c", "d"]]}}, ks=(1, 2))
    {'dress_recall_at1': 0.0, 'dress_recall_at2': 100.0, 'shirt_recall_at1': 100.0, 'shirt_recall_at2': 100.0, 'average_recall_at1': 50.0, 'average_recall_at2': 100.0, 'average_recall': 75.0}

    ```
    """
    if not isinstance(categories, Mapping):
        raise TypeError(f"`categories` must map each category name to its inputs, got {type(categories).__name__}.")
    if not categories:
        raise ValueError("`categories` is empty; pass at least one category's inputs.")
    # Checked once here, so that a bad cutoff or scale is not reported as a problem of the first category.
    ks = check_ks(ks, "ks")
    check_scale(scale)
    per_category = {}
    for category, inputs in categories.items():
        if not isinstance(inputs, Mapping):
            raise TypeError(
                f"The inputs of category {category!r} must be a dict (`target_ids` and `ranked_ids`, or `scores` + "
                f"`gallery_ids`), got {type(inputs).__name__}."
            )
        unknown = set(inputs) - {"target_ids", "scores", "gallery_ids", "ranked_ids"}
        if unknown:
            raise ValueError(f"Unexpected inputs for category {category!r}: {sorted(unknown)}.")
        if "target_ids" not in inputs:
            raise ValueError(f"FashionIQ category {category!r} has no `target_ids`; every category needs its queries' targets.")
        try:
            per_category[category] = fashioniq_recall_at_k(**inputs, ks=ks, scale=scale)
        except (ValueError, TypeError) as error:
            # Same exception (class, traceback), its message prefixed with the category it is about.
            if error.args and isinstance(error.args[0], str):
                error.args = (f"FashionIQ category {category!r}: {error.args[0]}",) + error.args[1:]
            raise
    return fashioniq_average_recall(per_category)
