# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Read a flax checkpoint that was pickled as one ``bytes`` object, without unpickling anything.

The released MagicLens weights (``magic_lens_clip_base.pkl``, ``magic_lens_clip_large.pkl``) are
``pickle.dump(flax.serialization.to_bytes(variables))``: a pickle whose only object is a ``bytes`` value, which holds
flax's msgpack serialisation of the variables tree. ``pickle.load`` on a file from the internet can run any code, so
the pickle is never loaded. Its opcodes are walked with :func:`pickletools.genops` instead, and only what a pickled
``bytes`` value needs is accepted:

* protocol 3 and later: ``PROTO``, ``FRAME``, ``SHORT_BINBYTES`` / ``BINBYTES`` / ``BINBYTES8``, the memo opcodes and
  ``STOP``;
* protocol 0 to 2, which have no bytes opcode: the call ``_codecs.encode(<str>, "latin1")`` (``GLOBAL`` of exactly that
  function, its string arguments in a tuple, ``REDUCE``), evaluated here as ``str.encode("latin1")``.

Anything else (another global, a dict, a list, a call of anything but ``_codecs.encode``) is refused with
:class:`UnsafePickleError` naming the file, the opcode and its position; nothing is ever executed.

The msgpack payload (flax's format) is a tree of maps with string keys whose leaves are arrays: a msgpack extension
of type 1 (type 3 for a NumPy scalar) whose data is itself msgpack ``[shape, dtype name, raw C-order little-endian
bytes]``. flax splits arrays above 2**30 bytes into a map ``{"__msgpack_chunked_array__": True, "shape": {"0": ...},
"chunks": {"0": flat piece, ...}}``. It is decoded with the ``msgpack`` package into ``torch`` tensors (``bfloat16``
included, which NumPy lacks), with no JAX or flax dependency.
"""

from __future__ import annotations

import math
import mmap
import os
import pickletools
from pathlib import Path
from typing import Any

__all__ = [
    "FlaxCheckpointError",
    "UnsafePickleError",
    "decode_flax_msgpack",
    "flatten_tree",
    "load_pickled_flax_checkpoint",
    "looks_like_pickled_flax_checkpoint",
    "read_pickled_bytes",
]

_ARRAY_EXT = 1
_SCALAR_EXT = 3
_CHUNKED = "__msgpack_chunked_array__"

# The opcodes a pickled bytes value may use (anything else is refused; see the module docstring).
_DATA_OPCODES = {"SHORT_BINBYTES", "BINBYTES", "BINBYTES8"}
_STRING_OPCODES = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"}
_MEMO_PUT_OPCODES = {"MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GET_OPCODES = {"GET", "BINGET", "LONG_BINGET"}
_TUPLE_SIZES = {"EMPTY_TUPLE": 0, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
# Protocols 0-2 pickle bytes as _codecs.encode(str, "latin1"); pickletools gives a GLOBAL's argument as "module name".
_ENCODE_GLOBAL = "_codecs encode"
# Reads at least this long come back as views of the mapped file, not copies (the payload is up to ~2 GB).
_VIEW_THRESHOLD = 1 << 16


class FlaxCheckpointError(ValueError):
    """The file is not a flax msgpack checkpoint pickled as one bytes object (or is damaged)."""


class UnsafePickleError(FlaxCheckpointError):
    """The pickle holds something other than one bytes object: refused without running it."""


class _Encode:
    """Stands for ``_codecs.encode`` on the evaluation stack (never called as such)."""


class _MappedReader:
    """The file-like object :func:`pickletools.genops` reads from: small reads are ``bytes`` (opcodes and their
    arguments), long ones are zero-copy views of the mapped file (the payload)."""

    def __init__(self, mapped: mmap.mmap):
        self._mapped = mapped
        self._view = memoryview(mapped)
        self._position = 0

    def read(self, size: int = -1):
        end = len(self._view) if size < 0 else min(self._position + size, len(self._view))
        chunk = self._view[self._position : end]
        self._position = end
        return chunk if len(chunk) >= _VIEW_THRESHOLD else chunk.tobytes()

    def readline(self) -> bytes:
        end = self._mapped.find(b"\n", self._position)
        end = len(self._view) if end < 0 else end + 1
        line = self._view[self._position : end].tobytes()  # the text opcodes need bytes methods
        self._position = end
        return line

    def tell(self) -> int:
        return self._position

    def release(self) -> None:
        self._view.release()


def _refuse(path: str, opcode: str, position: int | None, detail: str = "") -> UnsafePickleError:
    where = f" at byte {position}" if position is not None else ""
    return UnsafePickleError(
        f"{path}: the pickle holds {opcode}{where}{detail}, which a pickled bytes object (a flax msgpack checkpoint) "
        "never needs. The file is refused and was not unpickled: it may run code when loaded with pickle. Use the "
        "authors' released file (magic_lens_clip_base.pkl / magic_lens_clip_large.pkl)."
    )


def _pop_mark(stack: list, marks: list, path: str, position) -> list:
    if not marks:
        raise _refuse(path, "a tuple without its MARK", position)
    start = marks.pop()
    items = stack[start:]
    del stack[start:]
    return items


def _reduce(stack: list, path: str, position) -> None:
    if len(stack) < 2:
        raise _refuse(path, "REDUCE on a short stack", position)
    arguments, function = stack.pop(), stack.pop()
    if not isinstance(function, _Encode):
        raise _refuse(path, "REDUCE of something other than _codecs.encode", position)
    if not (
        isinstance(arguments, tuple) and len(arguments) == 2 and isinstance(arguments[0], str)
        and arguments[1] == "latin1"
    ):
        raise _refuse(path, "a _codecs.encode call", position, " whose arguments are not (<str>, 'latin1')")
    stack.append(arguments[0].encode("latin1"))


def _evaluate(opcodes, path: str):
    """Run the few opcodes of a pickled bytes value on a stack of plain values; refuse every other opcode."""
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    marks: list[int] = []
    for opcode, argument, position in opcodes:
        name = opcode.name
        if name == "PROTO":
            if not 0 <= argument <= 5:
                raise _refuse(path, f"PROTO {argument}", position)
        elif name == "FRAME":
            continue
        elif name in _DATA_OPCODES or name in _STRING_OPCODES:
            stack.append(argument)
        elif name in _MEMO_PUT_OPCODES:
            if not stack:
                raise _refuse(path, f"{name} on an empty stack", position)
            memo[len(memo) if name == "MEMOIZE" else argument] = stack[-1]
        elif name in _MEMO_GET_OPCODES:
            if argument not in memo:
                raise _refuse(path, f"{name} of an unset memo slot", position)
            stack.append(memo[argument])
        elif name == "GLOBAL":
            if argument != _ENCODE_GLOBAL:
                raise _refuse(path, f"the global {argument.replace(' ', '.')!r}", position)
            stack.append(_Encode())
        elif name == "STACK_GLOBAL":  # protocol 4+ never needs a global for bytes: name the one asked for
            named = stack[-2:] if len(stack) >= 2 and all(isinstance(item, str) for item in stack[-2:]) else None
            raise _refuse(path, f"the global {'.'.join(named)!r} (STACK_GLOBAL)" if named else "STACK_GLOBAL", position)
        elif name == "MARK":
            marks.append(len(stack))
        elif name == "TUPLE":
            stack.append(tuple(_pop_mark(stack, marks, path, position)))
        elif name in _TUPLE_SIZES:
            size = _TUPLE_SIZES[name]
            if len(stack) < size:
                raise _refuse(path, f"{name} on a short stack", position)
            items = tuple(stack[len(stack) - size :])
            del stack[len(stack) - size :]
            stack.append(items)
        elif name == "REDUCE":
            _reduce(stack, path, position)
        elif name == "STOP":
            if len(stack) != 1 or not isinstance(stack[0], (bytes, memoryview)):
                kind = type(stack[-1]).__name__ if stack else "nothing"
                raise _refuse(path, f"a pickled {kind}", position, " instead of one bytes object")
            return stack[0]
        else:
            raise _refuse(path, f"the opcode {name}", position)
    raise FlaxCheckpointError(f"{path}: the pickle ends before its STOP opcode (a truncated download?).")


def read_pickled_bytes(path: str | os.PathLike) -> bytes:
    """The one ``bytes`` object pickled in ``path``, read without unpickling (a copy; see
    :func:`load_pickled_flax_checkpoint` for the zero-copy path used on checkpoints)."""
    path = os.fspath(path)
    with _mapped_file(path) as reader:
        payload = None
        try:
            payload = _walk(reader, path)
            return bytes(payload)
        finally:
            if isinstance(payload, memoryview):
                payload.release()
            reader.release()


def _walk(reader: _MappedReader, path: str):
    try:
        return _evaluate(pickletools.genops(reader), path)
    except FlaxCheckpointError:
        raise
    except (ValueError, UnicodeDecodeError) as error:  # an unknown opcode byte, a truncated argument
        raise FlaxCheckpointError(f"{path} is not a readable pickle ({error}).") from error


class _mapped_file:
    def __init__(self, path: str):
        self.path = path

    def __enter__(self) -> _MappedReader:
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"No checkpoint file at {self.path!r}.")
        self._handle = open(self.path, "rb")
        if os.fstat(self._handle.fileno()).st_size == 0:
            self._handle.close()
            raise FlaxCheckpointError(f"{self.path} is empty.")
        self._mapped = mmap.mmap(self._handle.fileno(), 0, access=mmap.ACCESS_READ)
        return _MappedReader(self._mapped)

    def __exit__(self, *exc_info) -> None:
        self._handle.close()
        try:
            self._mapped.close()
        except BufferError:  # views held by a propagating exception's frames: the map closes when they are freed
            pass


# ------------------------------------------------------------------------------------------------------ msgpack


def _torch_dtype(name: str, path: str):
    import torch

    dtype = getattr(torch, name, None) if name in _DTYPE_NAMES else None
    if dtype is None:
        raise FlaxCheckpointError(f"{path}: an array has the dtype {name!r}, which a weights checkpoint cannot hold.")
    return dtype


_DTYPE_NAMES = {"float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"}


def _decode_array(data: bytes, path: str):
    import msgpack
    import torch

    try:
        shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise FlaxCheckpointError(f"{path}: an array record is damaged ({error}).") from error
    dtype = _torch_dtype(dtype_name.decode("ascii", "replace"), path)
    shape = tuple(int(size) for size in shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(buffer) != math.prod(shape) * itemsize:
        raise FlaxCheckpointError(
            f"{path}: an array of shape {shape} and dtype {dtype} holds {len(buffer)} bytes instead of "
            f"{math.prod(shape) * itemsize} (a damaged file?)."
        )
    if not buffer:
        return torch.empty(shape, dtype=dtype)
    # bytearray: torch.frombuffer needs a writable buffer to give a tensor it owns
    return torch.frombuffer(bytearray(buffer), dtype=dtype).reshape(shape)


def _unchunk(node: dict, where: str, path: str):
    import torch

    try:
        shape = tuple(int(node["shape"][str(axis)]) for axis in range(len(node["shape"])))
        chunks = [node["chunks"][str(index)] for index in range(len(node["chunks"]))]
    except (KeyError, TypeError, ValueError) as error:
        raise FlaxCheckpointError(f"{path}: the chunked array at {where!r} is damaged ({error!r}).") from error
    flat = torch.cat([chunk.reshape(-1) for chunk in chunks])
    if flat.numel() != math.prod(shape):
        raise FlaxCheckpointError(f"{path}: the chunked array at {where!r} does not fill its shape {shape}.")
    return flat.reshape(shape)


def _restore_chunks(node: Any, where: str, path: str):
    if isinstance(node, dict):
        if _CHUNKED in node:
            return _unchunk(node, where, path)
        return {key: _restore_chunks(value, f"{where}/{key}" if where else key, path) for key, value in node.items()}
    return node


def decode_flax_msgpack(payload, path: str | os.PathLike = "<payload>") -> dict:
    """Decode flax's msgpack serialisation (``flax.serialization.to_bytes``) into nested dicts of ``torch`` tensors.

    ``payload`` is a bytes-like object; ``path`` only names the source in errors.
    """
    import msgpack

    path = os.fspath(path)

    def ext_hook(code: int, data: bytes):
        if code == _ARRAY_EXT:
            return _decode_array(data, path)
        if code == _SCALAR_EXT:
            return _decode_array(data, path).reshape(())
        raise FlaxCheckpointError(f"{path}: the msgpack payload holds an extension of type {code}, not an array.")

    try:
        tree = msgpack.unpackb(payload, ext_hook=ext_hook, raw=False)
    except FlaxCheckpointError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise FlaxCheckpointError(
            f"{path}: the pickled bytes are not a flax msgpack checkpoint ({type(error).__name__}: {error})."
        ) from error
    if not isinstance(tree, dict):
        raise FlaxCheckpointError(f"{path}: the msgpack payload holds a {type(tree).__name__}, not a tree of arrays.")
    return _restore_chunks(tree, "", path)


def load_pickled_flax_checkpoint(path: str | os.PathLike) -> dict:
    """The variables tree of a flax checkpoint pickled as one bytes object (the released MagicLens ``.pkl``), as
    nested dicts of ``torch`` tensors. Nothing is unpickled (see the module docstring); the payload is read from a
    memory map, so the file's bytes are not held twice."""
    path = os.fspath(path)
    with _mapped_file(path) as reader:
        payload = None
        try:
            payload = _walk(reader, path)
            return decode_flax_msgpack(payload, path)
        finally:
            if isinstance(payload, memoryview):
                payload.release()
            reader.release()


def flatten_tree(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"params": {"clip": {"logit_scale": x}}}`` -> ``{"params/clip/logit_scale": x}``."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten_tree(value, name))
        else:
            flat[name] = value
    return flat


def looks_like_pickled_flax_checkpoint(path: str | os.PathLike) -> bool:
    """Cheap check on the first bytes: a pickle (``PROTO``, or a protocol-0..2 ``_codecs`` call) whose payload starts
    with a msgpack map holding ``params``."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(512)
    except OSError:
        return False
    if head[:1] == b"\x80":
        return b"\xa6params" in head  # msgpack fixstr "params"
    return head.startswith(b"c_codecs\nencode\n") and b"params" in head
