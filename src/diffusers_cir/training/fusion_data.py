# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""The composition-network trainer's data: which columns each layout reads, the stream, and the collator.

Two layouts, each with an image form and an embedding form (picked by the columns the configuration has):

* ``synthtriplets`` (:mod:`diffusers_cir.data.schema`): ``reference_image``/``reference_image_embeds``,
  ``modification_text``, ``target_image``/``target_image_embeds``; MTST's reverse text comes from the optional
  ``reverse_modification_text`` column (the text that turns the target back into the reference);
* ``text_triplets`` (:mod:`diffusers_cir.data.text_triplets`): ``image``/``image_embeds``, ``caption``,
  ``modification_text``, ``modified_caption``.

The stream is ``datasets`` streaming, split by rank, block-shuffled and resumable exactly, through
:func:`diffusers_cir.data.streaming.build_triplet_dataloader` with :class:`FusionCollator` in place of the SynthTriplets
collator. A row that does not decode (or a text triplet that fails
:func:`~diffusers_cir.data.text_triplets.text_triplet_problem`) is dropped from its batch and counted, never trained on.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data import schema
from ..data import text_triplets as text_layout
from ..data.streaming import (
    TripletStream,
    _check_local_shards,
    _embedding,
    _rows_from_tables,
    _top_level,
)
from ..retrieval.images import load_image, pixel_values

__all__ = ["REVERSE_MODIFICATION_TEXT", "FusionCollator", "FusionColumns", "fusion_columns", "open_fusion_stream"]

REVERSE_MODIFICATION_TEXT = "reverse_modification_text"


@dataclass(frozen=True)
class FusionColumns:
    """The columns one run reads (``None``: not read); ``*_is_embedding`` says whether a column holds image bytes or
    an embedding vector."""

    reference: str
    reference_is_embedding: bool
    modification: str
    target: str | None = None
    target_is_embedding: bool = False
    target_text: str | None = None
    reference_text: str | None = None
    reverse_text: str | None = None

    def names(self) -> list[str]:
        return [name for name in (self.reference, self.modification, self.target, self.target_text,
                                  self.reference_text, self.reverse_text) if name is not None]


def fusion_columns(layout: str, columns: list[str], mapping: Mapping[str, str], *,
                   needs_reverse_text: bool = False) -> FusionColumns:
    """The :class:`FusionColumns` of ``layout`` in a dataset with ``columns`` (``mapping``: layout name -> column);
    a :class:`~diffusers_cir.data.schema.MissingColumnsError` naming what is missing otherwise."""
    def column(name: str) -> str:
        return mapping.get(name, name)

    def has(name: str) -> bool:
        return schema.has_field(columns, column(name))

    if layout == "synthtriplets":
        embeds = has(schema.TARGET_IMAGE_EMBEDS)
        needed = [schema.REFERENCE_IMAGE_EMBEDS if embeds else schema.REFERENCE_IMAGE, schema.MODIFICATION_TEXT,
                  schema.TARGET_IMAGE_EMBEDS if embeds else schema.TARGET_IMAGE]
        needed += [REVERSE_MODIFICATION_TEXT] if needs_reverse_text else []
        schema.check_columns(columns, {name: column(name) for name in needed}, needed)
        return FusionColumns(
            reference=column(needed[0]), reference_is_embedding=embeds, modification=column(schema.MODIFICATION_TEXT),
            target=column(needed[2]), target_is_embedding=embeds,
            reverse_text=column(REVERSE_MODIFICATION_TEXT) if needs_reverse_text else None,
        )
    embeds = has(text_layout.IMAGE_EMBEDS)
    reference = text_layout.IMAGE_EMBEDS if embeds else text_layout.IMAGE
    needed = [reference, text_layout.CAPTION, text_layout.MODIFICATION_TEXT, text_layout.MODIFIED_CAPTION]
    schema.check_columns(columns, {name: column(name) for name in needed}, needed)
    return FusionColumns(
        reference=column(reference), reference_is_embedding=embeds, modification=column(text_layout.MODIFICATION_TEXT),
        target_text=column(text_layout.MODIFIED_CAPTION),
        reference_text=column(text_layout.CAPTION),  # a negative of SCOT's objective, and checked on every row
    )


def open_fusion_stream(path: str, name: str | None, split: str, layout: str, mapping: Mapping[str, str] | None = None,
                       *, needs_reverse_text: bool = False, **load_dataset_kwargs) -> tuple[TripletStream, FusionColumns]:
    """The training stream (only the columns it reads; images left undecoded, so a corrupt one is skipped by the
    collator) and its :class:`FusionColumns`."""
    import datasets

    mapping = dict(mapping or {})
    if os.path.isdir(path):
        _check_local_shards(path, name, split)
    dataset = datasets.load_dataset(path, name, split=split, streaming=True, **load_dataset_kwargs)
    features = dataset.features
    available = list(features) if features is not None else list(next(iter(dataset)))
    columns = fusion_columns(layout, available, mapping, needs_reverse_text=needs_reverse_text)
    keep = {_top_level(column, available) for column in columns.names()} | ({schema.ID, "__key__"} & set(available))
    keep.discard(None)
    if features is not None:
        dataset = dataset.select_columns([column for column in available if column in keep])
        for column in list(dataset.features):
            if isinstance(dataset.features[column], datasets.Image) and dataset.features[column].decode:
                dataset = dataset.cast_column(column, datasets.Image(decode=False))
        if columns.reference_is_embedding and all(column in available for column in columns.names()):
            dataset = dataset.with_format("arrow")  # whole batches of vectors as one array (see streaming.py)
    source = schema.EMBEDDINGS_CONFIG if columns.reference_is_embedding else schema.IMAGES_CONFIG
    return TripletStream(dataset=dataset, source=source, column_mapping=dict(mapping)), columns


class FusionCollator:
    """Rows -> a training batch of one :class:`FusionColumns` reading.

    Batches (``B`` rows that decoded): ``reference_embeds`` ``[B, D]`` or ``reference_pixel_values``; with image
    targets ``target_embeds`` or ``target_pixel_values``; ``texts`` (modification texts), and as the columns ask
    ``target_texts``, ``reference_texts``, ``reverse_texts``; ``ids``, ``num_skipped`` and ``skipped`` (``(id,
    reason)``).
    """

    def __init__(self, columns: FusionColumns, image_processor=None, text_triplets: bool = False):
        if image_processor is None and not columns.reference_is_embedding:
            raise ValueError("This data holds images: the collator needs the image tower's processor.")
        self.columns, self.image_processor, self.text_triplets = columns, image_processor, text_triplets
        self.embedding_dim: int | None = None

    def _vector(self, row, column: str) -> np.ndarray:
        vector = _embedding(schema.get_field(row, column, default=None), column, self.embedding_dim)
        self.embedding_dim = vector.shape[0]
        return vector

    def _text(self, row, column: str) -> str:
        text = schema.get_field(row, column, default=None)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{column} is empty or not a string ({type(text).__name__})")
        return text

    def _decode(self, row) -> dict:
        columns = self.columns
        if self.text_triplets:
            problem = text_layout.text_triplet_problem(row, {
                text_layout.CAPTION: columns.reference_text, text_layout.MODIFICATION_TEXT: columns.modification,
                text_layout.MODIFIED_CAPTION: columns.target_text})
            if problem:
                raise ValueError(problem)
        decoded: dict[str, Any] = {"text": self._text(row, columns.modification)}
        for key, column in (("target_text", columns.target_text), ("reference_text", columns.reference_text),
                            ("reverse_text", columns.reverse_text)):
            if column is not None:
                decoded[key] = self._text(row, column)
        for key, column, is_embedding in (("reference", columns.reference, columns.reference_is_embedding),
                                          ("target", columns.target, columns.target_is_embedding)):
            if column is None:
                continue
            if is_embedding:
                decoded[key] = self._vector(row, column)
            else:
                decoded[key] = load_image(schema.get_field(row, column, default=None), name=column)
        return decoded

    def __call__(self, rows) -> dict:
        if rows and not isinstance(rows[0], Mapping):  # an Arrow-formatted stream
            rows = _rows_from_tables(rows)
        decoded, ids, skipped = [], [], []
        for row in rows:
            row_id = str(row.get(schema.ID, row.get("__key__", "")))
            try:
                decoded.append(self._decode(row))
                ids.append(row_id)
            except Exception as error:  # a bad row must never stop training
                skipped.append((row_id, f"{type(error).__name__}: {error}"))
        decoded, ids = self._preprocess(decoded, ids, skipped)
        batch: dict[str, Any] = {"ids": ids, "num_skipped": len(skipped), "skipped": skipped,
                                 "texts": [d["text"] for d in decoded]}
        for key in ("target_text", "reference_text", "reverse_text"):
            if decoded and key in decoded[0]:
                batch[key + "s"] = [d[key] for d in decoded]
        for key, is_embedding in (("reference", self.columns.reference_is_embedding),
                                  ("target", self.columns.target_is_embedding)):
            if not decoded or key not in decoded[0]:
                continue
            values = [d[key] for d in decoded]
            if is_embedding:
                batch[f"{key}_embeds"] = torch.from_numpy(np.stack(values))
            else:
                batch[f"{key}_pixel_values"] = torch.stack(values)
        return batch

    def _preprocess(self, decoded: list, ids: list, skipped: list) -> tuple[list, list]:
        """Pixel values of every decoded image, a batch per column (one by one when the batch call fails); a row whose
        image the processor refuses is dropped and counted."""
        failed: dict[int, Exception] = {}
        for key, column, is_embedding in (("reference", self.columns.reference, self.columns.reference_is_embedding),
                                          ("target", self.columns.target, self.columns.target_is_embedding)):
            if column is None or is_embedding or not decoded:
                continue
            images = [row[key] for row in decoded]
            try:
                values = list(pixel_values(self.image_processor, images))
            except Exception:
                values = []
                for image in images:
                    try:
                        values.append(pixel_values(self.image_processor, [image])[0])
                    except Exception as error:
                        values.append(error)
            for index, (row, value) in enumerate(zip(decoded, values)):
                if isinstance(value, Exception):
                    failed.setdefault(index, value)
                row[key] = value
        for index, error in failed.items():
            skipped.append((ids[index], f"preprocessing failed: {type(error).__name__}: {error}"))
        kept = [index for index in range(len(decoded)) if index not in failed]
        return [decoded[index] for index in kept], [ids[index] for index in kept]
