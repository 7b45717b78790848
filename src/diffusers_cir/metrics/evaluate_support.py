"""What the ``evaluate`` modules of ``hub/metrics`` share besides the metric math: how ``compute()`` treats the
batches they store.

evaluate 0.4 keeps the added batches in an Arrow cache (a file, or a buffer with ``keep_in_memory=True``). Its
``compute()`` closes that cache and reads it, passes every option to the module's ``_compute``, and only when that
returns deletes the cache. When ``_compute`` raises, the cache is left in between: in the file mode it is
forgotten (the next ``compute()`` says no batch was added; the file stays locked until the module is deleted);
in memory, the next ``add_batch`` starts a new buffer, so the batches added before are silently left out. So a
typo in ``recall_ks`` cost every batch added. :class:`StoredBatchesMixin` makes every module

* check the options of ``compute()`` that need no data (names, cutoffs, scale) before evaluate touches the cache;
* when scoring fails on the data (e.g. Recall@50 asked of top-10 lists), let evaluate clean up as after a success,
  store the batches added before again through evaluate's own ``add_batch`` and raise the error, so that
  ``compute()`` can be called again;
* say what is missing when ``compute()`` is called with nothing stored, in both storage modes (in memory, evaluate
  failed with an ``AttributeError``).

Nothing here imports ``evaluate``: the metric functions work without it.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Collection

__all__ = ["StoredBatchesMixin", "check_columns_given", "ids_for_storage"]

# evaluate's column type of the stored ids -> the kind of id it holds.
_STORED_KIND = {"string": "str", "int64": "int"}


def check_columns_given(columns: dict[str, Any]) -> None:
    """Refuse a batch in which any of ``columns`` (name -> column, in the order the message lists them) is None."""
    missing = [f"`{name}`" for name, column in columns.items() if column is None]
    if missing:
        names = [f"`{name}`" for name in columns]
        needed = ", ".join(names[:-1]) + f" and {names[-1]}"
        raise ValueError(f"{', '.join(missing)} missing: every batch needs {needed}, one entry per query.")


def _add_note(error: BaseException, note: str) -> None:
    if hasattr(error, "add_note"):  # Python >= 3.11: shown under the traceback
        error.add_note(note)
    else:
        warnings.warn(note, stacklevel=3)


class StoredBatchesMixin:
    """Base class of the ``hub/metrics`` modules, listed before ``evaluate.Metric``.

    A module implements ``_score`` (the ``_compute`` of a plain evaluate module: stored columns and options in,
    metrics out) and ``_check_options`` (refuse option values that no data could make right, by calling the same
    checks as the metric functions). ``_compute`` is this class's: it runs ``_score`` and, when it fails, hands
    the error and the stored columns back to :meth:`compute`, which raises the error after evaluate's clean-up.

    Example:

    ```py
    >>> import evaluate, tempfile
    >>> cirr = evaluate.load("hub/metrics/cirr", cache_dir=tempfile.mkdtemp())
    >>> cirr.add_batch(predictions=[["r", "x", "y"]], references=["t"], reference_ids=["r"],
    ...                group_members=[["r", "t", "x"]])
    >>> cirr.compute(recall_ks=(1, 5))  # the target may be anywhere below the 2 ids given
    Traceback (most recent call last):
      ...
    ValueError: Recall@5 is undetermined for 1 queries ...
    >>> cirr.compute(recall_ks=(1, 2), subset_ks=(1,))  # the batch is still there
    {'recall_at1': 0.0, 'recall_at2': 0.0, 'recall_subset_at1': 0.0, 'avg_r1_rs1': 0.0}

    ```
    """

    _scoring_failure: tuple[BaseException, dict[str, Any]] | None = None

    def _check_options(self, **options: Any) -> None:
        """Refuse ``compute()`` options that are wrong whatever the data (called before the batches are read)."""

    def _score(self, **inputs_and_options: Any) -> dict[str, float]:
        raise NotImplementedError

    def _check_option_names(self, options: dict[str, Any]) -> None:
        parameters = inspect.signature(self._score).parameters
        if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values()):
            return
        known = [name for name in parameters if name not in self._feature_names()]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(f"compute() got unknown options {unknown}; the options of this metric are {known}.")

    def compute(self, *, predictions=None, references=None, **kwargs):
        """Score the stored batches, plus the inputs given here if any.

        Options are checked before the stored batches are read; when scoring fails on the data, the batches added
        before this call stay stored (the error's note says so) and ``compute()`` can be called again.
        """
        inputs = self._feature_names()
        given = {"predictions": predictions, "references": references, **kwargs}
        options = {name: value for name, value in kwargs.items() if name not in inputs}
        # evaluate reports this only in its cache-file mode, and with a message about a cache file.
        if self.num_process == 1 and self.writer is None and all(given.get(name) is None for name in inputs):
            raise ValueError(
                "There is nothing to compute: no batch is stored (none was added since the module was loaded or "
                "since the last compute()). Call `add_batch` / `add` first, or pass the inputs to `compute`."
            )
        self._check_option_names(options)
        self._check_options(**options)
        stored = len(self)  # the rows added before; the inputs given here come after them
        self._scoring_failure = None
        output = super().compute(predictions=predictions, references=references, **kwargs)
        failure, self._scoring_failure = self._scoring_failure, None
        if failure is None:
            return output
        error, columns = failure
        if stored and self.num_process == 1:
            # evaluate's own add_batch: these rows were checked when they were first added.
            super().add_batch(**{name: column[:stored] for name, column in columns.items()})
            _add_note(error, f"The {stored} examples added before this compute() are still stored: call compute() "
                             "again (e.g. with other options).")
        elif stored:
            _add_note(error, "The stored batches were consumed (distributed evaluation): add them again.")
        raise error

    def _compute(self, **inputs_and_options):
        try:
            return self._score(**inputs_and_options)
        except Exception as error:  # re-raised by compute() once evaluate has released its cache
            columns = {name: inputs_and_options[name] for name in self._feature_names()}
            self._scoring_failure = (error, columns)
            return None


def _spelled_int(image_id: str) -> int | None:
    try:
        value = int(image_id)
    except ValueError:
        return None
    return value if -(2**63) <= value < 2**63 else None


def _map_ids(columns: dict[str, Any], nested: Collection[str], function) -> dict[str, list]:
    def as_list(values):
        return values.tolist() if hasattr(values, "tolist") else list(values)

    return {
        name: [[function(image_id) for image_id in as_list(row)] for row in as_list(column)] if name in nested
        else [function(image_id) for image_id in as_list(column)]
        for name, column in columns.items()
    }


def _strings(columns: dict[str, Any], nested: Collection[str]):
    """(column name, string id) for every string id of the columns, in order."""
    for name, column in columns.items():
        for value in column:
            values = (value.tolist() if hasattr(value, "tolist") else value) if name in nested else (value,)
            for image_id in values:
                if isinstance(image_id, str):
                    yield name, image_id


def ids_for_storage(columns: dict[str, Any], nested: Collection[str], kinds: dict[str, set[str]],
                    stored_type: str | None) -> dict[str, Any]:
    """The id columns of a checked batch as a module whose ids may be ints or strings stores them.

    evaluate gives a column one type, fixed by the first batch (``stored_type``: ``"string"``, ``"int64"`` or
    ``None`` before the first one), while a batch may hold int ids, string ids or both (``kinds``: those of each
    column, from :func:`~diffusers_cir.metrics.ids.id_kinds`). Ids are compared within a query, so within a batch,
    and the batch is stored so that they compare as the metric functions compare them: a column holding a string is
    a string column (an int in it is its decimal spelling); string columns next to int columns compare as ints if
    every string spells one (as :func:`~diffusers_cir.metrics.ids.unify_id_dtypes` casts ``"0101"`` to ``101``),
    otherwise everything compares as strings (``"0101"`` is not ``"101"``). In a string column an int is stored as
    its decimal spelling; into an int column a string goes only as the exact spelling of an int (so that equal stays
    equal and unequal stays unequal); anything else is refused by name. ``nested`` names the columns that hold one
    list of ids per query.

    Example:

    ```py
    >>> ids_for_storage({"references": ["7", "img_1"]}, (), {"references": {"str"}}, "int64")
    Traceback (most recent call last):
      ...
    ValueError: `references` holds the string id 'img_1', but the batches added before hold int ids, ...
    >>> ids_for_storage({"predictions": [[7, 8]], "references": ["07"]}, {"predictions"},
    ...                 {"predictions": {"int"}, "references": {"str"}}, "string")
    {'predictions': [['7', '8']], 'references': ['7']}

    ```
    """
    seen = set().union(*kinds.values())
    if len(seen) < 2 and (stored_type is None or seen <= {_STORED_KIND[stored_type]}):
        return columns  # one kind, the stored one (or nothing stored yet): the common case, stored as given
    column_kinds = {"str" if "str" in column else "int" for column in kinds.values() if column}
    compare_as = next(iter(column_kinds)) if len(column_kinds) == 1 else "str"
    if len(column_kinds) > 1 and all(_spelled_int(image_id) is not None for _, image_id in _strings(columns, nested)):
        compare_as = "int"
    store_as = _STORED_KIND[stored_type] if stored_type is not None else compare_as
    if store_as == "int":
        for name, image_id in _strings(columns, nested):
            value = _spelled_int(image_id)
            if value is None or (compare_as == "str" and str(value) != image_id):
                raise ValueError(
                    f"`{name}` holds the string id {image_id!r}, but the batches added before hold int ids, which "
                    "this module stores as ints (evaluate fixes the type with the first batch), and "
                    f"{image_id!r} is not the exact spelling of an int. Give the ids of this evaluation as strings "
                    "from its first batch (str(id) for an int), or compute() the int batches first."
                )
        return _map_ids(columns, nested, lambda image_id: int(image_id) if isinstance(image_id, str) else image_id)
    if compare_as == "int":  # digit strings and ints, stored as the int's decimal spelling: "07" and 7 are "7"
        return _map_ids(columns, nested, lambda image_id: None if image_id is None else str(int(image_id)))
    return _map_ids(columns, nested, lambda image_id: image_id if image_id is None or isinstance(image_id, str)
                    else str(int(image_id)))
