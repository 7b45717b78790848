"""Unit tests of the CompoDiff training parts: condition dropout, objectives, text encoding, loss, masks, data mixing,
validation sets, checkpoint bookkeeping and argument checks."""

import argparse
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusers_cir import CompoDiffPipeline, CompoDiffScheduler, CompoDiffTransformer
from diffusers_cir.training import (
    CachedTextEncoder,
    ConditionDropout,
    ObjectiveRatios,
    RetrievalSet,
    compodiff_loss,
    encode_text_hidden_states,
    list_checkpoints,
    parse_args,
    random_box_masks,
    recall_of_queries,
    text_attention_mask,
)
from diffusers_cir.training.checkpoints import prune_checkpoints, resolve_resume_checkpoint
from diffusers_cir.training.data import merge_batches
from diffusers_cir.utils import build_offline_clip_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_offline_clip_tokenizer()


@pytest.fixture(scope="module")
def text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, eos_token_id=49407, pad_token_id=49407, bos_token_id=49406,
    )
    return CLIPTextModel(config).eval()


def tiny_transformer(**overrides):
    torch.manual_seed(0)
    config = dict(embedding_dim=16, text_embedding_dim=32, num_layers=1, num_attention_heads=2, attention_head_dim=8,
                  num_cross_attention_heads=2)
    config.update(overrides)
    return CompoDiffTransformer(**config)


# ------------------------------------------------------------------------------------------ condition dropout
def test_condition_dropout_frequencies_match_probabilities():
    draws = 200_000
    dropout = ConditionDropout(text=0.2, image=0.1, both=0.05)
    drop_text, drop_image = dropout.sample(draws, generator=torch.Generator().manual_seed(0))
    observed = {"text_only": drop_text & ~drop_image, "image_only": drop_image & ~drop_text, "both": drop_text & drop_image}
    for name, probability in (("text_only", 0.2), ("image_only", 0.1), ("both", 0.05)):
        tolerance = 5 * (probability * (1 - probability) / draws) ** 0.5  # five binomial standard errors
        assert abs(observed[name].float().mean().item() - probability) <= tolerance, name


def test_condition_dropout_uses_the_empty_prompt_encoding_and_zero_images():
    dropout = ConditionDropout(text=0.3, image=0.3, both=0.3)
    image = torch.randn(64, 8)
    text = torch.randn(64, 5, 4)
    null = torch.randn(1, 5, 4)
    image_in, text_in = image.clone(), text.clone()
    new_image, new_text, drop_text, drop_image = dropout.apply(image, text, null, generator=torch.Generator().manual_seed(1))
    assert torch.equal(image, image_in) and torch.equal(text, text_in)  # inputs untouched
    assert drop_text.any() and drop_image.any() and (~drop_text & ~drop_image).any()
    assert torch.equal(new_text[drop_text], null.expand(int(drop_text.sum()), -1, -1))
    assert torch.equal(new_text[~drop_text], text[~drop_text])
    assert torch.count_nonzero(new_image[drop_image]) == 0
    assert torch.equal(new_image[~drop_image], image[~drop_image])


@pytest.mark.parametrize("kwargs", [dict(text=1.2), dict(image=-0.1), dict(text=0.5, image=0.4, both=0.2)])
def test_condition_dropout_rejects_bad_probabilities(kwargs):
    with pytest.raises(ValueError, match="ConditionDropout"):
        ConditionDropout(**kwargs)


def test_condition_dropout_rejects_a_null_text_of_the_wrong_shape():
    with pytest.raises(ValueError, match="null_text_hidden_states"):
        ConditionDropout().apply(torch.zeros(2, 4), torch.zeros(2, 5, 3), torch.zeros(1, 6, 3))


# ------------------------------------------------------------------------------------------ objective ratios
def test_objective_ratios_parse_and_derive_probabilities():
    ratios = ObjectiveRatios.parse("triplet=0.5, text_to_image=0.3,masked=0.2")
    assert ratios.probabilities == pytest.approx({"triplet": 0.5, "text_to_image": 0.3, "masked": 0.2})
    assert ratios.caption_row_probability == pytest.approx(0.5)
    assert ratios.masked_share_of_caption_rows == pytest.approx(0.4)
    assert ObjectiveRatios.parse("triplet=3,text_to_image=1").probabilities["text_to_image"] == pytest.approx(0.25)
    assert ObjectiveRatios.parse("triplet=1").caption_row_probability == 0.0


@pytest.mark.parametrize("text", ["triplet=0.5,foo=1", "triplet", "triplet=x", "triplet=1,triplet=2", "triplet=0"])
def test_objective_ratios_reject_malformed_text(text):
    with pytest.raises(ValueError):
        ObjectiveRatios.parse(text)


# ------------------------------------------------------------------------------------------ text encoding
@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_attention_mask_recovered_from_ids_matches_the_tokenizer(pad_token):
    tokenizer = build_offline_clip_tokenizer(pad_token=pad_token)
    texts = ["make it red", "", "a watercolor of a blue wooden cup and " * 20]  # the last one is truncated
    tokens = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    recovered = text_attention_mask(tokens.input_ids, tokenizer.eos_token_id)
    assert torch.equal(recovered, tokens.attention_mask.long())


def test_training_text_encoding_equals_the_pipeline_prompt_encoding(tokenizer, text_encoder):
    pipe = CompoDiffPipeline(tiny_transformer(), CompoDiffScheduler(), text_encoder=text_encoder, tokenizer=tokenizer)
    texts = ["make it red", "turn it into a sketch", ""]
    ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    training = encode_text_hidden_states(text_encoder, ids, eos_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        inference, _ = pipe.encode_prompt(texts)
    torch.testing.assert_close(training, inference, rtol=0, atol=1e-6)
    # Without the padding mask the padded positions differ: the mask matters.
    with torch.no_grad():
        unmasked = text_encoder(input_ids=ids).last_hidden_state
    assert (unmasked - inference).abs().max() > 1e-3


def test_cached_text_encoder_matches_uncached_and_bounds_its_size(tokenizer, text_encoder):
    texts = ["make it red", "make it blue", "make it red", "paint it green", "make it blue"]
    ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    plain = encode_text_hidden_states(text_encoder, ids, eos_token_id=tokenizer.eos_token_id)
    cache = CachedTextEncoder(text_encoder, tokenizer.eos_token_id, max_entries=2)
    torch.testing.assert_close(cache(ids), plain, rtol=0, atol=1e-5)
    assert cache.misses == 3 and cache.hits == 2
    assert len(cache._cache) == 2
    torch.testing.assert_close(cache(ids[:1]), plain[:1], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ loss
def test_compodiff_loss_is_the_x0_mse_of_the_scheduler_noised_target():
    model = tiny_transformer()
    scheduler = CompoDiffScheduler()
    target = torch.randn(4, 16)
    image = torch.randn(4, 16)
    text = torch.randn(4, 77, 32)
    timesteps = torch.tensor([0, 10, 500, 999])
    noise = torch.randn(4, 16)
    loss = compodiff_loss(model, scheduler, target, image, text, timesteps=timesteps, noise=noise)
    noisy = scheduler.add_noise(target, noise, timesteps)
    prediction = model(noisy, timesteps, image_embeds=image, text_hidden_states=text).predicted_image_embedding
    torch.testing.assert_close(loss, F.mse_loss(prediction, target))
    loss.backward()
    assert model.proj_out.weight.grad is not None and model.proj_out.weight.grad.abs().sum() > 0


def test_compodiff_loss_draws_reproducibly_from_its_generator():
    model = tiny_transformer()
    args = (model, CompoDiffScheduler(), torch.randn(8, 16), torch.randn(8, 16), torch.randn(8, 77, 32))
    first = compodiff_loss(*args, generator=torch.Generator().manual_seed(3))
    second = compodiff_loss(*args, generator=torch.Generator().manual_seed(3))
    third = compodiff_loss(*args, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, second) and not torch.equal(first, third)


# ------------------------------------------------------------------------------------------ masks
def test_random_box_masks_are_single_boxes_within_bounds():
    masks = random_box_masks(500, size=64, min_fraction=0.1, max_fraction=0.5, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (500, 64, 64) and set(masks.unique().tolist()) == {0.0, 1.0}
    rows, columns = masks.amax(dim=2), masks.amax(dim=1)
    heights, widths = rows.sum(1), columns.sum(1)
    assert heights.min() >= 6 and heights.max() <= 32 and widths.min() >= 6 and widths.max() <= 32
    torch.testing.assert_close(masks.sum((1, 2)), heights * widths)  # a full rectangle
    with pytest.raises(ValueError, match="min_fraction"):
        random_box_masks(1, min_fraction=0.6, max_fraction=0.5)


# ------------------------------------------------------------------------------------------ data mixing
def test_merge_batches_concatenates_rows_and_fills_a_missing_mask_with_zeros():
    first = {"ids": ["a", "b"], "texts": ["x", "y"], "num_skipped": 1, "skipped": [("c", "bad")],
             "input_ids": torch.ones(2, 77, dtype=torch.long), "is_text_to_image": torch.tensor([False, False]),
             "reference_image_embeds": torch.ones(2, 4), "target_image_embeds": torch.ones(2, 4),
             "mask": torch.ones(2, 64, 64)}
    second = {"ids": ["d"], "texts": ["z"], "num_skipped": 0, "skipped": [],
              "input_ids": torch.zeros(1, 77, dtype=torch.long), "is_text_to_image": torch.tensor([True]),
              "reference_image_embeds": torch.zeros(1, 4), "target_image_embeds": torch.full((1, 4), 2.0)}
    merged = merge_batches(first, second)
    assert merged["ids"] == ["a", "b", "d"] and merged["num_skipped"] == 1
    assert merged["is_text_to_image"].tolist() == [False, False, True]
    assert merged["mask"].shape == (3, 64, 64) and merged["mask"][2].sum() == 0 and merged["mask"][:2].sum() > 0
    assert merged["target_image_embeds"][2, 0] == 2.0


# ------------------------------------------------------------------------------------------ validation sets
def test_retrieval_set_from_triplets_builds_a_deduplicated_gallery_and_excludes_references():
    items = F.normalize(torch.randn(5, 8), dim=-1)
    references = items[[0, 1, 2]]
    targets = items[[3, 4, 3]]
    retrieval = RetrievalSet.from_triplets(references, ["p", "q", "r"], targets)
    assert len(retrieval.gallery_ids) == 5
    # Perfect queries (the targets themselves) retrieve their target first.
    assert recall_of_queries(targets, retrieval, ks=(1,))["recall_at1"] == 1.0
    # Querying with the reference finds something else first, since the reference is excluded.
    assert recall_of_queries(references, retrieval, ks=(1,))["recall_at1"] < 1.0
    with pytest.raises(ValueError, match="not in the gallery"):
        RetrievalSet.from_triplets(references, ["p", "q", "r"], targets, gallery_embeds=items[:3])


# ------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_listing_ignores_partial_folders_and_prunes_to_the_limit(tmp_path):
    for name in ("checkpoint-10", "checkpoint-2", "checkpoint-30", "checkpoint-40.partial", "checkpoints", "other"):
        (tmp_path / name).mkdir()
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 10, 30]
    assert resolve_resume_checkpoint(str(tmp_path), "latest").name == "checkpoint-30"
    assert resolve_resume_checkpoint(str(tmp_path), "checkpoint-10").name == "checkpoint-10"
    assert resolve_resume_checkpoint(str(tmp_path / "empty"), "latest") is None
    with pytest.raises(ValueError, match="checkpoint-<step>"):
        resolve_resume_checkpoint(str(tmp_path), "checkpoint-99")
    prune_checkpoints(str(tmp_path), total_limit=2)  # room for one new checkpoint: keep the newest one
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-30", "checkpoints", "other"]


# ------------------------------------------------------------------------------------------ arguments
BASE = ["--train_data_dir", "data", "--transformer_config", "{}", "--text_encoder_name_or_path", "te",
        "--tokenizer_name_or_path", "tok"]


def usage_error(capsys, argv) -> str:
    """The one-line `error:` (exit status 2) a bad command line gets before any work."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ": error: " in err, err
    return err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--pretrained_model_name_or_path", "p"], "exactly one of --pretrained-model-name-or-path .* and --transformer-config"),
        (["--objective_ratios", "triplet=0.5,masked=0.5"], "--dataset-config-name images"),
        (["--use_lora"], "--use-lora fine-tunes a trained prior: pass --pretrained-model-name-or-path"),
        (["--text_drop_prob", "0.6", "--image_drop_prob", "0.6"], (r"--text-drop-prob \+ --image-drop-prob \+ "
                                                                   r"--both-drop-prob must sum to at most 1")),
        (["--embedding_scale", "-2"], ("argument --embedding-scale/--embedding_scale: expected 'auto', 'none' or a "
                                      "positive number, got '-2'")),
        (["--column_mapping", "[1]"], r"argument --column-mapping/--column_mapping: expected a JSON object, got '\[1\]'"),
        (["--validation_recall_ks", "1,x"], ("argument --validation-recall-ks/--validation_recall_ks: expected "
                                            "comma-separated positive integers, got '1,x'")),
        (["--text_to_image_data_dir", "d", "--objective_ratios", "triplet=1"], "strictly between 0 and 1"),
        (["--lr_scheduler", "cosin"], "argument --lr-scheduler/--lr_scheduler: invalid choice: 'cosin'"),
        (["--lr_scheduler", "piecewise_constant"], "invalid choice: 'piecewise_constant'"),  # needs step rules
        (["--lora_dropout", "1"], r"argument --lora-dropout/--lora_dropout: expected a finite number in \[0.0, 1.0\), got '1'"),
        (["--lora_dropout", "-0.1"], r"--lora-dropout/--lora_dropout: expected .* in \[0.0, 1.0\), got '-0.1'"),
        (["--lora_dropout", "nan"], r"--lora-dropout/--lora_dropout: expected .* in \[0.0, 1.0\), got 'nan'"),
        (["--ema_decay", "1.5"], r"--ema-decay/--ema_decay: expected a finite number in \[0.0, 1.0\], got '1.5'"),
        (["--ema_decay", "-0.5"], r"--ema-decay/--ema_decay: expected a finite number in \[0.0, 1.0\], got '-0.5'"),
        (["--dataloader_num_workers", "-1"], ("--dataloader-num-workers/--dataloader_num_workers: expected an integer "
                                             ">= 0, got '-1'")),
        (["--learning_rate=-1e-4"], (r"--learning-rate/--learning_rate: expected a finite number in \(0.0, inf\), "
                                    "got '-1e-4'")),
        (["--adam_beta1", "1"], r"--adam-beta1/--adam_beta1: expected a finite number in \[0.0, 1.0\), got '1'"),
        (["--adam_beta2", "-0.9"], r"--adam-beta2/--adam_beta2: expected a finite number in \[0.0, 1.0\), got '-0.9'"),
        (["--adam_epsilon=-1e-8"], r"--adam-epsilon/--adam_epsilon: expected a finite number in \[0.0, inf\), got '-1e-8'"),
        (["--adam_weight_decay", "-0.01"], r"--adam-weight-decay/--adam_weight_decay: expected .*, got '-0.01'"),
        (["--max_grad_norm", "-1"], r"--max-grad-norm/--max_grad_norm: expected a finite number in \[0.0, inf\), got '-1'"),
        (["--lora_alpha", "0"], r"--lora-alpha/--lora_alpha: expected a finite number in \(0.0, inf\), got '0'"),
        (["--lora_target_modules", r"blocks\.(to_q"], (r"--lora-target-modules/--lora_target_modules: expected a valid "
                                                      r"regular expression, got 'blocks\\\\.\(to_q'")),
        (["--validation_inference_steps", "0"], ("--validation-inference-steps/--validation_inference_steps: expected an "
                                                "integer >= 1, got '0'")),
        (["--train_batch_size", "0"], "--train-batch-size/--train_batch_size: expected an integer >= 1, got '0'"),
        (["--seed", "-1"], r"argument --seed: expected an integer in \[0, 4294967295\], got '-1'"),
        (["--seed", str(2**32)], r"argument --seed: expected an integer in \[0, 4294967295\], got '4294967296'"),
        (["--validation_guidance_scale", "inf"], ("--validation-guidance-scale/--validation_guidance_scale: expected a "
                                                 "finite number, got 'inf'")),
        (["--report_to", "tensorbaord"], (r"argument --report-to/--report_to: expected one of \[.*'none'.*'all'.*"
                                         r"'tensorboard'.*\], got 'tensorbaord'")),
    ],
)
def test_bad_arguments_are_one_error_line_before_any_work(extra, message, capsys):
    err = usage_error(capsys, BASE + extra)
    assert re.search(message, err), err


def test_flags_are_kebab_case_with_their_snake_case_spelling_kept():
    kebab = parse_args(["--train-data-dir", "data", "--transformer-config", "{}", "--text-encoder-name-or-path", "te",
                        "--tokenizer-name-or-path", "tok", "--max-train-steps", "7", "--use-ema", "--lora-rank", "2"])
    snake = parse_args(BASE + ["--max_train_steps", "7", "--use_ema", "--lora_rank", "2"])
    assert vars(kebab) == vars(snake)
    assert kebab.max_train_steps == 7 and kebab.use_ema and kebab.lora_rank == 2 and kebab.transformer_config == {}


def test_range_boundaries_are_accepted():
    args = parse_args(BASE + ["--ema_decay", "0", "--lora_dropout", "0", "--max_grad_norm", "0", "--adam_beta1", "0",
                              "--dataloader_num_workers", "0", "--adam_epsilon", "0", "--report_to", "all"])
    assert args.ema_decay == 0 and args.max_grad_norm == 0
    assert parse_args(BASE + ["--ema_decay", "1", "--lora_dropout", "0.999"]).ema_decay == 1  # 1: no cap on the warm-up
    assert parse_args(BASE + ["--seed", str(2**32 - 1)]).seed == 2**32 - 1


def test_report_to_a_tracker_that_is_not_installed_is_refused(capsys):
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    installed = {LoggerType(tracker).value for tracker in get_available_trackers()}
    missing = [tracker.value for tracker in LoggerType if tracker != LoggerType.ALL and tracker.value not in installed]
    if not missing:
        pytest.skip("every accelerate tracker is installed")
    # accelerate itself only warns and then logs nothing.
    err = usage_error(capsys, BASE + ["--report_to", missing[0]])
    assert f"--report-to/--report_to: '{missing[0]}': the {missing[0]} package is not installed" in err, err


def test_defaults_parse():
    args = parse_args(BASE)
    assert isinstance(args, argparse.Namespace) and args.stage == "triplet" and args.embedding_scale == "auto"
    assert np.isclose(ObjectiveRatios.parse(args.objective_ratios).caption_row_probability, 0.3)


def _main_argv(tmp_path, *extra):
    """Arguments naming data and encoders that do not exist: the run must stop before it touches them."""
    return ["--train_data_dir", str(tmp_path / "no-data"), "--transformer_config", "{}", "--text_encoder_name_or_path",
            str(tmp_path / "te"), "--tokenizer_name_or_path", str(tmp_path / "tok"), "--report_to", "none",
            "--output_dir", str(tmp_path / "run"), *extra]


def _fails_on_the_missing_data(tmp_path, *extra):
    """The run gets past the argument checks and fails only when it opens the data that does not exist."""
    from diffusers_cir.training import main

    with pytest.raises(ValueError, match="--train-data-dir .*no-data.* could not be opened"):
        main(parse_args(_main_argv(tmp_path, *extra)))


def test_new_run_over_an_earlier_runs_checkpoints_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "run" / "checkpoint-6").mkdir(parents=True)
    err = usage_error(capsys, _main_argv(tmp_path))
    assert re.search(r"already holds checkpoints .*checkpoint-6.*--resume-from-checkpoint latest", err), err
    # Continuing it is what the message asks for.
    _fails_on_the_missing_data(tmp_path, "--resume_from_checkpoint", "latest")


def test_unknown_resume_checkpoint_is_refused_before_any_work(tmp_path, capsys):
    err = usage_error(capsys, _main_argv(tmp_path, "--resume_from_checkpoint", "checkpoint-99"))
    assert "--resume-from-checkpoint 'checkpoint-99' is not a checkpoint-<step> folder" in err, err


def test_resuming_from_a_checkpoint_past_max_train_steps_is_refused_before_any_work(tmp_path, capsys):
    for name in ("checkpoint-2", "checkpoint-6"):
        (tmp_path / "run" / name).mkdir(parents=True)
    err = usage_error(capsys, _main_argv(tmp_path, "--resume_from_checkpoint", "latest", "--max_train_steps", "4"))
    assert re.search(r"--resume-from-checkpoint 'latest' is checkpoint-6, at step 6, past --max-train-steps 4: "
                     r".*above 6.* \(checkpoint-2\)", err), err
    err = usage_error(capsys, _main_argv(tmp_path, "--resume_from_checkpoint", "checkpoint-6", "--max_train_steps", "1"))
    assert re.search(r"checkpoint-6, at step 6, past --max-train-steps 1: .*\('.*run' has none\)", err), err
    # A checkpoint at or before the last step gets past the check.
    _fails_on_the_missing_data(tmp_path, "--resume_from_checkpoint", "checkpoint-2", "--max_train_steps", "2")


def test_new_run_over_an_earlier_runs_final_model_or_validation_log_is_refused_before_any_work(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)  # tracker logs alone (e.g. a run that failed early) do not block a new run
    _fails_on_the_missing_data(tmp_path)
    for name in ("validation_log.jsonl", "model_index.json", "pytorch_lora_weights.safetensors"):
        (run / name).write_text("{}")
        for resume in ([], ["--resume_from_checkpoint", "latest"]):  # "latest" finds no checkpoint: a new run
            err = usage_error(capsys, _main_argv(tmp_path, *resume))
            assert re.search(rf"--output-dir .*run' already holds the outputs of an earlier run \(.*{name}.*\) and "
                             rf"there is no checkpoint to resume from", err), err
        (run / name).unlink()
    # Resuming that run is fine: it gets past the check.
    (run / "model_index.json").write_text("{}")
    (run / "checkpoint-2").mkdir()
    _fails_on_the_missing_data(tmp_path, "--resume_from_checkpoint", "latest", "--max_train_steps", "4")
