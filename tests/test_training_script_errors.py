"""The CompoDiff training script on the user's mistakes and accidents: damaged checkpoints, validation settings the
data cannot honour, and what a time-limited run reports. Tiny in-process runs on the tiny synthetic world."""

import json
import logging
import os

import pytest
import torch

from diffusers_cir.demo import build_world, write_training_data
from diffusers_cir.training import main, parse_args

TINY_MODEL = {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "num_cross_attention_heads": 2}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_training_data(build_world("tiny", seed=0), tmp_path_factory.mktemp("tiny_world"), num_train_triplets=200)


def run_args(data: str, output, *extra) -> list[str]:
    return [
        "--train_data_dir", data,
        "--text_encoder_name_or_path", os.path.join(data, "text_encoder"),
        "--tokenizer_name_or_path", os.path.join(data, "tokenizer"),
        "--transformer_config", json.dumps(TINY_MODEL),
        "--train_batch_size", "8", "--shuffle_buffer_size", "0", "--report_to", "none",
        "--output_dir", str(output), *extra,
    ]


@pytest.mark.usefixtures("single_thread")
def test_resuming_from_a_damaged_checkpoint_names_it_and_the_other_checkpoints(tiny_data, tmp_path):
    output = tmp_path / "run"
    main(parse_args(run_args(tiny_data, output, "--max_train_steps", "4", "--checkpointing_steps", "2",
                             "--stop_after_steps", "4")))
    assert (output / "checkpoint-2").is_dir() and (output / "checkpoint-4").is_dir()
    with open(output / "checkpoint-4" / "model.safetensors", "r+b") as handle:
        handle.truncate(100)  # e.g. a disk that filled up while a copy of the run was made
    resume = run_args(tiny_data, output, "--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    with pytest.raises(RuntimeError, match=r"Cannot resume from .*checkpoint-4 .*--resume-from-checkpoint <name> "
                                           r"\(checkpoint-2\)"):
        main(parse_args(resume))
    # An emptied checkpoint is reported as incomplete, not as one written by fewer processes.
    for path in (output / "checkpoint-4").iterdir():
        path.unlink()
    with pytest.raises(RuntimeError, match="checkpoint is incomplete") as error:
        main(parse_args(resume))
    assert "fewer processes" not in str(error.value)


@pytest.mark.usefixtures("single_thread")
def test_resuming_at_max_train_steps_says_it_only_saves_the_final_model(tiny_data, tmp_path, caplog):
    from safetensors.torch import load_file

    output = tmp_path / "run"
    main(parse_args(run_args(tiny_data, output, "--max_train_steps", "4", "--stop_after_steps", "2",
                             "--checkpointing_steps", "100")))
    assert [path.name for path in output.glob("checkpoint-*")] == ["checkpoint-2"]
    assert not (output / "model_index.json").exists()
    caplog.set_level(logging.WARNING, logger="diffusers_cir.training")
    summary = main(parse_args(run_args(tiny_data, output, "--max_train_steps", "2", "--resume_from_checkpoint", "latest")))
    assert summary["global_step"] == 2 and not summary["stopped_early"]
    warnings = [record.getMessage() for record in caplog.records if "nothing left to train" in record.getMessage()]
    assert len(warnings) == 1 and warnings[0].endswith(
        "checkpoint-2 is already at --max-train-steps 2: nothing left to train, saving the final model from it."
    ), warnings
    saved = load_file(str(output / "transformer" / "diffusion_pytorch_model.safetensors"))
    checkpointed = load_file(str(output / "checkpoint-2" / "model.safetensors"))
    assert saved.keys() == checkpointed.keys() and all(torch.equal(saved[k], checkpointed[k]) for k in saved)


@pytest.mark.usefixtures("single_thread")
def test_validation_recall_ks_larger_than_the_gallery_are_reported_not_silently_dropped(tiny_data, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="diffusers_cir.training")
    summary = main(parse_args(run_args(tiny_data, tmp_path / "run", "--max_train_steps", "1", "--validation_steps", "1",
                                       "--num_validation_queries", "8", "--validation_recall_ks", "1,5000",
                                       "--validation_inference_steps", "2")))
    assert "recall_at1" in summary["metrics"] and "recall_at5000" not in summary["metrics"]
    warnings = [record.getMessage() for record in caplog.records if "--validation-recall-ks" in record.getMessage()]
    assert len(warnings) == 1 and "K=[5000]" in warnings[0], warnings


@pytest.mark.usefixtures("single_thread")
def test_a_run_stopped_by_stop_after_steps_reports_its_data_and_skipped_rows(tiny_data, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="diffusers_cir.training")
    summary = main(parse_args(run_args(tiny_data, tmp_path / "run", "--max_train_steps", "4", "--stop_after_steps", "1")))
    assert summary["stopped_early"]
    messages = [record.getMessage() for record in caplog.records]
    assert any(message.endswith(f"Data (triplets): {summary['data']['triplets']}") for message in messages), messages[-5:]
    assert any("Rows per objective" in message for message in messages)


@pytest.mark.usefixtures("single_thread")
def test_data_that_cannot_be_opened_is_named_by_its_flags_before_the_models_load(tiny_data, tmp_path):
    args = run_args(tiny_data, tmp_path / "run", "--max_train_steps", "1")
    args[args.index("--text_encoder_name_or_path") + 1] = str(tmp_path / "no-text-encoder")  # never reached
    with pytest.raises(ValueError, match=r"--train-data-dir .*--train-split 'trian'\) could not be opened: .*trian"):
        main(parse_args(args + ["--train_split", "trian"]))
    with pytest.raises(ValueError, match=r"--text-to-image-data-dir .*--text-to-image-split 'tset'\) could not be opened"):
        main(parse_args(args + ["--text_to_image_data_dir", tiny_data, "--text_to_image_config_name", "gallery",
                                "--text_to_image_split", "tset"]))


@pytest.mark.usefixtures("single_thread")
def test_a_warmup_longer_than_the_run_is_a_logged_warning_naming_both_flags(tiny_data, tmp_path, caplog):
    """--lr_warmup_steps above --max_train_steps was accepted without a word: the learning rate never peaks."""
    caplog.set_level(logging.WARNING, logger="diffusers_cir.training")
    main(parse_args(run_args(tiny_data, tmp_path / "run", "--max_train_steps", "2", "--lr_warmup_steps", "8",
                             "--learning_rate", "0.001")))
    warnings = [record.getMessage() for record in caplog.records if "--lr-warmup-steps" in record.getMessage()]
    assert len(warnings) == 1, warnings
    assert ("--lr-warmup-steps 8 is larger than --max-train-steps 2: the learning rate is still warming up when "
            "training ends and never reaches its peak (--learning-rate 0.001), only about 25% of it") in warnings[0]
    from diffusers_cir.training.arguments import lr_warmup_warning

    # Nothing to say when the warmup ends within the run, or when the scheduler has no warmup.
    for extra in (["--lr_warmup_steps", "2"], ["--lr_warmup_steps", "8", "--lr_scheduler", "constant"]):
        assert lr_warmup_warning(parse_args(run_args(tiny_data, tmp_path / "other", "--max_train_steps", "2", *extra))) is None
    for scheduler in ("linear", "cosine", "constant_with_warmup"):
        args = parse_args(run_args(tiny_data, tmp_path / "other", "--max_train_steps", "2", "--lr_warmup_steps", "3",
                                   "--lr_scheduler", scheduler))
        assert "--lr-warmup-steps 3 is larger than --max-train-steps 2" in lr_warmup_warning(args)
