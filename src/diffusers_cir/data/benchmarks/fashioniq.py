"""FashionIQ loader (per-category captions + image splits) and the official caption-joining conventions."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ...utils.benchmark_names import FASHIONIQ_CATEGORIES
from .base import BenchmarkLayoutError, CIRBenchmark, CIRQuery, ImageRef, find_file, read_json, require_keys

__all__ = ["FASHIONIQ_CAPTION_STYLES", "FASHIONIQ_SPLITS", "join_fashioniq_captions", "load_fashioniq"]

FASHIONIQ_CAPTION_STYLES = ("clip4cir", "searle")
# Characters stripped from both ends of each caption by CLIP4Cir and SEARLE/LinCIR (``str.strip('.?, ')``).
_STRIP = ".?, "


def join_fashioniq_captions(captions: Sequence[str], style: str = "clip4cir", template: str = "{}") -> list[str]:
    """The text prompt(s) of a FashionIQ triplet from its two relative captions, as the official code builds them.

    Styles (``DEFINITIONS.md`` §2.2):

    * ``"clip4cir"`` (CLIP4Cir validation): one prompt ``f"{c0.strip('.?, ').capitalize()} and {c1.strip('.?, ')}"``;
      ``str.capitalize`` also lowercases the rest of the first caption.
    * ``"searle"`` (SEARLE / LinCIR): two prompts, ``"{c0} and {c1}"`` and the reversed ``"{c1} and {c0}"``
      (each caption stripped, case kept); their normalised features are averaged into the query.

    ``template`` wraps each joined caption; SEARLE/LinCIR use ``"a photo of $ that {}"``.

    Example:

    ```py
    >>> join_fashioniq_captions(["Is RED.", "has a V-neck?"])
    ['Is red and has a V-neck']
    >>> join_fashioniq_captions(["Is RED.", "has a V-neck?"], style="searle", template="a photo of $ that {}")
    ['a photo of $ that Is RED and has a V-neck', 'a photo of $ that has a V-neck and Is RED']

    ```
    """
    if isinstance(captions, str) or len(captions) != 2 or not all(isinstance(caption, str) for caption in captions):
        raise ValueError(f"A FashionIQ triplet has exactly two caption strings, got {captions!r}.")
    if "{}" not in template:
        raise ValueError(f"`template` must contain '{{}}' where the joined caption goes, got {template!r}.")
    first, second = (caption.strip(_STRIP) for caption in captions)
    if style == "clip4cir":
        return [template.format(f"{first.capitalize()} and {second}")]
    if style == "searle":
        return [template.format(f"{first} and {second}"), template.format(f"{second} and {first}")]
    raise ValueError(f"Unknown FashionIQ caption style {style!r}; choose one of {FASHIONIQ_CAPTION_STYLES}.")


FASHIONIQ_SPLITS = ("train", "val", "test")

FASHIONIQ_LAYOUT = """\
  <root>/                                  (the FashionIQ dataset folder)
    captions/cap.{dress,shirt,toptee}.{train,val,test}.json
    image_splits/split.{dress,shirt,toptee}.{train,val,test}.json
    images/<image id>.png
  (a flat folder holding the JSON files is accepted too)"""


def load_fashioniq(
    root: str | Path, category: str, split: str = "val", image_extension: str = ".png"
) -> CIRBenchmark:
    """Load one FashionIQ category: its triplets and, as gallery, every id of ``split.<category>.<split>.json``.

    Each category is evaluated on its own gallery; the reference ("candidate") stays in it and is not removed
    from rankings. Triplets sharing a candidate are all kept. Each query keeps its two raw captions: build
    the text with :func:`join_fashioniq_captions`.

    Example:

    ```py
    >>> from diffusers_cir.data.benchmarks import load_fashioniq
    >>> dress = load_fashioniq("fashionIQ_dataset", "dress", split="val")  # doctest: +SKIP
    >>> len(dress), len(dress.gallery_ids)  # doctest: +SKIP
    (2017, 3817)

    ```
    """
    if category not in FASHIONIQ_CATEGORIES:
        raise ValueError(f"FashionIQ categories are {FASHIONIQ_CATEGORIES}, got {category!r}.")
    if split not in FASHIONIQ_SPLITS:
        raise ValueError(f"FashionIQ has splits {FASHIONIQ_SPLITS}, got {split!r}.")
    root = Path(root)
    captions_file = find_file(
        root, [f"captions/cap.{category}.{split}.json", f"cap.{category}.{split}.json"],
        f"FashionIQ {category} {split} captions (cap.{category}.{split}.json)", FASHIONIQ_LAYOUT,
    )
    split_file = find_file(
        root, [f"image_splits/split.{category}.{split}.json", f"split.{category}.{split}.json"],
        f"FashionIQ {category} {split} image split (split.{category}.{split}.json)", FASHIONIQ_LAYOUT,
    )
    gallery_ids = read_json(split_file, list, f"FashionIQ {category} image split: a list of image ids")
    images = {image_id: ImageRef(image_id, root / "images" / f"{image_id}{image_extension}") for image_id in gallery_ids}

    has_labels = split != "test"
    keys = ["candidate", "captions"] + (["target"] if has_labels else [])
    queries = []
    for index, entry in enumerate(read_json(captions_file, list, f"FashionIQ {category} captions")):
        require_keys(entry, keys, captions_file, index, "FashionIQ triplet")
        for image_id in [entry["candidate"]] + ([entry["target"]] if has_labels else []):
            if image_id not in images:
                raise BenchmarkLayoutError(
                    f"{captions_file}: triplet {index} uses image {image_id!r}, which is not in {split_file}; "
                    "the captions and the image split must be of the same category and split."
                )
        if len(entry["captions"]) != 2:
            raise BenchmarkLayoutError(f"{captions_file}: triplet {index} has {len(entry['captions'])} captions, expected 2.")
        target = entry["target"] if has_labels else None
        queries.append(
            CIRQuery(
                query_id=index,
                reference_id=entry["candidate"],
                captions=list(entry["captions"]),
                target_id=target,
                ground_truth_ids=[target] if has_labels else [],
                extra={"category": category},
            )
        )
    return CIRBenchmark("fashioniq", split, category, queries, list(gallery_ids), images, has_labels)
