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


def test_bench_checksums_reports_throughput_and_share_of_a_checkpoint_save(tmp_path, capsys):
    from accelerate.state import AcceleratorState
    from conftest import load_script

    bench = load_script(REPO / "benchmarks" / "bench_checksums.py", "bench_checksums")
    output = tmp_path / "checksums.json"
    try:
        report = bench.main(["--buffer-mib", "4", "--models", "tiny", "--repeats", "1", "--output", str(output)])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one state per process
    printed = capsys.readouterr().out
    assert "MB/s" in printed and "share" in printed
    assert json.loads(output.read_text()) == json.loads(json.dumps(report))
    assert {row["hash"] for row in report["throughput"]} >= {"xxh3_128", "blake2b", "sha256"}
    assert all(row["mb_per_second"] > 0 for row in report["throughput"])
    (row,) = report["checkpoints"]
    assert row["model"] == "tiny" and row["checkpoint_mb"] > 0 and row["save_ms"] > 0
    assert 0 < row["checksum_share_of_save"] < 1
    assert abs(row["checksum_share_of_save"] - row["checksum_write_ms"] / (row["save_ms"] + row["checksum_write_ms"])) < 1e-9


def test_bench_fusion_times_the_trainers_step_of_every_method(tmp_path, capsys):
    from accelerate.state import AcceleratorState
    from conftest import load_script

    bench = load_script(REPO / "benchmarks" / "bench_fusion.py", "bench_fusion")
    output = tmp_path / "fusion.json"
    try:
        report = bench.main(["--tiny", "--device", "cpu", "--batch-sizes", "8,16", "--text-batch-size", "4",
                             "--regimes", "features,text-tower", "--fashionblip2-batch-sizes", "2,4", "--steps", "1",
                             "--warmup", "0", "--output", str(output)])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one state per process
    assert "samples/s" in capsys.readouterr().out
    assert json.loads(output.read_text()) == json.loads(json.dumps(report))
    rows = {(row["method"], row["regime"], row["batch_size"]) for row in report["results"]}
    assert rows == {(method, "features", size) for method in ("clip4cir", "scot", "mtst") for size in (8, 16)} | {
        (method, "text-tower", 4) for method in ("clip4cir", "scot", "mtst")} | {
        ("fashionblip2", "pixels", size) for size in (2, 4)}
    heads = {"mtst": "TwoHopFusionHead", "fashionblip2": "MultiHeadMatchingHead"}
    for row in report["results"]:
        assert row["samples_per_second"] == row["batch_size"] / (row["step_ms_median"] / 1000)
        assert row["head"] == heads.get(row["method"], "Clip4CirCombiner")
    # FashionBLIP-2 trains the Q-Former's LoRA adapters and the head: more than the head, a sliver of the model
    for row in report["results"]:
        if row["method"] == "fashionblip2":
            assert row["head_parameters"] < row["trainable_parameters"] < row["model_parameters"]
    assert report["fashionblip2"]["qformer"]["encoder_hidden_size"] == report["fashionblip2"]["vision_config"][
        "hidden_size"]
