"""The generation benchmark script runs (tiny models) and writes the table it prints."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_generation_benchmark_writes_every_stage_and_the_estimate(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_generation", ROOT / "benchmarks" / "bench_generation.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    output = tmp_path / "generation.json"
    bench.main(["--quick", "--repeats", "1", "--stages", "keyword", "image_pairs", "filters", "masks",
                "--output_json", str(output)])
    result = json.loads(output.read_text())
    assert result == json.loads(json.dumps(result))  # plain JSON
    units = {(row["stage"], row["unit"]) for row in result["results"]}
    assert {("keyword", "captions/s"), ("image pairs", "pairs/s"), ("image pairs", "ratio"), ("filters", "pairs/s"),
            ("filters", "images/s"), ("masks", "masks/s")} <= units
    assert all(row["value"] > 0 for row in result["results"])
    rates = {(row["stage"], row["unit"]): row["value"] for row in result["results"] if "baseline" not in row["what"]}
    # the estimate is the recipe's per-triplet time: one caption step, 4 x (pair + scores + 2 NSFW images), one mask
    per_pair = 1 / rates[("image pairs", "pairs/s")] + 1 / rates[("filters", "pairs/s")] + 2 / rates[("filters",
                                                                                                      "images/s")]
    seconds = 1 / rates[("keyword", "captions/s")] + 4 * per_pair + 1 / rates[("masks", "masks/s")]
    assert abs(result["keyword_triplets_per_hour_estimate"] - 3600 / seconds) < 1e-6 * 3600 / seconds
    assert "keyword triplets per hour" in capsys.readouterr().out
