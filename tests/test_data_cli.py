"""``diffusers-cir data``: write, validate (exit status), reshard, inspect, synthetic."""

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("datasets")

from diffusers_cir.cli import main  # noqa: E402
from diffusers_cir.data.shards import shard_files  # noqa: E402


def test_data_cli_end_to_end(tmp_path, capsys):
    images = tmp_path / "src"
    images.mkdir()
    records = []
    for i in range(5):
        for kind in ("a", "b"):
            Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(images / f"{kind}{i}.png")
        records.append({"src": f"a{i}.png", "dst": f"b{i}.png", "edit": {"text": f"edit {i}"}})
    records.append({"src": "nothing.png", "dst": "b0.png", "edit": {"text": "x"}})
    (images / "t.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    out = str(tmp_path / "out")

    code = main(["data", "write", str(images / "t.jsonl"), out, "--map", "reference_image=src", "--map",
                 "target_image=dst", "--map", "modification_text=edit.text", "--rows-per-shard", "2"])
    printed = capsys.readouterr().out
    assert code == 0 and "wrote 5 triplets to 3 shard(s)" in printed and "skipped 1 record(s)" in printed
    skipped = [json.loads(line) for line in open(f"{out}/skipped-train.jsonl")]
    assert skipped[0]["source"] == "t.jsonl:6" and "nothing.png" in skipped[0]["reason"]

    assert main(["data", "validate", out]) == 0
    assert main(["data", "reshard", out, "--num-shards", "5", "--shuffle-seed", "1"]) == 0
    assert len(shard_files(out, "images", "train")) == 5
    assert main(["data", "validate", out, "--json"]) == 0
    capsys.readouterr()

    assert main(["data", "inspect", out, "--rows", "1"]) == 0
    printed = capsys.readouterr().out
    assert "reference_image: Image(mode=None, decode=False)" in printed and "bytes>" in printed

    # Corrupt a shard: validate now fails with status 1 and says why.
    import pyarrow.parquet as pq

    path = shard_files(out, "images", "train")[0]
    table = pq.read_table(path)
    rows = table.to_pylist()
    rows[0]["reference_image"] = {"bytes": b"junk", "path": None}
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    assert main(["data", "validate", out]) == 1
    assert "undecodable image" in capsys.readouterr().out

    assert main(["data", "write", str(images / "t.jsonl"), out, "--map", "src"]) == 2
    assert capsys.readouterr().err.startswith("diffusers-cir data write: error: --map expects CANONICAL=COLUMN")


def test_data_cli_synthetic_world(tmp_path, capsys):
    out = str(tmp_path / "world")
    assert main(["data", "synthetic", out, "--tiny", "--train", "200", "--rows-per-shard", "100"]) == 0
    assert "items=96" in capsys.readouterr().out
    assert len(shard_files(out, "embeddings", "train")) == 2
    assert main(["data", "validate", out]) == 0


def test_data_cli_bad_paths_and_existing_output_are_messages_not_tracebacks(tmp_path, capsys):
    missing = str(tmp_path / "missing")
    assert main(["data", "write", missing, str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"diffusers-cir data write: error: Triplet source {missing!r}")
    assert main(["data", "reshard", missing, "--num-shards", "2"]) == 2
    assert "No shards match" in capsys.readouterr().err
    assert main(["data", "inspect", missing]) == 2
    assert missing in capsys.readouterr().err

    out = str(tmp_path / "world")
    assert main(["data", "synthetic", out, "--tiny", "--train", "8"]) == 0
    capsys.readouterr()
    # Running again over existing output names the flag that replaces it.
    assert main(["data", "synthetic", out, "--tiny", "--train", "8"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["data", "synthetic", out, "--tiny", "--train", "8", "--overwrite"]) == 0


def test_data_write_names_missing_columns_and_the_map_flag_instead_of_a_traceback(tmp_path, capsys):
    source = tmp_path / "t.jsonl"
    source.write_text(json.dumps({"src": "a.png", "dst": "b.png", "edit": "x"}) + "\n")
    assert main(["data", "write", str(source), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffusers-cir data write: error: ") and "has no column for 'reference_image'" in err and "'src'" in err
    assert "--map CANONICAL=COLUMN" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, flag, allowed, value",
    [
        (["inspect", "DATA", "--rows", "-2"], "--rows", "0 or a positive integer", "-2"),
        (["write", "SRC", "OUT", "--rows-per-shard", "0"], "--rows-per-shard", "a positive integer", "0"),
        (["write", "SRC", "OUT", "--row-group-size", "-1"], "--row-group-size", "a positive integer", "-1"),
        (["reshard", "DATA", "--num-shards", "0"], "--num-shards", "a positive integer", "0"),
        (["reshard", "DATA", "--rows-per-shard", "-5"], "--rows-per-shard", "a positive integer", "-5"),
        (["reshard", "DATA", "--num-shards", "2", "--row-group-size", "0"], "--row-group-size", "a positive integer", "0"),
        (["reshard", "DATA", "--num-shards", "2", "--shuffle-seed", "-1"], "--shuffle-seed", "0 or a positive integer", "-1"),
        (["synthetic", "OUT", "--train", "0"], "--train", "a positive integer", "0"),
        (["synthetic", "OUT", "--rows-per-shard", "0"], "--rows-per-shard", "a positive integer", "0"),
        (["synthetic", "OUT", "--seed", "-3"], "--seed", "0 or a positive integer", "-3"),
        (["inspect", "DATA", "--rows", "two"], "--rows", "0 or a positive integer", "'two'"),
    ],
)
def test_data_size_and_count_flags_are_checked_when_the_command_line_is_read(tmp_path, capsys, argv, flag, allowed, value):
    """`inspect --rows -2` printed no rows without complaint, `synthetic --train 0` wrote a train split that `data
    validate` then refused, and the other bad sizes failed later naming a library argument (`rows_per_shard`,
    `batch_size`) or nothing ("expected non-negative integer") instead of the flag."""
    (tmp_path / "DATA").mkdir()
    argv = [str(tmp_path / word) if word.isupper() else word for word in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(["data", *argv])
    assert exit_info.value.code == 2
    assert f"argument {flag}: expected {allowed}, got {value}" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["DATA"]  # nothing was written


def test_data_inspect_rows_zero_prints_only_the_columns(tmp_path, capsys):
    out = str(tmp_path / "world")
    assert main(["data", "synthetic", out, "--tiny", "--train", "8"]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", out, "--name", "embeddings", "--rows", "0"]) == 0
    printed = capsys.readouterr().out
    assert "columns (" in printed and "row 0:" not in printed
    assert main(["data", "inspect", out, "--name", "embeddings", "--rows", "2"]) == 0
    printed = capsys.readouterr().out
    assert "row 1:" in printed and "row 2:" not in printed
