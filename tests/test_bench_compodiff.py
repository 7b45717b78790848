import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_benchmark_writes_its_table(tmp_path):
    output = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_compodiff.py"), "--tiny", "--output", str(output),
         "--pipeline_dtypes", "float32", "bfloat16"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "part=denoiser | mode=fast" in result.stdout
    rows = json.loads(output.read_text())["results"]
    denoiser = [row for row in rows if row["part"] == "denoiser"]
    assert {row["mode"] for row in denoiser} == {"reference", "fast"}
    assert all(row["ms_median"] > 0 and row["queries_per_s"] > 0 for row in denoiser)
    assert {row["half_precision_norm_eps"] for row in rows if row["part"] == "accuracy"} == {1e-3, 1e-5}
    pipeline = [row for row in rows if row["part"].startswith("pipeline")]
    assert {row["dtype"] for row in pipeline} == {"float32", "bfloat16"}
    assert all(row["denoiser_ms"] > 0 and 0 < row["denoiser_share"] for row in pipeline)


def test_flop_count_matches_the_issue_estimate():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_compodiff import FULL, flops_per_query

    flops = flops_per_query(FULL, steps=10)
    # ~3 GFLOP for the context keys/values, ~13 GFLOP for the nine network calls of the three branches
    assert 2.5e9 < flops["context"] < 3.5e9
    assert 12e9 < flops["steps"] < 13.5e9
