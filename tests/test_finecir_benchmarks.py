"""Fine-CIRR and Fine-FashionIQ (FineCIR) loaders and protocols, on files in the release's format (the structure of
SDU-L/FineCIR's finecir_data_example files; the texts here are made up), and `diffusers-cir evaluate` on them with a
trained composition pipeline and the model-free stand-in."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffusers_cir.data.benchmarks import (
    BenchmarkLayoutError,
    load_benchmark,
    load_fine_fashioniq,
)
from diffusers_cir.evaluation.protocols import get_protocol

NAMES = [f"dev-{i}-0-img{i % 2}" for i in range(8)]


def _fine_cirr(root: Path, with_images: bool = False) -> Path:
    (root / "fine-cirr" / "finemt_captions").mkdir(parents=True)
    (root / "fine-cirr" / "image_splits").mkdir(parents=True)
    (root / "fine-cirr" / "image_splits" / "split.rc2.val.json").write_text(
        json.dumps({name: f"./dev/{name}.png" for name in NAMES}))
    lines = [{"pairid": 10 + i, "reference": NAMES[i], "target_hard": NAMES[i + 1],
              "finemt": f"1. Add {i} potted plants.\n2. Replace the red carpet with a gray carpet.",
              "img_set": {"id": i, "members": NAMES[i : i + 6], "reference_rank": 0, "target_rank": 1}} for i in range(3)]
    (root / "fine-cirr" / "finemt_captions" / "cirr.fine.val.jsonl").write_text(
        "\n".join(json.dumps(line) for line in lines) + "\n")
    if with_images:
        (root / "dev").mkdir()
        rng = np.random.default_rng(0)
        for name in NAMES:
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "dev" / f"{name}.png")
    return root


def _fine_fashioniq(root: Path) -> Path:
    (root / "captions").mkdir(parents=True)
    (root / "image_splits").mkdir()
    for category in ("dress", "shirt", "toptee"):
        ids = [f"B{category}{i:04d}" for i in range(10)]
        (root / "image_splits" / f"split.{category}.val.json").write_text(json.dumps(ids))
        lines = [{"target": ids[i + 2], "candidate": ids[i], "finemt": f"1. Change the sleeves. 2. Add {i} buttons."}
                 for i in range(4)]
        (root / "captions" / f"fiq.fine.{category}.val.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    return root


def test_fine_cirr_is_cirr_with_the_fine_texts(tmp_path):
    bench = load_benchmark("fine_cirr", _fine_cirr(tmp_path), "val")
    assert bench.name == "fine_cirr" and len(bench) == 3 and bench.gallery_ids == NAMES  # every image of the split
    first = bench.queries[0]
    assert first.query_id == 10 and first.reference_id == NAMES[0] and first.target_id == NAMES[1]
    assert first.captions[0].startswith("1. Add 0 potted plants.\n2.") and first.group_members == NAMES[0:6]
    protocol = get_protocol("fine_cirr")
    assert protocol.exclude_reference and protocol.rank_group_members and protocol.submission is None
    with pytest.raises(ValueError, match="no test annotations"):
        load_benchmark("fine_cirr", tmp_path, "test1")


def test_fine_fashioniq_gallery_is_the_queries_images_or_the_split(tmp_path):
    root = _fine_fashioniq(tmp_path)
    dress = load_benchmark("fine_fashioniq", root, "val", subset="dress")
    assert len(dress) == 4 and dress.queries[1].captions == ["1. Change the sleeves. 2. Add 1 buttons."]
    # the candidates and targets of the queries, in the order the queries use them (the authors' gallery)
    assert dress.gallery_ids == [f"Bdress{i:04d}" for i in (0, 2, 1, 3, 4, 5)]
    assert load_fine_fashioniq(root, "dress", gallery="split").gallery_ids == [f"Bdress{i:04d}" for i in range(10)]
    protocol = get_protocol("fine_fashioniq")
    assert protocol.name == "finecir" and protocol.exclude_reference and protocol.metric_options["ks"] == (1, 10, 50)


def test_fine_texts_that_are_not_the_release_format_are_named(tmp_path):
    root = _fine_fashioniq(tmp_path)
    path = root / "captions" / "fiq.fine.shirt.val.jsonl"
    path.write_text(path.read_text() + '\n{"target": "Bshirt0001", "candidate": "Bshirt0000"}\n')
    with pytest.raises(BenchmarkLayoutError, match=r"entry 4 lacks \['finemt'\]"):
        load_fine_fashioniq(root, "shirt")
    path.write_text('{"target": "B-nope", "candidate": "Bshirt0000", "finemt": "x"}')
    with pytest.raises(BenchmarkLayoutError, match="'B-nope', which is not in"):
        load_fine_fashioniq(root, "shirt")
    path.write_text("[1, 2]\n")
    with pytest.raises(BenchmarkLayoutError, match=":1 .*should be a JSON object"):
        load_fine_fashioniq(root, "shirt")


def test_dry_run_evaluates_fine_fashioniq_over_the_three_categories(tmp_path):
    from diffusers_cir.cli import main

    output = tmp_path / "out"
    assert main(["evaluate", "fine_fashioniq", "--dry-run", "--data-root", str(_fine_fashioniq(tmp_path / "fiq")),
                 "--output-dir", str(output), "--no-progress"]) == 0
    metrics = json.loads((output / "metrics.json").read_text())["metrics"]
    assert {"dress_recall_at1", "average_recall_at10", "average_recall_at50"} <= set(metrics)


def test_a_trained_composition_pipeline_evaluates_on_fine_cirr(tmp_path):
    """`diffusers-cir evaluate` reads a composition pipeline folder: its queries compose from the references' gallery
    embeddings, and the written ones are what compose_queries gives."""
    from safetensors import safe_open
    from tiny_fusion import tiny_composition_pipeline

    from diffusers_cir import AutoCIRPipeline
    from diffusers_cir.cli import main
    from diffusers_cir.retrieval import compose_queries

    tiny_composition_pipeline().save_pretrained(tmp_path / "pipe")
    root = _fine_cirr(tmp_path / "CIRR", with_images=True)
    output = tmp_path / "out"
    assert main(["evaluate", "fine_cirr", "--pipeline", str(tmp_path / "pipe"), "--data-root", str(root),
                 "--output-dir", str(output), "--device", "cpu", "--no-progress"]) == 0
    report = json.loads((output / "metrics.json").read_text())
    assert {"recall_at1", "recall_subset_at1"} <= set(report["metrics"])
    pipe = AutoCIRPipeline.from_pretrained(tmp_path / "pipe")
    bench = load_benchmark("fine_cirr", root, "val")
    references = pipe.encode_image([str(bench.image(q.reference_id).path) for q in bench.queries])
    expected = compose_queries(pipe, [q.captions[0] for q in bench.queries], reference_embeds=references)
    with safe_open(str(output / "query_embeddings.safetensors"), framework="pt") as handle:
        torch.testing.assert_close(handle.get_tensor("query_embeds"), expected, atol=1e-5, rtol=0)
