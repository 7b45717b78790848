"""benchmarks/bench_training.py runs (the tiny denoiser on CPU) and reports what it measured."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_training_tiny_on_cpu(tmp_path):
    output = tmp_path / "training.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_training.py"), "--tiny", "--device", "cpu",
         "--batch-sizes", "32,64", "--steps", "3", "--warmup", "1", "--ema", "--output", str(output)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "samples/s" in result.stdout and "tiny denoiser" in result.stdout
    report = json.loads(output.read_text())
    assert report["model"] == "tiny" and report["device"] == "cpu" and report["ema"] is True
    assert [row["batch_size"] for row in report["results"]] == [32, 64]
    for row in report["results"]:
        assert row["step_ms_median"] > 0
        assert abs(row["samples_per_second"] - row["batch_size"] / (row["step_ms_median"] / 1000)) < 1e-6 * row[
            "samples_per_second"]


def test_bench_training_refuses_cuda_without_a_gpu(tmp_path):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_training.py"), "--device", "cuda"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert result.returncode != 0 and "no CUDA device" in result.stderr
