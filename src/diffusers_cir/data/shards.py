"""Shard tooling: write triplets into Parquet shards with a dataset card, re-shard, validate.

Layout written (``datasets`` reads it with ``load_dataset(folder, config, streaming=True)``)::

    folder/
      README.md                               # YAML configs + features (see diffusers_cir.data.card)
      images/train-00000-of-00004.parquet     # id, reference_image, target_image (bytes), texts
      embeddings/train-00000-of-00004.parquet # id, reference/target_image_embeds (float32), texts

Parquet (not WebDataset tars) because ``datasets`` can stream it per row group and select columns, and
because re-sharding is a plain copy of row groups. Rows are written in row groups of
``row_group_size`` so a reader never holds more than one group of images in memory.

Example:
    >>> import tempfile
    >>> from diffusers_cir.data.schema import embeddings_features
    >>> from diffusers_cir.data.shards import ParquetShardWriter
    >>> folder = tempfile.mkdtemp()
    >>> with ParquetShardWriter(folder, "embeddings", "train", embeddings_features(4), rows_per_shard=2) as writer:
    ...     for i in range(3):
    ...         writer.add({"id": str(i), "reference_image_embeds": [0.0] * 4, "target_image_embeds": [1.0] * 4,
    ...                     "modification_text": "make it red", "reference_caption": None, "target_caption": None})
    >>> [p.rsplit("/", 1)[-1] for p in writer.files]
    ['train-00000-of-00002.parquet', 'train-00001-of-00002.parquet']
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from ..checks import check_positive_int
from ..retrieval.images import load_image
from ..utils.locks import folder_lock, lock_folder
from . import schema
from .card import data_files_pattern, read_card_configs, read_card_infos, update_dataset_card
from .sources import IMAGE_EXTENSIONS, MALFORMED, read_triplet_records  # noqa: F401 - public here since the start

logger = logging.getLogger(__name__)

LOCK_HINT = "wait for it to finish, or write to another dataset folder"


def _tqdm(*args, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(*args, **kwargs)


def shard_files(folder: str, config_name: str, split: str) -> list[str]:
    """Sorted Parquet files of one configuration's split (the card's ``data_files`` glob)."""
    return sorted(glob.glob(os.path.join(folder, data_files_pattern(config_name, split))))


_SHARD_NAME = re.compile(r"^(?P<split>.+)-(?P<index>\d+)-of-(?P<total>\d+)\.parquet$")


def shard_set_problems(files: Iterable[str]) -> list[str]:
    """What is wrong with the ``{split}-{i}-of-{n}.parquet`` sets that ``files`` belong to (empty if nothing).

    ``datasets`` reads whatever matches the card's glob, so a deleted or never-copied shard would silently drop
    its rows, and shards left by an earlier write with another total (``-of-00004`` next to ``-of-00006``)
    would be read too. Files named otherwise are not checked.
    """
    present: dict[tuple[str, str], dict[str, set[int]]] = {}  # (folder, split) -> {total as written: indices}
    width: dict[tuple[str, str, str], int] = {}
    for path in files:
        match = _SHARD_NAME.match(os.path.basename(path))
        if match is not None:
            group = (os.path.dirname(path), match.group("split"))
            present.setdefault(group, {}).setdefault(match.group("total"), set()).add(int(match.group("index")))
            width[(*group, match.group("total"))] = len(match.group("index"))
    problems = []
    for (directory, split), totals in sorted(present.items()):
        if len(totals) > 1:
            problems.append(
                f"{os.path.join(directory, split)}-*: shards of {len(totals)} different writes "
                f"(-of-{', -of-'.join(sorted(totals))}) in one folder"
            )
        for total, indices in sorted(totals.items()):
            absent = [i for i in range(int(total)) if i not in indices]
            if absent:
                names = [f"{split}-{i:0{width[(directory, split, total)]}d}-of-{total}.parquet" for i in absent]
                shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                problems.append(f"{directory}: missing shard(s) {shown}")
    return problems


def check_shard_set(files: Iterable[str]) -> list[str]:
    """``files``, after checking that their ``-of-N`` sets are complete (FileNotFoundError naming what is not)."""
    files = list(files)
    problems = shard_set_problems(files)
    if problems:
        raise FileNotFoundError(
            "Incomplete shard set (its rows would be silently left out or read twice): " + "; ".join(problems) + "."
        )
    return files


def parquet_file(path: str):
    """``pyarrow.parquet.ParquetFile`` of a shard; a corrupt or truncated file is named in the error."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as error:  # ArrowInvalid does not say which file
        raise ValueError(f"Shard {path} is not a readable Parquet file ({type(error).__name__}: {error}).") from error


def check_parquet_files(files: Iterable[str]) -> list[str]:
    """``files``, after opening each one's footer and comparing their schemas: a shard that is not Parquet (garbage,
    truncated, an HTML error page) or that holds other columns is named here, before training or streaming starts,
    instead of failing a DataLoader worker later with a pyarrow error that names no file. Reads footers only."""
    files = list(files)
    first = None
    for path in files:
        schema_ = parquet_file(path).schema_arrow
        if first is None:
            first = (path, schema_)
        elif not schema_.equals(first[1], check_metadata=False):
            raise ValueError(
                f"Shard {path} has the columns {schema_.names} ({', '.join(map(str, schema_.types))}), unlike "
                f"{first[0]} ({first[1].names}, {', '.join(map(str, first[1].types))}): the shards of one split come "
                "from different writes. Rewrite the split (diffusers-cir data write/reshard) or remove the stray file."
            )
    return files


def content_id(reference: bytes | str, modification_text: str, target: bytes | str) -> str:
    """A stable id from a triplet's content: the same images and text always get the same id."""
    digest = hashlib.sha1()
    for part in (reference, modification_text, target):
        data = part.encode("utf-8") if isinstance(part, str) else bytes(part)
        digest.update(hashlib.sha1(data).digest())
    return digest.hexdigest()[:20]


# --------------------------------------------------------------------------------------------- writing
class ParquetShardWriter:
    """Append rows to Parquet shards of ``rows_per_shard`` rows, named ``{split}-{i:05d}-of-{n:05d}.parquet``.

    Shards are written under temporary names and renamed when the writer closes (the total ``n`` is only
    known then), so an interrupted write never leaves files that match the card's glob. Existing shards of
    the same split are replaced only at close, and only with ``overwrite=True``.

    Args:
        folder: dataset folder; shards go to ``folder/config_name/``.
        config_name, split: where the rows belong.
        features: ``datasets.Features`` of the rows (their Arrow schema is written into each file).
        rows_per_shard: rows per file.
        row_group_size: rows per Parquet row group (the unit ``datasets`` streams and re-shards by).
        overwrite: replace existing shards of this split; otherwise their presence is an error.

    The writer holds the lock of ``folder`` (:mod:`diffusers_cir.utils.locks`) from its creation until it closes or
    aborts: another process writing the folder meanwhile is refused.
    """

    def __init__(
        self,
        folder: str,
        config_name: str,
        split: str,
        features,
        rows_per_shard: int = 1000,
        row_group_size: int = 100,
        overwrite: bool = False,
    ):
        rows_per_shard = check_positive_int(rows_per_shard, "rows_per_shard")
        row_group_size = check_positive_int(row_group_size, "row_group_size")
        self.folder, self.config_name, self.split, self.features = folder, config_name, split, features
        self.rows_per_shard, self.row_group_size = rows_per_shard, min(row_group_size, rows_per_shard)
        self.directory = os.path.join(folder, config_name)
        self._lock = lock_folder(folder, hint=LOCK_HINT)
        existing = shard_files(folder, config_name, split)
        if existing and not overwrite:
            self._lock.release()
            raise FileExistsError(
                f"{len(existing)} shard(s) of {config_name}/{split} already exist in {folder} (e.g. {existing[0]}); "
                "pass overwrite=True (CLI: --overwrite) to replace them."
            )
        os.makedirs(self.directory, exist_ok=True)
        self._schema = features.arrow_schema
        self._pending: list[dict] = []
        self._writer = None
        self._rows_in_shard = 0
        self._temporary: list[str] = []
        self.num_rows = 0
        self.files: list[str] = []
        self._closed = False

    def __enter__(self) -> "ParquetShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open_shard(self) -> None:
        import pyarrow.parquet as pq

        path = os.path.join(self.directory, f".{self.split}-{len(self._temporary):05d}.parquet.partial")
        self._temporary.append(path)
        self._writer = pq.ParquetWriter(path, self._schema)
        self._rows_in_shard = 0

    def _write_table(self, table) -> None:
        """Write an Arrow table, rolling over to a new shard every ``rows_per_shard`` rows."""
        while table.num_rows:
            if self._writer is None:
                self._open_shard()
            room = self.rows_per_shard - self._rows_in_shard
            piece, table = table.slice(0, room), table.slice(room)
            self._writer.write_table(piece, row_group_size=self.row_group_size)
            self._rows_in_shard += piece.num_rows
            if self._rows_in_shard >= self.rows_per_shard:
                self._writer.close()
                self._writer = None

    def _flush(self) -> None:
        import pyarrow as pa

        if self._pending:
            rows, self._pending = self._pending, []
            self._write_table(pa.Table.from_pylist(rows, schema=self._schema))

    def _check_open_with_columns(self, given: Mapping[str, Any], what: str) -> None:
        if self._closed:
            raise RuntimeError("This ParquetShardWriter is closed.")
        missing = [name for name in self.features if name not in given]
        if missing:
            raise KeyError(f"{what} is missing columns {missing}; expected {list(self.features)}.")

    def add(self, row: Mapping[str, Any]) -> None:
        """Append one row (a dict with every feature column; images as ``{"bytes": ..., "path": ...}``)."""
        self._check_open_with_columns(row, "Row")
        self._pending.append({name: _to_python(row[name]) for name in self.features})
        self.num_rows += 1
        if len(self._pending) >= self.row_group_size:
            self._flush()

    def add_batch(self, columns: Mapping[str, Any]) -> None:
        """Append rows given column-wise; ``[N, D]`` numpy arrays go straight to Arrow fixed-size lists."""
        import pyarrow as pa

        self._check_open_with_columns(columns, "Batch")
        lengths = {name: len(columns[name]) for name in self.features}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"add_batch columns must have equal lengths, got {lengths}.")
        arrays = []
        for field_ in self._schema:
            values = columns[field_.name]
            if isinstance(values, np.ndarray) and values.ndim == 2 and pa.types.is_fixed_size_list(field_.type):
                if values.shape[1] != field_.type.list_size:
                    raise ValueError(
                        f"{field_.name} must have width {field_.type.list_size}, got array of shape {values.shape}."
                    )
                flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).ravel(), type=field_.type.value_type)
                arrays.append(pa.FixedSizeListArray.from_arrays(flat, field_.type.list_size))
            else:
                arrays.append(pa.array([_to_python(v) for v in values], type=field_.type))
        self._flush()  # keep row order: single rows added before this batch go first
        self._write_table(pa.Table.from_arrays(arrays, schema=self._schema))
        self.num_rows += next(iter(lengths.values()), 0)

    def close(self) -> list[str]:
        """Finish the last shard and give every shard its final ``-of-N`` name. Returns the file paths."""
        if self._closed:
            return self.files
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for old in shard_files(self.folder, self.config_name, self.split):
            os.remove(old)
        total = len(self._temporary)
        for index, path in enumerate(self._temporary):
            final = os.path.join(self.directory, f"{self.split}-{index:05d}-of-{total:05d}.parquet")
            os.replace(path, final)
            self.files.append(final)
        self._closed = True
        self._lock.release()
        return self.files

    def abort(self) -> None:
        """Discard everything written so far (existing shards are left untouched)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for path in self._temporary:
            if os.path.exists(path):
                os.remove(path)
        if not self._closed:
            self._lock.release()
        self._closed = True


def _to_python(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "detach"):  # torch tensor
        return value.detach().cpu().tolist()
    return value


def record_split(folder: str, config_name: str, features, split: str, num_rows: int, default: bool = False) -> str:
    """Record one split's size and the configuration's features in the card, keeping its other splits."""
    infos = read_card_infos(folder)
    configs = read_card_configs(folder)
    sizes: dict[str, int] = {}
    if config_name in infos and infos[config_name].splits:
        sizes = {name: info.num_examples for name, info in infos[config_name].splits.items()}
    elif config_name in configs:  # a card without dataset_info: keep the listed splits (size unknown -> count)
        for entry in configs[config_name].get("data_files", []):
            if isinstance(entry, dict) and entry.get("split") != split:
                sizes[entry["split"]] = count_rows(folder, config_name, entry["split"])
    sizes[split] = num_rows
    return update_dataset_card(folder, config_name, features, sizes, default=default or not configs)


def count_rows(folder: str, config_name: str, split: str) -> int:
    """Rows in a split, from the Parquet footers (no data read)."""
    files = check_shard_set(shard_files(folder, config_name, split))
    return sum(parquet_file(path).metadata.num_rows for path in files)


# --------------------------------------------------------------------------------------------- inputs
@dataclass
class SkippedRecord:
    """An input record that was not written, and why."""

    source: str
    reason: str


@dataclass
class WriteSummary:
    """What :func:`write_triplets` did."""

    folder: str
    config_name: str
    split: str
    num_rows: int = 0
    files: list[str] = field(default_factory=list)
    skipped: list[SkippedRecord] = field(default_factory=list)

    def format(self) -> str:
        lines = [f"wrote {self.num_rows} triplets to {len(self.files)} shard(s) in {self.folder}/{self.config_name}"]
        if self.skipped:
            reasons = Counter(record.reason.split(":")[0] for record in self.skipped)
            lines.append(f"skipped {len(self.skipped)} record(s): {dict(reasons)}")
        return "\n".join(lines)


def _read_image_bytes(value: Any, base: str) -> tuple[bytes, str]:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), None
    if isinstance(value, dict) and isinstance(value.get("bytes"), (bytes, bytearray)) and value["bytes"]:
        return bytes(value["bytes"]), value.get("path")
    if not isinstance(value, str):
        raise ValueError(f"bad image reference {value!r}")
    path = value if os.path.isabs(value) else os.path.join(base, value)
    with open(path, "rb") as handle:
        return handle.read(), os.path.basename(path)


def write_triplets(
    source: str,
    folder: str,
    split: str = "train",
    column_mapping: Mapping[str, str] | None = None,
    rows_per_shard: int = 1000,
    row_group_size: int = 100,
    verify_images: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> WriteSummary:
    """Write triplets from a folder / JSONL / CSV into ``folder/images/{split}-*.parquet`` plus the card.

    Image bytes are copied as they are (no re-encoding). Records whose images are missing or cannot be
    decoded (with ``verify_images``), whose text is empty, or whose id repeats an earlier one are skipped
    and listed in the returned summary, and so are malformed ones (a CSV/TSV row with more or fewer fields than
    the header, a JSONL line that is not an object), named by line. An unbalanced CSV quote refuses the file.
    Rows without an ``id`` get :func:`content_id`. Another process writing ``folder`` at the same time is refused
    (:class:`~diffusers_cir.utils.locks.FolderLockedError`).

    Example:
        >>> summary = write_triplets("my_triplets.jsonl", "my_dataset")  # doctest: +SKIP
        >>> print(summary.format())  # doctest: +SKIP
        wrote 1200 triplets to 2 shard(s) in my_dataset/images
    """
    records, base = read_triplet_records(source, column_mapping)
    with folder_lock(folder, hint=LOCK_HINT):
        return _write_records(records, base, folder, split, rows_per_shard, row_group_size, verify_images, overwrite,
                              progress)


def _write_records(records, base, folder, split, rows_per_shard, row_group_size, verify_images, overwrite, progress):
    summary = WriteSummary(folder, schema.IMAGES_CONFIG, split)
    features = schema.images_features()
    seen_ids: set[str] = set()
    with ParquetShardWriter(
        folder, schema.IMAGES_CONFIG, split, features, rows_per_shard, row_group_size, overwrite=overwrite
    ) as writer:
        for record in _tqdm(records, desc=f"writing {split}", unit="triplet", disable=not progress):
            try:
                if MALFORMED in record:
                    raise ValueError(record[MALFORMED])
                text = record.get(schema.MODIFICATION_TEXT)
                if text is not None and not isinstance(text, str):
                    raise ValueError(f"modification_text is not text: {text!r:.60}")
                if not text or not text.strip():
                    raise ValueError("empty modification_text")
                images = {}
                for column in (schema.REFERENCE_IMAGE, schema.TARGET_IMAGE):
                    if record.get(column) is None:
                        raise ValueError(f"missing {column}")
                    try:
                        data, name = _read_image_bytes(record[column], base)
                    except OSError as error:
                        raise ValueError(f"unreadable {column}: {error}") from error
                    if verify_images:
                        try:
                            load_image(data)
                        except Exception as error:  # PIL raises many types for bad data
                            raise ValueError(f"undecodable {column}: {error}") from error
                    images[column] = {"bytes": data, "path": name}
                row_id = record.get(schema.ID) or content_id(
                    images[schema.REFERENCE_IMAGE]["bytes"], text, images[schema.TARGET_IMAGE]["bytes"]
                )
                row_id = str(row_id)
                if row_id in seen_ids:
                    raise ValueError(f"duplicate id: {row_id}")
            except ValueError as error:
                summary.skipped.append(SkippedRecord(record["_source"], str(error)))
                continue
            seen_ids.add(row_id)
            writer.add(
                {
                    schema.ID: row_id,
                    **images,
                    schema.MODIFICATION_TEXT: text,
                    schema.REFERENCE_CAPTION: record.get(schema.REFERENCE_CAPTION),
                    schema.TARGET_CAPTION: record.get(schema.TARGET_CAPTION),
                }
            )
    summary.files, summary.num_rows = writer.files, writer.num_rows
    record_split(folder, schema.IMAGES_CONFIG, features, split, writer.num_rows, default=True)
    for skipped in summary.skipped:
        logger.warning("skipped %s: %s", skipped.source, skipped.reason)
    return summary


# --------------------------------------------------------------------------------------------- re-sharding
def iter_record_batches(
    folder: str, config_name: str, split: str, batch_size: int = 100, shuffle_seed: int | None = None
) -> Iterator:
    """``pyarrow.RecordBatch`` es of a split, in file order, or with ``shuffle_seed`` in a random order.

    Shuffling permutes the row groups of all files and the rows inside each group: a streaming-friendly
    approximation of a global shuffle (memory: one row group) that spreads every shard's rows over the
    new shards, so the streaming block shuffle has well-mixed input.
    """
    files = check_shard_set(shard_files(folder, config_name, split))
    if shuffle_seed is None:
        for path in files:
            yield from parquet_file(path).iter_batches(batch_size=batch_size)
        return
    rng = np.random.default_rng(shuffle_seed)
    groups = [(path, g) for path in files for g in range(parquet_file(path).num_row_groups)]
    for index in rng.permutation(len(groups)):
        path, group = groups[index]
        table = parquet_file(path).read_row_group(group)
        table = table.take(rng.permutation(table.num_rows))
        yield from table.to_batches(max_chunksize=batch_size)


def reshard(
    folder: str,
    config_name: str,
    split: str = "train",
    rows_per_shard: int | None = None,
    num_shards: int | None = None,
    output_folder: str | None = None,
    row_group_size: int = 100,
    shuffle_seed: int | None = None,
    progress: bool = True,
) -> list[str]:
    """Rewrite a split into ``num_shards`` equal shards or shards of ``rows_per_shard`` rows.

    Row order is kept unless ``shuffle_seed`` is given (see :func:`iter_record_batches`).

    ``datasets`` gives each DataLoader worker of each rank whole shards, so a split needs at least
    ``world_size * num_workers`` shards (ideally a multiple) to use every worker. In place unless
    ``output_folder`` is given (the card is then copied and updated there). Another process writing the output
    folder meanwhile is refused (:class:`~diffusers_cir.utils.locks.FolderLockedError`).
    """
    if (rows_per_shard is None) == (num_shards is None):
        raise ValueError("Pass exactly one of rows_per_shard or num_shards.")
    files = check_shard_set(shard_files(folder, config_name, split))
    if not files:
        raise FileNotFoundError(f"No shards match {data_files_pattern(config_name, split)} in {folder}.")
    total = sum(parquet_file(path).metadata.num_rows for path in files)
    if num_shards is not None:
        num_shards = check_positive_int(num_shards, "num_shards")
        if num_shards > max(total, 1):
            raise ValueError(f"`num_shards` must be at most the {total} rows of {config_name}/{split}, got {num_shards}.")
        sizes = [total // num_shards + (1 if i < total % num_shards else 0) for i in range(num_shards)]
    else:
        rows_per_shard = check_positive_int(rows_per_shard, "rows_per_shard")
        sizes = [rows_per_shard] * (total // rows_per_shard) + ([total % rows_per_shard] if total % rows_per_shard else [])
    schema_arrow = parquet_file(files[0]).schema_arrow
    target = output_folder or folder
    with folder_lock(target, hint=LOCK_HINT):
        return _reshard(folder, config_name, split, files, sizes, total, schema_arrow, target, row_group_size,
                        shuffle_seed, progress)


def _reshard(folder, config_name, split, files, sizes, total, schema_arrow, target, row_group_size, shuffle_seed,
             progress) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Stage next to the destination so the final os.replace never crosses file systems.
    staging = tempfile.mkdtemp(prefix=".reshard-", dir=target)
    written = []
    try:
        batches = iter_record_batches(folder, config_name, split, batch_size=row_group_size, shuffle_seed=shuffle_seed)
        carry = None
        bar = _tqdm(total=total, desc=f"resharding {config_name}/{split}", unit="row", disable=not progress)
        for index, size in enumerate(sizes):
            path = os.path.join(staging, f"{split}-{index:05d}-of-{len(sizes):05d}.parquet")
            with pq.ParquetWriter(path, schema_arrow) as writer:
                remaining = size
                while remaining:
                    if carry is None or carry.num_rows == 0:
                        carry = next(batches)
                    piece, carry = carry.slice(0, remaining), carry.slice(remaining)
                    writer.write_table(pa.Table.from_batches([piece]), row_group_size=row_group_size)
                    remaining -= piece.num_rows
                    bar.update(piece.num_rows)
            written.append(path)
        bar.close()
        os.makedirs(os.path.join(target, config_name), exist_ok=True)
        if target != folder:
            if os.path.isfile(os.path.join(folder, "README.md")) and not os.path.isfile(os.path.join(target, "README.md")):
                shutil.copy(os.path.join(folder, "README.md"), os.path.join(target, "README.md"))
        for old in shard_files(target, config_name, split):
            os.remove(old)
        final = []
        for path in written:
            destination = os.path.join(target, config_name, os.path.basename(path))
            os.replace(path, destination)
            final.append(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    from datasets import Features

    features = Features.from_arrow_schema(schema_arrow)
    record_split(target, config_name, features, split, total, default=config_name == schema.IMAGES_CONFIG)
    return final


# --------------------------------------------------------------------------------------------- validation
@dataclass
class ValidationReport:
    """Findings of :func:`validate_dataset`; ``ok`` when ``problems`` is empty."""

    folder: str
    counts: dict[str, int] = field(default_factory=dict)  # "config/split" -> rows
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # worth knowing, not an error (repeated content)
    undecodable: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)
    duplicate_ids: list[str] = field(default_factory=list)
    duplicate_contents: list[tuple[str, str]] = field(default_factory=list)  # (id, id of the first copy)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"dataset {self.folder}"]
        lines += [f"  {name}: {count} rows" for name, count in sorted(self.counts.items())]
        lines += [f"  WARNING: {warning}" for warning in self.warnings]
        lines += [f"  PROBLEM: {problem}" for problem in self.problems] or ["  OK"]
        return "\n".join(lines)


_REQUIRED_FOR_CONFIG = {
    schema.IMAGES_CONFIG: (schema.ID, schema.REFERENCE_IMAGE, schema.TARGET_IMAGE, schema.MODIFICATION_TEXT),
    schema.EMBEDDINGS_CONFIG: (
        schema.ID,
        schema.REFERENCE_IMAGE_EMBEDS,
        schema.TARGET_IMAGE_EMBEDS,
        schema.MODIFICATION_TEXT,
    ),
}


def validate_dataset(
    folder: str,
    configs: Iterable[str] | None = None,
    check_images: bool = True,
    max_listed: int = 5,
    progress: bool = True,
) -> ValidationReport:
    """Check a shard folder: card vs files, schema, decodability, duplicates and counts.

    * every configuration in the card has files, and the files' schema matches the card's features;
    * the required columns of ``images`` / ``embeddings`` are present with the right types;
    * every image decodes (``check_images``), every embedding is finite with a non-zero norm and the
      declared width;
    * ids are unique within a split, and no two rows have the same content (images/embeddings + text);
    * row counts match the card's ``num_examples``, and an ``embeddings`` split has the same ids as the
      ``images`` split of the same name.
    """
    import pyarrow.parquet as pq
    from datasets import Features

    report = ValidationReport(folder)
    card_configs = read_card_configs(folder)
    infos = read_card_infos(folder)
    if not card_configs:
        report.problems.append(f"no README.md with a `configs:` section in {folder}")
        return report
    selected = list(configs) if configs else list(card_configs)
    ids_by_split: dict[tuple[str, str], set[str]] = {}
    for config_name in selected:
        if config_name not in card_configs:
            report.problems.append(f"config {config_name!r} is not in the card (has {sorted(card_configs)})")
            continue
        for entry in card_configs[config_name].get("data_files", []):
            split = entry["split"] if isinstance(entry, dict) else "train"
            files = shard_files(folder, config_name, split)
            key = f"{config_name}/{split}"
            if not files:
                report.problems.append(f"{key}: no files match {data_files_pattern(config_name, split)}")
                continue
            report.problems += [f"{key}: {problem}" for problem in shard_set_problems(files)]
            unreadable = []
            for path in files:
                try:
                    parquet_file(path)
                except ValueError as error:
                    unreadable.append(str(error))
            if unreadable:  # nothing more can be checked on this split
                report.problems += [f"{key}: {message}" for message in unreadable]
                continue
            card_features = infos[config_name].features if config_name in infos else None
            file_features = Features.from_arrow_schema(pq.ParquetFile(files[0]).schema_arrow)
            if card_features is not None and card_features != file_features:
                report.problems.append(f"{key}: file features {file_features} differ from the card's {card_features}")
            required = _REQUIRED_FOR_CONFIG.get(config_name, ())
            missing = [name for name in required if name not in file_features]
            if missing:
                report.problems.append(f"{key}: missing required columns {missing} (has {list(file_features)})")
                continue
            ids = _validate_rows(report, key, files, file_features, config_name, check_images, max_listed, progress)
            ids_by_split[(config_name, split)] = ids
            report.counts[key] = sum(pq.ParquetFile(path).metadata.num_rows for path in files)
            if config_name in infos and split in (infos[config_name].splits or {}):
                expected = infos[config_name].splits[split].num_examples
                if expected != report.counts[key]:
                    report.problems.append(f"{key}: the card says {expected} rows, the files hold {report.counts[key]}")
    for (config_name, split), ids in ids_by_split.items():
        if config_name == schema.EMBEDDINGS_CONFIG and (schema.IMAGES_CONFIG, split) in ids_by_split:
            image_ids = ids_by_split[(schema.IMAGES_CONFIG, split)]
            if ids != image_ids:
                report.problems.append(
                    f"embeddings/{split} and images/{split} hold different ids: {len(ids - image_ids)} only in "
                    f"embeddings, {len(image_ids - ids)} only in images"
                )
    return report


def _batches_or_problem(report: ValidationReport, key: str, path: str) -> Iterator:
    """The record batches of a shard; data that cannot be read past its footer is a problem naming the file."""
    import pyarrow as pa

    batches = parquet_file(path).iter_batches(batch_size=256)
    rows = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (OSError, pa.ArrowException) as error:
            report.problems.append(f"{key}: {path} cannot be read after row {rows} ({type(error).__name__}: {error})")
            return
        rows += batch.num_rows
        yield batch


def _validate_rows(report, key, files, features, config_name, check_images, max_listed, progress) -> set[str]:
    import pyarrow.parquet as pq

    ids: set[str] = set()
    contents: dict[str, str] = {}
    duplicate_ids = duplicate_contents = undecodable = bad_embeddings = 0
    # Content duplicates only make sense for triplets; other configurations (a gallery) only need unique ids.
    check_content = config_name in _REQUIRED_FOR_CONFIG
    image_columns = [name for name, feature in features.items() if type(feature).__name__ == "Image"]
    required = _REQUIRED_FOR_CONFIG.get(config_name, ())
    embed_columns = [name for name in (schema.REFERENCE_IMAGE_EMBEDS, schema.TARGET_IMAGE_EMBEDS) if name in features]
    total = sum(pq.ParquetFile(path).metadata.num_rows for path in files)
    bar = _tqdm(total=total, desc=f"validating {key}", unit="row", disable=not progress)
    for path in files:
        for batch in _batches_or_problem(report, key, path):
            rows = batch.to_pylist()
            for row in rows:
                row_id = str(row.get(schema.ID))
                if row_id in ids:
                    duplicate_ids += 1
                    report.duplicate_ids.append(row_id)
                ids.add(row_id)
                digest = hashlib.sha1(str(row.get(schema.MODIFICATION_TEXT)).encode("utf-8"))
                for name in image_columns:
                    value = row.get(name) or {}
                    data = value.get("bytes")
                    digest.update(hashlib.sha1(data or b"").digest())
                    if not data and name not in required:
                        continue  # an optional image (a mask) may be null: training reads that as "no mask"
                    if check_images:
                        try:
                            if not data:
                                raise ValueError("no image bytes")
                            load_image(data)
                        except Exception as error:
                            undecodable += 1
                            report.undecodable.append((row_id, f"{name}: {type(error).__name__}: {error}"))
                for name in embed_columns:
                    vector = np.asarray(row.get(name) or [], dtype=np.float32)
                    digest.update(vector.tobytes())
                    if vector.size == 0 or not np.isfinite(vector).all() or not np.linalg.norm(vector) > 0:
                        bad_embeddings += 1
                        report.undecodable.append((row_id, f"{name}: empty, non-finite or zero embedding"))
                hexdigest = digest.hexdigest()
                if not check_content:
                    pass
                elif hexdigest in contents:
                    duplicate_contents += 1
                    report.duplicate_contents.append((row_id, contents[hexdigest]))
                else:
                    contents[hexdigest] = row_id
            bar.update(len(rows))
    bar.close()

    def listed(items):
        shown = ", ".join(map(str, items[-min(len(items), max_listed) :])) if items else ""
        return shown + (" ..." if len(items) > max_listed else "")

    if duplicate_ids:
        report.problems.append(f"{key}: {duplicate_ids} duplicate id(s): {listed(report.duplicate_ids)}")
    if duplicate_contents:
        # Repeated triplets under different ids are legal (oversampling) but usually a mistake worth a look.
        report.warnings.append(
            f"{key}: {duplicate_contents} row(s) repeat an earlier row's content: "
            + ", ".join(f"{a} = {b}" for a, b in report.duplicate_contents[:max_listed])
            + (" ..." if duplicate_contents > max_listed else "")
        )
    if undecodable:
        report.problems.append(f"{key}: {undecodable} undecodable image(s): {listed(report.undecodable)}")
    if bad_embeddings:
        report.problems.append(f"{key}: {bad_embeddings} bad embedding(s)")
    return ids
