# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""One writer per output folder: a ``filelock`` lock on ``FOLDER/.diffusers-cir.lock``.

Two runs writing into one folder (two ``index build`` into the same ``--output``, two ``data write`` of the same
dataset) interleave their files and both report success; the folder then holds a mix, or only the last one's work.
Whoever writes a folder holds its lock for as long as it writes, and a second writer is refused at once with an error
naming the folder (it does not wait: a run that waited would then overwrite what the first one just wrote).

The lock is an OS lock (``fcntl.flock``) on the file, not the file's existence: a killed run releases it with its
process, and the file that stays behind locks nothing. Locks are re-entrant within one process (a command that locks
its output may call library functions that lock it again). On a network file system whose locks do not work across
machines (some NFS set-ups), two machines are not kept apart.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["LOCK_NAME", "FolderLockedError", "folder_lock", "lock_folder"]

LOCK_NAME = ".diffusers-cir.lock"


class FolderLockedError(FileExistsError):
    """Another process is writing into the folder; ``folder`` names it."""

    def __init__(self, message: str, folder: str | os.PathLike):
        super().__init__(message)
        self.folder = str(folder)


def lock_folder(folder: str | os.PathLike, hint: str = "wait for it to finish, or write to another folder"):
    """Create ``folder`` if needed and take its lock; returns the held ``filelock.FileLock`` (call ``release()``).

    Raises:
        FolderLockedError: another process holds the lock; the message names the folder and ends with ``hint``
            (what to do, in the caller's words: ``"... or pass another --output"``).
    """
    from filelock import FileLock, Timeout

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a folder: write to a folder path.")
    folder.mkdir(parents=True, exist_ok=True)
    # One FileLock object per path in this process (is_singleton), shared by its threads: taking it again is a
    # re-entrant count, not a second flock on another file descriptor (which would refuse its own process).
    lock = FileLock(str(folder / LOCK_NAME), is_singleton=True, thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise FolderLockedError(
            f"Another process is writing to {folder} (it holds the lock {folder / LOCK_NAME}): {hint}. The lock goes "
            "with its process, so it is free again as soon as that run ends or is killed.",
            folder,
        ) from None
    return lock


@contextmanager
def folder_lock(
    folder: str | os.PathLike, hint: str = "wait for it to finish, or write to another folder"
) -> Iterator[Path]:
    """``with folder_lock(output):`` hold the lock of ``output`` (see :func:`lock_folder`) while writing it."""
    lock = lock_folder(folder, hint)
    try:
        yield Path(folder)
    finally:
        lock.release()
