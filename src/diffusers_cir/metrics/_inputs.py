"""Shared argument handling of the benchmark metrics: a score matrix + gallery ids, or ranked id lists."""

from __future__ import annotations

from typing import Any

import numpy as np

from .ids import as_id_rows, as_id_vector, index_of_ids, unify_id_dtypes
from .ranking import PositiveRanks, as_score_array, ranks_from_ranked_lists, ranks_from_scores


def check_one_source(scores: Any, gallery_ids: Any, ranked_ids: Any, metric: str) -> str:
    """Which input form was given: ``"scores"`` (with ``gallery_ids``) or ``"ranked"``; a clear error otherwise."""
    if scores is not None and ranked_ids is not None:
        raise ValueError(f"{metric}: pass either `scores` (+ `gallery_ids`) or `ranked_ids`, not both.")
    if scores is not None:
        if gallery_ids is None:
            raise ValueError(f"{metric}: `scores` needs `gallery_ids` (the id of each score column).")
        return "scores"
    if ranked_ids is not None:
        return "ranked"
    raise ValueError(f"{metric}: pass `scores` ([num_queries, num_gallery] with `gallery_ids`) or `ranked_ids`.")


def gallery_id_array(gallery_ids: Any, num_columns: int) -> np.ndarray:
    values, mask = as_id_vector(gallery_ids, "gallery_ids")
    if not mask.all():
        raise ValueError("`gallery_ids` contains None; every score column needs an image id.")
    if values.shape[0] != num_columns:
        raise ValueError(f"`gallery_ids` has {values.shape[0]} ids but `scores` has {num_columns} columns.")
    unique, counts = np.unique(values, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"`gallery_ids` must be unique; {unique[counts > 1][:5].tolist()} appear more than once.")
    return values


def positions_in_gallery(gallery: np.ndarray, ids: np.ndarray, mask: np.ndarray, what: str) -> np.ndarray:
    """Gallery positions of ``ids`` (``-1`` where masked); raise, naming the first query, when one is absent."""
    positions = index_of_ids(gallery, ids)
    missing = (positions < 0) & mask
    if missing.any():
        row = int(np.flatnonzero(missing.reshape(missing.shape[0], -1).any(axis=1))[0])
        value = ids[row] if ids.ndim == 1 else ids[row][missing[row]][0]
        raise ValueError(f"{what} {value.item()!r} of query {row} is not in `gallery_ids`.")
    return np.where(mask, positions, -1)


def ranks_of_single_positive(
    *,
    positive_ids: Any,
    exclude_ids: Any | None,
    scores: Any,
    gallery_ids: Any,
    ranked_ids: Any,
    metric: str,
    positive_name: str,
    exclude_name: str = "reference id",
) -> PositiveRanks:
    """Ranks of one positive per query (the target) from either input form, with optional deletion.

    Every query needs its positive: a ``None`` one is refused rather than scored as a miss (which would lower
    the mean without saying so).
    """
    source = check_one_source(scores, gallery_ids, ranked_ids, metric)
    _, positive_mask = as_id_vector(positive_ids, "target_ids")
    if not positive_mask.all():
        missing = np.flatnonzero(~positive_mask)
        raise ValueError(
            f"{metric}: `target_ids` is None for {missing.size} queries (first: query {int(missing[0])}); every "
            "query needs a target id. Drop the queries without one."
        )
    if source == "ranked":
        ranked_ids = as_id_rows(ranked_ids, "ranked_ids")
        for ids, name in ((positive_ids, positive_name), (exclude_ids, exclude_name)):
            count = None if ids is None else as_id_vector(ids, name)[0].shape[0]
            if count is not None and count != len(ranked_ids):
                raise ValueError(f"{metric}: `ranked_ids` has {len(ranked_ids)} lists but {count} {name}s were given.")
        return ranks_from_ranked_lists(ranked_ids, positive_ids, exclude_ids, positives_per_query=False)
    scores = as_score_array(scores)
    num_queries, num_columns = scores.shape
    gallery = gallery_id_array(gallery_ids, num_columns)

    def one_position_per_query(ids: Any, name: str) -> np.ndarray:
        values, mask = as_id_vector(ids, name)
        if values.shape[0] != num_queries:
            raise ValueError(f"{metric}: `scores` has {num_queries} rows but {values.shape[0]} {name}s were given.")
        return positions_in_gallery(gallery, values, mask, name)

    positive_index = one_position_per_query(positive_ids, positive_name)
    exclude_index = None if exclude_ids is None else one_position_per_query(exclude_ids, exclude_name)
    return ranks_from_scores(scores, positive_index, exclude_index)


def same_ids(first: Any, second: Any) -> np.ndarray:
    """Element-wise id equality of two ``[Q]`` id vectors (int/str mixes handled); masked entries never equal."""
    a, a_mask = as_id_vector(first, "ids")
    b, b_mask = as_id_vector(second, "ids")
    a, b = unify_id_dtypes([a, b], [a_mask, b_mask])
    return (a == b) & a_mask & b_mask
