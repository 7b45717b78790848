"""Every road from pixels to ranks reads images through `diffusers_cir.load_image`: a JPEG stored sideways with EXIF
orientation 6 embeds like its upright twin, and a 16-bit grayscale PNG like its 8-bit rendering, through `index build`,
`search` and `evaluate` (the pipelines' own reading is checked by the contract tests in pipeline_tester.py).

Before, `index build` and `evaluate` opened files with `PIL.Image.open(...).convert("RGB")`: no EXIF rotation (cosine
0.947 in an index) and 16-bit data clipped to white (cosine 0.90)."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from pipeline_tester import cosine, exif_rotated_twin, picture
from safetensors import safe_open
from tiny_components import tiny_pipeline

from diffusers_cir import load_image
from diffusers_cir.cli import main
from diffusers_cir.retrieval import GalleryEmbeddings, GalleryIndex


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """Images folder: sideways.jpg + upright.png (its decoded pixels, turned), wide.png (16-bit) + eight.png (its
    8-bit rendering), and a few others; plus a saved tiny pipeline."""
    root = tmp_path_factory.mktemp("twins")
    images = root / "images"
    images.mkdir()
    exif_rotated_twin(picture(5, size=(48, 40)), images / "sideways.jpg")
    load_image(images / "sideways.jpg").save(images / "upright.png")
    assert PIL.Image.open(images / "sideways.jpg").size != PIL.Image.open(images / "upright.png").size
    eight = np.asarray(picture(6).convert("L")).astype(np.uint16)
    wide = eight * 257 + np.random.default_rng(0).integers(0, 200, size=eight.shape).astype(np.uint16)
    PIL.Image.fromarray(wide).save(images / "wide.png")
    assert PIL.Image.open(images / "wide.png").mode.startswith("I")
    PIL.Image.fromarray(np.rint(wide / 257).astype(np.uint8)).convert("RGB").save(images / "eight.png")
    for seed in range(4):
        picture(20 + seed).save(images / f"other{seed}.png")
    tiny_pipeline().save_pretrained(root / "model")
    return root


def test_index_build_embeds_twins_alike(twins, tmp_path):
    assert main(["index", "build", "--images", str(twins / "images"), "--model", str(twins / "model"),
                 "--output", str(tmp_path / "index"), "--num-workers", "0", "--device", "cpu"]) == 0
    index = GalleryIndex.load(tmp_path / "index")
    vectors = dict(zip(index.ids.tolist(), index._parts[0].reconstruct_n(0, index.ntotal)))
    assert cosine(vectors["sideways.jpg"], vectors["upright.png"]) >= 0.9999
    assert cosine(vectors["wide.png"], vectors["eight.png"]) >= 0.999
    assert cosine(vectors["sideways.jpg"], vectors["other0.png"]) < 0.99  # the check can fail


def test_search_composes_twins_alike(twins, tmp_path, capsys):
    assert main(["index", "build", "--images", str(twins / "images"), "--model", str(twins / "model"),
                 "--output", str(tmp_path / "index"), "--num-workers", "0", "--device", "cpu"]) == 0
    scores = {}
    for name in ("sideways.jpg", "upright.png", "wide.png", "eight.png"):
        output = tmp_path / f"{name}.json"
        assert main(["search", "--index", str(tmp_path / "index"), "--image", str(twins / "images" / name),
                     "--text", "is red", "--k", "8", "--steps", "3", "--keep-reference", "--device", "cpu",
                     "--html", str(tmp_path / f"{name}.html"), "--json", str(output)]) == 0
        results = json.loads(output.read_text())["results"]
        scores[name] = {hit["id"]: hit["score"] for hit in results}
    capsys.readouterr()
    for first, second in (("sideways.jpg", "upright.png"), ("wide.png", "eight.png")):
        np.testing.assert_allclose([scores[first][i] for i in sorted(scores[first])],
                                   [scores[second][i] for i in sorted(scores[first])], atol=2e-4)
    assert scores["sideways.jpg"] != scores["wide.png"]
    # The HTML page shows the reference upright (its thumbnail is read through load_image too).
    assert (tmp_path / "sideways.jpg.html").read_text().count("data:image/jpeg;base64,") == 1 + 8


def _cirr_root(root, files):
    """A CIRR-style val split whose image `ref-k` is `files[k]` (copied), with one query per reference."""
    (root / "dev").mkdir(parents=True)
    names = []
    for number, source in enumerate(files):
        name = f"dev-{number}"
        target = root / "dev" / f"{name}{source.suffix}"
        target.write_bytes(source.read_bytes())
        names.append((name, f"./dev/{target.name}"))
    (root / "split.rc2.val.json").write_text(json.dumps(dict(names)))
    ids = [name for name, _ in names]
    captions = [{"pairid": i, "reference": ids[i], "target_hard": ids[(i + 1) % len(ids)], "caption": "is red",
                 "target_soft": {}, "img_set": {"id": i, "members": ids[:6]}} for i in range(2)]
    (root / "cap.rc2.val.json").write_text(json.dumps(captions))
    return root


def _cached_gallery(output):
    """The evaluation's gallery embeddings by image id, read from its gallery cache."""
    (folder,) = (output / "embedding_cache").glob("*/*/gallery.json")
    embeddings = {}
    for vectors, ids, _ in GalleryEmbeddings(folder.parent).iter_parts():
        embeddings.update(zip(ids, torch.from_numpy(np.array(vectors))))
    return embeddings


def test_evaluate_embeds_twins_alike(twins, tmp_path):
    images = twins / "images"
    others = [images / f"other{seed}.png" for seed in range(4)]
    queries, galleries = {}, {}
    for label, files in (("stored", [images / "sideways.jpg", images / "wide.png"]),
                         ("rendered", [images / "upright.png", images / "eight.png"])):
        root = _cirr_root(tmp_path / label, files + others)
        output = tmp_path / f"out-{label}"
        assert main(["evaluate", "cirr", "--pipeline", str(twins / "model"), "--data-root", str(root),
                     "--output-dir", str(output), "--num-inference-steps", "3", "--device", "cpu",
                     "--no-progress"]) == 0
        with safe_open(output / "query_embeddings.safetensors", framework="pt") as handle:
            queries[label] = handle.get_tensor("query_embeds")
        galleries[label] = _cached_gallery(output)
    assert cosine(galleries["stored"]["dev-0"], galleries["rendered"]["dev-0"]) >= 0.9999  # EXIF-rotated
    assert cosine(galleries["stored"]["dev-1"], galleries["rendered"]["dev-1"]) >= 0.999  # 16-bit
    assert cosine(galleries["stored"]["dev-0"], galleries["stored"]["dev-2"]) < 0.99
    # The queries composed from them agree too.
    assert cosine(queries["stored"][0], queries["rendered"][0]) >= 0.9999
    assert cosine(queries["stored"][1], queries["rendered"][1]) >= 0.999
