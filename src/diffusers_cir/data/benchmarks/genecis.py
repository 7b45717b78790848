"""GeneCIS loader: the four task files, each template with its own candidates ``[target] + gallery``."""

from __future__ import annotations

from pathlib import Path

from ...utils.benchmark_names import GENECIS_TASKS
from .base import BenchmarkLayoutError, CIRBenchmark, CIRQuery, ImageRef, find_file, read_json, require_keys

__all__ = ["GENECIS_TASKS", "load_genecis", "genecis_image_key"]

GENECIS_LAYOUT = """\
  <root>/{focus_attribute,change_attribute,focus_object,change_object}.json   (or <root>/genecis/<task>.json)
  object tasks:    COCO 2017 val images, <image_root>/<12-digit val_image_id>.jpg
  attribute tasks: Visual Genome images, <image_root>/<image_id>.jpg, cropped to instance_bbox"""


def genecis_image_key(entry: dict) -> int | str:
    """Id of a GeneCIS image entry: the COCO ``val_image_id`` (object tasks), or ``"<image_id>:x,y,w,h"``
    for an attribute-task crop of a Visual Genome image (the same image appears with several boxes).

    Example:

    ```py
    >>> genecis_image_key({"val_image_id": 189213}), genecis_image_key({"image_id": 7, "instance_bbox": [1, 2, 3, 4]})
    (189213, '7:1,2,3,4')

    ```
    """
    if "val_image_id" in entry:
        return int(entry["val_image_id"])
    if "image_id" in entry and "instance_bbox" in entry:
        return f"{int(entry['image_id'])}:" + ",".join(str(int(value)) for value in entry["instance_bbox"])
    raise BenchmarkLayoutError(f"A GeneCIS image entry needs 'val_image_id' or 'image_id' + 'instance_bbox', got {entry}.")


def _image_ref(entry: dict, image_root: Path) -> ImageRef:
    key = genecis_image_key(entry)
    if "val_image_id" in entry:
        return ImageRef(key, image_root / f"{int(entry['val_image_id']):012d}.jpg")
    x, y, width, height = (int(value) for value in entry["instance_bbox"])
    return ImageRef(key, image_root / f"{int(entry['image_id'])}.jpg", crop_box=(x, y, width, height))


def load_genecis(root: str | Path, task: str, image_root: str | Path | None = None) -> CIRBenchmark:
    """Load one GeneCIS task. Each query's ``candidate_ids`` are ``[target] + gallery`` (target at index 0).

    Args:
        root: folder holding the task files (``<task>.json`` or ``genecis/<task>.json``).
        task: one of ``focus_attribute``, ``change_attribute``, ``focus_object``, ``change_object``.
        image_root: COCO 2017 ``val2017`` folder (object tasks) or Visual Genome image folder (attribute
            tasks); default ``<root>/images``.

    Example:

    ```py
    >>> from diffusers_cir.data.benchmarks import load_genecis
    >>> focus = load_genecis("genecis", "focus_object", image_root="coco/val2017")  # doctest: +SKIP
    >>> len(focus), len(focus.queries[0].candidate_ids)  # doctest: +SKIP
    (1960, 15)

    ```
    """
    if task not in GENECIS_TASKS:
        raise ValueError(f"GeneCIS tasks are {GENECIS_TASKS}, got {task!r}.")
    root = Path(root)
    image_root = root / "images" if image_root is None else Path(image_root)
    task_file = find_file(root, [f"{task}.json", f"genecis/{task}.json"], f"GeneCIS {task} file ({task}.json)", GENECIS_LAYOUT)
    images: dict = {}
    queries = []
    for index, entry in enumerate(read_json(task_file, list, f"GeneCIS {task} templates")):
        require_keys(entry, ["reference", "target", "gallery", "condition"], task_file, index, "GeneCIS template")
        refs = [_image_ref(item, image_root) for item in [entry["reference"], entry["target"], *entry["gallery"]]]
        for ref in refs:
            images.setdefault(ref.image_id, ref)
        reference, target, *gallery = (ref.image_id for ref in refs)
        queries.append(
            CIRQuery(
                query_id=index,
                reference_id=reference,
                captions=[entry["condition"]],
                target_id=target,
                ground_truth_ids=[target],
                candidate_ids=[target, *gallery],
                extra={"task": task},
            )
        )
    return CIRBenchmark("genecis", "test", task, queries, None, images, True)
