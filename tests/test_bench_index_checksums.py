"""benchmarks/bench_index_checksums.py runs end to end on a tiny index and reports every row it promises."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_index_checksums  # noqa: E402


def test_the_benchmark_reports_save_and_every_load(tmp_path):
    output = tmp_path / "result.json"
    report = bench_index_checksums.main(["--rows", "3000", "--dim", "16", "--repeats", "1", "--folder", str(tmp_path),
                                         "--output", str(output)])
    assert json.loads(output.read_text()) == report
    assert report["rows"] == 3000 and report["checksum_write_s"] > 0 and report["cpu"] not in ("", "x86_64")
    assert {(row["mmap"], row["cache"]) for row in report["loads"]} == {
        (mmap, cache) for mmap in (False, True) for cache in ("page cache", "evicted")}
    assert all(row["load_verified_s"] > 0 and row["load_unverified_s"] > 0 for row in report["loads"])
    assert not list(tmp_path.glob("bench-index-checksums-*"))  # the temporary index is removed


def test_interleaved_medians_alternate_the_variants():
    calls = []
    medians = bench_index_checksums.interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                                        repeats=3)
    assert calls == ["a", "b"] * 3 and set(medians) == {"a", "b"}
