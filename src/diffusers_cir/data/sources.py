"""Triplet sources for ``diffusers-cir data write``: a JSONL, CSV or TSV file, or a folder, read into records.

A record is a ``dict`` with the canonical columns (``diffusers_cir.data.schema``) and ``_source`` (``file:line`` or the
triplet's sub-folder). A record that cannot be read as a triplet (a CSV/TSV row with more or fewer fields than the
header, a JSONL line that is not an object) is ``{"_source": ..., MALFORMED: reason}``: ``write_triplets`` skips it and
counts it by line. An unbalanced CSV quote refuses the whole file: the rows after it cannot be told apart.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping
from typing import Any

from . import schema

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Key of a record that could not be read (its value says why): write_triplets skips and counts it.
MALFORMED = "_malformed"


def read_triplet_records(source: str, column_mapping: Mapping[str, str] | None = None) -> tuple[list[dict], str]:
    """Records (``dict`` per triplet, canonical keys) from a JSONL file, a CSV/TSV file or a folder.

    A folder either holds a ``metadata.jsonl`` / ``metadata.csv`` (image paths relative to the folder and inside it,
    as in ``datasets``' ImageFolder) or one sub-folder per triplet with ``reference.<ext>``,
    ``target.<ext>``, ``modification.txt`` and optional ``reference_caption.txt`` / ``target_caption.txt``
    (the sub-folder name is the id). Returns the records and the directory image paths are relative to.

    Text files are read as UTF-8 with an optional byte-order mark, which Excel's "CSV UTF-8" and Windows editors
    write: it would otherwise stick to the first column name, fail the first JSON line, or start a modification text.
    """
    mapping = schema.resolve_column_mapping(column_mapping)
    if os.path.isdir(source):
        for name in ("metadata.jsonl", "metadata.csv", "metadata.tsv", "triplets.jsonl", "triplets.csv"):
            if os.path.isfile(os.path.join(source, name)):
                records = read_triplet_records(os.path.join(source, name), column_mapping)[0]
                return [_confined_images(record, source) for record in records], source
        return _read_triplet_folders(source), source
    if not os.path.isfile(source):
        raise FileNotFoundError(f"Triplet source {source!r} is neither a file nor a folder.")
    base = os.path.dirname(os.path.abspath(source))
    try:
        raw, line_numbers, columns, where = _read_file_records(source)
    except UnicodeDecodeError as error:
        raise ValueError(_not_utf8(source, error)) from None
    if not raw:
        raise ValueError(
            f"{source} holds no triplet records ({'only a header' if columns else 'the file is empty'}): nothing to "
            "write. Is it the right file?"
        )
    if columns is not None:
        schema.check_columns(
            columns, mapping, (schema.REFERENCE_IMAGE, schema.TARGET_IMAGE, schema.MODIFICATION_TEXT), where=where
        )
    records = []
    for index, entry in enumerate(raw):
        record = {"_source": f"{os.path.basename(source)}:{line_numbers[index]}"}
        if MALFORMED in entry:  # skipped and counted by write_triplets, never read for its fields
            records.append({**record, MALFORMED: entry[MALFORMED]})
            continue
        for name in schema.IMAGES_COLUMNS:
            value = schema.get_field(entry, mapping[name], default=None)
            record[name] = None if value in ("", None) else value
        records.append(record)
    return records, base


def _confined_images(record: dict, folder: str) -> dict:
    """A dataset folder's metadata names its images relative to the folder (ImageFolder's rule): a path that is
    absolute or leads out of it (``..``, a link) would copy a file from elsewhere into the shards, and from there into
    a Hub upload. Such a record is skipped and counted like any malformed one."""
    if MALFORMED in record:
        return record
    root = os.path.realpath(folder)
    for column in (schema.REFERENCE_IMAGE, schema.TARGET_IMAGE):
        value = record.get(column)
        if not isinstance(value, str):
            continue
        target = os.path.realpath(os.path.join(folder, value))
        if os.path.isabs(value) or os.path.commonpath([root, target]) != root:
            return {"_source": record["_source"],
                    MALFORMED: f"image outside the dataset folder: {column} {value!r} (metadata paths are relative to "
                               "the folder and stay inside it)"}
    return record


def _read_file_records(source: str) -> tuple[list[dict], list[int], Any, str]:
    """The raw records of a JSONL or CSV/TSV file, the line each starts on, its columns (header or first record;
    ``None`` if none) and where those columns come from (for messages)."""
    lower = source.lower()
    line_numbers = []  # the line each record starts on in the file, as an editor numbers it
    if lower.endswith((".jsonl", ".json")):
        raw = []
        with open(source, encoding="utf-8-sig") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(
                        f"{source}:{line_number} is not a JSON record ({error.msg}, column {error.colno}): "
                        f"{line.strip()[:200]!r}"
                    ) from None
                if not isinstance(entry, dict):
                    entry = {MALFORMED: f"malformed record: a JSON {type(entry).__name__}, not an object {{...}}"}
                raw.append(entry)
                line_numbers.append(line_number)
        columns = next((entry for entry in raw if MALFORMED not in entry), None)
        where = f"{source} (first record)"
    elif lower.endswith((".csv", ".tsv")):
        raw, line_numbers, header = _read_csv_records(source, delimiter="\t" if lower.endswith(".tsv") else ",")
        columns, where = header, f"{source} (header)"
    else:
        raise ValueError(f"Unsupported triplet source {source!r}: expected a .jsonl, .csv or .tsv file, or a folder.")
    return raw, line_numbers, columns, where


def _not_utf8(source: str, error: UnicodeDecodeError) -> str:
    """The message for a file that is not UTF-8, naming the first line that is not (UTF-16 "Unicode text" from Excel
    or a Latin-1 export are the usual causes)."""
    with open(source, "rb") as handle:
        data = handle.read()
    line = 1
    for line, raw in enumerate(data.split(b"\n"), start=1):
        try:
            raw.decode("utf-8-sig" if line == 1 else "utf-8")
        except UnicodeDecodeError:
            break
    kind = " (it starts with a UTF-16 byte-order mark)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
    return (
        f"{source}:{line} is not UTF-8 text{kind} ({error.reason}). Save the file as "
        "UTF-8 (Excel: \"CSV UTF-8\"; iconv -f latin1 -t utf-8) and run again."
    )


def _read_csv_records(source: str, delimiter: str) -> tuple[list[dict], list[int], dict | None]:
    """The records of a CSV/TSV file, the line each one starts on, and the header (``None`` for an empty file).

    Counting records misnumbers them: the header is line 1, and blank lines and quoted fields holding line breaks
    shift every later record. ``csv.reader.line_num`` counts the lines read so far, so a record starts on the line
    after the previous one ended.

    Quoting is parsed strictly: an unbalanced quote is refused (the whole file, naming the line it opened on) instead
    of running on over the next rows and merging them into one text. A record with more or fewer fields than the
    header is kept as ``{MALFORMED: reason}`` (skipped and counted when writing) instead of losing its extra fields
    or shifting its columns; extra fields that are all empty (a trailing delimiter) are dropped.
    """
    records, starts, header = [], [], None
    name = "TSV" if delimiter == "\t" else "CSV"
    with open(source, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter, strict=True)
        previous_end = 0
        while True:
            start = previous_end + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as error:
                raise ValueError(
                    f"{source}:{start}: malformed {name}: {error} (line {reader.line_num}). A quote opened on line "
                    f"{start} is not closed where a field ends, so the rows after it would run into one field. Put "
                    f"a field holding {delimiter!r}, a quote or a line break in double quotes and double the quotes "
                    'inside it ("").'
                ) from None
            previous_end = reader.line_num
            if not row:  # a blank line (DictReader skips them too)
                continue
            if header is None:
                duplicated = sorted({column for column in row if row.count(column) > 1})
                if duplicated:
                    raise ValueError(f"{source}:{start}: the header names the column(s) {duplicated} more than once.")
                header = dict.fromkeys(row)
                continue
            extra = row[len(header):]
            if len(row) < len(header) or any(field.strip() for field in extra):
                hint = f"an unquoted {delimiter!r} inside a field? Quote the field" if extra else "a field is missing"
                end = f"-{reader.line_num}" if reader.line_num > start else ""
                records.append({MALFORMED: f"malformed record: line {start}{end} has {len(row)} fields, the header "
                                           f"{len(header)} ({hint})"})
            else:
                records.append(dict(zip(header, row)))
            starts.append(start)
    return records, starts, header


def _read_triplet_folders(folder: str) -> list[dict]:
    records = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isdir(path):
            continue
        files = {os.path.splitext(f)[0]: f for f in os.listdir(path)}
        record: dict[str, Any] = {"_source": name, "id": name}
        for key in ("reference", "target"):
            found = [f for f in os.listdir(path) if os.path.splitext(f)[0] == key and f.lower().endswith(IMAGE_EXTENSIONS)]
            record[f"{key}_image"] = os.path.join(name, found[0]) if found else None
        for key, column in (
            ("modification", schema.MODIFICATION_TEXT),
            ("reference_caption", schema.REFERENCE_CAPTION),
            ("target_caption", schema.TARGET_CAPTION),
        ):
            text_file = files.get(key)
            record[column] = None
            if text_file is not None:
                with open(os.path.join(path, text_file), encoding="utf-8-sig") as handle:
                    record[column] = handle.read().strip() or None
        records.append(record)
    if not records:
        raise ValueError(
            f"{folder} has no metadata.jsonl/metadata.csv and no triplet sub-folders "
            "(each with reference.<ext>, target.<ext>, modification.txt)."
        )
    return records
