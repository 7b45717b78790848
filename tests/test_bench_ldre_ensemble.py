"""benchmarks/bench_ldre_ensemble.py runs end to end on tiny sizes and reports both steps."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_ldre_ensemble  # noqa: E402


def test_the_benchmark_times_the_ensemble_against_the_plain_ranking(tmp_path):
    output = tmp_path / "result.json"
    report = bench_ldre_ensemble.main(["--tiny", "--output", str(output)])
    assert json.loads(output.read_text())["rows"] == report["rows"]
    assert [row["step"] for row in report["rows"]] == ["plain_ranking", "ldre_ensemble"]
    assert all(row["ms_median"] > 0 for row in report["rows"]) and report["rows"][1]["ratio_of_medians"] > 0
    assert report["scores_held_at_once"] <= report["scores_unblocked"] == 20 * 15 * 500
