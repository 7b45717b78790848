# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Inputs of a generation run: captions, or image pairs, as an indexable ``datasets.Dataset``.

Shards are ranges of item indices, so a source must give item ``i`` cheaply and always the same one: every source is
loaded (non-streaming) into ``datasets``' memory-mapped Arrow cache, which does that for 60M captions as well as for
60. Accepted:

* captions: a ``.txt`` file (one caption a line), a ``.jsonl`` / ``.json`` / ``.csv`` / ``.tsv`` / ``.parquet`` file, a
  dataset folder, or a Hub dataset id; the column is ``caption_column``, else ``caption``, else ``text``, else the
  only string column;
* image pairs: a folder with ``pairs.jsonl`` / ``pairs.csv`` / ``metadata.jsonl`` / ``metadata.csv`` (image paths
  relative to the folder), a folder of sub-folders each holding ``reference.<ext>`` and ``target.<ext>``, such a
  file itself, or any dataset (folder or Hub id; a SynthTriplets folder too) with ``reference_image`` and
  ``target_image`` columns (or the columns ``pair_columns`` maps them to). Pixels are read with
  :func:`diffusers_cir.load_image`.

Example:
    >>> from diffusers_cir.generation.sources import load_captions
    >>> captions = load_captions("captions.txt")  # doctest: +SKIP
    >>> captions.texts(0, 2)  # doctest: +SKIP
    ['a cat on a sofa', 'a red car in the snow']
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
_PAIR_FILES = ("pairs.jsonl", "pairs.csv", "metadata.jsonl", "metadata.csv")


def _load_file(path: str):
    from datasets import load_dataset

    extension = os.path.splitext(path)[1].lower()
    builder = _BUILDERS.get(extension)
    if builder is None:
        raise ValueError(f"{path!r}: expected a {', '.join(sorted(_BUILDERS))} file, a folder or a dataset id.")
    kwargs = {"delimiter": "\t"} if extension == ".tsv" else {}
    return load_dataset(builder, data_files=os.path.abspath(path), split="train", **kwargs)


def _load_any(path: str, split: str = "train"):
    """A non-streaming ``datasets.Dataset`` of a file, a folder or a Hub id."""
    from datasets import load_dataset

    if os.path.isfile(path):
        return _load_file(path)
    if os.path.isdir(path) or "/" in path:
        try:
            return load_dataset(path, split=split)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{path!r} is not a dataset that `datasets` can load ({error}).") from error
    raise FileNotFoundError(f"{path!r} is neither a file, a folder nor a dataset id.")


@dataclass
class CaptionSource:
    """Captions by item index."""

    dataset: Any
    column: str
    path: str

    def __len__(self) -> int:
        return len(self.dataset)

    def texts(self, start: int, stop: int) -> list[str]:
        """Captions ``[start, stop)``, whitespace collapsed (an empty one stays empty: the caller counts it)."""
        return [" ".join(str(text or "").split()) for text in self.dataset[start:stop][self.column]]


def load_captions(path: str, column: str | None = None, max_items: int | None = None) -> CaptionSource:
    """The caption source at ``path`` (see the module docstring)."""
    dataset = _load_any(path)
    strings = [name for name, feature in dataset.features.items() if getattr(feature, "dtype", None) in (
        "string", "large_string")]
    if column is None:
        column = next((name for name in ("caption", "text") if name in strings), None)
        if column is None and len(strings) == 1:
            column = strings[0]
    if column is None or column not in dataset.column_names:
        raise ValueError(
            f"The captions in {path!r} need a caption column: {column!r} is not one of its columns "
            f"{dataset.column_names}. Name it (CLI: --caption-column)."
        )
    if max_items is not None and max_items < len(dataset):
        dataset = dataset.select(range(max_items))
    return CaptionSource(dataset=dataset, column=column, path=path)


@dataclass
class PairSource:
    """Image pairs by item index."""

    dataset: Any
    reference_column: str
    target_column: str
    base: str  # folder that relative image paths start from
    path: str

    def __len__(self) -> int:
        return len(self.dataset)

    def _image(self, value):
        from ..retrieval.images import load_image

        if isinstance(value, str) and not os.path.isabs(value) and "://" not in value:
            value = os.path.join(self.base, value)
        return load_image(value)

    def images(self, start: int, stop: int) -> list[tuple]:
        """``(reference, target)`` RGB PIL images of items ``[start, stop)``."""
        rows = self.dataset[start:stop]
        return [(self._image(r), self._image(t)) for r, t in zip(rows[self.reference_column], rows[self.target_column])]


def _pair_folder_records(folder: str) -> list[dict]:
    records = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isdir(path):
            continue
        found = {os.path.splitext(f)[0]: os.path.join(name, f) for f in sorted(os.listdir(path))
                 if f.lower().endswith(IMAGE_EXTENSIONS)}
        if "reference" in found and "target" in found:
            records.append({"id": name, "reference_image": found["reference"], "target_image": found["target"]})
    return records


def load_image_pairs(path: str, columns: Mapping[str, str] | None = None, max_items: int | None = None) -> PairSource:
    """The image-pair source at ``path`` (see the module docstring)."""
    from datasets import Dataset, Image

    columns = dict(columns or {})
    unknown = sorted(set(columns) - {"reference_image", "target_image"})
    if unknown:
        raise ValueError(f"pair columns map 'reference_image' and 'target_image' only, got {unknown}.")
    base = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    listing = next((os.path.join(path, n) for n in _PAIR_FILES if os.path.isfile(os.path.join(path, n))), None) \
        if os.path.isdir(path) else None
    if listing is not None:
        dataset = _load_file(listing)
    elif os.path.isdir(path) and not os.path.isfile(os.path.join(path, "README.md")) and _pair_folder_records(path):
        dataset = Dataset.from_list(_pair_folder_records(path))
    else:
        dataset = _load_any(path)
    reference = columns.get("reference_image", "reference_image")
    target = columns.get("target_image", "target_image")
    missing = [name for name in (reference, target) if name not in dataset.column_names]
    if missing:
        raise ValueError(
            f"The image pairs in {path!r} have no column {missing}; their columns are {dataset.column_names}. Map "
            "them (CLI: --reference-column / --target-column)."
        )
    for name in (reference, target):  # keep the bytes: load_image decodes them (EXIF orientation, 16-bit, alpha)
        if isinstance(dataset.features[name], Image) and dataset.features[name].decode:
            dataset = dataset.cast_column(name, Image(decode=False))
    if max_items is not None and max_items < len(dataset):
        dataset = dataset.select(range(max_items))
    return PairSource(dataset=dataset, reference_column=reference, target_column=target, base=base, path=path)
