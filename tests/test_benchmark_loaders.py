"""Benchmark loaders on the real annotation files in ``../shared/benchmarks`` (skipped when absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffusers_cir.data.benchmarks import (
    BenchmarkLayoutError,
    join_fashioniq_captions,
    load_benchmark,
    load_circo,
    load_cirr,
    load_fashioniq,
    load_genecis,
)

SHARED_BENCHMARKS = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"


def _folder(name: str) -> Path:
    folder = SHARED_BENCHMARKS / name
    if not folder.is_dir():
        pytest.skip(f"real {name} annotation files not found in {folder}")
    return folder


def _circo_annotated_ids(folder: Path, split: str = "val") -> list[int]:
    annotations = json.loads((folder / f"{split}.json").read_text())
    return sorted({i for q in annotations for i in [q["reference_img_id"], *q.get("gt_img_ids", [])]})


def test_cirr_val_counts_and_known_entries():
    cirr = load_cirr(_folder("cirr"), split="val")
    assert (len(cirr), len(cirr.gallery_ids), cirr.has_labels) == (4181, 2297, True)
    first = cirr.queries[0]
    assert (first.query_id, first.reference_id, first.target_id) == (12060, "dev-244-0-img0", "dev-1028-1-img1")
    assert first.captions == ["show three bottles of soft drink"]
    assert first.extra["target_soft"] == {"dev-1028-1-img1": 1.0}
    # Every image set has 6 members including the reference and the target (DEFINITIONS.md 1.1).
    assert all(len(q.group_members) == 6 and {q.reference_id, q.target_id} <= set(q.group_members) for q in cirr.queries)
    # Queries sharing a reference are all kept: 4,181 queries, 2,165 distinct references.
    assert len({q.reference_id for q in cirr.queries}) == 2165
    assert cirr.image("dev-244-0-img0").path == SHARED_BENCHMARKS / "cirr" / "dev" / "dev-244-0-img0.png"
    assert len(cirr.missing_images(limit=3)) == 3  # annotations only: the pixels are not shipped


def test_cirr_official_layout_and_hidden_test_split(tmp_path):
    folder = _folder("cirr")
    (tmp_path / "cirr" / "captions").mkdir(parents=True)
    (tmp_path / "cirr" / "image_splits").mkdir()
    (tmp_path / "cirr" / "captions" / "cap.rc2.test1.json").symlink_to(folder / "cap.rc2.test1.json")
    with pytest.raises(BenchmarkLayoutError, match=r"split\.rc2\.test1\.json.*\n.*cirr/image_splits"):
        load_cirr(tmp_path, split="test1")
    # split.rc2.test1.json is not among the shared files; its 2,315 ids are exactly the image-set members.
    captions = json.loads((folder / "cap.rc2.test1.json").read_text())
    members = sorted({m for q in captions for m in q["img_set"]["members"]})
    split = {image: f"./test1/{image}.png" for image in members}
    (tmp_path / "cirr" / "image_splits" / "split.rc2.test1.json").write_text(json.dumps(split))
    test1 = load_cirr(tmp_path, split="test1")
    assert (len(test1), len(test1.gallery_ids), test1.has_labels) == (4148, 2315, False)
    assert test1.queries[0].target_id is None and test1.queries[0].ground_truth_ids == []
    assert test1.image(members[0]).path == tmp_path / "test1" / f"{members[0]}.png"


@pytest.mark.parametrize("category, num_queries, gallery_size", [("dress", 2017, 3817), ("shirt", 2038, 6346),
                                                                 ("toptee", 1961, 5373)])
def test_fashioniq_val_counts(category, num_queries, gallery_size):
    split = load_fashioniq(_folder("fashioniq"), category, split="val")
    assert (len(split), len(split.gallery_ids), split.subset) == (num_queries, gallery_size, category)
    assert all(q.reference_id in split.images and q.target_id in split.images for q in split.queries)


def test_fashioniq_known_entries_and_test_split():
    folder = _folder("fashioniq")
    dress = load_benchmark("fashioniq", folder, "val", subset="dress")
    first = dress.queries[0]
    assert (first.reference_id, first.target_id) == ("B005X4PL1G", "B0084Y8XIU")
    assert join_fashioniq_captions(first.captions) == ["Is shiny and silver with shorter sleeves and fit and flare"]
    assert dress.image("B0084Y8XIU").path == folder / "images" / "B0084Y8XIU.png"
    # Candidates repeat across triplets and are all kept (2,017 triplets, 1,331 distinct candidates).
    assert len({q.reference_id for q in dress.queries}) == 1331
    test = load_fashioniq(folder, "dress", split="test")
    assert (len(test), len(test.gallery_ids), test.has_labels, test.queries[0].target_id) == (2024, 3818, False, None)


def test_circo_val_and_test():
    folder = _folder("circo")
    val = load_circo(folder, "val", gallery_ids=_circo_annotated_ids(folder))
    assert (len(val), val.has_labels) == (220, True)
    counts = [len(q.ground_truth_ids) for q in val.queries]
    assert (min(counts), max(counts), round(sum(counts) / len(counts), 2)) == (1, 14, 4.16)
    assert val.queries[0].ground_truth_ids == [355099, 528417, 534704]
    assert all(q.target_id == q.ground_truth_ids[0] and q.reference_id not in q.ground_truth_ids for q in val.queries)
    assert [q.query_id for q in val.queries] == list(range(220))
    assert val.queries[0].extra["semantic_aspects"][0] == "cardinality"
    assert val.image(355099).path.name == "000000355099.jpg"
    test = load_circo(folder, "test", gallery_ids=_circo_annotated_ids(folder, "test"))
    assert (len(test), test.has_labels, test.queries[0].ground_truth_ids) == (800, False, [])


def test_circo_gallery_comes_from_the_coco_image_info(tmp_path):
    folder = _folder("circo")
    with pytest.raises(BenchmarkLayoutError, match="image_info_unlabeled2017.json.*`gallery_ids=`; CLI: --gallery-ids"):
        load_circo(folder, "val")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "val.json").symlink_to(folder / "val.json")
    info = tmp_path / "COCO2017_unlabeled" / "annotations"
    info.mkdir(parents=True)
    ids = _circo_annotated_ids(folder) + [9_000_001, 9_000_002]
    (info / "image_info_unlabeled2017.json").write_text(
        json.dumps({"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids]}))
    val = load_circo(tmp_path, "val")
    assert len(val.gallery_ids) == len(ids) and 9_000_002 in val.images
    with pytest.raises(BenchmarkLayoutError, match="not in the gallery"):
        load_circo(folder, "val", gallery_ids=ids[1:])


@pytest.mark.parametrize("task", ["focus_object", "change_object"])
def test_genecis_object_tasks(task):
    genecis = load_genecis(_folder("genecis"), task, image_root="/coco/val2017")
    assert len(genecis) == 1960 and genecis.gallery_ids is None
    assert all(len(q.candidate_ids) == 15 and q.candidate_ids[0] == q.target_id for q in genecis.queries)
    first = genecis.queries[0]
    assert (first.reference_id, first.target_id, first.captions) == (
        189213, 153527, ["cardboard" if task == "focus_object" else "wall"])
    assert genecis.image(189213).path == Path("/coco/val2017/000000189213.jpg")
    duplicated = [i for i, q in enumerate(genecis.queries) if q.target_id in q.candidate_ids[1:]]
    assert duplicated == ([19] if task == "change_object" else [])


def test_genecis_attribute_crops(tmp_path):
    template = {"reference": {"image_id": 5, "instance_bbox": [1, 2, 30, 40]},
                "target": {"image_id": 6, "instance_bbox": [0, 0, 10, 10]},
                "gallery": [{"image_id": 6, "instance_bbox": [5, 5, 10, 10]}], "condition": "red"}
    (tmp_path / "focus_attribute.json").write_text(json.dumps([template]))
    task = load_genecis(tmp_path, "focus_attribute", image_root=tmp_path / "vg")
    assert task.queries[0].candidate_ids == ["6:0,0,10,10", "6:5,5,10,10"]
    assert task.image("5:1,2,30,40").crop_box == (1, 2, 30, 40)
    assert task.image("5:1,2,30,40").path == tmp_path / "vg" / "5.jpg"


def test_clear_errors_for_missing_or_malformed_files(tmp_path):
    with pytest.raises(BenchmarkLayoutError, match="does not exist"):
        load_cirr(tmp_path / "nowhere")
    with pytest.raises(BenchmarkLayoutError, match=r"cap\.rc2\.val\.json"):
        load_cirr(tmp_path)
    (tmp_path / "cap.dress.val.json").write_text(json.dumps([{"candidate": "a", "captions": ["x", "y"]}]))
    (tmp_path / "split.dress.val.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(BenchmarkLayoutError, match=r"entry 0 lacks \['target'\]"):
        load_fashioniq(tmp_path, "dress")
    (tmp_path / "split.dress.val.json").write_text("{not json")
    with pytest.raises(BenchmarkLayoutError, match="not valid JSON"):
        load_fashioniq(tmp_path, "dress")
    with pytest.raises(ValueError, match="splits .* 'test1'"):
        load_cirr(tmp_path, split="test")
    with pytest.raises(ValueError, match="needs `subset`"):
        load_benchmark("genecis", tmp_path)
    with pytest.raises(ValueError, match="Unknown FashionIQ caption style"):
        join_fashioniq_captions(["a", "b"], style="concat")


def test_queries_export_to_a_datasets_dataset():
    cirr = load_cirr(_folder("cirr"), split="val")
    dataset = cirr.to_dataset()
    assert len(dataset) == 4181
    row = dataset[0]
    assert row["target_id"] == "dev-1028-1-img1" and row["reference_path"].endswith("dev-244-0-img0.png")
    assert json.loads(row["extra"])["img_set_id"] == 36


@pytest.mark.parametrize("module", ["base", "fashioniq", "genecis"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"diffusers_cir.data.benchmarks.{module}"))
    assert result.attempted > 0 and result.failed == 0
