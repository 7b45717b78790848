"""The files of a saved ``GalleryIndex`` folder: names, manifest validation, checks against sizes and checksums.

See :mod:`diffusers_cir.retrieval.index` for the layout. Every name a manifest lists must be a plain file name of the
folder (a path like ``../../other/index.faiss`` or a link leading outside is refused before anything is read); with
``checksums.json`` (written last by ``GalleryIndex.save``) every file is compared with the digest written with it.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from ..utils.checksums import MANIFEST_NAME as CHECKSUMS_NAME
from ..utils.checksums import ChecksumError, verify_manifest
from .errors import IndexFormatError

INDEX_FORMAT = "diffusers-cir-gallery-index"
INDEX_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
IDS_NAME = "ids.npy"
METADATA_NAME = "metadata.jsonl"
SINGLE_PART_NAME = "index.faiss"
IVFDATA_NAME = "index.ivfdata"

def read_manifest(directory: str | os.PathLike) -> dict:
    """Read and validate the manifest of a saved index folder."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if directory.exists() and not directory.is_dir():
        raise IndexFormatError(
            f"{directory} is a file, not an index folder: pass the folder `diffusers-cir index build` (or "
            "GalleryIndex.save) wrote, the one holding manifest.json."
        )
    if not directory.is_dir():
        raise IndexFormatError(f"Index folder {directory} does not exist.")
    if not path.exists():
        raise IndexFormatError(
            f"{directory} is not a diffusers-cir index: it has no {MANIFEST_NAME} (an interrupted save, or the "
            "wrong folder)."
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise IndexFormatError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        raise IndexFormatError(f"{path} is not a {INDEX_FORMAT} manifest.")
    if manifest.get("format_version") != INDEX_FORMAT_VERSION:
        raise IndexFormatError(
            f"{path} has format version {manifest.get('format_version')}; this diffusers-cir reads version "
            f"{INDEX_FORMAT_VERSION}."
        )
    files, parts = manifest.get("files"), manifest.get("parts")
    if not isinstance(files, dict) or not all(isinstance(size, int) for size in files.values()):
        raise IndexFormatError(f"{path} is invalid: 'files' must map each file name to its size in bytes.")
    if not isinstance(parts, list) or not parts or not all(
        isinstance(part, dict) and isinstance(part.get("file"), str) and isinstance(part.get("ntotal"), int)
        for part in parts
    ):
        raise IndexFormatError(f"{path} is invalid: 'parts' must list each index part as {{'file', 'ntotal'}}.")
    for name in [*files, *(part["file"] for part in parts)]:
        _file_in(directory, name)
    return manifest


def _file_in(directory: Path, name: str) -> Path:
    """``directory / name`` for a plain file name of the folder; a path that would read another file is refused."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or Path(name).is_absolute():
        raise IndexFormatError(
            f"{directory / MANIFEST_NAME} names the file {name!r}: an index lists plain file names inside its own "
            "folder, so the index is damaged or was not written by diffusers-cir. Rebuild it."
        )
    path = directory / name
    if path.is_symlink() and directory.resolve() not in path.resolve().parents:
        raise IndexFormatError(f"{path} is a link leading outside {directory}: refused. Copy the file into the folder.")
    return path


def check_files(directory: Path, manifest: dict, verify_checksums: bool) -> None:
    """Every listed file present at its size and, with ``verify_checksums``, with the digest written with it."""
    listed = manifest["files"]
    checksums = manifest.get("checksums")
    if checksums is not None and checksums != CHECKSUMS_NAME:
        raise IndexFormatError(f"{directory / MANIFEST_NAME} names checksums {checksums!r}; expected {CHECKSUMS_NAME!r}.")
    if checksums is not None and verify_checksums:
        try:
            verified = verify_manifest(directory, CHECKSUMS_NAME)["files"]
        except ChecksumError as error:
            raise IndexFormatError(
                f"{error} Rebuild the index (diffusers-cir index build ... --no-resume), or restore the file from a copy."
            ) from error
        unverified = sorted((set(listed) | {MANIFEST_NAME}) - set(verified))
        if unverified:
            raise IndexFormatError(f"{directory / CHECKSUMS_NAME} does not list {unverified}: rebuild the index.")
        return
    if checksums is None:
        warnings.warn(
            f"The index {directory} was saved without content checksums (by an earlier diffusers-cir): only file "
            "sizes were checked, so changed bytes would go unnoticed. Save it again to add them: "
            "GalleryIndex.load(folder).save(folder).",
            stacklevel=3,
        )
    for name, size in listed.items():
        path = directory / name
        if not path.is_file():
            raise IndexFormatError(f"Index file {path} is missing (listed in {MANIFEST_NAME}).")
        if path.stat().st_size != size:
            raise IndexFormatError(
                f"Index file {path} has {path.stat().st_size} bytes but {size} were written: it is truncated or "
                "was modified. Rebuild the index (or restore the file)."
            )


def read_metadata(path: Path, expected: int) -> list:
    try:
        with open(path, encoding="utf-8") as handle:
            metadata = [json.loads(line) for line in handle]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IndexFormatError(f"Could not read {path}: {error}. Rebuild the index.") from error
    if len(metadata) != expected:
        raise IndexFormatError(f"{path} has {len(metadata)} entries for {expected} indexed vectors. Rebuild the index.")
    wrong = next(
        (line for line, item in enumerate(metadata, start=1) if item is not None and not isinstance(item, dict)), None
    )
    if wrong is not None:
        raise IndexFormatError(f"{path}:{wrong} is not a JSON object (or null). Rebuild the index.")
    return metadata
