"""GeneCIS: Recall@1, 2, 3 inside each template's own small gallery.

Definitions (``DEFINITIONS.md`` §4; facebookresearch/genecis ``eval/eval_functions.py`` 82-137 and
``utils/metric_utils.py`` 6-46):

* The candidates of a template are ``[target] + gallery``: the target is at index 0 by construction, and
  the reference is not a candidate.
* ``R@K = mean_t 1[index 0 in the top-K]`` per task (the official code prints fractions).
* The paper's "Average R@1" is the unweighted mean over the four tasks (not computed by the repo code).

Ties (change_object has a template whose target also appears among the distractors) are broken in favour of
the lower candidate index, so the target wins a tie with a later duplicate.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ..utils.benchmark_names import GENECIS_TASKS
from .ranking import as_score_array, check_ks, check_scale, hits_at_k, mean_over_queries, ranks_from_scores

__all__ = [
    "GENECIS_TASKS",
    "GENECIS_RECALL_KS",
    "genecis_per_query",
    "genecis_recall_at_k",
    "genecis_average_over_tasks",
]

GENECIS_RECALL_KS = (1, 2, 3)


def _candidate_score_matrix(candidate_scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """Rectangular ``[T, C]`` scores and each template's number of candidates ``[T]``; ragged rows (templates
    with fewer candidates) are padded with -inf."""
    if isinstance(candidate_scores, np.ndarray) or hasattr(candidate_scores, "detach"):
        matrix = as_score_array(candidate_scores, "candidate_scores")
        nan_rows = np.isnan(matrix).any(axis=1)
        if nan_rows.any():
            raise ValueError(f"`candidate_scores` row {int(np.flatnonzero(nan_rows)[0])} contains NaN; scores must be comparable.")
        num_templates, num_candidates = matrix.shape
        if num_templates and not num_candidates:
            raise ValueError(f"`candidate_scores` has shape {matrix.shape}: every template needs at least its target candidate.")
        return matrix, np.full(num_templates, num_candidates, dtype=np.int64)
    if isinstance(candidate_scores, (str, bytes)) or not isinstance(candidate_scores, Sequence):
        raise TypeError(
            "`candidate_scores` must be a [num_templates, num_candidates] array or one list of candidate scores "
            f"per template, got {type(candidate_scores).__name__}."
        )
    rows = []
    for index, given in enumerate(candidate_scores):
        if hasattr(given, "detach"):
            given = given.detach().cpu().numpy()
        if isinstance(given, (str, bytes)):
            raise TypeError(f"`candidate_scores[{index}]` must be a list of numbers (the candidates' scores), got {given!r:.80}.")
        try:
            row = np.asarray(given, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(
                f"`candidate_scores[{index}]` must be a list of numbers (the candidates' scores), got {given!r:.80}."
            ) from None
        if row.ndim != 1:
            raise ValueError(
                "`candidate_scores` must hold one list of candidate scores per template; "
                f"`candidate_scores[{index}]` is {given!r:.80} (shape {row.shape})."
            )
        if row.shape[0] == 0:
            raise ValueError(
                f"`candidate_scores[{index}]` is empty; every template needs its candidates ([target] + gallery)."
            )
        if not np.all(np.isfinite(row)):
            raise ValueError(f"`candidate_scores[{index}]` has a non-finite score; scores must be finite.")
        rows.append(row)
    lengths = np.array([row.shape[0] for row in rows], dtype=np.int64)
    matrix = np.full((len(rows), int(lengths.max(initial=0))), -np.inf, dtype=np.float64)
    for index, row in enumerate(rows):
        matrix[index, : row.shape[0]] = row
    return matrix, lengths


def _target_index_array(target_indices: Any, lengths: np.ndarray) -> np.ndarray:
    num_templates = lengths.shape[0]
    if isinstance(target_indices, (bool, np.bool_)):
        raise TypeError(f"`target_indices` must be an int candidate position, got the boolean {target_indices!r}.")
    if isinstance(target_indices, (int, np.integer)):
        target_indices = np.full(num_templates, int(target_indices), dtype=np.int64)
    if hasattr(target_indices, "detach"):
        target_indices = target_indices.detach().cpu().numpy()
    target_indices = np.asarray(target_indices)
    if target_indices.shape != (num_templates,):
        raise ValueError(f"`target_indices` must be an int or have shape [{num_templates}], got {target_indices.shape}.")
    if target_indices.size == 0:
        return target_indices.astype(np.int64)  # np.asarray([]) is float64
    if target_indices.dtype.kind not in "iu":
        raise TypeError(f"`target_indices` must hold integer candidate positions, got dtype {target_indices.dtype}.")
    # A ragged row is padded with -inf: a target index into the padding would be scored as a real candidate.
    outside = (target_indices < 0) | (target_indices >= lengths)
    if outside.any():
        row = int(np.flatnonzero(outside)[0])
        raise ValueError(
            f"`target_indices[{row}]` is {int(target_indices[row])} but template {row} has {int(lengths[row])} "
            f"candidates; a target index must be a candidate position in [0, {int(lengths[row])})."
        )
    return target_indices.astype(np.int64, copy=False)


def genecis_per_query(
    candidate_scores: Any,
    *,
    target_indices: Any = 0,
    ks: Sequence[int] = GENECIS_RECALL_KS,
) -> dict[str, np.ndarray]:
    """Per-template 0/1 ``recall_at{K}`` from each template's candidate scores.

    Args:
        candidate_scores: ``[T, C]`` (or ragged) similarity of each template's query to its candidates,
            ordered ``[target] + gallery`` as the official datasets do; every template has at least one.
        target_indices: the target's candidate index, an int for all templates (0, official) or ``[T]``; it
            must point into its own template's candidates (not into the padding of a shorter one).

    Zero templates give empty arrays; :func:`genecis_recall_at_k` refuses to average them.

    Example:

    ```py
    >>> genecis_per_query([[0.2, 0.9, 0.1], [0.8, 0.3, 0.1]], ks=(1, 2))["recall_at1"].tolist()
    [False, True]

    ```
    """
    ks = check_ks(ks, "ks")
    scores, lengths = _candidate_score_matrix(candidate_scores)
    target_indices = _target_index_array(target_indices, lengths)
    ranks = ranks_from_scores(scores, target_indices)
    return {f"recall_at{k}": hits_at_k(ranks, k) for k in ks}


def genecis_recall_at_k(
    candidate_scores: Any,
    *,
    target_indices: Any = 0,
    ks: Sequence[int] = GENECIS_RECALL_KS,
    scale: str = "percent",
) -> dict[str, float]:
    """``recall_at{K}`` of one GeneCIS task (papers report percent; the official code prints fractions).

    Example:

    ```py
    >>> genecis_recall_at_k([[0.2, 0.9, 0.1], [0.8, 0.3, 0.1]], ks=(1, 2), scale="fraction")
    {'recall_at1': 0.5, 'recall_at2': 1.0}

    ```
    """
    factor = check_scale(scale)
    hits = genecis_per_query(candidate_scores, target_indices=target_indices, ks=ks)
    if not len(next(iter(hits.values()))):
        raise ValueError("`candidate_scores` holds 0 templates: there is nothing to average (an empty task or split?).")
    return mean_over_queries(hits, factor)


def genecis_average_over_tasks(per_task: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Flatten per-task results to ``{task}_recall_at{K}`` and add ``average_recall_at{K}`` (unweighted mean).

    Example:

    ```py
    >>> genecis_average_over_tasks({"focus_object": {"recall_at1": 50.0}, "change_object": {"recall_at1": 25.0}})
    {'focus_object_recall_at1': 50.0, 'change_object_recall_at1': 25.0, 'average_recall_at1': 37.5}

    ```
    """
    if not per_task:
        raise ValueError("`per_task` is empty; pass at least one task's results.")
    unknown = set(per_task) - set(GENECIS_TASKS)
    if unknown:
        raise ValueError(f"Unknown GeneCIS tasks {sorted(unknown)}; expected some of {list(GENECIS_TASKS)}.")
    names = [list(result) for result in per_task.values()]
    if any(set(name_list) != set(names[0]) for name_list in names):
        raise ValueError(f"Every task must report the same metrics, got {names}.")
    metrics = {f"{task}_{name}": float(value) for task, result in per_task.items() for name, value in result.items()}
    for name in names[0]:
        metrics[f"average_{name}"] = float(np.mean([result[name] for result in per_task.values()]))
    return metrics
