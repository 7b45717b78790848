"""The evaluation runner end to end: real annotation files, a pixel-free stand-in encoder, written files checked
against the metric functions applied to the same scores, and the official submission structures."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))

from metric_asserts import assert_metrics_equal  # noqa: E402

from diffusers_cir import metrics
from diffusers_cir.data.benchmarks import load_circo, load_cirr, load_genecis
from diffusers_cir.evaluation import IdHashEncoder, circo_submission, cirr_submissions
from diffusers_cir.retrieval import compose_queries


def normalize(embeds: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(embeds.float(), dim=-1)

REPO = Path(__file__).resolve().parents[1]
SHARED_BENCHMARKS = REPO.parent / "shared" / "benchmarks"


def _folder(name: str) -> Path:
    folder = SHARED_BENCHMARKS / name
    if not folder.is_dir():
        pytest.skip(f"real {name} annotation files not found in {folder}")
    return folder


def _example_main():
    spec = importlib.util.spec_from_file_location("evaluate_cir_example", REPO / "examples" / "evaluate_cir.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _cli(argv: list[str]) -> int:
    from diffusers_cir.cli import main

    return main(argv)


def _saved_queries(path: Path) -> tuple[torch.Tensor, list]:
    with safe_open(path, framework="pt") as handle:
        return handle.get_tensor("query_embeds"), json.loads(handle.metadata()["query_ids"])


def _gallery_embeds(image_ids: list) -> torch.Tensor:
    return normalize(IdHashEncoder().encode_image(image_ids))


def test_cirr_val_end_to_end(tmp_path):
    folder = _folder("cirr")
    output = tmp_path / "cirr-val"
    assert _example_main()(["cirr", "--dry-run", "--data-root", str(folder), "--output-dir", str(output),
                            "--write-submissions", "--no-progress"]) == 0
    report = json.loads((output / "metrics.json").read_text())
    cirr = load_cirr(folder, "val")
    assert report["num_queries"] == {"cirr": 4181} and report["gallery_size"] == {"cirr": 2297}

    # The stored query embeddings are the stand-in's compositions of (reference, caption).
    queries, query_ids = _saved_queries(output / "query_embeddings.safetensors")
    assert query_ids == [q.query_id for q in cirr.queries]
    encoder = IdHashEncoder()
    references = encoder.encode_image([q.reference_id for q in cirr.queries[:64]])
    recomposed = normalize(encoder(image_embeds=references, prompt=[q.captions[0] for q in cirr.queries[:64]]).image_embeds)
    torch.testing.assert_close(queries[:64], recomposed)

    # Written metrics = the metric functions applied to the scores of the whole split gallery.
    scores = queries @ _gallery_embeds(cirr.gallery_ids).T
    expected = metrics.compute_cirr_metrics(
        scores=scores, gallery_ids=cirr.gallery_ids, target_ids=[q.target_id for q in cirr.queries],
        reference_ids=[q.reference_id for q in cirr.queries], group_members=[q.group_members for q in cirr.queries])
    assert_metrics_equal(report["metrics"], expected)
    assert 0 < expected["recall_subset_at1"] < expected["recall_subset_at3"] < 100
    markdown = (output / "metrics.md").read_text()
    assert "| avg |" in markdown and f"{expected['recall_at50']:.2f}" in markdown
    # both published CIRR Avgs, each labelled with its source, in metrics.md and metrics.json
    assert "| avg_r1_rs1 |" in markdown and "CLIP4Cir" in markdown and "CompoDiff paper" in markdown
    assert report["metric_definitions"] == metrics.CIRR_AVG_DEFINITIONS

    # Official structure: version + metric keys, every pair id as a string, 50 / 3 distinct ids, no reference.
    recall = json.loads((output / "recall_submission_val.json").read_text())
    subset = json.loads((output / "recall_subset_submission_val.json").read_text())
    assert (recall.pop("version"), recall.pop("metric")) == ("rc2", "recall")
    assert (subset.pop("version"), subset.pop("metric")) == ("rc2", "recall_subset")
    assert set(recall) == set(subset) == {str(q.query_id) for q in cirr.queries}
    gallery = np.asarray(cirr.gallery_ids)
    for row, query in enumerate(cirr.queries[:200]):
        ranking = [i for i in gallery[np.argsort(-scores[row].numpy(), kind="stable")] if i != query.reference_id]
        assert recall[str(query.query_id)] == ranking[:50]
        members = set(query.group_members) - {query.reference_id}
        assert subset[str(query.query_id)] == [i for i in ranking if i in members][:3]
    assert all(len(set(ids)) == 50 for ids in recall.values()) and all(len(set(ids)) == 3 for ids in subset.values())


def test_cirr_test1_writes_only_submissions(tmp_path):
    folder = _folder("cirr")
    layout = tmp_path / "CIRR"
    (layout / "cirr" / "captions").mkdir(parents=True)
    (layout / "cirr" / "image_splits").mkdir()
    (layout / "cirr" / "captions" / "cap.rc2.test1.json").symlink_to(folder / "cap.rc2.test1.json")
    # split.rc2.test1.json is not among the shared files; its 2,315 ids are the image-set members.
    captions = json.loads((folder / "cap.rc2.test1.json").read_text())
    split = {m: f"./test1/{m}.png" for q in captions for m in q["img_set"]["members"]}
    (layout / "cirr" / "image_splits" / "split.rc2.test1.json").write_text(json.dumps(split))
    output = tmp_path / "out"
    assert _cli(["evaluate", "cirr", "--dry-run", "--split", "test1", "--data-root", str(layout),
                 "--output-dir", str(output), "--no-progress"]) == 0
    report = json.loads((output / "metrics.json").read_text())
    assert report["metrics"] == {} and "hidden" in (output / "metrics.md").read_text()
    recall = json.loads((output / "recall_submission_test1.json").read_text())
    assert recall["version"] == "rc2" and recall["metric"] == "recall" and len(recall) == 4148 + 2
    reference_of = {str(q["pairid"]): q["reference"] for q in captions}
    assert all(reference_of[pair] not in ids and len(ids) == 50 for pair, ids in recall.items() if pair in reference_of)


def test_circo_val_end_to_end_with_distractors(tmp_path):
    folder = _folder("circo")
    annotations = json.loads((folder / "val.json").read_text())
    annotated = sorted({i for q in annotations for i in [q["reference_img_id"], *q["gt_img_ids"]]})
    distractors = [int(i) for i in np.random.default_rng(0).choice(np.arange(600_000, 700_000), 3000, replace=False)]
    gallery_file = tmp_path / "gallery_ids.txt"
    gallery_file.write_text("\n".join(map(str, annotated + distractors)))
    output = tmp_path / "circo-val"
    assert _cli(["evaluate", "circo", "--dry-run", "--data-root", str(folder), "--gallery-ids", str(gallery_file),
                 "--output-dir", str(output), "--write-submissions", "--no-progress"]) == 0
    report = json.loads((output / "metrics.json").read_text())
    circo = load_circo(folder, "val", gallery_ids=annotated + distractors)
    queries, _ = _saved_queries(output / "query_embeddings.safetensors")
    scores = queries @ _gallery_embeds(circo.gallery_ids).T
    expected = metrics.compute_circo_metrics(
        scores=scores, gallery_ids=circo.gallery_ids, ground_truth_ids=[q.ground_truth_ids for q in circo.queries],
        semantic_aspects=[q.extra["semantic_aspects"] for q in circo.queries])
    assert_metrics_equal(report["metrics"], expected)
    assert expected["map_at50"] > 0

    submission = json.loads((output / "circo_val_submission.json").read_text())
    assert list(submission) == [str(i) for i in range(220)]
    gallery = np.asarray(circo.gallery_ids)
    for row in range(220):
        ids = submission[str(row)]
        assert len(ids) == 50 == len(set(ids)) and all(isinstance(i, int) for i in ids)
        assert ids == gallery[np.argsort(-scores[row].numpy(), kind="stable")][:50].tolist()
    # The reference is kept (CIRCO does not remove it): the stand-in ranks it first.
    assert sum(submission[str(q["id"])][0] == q["reference_img_id"] for q in annotations) > 200


def test_circo_test_split_writes_the_submission_by_default(tmp_path):
    folder = _folder("circo")
    annotations = json.loads((folder / "test.json").read_text())
    gallery = sorted({q["reference_img_id"] for q in annotations} | set(range(900_000, 900_100)))
    (tmp_path / "ids.json").write_text(json.dumps(gallery))
    assert _cli(["evaluate", "circo", "--dry-run", "--split", "test", "--data-root", str(folder),
                 "--gallery-ids", str(tmp_path / "ids.json"), "--output-dir", str(tmp_path / "out"), "--no-progress"]) == 0
    submission = json.loads((tmp_path / "out" / "circo_test_submission.json").read_text())
    assert len(submission) == 800 and all(len(set(ids)) == 50 for ids in submission.values())


def test_fashioniq_and_genecis_metrics_equal_the_functions_on_the_same_scores(tmp_path):
    folder = _folder("fashioniq")
    from diffusers_cir.data.benchmarks import load_fashioniq

    output = tmp_path / "fiq"
    assert _cli(["evaluate", "fashioniq", "--dry-run", "--subset", "dress", "toptee", "--fashioniq-captions", "searle",
                 "--data-root", str(folder), "--output-dir", str(output), "--no-progress"]) == 0
    report = json.loads((output / "metrics.json").read_text())
    per_category = {}
    for category in ("dress", "toptee"):
        split = load_fashioniq(folder, category)
        queries, _ = _saved_queries(output / f"query_embeddings_{category}.safetensors")
        per_category[category] = metrics.fashioniq_recall_at_k(
            target_ids=[q.target_id for q in split.queries], gallery_ids=split.gallery_ids,
            scores=queries @ _gallery_embeds(split.gallery_ids).T)
    assert_metrics_equal(report["metrics"], metrics.fashioniq_average_recall(per_category))
    assert report["settings"]["caption_style"] == "searle"

    genecis_folder = _folder("genecis")
    output = tmp_path / "genecis"
    assert _cli(["evaluate", "genecis", "--dry-run", "--subset", "focus_object", "--data-root", str(genecis_folder),
                 "--output-dir", str(output), "--no-progress"]) == 0
    task = load_genecis(genecis_folder, "focus_object")
    queries, _ = _saved_queries(output / "query_embeddings_focus_object.safetensors")
    scores = [(_gallery_embeds(q.candidate_ids) @ embed).tolist() for q, embed in zip(task.queries, queries)]
    expected = metrics.genecis_average_over_tasks({"focus_object": metrics.genecis_recall_at_k(scores)})
    assert_metrics_equal(json.loads((output / "metrics.json").read_text())["metrics"], expected)


def test_searle_style_queries_average_both_caption_orders():
    class Recorder(IdHashEncoder):
        def __call__(self, image_embeds, prompt, **options):
            output = super().__call__(image_embeds, prompt)
            output.image_embeds = image_embeds + torch.stack([self._embed(p) for p in prompt])
            return output

    encoder = Recorder(8)
    references = torch.randn(2, 8)
    got = compose_queries(encoder, [["a and b", "b and a"], ["c"]], reference_embeds=references, batch_size=2)
    forward = normalize(references[:1] + encoder._embed("a and b"))
    backward = normalize(references[:1] + encoder._embed("b and a"))
    torch.testing.assert_close(got[0], normalize((forward + backward) / 2)[0])
    torch.testing.assert_close(got[1], normalize(references[1:] + encoder._embed("c"))[0])


class _Counting(IdHashEncoder):
    """The stand-in, counting the images it embeds; it can stop (as an interruption would) after `fail_after`."""

    def __init__(self, fail_after=None):
        super().__init__()
        self.encoded, self.fail_after = 0, fail_after

    def encode_image(self, images, **kwargs):
        if self.fail_after is not None and self.encoded >= self.fail_after:
            raise KeyboardInterrupt
        self.encoded += len(images)
        return super().encode_image(images, **kwargs)


def test_gallery_cache_is_reused_and_resumes_after_an_interruption(tmp_path):
    """The evaluation's gallery goes through retrieval's resumable cache (encode_gallery): finished parts survive an
    interruption, a rerun embeds only the rest, and a run after it embeds nothing."""
    from diffusers_cir.evaluation import run_evaluation

    root = _tiny_cirr(tmp_path / "CIRR", num_images=100)
    options = dict(output_dir=tmp_path / "out", image_batch_size=10, cache_part_size=20, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(_Counting(fail_after=40), "cirr", root, **options)
    resumed = _Counting()
    result = run_evaluation(resumed, "cirr", root, **options)
    assert resumed.encoded == 60  # two full parts of 20 survived
    again = _Counting()
    assert run_evaluation(again, "cirr", root, **options).metrics == result.metrics and again.encoded == 0
    other = _Counting()
    other.fingerprint = "another-model"
    run_evaluation(other, "cirr", root, **options)
    assert other.encoded == 100  # another model's embeddings are never reused


def test_a_real_compodiff_pipeline_folder_plugs_in(tmp_path):
    from PIL import Image
    from tiny_components import EMBED_DIM, tiny_pipeline

    from diffusers_cir import AutoCIRPipeline
    from diffusers_cir.evaluation import run_evaluation

    folder = tmp_path / "pipe"
    tiny_pipeline().save_pretrained(folder)

    # A 10-image CIRR-style val split with real pixels and 3 queries.
    root = tmp_path / "CIRR"
    (root / "dev").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"dev-{i}-0-img0" for i in range(10)]
    for name in names:
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "dev" / f"{name}.png")
    (root / "split.rc2.val.json").write_text(json.dumps({name: f"./dev/{name}.png" for name in names}))
    captions = [{"pairid": i, "reference": names[i], "target_hard": names[i + 1], "caption": f"change {i}",
                 "target_soft": {names[i + 1]: 1.0}, "img_set": {"id": i, "members": names[i : i + 6]}}
                for i in range(3)]
    (root / "cap.rc2.val.json").write_text(json.dumps(captions))

    output = tmp_path / "out"
    assert _cli(["evaluate", "cirr", "--pipeline", str(folder), "--data-root", str(root), "--output-dir", str(output),
                 "--num-inference-steps", "3", "--device", "cpu", "--no-progress"]) == 0
    report = json.loads((output / "metrics.json").read_text())
    pipe = AutoCIRPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert report["encoder"] == pipe.fingerprint and set(report["metrics"]) >= {"recall_at1", "avg"}
    queries, _ = _saved_queries(output / "query_embeddings.safetensors")
    assert queries.shape == (3, EMBED_DIM) and torch.isfinite(queries).all()
    # The queries are the pipeline's compositions of the references' gallery embeddings, seeded per batch.
    references = pipe.encode_image([str(root / "dev" / f"{name}.png") for name in names[:3]])
    expected = compose_queries(pipe, [f"change {i}" for i in range(3)], reference_embeds=references,
                               num_inference_steps=3)
    torch.testing.assert_close(queries, expected, atol=1e-5, rtol=0)

    with pytest.raises(ValueError, match="does not accept \\['num_steps'\\]"):
        run_evaluation(pipe, "cirr", root, output_dir=output, call_kwargs={"num_steps": 3}, progress=False)
    (root / "dev" / f"{names[9]}.png").unlink()
    with pytest.raises(FileNotFoundError, match=f"Image '{names[9]}' should be at"):
        run_evaluation(pipe, "cirr", root, output_dir=tmp_path / "out2", progress=False)


def test_pipeline_folder_errors(tmp_path, capsys):
    """An --pipeline that is not a CIR pipeline fails with AutoCIRPipeline's message, before any image is read."""
    root = _tiny_cirr(tmp_path / "CIRR")
    command = ["evaluate", "cirr", "--pipeline", str(tmp_path / "nothing"), "--data-root", str(root),
               "--output-dir", str(tmp_path / "o"), "--no-progress", "--device", "cpu"]
    (tmp_path / "nothing").mkdir()
    assert _cli(command) == 2
    assert "is not a CIR pipeline folder (no model_index.json)" in capsys.readouterr().err
    (tmp_path / "nothing" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert _cli(command) == 2
    assert "names the pipeline class 'StableDiffusionPipeline'" in capsys.readouterr().err


def test_submission_helpers_refuse_what_the_servers_would():
    with pytest.raises(ValueError, match="still lists its reference"):
        cirr_submissions([1], ["r"], [["r"] + [f"g{i}" for i in range(49)]], [["a", "b", "c"]])
    with pytest.raises(ValueError, match="expects 50"):
        circo_submission([0], [[1, 2, 3]])
    with pytest.raises(ValueError, match="lists an id twice"):
        circo_submission([0], [[1] * 50])


def test_a_gallery_smaller_than_the_ranking_depth_gives_shorter_rankings(tmp_path):
    """k beyond the gallery: the index pads (faiss' rule) and a ranking keeps only the ids found, so a toy CIRR split
    of 8 images ranks 7 (its reference left out) where the official depth is 50."""
    from diffusers_cir.evaluation import run_evaluation

    root = _tiny_cirr(tmp_path / "CIRR")
    run_evaluation(IdHashEncoder(), "cirr", root, output_dir=tmp_path / "out", progress=False)
    rankings = json.loads((tmp_path / "out" / "rankings.json").read_text())
    captions = json.loads((root / "cap.rc2.val.json").read_text())
    for query in captions:
        ranking = rankings[str(query["pairid"])]
        assert len(ranking) == 7 and query["reference"] not in ranking and len(set(ranking)) == 7


def test_a_pipeline_giving_a_nan_query_is_named_with_the_queries(tmp_path):
    from diffusers_cir.evaluation import run_evaluation

    class Broken(IdHashEncoder):
        def __call__(self, image_embeds, prompt, **options):
            output = super().__call__(image_embeds, prompt)
            output.image_embeds[-1, 0] = float("nan")
            return output

    with pytest.raises(ValueError, match=r"composed for queries 0-1` contain NaN or inf in rows \[1\]"):
        run_evaluation(Broken(), "cirr", _tiny_cirr(tmp_path / "CIRR"), output_dir=tmp_path / "out", progress=False)


def test_cli_choices_follow_the_library():
    from diffusers_cir.data.benchmarks import BENCHMARKS, FASHIONIQ_CAPTION_STYLES
    from diffusers_cir.evaluation import command_line

    assert command_line.BENCHMARK_CHOICES == BENCHMARKS
    assert command_line.CAPTION_STYLE_CHOICES == FASHIONIQ_CAPTION_STYLES
    parser = command_line.add_evaluation_arguments(argparse.ArgumentParser())
    with pytest.raises(SystemExit):
        parser.parse_args(["cirr", "--data-root", "x", "--output-dir", "y"])  # neither --pipeline nor --dry-run


def test_missing_files_exit_with_a_message(tmp_path, capsys):
    assert _cli(["evaluate", "cirr", "--dry-run", "--data-root", str(tmp_path), "--output-dir", str(tmp_path / "o")]) == 2
    assert "cap.rc2.val.json" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["encoders", "submissions", "runner", "command_line"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"diffusers_cir.evaluation.{module}"))
    assert result.attempted > 0 and result.failed == 0


def test_a_missing_category_fails_before_any_other_is_embedded(tmp_path):
    folder = _folder("fashioniq")
    from diffusers_cir.evaluation import run_evaluation

    only_dress = tmp_path / "fiq"
    only_dress.mkdir()
    for path in folder.glob("*.dress.*.json"):
        (only_dress / path.name).write_bytes(path.read_bytes())

    class CountingEncoder(IdHashEncoder):
        calls = 0

        def encode_image(self, *args, **kwargs):
            CountingEncoder.calls += 1
            return super().encode_image(*args, **kwargs)

    with pytest.raises(FileNotFoundError, match="shirt"):
        run_evaluation(CountingEncoder(), "fashioniq", only_dress, output_dir=tmp_path / "out", progress=False)
    assert CountingEncoder.calls == 0 and not (tmp_path / "out").exists()


def _tiny_cirr(root: Path, num_images: int = 8) -> Path:
    """A CIRR-style val split (annotation files only: the stand-in reads no image)."""
    names = [f"dev-{i}-0-img0" for i in range(num_images)]
    root.mkdir(parents=True)
    (root / "split.rc2.val.json").write_text(json.dumps({name: f"./dev/{name}.png" for name in names}))
    captions = [{"pairid": i, "reference": names[i], "target_hard": names[i + 1], "caption": f"change {i}",
                 "target_soft": {names[i + 1]: 1.0}, "img_set": {"id": i, "members": names[i : i + 6]}}
                for i in range(2)]
    (root / "cap.rc2.val.json").write_text(json.dumps(captions))
    return root


@pytest.mark.parametrize(
    "flag, value, allowed",
    [("--batch-size", "0", "an integer >= 1"), ("--image-batch-size", "0", "an integer >= 1"),
     ("--num-workers", "-1", "an integer >= 0"), ("--num-inference-steps", "0", "an integer >= 1"),
     ("--seed", "-1", "an integer in [0, 18446744073709551615]")],
)
def test_evaluate_sizes_are_checked_when_the_command_line_is_read(tmp_path, capsys, flag, value, allowed):
    """These failed only after the pipeline had loaded, as "range() arg 3 must not be zero", a DataLoader message or
    `num_inference_steps`, naming no flag."""
    with pytest.raises(SystemExit) as exit_info:
        _cli(["evaluate", "cirr", "--dry-run", "--data-root", str(tmp_path), "--output-dir", str(tmp_path / "o"),
              flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}: expected {allowed}, got '{value}'" in capsys.readouterr().err


def test_evaluate_checks_arguments_and_annotation_files_before_the_pipeline_loads(tmp_path, capsys, monkeypatch):
    """A misspelt --split, a --subset for CIRR, a --prompt-template without '{}' and CompoDiff options for a LinCIR
    folder failed only after the pipeline had loaded; --fashioniq-captions for another benchmark was ignored."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from diffusers_cir import LinCIRPipeline, TextualInversionProjection
    from diffusers_cir.retrieval import encoders as retrieval_encoders
    from diffusers_cir.utils import build_offline_clip_tokenizer

    root = _tiny_cirr(tmp_path / "CIRR")
    folder = tmp_path / "lincir"
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                                              num_attention_heads=4, projection_dim=16))
    LinCIRPipeline(phi=TextualInversionProjection(input_dim=16, hidden_dim=32, output_dim=32), text_encoder=text_encoder,
                   tokenizer=build_offline_clip_tokenizer()).save_pretrained(folder)

    def no_loading(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the arguments were checked")

    monkeypatch.setattr(retrieval_encoders, "load_pipeline", no_loading)
    command = ["evaluate", "cirr", "--pipeline", str(folder), "--data-root", str(root), "--output-dir",
               str(tmp_path / "out"), "--no-progress"]
    for extra, message in [
        (["--split", "vall"], "CIRR has splits ('train', 'val', 'test1'), got 'vall'"),
        (["--subset", "dress"], "cirr has no subsets"),
        (["--prompt-template", "a photo of $"], "`prompt_template` must contain '{}'"),
        (["--num-inference-steps", "3"], f"--num-inference-steps: LinCIRPipeline ({folder}) does not take this option"),
        (["--guidance-scale", "2", "--negative-prompt", "x"],
         f"--negative-prompt, --guidance-scale: LinCIRPipeline ({folder}) does not take these options"),
        (["--fashioniq-captions", "searle"], "--fashioniq-captions applies to FashionIQ only"),
        (["--gallery-ids", str(tmp_path / "ids.txt")], "--gallery-ids applies to CIRCO only"),
        (["--image-root", str(tmp_path)], "--image-root applies to GeneCIS only"),
    ]:
        assert _cli(command + extra) == 2
        assert f"diffusers-cir evaluate: error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_run_evaluation_builds_an_encoder_factory_after_its_checks_and_refuses_bad_batch_sizes(tmp_path):
    from diffusers_cir.evaluation import run_evaluation

    root = _tiny_cirr(tmp_path / "CIRR")

    def no_encoder():
        raise AssertionError("the encoder was built before the split was checked")

    with pytest.raises(ValueError, match="got 'vall'"):
        run_evaluation(no_encoder, "cirr", root, "vall", output_dir=tmp_path / "out")
    for name, value, expected in [("query_batch_size", 0, "an integer >= 1, got 0"),
                                  ("image_batch_size", 0, "an integer >= 1, got 0"),
                                  ("num_workers", -1, "an integer >= 0, got -1"),
                                  ("cache_part_size", True, "an integer >= 1, got True"),
                                  ("seed", -1, r"an integer in \[0, ")]:
        with pytest.raises(ValueError, match=f"`{name}` must be {expected}"):
            run_evaluation(no_encoder, "cirr", root, "val", output_dir=tmp_path / "out", **{name: value})
    built = []
    encoder = IdHashEncoder()
    result = run_evaluation(lambda: built.append(1) or encoder, "cirr", root, "val", output_dir=tmp_path / "out",
                            progress=False)
    assert built == [1] and result.report["encoder"] == encoder.fingerprint
