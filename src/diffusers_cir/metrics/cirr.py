"""CIRR: Recall@K with the reference deleted, Recall_subset@K over the 5 other group members, and both "Avg"s.

Definitions (``DEFINITIONS.md`` §1, from CLIP4Cir ``src/validate.py`` 135-188, identical in SEARLE and LinCIR):

* Gallery = every image of the split. The query's reference image is **deleted** from its ranking.
* ``R@K = mean_q 1[rank(target_hard) <= K]`` over all queries (duplicated references are not merged).
* ``R_subset@K``: the ranking restricted to ``img_set.members`` (6 images, reference included) minus the
  reference, i.e. 5 candidates in global order.
* Two published "Avg" columns, both reported (:data:`CIRR_AVG_DEFINITIONS` labels each with its source):
  ``avg = (R@5 + R_subset@1) / 2``, CLIP4Cir's (``clip_fine_tune.py`` line 387), which the CIRR literature after it
  reports; and ``avg_r1_rs1 = (R@1 + R_subset@1) / 2``, the "Avg(R@1, Rs@1)" column of the CompoDiff paper's CIRR
  table (its 18.24 and 27.51 give 22.88). Compare a number only with numbers of the same definition.

:func:`cirplant_soft_recall` is the CIRR authors' variant (CIRPLANT) with ``target_soft`` credit.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ._inputs import (
    check_one_source,
    gallery_id_array,
    positions_in_gallery,
    ranks_of_single_positive,
    same_ids,
)
from .ids import IdRows, as_id_rows, as_id_vector, index_of_ids, unify_id_dtypes
from .ranking import (
    NOT_RETRIEVED,
    PositiveRanks,
    as_score_array,
    check_ks,
    check_scale,
    hits_at_k,
    mean_over_queries,
    ranks_from_ranked_lists,
    ranks_from_scores,
)

__all__ = [
    "CIRR_RECALL_KS",
    "CIRR_SUBSET_KS",
    "CIRPLANT_RECALL_KS",
    "cirr_per_query",
    "compute_cirr_metrics",
    "CIRR_AVG_DEFINITIONS",
    "cirr_avg",
    "cirr_avg_r1_rs1",
    "cirplant_soft_recall",
]

CIRR_RECALL_KS = (1, 5, 10, 50)
CIRR_SUBSET_KS = (1, 2, 3)
CIRPLANT_RECALL_KS = (1, 2, 5, 10, 50, 100)

# Every "Avg" key of compute_cirr_metrics, with its formula and where it comes from (reports print these labels).
CIRR_AVG_DEFINITIONS = {
    "avg": "(R@5 + R_subset@1) / 2, CLIP4Cir's Avg (Baldrati et al., clip_fine_tune.py), the one CIRR papers since "
    "report",
    "avg_r1_rs1": "(R@1 + R_subset@1) / 2, the Avg(R@1, Rs@1) of the CompoDiff paper's CIRR table (Gu et al.)",
}


def cirr_avg(recall_at5: float, recall_subset_at1: float) -> float:
    """CIRR's "Avg" column: ``(R@5 + R_subset@1) / 2``.

    Example:

    ```py
    >>> cirr_avg(40.0, 33.5)
    36.75

    ```
    """
    return (recall_at5 + recall_subset_at1) / 2


def cirr_avg_r1_rs1(recall_at1: float, recall_subset_at1: float) -> float:
    """The CompoDiff paper's CIRR "Avg(R@1, Rs@1)": ``(R@1 + R_subset@1) / 2`` (not CLIP4Cir's :func:`cirr_avg`).

    Example (the paper's zero-shot CompoDiff row):

    ```py
    >>> round(cirr_avg_r1_rs1(18.24, 27.51), 3)
    22.875

    ```
    """
    return (recall_at1 + recall_subset_at1) / 2


def _subset_candidates(values: np.ndarray, mask: np.ndarray, reference: np.ndarray):
    """Which group members are Recall_subset candidates (listed, not the reference, not a repeat), and which
    are repeats of an earlier member: a member listed twice is one candidate (the official filter is a
    set-membership test)."""
    equal = values[:, :, None] == values[:, None, :]
    earlier = np.tril(np.ones(equal.shape[1:], dtype=bool), k=-1)
    duplicate = (equal & earlier & mask[:, None, :]).any(axis=2)
    return mask & ~duplicate & (values != reference[:, None]), duplicate


def _member_arrays(group_members: Any, target_ids: Any, reference_ids: Any, num_queries: int):
    """Members (as :class:`IdRows`, one id dtype with targets and references), which members are subset
    candidates (not the reference, not a repeat) and which member is the target."""
    members = as_id_rows(group_members, "group_members")
    if len(members) != num_queries:
        raise ValueError(f"`group_members` has {len(members)} rows but there are {num_queries} queries.")
    target, target_mask = as_id_vector(target_ids, "target_ids")
    reference, reference_mask = as_id_vector(reference_ids, "reference_ids")
    values, target, reference = unify_id_dtypes(
        [members.values, target, reference], [members.mask, target_mask, reference_mask]
    )
    mask = members.mask
    candidate, duplicate = _subset_candidates(values, mask, reference)
    is_target = (values == target[:, None]) & mask
    missing_target = ~is_target.any(axis=1)
    if missing_target.any():
        row = int(np.flatnonzero(missing_target)[0])
        raise ValueError(
            f"The target {target[row].item()!r} of query {row} is not among its `group_members` "
            f"({values[row][mask[row]].tolist()}); CIRR's img_set.members always contains the target."
        )
    return IdRows(values, mask), candidate, is_target & ~duplicate


def _subset_ranks(target_ranks: PositiveRanks, member_ranks: np.ndarray, candidate: np.ndarray, is_target: np.ndarray):
    """Rank of the target among the subset candidates, from global ranks of target and members."""
    target_rank = target_ranks.ranks
    others = candidate & ~is_target
    known = member_ranks != NOT_RETRIEVED
    ahead = (others & known & (member_ranks < target_rank[:, None])).sum(axis=1)
    found = target_rank != NOT_RETRIEVED
    subset_rank = np.where(found, ahead, NOT_RETRIEVED)
    depths = (others & known).sum(axis=1) + found
    return PositiveRanks(subset_rank.astype(np.int64), depths.astype(np.int64), target_ranks.exhaustive)


def cirr_per_query(
    *,
    target_ids: Any,
    reference_ids: Any,
    scores: Any | None = None,
    gallery_ids: Any | None = None,
    ranked_ids: Any | None = None,
    group_members: Any | None = None,
    ranked_subset_ids: Any | None = None,
    recall_ks: Sequence[int] = CIRR_RECALL_KS,
    subset_ks: Sequence[int] = CIRR_SUBSET_KS,
) -> dict[str, np.ndarray]:
    """Per-query 0/1 CIRR hits: ``recall_at{K}`` and ``recall_subset_at{K}`` (boolean arrays of length Q).

    Args:
        target_ids: ``[Q]`` ``target_hard`` ids.
        reference_ids: ``[Q]`` reference image ids; each is deleted from its query's ranking.
        scores, gallery_ids: ``[Q, G]`` similarities and the ``G`` ids of the whole split (all of
            ``split.rc2.<split>.json``), or
        ranked_ids: ``[Q][L]`` gallery ids best first (e.g. top-51 of a retrieval index); the reference is
            deleted from them if present.
        group_members: ``[Q][6]`` ``img_set.members`` (reference and target included); the subset ranking
            is the ranking filtered to these minus the reference.
        ranked_subset_ids: alternatively, each query's subset ranking itself (the test server's top-3 form).
        recall_ks, subset_ks: cutoffs; pass ``subset_ks=()`` to skip the subset metric.

    Example:

    ```py
    >>> hits = cirr_per_query(
    ...     target_ids=["t"], reference_ids=["r"], scores=[[0.9, 0.5, 0.7, 0.1]], gallery_ids=["r", "t", "x", "y"],
    ...     group_members=[["r", "t", "y"]], recall_ks=(1, 2), subset_ks=(1,))
    >>> {name: value.tolist() for name, value in hits.items()}
    {'recall_at1': [False], 'recall_at2': [True], 'recall_subset_at1': [True]}

    ```
    """
    recall_ks = check_ks(recall_ks, "recall_ks")
    subset_ks = check_ks(subset_ks, "subset_ks")
    source = check_one_source(scores, gallery_ids, ranked_ids, "CIRR recall")
    if same_ids(target_ids, reference_ids).any():
        row = int(np.flatnonzero(same_ids(target_ids, reference_ids))[0])
        raise ValueError(
            f"Query {row} has its reference as target; CIRR deletes the reference from the ranking, so the "
            "target could never be retrieved (the official code asserts against this)."
        )
    if subset_ks and group_members is None and ranked_subset_ids is None:
        raise ValueError(
            "CIRR Recall_subset needs `group_members` (img_set.members) or `ranked_subset_ids`; "
            "pass `subset_ks=()` to compute Recall@K only."
        )

    results: dict[str, np.ndarray] = {}
    if source == "scores":
        scores = as_score_array(scores)
    else:
        ranked_ids = as_id_rows(ranked_ids, "ranked_ids")  # converted once, used for target and members
    target_ranks = ranks_of_single_positive(
        positive_ids=target_ids,
        exclude_ids=reference_ids,
        scores=scores,
        gallery_ids=gallery_ids,
        ranked_ids=ranked_ids,
        metric="CIRR recall",
        positive_name="target id",
    )
    for k in recall_ks:
        results[f"recall_at{k}"] = hits_at_k(target_ranks, k)
    if not subset_ks:
        return results

    if ranked_subset_ids is not None:
        subset_ranks = ranks_from_ranked_lists(
            ranked_subset_ids, target_ids, reference_ids, positives_per_query=False, name="ranked_subset_ids"
        )
    else:
        num_queries = target_ranks.ranks.shape[0]
        members, candidate, is_target = _member_arrays(group_members, target_ids, reference_ids, num_queries)
        if source == "scores":
            gallery = gallery_id_array(gallery_ids, scores.shape[1])
            member_index = positions_in_gallery(gallery, members.values, members.mask, "group member")
            reference, reference_mask = as_id_vector(reference_ids, "reference_ids")
            reference_index = np.where(reference_mask, index_of_ids(gallery, reference), -1)
            member_ranks = ranks_from_scores(scores, member_index, reference_index).ranks
        else:
            member_ranks = ranks_from_ranked_lists(
                ranked_ids, members, reference_ids, positives_per_query=True, check_duplicates=False
            ).ranks
        subset_ranks = _subset_ranks(target_ranks, member_ranks, candidate, is_target)
    for k in subset_ks:
        results[f"recall_subset_at{k}"] = hits_at_k(subset_ranks, k)
    return results


def compute_cirr_metrics(
    *,
    target_ids: Any,
    reference_ids: Any,
    scores: Any | None = None,
    gallery_ids: Any | None = None,
    ranked_ids: Any | None = None,
    group_members: Any | None = None,
    ranked_subset_ids: Any | None = None,
    recall_ks: Sequence[int] = CIRR_RECALL_KS,
    subset_ks: Sequence[int] = CIRR_SUBSET_KS,
    scale: str = "percent",
) -> dict[str, float]:
    """CIRR ``recall_at{K}``, ``recall_subset_at{K}``, ``avg`` (when K=5 and subset K=1 are present) and
    ``avg_r1_rs1`` (when K=1 and subset K=1 are): the two "Avg" definitions of :data:`CIRR_AVG_DEFINITIONS`.

    Arguments as :func:`cirr_per_query`; ``scale`` is ``"percent"`` (as published) or ``"fraction"``.

    Example:

    ```py
    >>> compute_cirr_metrics(
    ...     target_ids=["t"], reference_ids=["r"], ranked_ids=[["r", "x", "t", "y", "z", "w"]],
    ...     group_members=[["r", "t", "y"]], recall_ks=(1, 5), subset_ks=(1,))
    {'recall_at1': 0.0, 'recall_at5': 100.0, 'recall_subset_at1': 100.0, 'avg': 100.0, 'avg_r1_rs1': 50.0}

    ```
    """
    factor = check_scale(scale)
    hits = cirr_per_query(
        target_ids=target_ids,
        reference_ids=reference_ids,
        scores=scores,
        gallery_ids=gallery_ids,
        ranked_ids=ranked_ids,
        group_members=group_members,
        ranked_subset_ids=ranked_subset_ids,
        recall_ks=recall_ks,
        subset_ks=subset_ks,
    )
    metrics = mean_over_queries(hits, factor)
    if "recall_at5" in metrics and "recall_subset_at1" in metrics:
        metrics["avg"] = cirr_avg(metrics["recall_at5"], metrics["recall_subset_at1"])
    if "recall_at1" in metrics and "recall_subset_at1" in metrics:
        metrics["avg_r1_rs1"] = cirr_avg_r1_rs1(metrics["recall_at1"], metrics["recall_subset_at1"])
    return metrics


def _soft_arrays(target_soft: Sequence[Mapping[Any, float]], num_queries: int):
    if len(target_soft) != num_queries:
        raise ValueError(f"`target_soft` has {len(target_soft)} entries but there are {num_queries} queries.")
    ids, values = [], []
    for row, soft in enumerate(target_soft):
        if not isinstance(soft, Mapping):
            raise TypeError(f"`target_soft[{row}]` must be a dict {{image id: credit}}, got {type(soft).__name__}.")
        ids.append(list(soft.keys()))
        values.append([float(value) for value in soft.values()])
    rows = as_id_rows(ids, "target_soft")
    credit = np.zeros(rows.values.shape, dtype=np.float64)
    credit[rows.mask] = [value for row in values for value in row]
    return rows, credit


def _soft_credit(ranks: np.ndarray, credit: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    # max(0, max credit of soft targets in the top-k): negative credits never count.
    return np.where(mask & (ranks < k), credit, 0.0).max(axis=1, initial=0.0)


def cirplant_soft_recall(
    *,
    target_soft: Sequence[Mapping[Any, float]],
    reference_ids: Any,
    scores: Any,
    gallery_ids: Any,
    ks: Sequence[int] = CIRPLANT_RECALL_KS,
    group_members: Any | None = None,
    subset_ks: Sequence[int] = CIRR_SUBSET_KS,
    scale: str = "percent",
) -> dict[str, float]:
    """CIRPLANT's soft-target recall (CIRR authors' code, ``OSCAR_CIRPLANT.py`` 259-333); not the published metric.

    Per query and K: ``max(0, max{v : (x, v) in target_soft, x in top-K})``, averaged. The reference is
    demoted to the bottom of the ranking (identical to deletion for K < |G|). With ``group_members`` the same
    credit is computed within the 5 non-reference members (``soft_recall_subset_at{K}``). The official code
    returns fractions; pass ``scale="fraction"`` to compare with its logs.

    Example:

    ```py
    >>> cirplant_soft_recall(target_soft=[{"t": 1.0, "x": 0.5}], reference_ids=["r"], scores=[[0.9, 0.5, 0.7]],
    ...                      gallery_ids=["r", "t", "x"], ks=(1, 2), scale="fraction")
    {'soft_recall_at1': 0.5, 'soft_recall_at2': 1.0}

    ```
    """
    factor = check_scale(scale)
    ks = check_ks(ks, "ks")
    subset_ks = check_ks(subset_ks, "subset_ks") if group_members is not None else ()
    scores = as_score_array(scores)
    num_queries, num_gallery = scores.shape
    gallery = gallery_id_array(gallery_ids, num_gallery)
    reference, reference_mask = as_id_vector(reference_ids, "reference_ids")
    reference_index = positions_in_gallery(gallery, reference, reference_mask, "reference id")
    soft_rows, credit = _soft_arrays(target_soft, num_queries)
    # Soft targets outside the gallery can never be retrieved: they keep index -1 (rank NOT_RETRIEVED).
    soft_index = np.where(soft_rows.mask, index_of_ids(gallery, soft_rows.values), -1)
    ranks = ranks_from_scores(scores, soft_index, reference_index).ranks
    is_reference = (soft_index == reference_index[:, None]) & (soft_index >= 0)
    ranks = np.where(is_reference, num_gallery - 1, ranks)  # demoted to the last place
    valid = soft_rows.mask & (soft_index >= 0)

    metrics = {f"soft_recall_at{k}": factor * float(np.mean(_soft_credit(ranks, credit, valid, k))) for k in ks}
    if subset_ks:
        members = as_id_rows(group_members, "group_members")
        values, member_mask = members.values, members.mask
        values, soft_values, reference_values = unify_id_dtypes(
            [values, soft_rows.values, reference], [member_mask, soft_rows.mask, reference_mask]
        )
        member_index = positions_in_gallery(gallery, values, member_mask, "group member")
        member_ranks = ranks_from_scores(scores, member_index, reference_index).ranks
        candidate, _ = _subset_candidates(values, member_mask, reference_values)
        in_subset = ((soft_values[:, :, None] == values[:, None, :]) & candidate[:, None, :]).any(axis=2)
        # Subset rank of a soft target = subset candidates ranked above it globally.
        subset_ranks = (candidate[:, None, :] & (member_ranks[:, None, :] < ranks[:, :, None])).sum(axis=2)
        subset_valid = valid & in_subset
        for k in subset_ks:
            credit_k = _soft_credit(subset_ranks, credit, subset_valid, k)
            metrics[f"soft_recall_subset_at{k}"] = factor * float(np.mean(credit_k))
    return metrics
