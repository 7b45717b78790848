"""Sub-commands of the ``diffusers-cir`` command line (see ``diffusers_cir.cli``)."""

from __future__ import annotations

import argparse


def int_at_least(minimum: int, what: str):
    """argparse type for a count, size or seed flag: checked when the command line is read, not after a model has
    loaded or a gallery has been embedded. argparse names the flag: ``argument --rows: expected <what>, got -2``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


positive_int = int_at_least(1, "a positive integer")
non_negative_int = int_at_least(0, "0 or a positive integer")
