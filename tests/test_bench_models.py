"""benchmarks/bench_models.py runs end to end on the tiny model, and the package computes what the baseline does."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("single_thread")


def test_tiny_run_writes_every_measure_and_matches_stock_clip(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_models
    finally:
        sys.path.pop(0)
    output = tmp_path / "models.json"
    bench_models.main(["--tiny", "--repeats", "1", "--warmup", "0", "--output", str(output)])
    result = json.loads(output.read_text())
    rows = result["rows"]
    assert {row["measure"] for row in rows if row["model"] == "tiny"} == {"gallery", "query", "query-cached"}
    # MagicLens fuses the reference's pixels with the text: no cached-embedding path
    assert {row["measure"] for row in rows if row["model"] == "tiny-magiclens"} == {"gallery", "query"}
    for row in rows:
        assert row["package_ms"] > 0 and row["baseline_ms"] > 0 and len(row["samples_s"]["package"]) == 1
        assert row["max_abs_difference"] <= 1e-5  # the package computes what its baseline does
    assert result["environment"]["threads"] >= 1 and result["environment"]["cpu"]
    assert "query-cached" in capsys.readouterr().out
