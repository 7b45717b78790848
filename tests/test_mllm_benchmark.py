"""`benchmarks/bench_mllm.py --smoke` runs on a CPU in seconds and writes its JSON."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_mllm.py"


@pytest.mark.usefixtures("single_thread")
def test_smoke_benchmark_runs_and_writes_json(tmp_path, capsys):
    bench = load_script(SCRIPT, "bench_mllm")
    result = bench.main(["--device", "cpu", "--smoke", "--warmup", "0", "--recipes", "ldre", "--output", str(tmp_path / "out.json")])
    written = json.loads((tmp_path / "out.json").read_text())
    assert written == json.loads(json.dumps(result))
    parts = [row["part"] for row in written["rows"]]
    assert parts == ["mllm gallery", "mllm query", "ldre cold", "ldre warm", "clip gallery"]
    assert all(row["baseline_per_s"] > 0 and len(row["samples_s"]["package"]) == 1 for row in written["rows"])
    assert written["rows"][1]["max_abs_difference"] < 1e-4  # the package embeds like the authors' formula
    assert all(row["per_s"] > 0 and row["batch_size"] == 2 for row in written["rows"])
    for row in written["rows"]:  # the CPU-time rates are the same batch over the same calls' process time
        assert row["per_cpu_s"] == pytest.approx(2 / row["cpu_seconds"])
        assert row["ratio_package_to_baseline_cpu"] == pytest.approx(row["baseline_cpu_seconds"] / row["cpu_seconds"])
    assert written["environment"]["threads"] == 1 and written["size"] == "smoke" and written["benchmark"] == "mllm"
    assert "mllm query" in capsys.readouterr().out


def test_the_default_output_is_the_machine_labels_results_folder():
    bench = load_script(SCRIPT, "bench_mllm")
    args = bench.parse_args(["--device", "cpu", "--label", "my-box"])
    assert args.size == "reduced" and args.batch_sizes == [1, 4]
    assert Path(args.output).parts[-3:] == ("results", "my-box", "mllm_cpu_reduced.json")
