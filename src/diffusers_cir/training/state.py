# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Training-loop state as safetensors plus JSON: nothing in a checkpoint that can run code when it is read.

accelerate saves the model (safetensors), optimizer and LR scheduler (read back with ``weights_only=True``). The rest
of what an exact resume needs used to be pickles: the loop's data positions and noise generator
(``loop_state_N.pt``, read with ``weights_only=False``) and every object registered with
``accelerator.register_for_checkpointing`` (``custom_checkpoint_N.pkl``, which accelerate always unpickles). Here a
state (nested dicts, lists, tuples, numbers, strings, tensors, numpy arrays) is split into its tensors, written with
safetensors, and the rest, written as JSON with a reference in place of each tensor. Reading runs no code whatever
the files hold.

:func:`random_states` / :func:`set_random_states` capture Python's, numpy's, torch's and CUDA's global generators in
the same form; :class:`GeneratorState` and :class:`PythonRandomState` make a ``torch.Generator`` or a
``random.Random`` savable like any object with ``state_dict`` / ``load_state_dict``.
"""

from __future__ import annotations

import base64
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "GeneratorState",
    "PythonRandomState",
    "StateFormatError",
    "decode_state",
    "encode_state",
    "load_state_files",
    "random_states",
    "save_state_files",
    "set_random_states",
    "state_file_names",
]

# JSON objects standing for what JSON cannot hold; a dict whose keys could be mistaken for them is stored as pairs.
_MARKERS = ("__tensor__", "__ndarray__", "__tuple__", "__bytes__", "__pairs__")


class StateFormatError(ValueError):
    """A state file that does not decode (missing tensor, unknown marker, malformed JSON); names the file."""


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": path}
    if isinstance(value, np.ndarray):
        tensors[path] = torch.from_numpy(np.ascontiguousarray(value).copy())
        return {"__ndarray__": path}
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, bytes):
        return {"__bytes__": base64.b64encode(value).decode("ascii")}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(item, f"{path}.{index}", tensors) for index, item in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(item, f"{path}.{index}", tensors) for index, item in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value) and not any(key in _MARKERS for key in value):
            return {key: _encode(item, f"{path}.{key}", tensors) for key, item in value.items()}
        return {"__pairs__": [[_encode(key, f"{path}.key{index}", tensors), _encode(item, f"{path}.{index}", tensors)]
                              for index, (key, item) in enumerate(value.items())]}
    raise TypeError(
        f"Cannot save {type(value).__name__} at {path!r} of a training state: only dicts, lists, tuples, numbers, "
        "strings, bytes, None, tensors and numpy arrays are written (as JSON and safetensors)."
    )


def encode_state(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(json_tree, tensors)``: ``state`` with each tensor replaced by a reference into ``tensors``."""
    tensors: dict[str, torch.Tensor] = {}
    return _encode(state, "state", tensors), tensors


def decode_state(tree: Any, tensors: dict[str, torch.Tensor], source: str = "the state") -> Any:
    """The inverse of :func:`encode_state`."""

    def decode(node):
        if isinstance(node, list):
            return [decode(item) for item in node]
        if not isinstance(node, dict):
            return node
        marker = next((key for key in _MARKERS if key in node), None)
        if marker is None:
            return {key: decode(item) for key, item in node.items()}
        if len(node) != 1:
            raise StateFormatError(f"{source}: malformed entry {node!r}.")
        value = node[marker]
        if marker in ("__tensor__", "__ndarray__"):
            if value not in tensors:
                raise StateFormatError(f"{source}: the tensor {value!r} is missing from its safetensors file.")
            return tensors[value] if marker == "__tensor__" else tensors[value].numpy()
        if marker == "__bytes__":
            return base64.b64decode(value)
        if marker == "__tuple__":
            return tuple(decode(item) for item in value)
        return {decode(key): decode(item) for key, item in value}

    return decode(tree)


def state_file_names(stem: str) -> tuple[str, str]:
    """The two files of a state: ``<stem>.json`` and ``<stem>.safetensors``."""
    return f"{stem}.json", f"{stem}.safetensors"


def save_state_files(folder: str | os.PathLike, stem: str, state: Any) -> list[str]:
    """Write ``state`` as ``<stem>.json`` + ``<stem>.safetensors`` in ``folder``; returns the two file names."""
    from safetensors.torch import save_file

    tree, tensors = encode_state(state)
    json_name, tensor_name = state_file_names(stem)
    save_file(tensors, str(Path(folder) / tensor_name))
    with open(Path(folder) / json_name, "w", encoding="utf-8") as handle:
        json.dump({"format": "diffusers_cir.training.state/1", "state": tree}, handle)
    return [json_name, tensor_name]


def load_state_files(folder: str | os.PathLike, stem: str) -> Any:
    """Read what :func:`save_state_files` wrote (no code runs, whatever the files hold)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    json_name, tensor_name = state_file_names(stem)
    json_path, tensor_path = Path(folder) / json_name, Path(folder) / tensor_name
    try:
        with open(json_path, encoding="utf-8") as handle:
            document = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StateFormatError(f"{json_path} is not a training-state JSON file: {error}.") from None
    if not isinstance(document, dict) or "state" not in document:
        raise StateFormatError(f"{json_path} is not a training-state JSON file (no 'state').")
    try:
        tensors = load_file(str(tensor_path))
    except SafetensorError as error:  # a malformed header or truncated data
        raise StateFormatError(f"{tensor_path} is not a safetensors file: {error}.") from None
    return decode_state(document["state"], tensors, str(json_path))


# --------------------------------------------------------------------------------------------------- random states
def random_states() -> dict:
    """The global generators every loop draws from, directly or through libraries: Python's ``random``, numpy's,
    torch's CPU generator and, once CUDA is in use, every CUDA device's."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: dict) -> None:
    """Restore what :func:`random_states` captured."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(states["numpy"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class GeneratorState:
    """A ``torch.Generator`` as a checkpointable object."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["state"])


class PythonRandomState:
    """A ``random.Random`` (e.g. a collator's) as a checkpointable object."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def state_dict(self) -> dict:
        return {"state": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["state"]
        self.rng.setstate((version, tuple(internal), gauss))
