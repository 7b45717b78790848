# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""The command line of the CompoDiff trainer (``examples/train_compodiff.py``, ``diffusers-cir demo --train``).

Shared groups (optimization, EMA, checkpointing, logging) come from :mod:`.arguments`; this module adds the model,
data, validation, conditioning and LoRA flags, and the checks between flags. Every problem is reported while the
command line is read (see :mod:`.arguments`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re

from ..checks import argparse_type, check_float
from .arguments import (
    DROPOUT,
    NON_NEGATIVE_INT,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    PROBABILITY,
    TrainingArgumentParser,
    add_checkpointing_arguments,
    add_ema_arguments,
    add_flag,
    add_optimization_arguments,
    add_tracking_arguments,
    flag,
    json_object,
    usage_errors,
)
from .outputs import check_output_dir
from .recipes import PAPER_RECIPES, config_report, parse_with_recipe, recipe_name

__all__ = ["DEFAULT_LORA_TARGETS", "RUN_OUTPUTS", "VALIDATION_LOG", "build_argument_parser", "check_args",
           "embedding_scale", "parse_args", "resolve_args"]

DEFAULT_LORA_TARGETS = r"blocks\.\d+\.(self_attn|cross_attn)\.(to_q|to_kv|to_out)|blocks\.\d+\.ff\.(proj_in|proj_out)"
VALIDATION_LOG = "validation_log.jsonl"
# What a finished (or validated) run leaves in --output-dir besides its checkpoints.
RUN_OUTPUTS = ("model_index.json", "pytorch_lora_weights.safetensors", VALIDATION_LOG)


# --------------------------------------------------------------------------------------------------- value types
def _json_object_or_file(text: str) -> dict:
    if os.path.isfile(text):
        with open(text, encoding="utf-8") as handle:
            text = handle.read()
    return json_object(text)


def _embedding_scale(text: str) -> str:
    value = text.strip().lower()
    if value not in ("auto", "none"):
        try:
            check_float(float(value), "value", minimum=0.0, exclusive_minimum=True)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected 'auto', 'none' or a positive number, got {text!r}") from None
    return value


def _recall_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        ks = ()
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return ks


def _objective_ratios(text: str) -> str:
    from .conditioning import ObjectiveRatios

    try:
        ObjectiveRatios.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as error:
        raise argparse.ArgumentTypeError(f"expected a valid regular expression, got {text!r} ({error})") from None
    return text


# --------------------------------------------------------------------------------------------------- the parser
def _add_model_arguments(parser) -> None:
    model = parser.add_argument_group("model")
    add_flag(model, "pretrained_model_name_or_path", default=None,
             help="A CompoDiff pipeline folder (or Hub repo id) to start from: stage 2 from stage 1, fine-tuning, LoRA. "
             "Its text encoder, tokenizer and image encoder are used unless given below.")
    add_flag(model, "transformer_config", type=_json_object_or_file, default=None,
             help="Train a new denoiser: a JSON file or inline JSON of CompoDiffTransformer arguments. embedding_dim and "
             "text_embedding_dim default to the data's embedding width and the text encoder's hidden size.")
    add_flag(model, "text_encoder_name_or_path", default=None,
             help="Text encoder folder / repo id: a CLIP text model (the paper's CLIP ViT-L/14, 77 x 768; the released "
             "models' ViT-bigG/14, 77 x 1280) or a T5 encoder (transformers T5EncoderModel, e.g. T5-XL: 77 x 2048).")
    add_flag(model, "tokenizer_name_or_path", default=None, help="Its tokenizer folder / repo id.")
    add_flag(model, "text_encoder_2_name_or_path", default=None,
             help="A second text encoder read together with the first: a T5 encoder next to CLIP is the paper's best "
             "variant (CLIP + T5-XL). The two token sequences are joined as described in "
             "diffusers_cir.models.compodiff_text (the denoiser then reads 154 tokens of width 768 + 2048).")
    add_flag(model, "tokenizer_2_name_or_path", default=None, help="The second text encoder's tokenizer.")
    add_flag(model, "transformer_dropout", type=DROPOUT, default=None,
             help="Attention and feed-forward dropout of the denoiser (its config `dropout`; the paper's 0.1), also "
             "when starting from a pretrained model; unset keeps the model's (0 for a new one).")
    add_flag(model, "image_encoder_name_or_path", default=None,
             help="CLIPVisionModelWithProjection folder / repo id: needed to train from the `images` configuration.")
    add_flag(model, "revision", default=None, help="Hub revision of the pretrained folders.")


def _add_data_arguments(parser) -> None:
    data = parser.add_argument_group("data")
    add_flag(data, "train_data_dir", default=None,
             help="Required. Triplet dataset in the SynthTriplets layout (folder or Hub id; see diffusers_cir.data.schema).")
    add_flag(data, "dataset_config_name", default="embeddings", choices=["embeddings", "images"])
    add_flag(data, "train_split", default="train")
    add_flag(data, "column_mapping", type=json_object, default=None,
             help="JSON {canonical column: your column} to read another layout, e.g. '{\"modification_text\": \"edit\"}'.")
    add_flag(data, "stage", default="triplet", choices=["text_to_image", "triplet"],
             help="text_to_image: stage 1 (target caption -> target); triplet: stage 2 (objectives mixed as below).")
    add_flag(data, "objective_ratios", type=_objective_ratios, default="triplet=0.7,text_to_image=0.3,masked=0",
             help="Stage 2: shares of rows trained with each objective (the paper: triplet=0.4,text_to_image=0.3,"
             "masked=0.3). 'masked' is the inpainting objective: the `images` configuration, or embeddings data with "
             "precomputed masked embeddings (examples/precompute_masks.py, then precompute_embeddings.py).")
    add_flag(data, "masked_objective_masks", default="boxes", choices=["boxes", "data"],
             help="Masks of the masked objective: random boxes of 10-50%% per side, or the data's precomputed ClipSeg "
             "masks (the paper's; examples/precompute_masks.py computes them once into the dataset).")
    add_flag(data, "redraw_keyword_instructions", action=argparse.BooleanOptionalAction, default=False,
             help="For rows that store a keyword pair (source_keyword, target_keyword): draw the instruction from the "
             "47 SynthTriplets18M templates every time the row is read, as the paper does; rows without a pair keep "
             "their stored text.")
    add_flag(data, "keyword_swap_prob", type=PROBABILITY, default=0.0,
             help="For rows that store a keyword pair: probability of swapping reference and target (and the pair), as "
             "the paper does for keyword triplets (0.5 in its recipe). The swapped row has no mask (the stored one is "
             "of the target).")
    add_flag(data, "text_to_image_data_dir", default=None,
             help="Stage 2: image-caption data mixed into every batch for the text-to-image (and masked) objectives, "
             "as CompoDiff mixes its stage-1 data. Without it, those rows are triplet rows turned into (target caption "
             "-> target) pairs.")
    add_flag(data, "text_to_image_config_name", default=None, help="Its configuration (default: --dataset-config-name).")
    add_flag(data, "text_to_image_split", default="train")
    add_flag(data, "text_to_image_column_mapping", type=json_object, default=None,
             help="JSON mapping for it, e.g. '{\"target_image_embeds\": \"image_embeds\", \"target_caption\": \"caption\"}'.")
    add_flag(data, "embedding_scale", type=_embedding_scale, default="auto",
             help="Targets are L2-normalised and multiplied by this before noising: 'auto' = sqrt(embedding_dim), i.e. "
             "unit variance per coordinate, the scale the noise schedule assumes; 'none' keeps them as stored. The "
             "prior then samples in that scale: normalise before retrieval (the pipeline's normalize=True).")
    add_flag(data, "shuffle_buffer_size", type=NON_NEGATIVE_INT, default=1000,
             help="Rows mixed across shards. 0 shuffles only the shard order and makes resuming exact; with a buffer, "
             "the rows in it at checkpoint time are skipped for that epoch (see diffusers_cir.data.streaming).")
    add_flag(data, "dataloader_num_workers", type=NON_NEGATIVE_INT, default=0,
             help="Worker processes per dataloader (0: read in the training process).")
    add_flag(data, "train_batch_size", type=POSITIVE_INT, default=256, help="Per device.")
    add_flag(data, "total_batch_size", type=POSITIVE_INT, default=None,
             help="Rows per optimizer step over all processes and accumulation steps (the paper's batch sizes are "
             "totals): sets the per-device batch to this / (processes x --gradient-accumulation-steps), which must "
             "divide. Not with --train-batch-size.")


def _add_validation_arguments(parser) -> None:
    validation = parser.add_argument_group("validation")
    add_flag(validation, "validation_data_dir", default=None,
             help="Dataset with the validation triplets (default: --train-data-dir). Recall@K is computed with "
             "diffusers_cir.metrics.")
    add_flag(validation, "validation_split", default="validation")
    add_flag(validation, "validation_gallery_config", default="gallery",
             help="Configuration of --validation-data-dir holding the gallery (columns id, image_embeds). When the "
             "dataset has none, the gallery is every distinct reference and target embedding of the validation rows.")
    add_flag(validation, "validation_steps", type=POSITIVE_INT, default=None,
             help="Validate every N steps (and at the end).")
    add_flag(validation, "num_validation_queries", type=POSITIVE_INT, default=1000)
    add_flag(validation, "validation_batch_size", type=POSITIVE_INT, default=256)
    add_flag(validation, "validation_inference_steps", type=POSITIVE_INT, default=10)
    add_flag(validation, "validation_guidance_scale", type=argparse_type(check_float, float), default=7.5)
    add_flag(validation, "validation_image_guidance_scale", type=argparse_type(check_float, float), default=1.5)
    add_flag(validation, "validation_recall_ks", type=_recall_ks, default=(1, 5, 10), help="Comma-separated K.")


def _add_training_arguments(parser) -> None:
    training = parser.add_argument_group("training")
    add_flag(training, "output_dir", default="compodiff-model")
    add_flag(training, "gradient_checkpointing", action="store_true")
    add_flag(training, "scale_lr", action="store_true",
             help="Multiply the learning rate by batch size x accumulation x processes.")
    add_flag(training, "condition_dropout", default="disjoint", choices=["disjoint", "independent"],
             help="independent: the text and the image are each dropped with their probability, independently (the "
             "paper's: 0.1 each, masks never); disjoint: one draw picks text only, image only or both "
             "(diffusers_cir.training.ConditionDropout).")
    add_flag(training, "text_drop_prob", type=PROBABILITY, default=0.1, help="Text -> the \"\" encoding.")
    add_flag(training, "image_drop_prob", type=PROBABILITY, default=0.1, help="Reference image -> zeros.")
    add_flag(training, "both_drop_prob", type=PROBABILITY, default=0.1,
             help="Disjoint dropout only: both dropped (unconditional branch); independent dropout drops both in "
             "text x image of the rows.")
    add_flag(training, "allow_tf32", action="store_true")
    add_flag(training, "text_embedding_cache_size", type=NON_NEGATIVE_INT, default=0,
             help="Cache the text hidden states of up to N distinct texts (instruction data repeats texts a lot).")


def _add_lora_arguments(parser) -> None:
    lora = parser.add_argument_group("LoRA")
    add_flag(lora, "use_lora", action="store_true", help="Train LoRA adapters only (needs a pretrained model).")
    add_flag(lora, "lora_rank", type=POSITIVE_INT, default=4)
    add_flag(lora, "lora_alpha", type=POSITIVE_FLOAT, default=4.0,
             help="The adapter's output is scaled by alpha / rank.")
    add_flag(lora, "lora_dropout", type=DROPOUT, default=0.0, help="Dropout on the adapters' input, in [0, 1).")
    add_flag(lora, "lora_target_modules", type=_regex, default=DEFAULT_LORA_TARGETS,
             help="Regex of the linear layers to adapt (default: every attention and feed-forward projection).")


HELP_DESCRIPTION = """Train a CompoDiff prior (stage 1: text-to-image; stage 2: composed image retrieval).

The defaults are this script's own, chosen for short runs on small data (the demo, the tests, the synthetic worlds):
lr 1e-4, 256 rows per device, 10,000 steps, no weight decay, no dropout, no EMA, disjoint condition dropout (text 0.1 /
image 0.1 / both 0.1), 70% triplets + 30% text-to-image, random box masks, the stored instruction texts. They are kept
so that existing commands train as before. They are not the paper's: --recipe paper_stage1 | paper_stage2 |
paper_finetune sets the values the CompoDiff paper gives for each stage (flags given on the command line still win),
and --print-config shows every resolved value and where it came from."""


def _add_recipe_arguments(parser) -> None:
    recipe = parser.add_argument_group("recipe")
    add_flag(recipe, "recipe", type=recipe_name, default=None, metavar="{" + ",".join(PAPER_RECIPES) + "}",
             help="The CompoDiff paper's values for one stage (explicit flags win): "
             + " ".join(f"{name}: {value.description}" for name, value in PAPER_RECIPES.items()).replace("%", "%%"))
    add_flag(recipe, "print_config", action="store_true",
             help="Print the resolved configuration as JSON (every value and its source: command line, recipe or "
             "default) and exit without training.")


def build_argument_parser() -> argparse.ArgumentParser:
    parser = TrainingArgumentParser(description=HELP_DESCRIPTION, formatter_class=_HelpFormatter)
    _add_recipe_arguments(parser)
    _add_model_arguments(parser)
    _add_data_arguments(parser)
    _add_validation_arguments(parser)
    _add_training_arguments(parser)
    add_optimization_arguments(parser, max_train_steps=10000, lr_warmup_steps=500, max_grad_norm=1.0,
                               adam_weight_decay=0.0, seed=0)
    add_ema_arguments(parser)
    add_checkpointing_arguments(parser, checkpointing_steps=500)
    add_tracking_arguments(parser, report_to="auto", project_name="train_compodiff")
    _add_lora_arguments(parser)
    return parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, the description's paragraphs kept."""


def check_args(args: argparse.Namespace) -> None:
    """The checks between flags (each flag's own value is checked by its type); a ``ValueError`` naming them."""
    from .conditioning import ObjectiveRatios

    if args.train_data_dir is None:
        raise ValueError(f"{flag('train_data_dir')} is required: the triplet dataset to train on.")

    if (args.pretrained_model_name_or_path is None) == (args.transformer_config is None):
        raise ValueError(f"Pass exactly one of {flag('pretrained_model_name_or_path')} (start from a model) and "
                         f"{flag('transformer_config')} (train a new denoiser).")
    if args.transformer_config is not None and None in (args.text_encoder_name_or_path, args.tokenizer_name_or_path):
        raise ValueError(f"A new denoiser ({flag('transformer_config')}) needs {flag('text_encoder_name_or_path')} and "
                         f"{flag('tokenizer_name_or_path')} (the frozen CLIP text model it reads).")
    if args.use_lora and args.pretrained_model_name_or_path is None:
        raise ValueError(f"{flag('use_lora')} fine-tunes a trained prior: pass {flag('pretrained_model_name_or_path')}.")
    if args.use_lora and args.use_ema:
        raise ValueError(f"{flag('use_ema')} is not supported with {flag('use_lora')} (the adapter is small; save "
                         "checkpoints instead).")
    if args.condition_dropout == "independent" and args.both_drop_prob:
        raise ValueError(
            f"{flag('both_drop_prob')} is for {flag('condition_dropout')} disjoint; independent dropout drops both "
            f"conditions in {flag('text_drop_prob')} x {flag('image_drop_prob')} of the rows (got "
            f"{flag('both_drop_prob')} {args.both_drop_prob})."
        )
    if args.keyword_swap_prob and not args.redraw_keyword_instructions:
        raise ValueError(f"{flag('keyword_swap_prob')} needs {flag('redraw_keyword_instructions')}: a swapped keyword "
                         "triplet needs an instruction for the swapped edit, drawn from the templates.")
    if args.total_batch_size is not None and args.train_batch_size is not None:
        raise ValueError(f"Pass one of {flag('train_batch_size')} (per device) and {flag('total_batch_size')} (over all "
                         "processes and accumulation steps).")
    drops = (args.text_drop_prob, args.image_drop_prob, args.both_drop_prob)
    if args.condition_dropout == "disjoint" and sum(drops) > 1.0 + 1e-9:
        raise ValueError(
            f"{flag('text_drop_prob')} + {flag('image_drop_prob')} + {flag('both_drop_prob')} must sum to at most 1 "
            f"(they are disjoint events), got {' + '.join(map(str, drops))} = {sum(drops):g}."
        )
    ratios = ObjectiveRatios.parse(args.objective_ratios)
    if ratios.probabilities["masked"] > 0 and args.dataset_config_name != "images" and (
        args.masked_objective_masks != "data"
    ):
        raise ValueError(
            f"The masked objective with random boxes encodes masked target images on the fly: it needs "
            f"{flag('dataset_config_name')} images (got {args.dataset_config_name!r}). Use the data's precomputed masks "
            f"and masked embeddings ({flag('masked_objective_masks')} data, after examples/precompute_masks.py), or "
            f"set its ratio to 0 in {flag('objective_ratios')} ({args.objective_ratios!r})."
        )
    if args.text_to_image_data_dir is not None:
        if args.stage != "triplet":
            raise ValueError(f"{flag('text_to_image_data_dir')} mixes caption data into stage 2 ({flag('stage')} "
                             f"triplet); for stage 1 pass the caption data as {flag('train_data_dir')}.")
        if ratios.caption_row_probability in (0.0, 1.0):
            raise ValueError(
                f"{flag('text_to_image_data_dir')} needs a text_to_image (or masked) share strictly between 0 and 1 in "
                f"{flag('objective_ratios')}, got {args.objective_ratios!r}."
            )


def resolve_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace, dict]:
    """The parser, the arguments resolved with the ``--recipe`` (command line > recipe > default; see
    :mod:`.recipes`) and where each value came from. Nothing is checked yet besides each flag's own value."""
    parser = build_argument_parser()
    args, sources = parse_with_recipe(parser, argv)
    if args.condition_dropout == "independent" and sources["both_drop_prob"] == "default":
        args.both_drop_prob, sources["both_drop_prob"] = 0.0, "default (independent dropout)"
    if args.total_batch_size is not None and sources["train_batch_size"] == "default":
        args.train_batch_size, sources["train_batch_size"] = None, "from --total-batch-size"
    elif sources.get("total_batch_size") not in ("command line", "default"):  # the recipe's total, a per-device given
        args.total_batch_size, sources["total_batch_size"] = None, "dropped: --train-batch-size given"
    return parser, args, sources


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The checked arguments; a bad one exits with a one-line ``error:`` (status 2) before anything is loaded.
    ``--print-config`` prints the resolved configuration as JSON and exits (status 0) before the checks."""
    parser, args, sources = resolve_args(argv)
    if args.print_config:
        print(json.dumps(config_report(args, sources, skip=("print_config",)), indent=2))
        parser.exit(0)
    with usage_errors(parser):
        check_args(args)
        check_output_dir(args.output_dir, args.resume_from_checkpoint, args.max_train_steps, RUN_OUTPUTS)
    return args


def embedding_scale(args: argparse.Namespace, embedding_dim: int) -> float | None:
    """The factor of ``--embedding-scale`` (``None``: targets used as stored)."""
    if args.embedding_scale == "auto":
        return math.sqrt(embedding_dim)
    return None if args.embedding_scale == "none" else float(args.embedding_scale)


def recall_ks_text(args: argparse.Namespace) -> str:
    return ",".join(map(str, args.validation_recall_ks))

