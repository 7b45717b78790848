"""Where do the positives land? Ranks of chosen gallery items, from a score matrix or from ranked lists.

Every CIR metric is a function of the 0-based rank of one or more positives (the target, CIRCO's ground
truths, CIRR's subset members) in each query's ranking, after an optional deletion of one item (CIRR deletes
the reference image). Computing these ranks directly is cheaper than sorting the gallery (an ``O(G)`` count per
positive instead of an ``O(G log G)`` sort) and it works the same way for top-k lists returned by an index.

Ties: official code sorts with unstable sorts (``torch.argsort``/``topk``), so the order of equal scores is
implementation-defined there. Here a tie is broken by gallery position (lower index first), i.e. the order a
stable descending sort would give, so results are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .ids import IdRows, as_id_rows, as_id_vector, unify_id_dtypes

__all__ = [
    "NOT_RETRIEVED",
    "PositiveRanks",
    "ranks_from_scores",
    "ranks_from_ranked_lists",
    "hits_at_k",
    "average_precision_at_k",
    "check_scale",
    "mean_over_queries",
    "as_score_array",
    "DuplicateIdError",
]

# Rank given to an item that is absent from a ranking (deleted, padding, or beyond a truncated list).
NOT_RETRIEVED = np.iinfo(np.int64).max

# Elements per chunk of the [rows, positives, gallery] comparison; bounds peak memory to a few hundred MB.
_CHUNK_ELEMENTS = 1 << 25


class DuplicateIdError(ValueError):
    """A ranked list names the same id twice; ``row`` is the offending list, ``image_id`` the repeated id."""

    def __init__(self, message: str, row: int, image_id: Any):
        super().__init__(message)
        self.row = row
        self.image_id = image_id


@dataclass
class PositiveRanks:
    """0-based ranks of positives per query and how much of each ranking is known.

    Attributes:
        ranks: ``[Q]`` or ``[Q, P]`` int64; :data:`NOT_RETRIEVED` where the item is not in the known ranking.
        depths: ``[Q]`` number of ranked items known per query (after the deletion).
        exhaustive: ``True`` when the ranking covers the whole gallery (a score matrix), so an item that is
            not retrieved is definitely absent; ``False`` for truncated ranked lists.
    """

    ranks: np.ndarray
    depths: np.ndarray
    exhaustive: bool


def _is_whole_number(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    return isinstance(value, (float, np.floating)) and float(value).is_integer()


def check_ks(ks: Sequence[int], name: str) -> tuple[int, ...]:
    """Cutoffs as a tuple of ints; a single K is accepted. Strings, fractional and boolean cutoffs are refused
    (``int()`` would have turned ``"10"`` into ``(1, 0)`` and ``1.5`` into ``1``)."""
    if hasattr(ks, "tolist"):  # numpy arrays and scalars, torch tensors
        ks = ks.tolist()
    if _is_whole_number(ks):
        ks = (ks,)
    if isinstance(ks, (str, bytes)) or not hasattr(ks, "__iter__"):
        raise ValueError(f"`{name}` must be a positive integer K or a sequence of them, e.g. (1, 5, 10); got {ks!r}.")
    ks = tuple(ks)
    bad = [k for k in ks if not _is_whole_number(k)]
    if bad:
        raise ValueError(f"`{name}` must hold integer cutoffs K, e.g. (1, 5, 10); got {bad[0]!r} in {ks!r}.")
    ks = tuple(int(k) for k in ks)
    if any(k < 1 for k in ks):
        raise ValueError(f"`{name}` must hold positive cutoffs K, got {ks}.")
    return ks


def check_scale(scale: str) -> float:
    """Multiplier of a ``scale`` argument: ``"percent"`` (official CIRR/FashionIQ/paper tables) or ``"fraction"``."""
    if scale == "percent":
        return 100.0
    if scale == "fraction":
        return 1.0
    raise ValueError(f'`scale` must be "percent" or "fraction", got {scale!r}.')


def mean_over_queries(per_query: Mapping[str, np.ndarray], factor: float) -> dict[str, float]:
    """Each per-query array averaged over the queries, times ``factor`` (the :func:`check_scale` multiplier).

    A mean over no queries is refused: it is always an upstream mistake (an empty split or filter), and NaN
    would travel into reports and averages.
    """
    if any(len(values) == 0 for values in per_query.values()):
        raise ValueError(
            "There are no queries to average: the inputs hold 0 queries (scores with 0 rows, or empty id lists)."
        )
    return {name: factor * float(np.mean(values)) for name, values in per_query.items()}


def as_score_array(scores: Any, name: str = "scores") -> np.ndarray:
    """``scores`` (numpy, torch or nested lists) as a 2-D floating numpy array, checked; ``name`` is the
    argument named in error messages.

    The ranking math runs in numpy: on CPU its boolean reductions are several times faster than torch's.
    """
    if hasattr(scores, "detach") and hasattr(scores, "cpu"):  # a torch tensor, detected without importing torch
        scores = scores.detach().cpu()
        numpy_compatible = str(scores.dtype) in ("torch.float16", "torch.float32", "torch.float64")
        array = (scores if numpy_compatible else scores.float()).numpy()  # e.g. bfloat16 has no numpy dtype
    else:
        try:
            array = np.asarray(scores)
        except ValueError as error:  # ragged nested lists
            raise ValueError(f"`{name}` must be a rectangular [num_queries, num_gallery] matrix: {error}") from None
    if array.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D [num_queries, num_gallery] matrix, got shape {tuple(array.shape)}.")
    if array.dtype.kind not in "fiu":
        raise TypeError(f"`{name}` must hold numbers, got dtype {array.dtype}.")
    return array if array.dtype.kind == "f" else array.astype(np.float64)


def _as_index_array(indices: Any, name: str, num_rows: int, num_columns: int) -> np.ndarray:
    if hasattr(indices, "detach"):
        indices = indices.detach().cpu().numpy()
    array = np.asarray(indices)
    if array.dtype.kind not in "iu":
        raise TypeError(f"`{name}` must hold integer gallery positions, got dtype {array.dtype}.")
    if array.ndim not in (1, 2) or array.shape[0] != num_rows:
        raise ValueError(f"`{name}` must have shape [{num_rows}] or [{num_rows}, P], got {tuple(array.shape)}.")
    if array.size and (array.max() >= num_columns or array.min() < -1):
        raise ValueError(f"`{name}` must hold positions in [0, {num_columns}) (or -1 for none), got {array.min()}..{array.max()}.")
    return array.astype(np.int64, copy=False)


def ranks_from_scores(
    scores: Any,
    positive_indices: Any,
    exclude_indices: Any | None = None,
) -> PositiveRanks:
    """Rank of gallery positions ``positive_indices`` in each row of ``scores`` sorted by descending score.

    Args:
        scores: ``[Q, G]`` similarities (numpy, torch or nested lists); higher means more similar.
        positive_indices: ``[Q]`` or ``[Q, P]`` gallery positions; ``-1`` is padding (rank :data:`NOT_RETRIEVED`).
        exclude_indices: optional ``[Q]`` gallery position deleted from each ranking before ranking (CIRR's
            reference), ``-1`` for none. A positive equal to it is deleted too.

    Example:

    ```py
    >>> scores = np.array([[0.1, 0.9, 0.5]])
    >>> ranks_from_scores(scores, [0]).ranks.tolist(), ranks_from_scores(scores, [0], exclude_indices=[1]).ranks.tolist()
    ([2], [1])

    ```
    """
    score_array = as_score_array(scores)
    num_queries, num_gallery = score_array.shape
    positives = _as_index_array(positive_indices, "positive_indices", num_queries, num_gallery)
    squeeze = positives.ndim == 1
    positives = positives.reshape(num_queries, 1 if squeeze else positives.shape[1])  # -1 fails for 0 queries
    excludes = None
    if exclude_indices is not None:
        excludes = _as_index_array(exclude_indices, "exclude_indices", num_queries, num_gallery)
        if excludes.ndim != 1:
            raise ValueError(f"`exclude_indices` must have shape [{num_queries}], got {tuple(excludes.shape)}.")

    num_positives = positives.shape[1]
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, num_positives * num_gallery))
    ranks = np.empty((num_queries, num_positives), dtype=np.int64)
    for start in range(0, num_queries, rows_per_chunk):
        stop = min(start + rows_per_chunk, num_queries)
        chunk = score_array[start:stop]
        nan_rows = np.isnan(chunk).any(axis=1)
        if nan_rows.any():
            raise ValueError(f"`scores` row {start + int(np.flatnonzero(nan_rows)[0])} contains NaN; rankings need comparable scores.")
        positive = positives[start:stop]
        valid = positive >= 0
        positive = np.maximum(positive, 0)
        positive_score = np.take_along_axis(chunk, positive, axis=1)
        rank = (chunk[:, None, :] > positive_score[:, :, None]).sum(axis=-1)
        # Equal scores are ranked by gallery position (stable order). Ties are rare with real similarities,
        # so the position test only runs on the (row, positive) pairs that have one.
        tied = (chunk[:, None, :] == positive_score[:, :, None]).sum(axis=-1) > 1
        if tied.any():
            rows, columns = np.nonzero(tied)
            equal = chunk[rows] == positive_score[rows, columns][:, None]
            rank[rows, columns] += (equal & (np.arange(num_gallery) < positive[rows, columns][:, None])).sum(axis=1)
        if excludes is not None:
            exclude = excludes[start:stop, None]
            has_exclude = exclude >= 0
            exclude = np.maximum(exclude, 0)
            exclude_score = np.take_along_axis(chunk, exclude, axis=1)
            exclude_ahead = (exclude_score > positive_score) | ((exclude_score == positive_score) & (exclude < positive))
            rank -= has_exclude & exclude_ahead
            valid &= ~(has_exclude & (positive == exclude))
        ranks[start:stop] = np.where(valid, rank, NOT_RETRIEVED)

    depths = np.full(num_queries, num_gallery, dtype=np.int64)
    if excludes is not None:
        depths -= excludes >= 0
    return PositiveRanks(ranks[:, 0] if squeeze else ranks, depths, exhaustive=True)


def _first_duplicate_row(values: np.ndarray, mask: np.ndarray) -> tuple[int, Any] | None:
    if values.shape[1] < 2:
        return None
    # Sort each row by id, valid entries before padding among equal ids, then look at neighbours.
    order = np.lexsort((~mask, values), axis=-1)
    sorted_values = np.take_along_axis(values, order, axis=1)
    sorted_mask = np.take_along_axis(mask, order, axis=1)
    duplicate = (sorted_values[:, 1:] == sorted_values[:, :-1]) & sorted_mask[:, 1:] & sorted_mask[:, :-1]
    rows = np.flatnonzero(duplicate.any(axis=1))
    if rows.size == 0:
        return None
    row = int(rows[0])
    column = int(np.flatnonzero(duplicate[row])[0])
    return row, sorted_values[row, column].item()


def ranks_from_ranked_lists(
    ranked_ids: Any,
    positive_ids: Any,
    exclude_ids: Any | None = None,
    *,
    positives_per_query: bool | None = None,
    name: str = "ranked_ids",
    check_duplicates: bool = True,
) -> PositiveRanks:
    """Position of ``positive_ids`` in each query's ranked id list (best first), after deleting ``exclude_ids``.

    Args:
        ranked_ids: ``[Q, L]`` array/tensor or ragged lists of gallery ids, best first; ids must be unique per row.
        positive_ids: ``[Q]`` ids (one per query, ``None`` for none) or ragged ``[Q][P]`` id lists.
        exclude_ids: optional ``[Q]`` id removed from each list before ranking (``None`` for none).
        positives_per_query: force reading ``positive_ids`` as lists (``True``) or single ids (``False``);
            by default a list of lists/2-D array means lists.
        name: argument name used in error messages.
        check_duplicates: raise :class:`DuplicateIdError` when a list repeats an id (skip only for lists
            already checked).

    Returns: :class:`PositiveRanks` with ``depths`` = list length after the deletion and ``exhaustive=False``.

    Example:

    ```py
    >>> r = ranks_from_ranked_lists([["r", "a", "t"]], ["t"], exclude_ids=["r"])
    >>> r.ranks.tolist(), r.depths.tolist()
    ([1], [2])

    ```
    """
    rows = as_id_rows(ranked_ids, name)
    if positives_per_query is None:
        probe = positive_ids.detach().cpu().numpy() if hasattr(positive_ids, "detach") else positive_ids
        if isinstance(probe, IdRows):
            positives_per_query = True
        elif isinstance(probe, np.ndarray):
            positives_per_query = probe.ndim == 2
        else:
            positives_per_query = any(isinstance(value, (list, tuple, np.ndarray)) for value in probe)
    if positives_per_query:
        positive_rows = as_id_rows(positive_ids, "positive_ids")
        positive_values, positive_mask = positive_rows.values, positive_rows.mask
        squeeze = False
    else:
        positive_values, positive_mask = as_id_vector(positive_ids, "positive_ids")
        positive_values, positive_mask = positive_values[:, None], positive_mask[:, None]
        squeeze = True
    num_queries = len(rows)
    if positive_values.shape[0] != num_queries:
        raise ValueError(f"`{name}` has {num_queries} rows but the positives have {positive_values.shape[0]}; one per query.")
    arrays, masks = [rows.values, positive_values], [rows.mask, positive_mask]
    if exclude_ids is not None:
        exclude_values, exclude_mask = as_id_vector(exclude_ids, "exclude_ids")
        if exclude_values.shape[0] != num_queries:
            raise ValueError(f"`{name}` has {num_queries} rows but the excluded ids have {exclude_values.shape[0]}.")
        arrays.append(exclude_values)
        masks.append(exclude_mask)
    arrays = unify_id_dtypes(arrays, masks)
    values, positive_values = arrays[0], arrays[1]

    duplicate = _first_duplicate_row(values, rows.mask) if check_duplicates else None
    if duplicate is not None:
        raise DuplicateIdError(
            f"`{name}[{duplicate[0]}]` lists id {duplicate[1]!r} more than once; a ranking holds each id once.",
            row=duplicate[0],
            image_id=duplicate[1],
        )

    num_positives = positive_values.shape[1]
    width = values.shape[1]
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, num_positives * width))
    ranks = np.empty((num_queries, num_positives), dtype=np.int64)
    depths = rows.lengths.astype(np.int64)
    for start in range(0, num_queries, rows_per_chunk):
        stop = min(start + rows_per_chunk, num_queries)
        chunk, chunk_mask = values[start:stop], rows.mask[start:stop]
        positive, valid = positive_values[start:stop], positive_mask[start:stop]
        match = (chunk[:, :, None] == positive[:, None, :]) & chunk_mask[:, :, None]
        found = match.any(axis=1) & valid
        position = match.argmax(axis=1)
        if exclude_ids is not None:
            exclude, exclude_valid = arrays[2][start:stop], masks[2][start:stop]
            exclude_match = (chunk == exclude[:, None]) & chunk_mask & exclude_valid[:, None]
            exclude_found = exclude_match.any(axis=1)
            exclude_position = np.where(exclude_found, exclude_match.argmax(axis=1), width)
            position = position - (exclude_position[:, None] < position)
            found &= ~(exclude_valid[:, None] & (positive == exclude[:, None]))
            depths[start:stop] -= exclude_found
        ranks[start:stop] = np.where(found, position, NOT_RETRIEVED)
    return PositiveRanks(ranks[:, 0] if squeeze else ranks, depths, exhaustive=False)


def _undeterminable(ranks: PositiveRanks, k: int, missing: np.ndarray) -> np.ndarray:
    """Queries whose answer at cutoff ``k`` depends on items beyond a truncated list."""
    if ranks.exhaustive:
        return np.zeros(missing.shape[0], dtype=bool)
    return missing & (ranks.depths < k)


def hits_at_k(ranks: PositiveRanks, k: int, *, truncated: str = "raise") -> np.ndarray:
    """Per-query 1[rank < k] for one positive per query (``ranks.ranks`` of shape ``[Q]``).

    Args:
        truncated: what to do when a ranked list is shorter than ``k`` and lacks the positive, so the answer
            is unknown: ``"raise"`` (default) or ``"miss"`` (score the list as a submission: absent = missed).

    Example:

    ```py
    >>> hits_at_k(ranks_from_scores(np.array([[0.1, 0.9, 0.5]]), [2]), 1).tolist()
    [False]

    ```
    """
    if truncated not in ("raise", "miss"):
        raise ValueError(f'`truncated` must be "raise" or "miss", got {truncated!r}.')
    if ranks.ranks.ndim != 1:
        raise ValueError(f"hits_at_k needs one positive per query (ranks of shape [Q]), got {ranks.ranks.shape}.")
    if int(k) < 1:
        raise ValueError(f"The cutoff K must be a positive integer, got {k!r}.")
    hit = ranks.ranks < k
    if truncated == "raise":
        unknown = _undeterminable(ranks, k, ranks.ranks == NOT_RETRIEVED)
        if unknown.any():
            row = int(np.flatnonzero(unknown)[0])
            raise ValueError(
                f"Recall@{k} is undetermined for {int(unknown.sum())} queries (first: row {row}): the target is "
                f"not among the {int(ranks.depths[row])} ranked ids given, so it may still be in the top {k}. Pass "
                f"ranked lists of at least {k} ids after the reference is removed, or the score matrix."
            )
    return hit


def average_precision_at_k(
    ranks: PositiveRanks,
    num_positives: np.ndarray,
    k: int,
    *,
    truncated: str = "miss",
) -> np.ndarray:
    """Per-query AP@k normalised by ``min(num_positives, k)`` (CIRCO), from the ranks of all positives.

    ``ranks.ranks`` is ``[Q, P]`` with :data:`NOT_RETRIEVED` for positives not retrieved (and padding). The
    j-th positive found, at 0-based rank r < k, contributes precision ``j / (r + 1)``. A query with no
    positives gets NaN (0/0, as the official code). ``truncated`` is as in :func:`hits_at_k`, but defaults
    to ``"miss"``: the CIRCO server scores a short submission as it is, without padding.

    Example:

    ```py
    >>> r = PositiveRanks(np.array([[0, 2, 5]]), np.array([50]), exhaustive=False)
    >>> round(float(average_precision_at_k(r, np.array([3]), 5)[0]), 4)  # (1/1 + 2/3) / 3
    0.5556

    ```
    """
    if truncated not in ("raise", "miss"):
        raise ValueError(f'`truncated` must be "raise" or "miss", got {truncated!r}.')
    if ranks.ranks.ndim != 2:
        raise ValueError(f"average_precision_at_k needs ranks of shape [Q, P], got {ranks.ranks.shape}.")
    num_positives = np.asarray(num_positives, dtype=np.int64)
    sorted_ranks = np.sort(ranks.ranks, axis=1)
    within = sorted_ranks < k
    if truncated == "raise":
        missing = ((sorted_ranks == NOT_RETRIEVED) & (np.arange(sorted_ranks.shape[1]) < num_positives[:, None])).any(1)
        unknown = _undeterminable(ranks, k, missing)
        if unknown.any():
            row = int(np.flatnonzero(unknown)[0])
            raise ValueError(
                f"AP@{k} is undetermined for {int(unknown.sum())} queries (first: row {row}): a positive is not "
                f"among the {int(ranks.depths[row])} ranked ids given. Pass ranked lists of at least {k} ids."
            )
    ordinal = np.arange(1, sorted_ranks.shape[1] + 1, dtype=np.float64)
    precision = np.where(within, ordinal / (np.where(within, sorted_ranks, 0) + 1.0), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return precision.sum(axis=1) / np.minimum(num_positives, k).astype(np.float64)
