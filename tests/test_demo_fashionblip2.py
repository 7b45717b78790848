"""`diffusers-cir demo --methods ...,fashionblip2`: the small BLIP-2 the package ships for the picture world (BLIP-2's
first stage, ITC + ITM, on the world's pictures and captions) and FashionBLIP-2 fine-tuned on it now by the real
trainer (its Recall@K against the baselines: tests/test_demo_fusion.py)."""

import functools

import numpy as np
import pytest
import torch

from diffusers_cir.cli import main
from diffusers_cir.demo import build_picture_world
from diffusers_cir.demo.blip2 import SHIPPED_BLIP2, Blip2Recipe, caption_retrieval, pretrained_blip2

pytestmark = pytest.mark.usefixtures("single_thread")


def world_captions(world, tokenizer, processor):
    from diffusers_cir.demo.encoders import normalize_pixels

    pictures = torch.stack([torch.from_numpy(np.array(world.picture(i))) for i in range(world.num_items)])
    tokens = tokenizer(world.captions, padding="longest", return_tensors="pt")
    return normalize_pixels(pictures, processor), tokens.input_ids, tokens.attention_mask


def test_blip2_first_stage_learns_the_captions_and_saves_a_checkpoint(tmp_path):
    """On the tiny world, 250 steps lift caption retrieval well above the untrained model's, and the saved folder
    is a plain BLIP-2 checkpoint that scores the same."""
    from transformers import AutoTokenizer, Blip2ForImageTextRetrieval, BlipImageProcessor

    from diffusers_cir.demo.blip2 import build_blip2, pretrain_blip2, save_blip2

    world = build_picture_world("tiny")
    recipe = Blip2Recipe(steps=250, batch_size=72, variants=2, warmup_steps=10)
    untrained, tokenizer, processor = build_blip2(recipe, world.config.image_size)
    before = caption_retrieval(untrained.eval(), *world_captions(world, tokenizer, processor))
    model, tokenizer, processor, summary = pretrain_blip2(world, recipe, progress=False, log=lambda *_: None)
    print(f"tiny world caption retrieval: {before} -> {summary}")
    for key in ("image_to_text_r1", "text_to_image_r1"):
        assert summary[key] >= before[key] + 0.15, (before, summary)  # chance: 1/72

    save_blip2(tmp_path / "blip2", model, tokenizer, processor, recipe, summary)
    loaded = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "blip2").eval()
    again = caption_retrieval(loaded, *world_captions(world, AutoTokenizer.from_pretrained(tmp_path / "blip2"),
                                                      BlipImageProcessor.from_pretrained(tmp_path / "blip2")))
    assert again == {key: summary[key] for key in again}
    assert pretrained_blip2(tmp_path / "blip2") == {"recipe": recipe.to_dict(), "summary": summary}


def test_the_shipped_blip2_scores_what_its_file_records():
    """The shipped weights reproduce the caption retrieval measured when they were trained, over the whole default
    world, and the file names the command that made them and what FashionBLIP-2 measured on them."""
    from transformers import AutoTokenizer, Blip2ForImageTextRetrieval, BlipImageProcessor

    info = pretrained_blip2(SHIPPED_BLIP2)
    assert info["made_with"].startswith("diffusers-cir demo --methods fashionblip2 --train-blip2 "
                                        "--update-shipped-pipeline")
    model = Blip2ForImageTextRetrieval.from_pretrained(SHIPPED_BLIP2).eval()
    scores = caption_retrieval(model, *world_captions(build_picture_world("default"),
                                                      AutoTokenizer.from_pretrained(SHIPPED_BLIP2),
                                                      BlipImageProcessor.from_pretrained(SHIPPED_BLIP2)))
    assert scores == {key: info["summary"][key] for key in scores}
    assert scores["image_to_text_r1"] > 0.9, scores
    recalls = info["fashionblip2_demo"]["recalls"]
    assert recalls["fashionblip2"]["recall_at1"] > max(recalls[name]["recall_at1"] for name in recalls
                                                      if name != "fashionblip2")


def test_train_blip2_pretrains_now_and_updates_the_shipped_blip2(tmp_path, monkeypatch, capsys):
    """--train-blip2 --update-shipped-pipeline: the BLIP-2 is pretrained now, FashionBLIP-2 fine-tunes that one, and
    the folder is shipped with the command that made it and what the run measured (a few steps here: the wiring)."""
    import diffusers_cir.demo.blip2
    import diffusers_cir.demo.fashionblip2 as demo_fashionblip2

    target = tmp_path / "shipped"
    monkeypatch.setattr(diffusers_cir.demo.blip2, "SHIPPED_BLIP2", target)
    monkeypatch.setattr(demo_fashionblip2, "FashionBLIP2Recipe",
                        functools.partial(demo_fashionblip2.FashionBLIP2Recipe, max_train_steps=2, train_triplets=64,
                                          variants=1, train_batch_size=8))
    assert main(["demo", "--world", "tiny", "--methods", "fashionblip2,image_only", "--train-blip2", "--blip2-steps",
                 "3", "--num-queries", "20", "--no-html", "--examples", "0", "--output-dir", str(tmp_path / "run"),
                 "--update-shipped-pipeline"]) == 0
    assert "Shipped BLIP-2 updated" in capsys.readouterr().out
    info = pretrained_blip2(target)
    assert info["recipe"]["steps"] == 3
    assert info["made_with"] == "diffusers-cir demo --methods fashionblip2 --train-blip2 --update-shipped-pipeline " \
                                "--blip2-steps 3"
    assert info["fashionblip2_demo"]["command"] == "diffusers-cir demo --methods fashionblip2,image_only --world tiny " \
                                                   "--num-queries 20"
    assert set(info["fashionblip2_demo"]["recalls"]) == {"fashionblip2", "image_only"}
    shipped = {path.name for path in target.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "blip2_pretraining.json"} <= shipped
    # The run fine-tuned the BLIP-2 it pretrained, not the package's.
    card = (tmp_path / "run" / "methods" / "fashionblip2" / "README.md").read_text()
    assert f"Made from: `{tmp_path / 'run' / 'methods' / 'blip2'}`" in card

    # The same --output-dir with another recipe pretrains again rather than reusing the 3-step BLIP-2.
    assert main(["demo", "--world", "tiny", "--methods", "fashionblip2", "--train-blip2", "--blip2-steps", "4",
                 "--num-queries", "20", "--no-html", "--examples", "0", "--output-dir", str(tmp_path / "run")]) == 0
    assert pretrained_blip2(tmp_path / "run" / "methods" / "blip2")["recipe"]["steps"] == 4
