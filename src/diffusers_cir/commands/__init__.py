"""Sub-commands of the ``diffusers-cir`` command line (see ``diffusers_cir.cli``)."""

from __future__ import annotations

import functools
import sys


def errors_as_messages(run):
    """Wrap a command's ``run(args)`` so that a ``ValueError`` (bad input, a mismatched or damaged index), a missing
    input (``FileNotFoundError``) or an output that is already there (``FileExistsError``, which names the flag to
    overwrite it) prints ``error: <message>`` to stderr and exits with status 2: a message, not a traceback."""

    @functools.wraps(run)
    def wrapper(args) -> int:
        try:
            return run(args)
        except (ValueError, FileNotFoundError, FileExistsError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2

    return wrapper
