"""`diffusers-cir evaluate` ranks an LDRE CaptionRewritePipeline on CIRCO with LDRE's adaptive ensemble, as the
authors do (diffusers_cir.evaluation.rewrite_ensemble), and records which combination of the rewrites ran."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from metric_asserts import assert_metrics_equal
from tiny_mllm import tiny_caption_rewrite_pipeline

from diffusers_cir import AutoCIRPipeline, CaptionRewritePipeline, metrics
from diffusers_cir.cli import main
from diffusers_cir.data.benchmarks import CIRQuery
from diffusers_cir.evaluation import IdHashEncoder, get_protocol, run_evaluation
from diffusers_cir.evaluation.rewrite_ensemble import (
    REWRITE_ENSEMBLES,
    check_rewrite_ensemble,
    resolve_rewrite_ensemble,
)
from diffusers_cir.retrieval import ldre_ensemble

pytestmark = pytest.mark.usefixtures("single_thread")

CAPTIONS = ["is at night", "has two of them", "is made of wood", "is on a beach"]


def _circo(root: Path, num_images: int = 10):
    """A CIRCO-layout val split with pixels: COCO-named gallery images, a gallery id list, four queries."""
    rng = np.random.default_rng(3)
    folder = root / "COCO2017_unlabeled" / "unlabeled2017"
    folder.mkdir(parents=True)
    ids = list(range(100, 100 + num_images))
    for image_id in ids:
        Image.fromarray(rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(folder / f"{image_id:012d}.jpg")
    (root / "annotations").mkdir()
    queries = [{"id": q, "reference_img_id": ids[2 * q], "target_img_id": ids[2 * q + 1],
                "gt_img_ids": [ids[2 * q + 1], ids[(3 * q + 5) % num_images]], "relative_caption": caption,
                "shared_concept": "a thing", "semantic_aspects": ["cardinality"]} for q, caption in enumerate(CAPTIONS)]
    (root / "annotations" / "val.json").write_text(json.dumps(queries))
    (root / "gallery.json").write_text(json.dumps(ids))
    return root, ids, queries, {image_id: folder / f"{image_id:012d}.jpg" for image_id in ids}


@pytest.fixture(scope="module")
def ldre_run(tmp_path_factory):
    """An LDRE pipeline folder evaluated on CIRCO by default and with `--rewrite-ensemble mean`."""
    tmp_path = tmp_path_factory.mktemp("ldre_eval")
    tiny_caption_rewrite_pipeline("ldre").save_pretrained(tmp_path / "pipe")
    root, ids, queries, paths = _circo(tmp_path / "CIRCO")
    outputs = {}
    for name, flags in (("default", []), ("mean", ["--rewrite-ensemble", "mean"])):
        outputs[name] = tmp_path / name
        assert main(["evaluate", "circo", "--pipeline", str(tmp_path / "pipe"), "--data-root", str(root),
                     "--gallery-ids", str(root / "gallery.json"), "--output-dir", str(outputs[name]),
                     "--device", "cpu", "--no-progress", *flags]) == 0
    pipe = AutoCIRPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    return SimpleNamespace(pipe=pipe, ids=ids, queries=queries, paths=paths, outputs=outputs)


def _ranked(scores: torch.Tensor, ids: list) -> list[list]:
    return [[ids[i] for i in torch.argsort(row, descending=True, stable=True).tolist()] for row in scores]


def _expected_metrics(scores, run):
    return metrics.compute_circo_metrics(
        scores=scores, gallery_ids=run.ids, ground_truth_ids=[q["gt_img_ids"] for q in run.queries],
        semantic_aspects=[q["semantic_aspects"] for q in run.queries])


def test_ldre_on_circo_is_ranked_with_the_authors_ensemble(ldre_run):
    run = ldre_run
    # Computed here, independently of the runner: the pipeline's rewrites and captions of the four queries, LDRE's
    # ensemble against the gallery, and the metric function on the resulting scores.
    references = [str(run.paths[q["reference_img_id"]]) for q in run.queries]
    out = run.pipe(image=references, prompt=CAPTIONS, output_caption_embeds=True)
    gallery = F.normalize(run.pipe.encode_image([str(run.paths[i]) for i in run.ids]).float(), dim=-1)
    queries, weights = ldre_ensemble(out.rewrite_embeds, out.caption_embeds, gallery)
    ensemble_scores = F.normalize(queries, dim=-1) @ gallery.T
    plain_scores = F.normalize(out.image_embeds.float(), dim=-1) @ gallery.T
    ensemble_ranked, plain_ranked = _ranked(ensemble_scores, run.ids), _ranked(plain_scores, run.ids)
    assert ensemble_ranked != plain_ranked  # the ensemble changes the order on this fixture
    expected, plain = _expected_metrics(ensemble_scores, run), _expected_metrics(plain_scores, run)
    assert expected != plain

    report = json.loads((run.outputs["default"] / "metrics.json").read_text())
    rankings = json.loads((run.outputs["default"] / "rankings.json").read_text())
    assert [rankings[str(q["id"])] for q in run.queries] == ensemble_ranked
    assert_metrics_equal(report["metrics"], expected)
    ensemble = report["settings"]["rewrite_ensemble"]
    assert report["settings"]["protocol"] == "standard"
    assert ensemble["name"] == "ldre" and (ensemble["top_k"], ensemble["temperature"]) == (5, 0.04)
    assert "yzy-bupt/LDRE" in ensemble["source"]
    np.testing.assert_allclose(report["ldre_slot_weights"]["circo"], weights.numpy(), atol=1e-5)
    assert "Rewrite ensemble: `ldre`" in (run.outputs["default"] / "metrics.md").read_text()

    # Turned off: the plain composed query (the mean of the rewrites), recorded as such.
    mean_report = json.loads((run.outputs["mean"] / "metrics.json").read_text())
    mean_rankings = json.loads((run.outputs["mean"] / "rankings.json").read_text())
    assert [mean_rankings[str(q["id"])] for q in run.queries] == plain_ranked
    assert_metrics_equal(mean_report["metrics"], plain)
    assert mean_report["settings"]["rewrite_ensemble"]["name"] == "mean" and "ldre_slot_weights" not in mean_report


def test_the_default_follows_the_authors_benchmarks_and_recipes(ldre_run):
    assert resolve_rewrite_ensemble(ldre_run.pipe, "circo", None) == "ldre"
    assert resolve_rewrite_ensemble(ldre_run.pipe, "cirr", None) == "mean"  # LDRE ranks CIRR with the mean
    assert resolve_rewrite_ensemble(ldre_run.pipe, "cirr", "ldre") == "ldre"
    cirevl = CaptionRewritePipeline(**ldre_run.pipe.components, recipe="cirevl-circo")
    assert cirevl.recipe.name == "cirevl-circo" and resolve_rewrite_ensemble(cirevl, "circo", None) == "mean"
    assert resolve_rewrite_ensemble(IdHashEncoder(), "circo", None) is None


def test_ensembles_are_refused_where_they_cannot_run(tmp_path, capsys):
    root, *_ = _circo(tmp_path / "CIRCO", num_images=8)
    # A pipeline without rewrites, before any image is embedded.
    with pytest.raises(ValueError, match="`rewrite_ensemble` 'ldre' combines the rewrites of a CaptionRewritePipeline; "
                                         "IdHashEncoder composes one embedding per query"):
        run_evaluation(IdHashEncoder(), "circo", root, output_dir=tmp_path / "out", rewrite_ensemble="ldre",
                       loader_kwargs={"gallery_ids": list(range(100, 108))}, progress=False)
    assert not (tmp_path / "out").exists()
    assert main(["evaluate", "circo", "--dry-run", "--data-root", str(root), "--gallery-ids", str(root / "gallery.json"),
                 "--output-dir", str(tmp_path / "o"), "--rewrite-ensemble", "mean", "--no-progress"]) == 2
    assert "diffusers-cir evaluate: error: `rewrite_ensemble` 'mean' combines the rewrites" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"must be one of \['ldre', 'mean'\], got 'median'"):
        check_rewrite_ensemble("median", [], get_protocol("circo"), "{}")
    # Per-query candidates (GeneCIS) have no shared gallery; SEARLE's FashionIQ queries have two texts.
    candidates = SimpleNamespace(gallery_ids=None, description="GeneCIS change_object", queries=[])
    with pytest.raises(ValueError, match="ranks each query's own candidates"):
        check_rewrite_ensemble("ldre", [candidates], get_protocol("genecis"), "{}")
    two_texts = SimpleNamespace(gallery_ids=["a"], description="FashionIQ dress", queries=[
        CIRQuery(query_id=7, reference_id="a", captions=["is red", "has long sleeves"], target_id="b")])
    with pytest.raises(ValueError, match="the 'searle' protocol gives query 7 several texts"):
        check_rewrite_ensemble("ldre", [two_texts], get_protocol("fashioniq", "searle"), "{}")
    check_rewrite_ensemble("mean", [candidates], get_protocol("genecis"), "{}")


def test_cli_choices_follow_the_library():
    from diffusers_cir.evaluation import command_line

    assert command_line.REWRITE_ENSEMBLE_CHOICES == REWRITE_ENSEMBLES


def test_a_pipeline_folder_without_rewrites_is_refused_before_it_loads(tmp_path, capsys, monkeypatch):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from diffusers_cir import LinCIRPipeline, TextualInversionProjection
    from diffusers_cir.retrieval import encoders as retrieval_encoders
    from diffusers_cir.utils import build_offline_clip_tokenizer

    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                                              num_attention_heads=4, projection_dim=16))
    LinCIRPipeline(phi=TextualInversionProjection(input_dim=16, hidden_dim=32, output_dim=32), text_encoder=text_encoder,
                   tokenizer=build_offline_clip_tokenizer()).save_pretrained(tmp_path / "lincir")

    def no_loading(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before --rewrite-ensemble was checked")

    monkeypatch.setattr(retrieval_encoders, "load_pipeline", no_loading)
    root, *_ = _circo(tmp_path / "CIRCO", num_images=8)
    assert main(["evaluate", "circo", "--pipeline", str(tmp_path / "lincir"), "--data-root", str(root), "--gallery-ids",
                 str(root / "gallery.json"), "--output-dir", str(tmp_path / "out"), "--rewrite-ensemble", "ldre"]) == 2
    assert (f"diffusers-cir evaluate: error: --rewrite-ensemble ldre: LinCIRPipeline ({tmp_path / 'lincir'}) does not "
            "take this option") in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
