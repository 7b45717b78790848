"""CIRCO: mAP@K with several ground truths per query, Recall@K of the target, semantic mAP@10.

Definitions (``DEFINITIONS.md`` §3; the evaluation-server code, miccunifi/CIRCO ``src/evaluation.py`` 14-82):

* ``AP@K_q = (sum_{i <= min(K, |P_q|)} rel_i * precision@i) / min(|G_q|, K)``: normalised by
  ``min(|G_q|, K)``, so a perfect ranking scores 1 even with more ground truths than K.
* A submission shorter than K is not padded; a duplicate id in a submission is rejected (``ValueError``).
* The reference is **not** removed (it is never a ground truth, so a retrieved reference costs a slot).
* ``Recall@K`` only counts ``target_img_id`` (= ``gt_img_ids[0]``).
* Semantic mAP@10: mean AP@10 over the queries annotated with each aspect (NaN for an aspect with none).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ._inputs import check_one_source, gallery_id_array
from .ids import IdRows, as_id_rows, as_id_vector, index_of_ids
from .ranking import (
    NOT_RETRIEVED,
    DuplicateIdError,
    PositiveRanks,
    as_score_array,
    average_precision_at_k,
    check_ks,
    check_scale,
    mean_over_queries,
    ranks_from_ranked_lists,
    ranks_from_scores,
)

__all__ = [
    "CIRCO_MAP_KS",
    "CIRCO_SEMANTIC_ASPECTS",
    "circo_per_query",
    "compute_circo_metrics",
    "circo_semantic_map",
]

CIRCO_MAP_KS = (5, 10, 25, 50)
# The nine aspects of the CIRCO annotations (server code, src/evaluation.py 30-32).
CIRCO_SEMANTIC_ASPECTS = (
    "cardinality",
    "addition",
    "negation",
    "direct_addressing",
    "compare_change",
    "comparative_statement",
    "statement_with_conjunction",
    "spatial_relations_background",
    "viewpoint",
)


def check_on_empty_ground_truth(on_empty_ground_truth: str) -> None:
    """``on_empty_ground_truth`` is ``"raise"`` or ``"nan"``; anything else is refused by name."""
    if on_empty_ground_truth not in ("raise", "nan"):
        raise ValueError(f'`on_empty_ground_truth` must be "raise" or "nan", got {on_empty_ground_truth!r}.')


def _ground_truth_rows(rows: IdRows, on_empty_ground_truth: str, query_ids: Sequence[Any]) -> IdRows:
    lengths = rows.lengths
    empty = lengths == 0
    if empty.any() and on_empty_ground_truth == "raise":
        row = int(np.flatnonzero(empty)[0])
        raise ValueError(
            f"Query {query_ids[row]!r} has no ground truth; its AP would be 0/0 = NaN and poison the mean. "
            'Drop it, or pass on_empty_ground_truth="nan" to reproduce the official NaN.'
        )
    # A ground truth listed twice would be counted twice by the official code (AP > 1): reject it.
    order = np.lexsort((~rows.mask, rows.values), axis=-1)
    sorted_values = np.take_along_axis(rows.values, order, axis=1)
    sorted_mask = np.take_along_axis(rows.mask, order, axis=1)
    repeated = (sorted_values[:, 1:] == sorted_values[:, :-1]) & sorted_mask[:, 1:] & sorted_mask[:, :-1]
    if repeated.any():
        row = int(np.flatnonzero(repeated.any(axis=1))[0])
        raise ValueError(f"Query {query_ids[row]!r} lists a ground-truth id more than once: {rows.values[row][rows.mask[row]].tolist()}.")
    return rows


def circo_per_query(
    *,
    ground_truth_ids: Any,
    scores: Any | None = None,
    gallery_ids: Any | None = None,
    ranked_ids: Any | None = None,
    target_ids: Any | None = None,
    ks: Sequence[int] = CIRCO_MAP_KS,
    query_ids: Sequence[Any] | None = None,
    on_empty_ground_truth: str = "raise",
) -> dict[str, np.ndarray]:
    """Per-query ``ap_at{K}`` (float) and ``recall_at{K}`` (0/1, target only), as fractions.

    Args:
        ground_truth_ids: ``[Q][|G_q|]`` ``gt_img_ids`` (1-14 per CIRCO query).
        scores, gallery_ids: ``[Q, G]`` similarities over the gallery (the reference is not removed), or
        ranked_ids: the submission, ``[Q][L]`` ids best first (usually the top-50; shorter lists are scored
            as they are, not padded).
        target_ids: ``[Q]`` ids counted by Recall@K, one per query; default ``gt_img_ids[0]`` (= ``target_img_id``).

    Ids may be ints (COCO ids) or any strings (``"img_12"``), in every argument. A digit string matches the
    int it spells (``"101"`` is ``101``, as the server's int cast) when the other ids are ints; otherwise ids
    compare as strings.
        query_ids: ids used in error messages (default: row numbers).
        on_empty_ground_truth: ``"raise"`` (default) or ``"nan"`` (AP = NaN, as the official code).

    Example:

    ```py
    >>> per_query = circo_per_query(ground_truth_ids=[[101, 102, 103]],
    ...                             ranked_ids=[[101, 5000, 102, 5001, 5002, 103]], ks=(5, 10))
    >>> [round(float(per_query[f"ap_at{k}"][0]), 4) for k in (5, 10)]  # (1 + 2/3)/3, (1 + 2/3 + 3/6)/3
    [0.5556, 0.7222]

    ```
    """
    ks = check_ks(ks, "ks")
    check_on_empty_ground_truth(on_empty_ground_truth)
    source = check_one_source(scores, gallery_ids, ranked_ids, "CIRCO mAP")
    gt_rows = as_id_rows(ground_truth_ids, "ground_truth_ids")
    num_queries = len(gt_rows)
    query_ids = list(range(num_queries)) if query_ids is None else list(query_ids)
    if len(query_ids) != num_queries:
        raise ValueError(f"`query_ids` has {len(query_ids)} entries but there are {num_queries} queries.")
    gt_rows = _ground_truth_rows(gt_rows, on_empty_ground_truth, query_ids)
    num_positives = gt_rows.lengths
    if target_ids is not None:
        target, target_mask = as_id_vector(target_ids, "target_ids")
        if target.shape[0] != num_queries:
            raise ValueError(f"`target_ids` has {target.shape[0]} ids but `ground_truth_ids` has {num_queries} queries.")
        # Scored as a miss, a missing target would lower Recall@K without saying so. A query without ground
        # truths (kept only with on_empty_ground_truth="nan") has no target either: the server counts a miss.
        missing = np.flatnonzero(~target_mask & (num_positives > 0))
        if missing.size:
            raise ValueError(
                f"`target_ids` is None for {missing.size} queries with ground truths (first: query "
                f"{query_ids[int(missing[0])]!r}); pass every query's target, or leave `target_ids` unset to count "
                "gt_img_ids[0]."
            )

    if source == "scores":
        scores = as_score_array(scores)
        if scores.shape[0] != num_queries:
            raise ValueError(f"`scores` has {scores.shape[0]} rows but there are {num_queries} queries.")
        gallery = gallery_id_array(gallery_ids, scores.shape[1])
        # A ground truth outside the gallery can never be retrieved; it still counts in min(|G|, K).
        gt_index = np.where(gt_rows.mask, index_of_ids(gallery, gt_rows.values), -1)
        gt_ranks = ranks_from_scores(scores, gt_index)
        if target_ids is not None:
            target_ranks = ranks_from_scores(scores, np.where(target_mask, index_of_ids(gallery, target), -1))
    else:
        rows = as_id_rows(ranked_ids, "ranked_ids")
        if len(rows) != num_queries:
            raise ValueError(f"`ranked_ids` has {len(rows)} lists but `ground_truth_ids` has {num_queries}; one per query.")
        try:
            gt_ranks = ranks_from_ranked_lists(rows, gt_rows, positives_per_query=True)
        except DuplicateIdError as error:
            raise ValueError(
                f"Query {query_ids[error.row]!r} has duplicate predictions ({error.image_id!r} appears more than "
                "once); each id may appear once in a submission (the CIRCO server rejects duplicates since 2024-05)."
            ) from None
        if target_ids is not None:
            target_ranks = ranks_from_ranked_lists(rows, target_ids, positives_per_query=False, check_duplicates=False)
    if target_ids is None:
        # The target is gt_img_ids[0] (CIRCO README): its rank is the first ground truth's.
        first = gt_ranks.ranks[:, 0] if gt_ranks.ranks.shape[1] else np.full(num_queries, NOT_RETRIEVED)
        target_ranks = PositiveRanks(np.where(num_positives > 0, first, NOT_RETRIEVED), gt_ranks.depths, gt_ranks.exhaustive)

    results: dict[str, np.ndarray] = {}
    for k in ks:
        results[f"ap_at{k}"] = average_precision_at_k(gt_ranks, num_positives, k, truncated="miss")
    for k in ks:
        results[f"recall_at{k}"] = target_ranks.ranks < k
    return results


def circo_semantic_map(
    average_precision: np.ndarray,
    semantic_aspects: Sequence[Sequence[str]],
    aspects: Sequence[str] = CIRCO_SEMANTIC_ASPECTS,
) -> dict[str, float]:
    """Mean AP per semantic aspect (a query counts for each of its aspects); NaN for an aspect with no query.

    Example:

    ```py
    >>> circo_semantic_map(np.array([1.0, 0.5]), [["addition"], ["addition", "negation"]], aspects=("addition", "negation"))
    {'addition': 0.75, 'negation': 0.5}

    ```
    """
    average_precision = np.asarray(average_precision, dtype=np.float64)
    if isinstance(semantic_aspects, (str, bytes)):
        raise TypeError(f"`semantic_aspects` must hold one list of aspect names per query, got the string {semantic_aspects!r}.")
    if len(semantic_aspects) != average_precision.shape[0]:
        raise ValueError(f"`semantic_aspects` has {len(semantic_aspects)} entries but there are {average_precision.shape[0]} queries.")
    known = set(aspects)
    for row, query_aspects in enumerate(semantic_aspects):
        if isinstance(query_aspects, str):
            raise TypeError(f"`semantic_aspects[{row}]` must be a list of aspect names, got the string {query_aspects!r}.")
        unknown = set(query_aspects) - known
        if unknown:
            raise ValueError(f"`semantic_aspects[{row}]` has unknown aspects {sorted(unknown)}; known: {list(aspects)}.")
    result = {}
    for aspect in aspects:
        members = [row for row, query_aspects in enumerate(semantic_aspects) if aspect in query_aspects]
        result[aspect] = float(np.mean(average_precision[members])) if members else float("nan")
    return result


def compute_circo_metrics(
    *,
    ground_truth_ids: Any,
    scores: Any | None = None,
    gallery_ids: Any | None = None,
    ranked_ids: Any | None = None,
    target_ids: Any | None = None,
    semantic_aspects: Sequence[Sequence[str]] | None = None,
    ks: Sequence[int] = CIRCO_MAP_KS,
    query_ids: Sequence[Any] | None = None,
    on_empty_ground_truth: str = "raise",
    scale: str = "percent",
) -> dict[str, float]:
    """CIRCO ``map_at{K}``, ``recall_at{K}`` and, with ``semantic_aspects``, ``semantic_map_at10_{aspect}``.

    Arguments as :func:`circo_per_query`. The server reports fractions; papers (and SEARLE/LinCIR) percent.

    Example:

    ```py
    >>> compute_circo_metrics(ground_truth_ids=[[101, 102]], ranked_ids=[[5000, 101, 5001]], ks=(5,), scale="fraction")
    {'map_at5': 0.25, 'recall_at5': 1.0}

    ```
    """
    factor = check_scale(scale)
    ks = check_ks(ks, "ks")
    needed = ks if (semantic_aspects is None or 10 in ks) else ks + (10,)
    per_query = circo_per_query(
        ground_truth_ids=ground_truth_ids,
        scores=scores,
        gallery_ids=gallery_ids,
        ranked_ids=ranked_ids,
        target_ids=target_ids,
        ks=needed,
        query_ids=query_ids,
        on_empty_ground_truth=on_empty_ground_truth,
    )
    selected = {f"map_at{k}": per_query[f"ap_at{k}"] for k in ks}
    selected.update({f"recall_at{k}": per_query[f"recall_at{k}"] for k in ks})
    metrics = mean_over_queries(selected, factor)
    if semantic_aspects is not None:
        for aspect, value in circo_semantic_map(per_query["ap_at10"], semantic_aspects).items():
            metrics[f"semantic_map_at10_{aspect}"] = factor * value
    return metrics
