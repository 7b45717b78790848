# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""ClipSeg masks computed once into an existing dataset, for CompoDiff's masked (inpainting) objective.

``diffusers-cir generate`` writes masks with its triplets (:mod:`.masks`). Other data (LAION-style image-caption
pairs, triplets from elsewhere) gets them here, once, instead of at every training step: each ``images`` shard is
rewritten with a ``mask`` column (64x64 PNG, white = the term's region; null where the row has no term) and a
``mask_term`` column (what was segmented). ``examples/precompute_masks.py`` runs it over accelerate processes;
``examples/precompute_embeddings.py`` afterwards carries the masks into the ``embeddings`` configuration with the
embedding of each masked target (``masked_target_image_embeds``), so training can use them without images.

What is segmented, per row (the first that exists):

1. a stored ``mask_term``;
2. the target keyword of a keyword triplet;
3. the words the target caption adds to the reference caption (:func:`.masks.changed_words`);
4. an object term of the target caption from the part-of-speech tagger (the paper: "We extract object terms from the
   given caption using a POS tagger, and we generate a segmentation map for each object term using ClipSeg"). The
   paper does not say which map a row trains with; here one of the row's terms is chosen by a hash of its id (our
   choice: one object per row keeps the blanked region an object, as in the generated triplets).

The ClipSeg call itself is :func:`.masks.clipseg_masks` (sigmoid probabilities, resized to 64x64, thresholded), the
same as the generator's.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..data import schema

__all__ = ["MaskSummary", "precompute_masks", "row_mask_term"]

MASK_TERM = "mask_term"


def row_mask_term(row: Mapping[str, Any], tagger=None) -> str | None:
    """What to segment in the row's target image (see the module docstring), or ``None``."""
    from .keyword_triplets import object_terms
    from .masks import changed_words

    for column in (MASK_TERM, schema.TARGET_KEYWORD):
        value = row.get(column)
        if isinstance(value, str) and value.strip():
            return value.strip()
    reference, target = row.get(schema.REFERENCE_CAPTION), row.get(schema.TARGET_CAPTION)
    if isinstance(reference, str) and isinstance(target, str) and reference.strip():
        changed = changed_words(reference, target)
        if changed:
            return changed
    if tagger is None or not isinstance(target, str) or not target.strip():
        return None
    terms = sorted({term for term, _, _ in object_terms(tagger.tag(target))})
    if not terms:
        return None
    return terms[zlib.crc32(str(row.get(schema.ID, "")).encode("utf-8")) % len(terms)]


@dataclass
class MaskSummary:
    """What :func:`precompute_masks` did on this process."""

    shards_done: list[str] = field(default_factory=list)
    shards_skipped: list[str] = field(default_factory=list)  # had masks already
    num_rows: int = 0
    num_masks: int = 0  # rows that got a mask (the others have no term, or an undecodable image)
    skipped_rows: list[tuple[str, str]] = field(default_factory=list)

    def format(self) -> str:
        return (f"{self.num_masks} masks for {self.num_rows} rows in {len(self.shards_done)} shard(s); "
                f"{len(self.shards_skipped)} shard(s) had masks; {len(self.skipped_rows)} row(s) without an image")


def _shard_masks(table, model, processor, tagger, size, threshold, batch_size, summary) -> tuple[list, list]:
    """``(masks, terms)`` of one shard's rows: ``{"bytes", "path"}`` PNG dicts (or None) and the segmented terms."""
    from ..retrieval.images import load_image
    from .masks import clipseg_masks, png_bytes

    rows = table.to_pylist()
    terms = [row_mask_term(row, tagger) for row in rows]
    todo, images = [], []
    for index, (row, term) in enumerate(zip(rows, terms)):
        if term is None:
            continue
        try:
            images.append(load_image(row[schema.TARGET_IMAGE], name=schema.TARGET_IMAGE))
            todo.append(index)
        except Exception as error:  # reported, never fatal
            summary.skipped_rows.append((str(row.get(schema.ID)), f"{type(error).__name__}: {error}"))
            terms[index] = None
    masks = [None] * len(rows)
    for index, mask in zip(todo, clipseg_masks(model, processor, images, [terms[i] for i in todo], size, threshold,
                                                batch_size)):
        masks[index] = {"bytes": png_bytes(mask), "path": None}
    summary.num_rows += len(rows)
    summary.num_masks += len(todo)
    return masks, terms


def precompute_masks(
    folder: str,
    model,
    processor,
    tagger=None,
    splits: list[str] | None = None,
    size: int = 64,
    threshold: float = 0.5,
    batch_size: int = 16,
    rank: int = 0,
    world_size: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> MaskSummary:
    """Add ClipSeg ``mask`` and ``mask_term`` columns to this rank's ``images`` shards (every split by default: the
    card holds one set of features per configuration). A shard is rewritten atomically; one that has a ``mask``
    column already is kept unless ``overwrite``, so an interrupted run resumes where it stopped.

    Args:
        model, processor: ``transformers.CLIPSegForImageSegmentation`` and ``CLIPSegProcessor``.
        tagger: part-of-speech tagger for rows whose only text is a caption (``.keyword_triplets.load_tagger``);
            ``None`` leaves those rows without a mask.
    """
    import pyarrow.parquet as pq
    from datasets import Features, Image, Value
    from tqdm.auto import tqdm

    from ..data.shards import check_shard_set, shard_files

    splits = splits or _splits(folder)
    files = [path for split in splits for path in check_shard_set(shard_files(folder, schema.IMAGES_CONFIG, split))]
    if not files:
        raise FileNotFoundError(f"No images shards in {folder}/{schema.IMAGES_CONFIG}/ for the splits {splits}.")
    summary = MaskSummary()
    for path in tqdm(files[rank::world_size], desc=f"masks (rank {rank})", unit="shard", disable=not progress):
        table = pq.read_table(path)
        if schema.MASK in table.column_names and not overwrite:
            summary.shards_skipped.append(path)
            continue
        masks, terms = _shard_masks(table, model, processor, tagger, size, threshold, batch_size, summary)
        stored = Features.from_arrow_schema(table.schema)
        columns = {name: table.column(name) for name in table.column_names if name not in (schema.MASK, MASK_TERM)}
        columns.update({schema.MASK: masks, MASK_TERM: terms})
        features = Features({name: stored[name] for name in columns if name in stored and name not in (
            schema.MASK, MASK_TERM)} | {schema.MASK: Image(), MASK_TERM: Value("string")})
        _write_atomically(path, columns, features)
        summary.shards_done.append(path)
    return summary


def record_masks_card(folder: str) -> str:
    """Record the ``images`` configuration's features with the mask columns in the dataset card (main process,
    after every rank has finished)."""
    import pyarrow.parquet as pq
    from datasets import Features

    from ..data.card import read_card_infos, update_dataset_card
    from ..data.shards import shard_files

    splits = _splits(folder)
    first = shard_files(folder, schema.IMAGES_CONFIG, splits[0])[0]
    features = Features.from_arrow_schema(pq.read_schema(first))
    infos = read_card_infos(folder).get(schema.IMAGES_CONFIG)
    sizes = {name: info.num_examples for name, info in infos.splits.items()} if infos and infos.splits else {
        split: sum(pq.ParquetFile(path).metadata.num_rows for path in shard_files(folder, schema.IMAGES_CONFIG, split))
        for split in splits}
    return update_dataset_card(folder, schema.IMAGES_CONFIG, features, sizes)


def _splits(folder: str) -> list[str]:
    directory = os.path.join(folder, schema.IMAGES_CONFIG)
    names = sorted({name.split("-")[0] for name in os.listdir(directory) if name.endswith(".parquet")}) if (
        os.path.isdir(directory)) else []
    if not names:
        raise FileNotFoundError(f"No images shards in {directory}.")
    return names


def _write_atomically(path: str, columns: dict, features) -> None:
    """Write ``columns`` with ``features`` (datasets' schema metadata included) over ``path``, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {name: column if isinstance(column, (pa.Array, pa.ChunkedArray)) else pa.array(
        column, type=features.arrow_schema.field(name).type) for name, column in columns.items()}
    table = pa.table(arrays).cast(features.arrow_schema)
    partial = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial")
    pq.write_table(table, partial)
    os.replace(partial, path)
