"""Streaming input pipeline for CIR training: load, shard, shuffle, decode, preprocess, tokenise, collate.

The pipeline is ``datasets`` streaming plus ``torchdata``'s ``StatefulDataLoader``::

    load_dataset(..., streaming=True)      # Parquet shards, WebDataset tars, or any `datasets` format
      -> column mapping check (fail fast)  # a missing column names what was expected and what exists
      -> split_dataset_by_node(rank)       # per-rank sharding (accelerate / torchrun)
      -> shard order shuffle + set_epoch  # reseeded every epoch
      -> BlockShuffledStream               # rows mixed in blocks, exactly resumable
      -> StatefulDataLoader(num_workers)   # worker sharding: each worker reads whole shards
      -> TripletCollator                   # decode + CLIP preprocessing + tokenisation, in the workers;
                                           # corrupt rows are dropped from the batch, counted, reported

Batches (a ``dict``), ``B`` rows that decoded:

* ``input_ids`` ``[B, 77]``: the modification text, or the target caption for text-to-image rows;
* ``reference_image_embeds`` / ``target_image_embeds`` ``[B, D]`` (embeddings source), or
  ``reference_pixel_values`` / ``target_pixel_values`` ``[B, 3, 224, 224]`` (images source);
  text-to-image (stage-1) rows have an all-zero reference (embeddings *and* pixels: zero the encoded
  reference embedding of those rows yourself, a CLIP encoding of black pixels is not zero);
* ``is_text_to_image`` ``[B]`` bool; ``mask`` ``[B, 64, 64]`` when asked for (zeros unless the data has
  a ``mask`` column); ``ids`` and ``texts`` (lists); ``num_skipped`` and ``skipped`` (``(id, reason)``
  of the rows dropped from this batch). A batch may be smaller than ``batch_size`` (or even empty)
  when rows were dropped.

Shuffling and resume: the shard order is shuffled per epoch by ``datasets``; rows are mixed inside
consecutive blocks of ``shuffle_buffer_size`` rows by :class:`BlockShuffledStream`. A
:class:`TripletDataLoader` checkpoint holds each worker's position (``datasets``' per-shard position at
the start of the current block, plus the rows of the block already yielded) and its own counters, so
resuming is **exact**: the remaining batches are the ones an uninterrupted run would have produced, in
the same order, nothing lost and nothing repeated (tested with 2 workers). Resuming re-reads at most one
block per worker; a WebDataset tar is re-read from its start up to the saved position (slower, not lossy).

What a classic shuffle buffer would lose: ``datasets``' own ``shuffle(buffer_size=B)`` does not save its
buffer, so a resumed run loses the up-to-``B`` rows per worker that sat in it (they return next epoch)
and, reading Parquet, can repeat a few rows (we measured 4 repeats and 10 losses resuming a 120-row
epoch with ``B=20``); its multi-shard interleaving also cannot resume inside DataLoader workers in
datasets 5.2. The price of the block shuffle is locality: rows are mixed within ``B`` consecutive rows of
one shard, so write shards in random order (``diffusers-cir data reshard --shuffle-seed 0``) for the best mix.

Example:
    >>> from diffusers_cir.data.streaming import build_triplet_dataloader, load_triplet_stream
    >>> stream = load_triplet_stream("my_dataset", "embeddings", split="train")  # doctest: +SKIP
    >>> loader = build_triplet_dataloader(stream, batch_size=256, num_workers=2)  # doctest: +SKIP
    >>> for epoch in range(2):  # doctest: +SKIP
    ...     loader.set_epoch(epoch)
    ...     for batch in loader:
    ...         batch["target_image_embeds"].shape  # [<=256, 768]
"""

from __future__ import annotations

import copy
import glob
import logging
import os
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..checks import check_int, check_non_negative_int, check_positive_int
from ..retrieval.images import load_image, pixel_values
from . import schema

logger = logging.getLogger(__name__)


class _DropBufferResumeWarning(logging.Filter):
    # We shuffle with datasets' buffer of size 1 (shard order only) and resume exactly, so its warning that
    # "the shuffle buffer will be refilled" is true of an empty buffer and would only alarm users.
    def filter(self, record: logging.LogRecord) -> bool:
        return "shuffle buffer of a dataset without the buffer content" not in record.getMessage()


logging.getLogger("datasets.iterable_dataset").addFilter(_DropBufferResumeWarning())


@dataclass
class TripletStream:
    """A streaming ``datasets.IterableDataset`` plus how to read it (returned by :func:`load_triplet_stream`)."""

    dataset: Any  # datasets.IterableDataset
    source: str  # "images" or "embeddings"
    column_mapping: dict[str, str]
    stage: str = "triplet"
    origin: str | None = None  # what was opened (folder, Hub id, data files), to name it when reading fails

    @property
    def num_shards(self) -> int:
        return self.dataset.num_shards


def _top_level(path: str, columns: Sequence[str]) -> str | None:
    """The top-level column that holds ``path`` (itself, or the prefix of a dotted nested path)."""
    if path in columns:
        return path
    head = path
    while "." in head:
        head = head.rpartition(".")[0]
        if head in columns:
            return head
    return None


def infer_source(columns: Sequence[str], column_mapping: Mapping[str, str]) -> str:
    """``"embeddings"`` if the (mapped) embedding columns exist, else ``"images"`` if the image columns do."""
    if schema.has_field(columns, column_mapping[schema.TARGET_IMAGE_EMBEDS]):
        return schema.EMBEDDINGS_CONFIG
    if schema.has_field(columns, column_mapping[schema.TARGET_IMAGE]):
        return schema.IMAGES_CONFIG
    raise schema.MissingColumnsError(
        f"Cannot tell whether this dataset holds images or embeddings: it has neither "
        f"{column_mapping[schema.TARGET_IMAGE_EMBEDS]!r} nor {column_mapping[schema.TARGET_IMAGE]!r}. "
        f"Columns found: {sorted(columns)}. Pass column_mapping (e.g. {{'target_image': 'tgt.jpg'}}) or source=."
    )


def _check_local_shards(folder: str, name: str | None, split: str) -> None:
    """For a local dataset folder, refuse a split whose ``-of-N`` shard set is incomplete (streaming would read the
    remaining shards and silently leave the missing ones' rows out), or one of whose Parquet shards is unreadable or
    holds other columns (named by file, here, rather than by a pyarrow error in a DataLoader worker)."""
    from .card import read_card_configs
    from .shards import check_parquet_files, check_shard_set

    configs = read_card_configs(folder)
    if name is None:
        defaults = [config for config, entry in configs.items() if entry.get("default")]
        name = defaults[0] if defaults else (next(iter(configs)) if len(configs) == 1 else None)
    entries = configs.get(name, {}).get("data_files", []) if name is not None else []
    for entry in entries:
        if isinstance(entry, Mapping) and entry.get("split", "train") == split:
            patterns = entry.get("path", [])
            files = []
            for pattern in [patterns] if isinstance(patterns, str) else patterns:
                files += check_shard_set(sorted(glob.glob(os.path.join(folder, pattern))))
            _check_inside(folder, files)
            check_parquet_files([path for path in files if path.endswith(".parquet")])


def _check_inside(folder: str, files: list[str]) -> None:
    """The card's patterns are confined (``read_card_configs``); a link among the shards may still lead out."""
    root = os.path.realpath(folder)
    for path in files:
        if os.path.commonpath([root, os.path.realpath(path)]) != root:
            raise ValueError(
                f"Shard {path} is a link to {os.path.realpath(path)}, outside the dataset folder {folder}: a dataset "
                "reads only its own files. Copy the shard into the folder instead of linking it."
            )


def _check_local_data_files(data_files: Any) -> None:
    """The local Parquet files among ``data_files`` (paths or globs; a list, or a dict of them per split), checked as
    :func:`_check_local_shards` checks a folder's."""
    from .shards import check_parquet_files

    entries = data_files.values() if isinstance(data_files, Mapping) else [data_files]
    patterns = [item for entry in entries for item in ([entry] if isinstance(entry, (str, os.PathLike)) else entry or [])]
    files = sorted({path for pattern in patterns for path in glob.glob(os.fspath(pattern)) if path.endswith(".parquet")})
    check_parquet_files(files)


def load_triplet_stream(
    path: str,
    name: str | None = None,
    split: str = "train",
    *,
    data_files: Any = None,
    column_mapping: Mapping[str, str] | None = None,
    source: str | None = None,
    stage: str = "triplet",
    dataset: Any = None,
    **load_dataset_kwargs,
) -> TripletStream:
    """Open a triplet dataset for streaming and check, before any training step, that it has what we need.

    Args:
        path, name, split, data_files: as for ``datasets.load_dataset`` (``streaming=True`` is implied).
            A folder with the SynthTriplets card, ``"webdataset"`` with ``data_files=`` tar paths, a Hub id...
        column_mapping: ``{canonical name: your column}`` for other layouts, e.g. the WebDataset release:
            ``{"reference_image": "src.jpg", "target_image": "tgt.jpg", "modification_text": "json.edit",
            "id": "__key__"}`` (dotted paths reach into nested fields).
        source: ``"images"`` or ``"embeddings"``; inferred from the columns when omitted.
        stage: ``"triplet"`` (reference + modification text -> target) or ``"text_to_image"``
            (target caption -> target, CompoDiff stage 1).
        dataset: an already opened ``datasets.IterableDataset`` to use instead of calling ``load_dataset``.

    Raises:
        MissingColumnsError: a needed column is absent (the message lists expected and found names).
        FileNotFoundError: a local folder's split lacks shards of its ``{split}-{i}-of-{n}.parquet`` set.
        ValueError: a local Parquet shard is unreadable or holds other columns than the others (named by file).
    """
    import datasets

    mapping = schema.resolve_column_mapping(column_mapping)
    if dataset is None and data_files is None and isinstance(path, (str, os.PathLike)) and os.path.isdir(path):
        _check_local_shards(os.fspath(path), name, split)
    elif dataset is None and data_files is not None:
        _check_local_data_files(data_files)
    if dataset is None:
        dataset = datasets.load_dataset(
            path, name, split=split, data_files=data_files, streaming=True, **load_dataset_kwargs
        )
    if not isinstance(dataset, datasets.IterableDataset):
        raise TypeError(
            f"Expected a streaming datasets.IterableDataset, got {type(dataset).__name__}; "
            "use load_dataset(..., streaming=True) or Dataset.to_iterable_dataset(num_shards=...)."
        )
    features = dataset.features
    if features is None:  # formats without declared features: look at the first row
        first = next(iter(dataset))
        columns: Sequence[str] = list(first)
    else:
        columns = list(features)
    if source is None:
        source = name if name in schema.SOURCES else infer_source(columns, mapping)
    needed = schema.required_columns(source, stage)
    schema.check_columns(columns, mapping, needed, where=f"{path!r} ({name or 'default'}/{split})")

    # Keep only the columns we read: Parquet streams then skip the others entirely.
    wanted = set(needed) | {schema.ID, schema.MODIFICATION_TEXT, schema.REFERENCE_CAPTION, schema.TARGET_CAPTION,
                            *schema.OPTIONAL_COLUMNS}
    if source == schema.IMAGES_CONFIG:
        wanted |= {schema.REFERENCE_IMAGE, schema.TARGET_IMAGE}
    else:
        wanted |= {schema.REFERENCE_IMAGE_EMBEDS, schema.TARGET_IMAGE_EMBEDS}
    keep = {_top_level(mapping[name_], columns) for name_ in wanted} | ({"__key__"} & set(columns))
    keep.discard(None)
    if features is not None and keep != set(columns):
        dataset = dataset.select_columns([c for c in columns if c in keep])
    # We decode images ourselves so that a corrupt one is skipped and counted instead of crashing a worker.
    if features is not None:
        for column in list(dataset.features or {}):
            if isinstance(dataset.features[column], datasets.Image) and dataset.features[column].decode:
                dataset = dataset.cast_column(column, datasets.Image(decode=False))
    if source == schema.EMBEDDINGS_CONFIG and features is not None and all(mapping[n] in columns for n in needed):
        # Rows as 1-row Arrow tables: the collator turns a whole batch of vectors into one numpy array, which
        # streams embeddings about 3x faster than datasets' per-row Python lists of floats.
        dataset = dataset.with_format("arrow")
    origin = os.fspath(path) if isinstance(path, (str, os.PathLike)) and data_files is None else str(data_files or path)
    return TripletStream(dataset=dataset, source=source, column_mapping=mapping, stage=stage, origin=origin)


def _rows_from_tables(tables: Sequence[Any]) -> list[dict]:
    """Row dicts from 1-row Arrow tables; float vector columns become numpy rows of one batch-wide array."""
    import pyarrow as pa

    table = pa.concat_tables(tables)
    columns = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if (
            pa.types.is_fixed_size_list(column.type)
            and pa.types.is_floating(column.type.value_type)
            and column.null_count == 0
            and column.flatten().null_count == 0
        ):
            columns[name] = list(column.flatten().to_numpy().reshape(len(column), column.type.list_size))
        else:
            columns[name] = column.to_pylist()
    names = list(columns)
    return [dict(zip(names, values)) for values in zip(*columns.values())]


# --------------------------------------------------------------------------------------------- decoding
def decode_mask(value: Any, size: int) -> np.ndarray:
    """A ``[size, size]`` float32 {0, 1} mask from a mask image (white = 1) or an array."""
    from PIL import Image

    if isinstance(value, (np.ndarray, list)) or hasattr(value, "numpy"):
        array = np.asarray(value, dtype=np.float32)
        if array.ndim != 2:
            raise ValueError(f"mask array must be 2-D, got shape {array.shape}")
        image = Image.fromarray((array > 0.5).astype(np.uint8) * 255)
    else:
        image = load_image(value, "L", name=schema.MASK)
    image = image.resize((size, size), Image.NEAREST)
    return (np.asarray(image, dtype=np.float32) > 127).astype(np.float32)


def _embedding(value: Any, name: str, dim: int | None) -> np.ndarray:
    if value is None:
        raise ValueError(f"{name} is missing (None)")
    vector = np.asarray(value, dtype=np.float32)
    if vector.ndim != 1 or vector.size == 0:
        raise ValueError(f"{name} must be a 1-D vector, got shape {vector.shape}")
    if dim is not None and vector.shape[0] != dim:
        raise ValueError(f"{name} has width {vector.shape[0]}, expected {dim}")
    if not np.isfinite(vector).all():
        raise ValueError(f"{name} has non-finite values")
    return vector


def _fixed_length_backend(tokenizer, max_length: int):
    """The ``tokenizers`` backend of a fast tokenizer, set to truncate and pad to ``max_length``, or None.

    Calling the Rust backend directly is about 3x faster than transformers' ``__call__`` on short texts. Only
    used when it reproduces ``tokenizer(texts, padding="max_length", truncation=True)`` on probe texts (special
    tokens, case, spacing, accents, and a text longer than ``max_length``); otherwise the slow path stays.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or tokenizer.pad_token_id is None:
        return None
    backend = copy.deepcopy(backend)
    backend.enable_truncation(max_length=max_length)
    backend.enable_padding(length=max_length, pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token)
    probes = ["make it red", "  Replace the CUP with a Vase!  ", "café crème, naïve", "$ in the style of $",
              " ".join(["a very long modification text"] * 30), ""]
    expected = tokenizer(probes, padding="max_length", max_length=max_length, truncation=True)["input_ids"]
    if [encoding.ids for encoding in backend.encode_batch(probes)] != expected:
        return None
    return backend


class TripletCollator:
    """Turn raw rows into training tensors; rows that fail to decode are dropped and reported.

    Args:
        source: ``"images"`` or ``"embeddings"``.
        tokenizer: a CLIP tokenizer (default: the real OpenAI CLIP tokenizer, built offline), or a T5 tokenizer.
        image_processor: called as ``image_processor(images=[PIL...], return_tensors="pt")`` (default:
            ``transformers.CLIPImageProcessor()``, OpenAI CLIP's 224 px resize/crop/normalise).
        column_mapping: ``{canonical name: column}`` (see :mod:`diffusers_cir.data.schema`).
        stage: ``"triplet"`` or ``"text_to_image"`` (every row becomes caption -> target).
        text_to_image_probability: in ``"triplet"`` stage, the share of rows turned into text-to-image
            rows (target caption, zero reference), as CompoDiff mixes both in its later stages. The choice
            is a hash of ``(seed, id)``: deterministic, so a resumed run makes the same choices.
        embedding_dim: expected embedding width (checked per row; inferred from the first row if None).
        return_mask, mask_size: add ``mask`` ``[B, mask_size, mask_size]`` (and, from embeddings,
            ``masked_target_image_embeds`` ``[B, D]``: zeros where the data has none).
        max_length: token length (77 for CLIP).
        tokenizer_2, max_length_2: a second tokenizer (T5 next to CLIP): adds ``input_ids_2``.
        keyword_templates: templates with ``${source}`` and ``${target}`` (the 47 of SynthTriplets18M): a triplet
            row that stores a keyword pair (``source_keyword``, ``target_keyword``) gets an instruction drawn from
            them each time it is read, instead of its stored text. ``None``: stored texts.
        keyword_swap_probability: for those rows, the probability of swapping reference and target (and the
            keyword pair); a swapped row has no mask (a stored mask is of the target image). Needs
            ``keyword_templates`` (the stored text describes the unswapped edit).

    The template and the swap are drawn from ``(seed, epoch, id)`` (:attr:`epoch` is set by
    :meth:`TripletDataLoader.set_epoch`): a new draw every epoch, the same draws in a resumed run.

    Example:
        >>> collate = TripletCollator("embeddings")
        >>> batch = collate([{"id": "a", "reference_image_embeds": [0.0, 1.0], "target_image_embeds": [1.0, 0.0],
        ...                   "modification_text": "make it red"},
        ...                  {"id": "b", "reference_image_embeds": [0.0, float("nan")], "target_image_embeds": [1.0, 0.0],
        ...                   "modification_text": "make it blue"}])
        >>> batch["input_ids"].shape, batch["target_image_embeds"].shape, batch["num_skipped"]
        (torch.Size([1, 77]), torch.Size([1, 2]), 1)
    """

    def __init__(
        self,
        source: str,
        tokenizer=None,
        image_processor=None,
        column_mapping: Mapping[str, str] | None = None,
        stage: str = "triplet",
        text_to_image_probability: float = 0.0,
        seed: int = 0,
        embedding_dim: int | None = None,
        return_mask: bool = False,
        mask_size: int = 64,
        max_length: int = 77,
        tokenizer_2=None,
        max_length_2: int = 77,
        keyword_templates: Sequence[str] | None = None,
        keyword_swap_probability: float = 0.0,
    ):
        if source not in schema.SOURCES:
            raise ValueError(f"source must be one of {schema.SOURCES}, got {source!r}.")
        if stage not in schema.STAGES:
            raise ValueError(f"stage must be one of {schema.STAGES}, got {stage!r}.")
        if not 0.0 <= text_to_image_probability <= 1.0:
            raise ValueError(f"text_to_image_probability must be in [0, 1], got {text_to_image_probability}.")
        if not 0.0 <= keyword_swap_probability <= 1.0:
            raise ValueError(f"keyword_swap_probability must be in [0, 1], got {keyword_swap_probability}.")
        if keyword_swap_probability and not keyword_templates:
            raise ValueError("keyword_swap_probability needs keyword_templates: a swapped row needs a new instruction.")
        if tokenizer is None:
            from diffusers_cir.utils import build_offline_clip_tokenizer

            tokenizer = build_offline_clip_tokenizer(model_max_length=max_length)
        if image_processor is None and source == schema.IMAGES_CONFIG:
            from transformers import CLIPImageProcessor

            image_processor = CLIPImageProcessor()
        self.source, self.stage = source, stage
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.mapping = schema.resolve_column_mapping(column_mapping)
        self.text_to_image_probability, self.seed = text_to_image_probability, seed
        self.embedding_dim = embedding_dim
        self.return_mask, self.mask_size, self.max_length = return_mask, mask_size, max_length
        self.keyword_templates = tuple(keyword_templates or ())
        self.keyword_swap_probability = keyword_swap_probability
        self.epoch = 0
        self._tokenizers = [(tokenizer, max_length, _fixed_length_backend(tokenizer, max_length))]
        if tokenizer_2 is not None:
            self._tokenizers.append((tokenizer_2, max_length_2, _fixed_length_backend(tokenizer_2, max_length_2)))

    @property
    def _backend(self):
        """The fast (Rust) tokenizer of the first tokenizer, or None when the slow path is used."""
        return self._tokenizers[0][2]

    def _is_text_to_image(self, row_id: str) -> bool:
        if self.stage == "text_to_image":
            return True
        if self.text_to_image_probability <= 0:
            return False
        draw = zlib.crc32(f"{self.seed}:{row_id}".encode("utf-8")) / 2**32
        return draw < self.text_to_image_probability

    def _row_id(self, row: Mapping[str, Any]) -> str:
        value = schema.get_field(row, self.mapping[schema.ID], default=None)
        if value is None:
            value = row.get("__key__")
        return "" if value is None else str(value)

    def _text(self, row: Mapping[str, Any], column: str) -> str:
        text = schema.get_field(row, self.mapping[column], default=None)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{column} is empty or not a string ({type(text).__name__})")
        return text

    def _keyword_instruction(self, row: Mapping[str, Any], row_id: str) -> tuple[str | None, bool]:
        """``(instruction, swapped)`` of a triplet row: a template filled with its keyword pair (swapped with
        ``keyword_swap_probability``), or ``(None, False)`` to keep the stored text (no templates, or no pair)."""
        if not self.keyword_templates:
            return None, False
        pair = [schema.get_field(row, self.mapping[name], default=None)
                for name in (schema.SOURCE_KEYWORD, schema.TARGET_KEYWORD)]
        if not all(isinstance(word, str) and word.strip() for word in pair):
            return None, False
        from ..generation.templates import draw_instruction  # the generator's own draw (a leaf module)

        rng = np.random.default_rng([self.seed, self.epoch, zlib.crc32(row_id.encode("utf-8"))])
        swapped = bool(rng.random() < self.keyword_swap_probability)
        source, target = reversed(pair) if swapped else pair
        return draw_instruction(source.strip(), target.strip(), rng, self.keyword_templates)[0], swapped

    def _decode_row(self, row: Mapping[str, Any], row_id: str) -> dict:
        text_to_image = self._is_text_to_image(row_id)
        instruction, swapped = (None, False) if text_to_image else self._keyword_instruction(row, row_id)
        decoded: dict[str, Any] = {"text_to_image": text_to_image}
        decoded["text"] = instruction or self._text(
            row, schema.TARGET_CAPTION if text_to_image else schema.MODIFICATION_TEXT)
        reference_column, target_column = (
            (schema.REFERENCE_IMAGE_EMBEDS, schema.TARGET_IMAGE_EMBEDS) if self.source == schema.EMBEDDINGS_CONFIG
            else (schema.REFERENCE_IMAGE, schema.TARGET_IMAGE))
        if swapped:
            reference_column, target_column = target_column, reference_column
        if self.source == schema.EMBEDDINGS_CONFIG:
            target = self._vector(row, target_column)
            decoded["target"] = target
            decoded["reference"] = np.zeros_like(target) if text_to_image else self._vector(row, reference_column)
        else:
            decoded["target"] = load_image(schema.get_field(row, self.mapping[target_column], default=None),
                                           name=target_column)
            decoded["reference"] = None if text_to_image else load_image(
                schema.get_field(row, self.mapping[reference_column], default=None), name=reference_column)
        if self.return_mask:
            # A stored mask (and masked embedding) is of the target image: a swapped row has none.
            value = None if swapped else schema.get_field(row, self.mapping[schema.MASK], default=None)
            decoded["mask"] = (
                np.zeros((self.mask_size, self.mask_size), np.float32) if value is None else decode_mask(value, self.mask_size)
            )
            if self.source == schema.EMBEDDINGS_CONFIG:
                masked = None if swapped else schema.get_field(row, self.mapping[schema.MASKED_TARGET_IMAGE_EMBEDS],
                                                               default=None)
                decoded["masked_target"] = (np.zeros_like(decoded["target"]) if masked is None
                                            else self._vector(row, schema.MASKED_TARGET_IMAGE_EMBEDS))
        return decoded

    def _vector(self, row: Mapping[str, Any], column: str) -> np.ndarray:
        """An embedding column of ``row``, checked against (or fixing) the embedding width."""
        vector = _embedding(schema.get_field(row, self.mapping[column], default=None), column, self.embedding_dim)
        if self.embedding_dim is None:
            self.embedding_dim = vector.shape[0]
        return vector

    def _preprocess(self, images: list) -> list:
        """Pixel tensors (or the exception) per image: batched, or one by one if the batch call fails."""
        if not images:
            return []
        try:
            return list(pixel_values(self.image_processor, images))
        except Exception:
            results = []
            for image in images:
                try:
                    results.append(pixel_values(self.image_processor, [image])[0])
                except Exception as error:
                    results.append(error)
            return results

    def _tokenize(self, texts: list[str], which: int = 0) -> torch.Tensor:
        tokenizer, max_length, backend = self._tokenizers[which]
        if not texts:
            return torch.zeros(0, max_length, dtype=torch.long)
        if backend is not None:
            return torch.tensor([encoding.ids for encoding in backend.encode_batch(texts)], dtype=torch.long)
        return tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if rows and not isinstance(rows[0], Mapping):  # Arrow-formatted stream (see load_triplet_stream)
            rows = _rows_from_tables(rows)
        decoded, ids, skipped = [], [], []
        for row in rows:
            row_id = self._row_id(row)
            try:
                decoded.append(self._decode_row(row, row_id))
                ids.append(row_id)
            except Exception as error:  # a corrupt row must never stop training
                skipped.append((row_id, f"{type(error).__name__}: {error}"))

        if self.source == schema.IMAGES_CONFIG and decoded:
            targets = self._preprocess([d["target"] for d in decoded])
            with_reference = [i for i, d in enumerate(decoded) if d["reference"] is not None]
            references = dict(zip(with_reference, self._preprocess([decoded[i]["reference"] for i in with_reference])))
            kept = []
            for i, row in enumerate(decoded):
                error = next((x for x in (targets[i], references.get(i)) if isinstance(x, Exception)), None)
                if error is not None:
                    skipped.append((ids[i], f"preprocessing failed: {type(error).__name__}: {error}"))
                    continue
                row["target"], row["reference"] = targets[i], references.get(i)
                kept.append(i)
            decoded, ids = [decoded[i] for i in kept], [ids[i] for i in kept]
        batch: dict[str, Any] = {"ids": ids, "num_skipped": len(skipped), "skipped": skipped}
        batch["texts"] = [d["text"] for d in decoded]
        batch["is_text_to_image"] = torch.tensor([d["text_to_image"] for d in decoded], dtype=torch.bool)
        batch["input_ids"] = self._tokenize(batch["texts"])
        if len(self._tokenizers) > 1:
            batch["input_ids_2"] = self._tokenize(batch["texts"], 1)
        if self.source == schema.EMBEDDINGS_CONFIG:
            dim = self.embedding_dim or 0
            batch["reference_image_embeds"] = (
                torch.from_numpy(np.stack([d["reference"] for d in decoded])) if decoded else torch.zeros(0, dim)
            )
            batch["target_image_embeds"] = (
                torch.from_numpy(np.stack([d["target"] for d in decoded])) if decoded else torch.zeros(0, dim)
            )
        elif decoded:
            batch["target_pixel_values"] = torch.stack([d["target"] for d in decoded])
            zeros = torch.zeros_like(batch["target_pixel_values"][0])
            batch["reference_pixel_values"] = torch.stack([zeros if d["reference"] is None else d["reference"] for d in decoded])
        else:
            batch["target_pixel_values"] = batch["reference_pixel_values"] = None
        if self.return_mask:
            batch["mask"] = (
                torch.from_numpy(np.stack([d["mask"] for d in decoded]))
                if decoded
                else torch.zeros(0, self.mask_size, self.mask_size)
            )
            if self.source == schema.EMBEDDINGS_CONFIG:
                batch["masked_target_image_embeds"] = (
                    torch.from_numpy(np.stack([d["masked_target"] for d in decoded])) if decoded
                    else torch.zeros(0, self.embedding_dim or 0))
        return batch


# --------------------------------------------------------------------------------------------- shuffling
class BlockShuffledStream(torch.utils.data.IterableDataset):
    """Shuffle rows inside consecutive blocks of ``block_size``, resumable exactly.

    Why not ``datasets.IterableDataset.shuffle(buffer_size=...)``: its buffer is not saved in
    ``state_dict()`` (resuming loses the buffered rows and, with Parquet, can repeat a few), and with
    several shards per worker its interleaving iterable cannot be resumed inside DataLoader workers
    (datasets 5.2). Here the source keeps ``datasets``' exact per-shard position; each block of rows is
    permuted with a generator seeded by ``(seed, epoch, worker, block index)``, and the state holds the
    source position at the start of the current block plus how many of its rows were yielded. Resuming
    re-reads at most one block and yields exactly the rows an uninterrupted run would have.

    ``source`` is a ``datasets.IterableDataset`` (already sharded by node and with its shard order
    shuffled); DataLoader workers each read their own shards of it, as ``datasets`` assigns them.
    """

    def __init__(self, source, block_size: int, seed: int = 0):
        super().__init__()
        self.source, self.block_size, self.seed = source, check_positive_int(block_size, "block_size"), seed
        self.epoch = 0
        self._pending_resume: dict | None = None
        self._state = {"epoch": 0, "block_index": 0, "block_start": None, "yielded": 0}

    @property
    def num_shards(self) -> int:
        return self.source.num_shards

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.source.set_epoch(epoch)

    def state_dict(self) -> dict:
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        self._pending_resume = copy.deepcopy(state)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        resume, self._pending_resume = self._pending_resume, None
        source = self.source
        block_index, skip, block_start = 0, 0, None
        if resume is not None and resume["epoch"] == self.epoch:
            block_index, skip, block_start = resume["block_index"], resume["yielded"], resume["block_start"]
            if block_start is not None:
                # A copy, so that the resume position does not stick to the long-lived dataset object.
                source = copy.deepcopy(self.source)
                source.load_state_dict(block_start)
        rows = iter(source)
        while True:
            block = []
            for row in rows:
                block.append(row)
                if len(block) == self.block_size:
                    break
            if not block:
                return
            order = np.random.default_rng([self.seed, self.epoch, worker, block_index]).permutation(len(block))
            for position in range(skip, len(block)):
                self._state = {"epoch": self.epoch, "block_index": block_index, "block_start": block_start, "yielded": position + 1}
                yield block[order[position]]
            skip = 0
            block_index += 1
            # Position of the source after this block = start of the next one (a copy: the live dict mutates).
            block_start = source.state_dict()
            self._state = {"epoch": self.epoch, "block_index": block_index, "block_start": block_start, "yielded": 0}


# --------------------------------------------------------------------------------------------- loading
class TripletDataLoader:
    """A resumable loader over a :class:`TripletStream`, counting and reporting skipped rows.

    Wraps ``torchdata.stateful_dataloader.StatefulDataLoader``. Call :meth:`set_epoch` before each
    epoch (it reseeds the shard order and the shuffle buffer); save :meth:`state_dict` with your
    checkpoint and :meth:`load_state_dict` it into a freshly built loader to resume.

    Attributes:
        num_rows: rows yielded so far (all epochs); num_skipped: rows dropped; skip_reasons: a Counter of
            the reasons (exception type and first words) for a summary at the end of a run.
    """

    def __init__(self, dataset, collator: TripletCollator, loader, shuffle: bool, log_skipped: int = 20,
                 origin: str | None = None):
        self.dataset, self.collator, self.loader = dataset, collator, loader
        self.shuffle, self.origin = shuffle, origin
        self.epoch = 0
        self.num_rows = 0
        self.num_skipped = 0
        self.skip_reasons: Counter = Counter()
        self.log_skipped = log_skipped

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.set_epoch(epoch)
        self.collator.epoch = epoch  # its keyword draws (worker processes are re-created each epoch, copying it)

    def _batches(self):
        """The loader's batches; a shard that cannot be read (damaged after its footer was checked, deleted) is named
        as far as the reader allows, with the way to find it."""
        import pyarrow as pa

        batches = iter(self.loader)
        while True:
            try:
                yield next(batches)
            except StopIteration:
                return
            except (OSError, pa.ArrowException) as error:
                origin = self.origin or "the training data"
                raise ValueError(
                    f"Reading {origin} failed after {self.num_rows} rows ({type(error).__name__}: "
                    f"{str(error).strip().splitlines()[-1] if str(error).strip() else ''}): a shard is damaged or "
                    f"missing. `diffusers-cir data validate {origin}` names the file; rewrite or re-download it."
                ) from error

    def __iter__(self):
        for batch in self._batches():
            self.num_rows += len(batch["ids"])
            if batch["num_skipped"]:
                self.num_skipped += batch["num_skipped"]
                for row_id, reason in batch["skipped"]:
                    self.skip_reasons[reason.split(":")[0]] += 1
                    if self.num_skipped <= self.log_skipped:
                        logger.warning("skipped row %r: %s", row_id, reason)
                if self.num_skipped > self.log_skipped and self.num_skipped - batch["num_skipped"] <= self.log_skipped:
                    logger.warning("more rows skipped; see TripletDataLoader.skip_reasons for the totals")
            yield batch

    def __len__(self) -> int:
        raise TypeError("A streaming TripletDataLoader has no length; count steps instead.")

    def state_dict(self) -> dict:
        return {
            "loader": self.loader.state_dict(),
            "epoch": self.epoch,
            "num_rows": self.num_rows,
            "num_skipped": self.num_skipped,
            "skip_reasons": dict(self.skip_reasons),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.set_epoch(state["epoch"])
        self.loader.load_state_dict(state["loader"])
        self.num_rows, self.num_skipped = state["num_rows"], state["num_skipped"]
        self.skip_reasons = Counter(state["skip_reasons"])

    def summary(self) -> str:
        text = f"{self.num_rows} rows yielded, {self.num_skipped} skipped"
        if self.skip_reasons:
            text += " (" + ", ".join(f"{k}: {v}" for k, v in self.skip_reasons.most_common()) + ")"
        return text


def build_triplet_dataloader(
    stream: TripletStream,
    batch_size: int,
    *,
    tokenizer=None,
    image_processor=None,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
    shuffle_buffer_size: int = 1000,
    seed: int = 0,
    drop_last: bool = False,
    text_to_image_probability: float = 0.0,
    return_mask: bool = False,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    collator: TripletCollator | None = None,
    tokenizer_2=None,
    keyword_templates: Sequence[str] | None = None,
    keyword_swap_probability: float = 0.0,
) -> TripletDataLoader:
    """Shard a stream for this rank, shuffle it, and wrap it in a resumable loader with the collator.

    Args:
        stream: from :func:`load_triplet_stream`.
        batch_size: rows per batch before dropping corrupt rows.
        num_workers: DataLoader workers; each reads whole shards, so the rank needs at least
            ``num_workers`` shards (``diffusers-cir data reshard --num-shards`` makes more).
        rank, world_size: this process and the number of processes (``accelerator.process_index`` /
            ``num_processes``). With ``num_shards % world_size == 0`` each rank reads its own shards;
            otherwise every rank reads everything and keeps one row in ``world_size`` (correct, slower).
        shuffle, shuffle_buffer_size, seed: the shard order is shuffled per epoch (seeded by ``seed`` and the
            epoch) and rows are permuted within blocks of ``shuffle_buffer_size`` consecutive rows (``0`` or
            ``1``: shard order only). Resuming is exact either way (see the module docstring).
        text_to_image_probability, return_mask, tokenizer_2, keyword_templates, keyword_swap_probability: see
            :class:`TripletCollator`.
    """
    from datasets.distributed import split_dataset_by_node
    from torchdata.stateful_dataloader import StatefulDataLoader

    batch_size = check_positive_int(batch_size, "batch_size")
    world_size = check_positive_int(world_size, "world_size")
    rank = check_int(rank, "rank", minimum=0, maximum=world_size - 1)
    shuffle_buffer_size = check_non_negative_int(shuffle_buffer_size, "shuffle_buffer_size")
    dataset = stream.dataset
    if world_size > 1:
        if dataset.num_shards % world_size:
            logger.warning(
                "%d shards do not divide among %d ranks: every rank will read all shards and keep 1 row in %d. "
                "Re-shard to a multiple of %d (diffusers-cir data reshard --num-shards) to read only your own.",
                dataset.num_shards, world_size, world_size, world_size,
            )
        dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    if num_workers > max(1, dataset.num_shards):
        logger.warning(
            "%d workers but only %d shard(s) for this rank: %d worker(s) will idle. Re-shard to at least "
            "world_size x num_workers shards.", num_workers, dataset.num_shards, num_workers - dataset.num_shards
        )
    if shuffle:
        # datasets shuffles the shard order per epoch (buffer 1, one shard at a time: exactly resumable);
        # rows are mixed by our resumable block shuffle (see BlockShuffledStream for why not datasets' buffer).
        dataset = dataset.shuffle(seed=seed, buffer_size=1, max_buffer_input_shards=1)
    dataset = BlockShuffledStream(dataset, block_size=max(1, shuffle_buffer_size) if shuffle else 1, seed=seed)
    if collator is None:
        collator = TripletCollator(
            stream.source,
            tokenizer=tokenizer,
            image_processor=image_processor,
            column_mapping=stream.column_mapping,
            stage=stream.stage,
            text_to_image_probability=text_to_image_probability,
            seed=seed,
            return_mask=return_mask,
            tokenizer_2=tokenizer_2,
            keyword_templates=keyword_templates,
            keyword_swap_probability=keyword_swap_probability,
        )
    loader = StatefulDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collator,
        drop_last=drop_last,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        # Not persistent: workers are re-created each epoch so that set_epoch reaches them.
        persistent_workers=False,
    )
    return TripletDataLoader(dataset, collator, loader, shuffle=shuffle, origin=stream.origin)
