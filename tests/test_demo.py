"""``diffusers-cir demo``: the offline end-to-end run on the synthetic world."""

import json

import pytest

from diffusers_cir.cli import main
from diffusers_cir.demo import SHIPPED_CHECKPOINT, checkpoint_info


def test_shipped_demo_checkpoint_is_small_and_says_how_it_was_made():
    files = [path for path in SHIPPED_CHECKPOINT.rglob("*") if path.is_file()]
    assert files, f"no demo checkpoint shipped in {SHIPPED_CHECKPOINT}"
    assert sum(path.stat().st_size for path in files) < 2 * 1024 * 1024
    info = checkpoint_info()
    assert info["command"].startswith("diffusers-cir demo --train --update-shipped-checkpoint")
    assert info["recall"]["compodiff"]["recall_at1"] > 0


def test_demo_quick_beats_the_baselines(tmp_path, capsys):
    report = tmp_path / "demo.json"
    assert main(["demo", "--quick", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    for name in ("compodiff", "image_only", "text_only", "image_text_sum", "Example 1", "<- target"):
        assert name in printed
    result = json.loads(report.read_text())
    assert result["num_queries"] == 1000 and result["gallery_size"] == 2400
    compodiff = result["recalls"]["compodiff"]["recall_at1"]
    best_baseline = max(values["recall_at1"] for name, values in result["recalls"].items() if name != "compodiff")
    assert compodiff >= 0.5, result["recalls"]
    assert compodiff >= best_baseline + 0.15, result["recalls"]
    assert result["recalls"]["compodiff"]["recall_at10"] >= compodiff  # Recall@K is monotone in K


@pytest.mark.slow
def test_demo_trains_with_the_real_training_loop(tmp_path, capsys):
    """`--train` goes through the training script's loop and the same retrieval/evaluation path (a few steps here:
    this checks the wiring, the quality check is test_demo_quick_beats_the_baselines)."""
    assert main(["demo", "--train", "--world", "tiny", "--steps", "10", "--train-triplets", "2000",
                 "--num-queries", "40", "--output-dir", str(tmp_path), "--json", str(tmp_path / "demo.json")]) == 0
    assert (tmp_path / "compodiff" / "model_index.json").is_file()
    assert (tmp_path / "compodiff" / "validation_log.jsonl").is_file()
    result = json.loads((tmp_path / "demo.json").read_text())
    assert result["num_queries"] == 40 and result["gallery_size"] == 96
    assert "trained now (10 steps)" in result["source"]
    assert "compodiff" in capsys.readouterr().out


def test_demo_rejects_inconsistent_options():
    with pytest.raises(SystemExit, match="needs --train"):
        main(["demo", "--update-shipped-checkpoint"])
    with pytest.raises(SystemExit, match="--num-queries"):
        main(["demo", "--num-queries", "0"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "5"], r"--steps needs --train \(without it the demo loads a trained checkpoint"),
        (["--train-triplets", "100", "--output-dir", "run"], r"--train-triplets, --output-dir need --train"),
        (["--train", "--checkpoint", "somewhere"], r"--checkpoint loads a trained demo checkpoint, --train trains a new"),
    ],
)
def test_demo_refuses_options_it_would_ignore(monkeypatch, argv, message):
    """Training options without --train, and --checkpoint with it, were silently ignored."""
    import diffusers_cir.demo

    def no_demo(**kwargs):
        raise AssertionError("the demo ran")

    monkeypatch.setattr(diffusers_cir.demo, "run_demo", no_demo)
    with pytest.raises(SystemExit, match=message):
        main(["demo", *argv])


@pytest.mark.parametrize("flag", ["--examples", "--seed"])
def test_demo_negative_examples_or_seed_are_refused_when_the_command_line_is_read(capsys, flag):
    """--examples -1 printed no example without a word; --seed -1 failed in numpy with a traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", flag, "-1"])
    assert exit_info.value.code == 2
    assert f"argument {flag}: expected 0 or a positive integer, got -1" in capsys.readouterr().err


def test_demo_json_report_goes_into_a_folder_that_does_not_exist_yet(tmp_path, monkeypatch, capsys):
    """--json into a new folder failed with a FileNotFoundError traceback after the whole demo had run."""
    import diffusers_cir.demo
    from diffusers_cir.demo import DemoResult

    measured = DemoResult(recalls={"compodiff": {"recall_at1": 0.5}, "image_only": {"recall_at1": 0.25}}, examples=[],
                          num_queries=4, gallery_size=8, seconds={"total": 0.0}, source="stand-in")
    monkeypatch.setattr(diffusers_cir.demo, "run_demo", lambda **kwargs: measured)
    report = tmp_path / "reports" / "demo.json"
    assert main(["demo", "--json", str(report)]) == 0
    assert json.loads(report.read_text())["recalls"] == measured.recalls
    assert "CompoDiff R@1 0.500" in capsys.readouterr().out
