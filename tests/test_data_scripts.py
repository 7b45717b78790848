"""The data benchmark and the synthetic-baselines script run and report what they claim."""

import json
import os
import runpy
import sys

import pytest

pytest.importorskip("datasets")

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


def _run(path, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", [path, *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(path, run_name="__main__")
    return exit_info.value.code


def test_synthetic_baselines_script(tmp_path, monkeypatch, capsys):
    from diffusers_cir.data.synthetic import SyntheticCIRWorld, SyntheticWorldConfig, config_to_dict

    output = tmp_path / "baselines.json"
    code = _run(os.path.join(ROOT, "scripts", "synthetic_baselines.py"),
                ["--config", "tiny", "--seeds", "1", "--splits", "test", "--output_json", str(output)], monkeypatch)
    assert code == 0
    assert "image_text_sum" in capsys.readouterr().out
    written = json.loads(output.read_text())
    assert written["config"] == "tiny" and written["clip_like"] is False
    assert written["worlds"]["1"]["world_config"] == config_to_dict(SyntheticWorldConfig.tiny(seed=1))
    report = written["worlds"]["1"]["test"]
    world = SyntheticCIRWorld(SyntheticWorldConfig.tiny(seed=1))
    test = world.triplets("test")
    assert report["num_queries"] == len(test)
    for name, query in world.baseline_queries(test).items():
        expected = world.recall_at_k(query, test)
        assert report[name] == {k: pytest.approx(v, abs=1e-4) for k, v in expected.items()}
    assert report["additive_attributes"]["recall_at1"] > max(report[n]["recall_at1"] for n in ("image_only", "text_only", "image_text_sum"))


def test_synthetic_baselines_script_clip_like(tmp_path, monkeypatch, capsys):
    """`--clip_like` computes the baselines on `SyntheticWorldConfig.clip_like(seed)` and records that world."""
    from diffusers_cir.data.synthetic import (
        CAPTION_TEMPLATE,
        SyntheticCIRWorld,
        SyntheticWorldConfig,
        config_from_dict,
        config_to_dict,
    )

    script = os.path.join(ROOT, "scripts", "synthetic_baselines.py")
    output = tmp_path / "baselines.json"
    argv = ["--clip_like", "--seeds", "1", "--splits", "test", "--output_json", str(output)]
    assert _run(script, argv, monkeypatch) == 0
    written = json.loads(output.read_text())
    assert written["config"] == "default" and written["clip_like"] is True
    recorded = written["worlds"]["1"]["world_config"]
    assert recorded == config_to_dict(SyntheticWorldConfig.clip_like(seed=1))
    assert recorded != config_to_dict(SyntheticWorldConfig(seed=1))
    assert written["worlds"]["1"]["items"] == 432
    report = written["worlds"]["1"]["test"]

    # The numbers are those of the recorded world, and not those of the same vocabulary with the default tower.
    world = SyntheticCIRWorld(config_from_dict(recorded))
    test = world.triplets("test")
    assert report["num_queries"] == len(test)
    for name, query in world.baseline_queries(test).items():
        expected = world.recall_at_k(query, test)
        assert report[name] == {k: pytest.approx(v, abs=1e-4) for k, v in expected.items()}
    default_tower = SyntheticCIRWorld(SyntheticWorldConfig.clip_like(
        seed=1, text_position_scale=1.0, text_content_salience=0.0, caption_templates=(CAPTION_TEMPLATE,)))
    default_test = default_tower.triplets("test")
    assert len(default_test) == len(test)
    default_sum = default_tower.baseline_queries(default_test)["image_text_sum"]
    default_sum = default_tower.recall_at_k(default_sum, default_test)
    # The CLIP-like tower makes the edit text useful to the image + text sum (R@1 0.18 against 0.05 here).
    assert report["image_text_sum"]["recall_at1"] > default_sum["recall_at1"] + 0.05

    # It is its own world size: with --config tiny the parser refuses it.
    argv = ["--clip_like", "--config", "tiny", "--output_json", str(tmp_path / "no.json")]
    assert _run(script, argv, monkeypatch) == 2
    assert "cannot be combined with --config tiny" in capsys.readouterr().err
    assert not (tmp_path / "no.json").exists()


def test_data_benchmark_quick(tmp_path, monkeypatch, capsys):
    output = tmp_path / "bench.json"
    code = _run(os.path.join(ROOT, "benchmarks", "bench_data.py"), ["--quick", "--output_json", str(output)], monkeypatch)
    assert code == 0
    printed = capsys.readouterr().out
    assert "stream images" in printed and "precompute" in printed
    result = json.loads(output.read_text())
    assert {row["config"] for row in result["stream"]} == {"images", "embeddings"}
    assert all(row["rows"] == 32 and row["rows_per_s"] > 0 for row in result["stream"])
    assert result["precompute"]["images"] == 32 and result["precompute"]["images_per_s"] > 0


def test_synthetic_baselines_main_gives_the_process_its_thread_count_back(tmp_path):
    """main() runs single-threaded; called from Python (a notebook, a test) it left the whole process at one torch
    thread, also when it failed."""
    import torch
    from conftest import load_script

    script = load_script(os.path.join(ROOT, "scripts", "synthetic_baselines.py"), "synthetic_baselines_threads")
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        argv = ["--config", "tiny", "--seeds", "1", "--splits", "test", "--output_json", str(tmp_path / "b.json")]
        assert script.main(argv) == 0
        assert torch.get_num_threads() == 3
        with pytest.raises(ValueError):
            script.main(["--config", "tiny", "--seeds", "1", "--splits", "no-such-split", "--output_json", str(tmp_path / "c.json")])
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(previous)
