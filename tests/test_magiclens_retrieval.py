"""A MagicLens pipeline folder through the shared contract: `index build`, `search` and `evaluate` on the command
line and in Python. MagicLens composes from the reference's pixels (no `image_embeds`), so retrieval gives it the
reference images; the gallery embeddings are its own image + empty-text embeddings."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from test_magiclens_pipeline import tiny_magiclens_pipeline

from diffusers_cir import AutoCIRPipeline, MagicLensPipeline
from diffusers_cir.cli import main
from diffusers_cir.pipelines.pipeline_magiclens import normalize_embeddings
from diffusers_cir.retrieval import GalleryIndex, compose_queries, composed_search

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("magiclens-cli")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for i in range(10):
        blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((48, 40), Image.NEAREST).save(root / "images" / f"photo{i:02d}.png")
    tiny_magiclens_pipeline().save_pretrained(root / "model")
    return root


def test_index_build_and_search(workspace, tmp_path, capsys):
    root = workspace
    assert main(["index", "build", "--images", str(root / "images"), "--model", str(root / "model"),
                 "--output", str(tmp_path / "index"), "--batch-size", "4", "--device", "cpu"]) == 0
    capsys.readouterr()
    index = GalleryIndex.load(tmp_path / "index")
    pipe = AutoCIRPipeline.from_pretrained(root / "model")
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe) is MagicLensPipeline and index.ntotal == 10 and index.model_fingerprint == pipe.fingerprint
    paths = [entry["path"] for entry in index.metadata]
    expected = normalize_embeddings(pipe.encode_image(paths)).numpy()  # image + "" through the fusion, not CLIP's
    np.testing.assert_allclose(index._parts[0].reconstruct_n(0, 10), expected, atol=1e-5)

    reference = root / "images" / "photo04.png"
    assert main(["search", "--index", str(tmp_path / "index"), "--model", str(root / "model"), "--image",
                 str(reference), "--text", "the same at night", "--k", "4", "--device", "cpu"]) == 0
    printed = re.findall(r"^\s+\d+\s+-?\d\.\d{4}\s+(\S+)", capsys.readouterr().out, flags=re.M)
    result = composed_search(pipe, index, image=reference, text="the same at night", k=4)
    assert [hit.id for hit in result.hits] == printed and "photo04.png" not in printed
    query = pipe(image=str(reference), prompt="the same at night", normalize=True).image_embeds[0].numpy()
    scores = expected @ query
    ranked = [paths[i].rsplit("/", 1)[-1] for i in np.argsort(-scores) if not paths[i].endswith("photo04.png")]
    assert printed == ranked[:4]


def test_search_refuses_what_magiclens_cannot_take(workspace, tmp_path, capsys):
    root = workspace
    assert main(["index", "build", "--images", str(root / "images"), "--model", str(root / "model"),
                 "--output", str(tmp_path / "index"), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["search", "--index", str(tmp_path / "index"), "--model", str(root / "model"), "--image",
                 str(root / "images" / "photo01.png"), "--text", "red", "--negative-text", "blue", "--device", "cpu"]) == 2
    assert "negative" in capsys.readouterr().err


def test_queries_are_composed_from_the_reference_images():
    pipe = tiny_magiclens_pipeline()
    images = [Image.fromarray(np.full((30, 40, 3), value, dtype=np.uint8)) for value in (30, 120, 210)]
    composed = compose_queries(pipe, ["make it red", ["is red", "has long sleeves"], "at night"],
                               reference_images=images, batch_size=2)
    direct = pipe(image=images, prompt=["make it red", "is red", "at night"], normalize=True).image_embeds
    torch.testing.assert_close(composed[[0, 2]], direct[[0, 2]], atol=1e-5, rtol=0)
    both = normalize_embeddings(pipe(image=[images[1]] * 2, prompt=["is red", "has long sleeves"], normalize=True)
                                .image_embeds.sum(0, keepdim=True))
    torch.testing.assert_close(composed[1:2], both, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="pass `reference_images`"):
        compose_queries(pipe, ["make it red"], reference_embeds=pipe.encode_image(images[:1]))


def test_evaluate_cirr_with_a_magiclens_folder(workspace, tmp_path):
    root = tmp_path / "CIRR"
    (root / "dev").mkdir(parents=True)
    rng = np.random.default_rng(1)
    names = [f"dev-{i}-0-img0" for i in range(8)]
    for name in names:
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "dev" / f"{name}.png")
    (root / "split.rc2.val.json").write_text(json.dumps({name: f"./dev/{name}.png" for name in names}))
    captions = [{"pairid": i, "reference": names[i], "target_hard": names[i + 1], "caption": f"change {i}",
                 "target_soft": {names[i + 1]: 1.0}, "img_set": {"id": i, "members": names[i : i + 6]}}
                for i in range(3)]
    (root / "cap.rc2.val.json").write_text(json.dumps(captions))

    output = tmp_path / "out"
    assert main(["evaluate", "cirr", "--pipeline", str(workspace / "model"), "--data-root", str(root),
                 "--output-dir", str(output), "--device", "cpu", "--no-progress"]) == 0
    report = json.loads((output / "metrics.json").read_text())
    pipe = AutoCIRPipeline.from_pretrained(workspace / "model")
    pipe.set_progress_bar_config(disable=True)
    assert report["encoder"] == pipe.fingerprint and set(report["metrics"]) >= {"recall_at1", "avg"}
    from safetensors import safe_open

    with safe_open(output / "query_embeddings.safetensors", framework="pt") as handle:
        queries = handle.get_tensor("query_embeds")
    references = [str(root / "dev" / f"{name}.png") for name in names[:3]]
    expected = pipe(image=references, prompt=[f"change {i}" for i in range(3)], normalize=True).image_embeds
    torch.testing.assert_close(queries, expected, atol=1e-5, rtol=0)


def _circo(root, num_images: int = 8):
    """A CIRCO-style val split: COCO-named gallery images, a gallery id list and two annotated queries."""
    rng = np.random.default_rng(2)
    folder = root / "COCO2017_unlabeled" / "unlabeled2017"
    folder.mkdir(parents=True)
    ids = list(range(100, 100 + num_images))
    for image_id in ids:
        Image.fromarray(rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(folder / f"{image_id:012d}.jpg")
    (root / "annotations").mkdir()
    queries = [{"id": q, "reference_img_id": ids[q], "target_img_id": ids[q + 1], "gt_img_ids": [ids[q + 1], ids[q + 2]],
                "relative_caption": caption, "shared_concept": concept, "semantic_aspects": ["cardinality"]}
               for q, (caption, concept) in enumerate([("is at night", "a red car"), ("has two of them", "a dog")])]
    (root / "annotations" / "val.json").write_text(json.dumps(queries))
    (root / "gallery.json").write_text(json.dumps(ids))
    return root, [folder / f"{image_id:012d}.jpg" for image_id in ids]


def test_evaluate_with_the_authors_protocol(workspace, tmp_path):
    """`--protocol magiclens`: CIRCO queries worded as the authors' code words them; the report says which ran."""
    root, paths = _circo(tmp_path / "CIRCO")
    outputs = {}
    for protocol in (None, "magiclens"):
        outputs[protocol] = tmp_path / f"out-{protocol}"
        flags = [] if protocol is None else ["--protocol", protocol]
        assert main(["evaluate", "circo", "--pipeline", str(workspace / "model"), "--data-root", str(root),
                     "--gallery-ids", str(root / "gallery.json"), "--output-dir", str(outputs[protocol]),
                     "--device", "cpu", "--no-progress", *flags]) == 0
    settings = json.loads((outputs["magiclens"] / "metrics.json").read_text())["settings"]
    assert settings["protocol"] == "magiclens" and "google-deepmind/magiclens" in settings["source"]
    assert settings["reference_excluded"] is False
    assert json.loads((outputs[None] / "metrics.json").read_text())["settings"]["protocol"] == "standard"

    from safetensors import safe_open

    pipe = AutoCIRPipeline.from_pretrained(workspace / "model")
    pipe.set_progress_bar_config(disable=True)
    texts = {None: ["is at night", "has two of them"],
             "magiclens": ["find a red car but is at night", "find a dog but has two of them"]}
    for protocol, output in outputs.items():
        with safe_open(output / "query_embeddings.safetensors", framework="pt") as handle:
            queries = handle.get_tensor("query_embeds")
        expected = pipe(image=[str(path) for path in paths[:2]], prompt=texts[protocol], normalize=True).image_embeds
        torch.testing.assert_close(queries, expected, atol=1e-5, rtol=0)


def test_authors_fashioniq_texts_keep_the_captions_as_they_are():
    from diffusers_cir.data.benchmarks import CIRQuery
    from diffusers_cir.evaluation import PROTOCOLS, get_protocol

    query = CIRQuery(query_id=0, reference_id="a", captions=["Is shiny and silver.", " fit and flare"])
    assert get_protocol("fashioniq", "magiclens").query_texts(query, "{}") == ["Is shiny and silver. and  fit and flare"]
    assert get_protocol("fashioniq").query_texts(query, "{}") == ["Is shiny and silver and fit and flare"]
    assert "magiclens" not in PROTOCOLS["cirr"]  # the authors' code has no CIRR evaluation
    without_concept = CIRQuery(query_id=7, reference_id=1, captions=["is red"])
    with pytest.raises(ValueError, match="query 7 has no `shared_concept`"):
        get_protocol("circo", "magiclens").query_texts(without_concept, "{}")
