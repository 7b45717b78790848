# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""The output folder of a conversion holds exactly the new conversion.

``save_pretrained`` into a folder that already holds a model only overwrites the files it writes: weight files of
another format or sharding, and component folders the new conversion does not have, stay next to the new files and
can be what a later ``from_pretrained`` loads. So a conversion writes into a staging folder next to the output and
swaps it in at the end: a failed conversion leaves the output folder as it was, and a replaced one leaves nothing
behind. A non-empty output folder is replaced only when asked (``overwrite=True``, ``--overwrite``), and only when it
is itself a saved diffusers model or pipeline (an earlier conversion), never some other folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def _is_diffusers_save(folder: Path) -> bool:
    """A pipeline folder (``model_index.json``) or a model folder (``config.json`` written by diffusers)."""
    if (folder / "model_index.json").is_file():
        return True
    try:
        with open(folder / "config.json", encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "_class_name" in config


def check_output_folder(output: str | os.PathLike, overwrite: bool = False, flag: str = "overwrite=True") -> None:
    """Refuse, before any work, an output the conversion may not write: a file, a non-empty folder without
    ``overwrite``, or (even with it) a non-empty folder that is not an earlier conversion."""
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"The output {str(path)!r} is a file, not a folder.")
    if not path.is_dir():
        return
    entries = sorted(entry.name for entry in path.iterdir())
    if not entries:
        return
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    if not _is_diffusers_save(path):
        raise FileExistsError(
            f"The output folder {str(path)!r} is not empty ({shown}) and is not an earlier conversion (no "
            "model_index.json, no diffusers config.json): it is left alone. Choose another output folder, or empty it "
            "yourself."
        )
    if not overwrite:
        raise FileExistsError(
            f"The output folder {str(path)!r} already holds a converted model ({shown}): its files would mix with the "
            f"new ones. Pass {flag} to replace it, or choose another output folder."
        )


@contextlib.contextmanager
def replace_output_folder(
    output: str | os.PathLike, overwrite: bool = False, flag: str = "overwrite=True"
) -> Iterator[Path]:
    """Yield a staging folder to save into; when the block succeeds it becomes ``output`` (an earlier conversion
    there is removed only then), when it fails it is deleted and ``output`` is untouched."""
    check_output_folder(output, overwrite, flag)
    path = Path(os.path.realpath(output))  # a symlinked output: replace the folder it points to
    path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    staging = path.with_name(f".{path.name}.converting-{token}")
    staging.mkdir()  # not tempfile.mkdtemp: its 0700 mode would become the output's
    try:
        yield staging
        check_output_folder(path, overwrite, flag)  # it may have changed while the conversion ran
        previous = None
        if path.exists():
            previous = path.with_name(f".{path.name}.replaced-{token}")
            os.replace(path, previous)
        try:
            os.replace(staging, path)
        except BaseException:
            if previous is not None:
                os.replace(previous, path)
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if previous is not None:
        shutil.rmtree(previous)
