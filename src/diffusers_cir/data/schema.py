"""The SynthTriplets layout: column names, the features of its configurations, and column mappings.

Two configurations share one row identity (``id``):

* ``images``: ``reference_image``, ``target_image`` (image bytes), ``modification_text``,
  ``reference_caption``, ``target_caption``.
* ``embeddings``: the same rows with precomputed CLIP image embeddings ``reference_image_embeds`` and
  ``target_image_embeds`` (float32, fixed width) instead of the images.

Datasets in another layout (the WebDataset release, a CSV of your own) are read through a *column
mapping* ``{canonical name: source column}``. A source column may be a dotted path into a nested
field, as WebDataset tars store their JSON sidecar as one ``json`` column (``"json.edit"``); a column
whose own name contains a dot (``"src.jpg"``) is matched first.

Example:
    >>> from diffusers_cir.data.schema import get_field, resolve_column_mapping
    >>> mapping = resolve_column_mapping({"reference_image": "src.jpg", "modification_text": "json.edit"})
    >>> row = {"src.jpg": b"...", "json": {"edit": "make it red"}}
    >>> get_field(row, mapping["modification_text"])
    'make it red'
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

ID = "id"
REFERENCE_IMAGE = "reference_image"
TARGET_IMAGE = "target_image"
MODIFICATION_TEXT = "modification_text"
REFERENCE_CAPTION = "reference_caption"
TARGET_CAPTION = "target_caption"
REFERENCE_IMAGE_EMBEDS = "reference_image_embeds"
TARGET_IMAGE_EMBEDS = "target_image_embeds"
MASK = "mask"  # optional: a mask image (white = region to edit), resized to 64x64 for CompoDiff
# Optional, for CompoDiff's masked (inpainting) objective from embeddings: the target image's embedding with the
# mask's pixels blanked (written with the mask by examples/precompute_embeddings.py from masked images).
MASKED_TARGET_IMAGE_EMBEDS = "masked_target_image_embeds"
# Optional: the keyword pair of a keyword-based triplet (SynthTriplets18M), so training can draw a fresh instruction
# from the 47 templates and swap reference and target.
SOURCE_KEYWORD = "source_keyword"
TARGET_KEYWORD = "target_keyword"
OPTIONAL_COLUMNS = (MASK, MASKED_TARGET_IMAGE_EMBEDS, SOURCE_KEYWORD, TARGET_KEYWORD)

IMAGES_CONFIG = "images"
EMBEDDINGS_CONFIG = "embeddings"
SOURCES = (IMAGES_CONFIG, EMBEDDINGS_CONFIG)

IMAGES_COLUMNS = (ID, REFERENCE_IMAGE, TARGET_IMAGE, MODIFICATION_TEXT, REFERENCE_CAPTION, TARGET_CAPTION)
EMBEDDINGS_COLUMNS = (
    ID,
    REFERENCE_IMAGE_EMBEDS,
    TARGET_IMAGE_EMBEDS,
    MODIFICATION_TEXT,
    REFERENCE_CAPTION,
    TARGET_CAPTION,
)
CANONICAL_COLUMNS = tuple(dict.fromkeys(IMAGES_COLUMNS + EMBEDDINGS_COLUMNS + OPTIONAL_COLUMNS))

# Training stages (CompoDiff): "triplet" = (reference, modification text) -> target;
# "text_to_image" = stage 1, (no reference, target caption) -> target.
STAGES = ("triplet", "text_to_image")


class MissingColumnsError(KeyError):
    """A dataset lacks a column the requested use needs. The message lists expected and available names."""

    def __str__(self) -> str:  # KeyError would otherwise print the message with quotes
        return str(self.args[0])


def images_features():
    """``datasets.Features`` of the ``images`` configuration (images stored as bytes)."""
    from datasets import Features, Image, Value

    return Features(
        {
            ID: Value("string"),
            REFERENCE_IMAGE: Image(),
            TARGET_IMAGE: Image(),
            MODIFICATION_TEXT: Value("string"),
            REFERENCE_CAPTION: Value("string"),
            TARGET_CAPTION: Value("string"),
        }
    )


def embeddings_features(embedding_dim: int):
    """``datasets.Features`` of the ``embeddings`` configuration with ``embedding_dim``-wide float32 vectors."""
    from datasets import Features, List, Value

    if not isinstance(embedding_dim, int) or embedding_dim <= 0:
        raise ValueError(f"embedding_dim must be a positive int, got {embedding_dim!r}.")
    return Features(
        {
            ID: Value("string"),
            REFERENCE_IMAGE_EMBEDS: List(Value("float32"), length=embedding_dim),
            TARGET_IMAGE_EMBEDS: List(Value("float32"), length=embedding_dim),
            MODIFICATION_TEXT: Value("string"),
            REFERENCE_CAPTION: Value("string"),
            TARGET_CAPTION: Value("string"),
        }
    )


def required_columns(source: str, stage: str = "triplet") -> tuple[str, ...]:
    """Canonical columns a training stage reads from a ``source`` (``"images"`` or ``"embeddings"``)."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}.")
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}.")
    reference, target = (
        (REFERENCE_IMAGE, TARGET_IMAGE) if source == IMAGES_CONFIG else (REFERENCE_IMAGE_EMBEDS, TARGET_IMAGE_EMBEDS)
    )
    if stage == "text_to_image":
        return (target, TARGET_CAPTION)
    return (reference, target, MODIFICATION_TEXT)


def resolve_column_mapping(column_mapping: Mapping[str, str] | None = None) -> dict[str, str]:
    """Complete a partial ``{canonical: source}`` mapping with identity entries, rejecting unknown names."""
    column_mapping = dict(column_mapping or {})
    unknown = sorted(set(column_mapping) - set(CANONICAL_COLUMNS))
    if unknown:
        raise ValueError(
            f"column_mapping keys must be canonical column names {list(CANONICAL_COLUMNS)}; unknown: {unknown}. "
            "The mapping goes {canonical name: your column}, e.g. {'reference_image': 'src.jpg'}."
        )
    for key, value in column_mapping.items():
        if not isinstance(value, str) or not value:
            raise ValueError(f"column_mapping[{key!r}] must be a non-empty column name, got {value!r}.")
    return {name: column_mapping.get(name, name) for name in CANONICAL_COLUMNS}


_MISSING = object()


def get_field(row: Mapping[str, Any], path: str, default: Any = _MISSING) -> Any:
    """Value of ``path`` in ``row``: a column, or ``column.key[.key...]`` into nested dicts.

    A key that itself contains dots wins over a nested look-up (WebDataset columns are named like
    ``"src.jpg"``). Raises ``KeyError`` (or returns ``default``) when nothing matches.
    """
    if path in row:
        return row[path]
    head = path
    while "." in head:
        head, _, _ = head.rpartition(".")
        if head in row and isinstance(row[head], Mapping):
            return get_field(row[head], path[len(head) + 1 :], default)
    if default is _MISSING:
        raise KeyError(path)
    return default


def has_field(row_or_columns: Mapping[str, Any] | Iterable[str], path: str) -> bool:
    """Whether ``path`` exists: in a row (nested look-up), or among top-level column names.

    With column names only, a nested path counts as present when its top-level column exists (the
    nested key can only be checked on a row).
    """
    if isinstance(row_or_columns, Mapping):
        sentinel = object()
        return get_field(row_or_columns, path, default=sentinel) is not sentinel
    columns = set(row_or_columns)
    if path in columns:
        return True
    head = path
    while "." in head:
        head, _, _ = head.rpartition(".")
        if head in columns:
            return True
    return False


def check_columns(
    available: Mapping[str, Any] | Iterable[str],
    mapping: Mapping[str, str],
    needed: Iterable[str],
    where: str = "the dataset",
) -> None:
    """Fail fast when a needed canonical column has no source column, naming what was expected and found."""
    missing = [name for name in needed if not has_field(available, mapping.get(name, name))]
    if not missing:
        return
    names = sorted(available) if not isinstance(available, Mapping) else sorted(available.keys())
    looked_for = ", ".join(
        f"{name!r}" + (f" (mapped to {mapping[name]!r})" if mapping.get(name, name) != name else "") for name in missing
    )
    raise MissingColumnsError(
        f"{where} has no column for {looked_for}. Columns needed: {list(needed)}; columns found: {names}. "
        "Pass column_mapping={canonical name: your column} to read another layout, e.g. "
        "{'reference_image': 'src.jpg', 'modification_text': 'json.edit'}."
    )
