import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_benchmark_writes_its_table(tmp_path):
    output = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_compodiff.py"), "--tiny", "--output", str(output),
         "--sections", "denoiser", "int8", "towers", "end-to-end"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "part=denoiser | mode=fast" in result.stdout
    payload = json.loads(output.read_text())
    assert payload["threads"] == [1] and payload["runs"][0]["environment"]["cpu_cores"] >= 1
    assert payload["runs"][0]["finished"]
    rows = payload["results"]
    denoiser = [row for row in rows if row["part"] == "denoiser"]
    assert {row["mode"] for row in denoiser} == {"reference-shaped", "fast"}
    assert all(row["ms_median"] > 0 and row["queries_per_s"] > 0 for row in denoiser)
    accuracy = [row for row in rows if row["part"] == "int8-accuracy"]
    assert {row["variant"] for row in accuracy} == {"default", "all-linear"}
    assert all(0.9 < row["min_cosine_to_float32"] < 1 and row["compared"] == 8 for row in accuracy)
    speed = {row["mode"]: row for row in rows if row["part"] == "int8-denoiser"}
    assert set(speed) == {"float32", "int8 default", "int8 all-linear"} and speed["int8 default"]["ratio_of_medians"] > 0
    towers = {(row["part"], row["mode"]) for row in rows if row["part"] in ("text_encoder", "image_encoder")}
    assert towers == {(part, mode) for part in ("text_encoder", "image_encoder") for mode in ("float32", "int8")}
    end_to_end = [row for row in rows if row["part"].startswith("end-to-end (")]
    assert {row["mode"] for row in end_to_end} == {"float32", "int8"}
    shares = [row for row in rows if row["part"] == "end-to-end shares"]
    assert {row["mode"] for row in shares} == {"float32", "int8"} and all(row["end_to_end_ms"] > 0 for row in shares)


def test_tiny_results_never_overwrite_full_size_ones():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _harness

    cpu = torch.device("cpu")
    tiny = _harness.results_path("bench.json", True, cpu)
    full = _harness.results_path("bench.json", False, cpu, label="amd-epyc-2core")
    assert tiny.parent.name == "tiny" and full.parent.name == "amd-epyc-2core" and tiny != full
    assert _harness.results_path("bench.json", True, cpu, output="x.json") == Path("x.json")


def test_reference_code_must_be_a_checkout_of_the_authors_repository(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import compodiff_authors

    with pytest.raises(FileNotFoundError, match="holds no compodiff/models.py"):
        compodiff_authors.import_authors_models(tmp_path)
    from bench_compodiff import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--tiny", "--sections", "authors"])
    assert exit_info.value.code == 2 and "needs --reference-code" in capsys.readouterr().err


def test_flop_count_matches_the_issue_estimate():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_compodiff import FULL, flops_per_query

    flops = flops_per_query(FULL, steps=10)
    # ~3 GFLOP for the context keys/values, ~13 GFLOP for the nine network calls of the three branches
    assert 2.5e9 < flops["context"] < 3.5e9
    assert 12e9 < flops["steps"] < 13.5e9
