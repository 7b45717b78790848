"""BGE-VL through the shared contract: a released BGE-VL folder is indexed, searched and evaluated on the command line
(`index build`, `search`, `evaluate`, converted once through AutoCIRPipeline), and the authors' evaluation protocol
(`--protocol bgevl`: their query texts, 75-token truncation) is a named variant of the official one."""

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from test_pipeline_bgevl import make_released_bgevl_folder

from diffusers_cir import AutoCIRPipeline, BGEVLPipeline
from diffusers_cir.cli import main
from diffusers_cir.data.benchmarks import load_circo, load_fashioniq
from diffusers_cir.evaluation import PROTOCOLS, get_protocol
from diffusers_cir.retrieval import GalleryIndex, composed_search

pytestmark = pytest.mark.usefixtures("single_thread")

SHARED_BENCHMARKS = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("bgevl-cli")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for i in range(10):
        blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((48, 40), Image.NEAREST).save(root / "images" / f"photo{i:02d}.png")
    make_released_bgevl_folder(root / "BGE-VL-tiny")  # the released layout, not a saved pipeline
    return root


@pytest.fixture(autouse=True)
def conversion_cache(workspace, monkeypatch):
    monkeypatch.setenv("DIFFUSERS_CIR_CACHE", str(workspace / "conversion-cache"))


def _pipeline(workspace) -> BGEVLPipeline:
    pipe = AutoCIRPipeline.from_pretrained(workspace / "BGE-VL-tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_index_build_and_search_with_the_released_folder(workspace, tmp_path, capsys):
    release = str(workspace / "BGE-VL-tiny")
    assert main(["index", "build", "--images", str(workspace / "images"), "--model", release,
                 "--output", str(tmp_path / "index"), "--batch-size", "4", "--device", "cpu"]) == 0
    capsys.readouterr()
    index = GalleryIndex.load(tmp_path / "index")
    pipe = _pipeline(workspace)
    assert type(pipe) is BGEVLPipeline and index.ntotal == 10 and index.model_fingerprint == pipe.fingerprint
    paths = [entry["path"] for entry in index.metadata]
    expected = F.normalize(pipe.encode_image(paths), dim=-1).numpy()  # the image features, normalised
    np.testing.assert_allclose(index._parts[0].reconstruct_n(0, 10), expected, atol=1e-5)

    reference = workspace / "images" / "photo04.png"
    assert main(["search", "--index", str(tmp_path / "index"), "--model", release, "--image", str(reference),
                 "--text", "the same at night", "--k", "4", "--device", "cpu"]) == 0
    printed = re.findall(r"^\s+\d+\s+-?\d\.\d{4}\s+(\S+)", capsys.readouterr().out, flags=re.M)
    result = composed_search(pipe, index, image=reference, text="the same at night", k=4)
    assert [hit.id for hit in result.hits] == printed and "photo04.png" not in printed
    query = pipe(image=str(reference), prompt="the same at night").image_embeds[0].numpy()
    ranked = [paths[i].rsplit("/", 1)[-1] for i in np.argsort(-(expected @ query)) if not paths[i].endswith("photo04.png")]
    assert printed == ranked[:4]


def test_index_build_of_a_saved_folder_preprocesses_as_the_pipeline(workspace, tmp_path, capsys):
    """index build embeds the gallery of a saved BGE-VL folder with its CLIP tower alone: with the PIL image processor
    the pipeline recorded, not transformers 5's default torchvision one (whose pixels differ, under the same
    fingerprint)."""
    from diffusers_cir.conversion.bgevl import convert_bgevl_checkpoint_to_pipeline
    from diffusers_cir.retrieval.encoders import load_gallery_encoder

    convert_bgevl_checkpoint_to_pipeline(workspace / "BGE-VL-tiny", tmp_path / "saved")
    encoder = load_gallery_encoder(tmp_path / "saved")
    pipe = AutoCIRPipeline.from_pretrained(tmp_path / "saved")
    assert type(encoder.image_processor) is type(pipe.image_processor) and encoder.fingerprint == pipe.fingerprint
    tall = [Image.fromarray(np.random.default_rng(seed).integers(0, 255, (120, 45, 3), dtype=np.uint8)) for seed in range(3)]
    torch.testing.assert_close(encoder.encode_image(tall), pipe.encode_image(tall), atol=1e-6, rtol=0)


def _fashioniq(root: Path, captions: list[list[str]]) -> Path:
    """A one-category (dress) FashionIQ folder in the official layout: 8 images, one triplet per caption pair."""
    rng = np.random.default_rng(1)
    names = [f"B00{i:07d}" for i in range(8)]
    (root / "images").mkdir(parents=True)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (44, 36, 3), dtype=np.uint8)).save(root / "images" / f"{name}.png")
    (root / "image_splits").mkdir()
    (root / "image_splits" / "split.dress.val.json").write_text(json.dumps(names))
    (root / "captions").mkdir()
    triplets = [{"candidate": names[i], "target": names[i + 1], "captions": pair} for i, pair in enumerate(captions)]
    (root / "captions" / "cap.dress.val.json").write_text(json.dumps(triplets))
    return root


def test_evaluate_with_the_authors_protocol(workspace, tmp_path, caplog):
    long_caption = " ".join(["red"] * 80)  # over 75 tokens once joined: the truncation shows
    captions = [["Is shiny and silver.", " fit and flare"], ["is darker", long_caption], ["has stripes", "is longer"]]
    root = _fashioniq(tmp_path / "fashionIQ", captions)
    outputs = {}
    for protocol in (None, "bgevl"):
        output = tmp_path / f"out-{protocol}"
        flags = [] if protocol is None else ["--protocol", protocol]
        with caplog.at_level(logging.WARNING, logger="diffusers_cir.pipelines.pipeline_bgevl"):
            assert main(["evaluate", "fashioniq", "--pipeline", str(workspace / "BGE-VL-tiny"), "--data-root", str(root),
                         "--subset", "dress", "--output-dir", str(output), "--device", "cpu", "--no-progress", *flags]) == 0
        outputs[protocol] = output
    report = json.loads((outputs["bgevl"] / "metrics.json").read_text())
    settings = report["settings"]
    assert settings["protocol"] == "bgevl" and settings["max_sequence_length"] == 75
    assert settings["reference_excluded"] is False and "MegaPairs" in settings["source"]
    assert "Protocol: `bgevl`: the BGE-VL authors' protocol" in (outputs["bgevl"] / "metrics.md").read_text()
    official = json.loads((outputs[None] / "metrics.json").read_text())["settings"]
    assert official["protocol"] == "clip4cir" and "Protocol: `clip4cir`" in (outputs[None] / "metrics.md").read_text()
    truncated = [r.getMessage() for r in caplog.records if "longer than 75 tokens" in r.getMessage()]
    assert truncated and "1 of" in truncated[0]

    pipe = _pipeline(workspace)
    assert report["encoder"] == pipe.fingerprint
    with safe_open(outputs["bgevl"] / "query_embeddings_dress.safetensors", framework="pt") as handle:
        queries = handle.get_tensor("query_embeds")
    references = pipe.encode_image([str(root / "images" / f"B00{i:07d}.png") for i in range(3)])
    texts = [f"{first}, and {second}" for first, second in captions]  # verbatim, as the authors' query files hold
    expected = pipe(image_embeds=references, prompt=texts, max_sequence_length=75).image_embeds
    torch.testing.assert_close(queries, expected, atol=1e-5, rtol=0)
    at_77 = pipe(image_embeds=references, prompt=texts).image_embeds
    assert (at_77[1] - expected[1]).abs().max() > 1e-4  # the long query differs at 77 tokens: 75 was applied


def test_a_protocol_for_another_model_is_refused_before_anything_loads(workspace, tmp_path, capsys):
    from tiny_components import tiny_pipeline

    tiny_pipeline().save_pretrained(tmp_path / "compodiff")  # takes no max_sequence_length
    root = _fashioniq(tmp_path / "fashionIQ", [["a", "b"]])
    arguments = ["evaluate", "fashioniq", "--data-root", str(root), "--subset", "dress", "--device", "cpu", "--no-progress"]
    assert main([*arguments, "--pipeline", str(tmp_path / "compodiff"), "--output-dir", str(tmp_path / "o"),
                 "--protocol", "bgevl"]) == 2
    error = capsys.readouterr().err
    assert "--protocol bgevl (max_sequence_length)" in error and "CompoDiffPipeline" in error
    assert main([*arguments, "--dry-run", "--output-dir", str(tmp_path / "o"), "--protocol", "nope"]) == 2
    assert "`--protocol` must be one of ('clip4cir', 'searle', 'bgevl', 'magiclens') for fashioniq, got 'nope'" in capsys.readouterr().err
    assert main([*arguments, "--dry-run", "--output-dir", str(tmp_path / "o"), "--protocol", "bgevl",
                 "--fashioniq-captions", "searle"]) == 2
    assert "not both" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert "bgevl" not in PROTOCOLS["genecis"]  # the authors recorded nothing for GeneCIS


def test_the_official_protocol_stays_the_default_and_bgevl_changes_only_what_the_authors_did():
    for benchmark in ("circo", "fashioniq", "cirr"):
        official, authors = get_protocol(benchmark), get_protocol(benchmark, "bgevl")
        assert official.name != "bgevl" and dict(authors.call_kwargs) == {"max_sequence_length": 75}
        assert (authors.metric, authors.depth, authors.submission, authors.subsets) == (
            official.metric, official.depth, official.submission, official.subsets)
        assert authors.exclude_reference == official.exclude_reference  # CIRCO and FashionIQ keep it; CIRR: unknown


def _shared(name: str) -> Path:
    folder = SHARED_BENCHMARKS / name
    if not folder.is_dir():
        pytest.skip(f"real {name} annotation files not found in {folder}")
    return folder


def test_query_texts_are_the_authors_on_the_real_annotations():
    """The texts of the authors' query files (MegaPairs eval/data/*.jsonl at ad99aca), on the official annotations."""
    folder = _shared("circo")
    references = [entry["reference_img_id"] for entry in json.loads((folder / "test.json").read_text())]
    test = load_circo(folder, "test", gallery_ids=sorted(set(references)))
    texts = get_protocol("circo", "bgevl").query_texts
    assert texts(test.queries[0], "{}") == [
        "Find a picture that also a man sitting on an outdoor toilet, but has a higher quality and is taken during the "
        "daytime."]
    assert texts(test.queries[1], "{}") == ["Find a picture that also a double bed, but is in a room with wooden walls."]
    dress = load_fashioniq(_shared("fashioniq"), "dress", "val")
    query = next(q for q in dress.queries if q.reference_id == "B005X4PL1G" and q.target_id == "B0084Y8XIU")
    assert get_protocol("fashioniq", "bgevl").query_texts(query, "{}") == [
        "is shiny and silver with shorter sleeves, and fit and flare"]
