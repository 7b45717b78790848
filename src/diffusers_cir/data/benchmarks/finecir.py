"""Fine-CIRR and Fine-FashionIQ (FineCIR, Li et al.): CIRR and FashionIQ with fine-grained modification texts.

The releases replace each benchmark's captions with JSON Lines files of longer, itemised modification texts (the
``finemt`` field) and keep its images and image splits. Formats as read by the authors' code and shown by their
example files (SDU-L/FineCIR at 9b2f836: ``code/datasets.py``, ``code/test.py``,
``finecir_data_example/finecirr/cirr.fine.train.jsonl``, ``finecir_data_example/finefiq/fiq.fine.dress.train.jsonl``):

* Fine-CIRR ``cirr.fine.{train,val}.jsonl``: one CIRR entry per line (``pairid``, ``reference``, ``target_hard``,
  ``img_set``) with ``finemt`` in place of ``caption``; images and ``split.rc2.{split}.json`` as in CIRR.
* Fine-FashionIQ ``fiq.fine.{dress,shirt,toptee}.{train,val}.jsonl``: ``{"candidate", "target", "finemt"}`` per line
  (one text, not FashionIQ's two captions); images and ``split.{category}.{split}.json`` as in FashionIQ.

The authors evaluate Fine-FashionIQ on the images of the split's queries (every candidate and target), not on the whole
image split, with each query's reference removed from its ranking, at Recall@1/10/50; ``gallery="split"`` gives
FashionIQ's gallery instead. Fine-CIRR is evaluated like CIRR. Only the train and val files are published (the code
reads a ``cap.rc2.test1.json`` with ``finemt`` that is not part of the release).
"""

from __future__ import annotations

import json
from pathlib import Path

from ...utils.benchmark_names import FASHIONIQ_CATEGORIES
from .base import (
    BenchmarkLayoutError,
    CIRBenchmark,
    CIRQuery,
    ImageRef,
    find_file,
    read_json,
    require_keys,
)

__all__ = ["FINECIR_GALLERIES", "FINECIR_SPLITS", "load_fine_cirr", "load_fine_fashioniq", "read_jsonl"]

FINECIR_SPLITS = ("train", "val")
FINECIR_GALLERIES = ("queries", "split")

FINE_CIRR_LAYOUT = """\
  <root>/                                   (the CIRR image folders, as for CIRR)
    train/ dev/                             images, at the relative paths listed in the split files
    fine-cirr/finemt_captions/cirr.fine.{train,val}.jsonl
    fine-cirr/image_splits/split.rc2.{train,val}.json   (or CIRR's cirr/image_splits/)
  (a flat folder holding the two files is accepted too)"""

FINE_FASHIONIQ_LAYOUT = """\
  <root>/                                   (the FashionIQ folder)
    captions/fiq.fine.{dress,shirt,toptee}.{train,val}.jsonl
    image_splits/split.{dress,shirt,toptee}.{train,val}.json
    images/<image id>.png
  (a flat folder holding the files is accepted too)"""


def read_jsonl(path: Path, what: str) -> list[dict]:
    """The objects of a JSON Lines file (blank lines skipped); a :class:`BenchmarkLayoutError` naming the line that
    is not an object."""
    entries = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise BenchmarkLayoutError(f"{path}:{number} ({what}) is not valid JSON: {error}") from None
            if not isinstance(entry, dict):
                raise BenchmarkLayoutError(f"{path}:{number} ({what}) should be a JSON object, found {type(entry).__name__}.")
            entries.append(entry)
    return entries


def _check_split(split: str, name: str) -> None:
    if split not in FINECIR_SPLITS:
        raise ValueError(f"{name} has the splits {FINECIR_SPLITS} (the release has no test annotations), got {split!r}.")


def _check_text(entry: dict, path: Path, index: int) -> str:
    text = entry["finemt"]
    if not isinstance(text, str) or not text.strip():
        raise BenchmarkLayoutError(f"{path}: entry {index} has an empty `finemt` (the modification text).")
    return text


def load_fine_cirr(root: str | Path, split: str = "val") -> CIRBenchmark:
    """Load a Fine-CIRR split: every entry of ``cirr.fine.<split>.jsonl``, ranked against every image of the split.

    Example:

    ```py
    >>> from diffusers_cir.data.benchmarks import load_fine_cirr
    >>> fine = load_fine_cirr("CIRR", split="val")  # doctest: +SKIP
    >>> fine.queries[0].captions[0][:40]  # doctest: +SKIP
    '1. Add a potted plant to the right side '

    ```
    """
    _check_split(split, "Fine-CIRR")
    root = Path(root)
    captions_file = find_file(
        root, [f"fine-cirr/finemt_captions/cirr.fine.{split}.jsonl", f"finemt_captions/cirr.fine.{split}.jsonl",
               f"cirr.fine.{split}.jsonl"], f"Fine-CIRR {split} texts (cirr.fine.{split}.jsonl)", FINE_CIRR_LAYOUT,
    )
    split_file = find_file(
        root, [f"fine-cirr/image_splits/split.rc2.{split}.json", f"cirr/image_splits/split.rc2.{split}.json",
               f"image_splits/split.rc2.{split}.json", f"split.rc2.{split}.json"],
        f"CIRR {split} image split (split.rc2.{split}.json)", FINE_CIRR_LAYOUT,
    )
    relative_paths = read_json(split_file, dict, "CIRR image split: image id -> relative path")
    images = {image_id: ImageRef(image_id, root / relative_path) for image_id, relative_path in relative_paths.items()}
    queries = []
    for index, entry in enumerate(read_jsonl(captions_file, "Fine-CIRR entries")):
        require_keys(entry, ["pairid", "reference", "target_hard", "finemt", "img_set"], captions_file, index,
                     "Fine-CIRR entry")
        members = list(entry["img_set"]["members"])
        for image_id in [entry["reference"], entry["target_hard"], *members]:
            if image_id not in images:
                raise BenchmarkLayoutError(
                    f"{captions_file}: entry {index} uses image {image_id!r}, which is not in {split_file}: the texts and "
                    "the image split must be of the same split."
                )
        queries.append(CIRQuery(
            query_id=entry["pairid"], reference_id=entry["reference"], captions=[_check_text(entry, captions_file, index)],
            target_id=entry["target_hard"], ground_truth_ids=[entry["target_hard"]], group_members=members,
            extra={"img_set_id": entry["img_set"].get("id")},
        ))
    return CIRBenchmark("fine_cirr", split, None, queries, list(relative_paths), images, True)


def load_fine_fashioniq(
    root: str | Path, category: str, split: str = "val", image_extension: str = ".png", gallery: str = "queries"
) -> CIRBenchmark:
    """Load one Fine-FashionIQ category. ``gallery="queries"`` (the authors' evaluation): the candidates and targets of
    the split's queries, in order of first use; ``"split"``: every id of ``split.<category>.<split>.json``.

    Example:

    ```py
    >>> from diffusers_cir.data.benchmarks import load_fine_fashioniq
    >>> dress = load_fine_fashioniq("fashionIQ_dataset", "dress")  # doctest: +SKIP

    ```
    """
    if category not in FASHIONIQ_CATEGORIES:
        raise ValueError(f"Fine-FashionIQ categories are {FASHIONIQ_CATEGORIES}, got {category!r}.")
    _check_split(split, "Fine-FashionIQ")
    if gallery not in FINECIR_GALLERIES:
        raise ValueError(f"`gallery` must be one of {FINECIR_GALLERIES}, got {gallery!r}.")
    root = Path(root)
    captions_file = find_file(
        root, [f"captions/fiq.fine.{category}.{split}.jsonl", f"fiq.fine.{category}.{split}.jsonl",
               f"captions/fiq.fine.{category}.{split}.json", f"fiq.fine.{category}.{split}.json"],
        f"Fine-FashionIQ {category} {split} texts (fiq.fine.{category}.{split}.jsonl)", FINE_FASHIONIQ_LAYOUT,
    )
    split_file = find_file(
        root, [f"image_splits/split.{category}.{split}.json", f"split.{category}.{split}.json"],
        f"FashionIQ {category} {split} image split (split.{category}.{split}.json)", FINE_FASHIONIQ_LAYOUT,
    )
    split_ids = read_json(split_file, list, f"FashionIQ {category} image split: a list of image ids")
    known = set(split_ids)
    queries, used = [], {}
    for index, entry in enumerate(read_jsonl(captions_file, f"Fine-FashionIQ {category} entries")):
        require_keys(entry, ["candidate", "target", "finemt"], captions_file, index, "Fine-FashionIQ entry")
        for image_id in (entry["candidate"], entry["target"]):
            if image_id not in known:
                raise BenchmarkLayoutError(
                    f"{captions_file}: entry {index} uses image {image_id!r}, which is not in {split_file}; the texts and "
                    "the image split must be of the same category and split."
                )
            used.setdefault(image_id, None)
        queries.append(CIRQuery(
            query_id=index, reference_id=entry["candidate"], captions=[_check_text(entry, captions_file, index)],
            target_id=entry["target"], ground_truth_ids=[entry["target"]], extra={"category": category},
        ))
    gallery_ids = list(used) if gallery == "queries" else list(split_ids)
    images = {image_id: ImageRef(image_id, root / "images" / f"{image_id}{image_extension}") for image_id in gallery_ids}
    return CIRBenchmark("fine_fashioniq", split, category, queries, gallery_ids, images, True)
