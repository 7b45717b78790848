"""Triplet data under faults: malformed CSV/TSV/JSONL records, damaged Parquet shards, two writers of one dataset
folder, 16-bit images in a streamed dataset. Each case ends in a clear error naming the file and line (or shard), a
skip that is counted and named, or the correct result.

Before: `data write` with an unterminated quote merged the next rows into one modification_text and reported success;
a row with extra fields kept only the first of them as its text; a garbage Parquet shard failed training at step 0
with a pyarrow error that named no file.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from lock_holder import held_by_another_process
from PIL import Image

from diffusers_cir.cli import main
from diffusers_cir.data.schema import images_features
from diffusers_cir.data.shards import (
    ParquetShardWriter,
    reshard,
    shard_files,
    validate_dataset,
    write_triplets,
)
from diffusers_cir.data.streaming import build_triplet_dataloader, load_triplet_stream
from diffusers_cir.utils.locks import FolderLockedError

pytestmark = pytest.mark.usefixtures("single_thread")

HEADER = "reference_image,target_image,modification_text"




@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder with 8 small distinct PNGs, r0..r3 and t0..t3 (CSV files written next to it refer to them)."""
    folder = tmp_path_factory.mktemp("source")
    (folder / "img").mkdir()
    rng = np.random.default_rng(0)
    for name in [f"r{i}" for i in range(4)] + [f"t{i}" for i in range(4)]:
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(folder / "img" / f"{name}.png")
    return folder


def _rows(i: int, text: str, delimiter: str = ",") -> str:
    return delimiter.join([f"img/r{i}.png", f"img/t{i}.png", text])


def _write(images: Path, name: str, lines: list[str]) -> Path:
    path = images / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _texts(folder: Path) -> list[str]:
    import pyarrow.parquet as pq

    return [text for path in shard_files(str(folder), "images", "train")
            for text in pq.read_table(path, columns=["modification_text"]).column(0).to_pylist()]


# --------------------------------------------------------------------------------------------- CSV / TSV
REFUSED = {
    # the case: the quote opened on line 3 ran to the end of the file, taking 6 rows into one text
    "an unterminated quote, 6 rows after it": (
        "csv", [HEADER, _rows(0, "make it red"), _rows(1, '"make it blue')] + [_rows(i % 4, f"row {i}") for i in range(6)],
        r"x.csv:3: malformed CSV: unexpected end of data"),
    "an unterminated quote closed by a later quoted field": (
        "csv", [HEADER, _rows(0, '"make it red'), _rows(1, "blue"), _rows(2, '"as a sketch"'), _rows(3, "green")],
        r"x.csv:2: malformed CSV: ',' expected after '\"'"),
    "characters after a closing quote": ("csv", [HEADER, _rows(0, "fine"), _rows(1, '"red" and blue')],
                                         r"x.csv:3: malformed CSV"),
    "an unterminated quote in a TSV": ("tsv", [HEADER.replace(",", "\t"), _rows(0, '"make it red', "\t"),
                                               _rows(1, "blue", "\t")], r"x.tsv:2: malformed TSV"),
    "a header naming a column twice": ("csv", ["reference_image,target_image,modification_text,target_image",
                                               _rows(0, "red") + ",img/t1.png"],
                                       r"x.csv:1: the header names the column\(s\) \['target_image'\] more than once"),
}


@pytest.mark.parametrize("name", list(REFUSED), ids=list(REFUSED))
def test_unbalanced_quotes_refuse_the_file_naming_the_line_and_write_nothing(images, tmp_path, name):
    suffix, lines, message = REFUSED[name]
    source = _write(images, f"x.{suffix}", lines)
    with pytest.raises(ValueError, match=message):
        write_triplets(str(source), str(tmp_path / "out"), progress=False)
    assert not shard_files(str(tmp_path / "out"), "images", "train")


SKIPPED = {
    "an extra field (an unquoted comma in a text)": (
        "csv", [HEADER, _rows(0, "make it red"), _rows(1, "make it blue, then green"), _rows(2, "as a sketch")],
        {"x.csv:3": "malformed record: line 3 has 4 fields, the header 3 (an unquoted ',' inside a field?"},
        ["make it red", "as a sketch"]),
    "a missing field": (
        "csv", [HEADER, _rows(0, "red"), "img/r1.png,img/t1.png", _rows(2, "green")],
        {"x.csv:3": "malformed record: line 3 has 2 fields, the header 3 (a field is missing)"}, ["red", "green"]),
    "an extra field in a TSV": (
        "tsv", [HEADER.replace(",", "\t"), _rows(0, "red", "\t"), _rows(1, "blue\tgreen", "\t")],
        {"x.tsv:3": "malformed record: line 3 has 4 fields, the header 3 (an unquoted '\\t' inside a field?"}, ["red"]),
    "an extra field after a quoted multi-line text": (
        "csv", [HEADER, _rows(0, '"two\nlines",extra'), _rows(1, "fine")],
        {"x.csv:2": "malformed record: line 2-3 has 4 fields"}, ["fine"]),
}


@pytest.mark.parametrize("name", list(SKIPPED), ids=list(SKIPPED))
def test_records_with_extra_or_missing_fields_are_skipped_counted_and_named(images, tmp_path, name):
    suffix, lines, skipped, written = SKIPPED[name]
    source = _write(images, f"x.{suffix}", lines)
    summary = write_triplets(str(source), str(tmp_path / "out"), progress=False)
    reasons = {record.source: record.reason for record in summary.skipped}
    assert set(reasons) == set(skipped)
    for where, reason in skipped.items():
        assert reasons[where].startswith(reason)
    assert summary.num_rows == len(written) and _texts(tmp_path / "out") == written
    assert f"skipped {len(skipped)} record(s): {{'malformed record': {len(skipped)}}}" in summary.format()


KEPT = {
    "a quoted comma": ([HEADER, _rows(0, '"red, then blue"')], ["red, then blue"]),
    "a quoted text over two lines with a comma": ([HEADER, _rows(0, '"make it red,\nthen blue"'), _rows(1, "x")],
                                                  ["make it red,\nthen blue", "x"]),
    "a quote inside an unquoted field": ([HEADER, _rows(0, 'make it "vintage" now')], ['make it "vintage" now']),
    "doubled quotes inside a quoted field": ([HEADER, _rows(0, '"the ""red"" one"')], ['the "red" one']),
    "a trailing delimiter (an empty extra field)": ([HEADER, _rows(0, "red") + ",", _rows(1, "blue")], ["red", "blue"]),
}


@pytest.mark.parametrize("name", list(KEPT), ids=list(KEPT))
def test_well_formed_quoting_is_read_exactly(images, tmp_path, name):
    lines, written = KEPT[name]
    summary = write_triplets(str(_write(images, "x.csv", lines)), str(tmp_path / "out"), progress=False)
    assert not summary.skipped and _texts(tmp_path / "out") == written


def test_jsonl_lines_that_are_not_objects_are_skipped_counted_and_named(images, tmp_path):
    good = {"reference_image": "img/r0.png", "target_image": "img/t0.png", "modification_text": "red"}
    lines = [json.dumps(good), "[1, 2]", '"a string"', "7", json.dumps({**good, "reference_image": "img/r1.png"})]
    summary = write_triplets(str(_write(images, "x.jsonl", lines)), str(tmp_path / "out"), progress=False)
    reasons = {record.source: record.reason for record in summary.skipped}
    assert reasons == {"x.jsonl:2": "malformed record: a JSON list, not an object {...}",
                       "x.jsonl:3": "malformed record: a JSON str, not an object {...}",
                       "x.jsonl:4": "malformed record: a JSON int, not an object {...}"}
    assert summary.num_rows == 2


NOT_UTF8 = {
    "Latin-1 (an export from an older tool)": (
        lambda: (HEADER + "\n" + _rows(0, "red") + "\n" + _rows(1, "caf\xe9 style") + "\n").encode("latin-1"),
        r"x.csv:3 is not UTF-8 text \(invalid continuation byte\)"),
    "UTF-16 (Excel's Unicode text)": (lambda: (HEADER + "\n" + _rows(0, "red") + "\n").encode("utf-16"),
                                       r"x.csv:1 is not UTF-8 text \(it starts with a UTF-16 byte-order mark\)"),
    "an empty file": (lambda: b"", r"x.csv holds no triplet records \(the file is empty\)"),
    "only a header": (lambda: (HEADER + "\n").encode(), r"x.csv holds no triplet records \(only a header\)"),
}


@pytest.mark.parametrize("name", list(NOT_UTF8), ids=list(NOT_UTF8))
def test_a_file_that_is_not_utf8_or_holds_no_record_is_named(images, tmp_path, name):
    """Was a bare "'utf-8' codec can't decode byte 0xe9 in position 64", and 'wrote 0 triplets' for no records."""
    make, message = NOT_UTF8[name]
    (images / "x.csv").write_bytes(make())
    with pytest.raises(ValueError, match=message + ".*" if "UTF" in name else message):
        write_triplets(str(images / "x.csv"), str(tmp_path / "out"), progress=False)
    assert main(["data", "write", str(images / "x.csv"), str(tmp_path / "out")]) == 2
    assert not shard_files(str(tmp_path / "out"), "images", "train")


def test_jsonl_fields_of_the_wrong_kind_are_skipped_counted_and_named(images, tmp_path):
    good = {"reference_image": "img/r0.png", "target_image": "img/t0.png", "modification_text": "red"}
    lines = [json.dumps(good), json.dumps({**good, "modification_text": 5}),
             json.dumps({**good, "reference_image": {"bytes": "not bytes"}}),
             json.dumps({**good, "target_image": [1, 2]}), json.dumps({**good, "modification_text": ["red"]})]
    summary = write_triplets(str(_write(images, "x.jsonl", lines)), str(tmp_path / "out"), progress=False)
    reasons = {record.source: record.reason for record in summary.skipped}
    assert reasons == {"x.jsonl:2": "modification_text is not text: 5",
                       "x.jsonl:3": "bad image reference {'bytes': 'not bytes'}",
                       "x.jsonl:4": "bad image reference [1, 2]",
                       "x.jsonl:5": "modification_text is not text: ['red']"}
    assert summary.num_rows == 1 and _texts(tmp_path / "out") == ["red"]


def test_a_folders_metadata_naming_images_outside_the_folder_is_skipped_and_counted(images, tmp_path):
    """A received dataset folder's metadata.jsonl could copy any readable image of the machine into the shards."""
    folder = tmp_path / "received"
    shutil.copytree(images / "img", folder / "img")
    (tmp_path / "private.png").write_bytes((images / "img" / "r3.png").read_bytes())
    (folder / "img" / "link.png").symlink_to(tmp_path / "private.png")
    good = {"reference_image": "img/r0.png", "target_image": "img/t0.png", "modification_text": "red"}
    lines = [json.dumps(good), json.dumps({**good, "target_image": "../private.png"}),
             json.dumps({**good, "reference_image": str(tmp_path / "private.png")}),
             json.dumps({**good, "target_image": "img/../../private.png"}),
             json.dumps({**good, "reference_image": "img/link.png"}),
             json.dumps({**good, "reference_image": "img/./r1.png", "modification_text": "blue"})]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    summary = write_triplets(str(folder), str(tmp_path / "out"), progress=False)
    reasons = {record.source: record.reason for record in summary.skipped}
    assert sorted(reasons) == [f"metadata.jsonl:{line}" for line in (2, 3, 4, 5)]
    assert all(reason.startswith("image outside the dataset folder: ") for reason in reasons.values())
    assert summary.num_rows == 2 and _texts(tmp_path / "out") == ["red", "blue"]
    assert "{'image outside the dataset folder': 4}" in summary.format()


def test_the_data_write_command_refuses_an_unbalanced_quote_in_one_line(images, tmp_path, capsys):
    source = _write(images, "x.csv", [HEADER, _rows(0, "red"), _rows(1, '"blue'), _rows(2, "green")])
    assert main(["data", "write", str(source), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("diffusers-cir data write: error: ") and "x.csv:3: malformed CSV" in error
    assert len(error.splitlines()) == 1


def test_the_data_write_command_lists_the_malformed_records_it_skipped(images, tmp_path, capsys):
    source = _write(images, "x.csv", [HEADER, _rows(0, "red"), _rows(1, "red, blue"), _rows(2, "green")])
    assert main(["data", "write", str(source), str(tmp_path / "out")]) == 0
    assert "wrote 2 triplets" in capsys.readouterr().out
    listed = [json.loads(line) for line in (tmp_path / "out" / "skipped-train.jsonl").read_text().splitlines()]
    assert [record["source"] for record in listed] == ["x.csv:3"]


# ------------------------------------------------------------------------------------------ one writer
def test_a_second_writer_of_a_dataset_folder_is_refused(images, tmp_path, capsys):
    source = _write(images, "x.csv", [HEADER, _rows(0, "red")])
    with held_by_another_process(tmp_path / "out"):
        with pytest.raises(FolderLockedError, match=rf"Another process is writing to {tmp_path / 'out'}.*another dataset"):
            write_triplets(str(source), str(tmp_path / "out"), progress=False)
        assert main(["data", "write", str(source), str(tmp_path / "out")]) == 2
        assert "diffusers-cir data write: error: Another process is writing to" in capsys.readouterr().err
        with pytest.raises(FolderLockedError):
            ParquetShardWriter(str(tmp_path / "out"), "images", "train", images_features())
    assert not shard_files(str(tmp_path / "out"), "images", "train")
    assert write_triplets(str(source), str(tmp_path / "out"), progress=False).num_rows == 1
    with held_by_another_process(tmp_path / "out"), pytest.raises(FolderLockedError):
        reshard(str(tmp_path / "out"), "images", num_shards=1, progress=False)


def test_a_failed_write_releases_the_folder(images, tmp_path):
    with pytest.raises(FileExistsError):  # shards there and no overwrite: refused, lock released
        write_triplets(str(_write(images, "x.csv", [HEADER, _rows(0, "red")])), str(tmp_path / "out"), progress=False)
        write_triplets(str(images / "x.csv"), str(tmp_path / "out"), progress=False)
    with pytest.raises(RuntimeError), ParquetShardWriter(str(tmp_path / "other"), "images", "train", images_features()):
        raise RuntimeError("a failed write")
    with held_by_another_process(tmp_path / "out"), held_by_another_process(tmp_path / "other"):
        pass  # both free again


# --------------------------------------------------------------------------------------------- shards
@pytest.fixture(scope="module")
def embeddings_data(tmp_path_factory):
    from diffusers_cir.data.synthetic import SyntheticCIRWorld, SyntheticWorldConfig

    folder = tmp_path_factory.mktemp("data") / "triplets"
    SyntheticCIRWorld(SyntheticWorldConfig.tiny()).write_embeddings_dataset(
        str(folder), num_triplets={"train": 60, "test": None}, rows_per_shard=20, progress=False)
    return folder


@pytest.fixture
def data_copy(embeddings_data, tmp_path):
    return Path(shutil.copytree(embeddings_data, tmp_path / "triplets"))


def _other_columns(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a"], "text": ["b"]}), path)


SHARD_FAULTS = {
    "a garbage shard": lambda path: path.write_bytes(os.urandom(5000)),
    "a shard cut in half": lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
    "an empty shard": lambda path: path.write_bytes(b""),
    "an HTML error page saved as a shard": lambda path: path.write_text("<html><body>502 Bad Gateway</body></html>"),
    "a shard with other columns": _other_columns,
}
SHARD_MESSAGES = {"a shard with other columns": "has the columns \\['id', 'text'\\]"}


@pytest.mark.parametrize("name", list(SHARD_FAULTS), ids=list(SHARD_FAULTS))
def test_a_damaged_shard_is_named_before_streaming_starts(data_copy, name):
    shard = Path(shard_files(str(data_copy), "embeddings", "train")[1])
    SHARD_FAULTS[name](shard)
    message = SHARD_MESSAGES.get(name, "is not a readable Parquet file")
    with pytest.raises(ValueError, match=rf"Shard {shard}.*{message}"):
        load_triplet_stream(str(data_copy), "embeddings", split="train")
    with pytest.raises(ValueError, match=rf"Shard {shard}"):  # the same files named as data_files
        load_triplet_stream("parquet", data_files={"train": str(data_copy / "embeddings" / "train-*.parquet")})


CARD_PATHS = {
    "a parent folder": ("../elsewhere/train-*.parquet", "leads out of the folder"),
    "a parent folder inside the pattern": ("embeddings/../../elsewhere/train-*.parquet", "leads out of the folder"),
    "an absolute path": ("{outside}/train-*.parquet", "an absolute path"),
    "a home-relative path": ("~/train-*.parquet", "an absolute path"),
    "a Windows drive": ("C:\\data\\train-*.parquet", "an absolute path"),
    "a URL": ("hf://datasets/someone/else/train-*.parquet", "a URL"),
    "a chained URL": ("zip://train-*.parquet::https://example.com/x.zip", "a URL"),
}


@pytest.mark.parametrize("name", list(CARD_PATHS), ids=list(CARD_PATHS))
def test_a_card_naming_data_files_outside_its_folder_is_refused(data_copy, tmp_path, name):
    """The card is a manifest: ``datasets`` streamed ``../elsewhere/*.parquet`` as this dataset's rows."""
    outside = tmp_path / "elsewhere"
    shutil.copytree(data_copy / "embeddings", outside)
    pattern, problem = CARD_PATHS[name]
    pattern = pattern.format(outside=outside.as_posix())
    card = data_copy / "README.md"
    text = card.read_text()
    assert "path: embeddings/train-*.parquet" in text
    card.write_text(text.replace("path: embeddings/train-*.parquet", f"path: '{pattern}'"))
    with pytest.raises(ValueError, match=rf"README.md: configuration 'embeddings' names the data files .*{problem}"):
        load_triplet_stream(str(data_copy), "embeddings", split="train")
    with pytest.raises(ValueError, match=problem):
        validate_dataset(str(data_copy), configs=["embeddings"], progress=False)


def test_a_shard_linked_from_outside_the_folder_is_refused(data_copy, tmp_path):
    shard = Path(shard_files(str(data_copy), "embeddings", "train")[0])
    outside = tmp_path / "elsewhere.parquet"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    with pytest.raises(ValueError, match=rf"Shard {shard} is a link to {outside}, outside the dataset folder"):
        load_triplet_stream(str(data_copy), "embeddings", split="train")


def test_a_shard_damaged_past_its_footer_is_named_by_the_loader_and_by_validate(data_copy):
    shard = Path(shard_files(str(data_copy), "embeddings", "train")[0])
    data = bytearray(shard.read_bytes())
    for position in range(len(data) // 3, len(data) // 3 + 2048):
        data[position] ^= 0x5A
    shard.write_bytes(bytes(data))
    stream = load_triplet_stream(str(data_copy), "embeddings", split="train")  # the footer is intact
    with pytest.raises(ValueError, match=rf"Reading {data_copy} failed after \d+ rows .*data validate {data_copy}"):
        list(build_triplet_dataloader(stream, batch_size=8, shuffle=False))
    report = validate_dataset(str(data_copy), configs=["embeddings"], progress=False)
    assert not report.ok and any(f"{shard} cannot be read" in problem for problem in report.problems)


def test_training_with_a_garbage_shard_fails_at_once_naming_the_shard(tmp_path):
    from diffusers_cir.demo import build_world, write_training_data
    from diffusers_cir.training import main as train
    from diffusers_cir.training import parse_args

    data = write_training_data(build_world("tiny", seed=0), tmp_path / "world", num_train_triplets=40)
    shard = Path(shard_files(data, "embeddings", "train")[0])
    shard.write_bytes(os.urandom(4096))
    argv = ["--train-data-dir", data, "--text-encoder-name-or-path", os.path.join(data, "text_encoder"),
            "--tokenizer-name-or-path", os.path.join(data, "tokenizer"), "--report-to", "none",
            "--output-dir", str(tmp_path / "run"), "--max-train-steps", "1", "--transformer-config",
            json.dumps({"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8})]
    with pytest.raises(ValueError, match=rf"--train-data-dir .* could not be opened: Shard {shard} is not a readable"):
        train(parse_args(argv))


# ----------------------------------------------------------------------------------------- 16-bit images
def test_a_16_bit_image_streams_like_its_8_bit_rendering_not_as_white(tmp_path):
    eight = np.tile(np.arange(20, 180, 10, dtype=np.uint16), (16, 1))
    Image.fromarray(eight * 257).save(tmp_path / "wide.png")
    assert Image.open(tmp_path / "wide.png").mode.startswith("I")
    Image.fromarray(eight.astype(np.uint8)).convert("RGB").save(tmp_path / "eight.png")
    Image.new("RGB", (16, 16), (9, 9, 9)).save(tmp_path / "target.png")
    lines = ["id,reference_image,target_image,modification_text", "wide,wide.png,target.png,red",
             "eight,eight.png,target.png,red"]
    (tmp_path / "x.csv").write_text("\n".join(lines) + "\n")
    write_triplets(str(tmp_path / "x.csv"), str(tmp_path / "data"), progress=False)
    batch = next(iter(build_triplet_dataloader(load_triplet_stream(str(tmp_path / "data"), "images"), batch_size=2,
                                               shuffle=False)))
    pixels = dict(zip(batch["ids"], batch["reference_pixel_values"]))
    torch.testing.assert_close(pixels["wide"], pixels["eight"])
    assert pixels["wide"].mean() < 0.5  # CLIP-normalised white is about 2; this gradient is far below
