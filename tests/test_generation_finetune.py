"""Checkpoints of the caption-editor fine-tuning (generation/finetune.py): written whole with checksums, verified on
resume, a changed file refused by name, a pickle dropped into a checkpoint never read. Tiny OPT, CPU, seconds."""

import pickle
from pathlib import Path

import pytest

from diffusers_cir.generation.finetune import FinetuneConfig, finetune_caption_editor
from diffusers_cir.generation.tiny import tiny_causal_lm

pytestmark = pytest.mark.usefixtures("single_thread")

TRIPLETS = [("a dog on grass", "make it red", "a red dog on grass"), ("a cup", "as a sketch", "a sketch of a cup")] * 2


def _train(output_dir, steps, resume=False, log=None):
    model, tokenizer = tiny_causal_lm()
    config = FinetuneConfig(learning_rate=1e-2, max_train_steps=steps, train_batch_size=2, max_length=32,
                            use_lora=False, lr_scheduler="constant")
    messages = []
    model = finetune_caption_editor(model, tokenizer, TRIPLETS, config, output_dir=str(output_dir),
                                    checkpointing_steps=2, resume=resume, progress=False, log=messages.append)
    return model, messages


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("finetune")
    model, _ = _train(output_dir, 4)
    return output_dir, {name: value.clone() for name, value in model.state_dict().items()}


def test_checkpoints_are_complete_with_checksums(run):
    output_dir, _ = run
    names = sorted(path.name for path in output_dir.iterdir())
    assert names == ["checkpoint-2", "checkpoint-4"], names  # no .partial left behind
    for name in names:
        files = {path.name for path in (output_dir / name).iterdir()}
        assert {"checksums.json", "model.safetensors", "loop_state_0.json"} <= files, files
        # accelerate's own files (optimizer.bin, random_states_0.pkl) are read back with weights_only=True; nothing
        # of the loop is a pickle
        assert not any(file.endswith(".pt") or file.startswith("custom_checkpoint") for file in files), files


def _copy_run(run, tmp_path) -> Path:
    import shutil

    target = tmp_path / "run"
    shutil.copytree(run[0], target)
    return target


def test_resume_continues_from_the_latest_checkpoint(run, tmp_path):
    output_dir = _copy_run(run, tmp_path)
    model, messages = _train(output_dir, 6, resume=True)
    assert "Resuming from checkpoint-4 (step 4)." in messages
    assert (output_dir / "checkpoint-6" / "checksums.json").is_file()
    # It trained on from the saved weights: two more steps moved them, but not from the random start.
    moved = max((model.state_dict()[name] - value).abs().max().item() for name, value in run[1].items())
    assert 0 < moved < 1.0


def test_a_named_checkpoint_resumes_and_an_unknown_one_is_named(run, tmp_path):
    output_dir = _copy_run(run, tmp_path)
    _, messages = _train(output_dir, 4, resume="checkpoint-2")
    assert "Resuming from checkpoint-2 (step 2)." in messages
    with pytest.raises(ValueError, match=r"'checkpoint-9' is not a checkpoint-<step> folder"):
        _train(output_dir, 4, resume="checkpoint-9")


@pytest.mark.parametrize("offset", [4096, -64])
def test_changed_weights_at_the_same_size_are_refused_naming_the_file(run, tmp_path, offset):
    output_dir = _copy_run(run, tmp_path)
    weights = output_dir / "checkpoint-4" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    start = offset % len(data)
    data[start : start + 8] = bytes(255 - b for b in data[start : start + 8])
    weights.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=r"Cannot resume from .*checkpoint-4.*model\.safetensors.*checkpoint-2"):
        _train(output_dir, 6, resume=True)


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "ran"))


def test_the_crafted_pickle_runs_code_when_unpickled(tmp_path):
    """What the next test relies on: unpickling the file without restriction would run its code."""
    pickle.loads(pickle.dumps(_Marker(tmp_path / "marker")))
    assert (tmp_path / "marker").read_text() == "ran"


@pytest.mark.parametrize("name", ["random_states_0.pkl", "optimizer.bin", "custom_checkpoint_0.pkl"])
def test_a_crafted_pickle_in_a_checkpoint_never_runs(run, tmp_path, caplog, name):
    output_dir = _copy_run(run, tmp_path)
    marker = tmp_path / "marker"
    (output_dir / "checkpoint-4" / name).write_bytes(pickle.dumps(_Marker(marker)))
    if name == "custom_checkpoint_0.pkl":  # not a file of the run: named, not read, and the resume goes on
        _, messages = _train(output_dir, 6, resume=True)
        assert "Resuming from checkpoint-4 (step 4)." in messages
        assert "holds files the training run did not write (not read): custom_checkpoint_0.pkl" in caplog.text
    else:  # a file of the run: its checksum no longer matches
        with pytest.raises(RuntimeError, match=rf"Cannot resume from .*checkpoint-4.*{name}"):
            _train(output_dir, 6, resume=True)
    assert not marker.exists()
