# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Train CompoDiff with accelerate: stage 1 (text-to-image prior) and stage 2 (composed retrieval), full or LoRA.

This is the training loop of ``examples/train_compodiff.py`` and of ``diffusers-cir demo``; it follows diffusers'
prior training example (``train_text_to_image_prior.py``): accelerate for devices, mixed precision, gradient
accumulation and checkpointing; diffusers' ``EMAModel`` and ``get_scheduler``; PEFT ``LoraConfig`` for LoRA.

What is specific to CompoDiff (see :mod:`diffusers_cir.training.conditioning`): the denoiser predicts x0 of a
CLIP image embedding (MSE); stage 2 mixes the triplet, text-to-image and masked objectives; classifier-free
dropout drops the text to the ``""`` encoding, the image to zeros, or both.

Resuming (``--resume_from_checkpoint latest``) restores the model, EMA, optimizer, LR scheduler, accelerate's RNG
states, this loop's own noise generator and every rank's data position. The training noise comes from a dedicated
generator (saved per rank), not from the global RNG, because creating a data iterator draws from the global RNG and
a resumed run creates its iterator at a different moment than an uninterrupted one.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger("diffusers_cir.training")

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
DEFAULT_LORA_TARGETS = r"blocks\.\d+\.(self_attn|cross_attn)\.(to_q|to_kv|to_out)|blocks\.\d+\.ff\.(proj_in|proj_out)"
VALIDATION_LOG = "validation_log.jsonl"
# diffusers.optimization.get_scheduler names that need no more arguments than this script passes (not
# "piecewise_constant": it needs step rules).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


# Numeric flags checked by check_args against a range: name -> (the range in words, test). The optimizer bounds are
# torch.optim.AdamW's, which it would only enforce after the models are loaded, naming no flag.
NUMBER_RANGES = {
    "learning_rate": ("positive", lambda value: value > 0),
    "adam_beta1": ("in [0, 1)", lambda value: 0 <= value < 1),
    "adam_beta2": ("in [0, 1)", lambda value: 0 <= value < 1),
    "adam_epsilon": (">= 0", lambda value: value >= 0),
    "adam_weight_decay": (">= 0", lambda value: value >= 0),
    "max_grad_norm": (">= 0 (0 turns clipping off)", lambda value: value >= 0),
    "ema_decay": ("in [0, 1]", lambda value: 0 <= value <= 1),
    "lora_alpha": ("positive (the adapter's output is scaled by alpha / rank)", lambda value: value > 0),
    "lora_dropout": ("in [0, 1)", lambda value: 0 <= value < 1),
    "dataloader_num_workers": (">= 0", lambda value: value >= 0),
    "seed": ("in [0, 2**32 - 1] (numpy's seed range, used by accelerate's set_seed)", lambda value: 0 <= value < 2**32),
}


# --------------------------------------------------------------------------------------------------- arguments
def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a CompoDiff prior (stage 1: text-to-image; stage 2: composed image retrieval).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--pretrained_model_name_or_path", type=str, default=None,
        help="A CompoDiff pipeline folder (or Hub repo id) to start from: stage 2 from stage 1, fine-tuning, LoRA. "
        "Its text encoder, tokenizer and image encoder are used unless given below.",
    )
    model.add_argument(
        "--transformer_config", type=str, default=None,
        help="Train a new denoiser: a JSON file or inline JSON of CompoDiffTransformer arguments. embedding_dim and "
        "text_embedding_dim default to the data's embedding width and the text encoder's hidden size.",
    )
    model.add_argument("--text_encoder_name_or_path", type=str, default=None, help="CLIP text model folder / repo id.")
    model.add_argument("--tokenizer_name_or_path", type=str, default=None, help="CLIP tokenizer folder / repo id.")
    model.add_argument(
        "--image_encoder_name_or_path", type=str, default=None,
        help="CLIPVisionModelWithProjection folder / repo id: needed to train from the `images` configuration.",
    )
    model.add_argument("--revision", type=str, default=None, help="Hub revision of the pretrained folders.")

    data = parser.add_argument_group("data")
    data.add_argument(
        "--train_data_dir", type=str, required=True,
        help="Triplet dataset in the SynthTriplets layout (folder or Hub id; see diffusers_cir.data.schema).",
    )
    data.add_argument("--dataset_config_name", type=str, default="embeddings", help="'embeddings' or 'images'.")
    data.add_argument("--train_split", type=str, default="train")
    data.add_argument(
        "--column_mapping", type=str, default=None,
        help="JSON {canonical column: your column} to read another layout, e.g. '{\"modification_text\": \"edit\"}'.",
    )
    data.add_argument(
        "--stage", type=str, default="triplet", choices=["text_to_image", "triplet"],
        help="text_to_image: stage 1 (target caption -> target); triplet: stage 2 (objectives mixed as below).",
    )
    data.add_argument(
        "--objective_ratios", type=str, default="triplet=0.7,text_to_image=0.3,masked=0",
        help="Stage 2: shares of rows trained with each objective. 'masked' needs the `images` configuration.",
    )
    data.add_argument(
        "--text_to_image_data_dir", type=str, default=None,
        help="Stage 2: image-caption data mixed into every batch for the text-to-image (and masked) objectives, as "
        "CompoDiff mixes its stage-1 data. Without it, those rows are triplet rows turned into (target caption -> "
        "target) pairs.",
    )
    data.add_argument("--text_to_image_config_name", type=str, default=None, help="Its configuration (default: same "
                      "as --dataset_config_name).")
    data.add_argument("--text_to_image_split", type=str, default="train")
    data.add_argument(
        "--text_to_image_column_mapping", type=str, default=None,
        help="JSON mapping for it, e.g. '{\"target_image_embeds\": \"image_embeds\", \"target_caption\": \"caption\"}'.",
    )
    data.add_argument(
        "--embedding_scale", type=str, default="auto",
        help="Targets are L2-normalised and multiplied by this before noising: 'auto' = sqrt(embedding_dim), i.e. "
        "unit variance per coordinate, the scale the noise schedule assumes; 'none' keeps them as stored. The prior "
        "then samples in that scale: normalise before retrieval (the pipeline's normalize=True).",
    )
    data.add_argument(
        "--shuffle_buffer_size", type=int, default=1000,
        help="Rows mixed across shards. 0 shuffles only the shard order and makes resuming exact; with a buffer, "
        "the rows in it at checkpoint time are skipped for that epoch (see diffusers_cir.data.streaming).",
    )
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Worker processes per dataloader (0: "
                      "read in the training process).")

    validation = parser.add_argument_group("validation")
    validation.add_argument(
        "--validation_data_dir", type=str, default=None,
        help="Dataset with the validation triplets (default: --train_data_dir). Recall@K is computed with "
        "diffusers_cir.metrics.",
    )
    validation.add_argument("--validation_split", type=str, default="validation")
    validation.add_argument(
        "--validation_gallery_config", type=str, default="gallery",
        help="Configuration of --validation_data_dir holding the gallery (columns id, image_embeds). When the "
        "dataset has none, the gallery is every distinct reference and target embedding of the validation rows.",
    )
    validation.add_argument("--validation_steps", type=int, default=None, help="Validate every N steps (and at the end).")
    validation.add_argument("--num_validation_queries", type=int, default=1000)
    validation.add_argument("--validation_batch_size", type=int, default=256)
    validation.add_argument("--validation_inference_steps", type=int, default=10)
    validation.add_argument("--validation_guidance_scale", type=float, default=7.5)
    validation.add_argument("--validation_image_guidance_scale", type=float, default=1.5)
    validation.add_argument("--validation_recall_ks", type=str, default="1,5,10")

    training = parser.add_argument_group("training")
    training.add_argument("--output_dir", type=str, default="compodiff-model")
    training.add_argument("--seed", type=int, default=0)
    training.add_argument("--train_batch_size", type=int, default=256, help="Per device.")
    training.add_argument("--max_train_steps", type=int, default=10000, help="Optimizer steps (streaming: no epochs).")
    training.add_argument("--gradient_accumulation_steps", type=int, default=1)
    training.add_argument("--gradient_checkpointing", action="store_true")
    training.add_argument("--learning_rate", type=float, default=1e-4)
    training.add_argument(
        "--scale_lr", action="store_true",
        help="Multiply the learning rate by batch size x accumulation x processes.",
    )
    training.add_argument(
        "--lr_scheduler", type=str, default="constant_with_warmup",
        help="diffusers.optimization.get_scheduler name: " + ", ".join(LR_SCHEDULERS) + ".",
    )
    training.add_argument("--lr_warmup_steps", type=int, default=500)
    training.add_argument("--adam_beta1", type=float, default=0.9)
    training.add_argument("--adam_beta2", type=float, default=0.999)
    training.add_argument("--adam_weight_decay", type=float, default=0.0)
    training.add_argument("--adam_epsilon", type=float, default=1e-8)
    training.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm; 0 turns it off.")
    training.add_argument("--use_ema", action="store_true", help="Keep an EMA of the weights (saved and validated).")
    training.add_argument(
        "--ema_decay", type=float, default=0.9999,
        help="Upper bound, in [0, 1], of the EMA decay: diffusers' EMAModel raises the per-step decay along "
        "(1 + step) / (10 + step) (or the --ema_warmup curve) and caps it here; 0 makes the EMA the weights themselves.",
    )
    training.add_argument(
        "--ema_warmup", action="store_true",
        help="EMA decay warm-up (1 - (1 + step/inv_gamma)^-power), useful for short runs.",
    )
    training.add_argument("--text_drop_prob", type=float, default=0.1, help="Text -> the \"\" encoding, image kept.")
    training.add_argument("--image_drop_prob", type=float, default=0.1, help="Reference image -> zeros, text kept.")
    training.add_argument("--both_drop_prob", type=float, default=0.1, help="Both dropped (unconditional branch).")
    training.add_argument(
        "--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
        help="Overrides the accelerate config.",
    )
    training.add_argument("--allow_tf32", action="store_true")
    training.add_argument(
        "--text_embedding_cache_size", type=int, default=0,
        help="Cache the text hidden states of up to N distinct texts (instruction data repeats texts a lot).",
    )

    checkpointing = parser.add_argument_group("checkpointing and logging")
    checkpointing.add_argument("--checkpointing_steps", type=int, default=500)
    checkpointing.add_argument("--checkpoints_total_limit", type=int, default=None)
    checkpointing.add_argument(
        "--resume_from_checkpoint", type=str, default=None,
        help='"latest" or a checkpoint folder name/path. "latest" with no checkpoint starts a new run. Without it, an '
        "--output_dir that already holds checkpoints is refused (a new run would mix its checkpoints with them), and so "
        "is a checkpoint past --max_train_steps. A new run is also refused where an earlier one left its final model "
        "or validation log.",
    )
    checkpointing.add_argument(
        "--stop_after_steps", type=int, default=None,
        help="Stop this invocation after N optimizer steps (counted from where it started) with a checkpoint and no "
        "final save, for time-limited jobs: the next one continues with --resume_from_checkpoint latest.",
    )
    checkpointing.add_argument(
        "--report_to", type=str, default="auto",
        help='"auto" (tensorboard when installed, else none), "none", "all" (every installed tracker), or one tracker '
        'accelerate supports and that is installed ("tensorboard", "wandb", "mlflow", ...).',
    )
    checkpointing.add_argument("--tracker_project_name", type=str, default="train_compodiff")
    checkpointing.add_argument("--logging_dir", type=str, default="logs", help="Relative to --output_dir.")

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--use_lora", action="store_true", help="Train LoRA adapters only (needs a pretrained model).")
    lora.add_argument("--lora_rank", type=int, default=4)
    lora.add_argument("--lora_alpha", type=float, default=4.0)
    lora.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout on the adapters' input, in [0, 1).")
    lora.add_argument(
        "--lora_target_modules", type=str, default=DEFAULT_LORA_TARGETS,
        help="Regex of the linear layers to adapt (default: every attention and feed-forward projection).",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_argument_parser().parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Fail before any work on arguments that cannot work together."""
    if (args.pretrained_model_name_or_path is None) == (args.transformer_config is None):
        raise ValueError("Pass exactly one of --pretrained_model_name_or_path (start from a model) and "
                         "--transformer_config (train a new denoiser).")
    if args.transformer_config is not None and (args.text_encoder_name_or_path is None or args.tokenizer_name_or_path is None):
        raise ValueError("A new denoiser (--transformer_config) needs --text_encoder_name_or_path and "
                         "--tokenizer_name_or_path (the frozen CLIP text model it reads).")
    if args.use_lora and args.pretrained_model_name_or_path is None:
        raise ValueError("--use_lora fine-tunes a trained prior: pass --pretrained_model_name_or_path.")
    if args.use_lora and args.use_ema:
        raise ValueError("--use_ema is not supported with --use_lora (the adapter is small; save checkpoints instead).")
    if args.dataset_config_name not in ("embeddings", "images"):
        raise ValueError(f"--dataset_config_name must be 'embeddings' or 'images', got {args.dataset_config_name!r}.")
    for name in ("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "checkpointing_steps",
                 "num_validation_queries", "validation_batch_size", "validation_inference_steps", "lora_rank"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}.")
    if args.validation_steps is not None and args.validation_steps <= 0:
        raise ValueError(f"--validation_steps must be positive, got {args.validation_steps}.")
    if args.stop_after_steps is not None and args.stop_after_steps <= 0:
        raise ValueError(f"--stop_after_steps must be positive, got {args.stop_after_steps}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit <= 0:
        raise ValueError(f"--checkpoints_total_limit must be positive, got {args.checkpoints_total_limit}.")
    if args.lr_warmup_steps < 0 or args.shuffle_buffer_size < 0 or args.text_embedding_cache_size < 0:
        raise ValueError("--lr_warmup_steps, --shuffle_buffer_size and --text_embedding_cache_size must be >= 0.")
    if args.lr_scheduler not in LR_SCHEDULERS:
        raise ValueError(f"--lr_scheduler must be one of {list(LR_SCHEDULERS)}, got {args.lr_scheduler!r}.")
    for name, (allowed, is_allowed) in NUMBER_RANGES.items():
        value = getattr(args, name)
        if not is_allowed(value):  # written so that NaN fails too
            raise ValueError(f"--{name} must be {allowed}, got {value!r}.")
    try:
        re.compile(args.lora_target_modules)
    except re.error as error:
        raise ValueError(f"--lora_target_modules is not a valid regular expression ({error}): "
                         f"{args.lora_target_modules!r}.") from None
    check_report_to(args.report_to)
    from .conditioning import ConditionDropout, ObjectiveRatios

    ConditionDropout(args.text_drop_prob, args.image_drop_prob, args.both_drop_prob)
    ratios = ObjectiveRatios.parse(args.objective_ratios)
    if ratios.probabilities["masked"] > 0 and args.dataset_config_name != "images":
        raise ValueError(
            "The masked objective encodes masked target images on the fly: it needs --dataset_config_name images "
            f"(got {args.dataset_config_name!r}). Set its ratio to 0 in --objective_ratios ({args.objective_ratios!r})."
        )
    for name in ("column_mapping", "text_to_image_column_mapping"):
        _json_mapping(getattr(args, name), f"--{name}")
    if args.text_to_image_data_dir is not None:
        if args.stage != "triplet":
            raise ValueError("--text_to_image_data_dir mixes caption data into stage 2 (--stage triplet); for stage 1 "
                             "pass the caption data as --train_data_dir.")
        if ratios.caption_row_probability in (0.0, 1.0):
            raise ValueError(
                f"--text_to_image_data_dir needs a text_to_image (or masked) share strictly between 0 and 1 in "
                f"--objective_ratios, got {args.objective_ratios!r}."
            )
    embedding_scale(args, 1)
    recall_ks(args)


def lr_warmup_warning(args: argparse.Namespace) -> str | None:
    """What to warn about when the warmup outlasts the run: the learning rate would still be rising at the last step.

    A warning, not an error: a short run with the warmup of the full one (a smoke test) can be intentional. The
    ``constant`` scheduler has no warmup, so there is nothing to say about it. ``examples/train_lincir.py`` uses it too.
    """
    if args.lr_scheduler == "constant" or args.lr_warmup_steps <= args.max_train_steps:
        return None
    return (
        f"--lr_warmup_steps {args.lr_warmup_steps} is larger than --max_train_steps {args.max_train_steps}: the "
        f"learning rate is still warming up when training ends and never reaches its peak (--learning_rate "
        f"{args.learning_rate:g}{' scaled by --scale_lr' if getattr(args, 'scale_lr', False) else ''}), only about "
        f"{args.max_train_steps / args.lr_warmup_steps:.0%} of it. Lower --lr_warmup_steps if that is not intended."
    )


def _json_mapping(text: str | None, flag: str, invalid: str = "is not valid JSON") -> dict | None:
    if text is None:
        return None
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{flag} {invalid} ({error}): {text!r}") from None
    if not isinstance(mapping, dict):
        raise ValueError(f"{flag} must be a JSON object, got {text!r}.")
    return mapping


def embedding_scale(args, embedding_dim: int) -> float | None:
    """The factor of --embedding_scale (``None``: targets used as stored)."""
    value = str(args.embedding_scale).strip().lower()
    if value == "auto":
        return math.sqrt(embedding_dim)
    if value == "none":
        return None
    try:
        scale = float(value)
    except ValueError:
        scale = -1.0
    if not scale > 0:
        raise ValueError(f"--embedding_scale must be 'auto', 'none' or a positive number, got {args.embedding_scale!r}.")
    return scale


def recall_ks(args) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in str(args.validation_recall_ks).split(",") if k.strip())
    except ValueError:
        raise ValueError(f"--validation_recall_ks must be comma-separated integers, got {args.validation_recall_ks!r}.") from None
    if not ks or min(ks) < 1:
        raise ValueError(f"--validation_recall_ks must be positive integers, got {args.validation_recall_ks!r}.")
    return ks


# --------------------------------------------------------------------------------------------------- checkpoints
def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints ``checkpoint-<step>`` of a run, oldest first (``*.partial`` folders are incomplete)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume_checkpoint(output_dir: str, resume_from_checkpoint: str | None) -> Path | None:
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        path = Path(output_dir) / resume_from_checkpoint
    if not path.is_dir() or not CHECKPOINT_PATTERN.match(path.name):
        raise ValueError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a checkpoint-<step> folder (looked in "
            f"{resume_from_checkpoint!r} and {str(Path(output_dir) / resume_from_checkpoint)!r})."
        )
    return path


def check_output_dir(
    output_dir: str, resume_from_checkpoint: str | None, max_train_steps: int | None = None
) -> Path | None:
    """The checkpoint to resume from, resolved before any work; refuses a new run over an earlier run's checkpoints
    (its checkpoints would mix with the old ones, and ``latest`` could later pick an old one), and a checkpoint past
    ``max_train_steps`` (there is nothing left to train, and its weights would be saved as a final model of more
    steps than asked for)."""
    checkpoint = resolve_resume_checkpoint(output_dir, resume_from_checkpoint)
    if checkpoint is not None and max_train_steps is not None:
        step = int(CHECKPOINT_PATTERN.match(checkpoint.name).group(1))
        if step > max_train_steps:
            earlier = [path.name for other, path in list_checkpoints(output_dir) if other <= max_train_steps]
            raise ValueError(
                f"--resume_from_checkpoint {resume_from_checkpoint!r} is {checkpoint.name}, at step {step}, past "
                f"--max_train_steps {max_train_steps}: there is nothing left to train, and its weights are not those "
                f"of step {max_train_steps}. Raise --max_train_steps above {step} to train on, or resume from a "
                f"checkpoint at or before step {max_train_steps} ("
                + (", ".join(earlier) if earlier else f"{output_dir!r} has none") + ")."
            )
    if resume_from_checkpoint is None:
        earlier = list_checkpoints(output_dir)
        if earlier:
            names = ", ".join(path.name for _, path in earlier)
            raise ValueError(
                f"--output_dir {output_dir!r} already holds checkpoints of an earlier run ({names}) and "
                "--resume_from_checkpoint is not set: pass --resume_from_checkpoint latest to continue that run, or "
                "choose another --output_dir (or delete those checkpoints) to start a new one."
            )
    return checkpoint


# What a finished (or validated) run leaves in --output_dir besides its checkpoints.
RUN_OUTPUTS = ("model_index.json", "pytorch_lora_weights.safetensors", VALIDATION_LOG)


def check_no_earlier_run_outputs(output_dir: str) -> None:
    """Refuse to start a new run in an --output_dir holding an earlier run's final model or validation log: the new
    run would overwrite that model and append its validation records to the earlier run's."""
    found = [name for name in RUN_OUTPUTS if (Path(output_dir) / name).exists()]
    if found:
        raise ValueError(
            f"--output_dir {output_dir!r} already holds the outputs of an earlier run ({', '.join(found)}) and there is "
            "no checkpoint to resume from: a new run would overwrite that model and mix its validation log with the "
            "earlier one. Choose another --output_dir, or delete them to start over."
        )


def _prune_checkpoints(output_dir: str, total_limit: int | None) -> None:
    """Keep at most ``total_limit - 1`` checkpoints before a new one is written; drop stale partial ones."""
    for path in Path(output_dir).glob("checkpoint-*.partial"):
        shutil.rmtree(path, ignore_errors=True)
    if total_limit is None:
        return
    checkpoints = list_checkpoints(output_dir)
    excess = len(checkpoints) - (total_limit - 1)
    if excess > 0:
        removed = [path for _, path in checkpoints[:excess]]
        logger.info("Removing %d old checkpoint(s): %s", len(removed), ", ".join(p.name for p in removed))
        for path in removed:
            shutil.rmtree(path)


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: int | None) -> Path:
    """``accelerator.save_state`` into ``checkpoint-<step>.partial``, renamed when every rank has written, so a
    run killed while saving never leaves a checkpoint that ``latest`` would pick."""
    final = Path(output_dir) / f"checkpoint-{step}"
    partial = Path(output_dir) / f"checkpoint-{step}.partial"
    if accelerator.is_main_process:
        _prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        logger.info("Saved state to %s", final)
    accelerator.wait_for_everyone()
    return final


# --------------------------------------------------------------------------------------------------- building
def _load_json_or_file(text: str) -> dict:
    if os.path.isfile(text):
        with open(text, encoding="utf-8") as handle:
            return json.load(handle)
    return _json_mapping(text, "--transformer_config", invalid="is neither a file nor valid JSON")


def _embedding_width(stream) -> int | None:
    features = getattr(stream.dataset, "features", None) or {}
    column = stream.column_mapping.get("target_image_embeds", "target_image_embeds")
    feature = features.get(column)
    length = getattr(feature, "length", -1)
    return int(length) if length and length > 0 else None


def _pretrained_folder(args) -> str | None:
    from ..pipelines.auto import resolve_pretrained_path

    if args.pretrained_model_name_or_path is None:
        return None
    return resolve_pretrained_path(args.pretrained_model_name_or_path, {"revision": args.revision})


def load_frozen_encoders(args, pretrained: str | None):
    """``(text_encoder, tokenizer, image_encoder, image_processor)`` in float32, from the explicit paths or the
    pretrained pipeline folder (``None`` where neither has one)."""
    from transformers import (
        CLIPImageProcessor,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionModelWithProjection,
        PretrainedConfig,
    )

    def locate(name, explicit):
        if explicit is not None:
            return explicit, {"revision": args.revision}
        if pretrained is not None and os.path.isdir(os.path.join(pretrained, name)):
            return pretrained, {"subfolder": name}
        return None, None

    path, kwargs = locate("text_encoder", args.text_encoder_name_or_path)
    text_encoder = None
    if path is not None:
        config = PretrainedConfig.get_config_dict(path, **kwargs)[0]
        with_projection = "CLIPTextModelWithProjection" in (config.get("architectures") or [])
        text_encoder = (CLIPTextModelWithProjection if with_projection else CLIPTextModel).from_pretrained(path, **kwargs)
    path, kwargs = locate("tokenizer", args.tokenizer_name_or_path)
    tokenizer = CLIPTokenizer.from_pretrained(path, **kwargs) if path is not None else None
    path, kwargs = locate("image_encoder", args.image_encoder_name_or_path)
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(path, **kwargs) if path is not None else None
    path, kwargs = locate("image_processor", None)
    if path is None and args.image_encoder_name_or_path is not None:
        # A CLIP repo keeps its preprocessor_config.json next to the vision model's weights.
        if os.path.isfile(os.path.join(args.image_encoder_name_or_path, "preprocessor_config.json")):
            path, kwargs = args.image_encoder_name_or_path, {}
    image_processor = CLIPImageProcessor.from_pretrained(path, **kwargs) if path is not None else None
    if image_encoder is not None and image_processor is None:
        image_processor = CLIPImageProcessor()  # OpenAI CLIP's 224 px preprocessing
    return text_encoder, tokenizer, image_encoder, image_processor


def load_components(args, stream):
    """Denoiser, scheduler, frozen text encoder + tokenizer, optional image encoder + processor."""
    from ..models import CompoDiffTransformer
    from ..schedulers import CompoDiffScheduler

    pretrained = _pretrained_folder(args)
    text_encoder, tokenizer, image_encoder, image_processor = load_frozen_encoders(args, pretrained)
    if text_encoder is None or tokenizer is None:
        raise ValueError(
            "Training needs the frozen CLIP text encoder and tokenizer: the pretrained folder has none, so pass "
            "--text_encoder_name_or_path and --tokenizer_name_or_path."
        )
    if args.dataset_config_name == "images" and image_encoder is None:
        raise ValueError("The `images` configuration is encoded on the fly: pass --image_encoder_name_or_path.")

    if pretrained is not None:
        transformer = CompoDiffTransformer.from_pretrained(pretrained, subfolder="transformer")
        scheduler = CompoDiffScheduler.from_pretrained(pretrained, subfolder="scheduler")
    else:
        config = _load_json_or_file(args.transformer_config)
        if "embedding_dim" not in config:
            if args.dataset_config_name == "embeddings":
                width = _embedding_width(stream)
            else:
                width = image_encoder.config.projection_dim
            if width is None:
                raise ValueError("Cannot infer the embedding width from the data: set embedding_dim in --transformer_config.")
            config["embedding_dim"] = width
        config.setdefault("text_embedding_dim", text_encoder.config.hidden_size)
        transformer = CompoDiffTransformer(**config)
        scheduler = CompoDiffScheduler(num_train_timesteps=transformer.config.num_train_timesteps)
    if transformer.config.text_embedding_dim != text_encoder.config.hidden_size:
        raise ValueError(
            f"The denoiser reads text of width {transformer.config.text_embedding_dim} but the text encoder's hidden "
            f"size is {text_encoder.config.hidden_size}."
        )
    return transformer, scheduler, text_encoder, tokenizer, image_encoder, image_processor


def check_report_to(report_to: str) -> None:
    """Refuse a --report_to that accelerate does not know, or whose package is not installed (accelerate would only
    warn, then log nothing)."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    trackers = [tracker.value for tracker in LoggerType if tracker != LoggerType.ALL]
    accepted = ["auto", "none", "all", *trackers]
    if report_to not in accepted:
        raise ValueError(f"--report_to must be one of {accepted}, got {report_to!r}.")
    if report_to in trackers and report_to not in {LoggerType(tracker).value for tracker in get_available_trackers()}:
        raise ValueError(
            f"--report_to {report_to!r}: the {report_to} package is not installed, so nothing would be logged. Install "
            "it, or pass --report_to none (or auto: tensorboard when installed)."
        )


def _resolve_report_to(report_to: str):
    if report_to == "auto":
        import importlib.util

        for module in ("tensorboard", "tensorboardX"):
            if importlib.util.find_spec(module) is not None:
                return "tensorboard"
        return None
    return None if report_to == "none" else report_to


def _tracker_config(args) -> dict:
    config = {}
    for key, value in vars(args).items():
        config[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return config


# --------------------------------------------------------------------------------------------------- validation
def load_validation_set(args, num_queries: int):
    """Validation queries (reference embedding + modification text) and their gallery, from the dataset."""
    import datasets
    import numpy as np

    from .validation import RetrievalSet

    path = args.validation_data_dir or args.train_data_dir
    try:
        rows = datasets.load_dataset(path, "embeddings", split=args.validation_split, streaming=True).take(num_queries)
    except (ValueError, KeyError, FileNotFoundError) as error:
        raise ValueError(
            f"Validation reads the {args.validation_split!r} split of the `embeddings` configuration of {path!r} "
            f"(--validation_data_dir / --validation_split), which could not be opened: {error}"
        ) from error
    references, prompts, targets, reference_ids, target_ids = [], [], [], [], []
    for row in rows:
        references.append(row["reference_image_embeds"])
        targets.append(row["target_image_embeds"])
        prompts.append(row["modification_text"])
        reference_ids.append(row.get("reference_id"))
        target_ids.append(row.get("target_id"))
    if not prompts:
        raise ValueError(f"The {args.validation_split!r} split of {path!r} has no rows to validate on.")
    references = torch.tensor(np.asarray(references, dtype=np.float32))
    targets = torch.tensor(np.asarray(targets, dtype=np.float32))

    gallery_config = args.validation_gallery_config
    configs = datasets.get_dataset_config_names(path) if gallery_config else []
    if gallery_config and gallery_config in configs and all(t is not None for t in target_ids):
        gallery = datasets.load_dataset(path, gallery_config, streaming=True)
        split = next(iter(gallery))
        gallery_ids, gallery_embeds = [], []
        for row in gallery[split]:
            gallery_ids.append(row["id"])
            gallery_embeds.append(row["image_embeds"])
        return RetrievalSet(
            references,
            prompts,
            np.asarray(target_ids),
            torch.tensor(np.asarray(gallery_embeds, dtype=np.float32)),
            np.asarray(gallery_ids),
            np.asarray(reference_ids) if all(r is not None for r in reference_ids) else None,
        )
    return RetrievalSet.from_triplets(references, prompts, targets)


def run_validation(
    args, accelerator, transformer, noise_scheduler, text_encoder, tokenizer, retrieval_set, step, train_seconds=None
):
    from ..pipelines import CompoDiffPipeline
    from .validation import evaluate_composed_retrieval

    was_training = transformer.training
    transformer.eval()
    pipeline = CompoDiffPipeline(
        transformer=transformer,
        scheduler=copy.deepcopy(noise_scheduler),  # sampling state stays out of the training scheduler
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )
    pipeline.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    metrics = evaluate_composed_retrieval(
        pipeline,
        retrieval_set,
        ks=recall_ks(args),
        batch_size=args.validation_batch_size,
        num_inference_steps=args.validation_inference_steps,
        guidance_scale=args.validation_guidance_scale,
        image_guidance_scale=args.validation_image_guidance_scale,
        seed=args.seed,
    )
    transformer.train(was_training)
    record = {"step": step, **{f"val/{k}": v for k, v in metrics.items()}, "val/seconds": time.perf_counter() - start}
    if train_seconds is not None:
        record["train/seconds"] = train_seconds  # wall time of training so far, validation excluded
    logger.info("Validation at step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    with open(os.path.join(args.output_dir, VALIDATION_LOG), "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    accelerator.log({key: value for key, value in record.items() if key != "step"}, step=step)
    return metrics


# --------------------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> dict:
    """Train; returns a summary (``global_step``, final validation metrics, output paths)."""
    import datasets
    import diffusers
    import transformers
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel, cast_training_params
    from tqdm.auto import tqdm

    from ..data.streaming import build_triplet_dataloader, load_triplet_stream
    from ..models import CompoDiffTransformer
    from ..pipelines import CompoDiffPipeline
    from .conditioning import CachedTextEncoder, ConditionDropout, ObjectiveRatios
    from .data import EndlessLoader, merge_batches
    from .losses import compodiff_loss
    from .masking import masked_image_embeds, random_box_masks

    check_args(args)
    checkpoint = check_output_dir(args.output_dir, args.resume_from_checkpoint, args.max_train_steps)
    if checkpoint is None:
        check_no_earlier_run_outputs(args.output_dir)
    run_logger = get_logger("diffusers_cir.training")
    logging_dir = Path(args.output_dir, args.logging_dir)
    report_to = _resolve_report_to(args.report_to)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    run_logger.info(accelerator.state, main_process_only=False)
    warmup_warning = lr_warmup_warning(args)
    if warmup_warning is not None:
        run_logger.warning(warmup_warning)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_info()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    # Same seed on every rank for the weights; each rank then draws its own training noise.
    set_seed(args.seed)

    # ---- data (sharded per rank) and components
    ratios = ObjectiveRatios.parse(args.objective_ratios)
    def open_stream(flags: str, *load_args, **load_kwargs):
        try:
            return load_triplet_stream(*load_args, **load_kwargs)
        except (FileNotFoundError, ValueError) as error:  # not MissingColumnsError (a KeyError): it names its columns
            raise ValueError(f"{flags} could not be opened: {error}") from error

    stream = open_stream(
        f"--train_data_dir {args.train_data_dir!r} (--dataset_config_name {args.dataset_config_name!r}, --train_split "
        f"{args.train_split!r})",
        args.train_data_dir, args.dataset_config_name, split=args.train_split,
        column_mapping=_json_mapping(args.column_mapping, "--column_mapping"), stage=args.stage, revision=args.revision,
    )
    caption_stream = None
    if args.text_to_image_data_dir is not None:  # opened now: a wrong flag fails before the models load
        caption_config = args.text_to_image_config_name or args.dataset_config_name
        caption_stream = open_stream(
            f"--text_to_image_data_dir {args.text_to_image_data_dir!r} (--text_to_image_config_name "
            f"{caption_config!r}, --text_to_image_split {args.text_to_image_split!r})",
            args.text_to_image_data_dir,
            caption_config,
            split=args.text_to_image_split,
            column_mapping=_json_mapping(args.text_to_image_column_mapping, "--text_to_image_column_mapping"),
            stage="text_to_image",
            revision=args.revision,
        )
    transformer, noise_scheduler, text_encoder, tokenizer, image_encoder, image_processor = load_components(args, stream)
    caption_share = ratios.caption_row_probability if args.stage == "triplet" else 0.0
    caption_rows = 0
    if args.text_to_image_data_dir is not None:
        caption_rows = min(args.train_batch_size - 1, max(1, round(args.train_batch_size * caption_share)))

    def loader_for(data_stream, batch_size, seed, text_to_image_probability, name):
        features = getattr(data_stream.dataset, "features", None) or {}
        return EndlessLoader(
            build_triplet_dataloader(
                data_stream,
                batch_size,
                tokenizer=tokenizer,
                image_processor=image_processor,
                num_workers=args.dataloader_num_workers,
                rank=accelerator.process_index,
                world_size=accelerator.num_processes,
                shuffle=True,
                shuffle_buffer_size=args.shuffle_buffer_size,
                seed=seed,
                text_to_image_probability=text_to_image_probability,
                return_mask=data_stream.column_mapping["mask"].split(".")[0] in features,
            ),
            name=name,
        )

    loaders = {
        "triplets": loader_for(
            stream, args.train_batch_size - caption_rows, args.seed, 0.0 if caption_rows else caption_share, "training"
        )
    }
    if caption_rows:
        if caption_stream.source != stream.source:
            raise ValueError(
                f"--text_to_image_data_dir holds {caption_stream.source} but the triplets hold {stream.source}; "
                "both must be embeddings or both images."
            )
        loaders["captions"] = loader_for(caption_stream, caption_rows, args.seed + 1, 0.0, "text-to-image")
    if accelerator.num_processes > 1:
        own = loaders["triplets"].loader.dataset.num_shards
        run_logger.info(
            f"Rank {accelerator.process_index} reads {own} of the {stream.num_shards} training shards"
            + ("" if own < stream.num_shards else " (too few shards to split: it keeps 1 row in "
               f"{accelerator.num_processes})"),
            main_process_only=False,
        )

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    text_encoder.requires_grad_(False).to(accelerator.device, dtype=weight_dtype).eval()
    if image_encoder is not None:
        image_encoder.requires_grad_(False).to(accelerator.device, dtype=weight_dtype).eval()

    lora_config = None
    if args.use_lora:
        from peft import LoraConfig

        transformer.requires_grad_(False)
        transformer.to(accelerator.device, dtype=weight_dtype)
        lora_config = LoraConfig(
            r=args.lora_rank,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            init_lora_weights="gaussian",
            target_modules=args.lora_target_modules,
        )
        transformer.add_adapter(lora_config)
        if accelerator.mixed_precision == "fp16":
            cast_training_params(transformer, dtype=torch.float32)  # LoRA weights train in float32
    transformer.train()
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()

    ema = None
    if args.use_ema:
        ema = EMAModel(
            transformer.parameters(),
            decay=args.ema_decay,
            use_ema_warmup=args.ema_warmup,
            model_cls=CompoDiffTransformer,
            model_config=transformer.config,
        )
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)

    # This loop's own noise generator (see the module docstring); one stream per rank.
    noise_generator = torch.Generator(device=accelerator.device).manual_seed(args.seed + 1_000_003 * accelerator.process_index)

    def save_model_hook(models, weights, output_dir):
        # Every rank stores its own data position and noise generator (accelerate keeps only rank 0's custom state).
        state = {name: loader.state_dict() for name, loader in loaders.items()}
        state["noise_generator"] = noise_generator.get_state()
        torch.save(state, os.path.join(output_dir, f"loop_state_{accelerator.process_index}.pt"))

    def load_model_hook(models, input_dir):
        path = os.path.join(input_dir, f"loop_state_{accelerator.process_index}.pt")
        if not os.path.isfile(path):
            written = sorted(Path(input_dir).glob("loop_state_*.pt"))
            raise FileNotFoundError(
                f"{path} is missing: the checkpoint was written by a run with fewer processes ({len(written)}) than "
                f"this one ({accelerator.num_processes}); resume with the same number of processes."
                if written else f"{path} is missing: the checkpoint is incomplete."
            )
        state = torch.load(path, map_location="cpu", weights_only=False)
        for name, loader in loaders.items():
            if name not in state:
                raise KeyError(f"{path} has no position for the {name!r} data: was it saved with other data arguments?")
            loader.load_state_dict(state[name])
        noise_generator.set_state(state["noise_generator"])

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    trainable = [parameter for parameter in transformer.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable,
        lr=learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    # The prepared scheduler steps once per process at every optimizer step, hence the multiplications.
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)

    retrieval_set = None
    if args.validation_steps is not None and accelerator.is_main_process:
        retrieval_set = load_validation_set(args, args.num_validation_queries)
        run_logger.info(f"Validation: {len(retrieval_set)} queries, gallery of {len(retrieval_set.gallery_ids)}")
        gallery_size = len(retrieval_set.gallery_ids)
        too_large = [k for k in recall_ks(args) if k > gallery_size]
        if too_large:
            # recall_of_queries leaves out the K a gallery this small cannot rank: say so instead of dropping them.
            run_logger.warning(
                f"--validation_recall_ks {args.validation_recall_ks!r}: Recall@K for K={too_large} will not be reported, "
                f"the validation gallery has only {gallery_size} images."
            )

    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, _tracker_config(args))

    # ---- resume
    global_step = 0
    if args.resume_from_checkpoint and checkpoint is None:
        accelerator.print(f"No checkpoint in {args.output_dir} to resume from: starting a new training run.")
    if checkpoint is not None:
        accelerator.print(f"Resuming from checkpoint {checkpoint}")
        try:
            accelerator.load_state(str(checkpoint))
        except Exception as error:
            others = [path.name for _, path in list_checkpoints(args.output_dir) if path != checkpoint]
            raise RuntimeError(
                f"Cannot resume from {checkpoint} (--resume_from_checkpoint {args.resume_from_checkpoint}): "
                f"{type(error).__name__}: {error}. If the checkpoint is damaged, resume from another one with "
                f"--resume_from_checkpoint <name> ({', '.join(others) if others else 'this run has no other'}) or "
                "delete it."
            ) from error
        if ema is not None:
            ema.to(accelerator.device)
        global_step = int(CHECKPOINT_PATTERN.match(checkpoint.name).group(1))
        if global_step == args.max_train_steps:
            # e.g. the run was stopped after its last checkpoint, before the final save
            run_logger.warning(
                f"{checkpoint.name} is already at --max_train_steps {args.max_train_steps}: nothing left to train, "
                "saving the final model from it."
            )

    condition_dropout = ConditionDropout(args.text_drop_prob, args.image_drop_prob, args.both_drop_prob)
    encode_text = CachedTextEncoder(text_encoder, tokenizer.eos_token_id, args.text_embedding_cache_size)
    null_input_ids = tokenizer(
        [""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(accelerator.device)
    null_text = encode_text(null_input_ids)
    masked_share = ratios.masked_share_of_caption_rows if args.stage == "triplet" else 0.0
    scale = embedding_scale(args, accelerator.unwrap_model(transformer).config.embedding_dim)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    run_logger.info("***** Running training *****")
    run_logger.info(f"  Stage = {args.stage}; objectives = {ratios if args.stage == 'triplet' else 'text_to_image'}")
    if caption_rows:
        run_logger.info(f"  Rows per batch: {args.train_batch_size - caption_rows} triplets + {caption_rows} captions")
    run_logger.info(f"  Target embeddings: {'as stored' if scale is None else f'L2-normalised x {scale:.4g}'}")
    run_logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    run_logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    run_logger.info(f"  Gradient accumulation steps = {args.gradient_accumulation_steps}")
    run_logger.info(f"  Total optimization steps = {args.max_train_steps}; starting at {global_step}")
    run_logger.info(f"  Trainable parameters = {sum(p.numel() for p in trainable):,}")

    progress_bar = tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    unwrapped = accelerator.unwrap_model(transformer)
    last_metrics: dict = {}
    skipped_for_peers = 0
    objective_rows = {"triplet": 0, "text_to_image": 0, "masked": 0}
    train_loss, samples_since_log, log_start = 0.0, 0, time.perf_counter()

    train_start, validation_seconds = time.perf_counter(), 0.0
    first_step, stopped_early = global_step, False

    def validate(step: int) -> dict:
        nonlocal validation_seconds
        started = time.perf_counter()
        metrics = {}
        if accelerator.is_main_process and retrieval_set is not None:
            if ema is not None:
                ema.store(unwrapped.parameters())
                ema.copy_to(unwrapped.parameters())
            metrics = run_validation(
                args, accelerator, unwrapped, noise_scheduler, text_encoder, tokenizer, retrieval_set, step,
                train_seconds=time.perf_counter() - train_start - validation_seconds,
            )
            if ema is not None:
                ema.restore(unwrapped.parameters())
        accelerator.wait_for_everyone()
        validation_seconds += time.perf_counter() - started
        return metrics

    while global_step < args.max_train_steps:
        batch = loaders["triplets"].next_batch()
        if "captions" in loaders:
            batch = merge_batches(batch, loaders["captions"].next_batch())
        rows = len(batch["ids"])
        if accelerator.num_processes > 1:
            # Every rank must run the same number of backward passes (DDP): skip a batch together.
            any_empty = accelerator.reduce(torch.tensor([int(rows == 0)], device=accelerator.device), "max")
            if int(any_empty.item()):
                skipped_for_peers += rows
                if rows:
                    run_logger.warning(
                        f"Rank {accelerator.process_index}: {rows} rows skipped because another rank's batch was "
                        "empty (every row of it failed to decode).", main_process_only=False,
                    )
                continue
        elif rows == 0:
            continue

        with accelerator.accumulate(transformer):
            device = accelerator.device
            input_ids = batch["input_ids"].to(device)
            is_caption = batch["is_text_to_image"].to(device)
            if stream.source == "embeddings":
                target = batch["target_image_embeds"].to(device).float()
                reference = batch["reference_image_embeds"].to(device)
                masked_rows = None
            else:
                target_pixels = batch["target_pixel_values"].to(device, dtype=weight_dtype)
                with torch.no_grad():
                    target = image_encoder(pixel_values=target_pixels).image_embeds.float()
                    reference = image_encoder(
                        pixel_values=batch["reference_pixel_values"].to(device, dtype=weight_dtype)
                    ).image_embeds.float()
                # Caption rows have no reference: zero it (CLIP of black pixels is not zero).
                reference = torch.where(is_caption[:, None], torch.zeros_like(reference), reference)
                masked_rows = None
                if masked_share > 0:
                    draw = torch.rand(rows, device=device, generator=noise_generator)
                    masked_rows = is_caption & (draw < masked_share)
                    if bool(masked_rows.any()):
                        size = unwrapped.config.mask_size
                        boxes = random_box_masks(rows, size, device=device, generator=noise_generator)
                        reference = torch.where(
                            masked_rows[:, None],
                            masked_image_embeds(image_encoder, target_pixels, boxes).float(),
                            reference,
                        )
            mask = batch.get("mask")
            if mask is not None:
                # Caption rows are text-to-image rows: no edit region.
                mask = torch.where(is_caption[:, None, None], 0.0, mask.to(device).float())
            if masked_rows is not None and bool(masked_rows.any()):
                base = mask if mask is not None else torch.zeros_like(boxes)
                mask = torch.where(masked_rows[:, None, None], boxes, base)

            masked_count = int(masked_rows.sum()) if masked_rows is not None else 0
            objective_rows["masked"] += masked_count
            objective_rows["text_to_image"] += int(is_caption.sum()) - masked_count
            objective_rows["triplet"] += rows - int(is_caption.sum())
            if scale is not None:
                target = F.normalize(target, dim=-1) * scale
            text_hidden_states = encode_text(input_ids)
            image_embeds, text_hidden_states, _, _ = condition_dropout.apply(
                reference, text_hidden_states, null_text, generator=noise_generator
            )
            loss = compodiff_loss(
                transformer, noise_scheduler, target, image_embeds, text_hidden_states, mask,
                generator=noise_generator,
            )
            train_loss += accelerator.gather(loss.detach()[None]).mean().item() / args.gradient_accumulation_steps
            samples_since_log += rows * accelerator.num_processes

            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(transformer.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)

        if not accelerator.sync_gradients:
            continue
        if ema is not None:
            ema.step(unwrapped.parameters())
        global_step += 1
        progress_bar.update(1)
        elapsed = time.perf_counter() - log_start
        logs = {
            "train_loss": train_loss,
            "lr": lr_scheduler.get_last_lr()[0],
            "samples_per_second": samples_since_log / max(elapsed, 1e-9),
        }
        progress_bar.set_postfix(loss=f"{train_loss:.4g}", lr=f"{logs['lr']:.2e}")
        accelerator.log(logs, step=global_step)
        train_loss, samples_since_log, log_start = 0.0, 0, time.perf_counter()

        stopping = args.stop_after_steps is not None and global_step - first_step >= args.stop_after_steps
        if global_step % args.checkpointing_steps == 0 or (stopping and global_step < args.max_train_steps):
            save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
        if args.validation_steps is not None and (
            global_step % args.validation_steps == 0 or global_step == args.max_train_steps
        ):
            last_metrics = validate(global_step)
        if stopping and global_step < args.max_train_steps:
            stopped_early = True
            break

    progress_bar.close()

    # ---- save
    accelerator.wait_for_everyone()
    saved = {}
    if stopped_early:
        accelerator.print(
            f"Stopped after {global_step - first_step} steps (--stop_after_steps) at step {global_step}; continue with "
            "--resume_from_checkpoint latest."
        )
    elif accelerator.is_main_process:
        model = accelerator.unwrap_model(transformer)
        if args.use_lora:
            from peft.utils import get_peft_model_state_dict

            CompoDiffPipeline.save_lora_weights(
                args.output_dir,
                transformer_lora_layers=get_peft_model_state_dict(model),
                transformer_lora_adapter_metadata=lora_config.to_dict(),
            )
            saved["lora"] = os.path.join(args.output_dir, "pytorch_lora_weights.safetensors")
        else:
            if ema is not None:
                ema.copy_to(model.parameters())
            if weight_dtype != torch.float32:
                # The frozen encoders were cast to the training precision: save them as stored instead.
                text_encoder, _, image_encoder, _ = load_frozen_encoders(args, _pretrained_folder(args))
            pipeline = CompoDiffPipeline(
                transformer=model if model.dtype == torch.float32 else model.to(torch.float32),
                scheduler=noise_scheduler,
                text_encoder=text_encoder.to(torch.float32),
                tokenizer=tokenizer,
                image_encoder=image_encoder.to(torch.float32) if image_encoder is not None else None,
                image_processor=image_processor if image_encoder is not None else None,
            )
            pipeline.save_pretrained(args.output_dir)
            saved["pipeline"] = args.output_dir
        run_logger.info(f"Saved {', '.join(saved)} to {args.output_dir}")
    if accelerator.is_main_process:  # a run stopped by --stop_after_steps reports its data too
        for name, loader in loaders.items():
            run_logger.info(f"Data ({name}): {loader.summary()}")
        run_logger.info("Rows per objective (this rank): " + ", ".join(f"{k} {v}" for k, v in objective_rows.items()))
        if skipped_for_peers:
            run_logger.warning(f"{skipped_for_peers} rows were skipped to keep ranks in step (empty batch elsewhere).")
    accelerator.end_training()
    summary = {name: loader.summary() for name, loader in loaders.items()}
    return {
        "global_step": global_step, "stopped_early": stopped_early, "metrics": last_metrics, "saved": saved,
        "data": summary, "objective_rows": objective_rows,
    }

