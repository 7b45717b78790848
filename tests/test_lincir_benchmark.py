"""`benchmarks/bench_lincir.py --tiny` runs on a CPU in seconds and writes its JSON."""

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_lincir.py"


def test_tiny_benchmark_runs_and_writes_json(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_lincir", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        result = bench.main(["--device", "cpu", "--tiny", "--iters", "1", "--warmup", "0", "--output_json", str(tmp_path / "out.json")])
    finally:
        torch.set_num_threads(threads)
    written = json.loads((tmp_path / "out.json").read_text())
    assert written == json.loads(json.dumps(result))
    measures = {(row["config"], row["measure"]) for row in written["rows"]}
    assert measures == {("tiny", "query"), ("tiny", "train")}
    for row in written["rows"]:
        for key in ("query_per_s", "query_with_tokenizer_per_s", "train_captions_per_s"):
            if key in row:
                assert row[key] > 0
    assert written["collate_captions_per_s"] > 0
    table = capsys.readouterr().out
    assert "queries/s" in table and "captions/s" in table

