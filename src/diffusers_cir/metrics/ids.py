"""Image ids as numpy arrays: one representation for int ids (CIRCO, GeneCIS) and str ids (CIRR, FashionIQ).

Benchmarks name their images with ints (COCO ids) or strings (``"dev-244-0-img0"``, ``"B0084Y8XIU"``), and
submissions sometimes mix the two (the CIRCO server casts ``"101"`` to ``101``). Every metric compares ids
through the helpers below, which turn Python lists, numpy arrays and torch tensors into numpy arrays of one
common dtype so the comparisons are vectorised.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["IdRows", "as_id_vector", "as_id_rows", "check_id_lists", "id_kinds", "unify_id_dtypes", "index_of_ids"]


@dataclass
class IdRows:
    """A ragged list of id lists stored as a padded ``[num_rows, max_len]`` array plus a validity mask.

    Example:

    ```py
    >>> rows = as_id_rows([[3, 1], [2]], name="ranked_ids")
    >>> rows.values.shape, rows.mask.tolist()
    ((2, 2), [[True, True], [True, False]])

    ```
    """

    values: np.ndarray
    mask: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return self.mask.sum(axis=1)

    def __len__(self) -> int:
        return self.values.shape[0]


def _to_numpy(ids: Any) -> np.ndarray | None:
    # torch is optional for callers that only use numpy, so it is detected by attribute instead of imported.
    if hasattr(ids, "detach") and hasattr(ids, "cpu"):
        return ids.detach().cpu().numpy()
    if isinstance(ids, np.ndarray):
        return ids
    return None


def _object_to_typed(values: list, name: str) -> np.ndarray:
    """Python values (ints, strs, numpy scalars; ``None`` = a masked slot) -> an int64 or str array.

    numpy does the type inference in C: all ints give an int array, ints mixed with strings a str array
    (``str(1) == "1"``, the comparison we want); anything else is reported.
    """
    if None in values:
        present = [value for value in values if value is not None]
        if not present:
            return np.zeros(len(values), dtype=np.int64)
        filler = present[0]
        values = [filler if value is None else value for value in values]
    if not values:
        return np.zeros(0, dtype=np.int64)
    try:
        array = np.array(values)
    except (ValueError, TypeError):
        array = np.array(values, dtype=object)
    if array.ndim == 1 and array.dtype.kind in "iuU":
        return _check_id_dtype(array, name)
    bad = next((value for value in values if not isinstance(value, (int, np.integer, str, np.str_))
                or isinstance(value, bool)), values[0])
    raise TypeError(f"`{name}` must contain int or str image ids, got a {type(bad).__name__}: {bad!r}.")


def _check_id_dtype(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype.kind in "iu":
        return array.astype(np.int64, copy=False)
    if array.dtype.kind == "U":
        return array
    if array.dtype.kind == "f":
        if array.size and not np.all(np.isfinite(array) & (array == np.round(array))):
            raise TypeError(f"`{name}` holds non-integer floats; image ids must be ints or strings.")
        return array.astype(np.int64)
    if array.dtype.kind == "b":
        raise TypeError(f"`{name}` holds booleans; image ids must be ints or strings.")
    raise TypeError(f"`{name}` must hold int or str image ids, got an array of dtype {array.dtype}.")


def as_id_vector(ids: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One id per query -> ``(values [N], mask [N])``; ``None`` entries (a query without that id) are masked out.

    Example:

    ```py
    >>> values, mask = as_id_vector([101, None, 7], name="target_ids")
    >>> values[mask].tolist(), mask.tolist()  # a masked slot holds an arbitrary id of the same type
    ([101, 7], [True, False, True])

    ```
    """
    array = _to_numpy(ids)
    if array is None:
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise TypeError(f"`{name}` must be a list/array of ids (one per query), got {type(ids).__name__}.")
        values = list(ids)
        mask = np.array([value is not None for value in values], dtype=bool)
        for value in values:
            if isinstance(value, (list, tuple, dict, set)):
                raise TypeError(f"`{name}` must hold one id per query, got a nested {type(value).__name__}: {value!r}.")
        return _object_to_typed(values, name), mask
    if array.ndim != 1:
        raise ValueError(f"`{name}` must be 1-D (one id per query), got shape {tuple(array.shape)}.")
    if array.dtype.kind == "O":
        return as_id_vector(array.tolist(), name)
    return _check_id_dtype(array, name), np.ones(array.shape[0], dtype=bool)


def as_id_rows(rows: Any, name: str) -> IdRows:
    """Ranked lists (or id sets) per query -> :class:`IdRows`; accepts a 2-D array/tensor or ragged Python lists.

    Example:

    ```py
    >>> as_id_rows([["a", "b"], ["c"]], name="group_members").values.tolist()
    [['a', 'b'], ['c', '']]

    ```
    """
    if isinstance(rows, IdRows):
        return rows
    array = _to_numpy(rows)
    if array is not None and array.dtype.kind != "O":
        if array.ndim != 2:
            raise ValueError(f"`{name}` must be 2-D ([num_queries, list_length]), got shape {tuple(array.shape)}.")
        return IdRows(_check_id_dtype(array, name), np.ones(array.shape, dtype=bool))
    if array is not None:
        rows = array.tolist()
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence):
        raise TypeError(f"`{name}` must be a list of id lists (one per query), got {type(rows).__name__}.")
    row_list = []
    for index, row in enumerate(rows):
        if type(row) is list:  # the common case, checked cheaply
            row_list.append(row)
            continue
        row_array = _to_numpy(row)
        if row_array is not None:
            row = row_array.tolist()
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise TypeError(
                f"`{name}[{index}]` must be a list of ids, got {type(row).__name__} ({row!r:.80}); "
                f"`{name}` holds one list per query."
            )
        row_list.append(list(row))
    lengths = np.array([len(row) for row in row_list], dtype=np.int64)
    width = int(lengths.max()) if len(row_list) else 0
    flat = list(itertools.chain.from_iterable(row_list))
    if None in flat:
        raise ValueError(f"`{name}` contains None; every entry of a ranked list must be an image id.")
    flat_values = _object_to_typed(flat, name) if flat else np.zeros(0, dtype=np.int64)
    mask = np.arange(width)[None, :] < lengths[:, None]
    values = np.zeros((len(row_list), width), dtype=flat_values.dtype)
    values[mask] = flat_values
    return IdRows(values, mask)


def check_id_lists(rows: Any, name: str) -> set[str]:
    """Check, without converting, that ``rows`` holds one list of int/str ids per query with no id listed twice;
    return the kinds of ids seen (``"int"``, ``"str"``), as :func:`id_kinds` does.

    For callers that keep the lists as they are (the evaluate modules check each batch before storing it): on long
    ranked lists of string ids a set per row is several times cheaper than :func:`as_id_rows` and a sort.

    Example:

    ```py
    >>> sorted(check_id_lists([["a", "b"], [3, "a"]], name="predictions"))
    ['int', 'str']
    >>> check_id_lists([["a", "b"], ["c", "a", "c"]], name="predictions")
    Traceback (most recent call last):
      ...
    ValueError: `predictions[1]` lists id 'c' more than once; each id may appear once per query.

    ```
    """
    if hasattr(rows, "tolist"):  # numpy arrays, torch tensors
        rows = rows.tolist()
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence):
        raise TypeError(f"`{name}` must be a list of id lists (one per query), got {type(rows).__name__}.")
    types_seen = set()
    for index, row in enumerate(rows):
        if hasattr(row, "tolist"):
            row = row.tolist()
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise TypeError(
                f"`{name}[{index}]` must be a list of ids, got {type(row).__name__} ({row!r:.80}); "
                f"`{name}` holds one list per query."
            )
        kinds = {type(image_id) for image_id in row}
        bad_kinds = [kind for kind in kinds if issubclass(kind, (bool, np.bool_))
                     or not issubclass(kind, (int, np.integer, str))]
        if bad_kinds:
            bad = next(image_id for image_id in row if type(image_id) in bad_kinds)
            raise TypeError(f"`{name}[{index}]` must hold int or str image ids, got a {type(bad).__name__}: {bad!r}.")
        if len(set(row)) != len(row):
            seen = set()
            repeated = next(image_id for image_id in row if image_id in seen or seen.add(image_id))
            raise ValueError(f"`{name}[{index}]` lists id {repeated!r} more than once; each id may appear once per query.")
        types_seen |= kinds
    return {"str" if issubclass(kind, str) else "int" for kind in types_seen}


def id_kinds(ids: Any) -> set[str]:
    """The kinds of image ids (``"int"``, ``"str"``) in ``ids``: one id per query or one list per query, as lists,
    arrays or tensors (an integral float array counts as ints, as :func:`as_id_vector` reads it); ``None`` is skipped.

    Example:

    ```py
    >>> sorted(id_kinds(["a", None, 3])), sorted(id_kinds([[1, 2], [np.int64(3)]])), sorted(id_kinds(np.zeros(2)))
    (['int', 'str'], ['int'], ['int'])

    ```
    """
    array = _to_numpy(ids)
    if array is not None and array.dtype.kind != "O":
        if array.size == 0:
            return set()
        return {"str"} if array.dtype.kind == "U" else {"int"} if array.dtype.kind in "iuf" else set()
    kinds = set()
    for value in array.tolist() if array is not None else ids:
        if isinstance(value, str):
            kinds.add("str")
        elif isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
            kinds.add("int")
        elif value is not None and not isinstance(value, bytes) and hasattr(value, "__iter__"):
            kinds |= id_kinds(value)
    return kinds


def _cast_strings_to_int(values: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
    try:
        if mask is None:
            return values.astype(np.int64)
        out = np.zeros(values.shape, dtype=np.int64)
        out[mask] = values[mask].astype(np.int64)
        return out
    except (ValueError, OverflowError):  # not an integer, or one beyond int64: compare as strings
        return None


def unify_id_dtypes(arrays: list[np.ndarray], masks: list[np.ndarray | None] | None = None) -> list[np.ndarray]:
    """Cast id arrays to one dtype so they compare: all-int stays int; digit strings mixed with ints become ints
    (as the CIRCO server does with ``np.array(predictions, dtype=int)``); anything else compares as strings.

    Example:

    ```py
    >>> [a.tolist() for a in unify_id_dtypes([np.array([101, 5]), np.array(["101"])])]
    [[101, 5], [101]]

    ```
    """
    masks = masks if masks is not None else [None] * len(arrays)
    # Empty arrays carry no type information and take whatever the others use.
    kinds = {array.dtype.kind for array in arrays if array.size}
    if kinds <= {"i"}:
        return [array.astype(np.int64, copy=False) for array in arrays]
    if kinds <= {"U"}:
        return [array if array.dtype.kind == "U" else array.astype(str) for array in arrays]
    casted = []
    for array, mask in zip(arrays, masks):
        if array.dtype.kind == "U":
            as_int = _cast_strings_to_int(array, mask)
            if as_int is None:
                break
            casted.append(as_int)
        else:
            casted.append(array.astype(np.int64, copy=False))
    else:
        return casted
    return [array.astype(str) for array in arrays]


def index_of_ids(gallery_ids: np.ndarray, query_ids: np.ndarray) -> np.ndarray:
    """Position of each id of ``query_ids`` (any shape) in ``gallery_ids`` (1-D, unique); -1 where absent.

    Example:

    ```py
    >>> index_of_ids(np.array(["a", "b", "c"]), np.array([["c", "x"]])).tolist()
    [[2, -1]]

    ```
    """
    gallery_ids, query_ids = unify_id_dtypes([gallery_ids, query_ids])
    order = np.argsort(gallery_ids, kind="stable")
    sorted_ids = gallery_ids[order]
    if sorted_ids.size == 0:
        return np.full(query_ids.shape, -1, dtype=np.int64)
    positions = np.searchsorted(sorted_ids, query_ids)
    positions = np.clip(positions, 0, sorted_ids.size - 1)
    found = sorted_ids[positions] == query_ids
    return np.where(found, order[positions], -1).astype(np.int64)
