# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Stage 7: Parquet shards in the SynthTriplets layout, per-shard records of what happened, and the dataset card.

A run writes ``images/{split}-{i:05d}-of-{n:05d}.parquet``: the ``images`` configuration of
:mod:`diffusers_cir.data.schema` (so ``diffusers-cir data validate``, ``load_dataset(folder, streaming=True)`` and the
CompoDiff trainer read it) plus the generation's own columns (:data:`EXTRA_COLUMNS`: the mask, the keyword pair, the
reverse text, the method, the generator, the seed, the Prompt-to-Prompt shares and every CLIP score). Shard ``i``
holds the rows of a fixed range of items, whatever process wrote it, so the set of shards is known before the run
starts and a shard with no surviving row is an empty file, not a gap.

A shard is written under a temporary name and renamed when complete; then its record
``generation/{split}/shards/{i:05d}.json`` (counts per stage and filter, seconds) is written. A shard is done when
both exist; anything else is rewritten by a resumed run.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

from ..data import schema
from .records import Candidate

GENERATION_DIR = "generation"

EXTRA_COLUMNS = (
    "mask", "method", "generator", "seed", "source_keyword", "target_keyword", "template_index",
    "reverse_modification_text", "mask_term", "p2p_cross_replace", "p2p_self_replace",
    "clip_image_image", "clip_reference_caption", "clip_target_caption", "clip_directional", "clip_source_keyword",
    "clip_target_keyword", "clip_instruction",
)


def generated_features():
    """``datasets.Features`` of generated rows: the ``images`` configuration's columns, then :data:`EXTRA_COLUMNS`."""
    from datasets import Features, Image, Value

    features = dict(schema.images_features())
    features[schema.MASK] = Image()
    for name in ("method", "generator", "source_keyword", "target_keyword", "reverse_modification_text",
                 "mask_term"):
        features[name] = Value("string")
    features["seed"] = Value("int64")
    features["template_index"] = Value("int32")
    for name in ("p2p_cross_replace", "p2p_self_replace") + tuple(c for c in EXTRA_COLUMNS if c.startswith("clip_")):
        features[name] = Value("float32")
    return Features(features)


def encode_image(image, image_format: str) -> dict:
    """``{"bytes", "path"}`` of a PIL image encoded as ``image_format`` (JPEG quality 95, lossless WebP)."""
    buffer = io.BytesIO()
    options = {"jpeg": {"format": "JPEG", "quality": 95}, "png": {"format": "PNG"},
               "webp": {"format": "WEBP", "lossless": True}}[image_format]
    image.convert("RGB").save(buffer, **options)
    return {"bytes": buffer.getvalue(), "path": None}


def candidate_row(candidate: Candidate, image_format: str) -> dict[str, Any]:
    """The output row of a candidate that passed every filter."""
    from .masks import png_bytes

    row = {
        schema.ID: candidate.row_id,
        schema.REFERENCE_IMAGE: encode_image(candidate.reference_image, image_format),
        schema.TARGET_IMAGE: encode_image(candidate.target_image, image_format),
        schema.MODIFICATION_TEXT: candidate.modification_text,
        schema.REFERENCE_CAPTION: candidate.reference_caption,
        schema.TARGET_CAPTION: candidate.target_caption,
        schema.MASK: None if candidate.mask is None else {"bytes": png_bytes(candidate.mask), "path": None},
        "method": candidate.strategy,
        "generator": candidate.generator,
        "seed": candidate.seed,
        "source_keyword": candidate.source_keyword,
        "target_keyword": candidate.target_keyword,
        "template_index": candidate.template_index,
        "reverse_modification_text": candidate.reverse_modification_text,
        "mask_term": candidate.mask_term,
        "p2p_cross_replace": candidate.cross_replace,
        "p2p_self_replace": candidate.self_replace,
    }
    for name in ("image_image", "reference_caption", "target_caption", "directional", "source_keyword",
                 "target_keyword", "instruction"):
        row[f"clip_{name}"] = candidate.scores.get(name)
    return row


def shard_name(split: str, index: int, total: int) -> str:
    return f"{split}-{index:05d}-of-{total:05d}.parquet"


def shard_path(folder: str, split: str, index: int, total: int) -> str:
    return os.path.join(folder, schema.IMAGES_CONFIG, shard_name(split, index, total))


def run_dir(folder: str, split: str) -> str:
    """Where a run keeps its recipe, keyword vocabulary and shard records."""
    return os.path.join(folder, GENERATION_DIR, split)


def record_path(folder: str, split: str, index: int) -> str:
    return os.path.join(run_dir(folder, split), "shards", f"{index:05d}.json")


def write_json(path: str, value) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.partial"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(temporary, path)


def read_json(path: str):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def shard_done(folder: str, split: str, index: int, total: int) -> bool:
    return os.path.isfile(shard_path(folder, split, index, total)) and os.path.isfile(record_path(folder, split, index))


class ShardFile:
    """One shard, written a chunk of rows (one Parquet row group) at a time under a temporary name, renamed by
    :meth:`close`. Opening it removes what an interrupted write of the same shard left."""

    def __init__(self, folder: str, split: str, index: int, total: int, features):
        import pyarrow.parquet as pq

        self.final = shard_path(folder, split, index, total)
        self.temporary = os.path.join(os.path.dirname(self.final), f".{shard_name(split, index, total)}.partial")
        os.makedirs(os.path.dirname(self.final), exist_ok=True)
        for stale in (self.temporary, self.final, record_path(folder, split, index)):
            if os.path.exists(stale):
                os.remove(stale)
        self.schema = features.arrow_schema
        self.writer = pq.ParquetWriter(self.temporary, self.schema)
        self.num_rows = 0

    def write(self, rows: list[dict]) -> None:
        import pyarrow as pa

        if rows:
            self.writer.write_table(pa.Table.from_pylist(rows, schema=self.schema))
            self.num_rows += len(rows)

    def close(self) -> str:
        self.writer.close()
        os.replace(self.temporary, self.final)
        return self.final

    def abort(self) -> None:
        self.writer.close()
        if os.path.exists(self.temporary):
            os.remove(self.temporary)


# --------------------------------------------------------------------------------------------- counts
def add_counts(total: dict, part: dict) -> dict:
    """Sum nested count dicts (numbers add, dicts recurse)."""
    for key, value in part.items():
        if isinstance(value, dict):
            add_counts(total.setdefault(key, {}), value)
        elif isinstance(value, (int, float)):
            total[key] = total.get(key, 0) + value
    return total


_STAGE_ORDER = ("items", "empty_inputs", "caption_triplets", "pair_texts", "image_pairs", "filters",
                "best_per_triplet", "masks", "rows")


def format_counts(counts: dict) -> str:
    """The per-stage and per-filter counts as aligned text lines (what the command prints and the card shows)."""
    from .filters import FILTER_ORDER

    lines = []
    for strategy, stages in counts.items():
        lines.append(f"{strategy}:")
        for stage in _STAGE_ORDER:
            value = stages.get(stage)
            if value is None:
                continue
            if stage == "filters":
                for name in FILTER_ORDER:
                    if name in value:
                        numbers = value[name]
                        lines.append(f"  filter {name:<18} kept {numbers['kept']:>8,} of {numbers['in']:>8,}")
            elif isinstance(value, dict):
                lines.append(f"  {stage:<25} kept {value['kept']:>8,} of {value['in']:>8,}")
            else:
                lines.append(f"  {stage:<25} {value:>8,}")
    return "\n".join(lines)


def card_body(config_dict: dict, counts: dict, total_rows: int, split: str) -> str:
    """Prose of the dataset card of a generated folder: what was run, with which models and thresholds, and what
    every filter kept."""
    filters = config_dict["filters"]
    size = config_dict["masks"]["size"]
    models = config_dict.get("models") or {}
    model_lines = "\n".join(f"- {name}: `{value}`" for name, value in sorted(models.items())) or "- (not recorded)"
    threshold_lines = "\n".join(
        f"| {name} | {'off' if filters[name] is None else filters[name]} |"
        for name in ("image_caption", "image_image", "directional", "keyword_image", "instruction_image")
    )
    return f"""# Generated composed image retrieval triplets

{total_rows:,} triplets (reference image, modification text, target image) in the `{split}` split, written by
`diffusers-cir generate` (strategies: {", ".join(config_dict["strategies"])}) in the SynthTriplets layout: the
`images` configuration's columns plus the generation's own (`mask`, `source_keyword` / `target_keyword`,
`reverse_modification_text`, `method`, `generator`, `seed`, `clip_*` scores). The whole recipe is in the YAML header
(`generation:`) and in `generation/{split}/config.json`.

```python
from datasets import load_dataset

triplets = load_dataset("path/to/this/folder", "images", split="{split}", streaming=True)
```

## Recipe

Caption triplets come from keyword replacement (CLIP text similarity in
{config_dict["keyword"]["similarity_band"]}, one of the 47 CompoDiff templates) and/or a causal language model;
their images from Stable Diffusion with Prompt-to-Prompt ({config_dict["image"]["num_seeds"]} seed(s) per triplet,
cross-attention shared for {config_dict["image"]["cross_replace"]} of {config_dict["image"]["num_inference_steps"]}
steps, self-attention for a share drawn in {config_dict["image"]["self_replace_range"]}). Given image pairs get
MTST-style texts (a VLM over both images, and the reverse text) or FACap-style texts (VLM descriptions, then an LLM).
Masks are ClipSeg maps of the changed term on the target image, {size}x{size}.

Models:

{model_lines}

CLIP filter thresholds (NSFW filter: {"on" if filters["nsfw"] else "off"}):

| filter | threshold |
| --- | --- |
{threshold_lines}

## Counts per stage and filter

```
{format_counts(counts)}
```
"""
