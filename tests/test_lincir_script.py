"""`examples/train_lincir.py` as a user drives it: output folders, resuming, argument checks (tiny CLIP, seconds)."""

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import load_script
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from diffusers_cir import LinCIRPipeline, TextualInversionProjection
from diffusers_cir.utils import build_offline_clip_tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_lincir.py"
CAPTIONS = [f"a {color} {thing} on a {place}" for color in ("red", "blue", "green", "white") for thing in ("car", "dog", "cup")
            for place in ("road", "table")]


def _load_script():
    return load_script(SCRIPT, "train_lincir_script")


@pytest.fixture(scope="module")
def script():
    return _load_script()


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lincir_script")
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                            max_position_embeddings=77, projection_dim=16, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    CLIPTextModelWithProjection(config).save_pretrained(root / "clip" / "text_encoder")
    build_offline_clip_tokenizer().save_pretrained(root / "clip" / "tokenizer")
    (root / "captions.txt").write_text("\n".join(CAPTIONS) + "\n")
    return root


def _args(root, output_dir, *extra, clip=None):
    return ["--pretrained_model_name_or_path", str(clip or root / "clip"), "--train_data", str(root / "captions.txt"),
            "--output_dir", str(output_dir), "--batch_size", "4", "--keyword_extractor", "builtin", "--seed", "0",
            "--shuffle_buffer_size", "0", *extra]


def usage_error(capsys, call) -> str:
    """The one-line `error:` a bad command line exits with (status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ": error: " in err, err
    return err


def test_new_run_into_a_folder_with_checkpoints_is_refused_before_loading_anything(script, tiny_world, tmp_path, capsys):
    (tmp_path / "checkpoint-100").mkdir()
    missing_model = tmp_path / "no-such-model"  # would fail to load if the script got that far
    err = usage_error(capsys, lambda: script.main(_args(tiny_world, tmp_path, "--max_train_steps", "1", clip=missing_model)))
    assert re.search(r"already holds checkpoints .*checkpoint-100.*--resume-from-checkpoint latest", err), err
    err = usage_error(capsys, lambda: script.main(_args(tiny_world, tmp_path, "--max_train_steps", "1",
                                                        "--resume_from_checkpoint", "checkpoint-7", clip=missing_model)))
    assert "--resume-from-checkpoint 'checkpoint-7' is not a checkpoint-<step> folder" in err, err


def test_latest_without_checkpoints_starts_and_a_partial_checkpoint_is_never_resumed(script, tiny_world, tmp_path):
    out = tmp_path / "out"
    first = script.main(_args(tiny_world, out, "--max_train_steps", "2", "--checkpointing_steps", "2",
                              "--resume_from_checkpoint", "latest"))
    assert first["global_step"] == 2 and first["resumed_from_step"] is None
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    (out / "checkpoint-3.partial").mkdir()  # what a run killed while saving leaves behind
    resumed = script.main(_args(tiny_world, out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"))
    assert resumed["resumed_from_step"] == 2 and resumed["global_step"] == 3
    assert LinCIRPipeline.from_pretrained(out).phi.config.input_dim == 16


def test_resuming_a_checkpoint_past_max_train_steps_is_refused_before_loading_anything(script, tiny_world, tmp_path, capsys):
    out = tmp_path / "out"
    script.main(_args(tiny_world, out, "--max_train_steps", "2", "--checkpointing_steps", "2"))
    missing_model = tmp_path / "no-such-model"  # would fail to load if the script got that far
    capsys.readouterr()
    err = usage_error(capsys, lambda: script.main(_args(tiny_world, out, "--max_train_steps", "1",
                                                        "--resume_from_checkpoint", "latest", clip=missing_model)))
    assert "checkpoint-2, at step 2, past --max-train-steps 1" in err, err


def test_a_new_run_over_an_earlier_runs_saved_pipeline_is_refused(script, tiny_world, tmp_path, capsys):
    """As in train_compodiff: the new run would overwrite the earlier run's pipeline."""
    out = tmp_path / "out"
    script.main(_args(tiny_world, out, "--max_train_steps", "1"))
    capsys.readouterr()
    err = usage_error(capsys, lambda: script.main(_args(tiny_world, out, "--max_train_steps", "1",
                                                        clip=tmp_path / "no-such-model")))
    assert re.search(r"--output-dir .*out' already holds the outputs of an earlier run \(model_index.json\)", err), err


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--logging_steps", "0", "argument --logging-steps/--logging_steps: expected an integer >= 1, got '0'"),
        ("--checkpointing_steps", "0", "argument --checkpointing-steps/--checkpointing_steps: expected an integer >= 1, got '0'"),
        ("--checkpoints_total_limit", "0", "argument --checkpoints-total-limit/--checkpoints_total_limit: expected an integer >= 1, got '0'"),
        ("--shuffle_buffer_size", "-1", "argument --shuffle-buffer-size/--shuffle_buffer_size: expected an integer >= 0, got '-1'"),
        ("--learning_rate", "0", r"argument --learning-rate/--learning_rate: expected a finite number in \(0.0, inf\), got '0'"),
        ("--learning-rate", "nan", r"argument --learning-rate/--learning_rate: expected a finite number in \(0.0, inf\), got 'nan'"),
        ("--phi_dropout", "1", r"argument --phi-dropout/--phi_dropout: expected a finite number in \[0.0, 1.0\), got '1'"),
        ("--ema_decay", "1.5", r"argument --ema-decay/--ema_decay: expected a finite number in \[0.0, 1.0\], got '1.5'"),
        ("--validation_ks", "0", "argument --validation-ks/--validation_ks: expected an integer >= 1, got '0'"),
        ("--batch_size", "0", "argument --batch-size/--batch_size: expected an integer >= 1, got '0'"),
        ("--phi_hidden_dim", "0", "argument --phi-hidden-dim/--phi_hidden_dim: expected an integer >= 1, got '0'"),
        ("--seed", "-1", r"argument --seed: expected an integer in \[0, 4294967295\], got '-1'"),
        ("--max_grad_norm", "-1", r"argument --max-grad-norm/--max_grad_norm: expected a finite number in \[0.0, inf\), got '-1'"),
        ("--prompt_template", "a photo of $ that {text} {x}", r"'\{text\}' must be its only replacement field"),
        ("--prompt_template", "a photo that {text}", r"argument --prompt-template/--prompt_template: expected a template containing '\$'"),
        # get_scheduler refused these only after the data was opened and the CLIP towers loaded
        ("--lr_scheduler", "cosinus", r"argument --lr-scheduler/--lr_scheduler: invalid choice: 'cosinus' \(choose from .*cosine"),
        ("--lr_scheduler", "piecewise_constant", r"argument --lr-scheduler/--lr_scheduler: invalid choice: 'piecewise_constant'"),
        ("--validation_steps", "3", "--validation-steps needs --validation-data"),
    ],
)
def test_bad_numbers_are_refused_when_the_command_line_is_read(script, flag, value, expected, capsys, tmp_path):
    err = usage_error(capsys, lambda: script.parse_args(["--pretrained_model_name_or_path", "m", "--train_data", "c.txt",
                                                         "--output_dir", str(tmp_path / "o"), flag, value]))
    assert re.search(expected, err), err


def test_bad_training_and_validation_data_fail_before_the_models_load(script, tiny_world, tmp_path):
    missing_model = tmp_path / "no-such-model"  # would fail to load if the script got that far
    args = _args(tiny_world, tmp_path / "out", "--max_train_steps", "1", clip=missing_model)
    typo = args.copy()
    typo[typo.index("--train_data") + 1] = str(tiny_world / "captions.tx")
    with pytest.raises(ValueError, match=r"--train-data '.*captions\.tx' .*cannot be opened"):
        script.main(typo)
    with pytest.raises(FileNotFoundError, match="--validation-data needs"):
        script.main([*args, "--validation_data", str(tmp_path / "no-such-validation")])
    validation = tmp_path / "validation"
    validation.mkdir()
    save_file({"image_embeds": torch.randn(3, 16)}, str(validation / "gallery.safetensors"))
    (validation / "queries.jsonl").write_text('{"reference": 0, "text": "red", "target": 1}\n{"reference": 1, "text": "x", "target": 3}\n')
    with pytest.raises(ValueError, match=r"query 2 has target=3, expected a gallery position in \[0, 3\)"):
        script.main([*args, "--validation_data", str(validation)])


def test_empty_captions_are_skipped_counted_and_reported(script, tiny_world, tmp_path, caplog):
    rows = ["a red car on a road", "", "a blue dog on a table", "   ", "$ $", "a green cup", "a white dog", "a red cup"]
    (tmp_path / "captions.txt").write_text("\n".join(rows + CAPTIONS) + "\n")
    args = _args(tiny_world, tmp_path / "out", "--max_train_steps", "2")
    args[args.index("--train_data") + 1] = str(tmp_path / "captions.txt")
    with caplog.at_level("WARNING", logger="train_lincir"):
        summary = script.main(args)
    # No shuffling, no workers: the two steps read the first 8 rows, 3 of them empty once cleaned.
    assert summary["skipped_empty_captions"] == 3 and summary["global_step"] == 2
    assert "Skipped 3 caption(s)" in caplog.text

    (tmp_path / "blank.txt").write_text("\n" * 12)
    args[args.index("--train_data") + 1] = str(tmp_path / "blank.txt")
    args[args.index("--output_dir") + 1] = str(tmp_path / "blank-out")
    with pytest.raises(ValueError, match="yielded no full batch"):
        script.main(args)


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide state: a run with another --mixed_precision needs it reset (before and after)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_mixed_precision_does_not_leak_into_the_saved_text_encoder(script, tiny_world, tmp_path, fresh_accelerator_state):
    script.main(_args(tiny_world, tmp_path / "out", "--max_train_steps", "1", "--mixed_precision", "bf16"))
    pipe = LinCIRPipeline.from_pretrained(tmp_path / "out")
    assert pipe.text_encoder.dtype == torch.float32 and pipe.phi.dtype == torch.float32
    source = CLIPTextModelWithProjection.from_pretrained(tiny_world / "clip" / "text_encoder")
    for name, tensor in source.state_dict().items():
        assert torch.equal(pipe.text_encoder.state_dict()[name], tensor), name


def _released_phi_file(path, input_dim=16, hidden_dim=8, output_dim=32):
    """A phi in LinCIR's released layout (an nn.Sequential under 'Phi'), as `lincir_large.pt` holds it."""
    torch.manual_seed(1)
    sequential = torch.nn.Sequential(torch.nn.Linear(input_dim, hidden_dim), torch.nn.GELU(), torch.nn.Dropout(0.5),
                                     torch.nn.Linear(hidden_dim, hidden_dim), torch.nn.GELU(), torch.nn.Dropout(0.5),
                                     torch.nn.Linear(hidden_dim, output_dim))
    torch.save({"Phi": {f"layers.{k}": v for k, v in sequential.state_dict().items()}}, path)
    return path


def test_resume_phi_whose_widths_contradict_the_flags_or_the_text_tower_is_refused_by_name(script, tiny_world, tmp_path):
    folder = tmp_path / "phi"
    TextualInversionProjection(input_dim=16, hidden_dim=8, output_dim=32).save_pretrained(folder)
    released = _released_phi_file(tmp_path / "lincir.pt")
    missing_model = tmp_path / "no-such-model"  # would fail to load if the script got that far
    for checkpoint in (folder, released):
        args = _args(tiny_world, tmp_path / "out", "--max_train_steps", "1", "--resume_phi", str(checkpoint), "--phi_hidden_dim", "64",
                     clip=missing_model)
        with pytest.raises(ValueError, match=r"--phi-hidden-dim 64 does not match --resume-phi '.*', whose hidden layers have width 8"):
            script.main(args)
    # The other widths are the text tower's, known once it is loaded.
    TextualInversionProjection(input_dim=12, hidden_dim=8, output_dim=32).save_pretrained(tmp_path / "phi-12")
    with pytest.raises(ValueError, match=r"--resume-phi '.*phi-12' maps 12 -> 32, but the CLIP text tower .* needs 16 \(its projection_dim\)"):
        script.main(_args(tiny_world, tmp_path / "out", "--max_train_steps", "1", "--resume_phi", str(tmp_path / "phi-12")))


def test_resume_phi_trains_the_checkpoint_as_saved_unless_a_flag_says_otherwise(script, tiny_world, tmp_path):
    folder = tmp_path / "phi"
    TextualInversionProjection(input_dim=16, hidden_dim=8, output_dim=32, dropout=0.1, normalize_input=True).save_pretrained(folder)

    def trained_phi_config(name, *extra):
        script.main(_args(tiny_world, tmp_path / name, "--max_train_steps", "1", *extra))
        config = LinCIRPipeline.from_pretrained(tmp_path / name).phi.config
        return config.hidden_dim, config.dropout, config.normalize_input

    assert trained_phi_config("as-saved", "--resume_phi", str(folder)) == (8, 0.1, True)
    assert trained_phi_config("flags", "--resume_phi", str(folder), "--phi_hidden_dim", "8", "--phi_dropout", "0.3") == (8, 0.3, True)
    # An earlier run's output folder is a LinCIR pipeline: its phi/ is resumed.
    assert trained_phi_config("from-pipeline", "--resume_phi", str(tmp_path / "flags")) == (8, 0.3, True)
    # A released file records neither dropout nor normalisation: the method's published dropout, and the flag's choice.
    released = str(_released_phi_file(tmp_path / "lincir.pt"))
    assert trained_phi_config("released", "--resume_phi", released) == (8, 0.5, False)
    assert trained_phi_config("released-l2", "--resume_phi", released, "--l2_normalize") == (8, 0.5, True)

    TextualInversionProjection(input_dim=16, hidden_dim=8, output_dim=32).save_pretrained(tmp_path / "raw")
    with pytest.raises(ValueError, match=r"--l2-normalize was given but --resume-phi '.*raw' was saved with normalize_input=False"):
        script.main(_args(tiny_world, tmp_path / "refused", "--max_train_steps", "1", "--resume_phi", str(tmp_path / "raw"), "--l2_normalize",
                          clip=tmp_path / "no-such-model"))


def test_the_last_step_is_validated_once_with_the_numbers_returned(script, tiny_world, tmp_path, monkeypatch):
    validation = tmp_path / "validation"
    validation.mkdir()
    save_file({"image_embeds": torch.randn(4, 16)}, str(validation / "gallery.safetensors"))
    (validation / "queries.jsonl").write_text('{"reference": 0, "text": "red", "target": 1}\n{"reference": 2, "text": "blue", "target": 3}\n')
    logged = []
    original_evaluate = script.evaluate_recall

    def recording_evaluate(*args, **kwargs):
        logged.append(original_evaluate(*args, **kwargs))
        return logged[-1]

    monkeypatch.setattr(script, "evaluate_recall", recording_evaluate)
    summary = script.main(_args(tiny_world, tmp_path / "out", "--max_train_steps", "2", "--validation_steps", "1",
                                "--validation_data", str(validation), "--validation_ks", "1", "2"))
    assert len(logged) == 2  # steps 1 and 2, not step 2 again
    assert summary["validation"] == logged[-1]
    assert json.loads((tmp_path / "out" / "validation_results.json").read_text()) == {"step": 2, **logged[-1]}


def test_validation_data_the_pipeline_cannot_run_is_refused_before_training(script, tiny_world, tmp_path):
    """These failed at the first validation, after training (at the end of it without --validation_steps)."""

    def validation_set(name, gallery, *texts):
        folder = tmp_path / name
        folder.mkdir()
        save_file({"image_embeds": gallery}, str(folder / "gallery.safetensors"))
        (folder / "queries.jsonl").write_text("".join(json.dumps({"reference": 0, "text": t, "target": 1}) + "\n" for t in texts))
        return str(folder)

    missing_model = tmp_path / "no-such-model"  # would fail to load if the script got that far
    args = _args(tiny_world, tmp_path / "out", "--max_train_steps", "1", clip=missing_model)
    bad_texts = ((["is red", "is long", "has dots"], r"\['is red', 'is long', 'has dots'\]"), (5, "5"), (["is red", 3], r"\['is red', 3\]"))
    for index, (text, shown) in enumerate(bad_texts):
        folder = validation_set(f"text-{index}", torch.randn(3, 16), "is blue", text)
        with pytest.raises(ValueError, match=rf"query 2 has text={shown}, expected a string or a list of two strings"):
            script.main([*args, "--validation_data", folder])
    with pytest.raises(ValueError, match=r"'image_embeds' must have shape \[gallery size, embedding width\], got \(3, 4, 4\)"):
        script.main([*args, "--validation_data", validation_set("3d", torch.randn(3, 4, 4), "is red")])
    broken = validation_set("json", torch.randn(3, 16), "is red")
    with open(Path(broken) / "queries.jsonl", "a") as handle:
        handle.write('{"reference": 0, "text": "is red", "target": 1\n')
    with pytest.raises(ValueError, match=r"queries\.jsonl:2 is not valid JSON"):
        script.main([*args, "--validation_data", broken])

    # The gallery's width is checked against the text tower's joint space once the tower is loaded.
    out = tmp_path / "width-out"
    args = _args(tiny_world, out, "--max_train_steps", "1", "--validation_data", validation_set("width", torch.randn(3, 7), "is red"))
    with pytest.raises(ValueError, match=r"gallery\.safetensors holds embeddings of width 7, the CLIP joint space .* has width 16"):
        script.main(args)
    assert not (out / "model_index.json").exists()


def test_a_warmup_longer_than_the_run_is_a_logged_warning_naming_both_flags(script, tiny_world, tmp_path, caplog):
    """As in train_compodiff: --lr_warmup_steps above --max_train_steps was accepted without a word."""
    with caplog.at_level("WARNING", logger="train_lincir"):
        script.main(_args(tiny_world, tmp_path / "out", "--max_train_steps", "2", "--lr_warmup_steps", "5"))
    warnings = [record.getMessage() for record in caplog.records if "--lr-warmup-steps" in record.getMessage()]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("--lr-warmup-steps 5 is larger than --max-train-steps 2: the learning rate is still "
                                  "warming up when training ends and never reaches its peak (--learning-rate 0.0001), "
                                  "only about 40% of it.")
    caplog.clear()
    with caplog.at_level("WARNING", logger="train_lincir"):
        script.main(_args(tiny_world, tmp_path / "out2", "--max_train_steps", "2", "--lr_warmup_steps", "2"))
    assert not [record for record in caplog.records if "--lr-warmup-steps" in record.getMessage()]
