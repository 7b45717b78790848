"""``diffusers-cir demo``: the offline end-to-end run on the picture world's pixels, the shipped pipeline, the page."""

import configparser
import fnmatch
import json
import re
import shutil
from pathlib import Path

import pytest

from diffusers_cir.cli import main
from diffusers_cir.demo import SHIPPED_PIPELINE, demo_settings

REPO = Path(__file__).resolve().parents[1]


def test_shipped_pipeline_is_small_has_a_card_and_ships_in_the_package():
    files = [path for path in SHIPPED_PIPELINE.rglob("*") if path.is_file()]
    assert files, f"no demo pipeline shipped in {SHIPPED_PIPELINE}"
    assert sum(path.stat().st_size for path in files) < 4 * 1024 * 1024
    card = (SHIPPED_PIPELINE / "README.md").read_text()
    assert "library_name: diffusers-cir" in card and "model-index" in card and "diffusers-cir demo --train" in card
    # No folder of the machine that trained it (its temporary folders, the checkout) is named in the card or configs.
    for text in [card, *(path.read_text() for path in files if path.suffix == ".json")]:
        assert not re.findall(r"(?m)(?:^|[\s\"'`(])/[\w.-]+/", text)
    settings = demo_settings()
    assert settings["command"].startswith("diffusers-cir demo --train --update-shipped-pipeline")
    assert set(settings["call_kwargs"]) == {"num_inference_steps", "guidance_scale", "image_guidance_scale"}
    assert_ships_in_the_package(files)


def test_shipped_blip2_is_small_names_no_local_folder_and_ships_in_the_package():
    """The small BLIP-2 `demo --methods fashionblip2` fine-tunes (its measurements: tests/test_demo_fashionblip2.py)."""
    from diffusers_cir.demo.blip2 import SHIPPED_BLIP2

    files = [path for path in SHIPPED_BLIP2.rglob("*") if path.is_file()]
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "blip2_pretraining.json"} <= {
        path.name for path in files}
    assert sum(path.stat().st_size for path in files) < 4 * 1024 * 1024
    for text in (path.read_text() for path in files if path.suffix in (".json", ".txt")):
        assert not re.findall(r"(?m)(?:^|[\s\"'`(])/[\w.-]+/", text)
    assert_ships_in_the_package(files)


def assert_ships_in_the_package(files) -> None:
    """Every shipped file matches a package_data pattern, so a wheel carries the demo."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    patterns = [line.strip() for line in config["options.package_data"]["diffusers_cir"].splitlines() if line.strip()]
    package = REPO / "src" / "diffusers_cir"
    for path in files:
        relative = path.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) and relative.count("/") == pattern.count("/")
                   for pattern in patterns), relative


def test_the_shipped_card_is_what_write_shipped_card_makes_of_demo_json(tmp_path):
    """The card is reproducible from the weights and demo.json, and states what demo.json measured."""
    from diffusers_cir.demo.training import write_shipped_card

    folder = tmp_path / "picture_world"
    shutil.copytree(SHIPPED_PIPELINE, folder)
    (folder / "README.md").unlink()
    write_shipped_card(folder)
    assert (folder / "README.md").read_text() == (SHIPPED_PIPELINE / "README.md").read_text()
    measured = demo_settings()["measured"]["recalls"]["compodiff"]
    assert f"recall_at1: {round(measured['recall_at1'], 4)}" in (folder / "README.md").read_text()


@pytest.mark.slow
def test_demo_on_pixels_beats_the_baselines_and_writes_the_page(tmp_path, capsys):
    """The default world (1,728 pictures) end to end: the held-out test compositions, CompoDiff against the CLIP
    baselines, and the page with the examples."""
    report, page = tmp_path / "demo.json", tmp_path / "page" / "demo.html"
    assert main(["demo", "--quick", "--json", str(report), "--html", str(page)]) == 0
    printed = capsys.readouterr().out
    for name in ("compodiff", "image_only", "text_only", "image_text_sum", "Example 1", f"Wrote {page}"):
        assert name in printed
    result = json.loads(report.read_text())
    assert result["num_queries"] == 200 and result["gallery_size"] == 1728
    compodiff = result["recalls"]["compodiff"]
    best_baseline = max(values["recall_at1"] for name, values in result["recalls"].items() if name != "compodiff")
    assert compodiff["recall_at1"] >= best_baseline + 0.15, result["recalls"]
    assert compodiff["recall_at10"] >= compodiff["recall_at1"]
    html = page.read_text()
    assert html.count('<section class="query">') == 6 and "<svg" in html and "data:image/png;base64," in html
    assert html.count('class="hit"') >= 1


def test_demo_tiny_runs_in_seconds_without_a_page(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--world", "tiny", "--num-queries", "30", "--no-html", "--examples", "2",
                 "--methods", "compodiff,image_only", "--json", "out.json"]) == 0
    result = json.loads((tmp_path / "out.json").read_text())
    assert set(result["recalls"]) == {"compodiff", "image_only"} and result["gallery_size"] == 72
    assert result["page"] is None and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    assert "trained on the default world" in result["source"]


def test_a_registered_method_plugs_in(tmp_path, monkeypatch):
    """A method is a factory in the registry: this one answers with the target's own gallery embedding."""
    import torch

    from diffusers_cir.demo import methods, run_demo

    def oracle(context):
        world, pipeline = context.world, context.pipeline
        seen["work_dir"] = context.work_dir
        assert context.work_dir.is_dir()

        class Oracle(methods.DemoMethod):
            name, gallery_encoder = "oracle", pipeline

            def compose(self, references, texts):
                test = world.triplets("test")
                by_query = {(world.gallery_ids[r], t): g for r, t, g in
                            zip(test.reference_indices, test.modification_texts, test.target_indices)}
                targets = [by_query[(Path(ref).stem, text)] for ref, text in zip(references, texts)]
                pictures = [world.picture(int(i)) for i in targets]
                return torch.nn.functional.normalize(pipeline.encode_image(pictures).float(), dim=-1)

        return Oracle()

    seen = {}
    monkeypatch.setitem(methods.DEMO_METHODS, "oracle", methods._Registered(oracle, "knows the answer"))
    result = run_demo("tiny", methods=["oracle", "image_only"], num_queries=20, show_progress=False, log=lambda *a: None,
                      html=tmp_path / "p.html", work_dir=tmp_path / "run")
    assert seen["work_dir"] == tmp_path / "run" / "methods"  # a folder of the run for what a method writes
    assert result.recalls["oracle"]["recall_at1"] == 1.0 and result.recalls["image_only"]["recall_at1"] < 1.0
    assert "knows the answer" in (tmp_path / "p.html").read_text()


@pytest.mark.slow
def test_demo_trains_with_the_real_training_code_and_updates_the_shipped_pipeline(tmp_path, monkeypatch, capsys):
    """--train goes through the CLIP training and the training script's loop, then ships (a few steps here: the
    wiring; the quality is test_demo_on_pixels_beats_the_baselines_and_writes_the_page's)."""
    import diffusers_cir.demo

    target = tmp_path / "shipped"
    monkeypatch.setattr(diffusers_cir.demo, "SHIPPED_PIPELINE", target)
    assert main(["demo", "--train", "--world", "tiny", "--steps", "4", "--clip-steps", "4", "--train-triplets", "300",
                 "--num-queries", "20", "--output-dir", str(tmp_path / "run"), "--no-html",
                 "--update-shipped-pipeline"]) == 0
    assert (tmp_path / "run" / "training" / "compodiff" / "validation_log.jsonl").is_file()
    assert (target / "model_index.json").is_file() and (target / "image_encoder" / "config.json").is_file()
    assert "_name_or_path" not in json.loads((target / "model_index.json").read_text())
    settings = json.loads((target / "demo.json").read_text())
    assert settings["recipe"]["steps"] == 4 and settings["world"] == "tiny"
    card = (target / "README.md").read_text()
    assert "diffusers-cir demo --train --update-shipped-pipeline --world tiny --steps 4 --clip-steps 4" in card
    assert "recall_at1" in card and "license: apache-2.0" in card
    assert "Shipped pipeline updated" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "5"], r"--steps needs --train \(without it the demo loads a trained pipeline"),
        (["--train-triplets", "100", "--output-dir", "run"], r"--train-triplets, --output-dir need --train"),
        (["--train", "--pipeline", "somewhere"], r"--pipeline loads a trained demo pipeline, --train trains a new"),
        (["--update-shipped-pipeline"], r"--update-shipped-pipeline needs --train or --train-blip2"),
        (["--train-blip2"], r"--train-blip2 pretrains the BLIP-2 that fashionblip2 fine-tunes: add fashionblip2"),
        (["--methods", "fashionblip2", "--blip2-steps", "5"], r"--blip2-steps needs --train-blip2"),
        (["--quick", "--num-queries", "5"], r"each set the number of queries"),
        (["--html", "x.html", "--no-html"], r"--html and --no-html contradict each other"),
        (["--methods", "compodiff,magic"], r"--methods: unknown method\(s\) 'magic'; registered: compodiff"),
    ],
)
def test_demo_refuses_options_it_would_ignore_or_cannot_run(monkeypatch, capsys, argv, message):
    import re

    import diffusers_cir.demo

    def no_demo(**kwargs):
        raise AssertionError("the demo ran")

    monkeypatch.setattr(diffusers_cir.demo, "run_demo", no_demo)
    assert main(["demo", *argv]) == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("flag", ["--examples", "--seed", "--num-queries"])
def test_demo_negative_counts_are_refused_when_the_command_line_is_read(capsys, flag):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", flag, "-1"])
    assert exit_info.value.code == 2
    assert f"argument {flag}: expected" in capsys.readouterr().err
