import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_recall_metrics_tell_the_top1_hit_from_the_set_overlap():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_retrieval import recall_metrics

    exact = np.array([list(range(10)), list(range(10, 20))])
    # query 0: the exact top-1 is found, 5 of the 10 exact items; query 1: top-1 missed, 9 of 10 found
    found = np.array([[0, 1, 2, 3, 4, 50, 51, 52, 53, 54], [11, 12, 13, 14, 15, 16, 17, 18, 19, 99]])
    assert recall_metrics(found, exact) == {"top1_in_top10": 0.5, "set_recall@10": 0.7}


def test_tiny_cpu_run_times_single_queries_and_batches(tmp_path):
    output = tmp_path / "retrieval.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_retrieval.py"), "--tiny", "--output", str(output),
         "--single-queries", "3", "--repeats", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    payload = json.loads(output.read_text())
    assert payload["threads"] == 1 and payload["environment"]["cpu_cores"] >= 1
    rows = {row["factory"]: row for row in payload["rows"]}
    assert set(rows) == {"Flat (faiss, exact)", "Flat (torch backend, exact)", "IVF32,PQ8 nprobe=4"}
    for name in ("Flat (faiss, exact)", "Flat (torch backend, exact)"):  # exact search agrees with itself
        assert rows[name]["top1_in_top10"] == 1.0 and rows[name]["set_recall@10"] == 1.0
    for row in rows.values():
        assert len(row["single_query_samples_ms"]) == 3 * 2 and len(row["batch_samples_ms"]) == 2
        assert row["single_query_ms"] > 0 and row["batch_queries"] == 64 and row["qps"] > 0
    assert rows["Flat (faiss, exact)"]["batch_ratio_to_exact"] == 1.0


def test_bad_arguments_are_refused_in_one_line(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_retrieval import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--tiny", "--single-queries", "100"])
    assert exit_info.value.code == 2 and "cannot exceed --queries" in capsys.readouterr().err
