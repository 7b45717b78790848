"""Reading flax checkpoints pickled as one bytes object, without unpickling: the opcode walk and the msgpack decoding."""

import pathlib
import pickle
import re

import msgpack
import numpy as np
import pytest
import torch
from conftest import FIXTURES

from diffusers_cir.conversion.flax_checkpoint import (
    FlaxCheckpointError,
    UnsafePickleError,
    decode_flax_msgpack,
    flatten_tree,
    load_pickled_flax_checkpoint,
    looks_like_pickled_flax_checkpoint,
    read_pickled_bytes,
)

CHECKPOINT = FIXTURES / "magiclens_tiny" / "checkpoint.pkl"


def _array(values: np.ndarray, dtype_name: str | None = None) -> msgpack.ExtType:
    """An array leaf as flax writes it: ext type 1 holding msgpack [shape, dtype name, C-order bytes]."""
    record = (list(values.shape), dtype_name or values.dtype.name, values.tobytes("C"))
    return msgpack.ExtType(1, msgpack.packb(record, use_bin_type=True))


def _payload(tree) -> bytes:
    return msgpack.packb(tree, use_bin_type=True)


class _Trap:
    """Unpickling this creates the file it names: a refused pickle must never get that far."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_every_pickle_protocol_of_a_bytes_object_is_read(tmp_path, protocol):
    payload = _payload({"params": {"w": _array(np.arange(6, dtype=np.float32).reshape(2, 3))}})
    path = tmp_path / "checkpoint.pkl"
    path.write_bytes(pickle.dumps(payload, protocol=protocol))  # protocols 0-2 go through _codecs.encode
    assert read_pickled_bytes(path) == payload
    tree = load_pickled_flax_checkpoint(path)
    torch.testing.assert_close(tree["params"]["w"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert looks_like_pickled_flax_checkpoint(path)


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_pickle_with_a_reduce_payload_is_refused_and_never_runs(tmp_path, protocol):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Trap(marker), protocol=protocol))
    with pytest.raises(UnsafePickleError) as error:
        load_pickled_flax_checkpoint(path)
    assert str(path) in str(error.value)
    assert re.search(r"the global '\w+(\.\w+)+'", str(error.value))  # names the global it refused
    assert not marker.exists()


def test_a_payload_hidden_after_the_bytes_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps((b"\x80params", _Trap(marker)), protocol=2))
    with pytest.raises(UnsafePickleError, match=r"global '\w+\.\w+'"):
        read_pickled_bytes(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "value, what",
    [({"params": b"x"}, "EMPTY_DICT"), ([b"x"], "EMPTY_LIST"), (3, "opcode BININT1"), ("text", "pickled str")],
)
def test_anything_but_one_bytes_object_is_refused(tmp_path, value, what):
    path = tmp_path / "other.pkl"
    path.write_bytes(pickle.dumps(value, protocol=4))
    with pytest.raises(UnsafePickleError, match=what):
        read_pickled_bytes(path)


def test_a_codecs_call_with_other_arguments_is_refused(tmp_path):
    # _codecs.encode("x", "rot13") would be a legal call of the allowed global, but not how bytes are pickled
    path = tmp_path / "rot13.pkl"
    path.write_bytes(b"c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(UnsafePickleError, match="latin1"):
        read_pickled_bytes(path)


def test_truncated_empty_and_missing_files_are_named(tmp_path):
    data = CHECKPOINT.read_bytes()
    (tmp_path / "cut.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(FlaxCheckpointError, match="cut.pkl"):
        load_pickled_flax_checkpoint(tmp_path / "cut.pkl")
    (tmp_path / "empty.pkl").write_bytes(b"")
    with pytest.raises(FlaxCheckpointError, match="empty"):
        load_pickled_flax_checkpoint(tmp_path / "empty.pkl")
    with pytest.raises(FileNotFoundError, match="absent.pkl"):
        load_pickled_flax_checkpoint(tmp_path / "absent.pkl")


def test_bytes_that_are_not_msgpack_are_refused(tmp_path):
    path = tmp_path / "noise.pkl"
    path.write_bytes(pickle.dumps(b"\xc1 not msgpack", protocol=4))
    with pytest.raises(FlaxCheckpointError, match="not a flax msgpack checkpoint"):
        load_pickled_flax_checkpoint(path)


def test_flax_leaf_kinds_decode(tmp_path):
    bf16 = torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16)
    big = np.arange(10, dtype=np.float32)
    tree = {
        "scalar": msgpack.ExtType(3, msgpack.packb(([], "float32", np.float32(2.5).tobytes()), use_bin_type=True)),
        "half": _array(np.array([[1, 2]], dtype=np.float16)),
        "bf16": msgpack.ExtType(1, msgpack.packb(([3], "bfloat16", bf16.view(torch.int16).numpy().tobytes()), use_bin_type=True)),
        "ints": _array(np.array([7, -8], dtype=np.int32)),
        "empty": _array(np.zeros((0, 4), dtype=np.float32)),
        # flax splits arrays over 2**30 bytes into flat chunks
        "chunked": {"__msgpack_chunked_array__": True, "shape": {"0": 2, "1": 5},
                    "chunks": {"0": _array(big[:6]), "1": _array(big[6:])}},
    }
    decoded = decode_flax_msgpack(_payload({"params": tree}))["params"]
    assert decoded["scalar"].shape == () and decoded["scalar"].item() == 2.5
    assert decoded["half"].dtype == torch.float16 and decoded["half"].tolist() == [[1.0, 2.0]]
    assert torch.equal(decoded["bf16"], bf16)
    assert decoded["ints"].dtype == torch.int32 and decoded["ints"].tolist() == [7, -8]
    assert decoded["empty"].shape == (0, 4)
    assert torch.equal(decoded["chunked"], torch.from_numpy(big).reshape(2, 5))


def test_damaged_array_records_are_refused():
    short = msgpack.ExtType(1, msgpack.packb(([2, 3], "float32", b"\x00" * 8), use_bin_type=True))
    with pytest.raises(FlaxCheckpointError, match=r"holds 8 bytes instead of 24"):
        decode_flax_msgpack(_payload({"w": short}))
    with pytest.raises(FlaxCheckpointError, match="'object'"):
        decode_flax_msgpack(_payload({"w": msgpack.ExtType(1, msgpack.packb(([1], "object", b"\x00" * 8)))}))
    with pytest.raises(FlaxCheckpointError, match="extension of type 2"):
        decode_flax_msgpack(_payload({"w": msgpack.ExtType(2, msgpack.packb((1.0, 2.0)))}))
    with pytest.raises(FlaxCheckpointError, match="not a tree"):
        decode_flax_msgpack(_payload([1, 2]))


def test_the_reference_checkpoint_holds_every_listed_parameter():
    import json

    shapes = json.loads((CHECKPOINT.parent / "io.json").read_text())["param_shapes"]
    flat = flatten_tree(load_pickled_flax_checkpoint(CHECKPOINT))
    assert {key: list(value.shape) for key, value in flat.items()} == shapes
    assert {value.dtype for value in flat.values()} == {torch.float32}
    assert looks_like_pickled_flax_checkpoint(CHECKPOINT)
    assert not looks_like_pickled_flax_checkpoint(CHECKPOINT.parent / "io.safetensors")
