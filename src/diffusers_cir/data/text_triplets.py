# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""The text-triplet layout: SCOT's training data (Jawade et al., WACV 2025).

SCOT needs no target images. An LLM reads an image's caption and writes a modification and the caption the modified
image would have (about 290K such triplets from COCO-style captions in the paper); the composition network learns to
map (image, modification) to the text embedding of the modified caption, the original caption being a negative.

One row per triplet:

=================== ==================================================================================
``id``              a unique string
``image``           the captioned image (image bytes), in the ``text_triplets`` configuration, or
``image_embeds``    its image-tower embedding (float32, fixed width), in ``text_triplet_embeddings``
``caption``         the image's caption
``modification_text`` what to change ("make the bus red")
``modified_caption``  the caption after the change ("a red bus parked on the street")
=================== ==================================================================================

:func:`text_triplet_problem` is the rule a row must pass (three non-empty texts; a modified caption that differs from
the caption); :func:`validate_text_triplets` runs :func:`~diffusers_cir.data.shards.validate_dataset` plus that rule
over a folder (``diffusers-cir data validate`` does so for folders with these configurations). A SynthTriplets folder
serves too, through a column mapping: ``image``/``image_embeds`` from the reference, ``caption`` from
``reference_caption``, ``modified_caption`` from ``target_caption`` (:data:`SYNTHTRIPLETS_COLUMNS`).

Example:
    >>> text_triplet_problem({"caption": "a bus", "modification_text": "make it red", "modified_caption": "a red bus"})
    >>> text_triplet_problem({"caption": "a bus", "modification_text": "keep it", "modified_caption": " A bus "})
    'modified_caption is the caption itself (a modification that changes nothing)'
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "CAPTION",
    "IMAGE",
    "IMAGE_EMBEDS",
    "MODIFICATION_TEXT",
    "MODIFIED_CAPTION",
    "SYNTHTRIPLETS_COLUMNS",
    "TEXT_TRIPLETS_CONFIG",
    "TEXT_TRIPLET_CONFIGS",
    "TEXT_TRIPLET_EMBEDDINGS_CONFIG",
    "text_triplet_features",
    "text_triplet_problem",
    "validate_text_triplets",
    "write_text_triplets",
]

ID = "id"
IMAGE = "image"
IMAGE_EMBEDS = "image_embeds"
CAPTION = "caption"
MODIFICATION_TEXT = "modification_text"
MODIFIED_CAPTION = "modified_caption"
TEXTS = (CAPTION, MODIFICATION_TEXT, MODIFIED_CAPTION)

TEXT_TRIPLETS_CONFIG = "text_triplets"
TEXT_TRIPLET_EMBEDDINGS_CONFIG = "text_triplet_embeddings"
TEXT_TRIPLET_CONFIGS = {TEXT_TRIPLETS_CONFIG: (ID, IMAGE) + TEXTS, TEXT_TRIPLET_EMBEDDINGS_CONFIG: (ID, IMAGE_EMBEDS) + TEXTS}

# How a SynthTriplets folder's columns serve as text triplets (the reference's caption and the target's).
SYNTHTRIPLETS_COLUMNS = {IMAGE: "reference_image", IMAGE_EMBEDS: "reference_image_embeds", CAPTION: "reference_caption",
                         MODIFIED_CAPTION: "target_caption"}


def text_triplet_features(embedding_dim: int | None = None):
    """``datasets.Features`` of ``text_triplets`` (``embedding_dim=None``: images) or ``text_triplet_embeddings``."""
    from datasets import Features, Image, List, Value

    if embedding_dim is None:
        reference = {IMAGE: Image()}
    elif isinstance(embedding_dim, int) and not isinstance(embedding_dim, bool) and embedding_dim > 0:
        reference = {IMAGE_EMBEDS: List(Value("float32"), length=embedding_dim)}
    else:
        raise ValueError(f"`embedding_dim` must be a positive int or None (images), got {embedding_dim!r}.")
    return Features({ID: Value("string"), **reference, **{name: Value("string") for name in TEXTS}})


def _normalized(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".")


def text_triplet_problem(row: Mapping[str, Any], columns: Mapping[str, str] | None = None) -> str | None:
    """Why ``row`` cannot train SCOT's objective, or ``None``: each text must be a non-empty string, and the modified
    caption must differ from the caption (up to case, spacing and a final period): a modification that changes
    nothing would teach the network to return the image's own caption. ``columns`` maps a name to the row's column."""
    columns = columns or {}
    texts = {}
    for name in TEXTS:
        value = row.get(columns.get(name, name))
        if not isinstance(value, str) or not value.strip():
            return f"{name} is empty or not a string ({type(value).__name__})"
        texts[name] = value
    if _normalized(texts[MODIFIED_CAPTION]) == _normalized(texts[CAPTION]):
        return "modified_caption is the caption itself (a modification that changes nothing)"
    return None


def write_text_triplets(
    folder: str | os.PathLike,
    columns: Mapping[str, Any],
    split: str = "train",
    rows_per_shard: int = 10_000,
    overwrite: bool = False,
) -> int:
    """Write text triplets (``id``, ``image`` or ``image_embeds``, ``caption``, ``modification_text``,
    ``modified_caption`` as columns) as Parquet shards with their dataset card; returns the rows written. Rows that fail
    :func:`text_triplet_problem` are refused before anything is written, named by id."""
    import numpy as np

    from .card import update_dataset_card
    from .shards import ParquetShardWriter

    if IMAGE_EMBEDS in columns:
        embeds = np.asarray(columns[IMAGE_EMBEDS], dtype=np.float32)
        if embeds.ndim != 2:
            raise ValueError(f"`{IMAGE_EMBEDS}` must be one vector per row, got shape {embeds.shape}.")
        config, features, embedding_dim = TEXT_TRIPLET_EMBEDDINGS_CONFIG, text_triplet_features(embeds.shape[1]), embeds.shape[1]
        columns = {**columns, IMAGE_EMBEDS: embeds}
    elif IMAGE in columns:
        config, features, embedding_dim = TEXT_TRIPLETS_CONFIG, text_triplet_features(None), None
    else:
        raise ValueError(f"Text triplets need an `{IMAGE}` or an `{IMAGE_EMBEDS}` column, got {sorted(columns)}.")
    missing = [name for name in features if name not in columns]
    if missing:
        raise ValueError(f"Text triplets need the columns {list(features)}; missing {missing}.")
    count = len(columns[ID])
    for row in range(count):
        problem = text_triplet_problem({name: columns[name][row] for name in TEXTS})
        if problem:
            raise ValueError(f"Text triplet {columns[ID][row]!r} (row {row}): {problem}.")
    with ParquetShardWriter(str(folder), config, split, features, rows_per_shard, overwrite=overwrite) as writer:
        for start in range(0, count, 4096):
            writer.add_batch({name: columns[name][start : start + 4096] for name in features})
    update_dataset_card(
        str(folder), config, features, {split: count}, default=True,
        body="# Text triplets\n\nSCOT's layout (see `diffusers_cir.data.text_triplets`): an image (or its embedding), its "
        f"caption, a modification text and the modified caption.{'' if embedding_dim is None else f' Embeddings of width {embedding_dim}.'}\n",
    )
    return count


def validate_text_triplets(folder: str, configs: Iterable[str] | None = None, check_images: bool = True,
                           max_listed: int = 5, progress: bool = True):
    """:func:`~diffusers_cir.data.shards.validate_dataset`, plus :func:`text_triplet_problem` on every row of the
    text-triplet configurations (a problem per configuration and split, naming the first rows and their reason)."""
    import pyarrow.parquet as pq

    from .card import read_card_configs
    from .shards import shard_files, validate_dataset

    report = validate_dataset(folder, configs=configs, check_images=check_images, max_listed=max_listed, progress=progress)
    card_configs = read_card_configs(folder)
    for config in [name for name in (configs or card_configs) if name in TEXT_TRIPLET_CONFIGS and name in card_configs]:
        for entry in card_configs[config].get("data_files", []):
            split = entry["split"] if isinstance(entry, dict) else "train"
            failures = []
            for path in shard_files(folder, config, split):
                names = pq.ParquetFile(path).schema_arrow.names
                missing = [name for name in TEXT_TRIPLET_CONFIGS[config] if name not in names]
                if missing:
                    report.problems.append(f"{config}/{split}: {path} lacks the columns {missing} (has {names})")
                    break
                for row in pq.ParquetFile(path).read(columns=[ID, *TEXTS]).to_pylist():
                    problem = text_triplet_problem(row)
                    if problem:
                        failures.append(f"{row.get(ID)!r} ({problem})")
            if failures:
                shown = ", ".join(failures[:max_listed]) + (" ..." if len(failures) > max_listed else "")
                report.problems.append(f"{config}/{split}: {len(failures)} row(s) are not text triplets: {shown}")
    return report
