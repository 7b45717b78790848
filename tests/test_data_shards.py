"""Shard tooling: writing triplets from JSONL/CSV/folders, the dataset card, re-sharding, validation, hub card."""

import csv
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

datasets = pytest.importorskip("datasets")
pq = pytest.importorskip("pyarrow.parquet")

from diffusers_cir.data.card import read_card_configs, read_card_infos, update_dataset_card  # noqa: E402
from diffusers_cir.data.schema import embeddings_features, images_features  # noqa: E402
from diffusers_cir.data.shards import (  # noqa: E402
    ParquetShardWriter,
    content_id,
    count_rows,
    record_split,
    reshard,
    shard_files,
    validate_dataset,
    write_triplets,
)

HUB_CARD = os.path.join(os.path.dirname(__file__), os.pardir, "hub", "synthtriplets18m", "README.md")


def _save_image(path, seed, fmt="PNG"):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(path, fmt)


@pytest.fixture
def jsonl_source(tmp_path):
    """7 good triplets, one undecodable image, one missing file, one duplicate, one empty text."""
    images = tmp_path / "source" / "images"
    images.mkdir(parents=True)
    records = []
    for i in range(7):
        _save_image(images / f"ref{i}.png", 2 * i)
        _save_image(images / f"tgt{i}.jpg", 2 * i + 1, "JPEG")
        records.append({"ref": f"images/ref{i}.png", "tgt": f"images/tgt{i}.jpg", "edit": f"edit {i}", "caption": f"c{i}"})
    (images / "broken.png").write_bytes(b"not a png")
    records.append({"ref": "images/broken.png", "tgt": "images/tgt0.jpg", "edit": "broken"})
    records.append({"ref": "images/missing.png", "tgt": "images/tgt0.jpg", "edit": "missing"})
    records.append(dict(records[1]))  # same content -> same content id
    records.append({"ref": "images/ref2.png", "tgt": "images/tgt2.jpg", "edit": "  "})
    path = tmp_path / "source" / "triplets.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


MAPPING = {"reference_image": "ref", "target_image": "tgt", "modification_text": "edit", "target_caption": "caption"}


def test_write_triplets_from_jsonl_skips_and_reports_bad_records(jsonl_source, tmp_path):
    out = str(tmp_path / "dataset")
    summary = write_triplets(str(jsonl_source), out, column_mapping=MAPPING, rows_per_shard=3, progress=False)
    assert summary.num_rows == 7 and len(summary.files) == 3
    reasons = {record.source: record.reason for record in summary.skipped}
    assert set(reasons) == {"triplets.jsonl:8", "triplets.jsonl:9", "triplets.jsonl:10", "triplets.jsonl:11"}
    assert reasons["triplets.jsonl:8"].startswith("undecodable reference_image")
    assert reasons["triplets.jsonl:9"].startswith("unreadable reference_image")
    assert reasons["triplets.jsonl:10"].startswith("duplicate id")
    assert reasons["triplets.jsonl:11"] == "empty modification_text"
    assert "skipped 4 record(s)" in summary.format()

    rows = list(datasets.load_dataset(out, split="train", streaming=True).cast_column("reference_image", datasets.Image(decode=False)))
    assert len(rows) == 7
    source_dir = os.path.dirname(jsonl_source)
    with open(os.path.join(source_dir, "images", "ref0.png"), "rb") as handle:
        assert rows[0]["reference_image"]["bytes"] == handle.read()  # bytes copied, not re-encoded
    with open(os.path.join(source_dir, "images", "tgt0.jpg"), "rb") as handle:
        target0 = handle.read()
    assert rows[0]["id"] == content_id(rows[0]["reference_image"]["bytes"], "edit 0", target0)
    assert rows[0]["target_caption"] == "c0" and rows[0]["reference_caption"] is None
    assert read_card_infos(out)["images"].splits["train"].num_examples == 7
    assert read_card_configs(out)["images"]["default"] is True

    # Ids are stable: writing the same source again gives the same ids; an existing split needs overwrite.
    with pytest.raises(FileExistsError, match="overwrite"):
        write_triplets(str(jsonl_source), out, column_mapping=MAPPING, progress=False)
    write_triplets(str(jsonl_source), out, column_mapping=MAPPING, rows_per_shard=100, overwrite=True, progress=False)
    assert len(shard_files(out, "images", "train")) == 1
    again = list(datasets.load_dataset(out, split="train", streaming=True))
    assert [r["id"] for r in again] == [r["id"] for r in rows]


def test_write_triplets_from_csv_and_folders(tmp_path):
    folder = tmp_path / "folders"
    for name in ("b", "a"):
        (folder / name).mkdir(parents=True)
        _save_image(folder / name / "reference.png", ord(name))
        _save_image(folder / name / "target.webp", ord(name) + 1, "WEBP")
        (folder / name / "modification.txt").write_text(f"edit {name}\n")
    (folder / "a" / "target_caption.txt").write_text("caption a")
    (folder / "c").mkdir()
    (folder / "c" / "modification.txt").write_text("no images")
    summary = write_triplets(str(folder), str(tmp_path / "out1"), progress=False)
    assert summary.num_rows == 2 and [r.source for r in summary.skipped] == ["c"]
    rows = list(datasets.load_dataset(str(tmp_path / "out1"), split="train", streaming=True))
    assert [r["id"] for r in rows] == ["a", "b"] and rows[0]["target_caption"] == "caption a"
    assert rows[1]["modification_text"] == "edit b" and rows[0]["target_image"].size == (24, 20)

    csv_path = tmp_path / "triplets.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "reference_image", "target_image", "modification_text"])
        writer.writeheader()
        writer.writerow({"id": "x1", "reference_image": str(folder / "a" / "reference.png"),
                         "target_image": "folders/b/target.webp", "modification_text": "from csv"})
    summary = write_triplets(str(csv_path), str(tmp_path / "out2"), split="validation", progress=False)
    assert summary.num_rows == 1 and not summary.skipped
    row = next(iter(datasets.load_dataset(str(tmp_path / "out2"), split="validation", streaming=True)))
    assert row["id"] == "x1" and row["modification_text"] == "from csv"

    with pytest.raises(KeyError, match="modification_text"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"reference_image": "a", "target_image": "b", "text": "t"}) + "\n")
        write_triplets(str(bad), str(tmp_path / "out3"), progress=False)


def _embedding_dataset(folder, ids, dim=4, rows_per_shard=2):
    rng = np.random.default_rng(0)
    with ParquetShardWriter(folder, "embeddings", "train", embeddings_features(dim), rows_per_shard=rows_per_shard) as writer:
        writer.add_batch({
            "id": ids,
            "reference_image_embeds": rng.standard_normal((len(ids), dim)).astype(np.float32),
            "target_image_embeds": rng.standard_normal((len(ids), dim)).astype(np.float32),
            "modification_text": [f"t{i}" for i in range(len(ids))],
            "reference_caption": [None] * len(ids),
            "target_caption": [None] * len(ids),
        })
    update_dataset_card(folder, "embeddings", embeddings_features(dim), {"train": len(ids)})


def test_reshard_keeps_rows_and_updates_the_card(tmp_path):
    folder = str(tmp_path / "d")
    ids = [f"r{i:02d}" for i in range(11)]
    _embedding_dataset(folder, ids)
    assert len(shard_files(folder, "embeddings", "train")) == 6

    def read_ids(path):
        return [r["id"] for r in datasets.load_dataset(path, "embeddings", split="train", streaming=True)]

    files = reshard(folder, "embeddings", "train", num_shards=4, progress=False)
    assert [os.path.basename(f) for f in files] == [f"train-{i:05d}-of-00004.parquet" for i in range(4)]
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [3, 3, 3, 2]
    assert read_ids(folder) == ids and count_rows(folder, "embeddings", "train") == 11

    out = str(tmp_path / "shuffled")
    reshard(folder, "embeddings", "train", rows_per_shard=5, output_folder=out, shuffle_seed=0, progress=False)
    shuffled = read_ids(out)
    assert sorted(shuffled) == ids and shuffled != ids
    assert len(shard_files(out, "embeddings", "train")) == 3
    assert validate_dataset(out, progress=False).ok
    with pytest.raises(ValueError, match="exactly one"):
        reshard(folder, "embeddings", "train", progress=False)
    with pytest.raises(ValueError, match=r"`num_shards` must be at most the 11 rows of embeddings/train, got 12"):
        reshard(folder, "embeddings", "train", num_shards=12, progress=False)
    for name, value in (("num_shards", 0), ("rows_per_shard", True)):
        with pytest.raises(ValueError, match=f"`{name}` must be an integer >= 1, got {value!r}"):
            reshard(folder, "embeddings", "train", progress=False, **{name: value})


def test_validate_finds_undecodable_duplicates_and_count_mismatches(jsonl_source, tmp_path):
    out = str(tmp_path / "dataset")
    write_triplets(str(jsonl_source), out, column_mapping=MAPPING, rows_per_shard=4, progress=False)
    report = validate_dataset(out, progress=False)
    assert report.ok and report.counts == {"images/train": 7}, report.format()

    # Corrupt one image, repeat one id and a row's content, in the second shard.
    path = shard_files(out, "images", "train")[1]
    table = pq.read_table(path)
    rows = table.to_pylist()
    rows[0]["target_image"] = {"bytes": b"garbage", "path": None}
    rows.append(dict(rows[1]))  # duplicate id (and content)
    pq.write_table(datasets.Dataset.from_list(rows, features=images_features()).data.table, path)
    _embedding_dataset(out, ["only-here"], dim=4)

    report = validate_dataset(out, progress=False)
    text = report.format()
    assert not report.ok
    assert any("1 undecodable image(s)" in p and "target_image" in p for p in report.problems), text
    assert any("1 duplicate id(s)" in p for p in report.problems), text
    assert any("the card says 7 rows, the files hold 8" in p for p in report.problems), text
    assert any("different ids" in p for p in report.problems), text
    assert report.warnings and "repeat an earlier row's content" in report.warnings[0]
    assert report.undecodable[0][0] == rows[0]["id"]

    assert not validate_dataset(str(tmp_path / "nothing"), progress=False).ok


def test_card_update_keeps_other_configs_and_prose(tmp_path):
    folder = str(tmp_path)
    update_dataset_card(folder, "images", images_features(), {"train": 3}, default=True, body="# My triplets\n\nHello.\n")
    update_dataset_card(folder, "embeddings", embeddings_features(16), {"train": 3, "test": 1})
    configs, infos = read_card_configs(folder), read_card_infos(folder)
    assert set(configs) == {"images", "embeddings"} and configs["images"].get("default")
    assert infos["embeddings"].features == embeddings_features(16)
    assert {s: i.num_examples for s, i in infos["embeddings"].splits.items()} == {"train": 3, "test": 1}
    assert "Hello." in open(os.path.join(folder, "README.md")).read()
    with pytest.raises(ValueError, match="at least one split"):
        update_dataset_card(folder, "images", images_features(), {})


def test_hub_card_declares_the_library_schema_and_loads_local_shards(tmp_path):
    shutil.copy(HUB_CARD, tmp_path / "README.md")
    infos = read_card_infos(str(tmp_path))
    assert infos["images"].features == images_features()
    assert infos["embeddings"].features == embeddings_features(768)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, "PNG")
    image = {"bytes": buffer.getvalue(), "path": None}
    with ParquetShardWriter(str(tmp_path), "images", "train", images_features(), rows_per_shard=2) as writer:
        for i in range(3):
            writer.add({"id": f"i{i}", "reference_image": image, "target_image": image, "modification_text": "make it red",
                        "reference_caption": None, "target_caption": "a red square"})
    with ParquetShardWriter(str(tmp_path), "embeddings", "train", embeddings_features(768), rows_per_shard=2) as writer:
        writer.add_batch({"id": ["i0", "i1", "i2"], "reference_image_embeds": np.ones((3, 768), np.float32),
                          "target_image_embeds": np.ones((3, 768), np.float32), "modification_text": ["make it red"] * 3,
                          "reference_caption": [None] * 3, "target_caption": ["a red square"] * 3})
    default = datasets.load_dataset(str(tmp_path), split="train", streaming=True)  # `images` is the default config
    assert [row["id"] for row in default] == ["i0", "i1", "i2"]
    assert next(iter(default))["reference_image"].size == (8, 8)
    embeddings = datasets.load_dataset(str(tmp_path), "embeddings", split="train", streaming=True)
    assert len(next(iter(embeddings))["target_image_embeds"]) == 768
    # No stray split sizes in the card: a user's local shards are whatever they hold.
    assert validate_dataset(str(tmp_path), progress=False).ok


def test_write_triplets_names_jsonl_lines_as_they_are_in_the_file(jsonl_source, tmp_path):
    """Skipped records point at their real line (blank lines count), and a malformed line is named, not a bare
    JSONDecodeError."""
    lines = jsonl_source.read_text().splitlines()
    spaced = jsonl_source.parent / "spaced.jsonl"  # image paths are relative to the file
    spaced.write_text("\n\n".join(lines) + "\n")  # a blank line after each record: record n is on line 2n - 1
    summary = write_triplets(str(spaced), str(tmp_path / "out"), column_mapping=MAPPING, progress=False)
    reasons = {record.source: record.reason for record in summary.skipped}
    assert reasons["spaced.jsonl:15"].startswith("undecodable reference_image")  # the 8th record
    assert reasons["spaced.jsonl:21"] == "empty modification_text"  # the 11th

    malformed = jsonl_source.parent / "malformed.jsonl"
    malformed.write_text(lines[0] + "\n\n" + lines[1][:-1] + "\n")  # line 3 lost its closing brace
    with pytest.raises(ValueError, match=r"malformed\.jsonl:3 is not a JSON record"):
        write_triplets(str(malformed), str(tmp_path / "out2"), column_mapping=MAPPING, progress=False)
    assert not os.path.exists(tmp_path / "out2")  # nothing written


def _embedding_shards(folder, rows=6, rows_per_shard=2):
    with ParquetShardWriter(str(folder), "embeddings", "train", embeddings_features(4), rows_per_shard=rows_per_shard) as writer:
        writer.add_batch({"id": [f"e{i}" for i in range(rows)], "reference_image_embeds": np.ones((rows, 4), np.float32),
                          "target_image_embeds": np.ones((rows, 4), np.float32) + np.arange(rows)[:, None],
                          "modification_text": [f"t{i}" for i in range(rows)], "reference_caption": [None] * rows,
                          "target_caption": [None] * rows})
    record_split(str(folder), "embeddings", embeddings_features(4), "train", rows)
    return writer.files


def test_a_missing_shard_is_named_instead_of_its_rows_silently_dropped(tmp_path):
    from diffusers_cir.data.streaming import load_triplet_stream

    files = _embedding_shards(tmp_path)
    assert load_triplet_stream(str(tmp_path), "embeddings").num_shards == 3
    os.remove(files[1])
    assert len(list(datasets.load_dataset(str(tmp_path), "embeddings", split="train", streaming=True))) == 4  # datasets: silent
    for call in (lambda: count_rows(str(tmp_path), "embeddings", "train"),
                 lambda: reshard(str(tmp_path), "embeddings", num_shards=1, progress=False),
                 lambda: load_triplet_stream(str(tmp_path), "embeddings")):
        with pytest.raises(FileNotFoundError, match="missing shard.*train-00001-of-00003.parquet"):
            call()
    report = validate_dataset(str(tmp_path), configs=["embeddings"], progress=False)
    assert any("train-00001-of-00003.parquet" in problem for problem in report.problems)
    # Shards of an earlier write with another total, left next to a complete set, would be read too.
    shutil.copy(files[0], files[1])
    shutil.copy(files[0], tmp_path / "embeddings" / "train-00000-of-00005.parquet")
    assert any("different writes" in p for p in validate_dataset(str(tmp_path), configs=["embeddings"], progress=False).problems)


def test_a_corrupt_shard_is_named(tmp_path):
    files = _embedding_shards(tmp_path)
    with open(files[2], "r+b") as handle:
        handle.truncate(os.path.getsize(files[2]) // 2)
    with pytest.raises(ValueError, match="train-00002-of-00003.parquet is not a readable Parquet file"):
        count_rows(str(tmp_path), "embeddings", "train")
    with pytest.raises(ValueError, match="train-00002-of-00003.parquet"):
        reshard(str(tmp_path), "embeddings", num_shards=1, progress=False)
    report = validate_dataset(str(tmp_path), configs=["embeddings"], progress=False)  # a report, not an ArrowInvalid traceback
    assert not report.ok and any("train-00002-of-00003.parquet" in problem for problem in report.problems)


def test_write_triplets_names_csv_rows_by_the_line_they_start_on(jsonl_source, tmp_path):
    """CSV/TSV records were numbered by counting (the header is line 1, so every skipped row pointed one line too
    high, and blank lines or quoted line breaks shifted them further): the report now names the line an editor
    shows."""
    for delimiter, suffix in ((",", "csv"), ("\t", "tsv")):
        path = jsonl_source.parent / f"spaced.{suffix}"  # image paths are relative to the file
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle, delimiter=delimiter)
            writer.writerow(["ref", "tgt", "edit"])
            writer.writerow(["images/ref0.png", "images/tgt0.jpg", "good 0"])
            writer.writerow(["images/ref1.png", "images/missing.png", "missing A"])
            writer.writerow(["images/ref2.png", "images/tgt2.jpg", "a quoted\nline break"])
            handle.write("\n")  # a blank line
            writer.writerow(["images/broken.png", "images/tgt3.jpg", "broken B"])
            writer.writerow(["images/ref4.png", "images/tgt4.jpg", "   "])
        text = path.read_text()

        def line_of(marker):
            return text[: text.index(marker)].count("\n") + 1

        mapping = {"reference_image": "ref", "target_image": "tgt", "modification_text": "edit"}
        summary = write_triplets(str(path), str(tmp_path / suffix), column_mapping=mapping, progress=False)
        assert summary.num_rows == 2
        reasons = {record.source: record.reason for record in summary.skipped}
        assert set(reasons) == {f"spaced.{suffix}:{line_of(marker)}" for marker in ("missing A", "broken B", "ref4")}
        assert reasons[f"spaced.{suffix}:{line_of('missing A')}"].startswith("unreadable target_image")
        assert reasons[f"spaced.{suffix}:{line_of('broken B')}"].startswith("undecodable reference_image")
        assert reasons[f"spaced.{suffix}:{line_of('ref4')}"] == "empty modification_text"
        rows = list(datasets.load_dataset(str(tmp_path / suffix), split="train", streaming=True))
        assert [row["modification_text"] for row in rows] == ["good 0", "a quoted\nline break"]


def test_write_triplets_reads_files_that_start_with_a_byte_order_mark(tmp_path):
    """Excel's "CSV UTF-8" and Windows editors start files with a BOM: it became part of the first CSV column name
    (a missing-column error naming '\\ufeffreference_image'), failed the first JSONL line, and was silently kept at
    the start of a folder triplet's modification text."""
    _save_image(tmp_path / "r.png", 0)
    _save_image(tmp_path / "t.png", 1)
    record = {"reference_image": "r.png", "target_image": "t.png", "modification_text": "make it red"}
    bom = "\ufeff"
    (tmp_path / "bom.csv").write_text(bom + "reference_image,target_image,modification_text\nr.png,t.png,make it red\n", encoding="utf-8")
    (tmp_path / "bom.jsonl").write_text(bom + json.dumps(record) + "\n", encoding="utf-8")
    folder = tmp_path / "folders" / "a"
    folder.mkdir(parents=True)
    shutil.copy(tmp_path / "r.png", folder / "reference.png")
    shutil.copy(tmp_path / "t.png", folder / "target.png")
    (folder / "modification.txt").write_text(bom + "make it red\n", encoding="utf-8")
    for name, source in (("csv", tmp_path / "bom.csv"), ("jsonl", tmp_path / "bom.jsonl"), ("folder", tmp_path / "folders")):
        summary = write_triplets(str(source), str(tmp_path / f"out-{name}"), progress=False)
        assert summary.num_rows == 1 and not summary.skipped, name
        row = next(iter(datasets.load_dataset(str(tmp_path / f"out-{name}"), split="train", streaming=True)))
        assert row["modification_text"] == "make it red", name


def _run_card_example(folder):
    """Run the card's own Python example against the folder it describes; returns its `triplets`."""
    import re

    from huggingface_hub import DatasetCard

    text = DatasetCard.load(os.path.join(folder, "README.md")).text
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1).replace("path/to/this/folder", folder)
    namespace = {}
    exec(code, namespace)
    return namespace["triplets"]


def test_a_new_card_describes_the_configuration_and_split_it_was_created_with(jsonl_source, tmp_path):
    """The prose of a new card said `written by diffusers-cir data write` and loaded `images`/`train` whatever the
    folder held: a card created by the embedding precomputation in its own folder, or by `data write --split
    validation`, gave an example that fails."""
    validation = str(tmp_path / "validation-only")
    write_triplets(str(jsonl_source), validation, split="validation", column_mapping=MAPPING, progress=False)
    assert len(list(_run_card_example(validation))) == 7

    embeddings = str(tmp_path / "embeddings-only")
    _embedding_dataset(embeddings, [f"id{i}" for i in range(3)])
    assert [row["id"] for row in _run_card_example(embeddings)] == ["id0", "id1", "id2"]
    assert "data write" not in open(os.path.join(embeddings, "README.md")).read()

    # An existing card's prose is kept when another configuration is recorded.
    before = open(os.path.join(embeddings, "README.md")).read().split("---\n")[-1]
    update_dataset_card(embeddings, "images", images_features(), {"train": 3})
    assert open(os.path.join(embeddings, "README.md")).read().split("---\n")[-1] == before


def test_validate_accepts_a_null_optional_mask_but_not_a_null_reference_image(tmp_path):
    from datasets import Features
    from datasets import Image as ImageFeature

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(buffer, format="PNG")
    png = {"bytes": buffer.getvalue(), "path": None}
    features = Features({**images_features(), "mask": ImageFeature()})  # generated triplets carry an optional mask
    for name, reference in (("null_mask", png), ("null_reference", None)):
        with ParquetShardWriter(str(tmp_path / name), "images", "train", features) as writer:
            writer.add({"id": "a", "reference_image": reference, "target_image": png, "modification_text": "red",
                        "reference_caption": None, "target_caption": None, "mask": None})
        update_dataset_card(str(tmp_path / name), "images", features, {"train": 1}, default=True)
    assert validate_dataset(str(tmp_path / "null_mask"), progress=False).ok
    report = validate_dataset(str(tmp_path / "null_reference"), progress=False)
    assert not report.ok and "reference_image: ValueError: no image bytes" in report.format()
