"""CIRCO loader: ``annotations/<split>.json`` + the COCO 2017 unlabeled gallery."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .base import BenchmarkLayoutError, CIRBenchmark, CIRQuery, ImageRef, find_file, read_json, require_keys

__all__ = ["CIRCO_SPLITS", "load_circo"]

CIRCO_SPLITS = ("val", "test")

CIRCO_LAYOUT = """\
  <root>/                                            (the CIRCO folder)
    annotations/{val,test}.json
    COCO2017_unlabeled/annotations/image_info_unlabeled2017.json   (the gallery: ~123k images)
    COCO2017_unlabeled/unlabeled2017/<12-digit id>.jpg
  (a flat folder holding {val,test}.json is accepted for the annotations)"""

_IMAGE_INFO = "COCO2017_unlabeled/annotations/image_info_unlabeled2017.json"


def _coco_file_name(image_id: int) -> str:
    return f"{int(image_id):012d}.jpg"


def load_circo(root: str | Path, split: str = "val", gallery_ids: Sequence[int] | None = None) -> CIRBenchmark:
    """Load a CIRCO split; the gallery is every COCO 2017 unlabeled image (``image_info_unlabeled2017.json``).

    Args:
        root: the CIRCO folder (see the layout in the error messages).
        split: ``"val"`` (220 queries, ground truths public) or ``"test"`` (800 queries, hidden).
        gallery_ids: use these COCO ids as the gallery instead of reading the image info file (for a subset
            or a synthetic gallery); the reference and every ground truth must be among them.

    Example:

    ```py
    >>> from diffusers_cir.data.benchmarks import load_circo
    >>> circo = load_circo("CIRCO", split="val")  # doctest: +SKIP
    >>> len(circo), len(circo.queries[0].ground_truth_ids)  # doctest: +SKIP
    (220, 3)

    ```
    """
    if split not in CIRCO_SPLITS:
        raise ValueError(f"CIRCO has splits {CIRCO_SPLITS}, got {split!r}.")
    root = Path(root)
    annotation_file = find_file(
        root, [f"annotations/{split}.json", f"{split}.json"], f"CIRCO {split} annotations ({split}.json)", CIRCO_LAYOUT
    )
    image_folder = root / "COCO2017_unlabeled" / "unlabeled2017"
    if gallery_ids is None:
        info_file = root / _IMAGE_INFO
        if not info_file.is_file():
            raise BenchmarkLayoutError(
                f"Cannot find the CIRCO gallery list {info_file} (COCO 2017 unlabeled image info). Download it with "
                "the COCO unlabeled images, or pass the gallery explicitly (`gallery_ids=`; CLI: --gallery-ids). "
                f"Expected layout:\n{CIRCO_LAYOUT}"
            )
        info = read_json(info_file, dict, "COCO image info")
        if "images" not in info:
            raise BenchmarkLayoutError(f"{info_file} has no 'images' list (COCO image-info format).")
        images = {
            entry["id"]: ImageRef(entry["id"], image_folder / entry.get("file_name", _coco_file_name(entry["id"])))
            for entry in info["images"]
        }
    else:
        images = {int(image_id): ImageRef(int(image_id), image_folder / _coco_file_name(image_id)) for image_id in gallery_ids}
        if len(images) != len(gallery_ids):
            raise ValueError(f"`gallery_ids` holds {len(gallery_ids) - len(images)} repeated ids; a gallery lists each image once.")

    has_labels = split != "test"
    keys = ["id", "reference_img_id", "relative_caption"] + (["target_img_id", "gt_img_ids"] if has_labels else [])
    queries = []
    for index, entry in enumerate(read_json(annotation_file, list, "CIRCO annotations")):
        require_keys(entry, keys, annotation_file, index, "CIRCO annotation")
        ground_truths = list(entry["gt_img_ids"]) if has_labels else []
        for image_id in [entry["reference_img_id"], *ground_truths]:
            if image_id not in images:
                raise BenchmarkLayoutError(
                    f"{annotation_file}: query {entry['id']} uses image {image_id}, which is not in the gallery; the "
                    "CIRCO gallery is the whole COCO 2017 unlabeled set."
                )
        queries.append(
            CIRQuery(
                query_id=entry["id"],
                reference_id=entry["reference_img_id"],
                captions=[entry["relative_caption"]],
                target_id=entry["target_img_id"] if has_labels else None,
                ground_truth_ids=ground_truths,
                extra={key: entry[key] for key in ("shared_concept", "semantic_aspects") if key in entry},
            )
        )
    return CIRBenchmark("circo", split, None, queries, list(images), images, has_labels)
