"""A second process that holds a folder's writer lock, for the tests of the one-writer rule."""

import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from diffusers_cir.utils.locks import LOCK_NAME


@contextmanager
def held_by_another_process(folder: Path):
    """A second process holding ``folder``'s writer lock (as a running `index build` or `data write` would)."""
    folder.mkdir(parents=True, exist_ok=True)
    code = ("import sys, filelock; lock = filelock.FileLock(sys.argv[1]); lock.acquire(timeout=20); "
            "print('held', flush=True); sys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", code, str(folder / LOCK_NAME)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        yield child
    finally:
        child.stdin.close()
        child.wait(timeout=60)
