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
    from diffusers_cir.data.synthetic import SyntheticCIRWorld, SyntheticWorldConfig

    output = tmp_path / "baselines.json"
    code = _run(os.path.join(ROOT, "scripts", "synthetic_baselines.py"),
                ["--config", "tiny", "--seeds", "1", "--splits", "test", "--output_json", str(output)], monkeypatch)
    assert code == 0
    assert "image_text_sum" in capsys.readouterr().out
    report = json.loads(output.read_text())["worlds"]["1"]["test"]
    world = SyntheticCIRWorld(SyntheticWorldConfig.tiny(seed=1))
    test = world.triplets("test")
    assert report["num_queries"] == len(test)
    for name, query in world.baseline_queries(test).items():
        expected = world.recall_at_k(query, test)
        assert report[name] == {k: pytest.approx(v, abs=1e-4) for k, v in expected.items()}
    assert report["additive_attributes"]["recall_at1"] > max(report[n]["recall_at1"] for n in ("image_only", "text_only", "image_text_sum"))


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
