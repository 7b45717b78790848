"""What every benchmark loader returns: queries, gallery ids, image locations and ground truths."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = ["ImageRef", "CIRQuery", "CIRBenchmark", "BenchmarkLayoutError", "find_file", "read_json"]


class BenchmarkLayoutError(FileNotFoundError):
    """A benchmark file is missing or malformed; the message names what the official layout expects."""


@dataclass(frozen=True)
class ImageRef:
    """One image of a benchmark: its id, where the official layout keeps its pixels, and an optional crop.

    ``crop_box`` is ``(x, y, width, height)`` in pixels (GeneCIS attribute tasks crop one object).
    """

    image_id: Any
    path: Path
    crop_box: tuple[int, int, int, int] | None = None


@dataclass
class CIRQuery:
    """One composed query.

    Attributes:
        query_id: CIRR ``pairid``, CIRCO ``id``, or the position in the annotation file (FashionIQ, GeneCIS).
        reference_id: id of the reference image (FashionIQ's "candidate").
        captions: the raw text(s): one caption (CIRR, CIRCO, GeneCIS condition) or FashionIQ's two.
        target_id: the target (CIRR ``target_hard``, CIRCO ``target_img_id``); ``None`` on hidden-label splits.
        ground_truth_ids: every positive (CIRCO ``gt_img_ids``; ``[target_id]`` elsewhere; empty when hidden).
        group_members: CIRR ``img_set.members`` (6 ids, reference included), else ``None``.
        candidate_ids: GeneCIS per-query gallery ``[target] + distractors``, else ``None``.
        extra: benchmark-specific fields kept verbatim (``target_soft``, ``semantic_aspects``, ...).
    """

    query_id: Any
    reference_id: Any
    captions: list[str]
    target_id: Any = None
    ground_truth_ids: list = field(default_factory=list)
    group_members: list | None = None
    candidate_ids: list | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class CIRBenchmark:
    """A loaded benchmark split.

    Attributes:
        name: ``"cirr"``, ``"fashioniq"``, ``"circo"`` or ``"genecis"``.
        split: the split name as the official files spell it (``"val"``, ``"test1"``, ``"test"``).
        subset: FashionIQ category or GeneCIS task, else ``None``.
        queries: the queries, in file order (nothing deduplicated: official code evaluates all of them).
        gallery_ids: ids ranked for every query, or ``None`` when each query has its own candidates (GeneCIS).
        images: every image the split needs (gallery, references, candidates) by id.
        has_labels: ``False`` for hidden-label test splits (submit to the benchmark's server instead).

    Example:

    ```py
    >>> bench = CIRBenchmark("cirr", "val", None, [CIRQuery(1, "a", ["x"], "b", ["b"])], ["a", "b"],
    ...                      {i: ImageRef(i, Path(f"{i}.png")) for i in "ab"}, True)
    >>> len(bench), bench.image("b").path.name
    (1, 'b.png')

    ```
    """

    name: str
    split: str
    subset: str | None
    queries: list[CIRQuery]
    gallery_ids: list | None
    images: dict[Any, ImageRef]
    has_labels: bool

    def __len__(self) -> int:
        return len(self.queries)

    def image(self, image_id: Any) -> ImageRef:
        try:
            return self.images[image_id]
        except KeyError:
            raise KeyError(f"Image {image_id!r} is not part of {self.description}.") from None

    @property
    def description(self) -> str:
        return f"{self.name} {self.split}" + (f" ({self.subset})" if self.subset else "")

    def missing_images(self, image_ids: Iterable[Any] | None = None, limit: int | None = 10) -> list[Path]:
        """Paths of images not on disk (at most ``limit``): the annotation files do not include the pixels."""
        missing = []
        for image_id in self.images if image_ids is None else image_ids:
            path = self.image(image_id).path
            if not path.is_file():
                missing.append(path)
                if limit is not None and len(missing) >= limit:
                    break
        return missing

    def to_dataset(self):
        """The queries as a ``datasets.Dataset`` (one row per query; image paths as strings).

        Example:

        ```py
        >>> bench = CIRBenchmark("cirr", "val", None, [CIRQuery(1, "a", ["x"], "b", ["b"])], ["a", "b"],
        ...                      {i: ImageRef(i, Path(f"{i}.png")) for i in "ab"}, True)
        >>> bench.to_dataset()[0]["reference_path"]
        'a.png'

        ```
        """
        import datasets

        rows = []
        for query in self.queries:
            row = asdict(query)
            row["extra"] = json.dumps(row["extra"])  # heterogeneous per benchmark: kept as JSON text
            row["reference_path"] = str(self.image(query.reference_id).path)
            rows.append(row)
        return datasets.Dataset.from_list(rows)


def find_file(root: Path, candidates: Sequence[str], what: str, layout: str) -> Path:
    """First existing ``root / candidate``; a :class:`BenchmarkLayoutError` listing every place tried otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise BenchmarkLayoutError(f"The {what} folder {root} does not exist. Expected layout:\n{layout}")
    for candidate in candidates:
        path = root / candidate
        if path.is_file():
            return path
    tried = "\n".join(f"  {root / candidate}" for candidate in candidates)
    raise BenchmarkLayoutError(f"Cannot find the {what}; looked for:\n{tried}\nExpected layout:\n{layout}")


def read_json(path: Path, expected_type: type, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise BenchmarkLayoutError(f"{path} ({what}) is not valid JSON: {error}") from None
    if not isinstance(data, expected_type):
        raise BenchmarkLayoutError(
            f"{path} ({what}) should hold a JSON {expected_type.__name__}, found a {type(data).__name__}."
        )
    return data


def require_keys(entry: Any, keys: Sequence[str], path: Path, index: int, what: str) -> None:
    if not isinstance(entry, dict):
        raise BenchmarkLayoutError(f"{path}: entry {index} should be an object ({what}), found {type(entry).__name__}.")
    missing = [key for key in keys if key not in entry]
    if missing:
        raise BenchmarkLayoutError(f"{path}: entry {index} lacks {missing} ({what} entries have {list(keys)}).")
