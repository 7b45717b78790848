"""CIRR loader (rc2 release): captions ``cap.rc2.<split>.json`` + image split ``split.rc2.<split>.json``."""

from __future__ import annotations

from pathlib import Path

from .base import BenchmarkLayoutError, CIRBenchmark, CIRQuery, ImageRef, find_file, read_json, require_keys

__all__ = ["CIRR_SPLITS", "load_cirr"]

CIRR_SPLITS = ("train", "val", "test1")

CIRR_LAYOUT = """\
  <root>/                        (the CIRR folder of the official release)
    train/ dev/ test1/           images, at the relative paths listed in the split files
    cirr/captions/cap.rc2.{train,val,test1}.json
    cirr/image_splits/split.rc2.{train,val,test1}.json
  (a flat folder holding the two JSON files is accepted too)"""


def load_cirr(root: str | Path, split: str = "val") -> CIRBenchmark:
    """Load a CIRR split: every query of ``cap.rc2.<split>.json`` and, as gallery, every image of the split.

    The gallery is all keys of ``split.rc2.<split>.json`` (2,297 images for val), not the images that
    appear in queries (``DEFINITIONS.md`` §1.1). Queries sharing a reference are all kept.

    Example:

    ```py
    >>> from diffusers_cir.data.benchmarks import load_cirr
    >>> cirr = load_cirr("CIRR", split="val")  # doctest: +SKIP
    >>> len(cirr), len(cirr.gallery_ids)  # doctest: +SKIP
    (4181, 2297)

    ```
    """
    if split not in CIRR_SPLITS:
        raise ValueError(f"CIRR has splits {CIRR_SPLITS}, got {split!r} (the test split is called 'test1').")
    root = Path(root)
    captions_file = find_file(
        root, [f"cirr/captions/cap.rc2.{split}.json", f"captions/cap.rc2.{split}.json", f"cap.rc2.{split}.json"],
        f"CIRR {split} captions (cap.rc2.{split}.json)", CIRR_LAYOUT,
    )
    split_file = find_file(
        root, [f"cirr/image_splits/split.rc2.{split}.json", f"image_splits/split.rc2.{split}.json", f"split.rc2.{split}.json"],
        f"CIRR {split} image split (split.rc2.{split}.json)", CIRR_LAYOUT,
    )
    relative_paths = read_json(split_file, dict, "CIRR image split: image id -> relative path")
    images = {image_id: ImageRef(image_id, root / relative_path) for image_id, relative_path in relative_paths.items()}

    has_labels = split != "test1"
    keys = ["pairid", "reference", "caption", "img_set"] + (["target_hard"] if has_labels else [])
    queries = []
    for index, entry in enumerate(read_json(captions_file, list, "CIRR captions")):
        require_keys(entry, keys, captions_file, index, "CIRR caption")
        members = list(entry["img_set"]["members"])
        for image_id in [entry["reference"], *members] + ([entry["target_hard"]] if has_labels else []):
            if image_id not in images:
                raise BenchmarkLayoutError(
                    f"{captions_file}: entry {index} uses image {image_id!r}, which is not in {split_file}. The "
                    "captions and the image split must come from the same CIRR split and release (rc2)."
                )
        target = entry["target_hard"] if has_labels else None
        queries.append(
            CIRQuery(
                query_id=entry["pairid"],
                reference_id=entry["reference"],
                captions=[entry["caption"]],
                target_id=target,
                ground_truth_ids=[target] if has_labels else [],
                group_members=members,
                extra={"target_soft": entry.get("target_soft"), "img_set_id": entry["img_set"].get("id")},
            )
        )
    return CIRBenchmark("cirr", split, None, queries, list(relative_paths), images, has_labels)
