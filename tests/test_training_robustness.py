"""Training checkpoints under attack and faults: nothing in a checkpoint folder runs code, a checkpoint that changed
after it was saved is refused by name, and both trainers resume bit for bit (tiny in-process runs, seconds each).

Cases: crafted pickles (an earlier version's loop state and EMA, accelerate's optimizer file with the manifest
rewritten to match, accelerate's RNG file, an extra pickle nobody lists), flipped bytes at the same size in the model,
optimizer and loop-state files, a truncated file, a missing or malformed manifest, a manifest naming a path outside the
checkpoint, a checkpoint of more processes than the run has; LinCIR's exact resume; an earlier version's checkpoint
resuming exactly through the restricted unpickler.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_script
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from diffusers_cir.demo import build_world, write_training_data
from diffusers_cir.training import main, parse_args
from diffusers_cir.training.state import (
    decode_state,
    encode_state,
    load_state_files,
    random_states,
    save_state_files,
    set_random_states,
)
from diffusers_cir.utils.checksums import (
    MANIFEST_NAME,
    ChecksumError,
    file_digest,
    read_manifest,
    verify_manifest,
    write_manifest,
)

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "num_cross_attention_heads": 2}


# --------------------------------------------------------------------------------------------------- helpers
class _WritesMarker:
    """Unpickling this runs ``open(marker, 'w').write('ran')``: the code a crafted checkpoint file would carry."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _craft_pickle(path: Path, marker: Path) -> None:
    torch.save({"state": _WritesMarker(marker)}, path)
    # The file does run code when unpickled without restriction (so the tests below could fail).
    torch.load(path, weights_only=False)
    assert marker.read_text() == "ran"
    marker.unlink()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_training_data(build_world("tiny", seed=0), tmp_path_factory.mktemp("tiny_world"), num_train_triplets=200)


def compodiff_argv(data: str, output, *extra) -> list[str]:
    return [
        "--train-data-dir", data,
        "--text-encoder-name-or-path", os.path.join(data, "text_encoder"),
        "--tokenizer-name-or-path", os.path.join(data, "tokenizer"),
        "--transformer-config", json.dumps(TINY_MODEL),
        "--train-batch-size", "8", "--shuffle-buffer-size", "0", "--report-to", "none", "--seed", "3",
        "--learning-rate", "1e-3", "--lr-warmup-steps", "0", "--use-ema", "--ema-decay", "0.9",
        "--output-dir", str(output), *extra,
    ]


@pytest.fixture(scope="module")
def checkpointed_run(tiny_data, tmp_path_factory):
    """A CompoDiff run stopped after its step-2 checkpoint (to be copied, then damaged or resumed), and the weights of
    the same run trained straight to step 4."""
    root = tmp_path_factory.mktemp("compodiff_runs")
    main(parse_args(compodiff_argv(tiny_data, root / "stopped", "--max-train-steps", "4", "--checkpointing-steps", "2",
                                   "--stop-after-steps", "2")))
    main(parse_args(compodiff_argv(tiny_data, root / "straight", "--max-train-steps", "4", "--checkpointing-steps", "2")))
    return root


def _copy_run(checkpointed_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(checkpointed_run / "stopped", run)
    return run


def _resume(tiny_data, run: Path):
    return main(parse_args(compodiff_argv(tiny_data, run, "--max-train-steps", "4", "--checkpointing-steps", "2",
                                          "--resume-from-checkpoint", "latest")))


def _assert_same_weights(first: Path, second: Path) -> None:
    a, b = load_file(str(first)), load_file(str(second))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------------------------------- no code runs
def test_a_new_checkpoint_holds_no_pickle_of_the_loop(checkpointed_run):
    files = sorted(path.name for path in (checkpointed_run / "stopped" / "checkpoint-2").iterdir())
    assert "loop_state_0.json" in files and "loop_state_0.safetensors" in files and "shared_state.json" in files
    assert MANIFEST_NAME in files
    assert not [name for name in files if name.endswith((".pt", ".pkl")) and not name.startswith("random_states")]
    # What is left to accelerate (optimizer, scheduler, RNG) loads with torch's restricted unpickler, as accelerate
    # reads it (its RNG file with numpy's array type allowed).
    from accelerate.utils.other import load

    for name in files:
        if name.endswith((".bin", ".pkl")):
            assert load(checkpointed_run / "stopped" / "checkpoint-2" / name)


def _to_legacy_layout(checkpoint: Path) -> None:
    """Rewrite a checkpoint as the previous version wrote it: loop state and EMA as pickles, no checksums."""
    loop = load_state_files(checkpoint, "loop_state_0")["objects"]
    loop["noise_generator"] = loop["noise_generator"]["state"]
    torch.save(loop, checkpoint / "loop_state_0.pt")
    torch.save(load_state_files(checkpoint, "shared_state")["ema"], checkpoint / "custom_checkpoint_0.pkl")
    for name in ("loop_state_0.json", "loop_state_0.safetensors", "shared_state.json", "shared_state.safetensors",
                 MANIFEST_NAME):
        (checkpoint / name).unlink()


def test_an_earlier_versions_checkpoint_resumes_exactly_through_the_restricted_unpickler(checkpointed_run, tiny_data,
                                                                                         tmp_path, caplog):
    run = _copy_run(checkpointed_run, tmp_path)
    _to_legacy_layout(run / "checkpoint-2")
    with caplog.at_level("WARNING", logger="diffusers_cir.training"):
        summary = _resume(tiny_data, run)
    assert summary["global_step"] == 4
    assert "written by an earlier version, without checksums" in caplog.text
    _assert_same_weights(run / "checkpoint-4" / "model.safetensors",
                         checkpointed_run / "straight" / "checkpoint-4" / "model.safetensors")
    _assert_same_weights(run / "transformer" / "diffusion_pytorch_model.safetensors",
                         checkpointed_run / "straight" / "transformer" / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("crafted", ["loop_state_0.pt", "custom_checkpoint_0.pkl"])
def test_a_crafted_pickle_in_an_earlier_versions_checkpoint_never_runs(checkpointed_run, tiny_data, tmp_path, crafted):
    run = _copy_run(checkpointed_run, tmp_path)
    _to_legacy_layout(run / "checkpoint-2")
    marker = tmp_path / "marker"
    _craft_pickle(run / "checkpoint-2" / crafted, marker)
    with pytest.raises(RuntimeError, match=rf"Cannot resume from .*checkpoint-2.*{crafted}.* restricted unpickler"):
        _resume(tiny_data, run)
    assert not marker.exists()


@pytest.mark.parametrize("crafted", ["optimizer.bin", "scheduler.bin"])
def test_a_crafted_accelerate_file_with_a_matching_manifest_never_runs(checkpointed_run, tiny_data, tmp_path, crafted):
    """Checksums catch damage, not an attacker who rewrites the manifest too: then the restricted unpickler refuses."""
    run = _copy_run(checkpointed_run, tmp_path)
    marker = tmp_path / "marker"
    _craft_pickle(run / "checkpoint-2" / crafted, marker)
    write_manifest(run / "checkpoint-2")
    with pytest.raises(RuntimeError, match=r"Cannot resume from .*checkpoint-2") as error:
        _resume(tiny_data, run)
    assert "Unpickl" in str(error.value) or "weights_only" in str(error.value)
    assert not marker.exists()


def test_a_crafted_rng_file_never_runs_and_the_resume_stays_exact(checkpointed_run, tiny_data, tmp_path):
    """accelerate swallows a failure to read its RNG file; the loop's own copy of the random states keeps the resume
    exact."""
    run = _copy_run(checkpointed_run, tmp_path)
    marker = tmp_path / "marker"
    _craft_pickle(run / "checkpoint-2" / "random_states_0.pkl", marker)
    write_manifest(run / "checkpoint-2")
    _resume(tiny_data, run)
    assert not marker.exists()
    _assert_same_weights(run / "checkpoint-4" / "model.safetensors",
                         checkpointed_run / "straight" / "checkpoint-4" / "model.safetensors")


def test_an_unlisted_pickle_dropped_into_a_checkpoint_is_named_and_never_read(checkpointed_run, tiny_data, tmp_path,
                                                                             caplog):
    run = _copy_run(checkpointed_run, tmp_path)
    marker = tmp_path / "marker"
    _craft_pickle(run / "checkpoint-2" / "custom_checkpoint_0.pkl", marker)
    with caplog.at_level("WARNING", logger="diffusers_cir.training"):
        _resume(tiny_data, run)
    assert "holds files the training run did not write (not read): custom_checkpoint_0.pkl" in caplog.text
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------- damage
def _flip(path: Path, offset: int, count: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        data = handle.read(count)
        handle.seek(offset)
        handle.write(bytes(byte ^ 0xFF for byte in data))


@pytest.mark.parametrize(
    "name, offset, count",
    [
        ("model.safetensors", -4096, 4096),  # 4 KB of weights flipped, same size
        ("model.safetensors", 10, 8),  # inside the header
        ("optimizer.bin", -64, 16),
        ("loop_state_0.safetensors", -8, 8),  # the noise generator's state
        ("shared_state.safetensors", -4, 4),  # the EMA
        ("loop_state_0.json", 30, 1),
    ],
)
def test_bytes_changed_at_the_same_size_are_refused_naming_the_file(checkpointed_run, tiny_data, tmp_path, name, offset,
                                                                    count):
    run = _copy_run(checkpointed_run, tmp_path)
    path = run / "checkpoint-2" / name
    size = path.stat().st_size
    _flip(path, offset % size, count)
    assert path.stat().st_size == size
    with pytest.raises(RuntimeError, match=rf"Cannot resume from .*checkpoint-2 .*ChecksumError: .*{name} does not "
                                           r"match the xxh3_128 checksum written with it") as error:
        _resume(tiny_data, run)
    assert "--resume-from-checkpoint <name>" in str(error.value)
    assert not (run / "checkpoint-4").exists() and not (run / "model_index.json").exists()


def test_a_truncated_file_a_missing_file_and_a_missing_manifest_are_named(checkpointed_run, tiny_data, tmp_path):
    run = _copy_run(checkpointed_run, tmp_path)
    checkpoint = run / "checkpoint-2"
    with open(checkpoint / "optimizer.bin", "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(RuntimeError, match=r"optimizer.bin has 100 bytes, \d+ were written: the file is damaged"):
        _resume(tiny_data, run)
    (checkpoint / "optimizer.bin").unlink()
    with pytest.raises(RuntimeError, match=r"optimizer.bin is missing \(listed in .*checksums.json\)"):
        _resume(tiny_data, run)
    (checkpoint / MANIFEST_NAME).unlink()
    with pytest.raises(RuntimeError, match=r"checksums.json is missing: the checkpoint is incomplete"):
        _resume(tiny_data, run)
    (checkpoint / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(RuntimeError, match=r"checksums.json cannot be read as a checksum manifest"):
        _resume(tiny_data, run)


def test_a_checkpoint_of_more_processes_than_the_run_is_refused(checkpointed_run, tiny_data, tmp_path):
    """Resuming it with fewer processes would silently drop the other ranks' data positions."""
    run = _copy_run(checkpointed_run, tmp_path)
    checkpoint = run / "checkpoint-2"
    for suffix in (".json", ".safetensors"):
        shutil.copy(checkpoint / f"loop_state_0{suffix}", checkpoint / f"loop_state_1{suffix}")
    write_manifest(checkpoint)
    with pytest.raises(RuntimeError, match=r"holds the loop state of 2 process\(es\), this run has 1"):
        _resume(tiny_data, run)


# --------------------------------------------------------------------------------------------------- LinCIR
def _lincir_world(root: Path) -> Path:
    from diffusers_cir.utils import build_offline_clip_tokenizer

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=16, bos_token_id=49406,
                            eos_token_id=49407, pad_token_id=49407)
    CLIPTextModelWithProjection(config).save_pretrained(root / "clip" / "text_encoder")
    build_offline_clip_tokenizer().save_pretrained(root / "clip" / "tokenizer")
    captions = [f"a {color} {thing} on a {place}" for color in ("red", "blue", "green", "white")
                for thing in ("car", "dog", "cup") for place in ("road", "table")]
    (root / "captions.txt").write_text("\n".join(captions + ["zzz qqq", "xxyy"]) + "\n")  # the last: no keywords
    return root


def test_lincir_resumes_to_exactly_the_weights_of_an_uninterrupted_run(tmp_path):
    """The noise generator, the collator's random-word fallback, phi's dropout (global generator) and the stream
    position are all restored; the 8 steps cross an epoch boundary (26 captions, batches of 4) after the resume."""
    script = load_script(REPO / "examples" / "train_lincir.py", "train_lincir_robustness")
    root = _lincir_world(tmp_path)

    def argv(output, *extra):
        return ["--pretrained-model-name-or-path", str(root / "clip"), "--train-data", str(root / "captions.txt"),
                "--output-dir", str(output), "--batch-size", "4", "--keyword-extractor", "builtin", "--seed", "0",
                "--shuffle-buffer-size", "0", "--max-train-steps", "8", "--checkpointing-steps", "3",
                "--learning-rate", "1e-2", "--use-ema", "--ema-decay", "0.9", "--phi-dropout", "0.5", *extra]

    script.main(argv(tmp_path / "straight"))
    first = script.main(argv(tmp_path / "resumed", "--stop-after-steps", "3"))
    assert first["stopped_early"] and not (tmp_path / "resumed" / "model_index.json").exists()
    second = script.main(argv(tmp_path / "resumed", "--resume-from-checkpoint", "latest"))
    assert second["resumed_from_step"] == 3 and second["global_step"] == 8
    _assert_same_weights(tmp_path / "resumed" / "checkpoint-6" / "model.safetensors",
                         tmp_path / "straight" / "checkpoint-6" / "model.safetensors")
    _assert_same_weights(tmp_path / "resumed" / "phi" / "diffusion_pytorch_model.safetensors",
                         tmp_path / "straight" / "phi" / "diffusion_pytorch_model.safetensors")
    # Training moved phi between the checkpoints (the comparison is not of two untouched copies).
    before = load_file(str(tmp_path / "straight" / "checkpoint-3" / "model.safetensors"))
    after = load_file(str(tmp_path / "straight" / "checkpoint-6" / "model.safetensors"))
    assert any(not torch.equal(before[key], after[key]) for key in before)


def test_lincir_refuses_a_damaged_checkpoint_naming_the_file(tmp_path):
    script = load_script(REPO / "examples" / "train_lincir.py", "train_lincir_robustness_damage")
    root = _lincir_world(tmp_path)
    argv = ["--pretrained-model-name-or-path", str(root / "clip"), "--train-data", str(root / "captions.txt"),
            "--output-dir", str(tmp_path / "out"), "--batch-size", "4", "--keyword-extractor", "builtin",
            "--shuffle-buffer-size", "0", "--max-train-steps", "4", "--checkpointing-steps", "2"]
    script.main([*argv, "--stop-after-steps", "2"])
    _flip(tmp_path / "out" / "checkpoint-2" / "model.safetensors", 200, 64)
    with pytest.raises(RuntimeError, match=r"checkpoint-2/model.safetensors does not match the xxh3_128 checksum"):
        script.main([*argv, "--resume-from-checkpoint", "latest"])


# --------------------------------------------------------------------------------------------------- units
def test_state_files_round_trip_every_kind_of_value(tmp_path):
    import numpy as np

    state = {
        "tuple": (3, (1, 2), None), "ints": {1: "one", (2, 3): [4.5, float("nan")]}, "bytes": b"\x00\xff",
        "tensor": torch.arange(6, dtype=torch.uint8).reshape(2, 3), "array": np.arange(5, dtype=np.uint32),
        "__tensor__": "a key that looks like a marker", "nested": [{"flag": True, "value": 1e-300}],
    }
    save_state_files(tmp_path, "state", state)
    loaded = load_state_files(tmp_path, "state")
    assert loaded["tuple"] == (3, (1, 2), None) and loaded["bytes"] == b"\x00\xff"
    assert loaded["ints"][1] == "one" and loaded["ints"][(2, 3)][0] == 4.5 and np.isnan(loaded["ints"][(2, 3)][1])
    assert torch.equal(loaded["tensor"], state["tensor"]) and loaded["array"].dtype == np.uint32
    assert np.array_equal(loaded["array"], state["array"]) and loaded["__tensor__"] == state["__tensor__"]
    assert loaded["nested"] == [{"flag": True, "value": 1e-300}]
    with pytest.raises(TypeError, match=r"Cannot save object at 'state.what'"):
        encode_state({"what": object()})


def test_random_states_round_trip_through_state_files(tmp_path):
    import random

    import numpy as np

    save_state_files(tmp_path, "random", random_states())
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(3)  # move every generator on
    set_random_states(load_state_files(tmp_path, "random"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_a_state_file_whose_tensor_is_missing_or_malformed_is_named(tmp_path):
    from diffusers_cir.training.state import StateFormatError

    save_state_files(tmp_path, "state", {"weights": torch.ones(2)})
    tree, _ = encode_state({"weights": torch.ones(2)})
    with pytest.raises(StateFormatError, match="the tensor 'state.weights' is missing"):
        decode_state(tree, {}, "state.json")
    (tmp_path / "state.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(StateFormatError, match=r"state.safetensors is not a safetensors file"):
        load_state_files(tmp_path, "state")
    (tmp_path / "state.json").write_text("[1, 2")
    with pytest.raises(StateFormatError, match=r"state.json is not a training-state JSON file"):
        load_state_files(tmp_path, "state")


def test_manifests_verify_name_the_file_and_stay_inside_their_folder(tmp_path):
    folder = tmp_path / "parts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(os.urandom(10_000))
    (folder / "sub" / "b.json").write_text("{}")
    manifest = write_manifest(folder)
    assert sorted(manifest["files"]) == ["a.bin", "sub/b.json"] and verify_manifest(folder) == read_manifest(folder)
    _flip(folder / "a.bin", 5_000, 1)
    with pytest.raises(ChecksumError, match=r"a.bin does not match") as error:
        verify_manifest(folder)
    assert error.value.path == str(folder / "a.bin")
    # A BLAKE2b manifest (no xxhash installed where it was written) verifies too.
    write_manifest(folder, algorithm="blake2b")
    assert read_manifest(folder)["algorithm"] == "blake2b" and verify_manifest(folder)
    assert file_digest(folder / "a.bin", "blake2b") == read_manifest(folder)["files"]["a.bin"]["digest"]
    (tmp_path / "outside.bin").write_bytes(b"x")
    for escaping in ("../outside.bin", str(tmp_path / "outside.bin"), "sub/../../outside.bin"):
        document = {"algorithm": "blake2b", "files": {escaping: {"size": 1, "digest": "00"}}}
        (folder / MANIFEST_NAME).write_text(json.dumps(document))
        with pytest.raises(ChecksumError, match="which is not a path inside"):
            verify_manifest(folder)
    os.symlink(tmp_path / "outside.bin", folder / "link.bin")
    (folder / MANIFEST_NAME).write_text(json.dumps({"algorithm": "blake2b", "files": {"link.bin": {"size": 1, "digest": "00"}}}))
    with pytest.raises(ChecksumError, match="leads outside"):
        verify_manifest(folder)
    (folder / MANIFEST_NAME).write_text(json.dumps({"algorithm": "md5", "files": {}}))
    with pytest.raises(ChecksumError, match="Unknown checksum algorithm 'md5'"):
        verify_manifest(folder)


def test_restricted_unpickler_message_names_the_file(tmp_path):
    """What the legacy path reads is refused by torch before any of it runs; the error names the file."""
    from diffusers_cir.training.checkpoints import _restricted_load

    marker = tmp_path / "marker"
    _craft_pickle(tmp_path / "evil.pt", marker)
    with pytest.raises(ValueError, match=r"evil.pt \(an earlier version's pickle\) cannot be read as plain data"):
        _restricted_load(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.save({"epoch": 3, "state": torch.arange(3)}, tmp_path / "plain.pt")  # plain data still loads
    loaded = _restricted_load(tmp_path / "plain.pt")
    assert loaded["epoch"] == 3 and torch.equal(loaded["state"], torch.arange(3))
