"""The CompoDiff trainer's --recipe presets (the paper's values per stage), --print-config, and condition dropout."""

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

from diffusers_cir.training import ConditionDropout, parse_args
from diffusers_cir.training.compodiff_arguments import resolve_args
from diffusers_cir.training.recipes import PAPER_RECIPES
from diffusers_cir.training.train_compodiff import resolve_batch_size

# The CompoDiff paper (arXiv 2303.11916), appendix hyperparameter table (Stage1 / Stage2 / Fine-tuning), the stage-2
# multi-task mix of its "Training" section and the condition dropout of its "Inference" section.
PAPER = {
    "paper_stage1": {"stage": "text_to_image", "total_batch_size": 4096, "max_train_steps": 1_000_000,
                     "learning_rate": 1e-4},
    "paper_stage2": {"stage": "triplet", "total_batch_size": 2048, "max_train_steps": 200_000, "learning_rate": 1e-5,
                     "objective_ratios": "triplet=0.4,text_to_image=0.3,masked=0.3", "masked_objective_masks": "data",
                     "redraw_keyword_instructions": True, "keyword_swap_prob": 0.5},
    "paper_finetune": {"stage": "triplet", "total_batch_size": 2048, "max_train_steps": 50_000, "learning_rate": 1e-5,
                       "objective_ratios": "triplet=1"},
}
EVERY_STAGE = {"adam_weight_decay": 6e-2, "transformer_dropout": 0.1, "use_ema": True, "ema_decay": 0.9999,
               "adam_beta1": 0.9, "adam_beta2": 0.999, "condition_dropout": "independent", "text_drop_prob": 0.1,
               "image_drop_prob": 0.1, "both_drop_prob": 0.0, "validation_inference_steps": 10,
               "validation_guidance_scale": 7.5, "validation_image_guidance_scale": 1.5}
DATA = ["--train-data-dir", "data"]


def print_config(capsys, *argv) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(list(argv) + ["--print-config"])
    assert exit_info.value.code == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_each_recipe_sets_the_papers_values(name, capsys):
    report = print_config(capsys, "--recipe", name)
    expected = {**EVERY_STAGE, **PAPER[name]}
    assert {key: report["config"][key] for key in expected} == expected
    assert {report["sources"][key] for key in expected} == {name}
    assert report["recipe"] == name and report["description"] == PAPER_RECIPES[name].description
    # a new model gets the paper's shape and CLIP ViT-L/14 text; the per-device batch follows from the total
    assert report["config"]["transformer_config"] == {"num_layers": 12, "num_attention_heads": 16,
                                                      "attention_head_dim": 64}
    assert report["config"]["text_encoder_name_or_path"] == "openai/clip-vit-large-patch14"
    assert report["config"]["train_batch_size"] is None


def test_paper_stage2_print_config_from_the_example_script(capsys):
    report = print_config(capsys, "--recipe", "paper-stage2")  # the kebab spelling of the value works too
    assert report["config"]["objective_ratios"] == "triplet=0.4,text_to_image=0.3,masked=0.3"
    assert report["config"]["learning_rate"] == 1e-5 and report["config"]["total_batch_size"] == 2048
    assert any("LAION" in note for note in report["notes"])


def test_without_a_recipe_the_scripts_own_defaults_stay(capsys):
    report = print_config(capsys, *DATA)
    config = report["config"]
    assert report["recipe"] is None and set(report["sources"].values()) <= {"default", "command line"}
    assert (config["learning_rate"], config["train_batch_size"], config["max_train_steps"]) == (1e-4, 256, 10000)
    assert (config["condition_dropout"], config["both_drop_prob"], config["use_ema"]) == ("disjoint", 0.1, False)
    assert config["objective_ratios"] == "triplet=0.7,text_to_image=0.3,masked=0"
    assert config["adam_weight_decay"] == 0.0 and config["transformer_dropout"] is None


def test_explicit_flags_win_over_the_recipe_even_when_equal_to_the_default(capsys):
    report = print_config(capsys, "--recipe", "paper_stage2", "--learning-rate", "1e-4", "--no-use-ema",
                          "--objective_ratios", "triplet=1", "--train-batch-size", "64")
    config, sources = report["config"], report["sources"]
    assert (config["learning_rate"], sources["learning_rate"]) == (1e-4, "command line")  # 1e-4 is also the default
    assert (config["use_ema"], config["objective_ratios"]) == (False, "triplet=1")
    # a per-device batch given replaces the recipe's total
    assert config["train_batch_size"] == 64 and config["total_batch_size"] is None
    assert sources["total_batch_size"].startswith("dropped")
    assert config["adam_weight_decay"] == 6e-2 and sources["adam_weight_decay"] == "paper_stage2"


def test_recipe_model_values_yield_to_a_pretrained_model(capsys):
    report = print_config(capsys, "--recipe", "paper_stage2", "--pretrained-model-name-or-path", "stage1")
    assert report["config"]["transformer_config"] is None and report["config"]["text_encoder_name_or_path"] is None
    images = print_config(capsys, "--recipe", "paper_stage1", "--dataset-config-name", "images")
    assert images["config"]["image_encoder_name_or_path"] == "openai/clip-vit-large-patch14"


def test_recipe_runs_through_the_checks(tmp_path):
    args = parse_args(["--recipe", "paper_finetune", *DATA, "--pretrained-model-name-or-path", "stage2",
                       "--output-dir", str(tmp_path / "out")])
    assert args.max_train_steps == 50_000 and args.use_ema and args.condition_dropout == "independent"


@pytest.mark.parametrize("extra, message", [
    (["--recipe", "paper_stage3"], r"argument --recipe: expected one of \['paper_finetune', 'paper_stage1', "
                                   r"'paper_stage2'\], got 'paper_stage3'"),
    (["--condition-dropout", "independent", "--both-drop-prob", "0.1"], "--both-drop-prob is for --condition-dropout "
                                                                        "disjoint"),
    (["--total-batch-size", "64", "--train-batch-size", "8"], "Pass one of --train-batch-size"),
    (["--keyword-swap-prob", "0.5"], "--keyword-swap-prob needs --redraw-keyword-instructions"),
])
def test_bad_recipe_and_dropout_flags_are_one_error_line(extra, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(DATA + ["--transformer-config", "{}", "--text-encoder-name-or-path", "te",
                           "--tokenizer-name-or-path", "tok"] + extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err


def test_independent_dropout_without_both_drops_both_only_through_the_product(capsys):
    _, args, sources = resolve_args(DATA + ["--condition-dropout", "independent"])
    assert args.both_drop_prob == 0.0 and "independent" in sources["both_drop_prob"]


def test_total_batch_size_is_split_over_processes_and_accumulation():
    args = SimpleNamespace(total_batch_size=2048, gradient_accumulation_steps=2, train_batch_size=None)
    resolve_batch_size(args, SimpleNamespace(num_processes=4))
    assert args.train_batch_size == 256
    args = SimpleNamespace(total_batch_size=100, gradient_accumulation_steps=1, train_batch_size=None)
    with pytest.raises(ValueError, match="--total-batch-size 100 does not divide into 3 processes"):
        resolve_batch_size(args, SimpleNamespace(num_processes=3))


def test_help_says_the_defaults_are_not_the_papers(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "They are not the paper's" in text and "--recipe paper_stage1 | paper_stage2 | paper_finetune" in text


# ------------------------------------------------------------------------------------------ condition dropout
def assert_binomial(frequency: float, probability: float, draws: int, sigmas: float = 5.0) -> None:
    """``frequency`` of ``draws`` Bernoulli(``probability``) trials lies within ``sigmas`` standard errors."""
    tolerance = sigmas * math.sqrt(probability * (1 - probability) / draws)
    assert abs(frequency - probability) <= tolerance, (frequency, probability, tolerance)


@pytest.mark.parametrize("text, image", [(0.1, 0.1), (0.3, 0.05)])
def test_independent_dropout_drops_each_condition_with_its_probability(text, image):
    draws = 400_000
    drop_text, drop_image = ConditionDropout(text, image, 0.0, independent=True).sample(
        draws, generator=torch.Generator().manual_seed(0))
    assert_binomial(drop_text.float().mean().item(), text, draws)
    assert_binomial(drop_image.float().mean().item(), image, draws)
    # independent: both together with the product (the paper's 10% each: 1% unconditional rows)
    assert_binomial((drop_text & drop_image).float().mean().item(), text * image, draws)
    # and the image is dropped as often among rows whose text was dropped as among the others
    kept_text = int((~drop_text).sum())
    assert_binomial(drop_image[drop_text].float().mean().item(), image, int(drop_text.sum()))
    assert_binomial(drop_image[~drop_text].float().mean().item(), image, kept_text)


def test_disjoint_dropout_frequencies_match_its_probabilities():
    draws = 400_000
    dropout = ConditionDropout(text=0.1, image=0.1, both=0.1)
    drop_text, drop_image = dropout.sample(draws, generator=torch.Generator().manual_seed(1))
    outcomes = {"text_only": drop_text & ~drop_image, "image_only": drop_image & ~drop_text,
                "both": drop_text & drop_image, "neither": ~drop_text & ~drop_image}
    for name, rows in outcomes.items():
        assert_binomial(rows.float().mean().item(), dropout.probabilities[name], draws)
    assert_binomial(drop_text.float().mean().item(), 0.2, draws)  # each condition dropped in 20% of the rows


def test_independent_dropout_probabilities_and_checks():
    assert ConditionDropout(0.1, 0.1, 0.0, independent=True).probabilities == pytest.approx(
        {"text_only": 0.09, "image_only": 0.09, "both": 0.01, "neither": 0.81})
    with pytest.raises(ValueError, match="ConditionDropout.both must be 0 with independent=True"):
        ConditionDropout(0.1, 0.1, 0.1, independent=True)
    ConditionDropout(0.7, 0.7, 0.0, independent=True)  # the disjoint sum limit does not apply
