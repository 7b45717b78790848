"""Test-server submission files for the hidden-label splits, in the official formats.

* CIRR (``Test-split_server.md``): one JSON per metric, keyed by ``pairid`` (a string) plus
  ``"version": "rc2"`` and ``"metric"``: ``"recall"`` maps to the top-50 ids with the reference removed,
  ``"recall_subset"`` to the top-3 of the 5 non-reference image-set members.
* CIRCO (README "Test"): ``{query id: [50 COCO ids]}``, the raw top-50 (reference not removed), no duplicates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = [
    "CIRR_RECALL_DEPTH",
    "CIRR_SUBSET_DEPTH",
    "CIRCO_DEPTH",
    "circo_submission",
    "circo_submission_files",
    "cirr_submission_files",
    "cirr_submissions",
    "write_json",
]

CIRR_RECALL_DEPTH = 50
CIRR_SUBSET_DEPTH = 3
CIRCO_DEPTH = 50


def _check_rows(name: str, query_ids: Sequence[Any], rows: Sequence[Sequence[Any]], depth: int) -> None:
    if len(query_ids) != len(rows):
        raise ValueError(f"{name}: {len(query_ids)} query ids but {len(rows)} ranked lists.")
    if len(set(map(str, query_ids))) != len(query_ids):
        raise ValueError(f"{name}: query ids must be unique.")
    for query_id, row in zip(query_ids, rows):
        if len(row) != depth:
            raise ValueError(f"{name}: query {query_id} has {len(row)} ids, the server expects {depth}.")
        if len(set(row)) != len(row):
            raise ValueError(f"{name}: query {query_id} lists an id twice.")


def cirr_submissions(
    pair_ids: Sequence[int],
    reference_ids: Sequence[str],
    ranked_ids: Sequence[Sequence[str]],
    ranked_subset_ids: Sequence[Sequence[str]],
) -> dict[str, dict]:
    """The two CIRR server files: ``{"recall": {...}, "recall_subset": {...}}``.

    ``ranked_ids`` are the top-50 per query with the reference already removed; ``ranked_subset_ids`` the
    top-3 image-set members other than the reference. Both are checked.

    Example:

    ```py
    >>> files = cirr_submissions([7], ["r"], [[f"g{i}" for i in range(50)]], [["a", "b", "c"]])
    >>> files["recall_subset"]
    {'version': 'rc2', 'metric': 'recall_subset', '7': ['a', 'b', 'c']}

    ```
    """
    _check_rows("CIRR recall submission", pair_ids, ranked_ids, CIRR_RECALL_DEPTH)
    _check_rows("CIRR recall_subset submission", pair_ids, ranked_subset_ids, CIRR_SUBSET_DEPTH)
    for pair_id, reference, row, subset in zip(pair_ids, reference_ids, ranked_ids, ranked_subset_ids):
        if reference in row or reference in subset:
            raise ValueError(f"CIRR submission: pair {pair_id} still lists its reference {reference!r}; remove it first.")
    recall = {"version": "rc2", "metric": "recall"}
    subset_file = {"version": "rc2", "metric": "recall_subset"}
    for pair_id, row, subset in zip(pair_ids, ranked_ids, ranked_subset_ids):
        recall[str(pair_id)] = [str(image_id) for image_id in row]
        subset_file[str(pair_id)] = [str(image_id) for image_id in subset]
    return {"recall": recall, "recall_subset": subset_file}


def circo_submission(query_ids: Sequence[int], ranked_ids: Sequence[Sequence[int]]) -> dict[str, list[int]]:
    """The CIRCO server file ``{"<query id>": [50 ids]}`` (reference not removed, no duplicates).

    Example:

    ```py
    >>> list(circo_submission([0], [list(range(50))])["0"][:3])
    [0, 1, 2]

    ```
    """
    _check_rows("CIRCO submission", query_ids, ranked_ids, CIRCO_DEPTH)
    return {str(query_id): [int(image_id) for image_id in row] for query_id, row in zip(query_ids, ranked_ids)}


def cirr_submission_files(columns: Mapping[str, list], split: str) -> dict[str, tuple[str, dict]]:
    """The CIRR server files of a ranked split (see :mod:`.protocols` for the columns), by role."""
    files = cirr_submissions(
        columns["query_ids"], columns["reference_ids"], [row[:CIRR_RECALL_DEPTH] for row in columns["ranked_ids"]],
        [row[:CIRR_SUBSET_DEPTH] for row in columns["group_rankings"]],
    )
    return {f"submission_{metric}": (f"{metric}_submission_{split}.json", content) for metric, content in files.items()}


def circo_submission_files(columns: Mapping[str, list], split: str) -> dict[str, tuple[str, dict]]:
    """The CIRCO server file of a ranked split, by role."""
    content = circo_submission(columns["query_ids"], [row[:CIRCO_DEPTH] for row in columns["ranked_ids"]])
    return {"submission_circo": (f"circo_{split}_submission.json", content)}


def write_json(data: Any, path: str | Path, indent: int | None = None) -> Path:
    """Write ``data`` as JSON (parents created), atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(data, indent=indent))
    temporary.replace(path)
    return path
