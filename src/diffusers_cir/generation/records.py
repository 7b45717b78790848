# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""What the stages hand each other: a caption triplet, and a candidate triplet with its images, scores and mask."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class CaptionTriplet:
    """(reference caption, modification text, target caption), before any image exists.

    ``source_keyword`` / ``target_keyword`` are set for keyword triplets (training can re-draw the instruction from
    the templates); ``template_index`` is the template drawn (an index into ``templates.KEYWORD_TEMPLATES``).
    """

    reference_caption: str
    modification_text: str
    target_caption: str
    method: str  # "keyword" or "llm"
    source_keyword: str | None = None
    target_keyword: str | None = None
    template_index: int | None = None


@dataclass
class Candidate:
    """One (reference image, text, target image) on its way through filters and masks to a row.

    ``item_index`` is the item's index in its source, ``sample_index`` which seed (or 0 for given pairs) made it;
    together with the strategy they give the row id. ``scores`` holds the CLIP scores by filter name.
    """

    strategy: str
    item_index: int
    sample_index: int
    reference_image: Any  # PIL.Image
    target_image: Any
    modification_text: str
    reference_caption: str | None = None
    target_caption: str | None = None
    source_keyword: str | None = None
    target_keyword: str | None = None
    template_index: int | None = None
    reverse_modification_text: str | None = None
    generator: str | None = None  # the model (or source) the images came from
    seed: int | None = None  # the image seed
    cross_replace: float | None = None
    self_replace: float | None = None
    scores: dict[str, float] = field(default_factory=dict)
    mask: Any = None  # PIL "L" image, size x size
    mask_term: str | None = None

    @property
    def row_id(self) -> str:
        return f"{self.strategy}-{self.item_index:09d}-{self.sample_index:02d}"
