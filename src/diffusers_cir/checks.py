# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Argument checks at the public boundary: pipeline calls, the command line, training scripts, evaluate modules.

Every check returns the value in its canonical form (an ``int`` for a numpy integer, a list for one string) or raises
``ValueError`` naming the argument, the value and what is expected. Code behind the boundary trusts what these
checks let through and asserts its own invariants instead of checking again.

``bool`` is never an integer here although Python makes it one: ``k=True`` is a mistake, not a request for one result.

The module imports nothing heavy (no torch at import time), so the command line can use it while it parses.

Example:
    >>> from diffusers_cir.checks import check_int, check_float
    >>> check_int(3, "k", minimum=1)
    3
    >>> check_float(0.5, "source_weight", minimum=0.0, maximum=1.0)
    0.5
    >>> check_int(True, "k", minimum=1)
    Traceback (most recent call last):
    ...
    ValueError: `k` must be an integer >= 1, got True (bool).
"""

from __future__ import annotations

import argparse
import math
import numbers
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

__all__ = [
    "argparse_type",
    "check_choice",
    "check_dir",
    "check_file",
    "check_finite_tensors",
    "check_float",
    "check_int",
    "check_non_negative_int",
    "check_positive_int",
    "check_probability",
    "check_same_length",
    "check_seed",
    "check_string",
    "check_texts",
    "describe",
    "is_integer",
]

MAX_SEED = 2**64 - 1


def describe(value: Any) -> str:
    """``repr`` of a value with its type, shortened: ``True (bool)``, ``'10' (str)``."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def is_integer(value: Any) -> bool:
    """A Python or numpy integer (a 0-dimensional integer tensor/array too), never a ``bool``."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return False
    if isinstance(value, numbers.Integral):
        return True
    shape = getattr(value, "shape", None)
    dtype = str(getattr(value, "dtype", ""))
    return shape is not None and tuple(shape) == () and "int" in dtype


def _range_text(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    return ""


def check_int(value: Any, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an ``int`` if it is an integer (not a bool) within ``[minimum, maximum]``."""
    if not is_integer(value) or (minimum is not None and int(value) < minimum) or (
        maximum is not None and int(value) > maximum
    ):
        raise ValueError(f"`{name}` must be an integer{_range_text(minimum, maximum)}, got {describe(value)}.")
    return int(value)


def check_positive_int(value: Any, name: str) -> int:
    return check_int(value, name, minimum=1)


def check_non_negative_int(value: Any, name: str) -> int:
    return check_int(value, name, minimum=0)


def check_seed(value: Any, name: str = "seed") -> int:
    """A seed torch's and numpy's generators both take: an integer in ``[0, 2**64 - 1]``."""
    return check_int(value, name, minimum=0, maximum=MAX_SEED)


def check_float(
    value: Any,
    name: str,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
) -> float:
    """``value`` as a finite ``float`` (an int is accepted, a bool is not) within the given bounds.

    NaN and infinities are always refused: a NaN guidance scale or mixing weight turns every output into NaN without
    an error.
    """
    number = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else None
    if number is None and is_integer(value):
        number = float(int(value))
    ok = number is not None and math.isfinite(number)
    if ok and minimum is not None:
        ok = number > minimum if exclusive_minimum else number >= minimum
    if ok and maximum is not None:
        ok = number < maximum if exclusive_maximum else number <= maximum
    if not ok:
        low = "" if minimum is None else ("(" if exclusive_minimum else "[") + f"{minimum}, "
        high = "" if maximum is None else f"{maximum}" + (")" if exclusive_maximum else "]")
        bounds = f" in {low or '(-inf, '}{high or 'inf)'}" if (minimum is not None or maximum is not None) else ""
        raise ValueError(f"`{name}` must be a finite number{bounds}, got {describe(value)}.")
    return number


def check_probability(value: Any, name: str, *, allow_one: bool = True) -> float:
    """A probability in ``[0, 1]`` (``[0, 1)`` with ``allow_one=False``, e.g. a dropout rate)."""
    return check_float(value, name, 0.0, 1.0, exclusive_maximum=not allow_one)


def check_choice(value: Any, name: str, choices: Iterable) -> Any:
    """``value`` if it is one of ``choices``; the message lists them."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {describe(value)}.")
    return value


def check_string(value: Any, name: str, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str) or (not allow_empty and not value):
        raise ValueError(f"`{name}` must be a{' non-empty' if not allow_empty else ''} string, got {describe(value)}.")
    return value


def check_texts(value: Any, name: str) -> list[str]:
    """One string or a non-empty list/tuple of strings, as a list."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(text, str) for text in value):
        return list(value)
    if isinstance(value, (list, tuple)):
        kinds = sorted({type(text).__name__ for text in value})
        held = f" holding {kinds}" if value else " (empty)"
        raise ValueError(f"`{name}` must be a string or a non-empty list of strings, got {type(value).__name__}{held}.")
    raise ValueError(f"`{name}` must be a string or a non-empty list of strings, got {describe(value)}.")


def check_file(path: Any, name: str) -> Path:
    """An existing file (``str`` or ``os.PathLike``)."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"`{name}` must be a file path, got {describe(path)}.")
    resolved = Path(path)
    if not resolved.is_file():
        what = "a folder" if resolved.is_dir() else "no file"
        raise ValueError(f"`{name}` is {str(path)!r}, but there is {what} there: pass the path of a file.")
    return resolved


def check_dir(path: Any, name: str) -> Path:
    """An existing folder (``str`` or ``os.PathLike``)."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"`{name}` must be a folder path, got {describe(path)}.")
    resolved = Path(path)
    if not resolved.is_dir():
        what = "a file" if resolved.is_file() else "nothing"
        raise ValueError(f"`{name}` is {str(path)!r}, but there is {what} there: pass the path of a folder.")
    return resolved


def check_finite_tensors(tensors: dict[str, Any]) -> None:
    """Refuse NaN or infinite values in the given tensors (``None`` entries are skipped), naming the first argument
    that holds one. One reduction per tensor and one host synchronisation in all, whatever their number.

    The reduction is a sum (in at least float32): NaN and infinities propagate through it, so a finite sum proves
    the tensor finite, and it is several times cheaper than ``isfinite().all()``, which writes a mask. Only a tensor
    whose sum is not finite (a NaN or infinite value, or finite values whose sum overflows) is looked at closely.
    """
    import torch

    named = [(name, tensor) for name, tensor in tensors.items() if torch.is_tensor(tensor) and tensor.is_floating_point()]
    named = [(name, tensor) for name, tensor in named if tensor.numel() and tensor.device.type != "meta"]
    if not named:
        return
    device = named[0][1].device
    sums = [
        tensor.sum(dtype=torch.float32 if tensor.dtype in (torch.float16, torch.bfloat16) else None).to(device)
        for _, tensor in named
    ]
    sums = torch.stack(sums)
    if bool(torch.isfinite(sums).all()):
        return
    for index in (~torch.isfinite(sums)).nonzero().flatten().tolist():
        name, tensor = named[index]
        count = int((~torch.isfinite(tensor)).sum())
        if count:
            raise ValueError(
                f"`{name}` holds {count} NaN or infinite value(s) (shape {tuple(tensor.shape)}): every value must be "
                "finite."
            )


def argparse_type(check: Callable[..., Any], parse: Callable[[str], Any] = int, **bounds) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses the text and runs ``check`` on it, so a bad value is refused while the command
    line is read (argparse names the flag: ``argument --k: expected an integer >= 1, got '0'``).

    Example:
        >>> positive = argparse_type(check_int, minimum=1)
        >>> positive("3")
        3
    """

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            value = text
        try:
            return check(value, "value", **bounds)
        except ValueError as error:
            expected = str(error).split(" must be ", 1)[-1].split(", got ")[0]
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def check_same_length(name: str, values: Sequence, other_name: str, other: Sequence) -> None:
    if len(values) != len(other):
        raise ValueError(f"`{name}` has {len(values)} entries but `{other_name}` has {len(other)}: give one per query.")
