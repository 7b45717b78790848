# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Training recipes: named sets of flag values, and how a command line is resolved with one.

The CompoDiff trainer's defaults are this package's own, chosen for short runs on small data (a demo, a test, the
synthetic worlds); they are not the paper's. ``--recipe paper_stage1 | paper_stage2 | paper_finetune`` sets the values
the CompoDiff paper (Gu et al., arXiv 2303.11916, TMLR 2024) gives for its three stages. Every value below is checked
against the paper's text; where it comes from:

* the appendix's hyperparameter table ("Implementation details": columns Stage1, Stage2, Fine-tuning): batch size
  4096 / 2048 / 2048, iterations 1M / 200K / 50K, learning rate 1e-4 / 1e-5 / 1e-5, dropout 0.1, weight decay 6.0e-2,
  AdamW, EMA decay 0.9999, 10 DDIM sampling steps, a denoiser of depth 12 with 16 heads of 64 channels, CLIP-L/14
  image and text encoders; the conditions are the text (stage 1), text + reference image + mask (stage 2), text +
  reference image (fine-tuning). The text below the table: AdamW's betas (0.9, 0.999); "the text as a condition can
  vary each time in training according to the 47 templates"; for keyword-based triplets "we are able to randomly
  switch query and modified images during training" (the paper gives no probability: 0.5 here);
* section "Training": stage 2 mixes text-to-image learning and inpainting "each accounting for 30%, and the remaining
  40% of training done on the triplet dataset", text-to-image and inpainting on LAION image-text pairs; masks are
  ClipSeg segmentations of the caption's object terms, resized to 64x64;
* section "Inference": "we randomly drop each condition in stage 1 and stage 2 with 10% probability, except mask
  conditions"; (w_I, w_T) = (1.5, 7.5) (used here for validation).

The paper leaves open the LR schedule and warmup, gradient clipping, mixed precision and how the 30% inpainting rows
are built from LAION pairs (this package's masked objective: see :mod:`diffusers_cir.training.conditioning`); a
recipe keeps this script's defaults for those, and ``--print-config`` says which values came from where.

Resolution: a flag given on the command line wins, then the recipe's value, then the parser's default. "Given" means
present in ``argv`` (spelled either way), whatever its value, so ``--learning-rate 1e-4`` with ``paper_stage2`` keeps
1e-4 even though it equals the default.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "PAPER_RECIPES",
    "UNSET",
    "TrainingRecipe",
    "config_report",
    "get_recipe",
    "parse_with_recipe",
    "recipe_name",
]

PAPER_CLIP = "openai/clip-vit-large-patch14"  # the paper's CLIP-L/14 (image and text encoder of every stage)


class _Unset:
    """The value of a flag that was not given (argparse's defaults are filled in after the recipe's)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset()


@dataclass(frozen=True)
class TrainingRecipe:
    """A named set of flag values.

    Args:
        name: what ``--recipe`` takes.
        description: one line for ``--help`` and ``--print-config``.
        values: flag destination -> value, applied where the flag was not given.
        new_model_values: values that only apply when the run does not start from ``--pretrained-model-name-or-path``
            (the architecture and the encoders of a model trained from scratch), given the resolved arguments.
        notes: what the recipe cannot set (data the paper trained on), printed with the configuration.
    """

    name: str
    description: str
    values: Mapping[str, Any]
    new_model_values: Callable[[argparse.Namespace], Mapping[str, Any]] = field(default=lambda args: {})
    notes: tuple[str, ...] = ()


# In every stage (hyperparameter table, "Inference" section for the condition dropout).
_ALL_STAGES = {
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_weight_decay": 6e-2,
    "transformer_dropout": 0.1,
    "use_ema": True,
    "ema_decay": 0.9999,
    "condition_dropout": "independent",
    "text_drop_prob": 0.1,
    "image_drop_prob": 0.1,
    "both_drop_prob": 0.0,
    "validation_inference_steps": 10,
    "validation_guidance_scale": 7.5,
    "validation_image_guidance_scale": 1.5,
}


def _paper_new_model(args: argparse.Namespace) -> dict[str, Any]:
    """A denoiser of the paper's shape reading CLIP-L/14 text, for a run that does not start from a trained model."""
    values = {
        "transformer_config": {"num_layers": 12, "num_attention_heads": 16, "attention_head_dim": 64},
        "text_encoder_name_or_path": PAPER_CLIP,
        "tokenizer_name_or_path": PAPER_CLIP,
    }
    if args.dataset_config_name == "images":  # the embeddings configuration holds CLIP-L/14 embeddings already
        values["image_encoder_name_or_path"] = PAPER_CLIP
    return values


_LAION_NOTE = (
    "The paper trains text-to-image and inpainting on LAION-2B English image-text pairs: pass such data as "
    "--text-to-image-data-dir, or those rows are made from the triplets' target captions."
)

PAPER_RECIPES: dict[str, TrainingRecipe] = {
    recipe.name: recipe
    for recipe in (
        TrainingRecipe(
            name="paper_stage1",
            description="CompoDiff stage 1: text-to-image prior (batch 4096, 1M iterations, lr 1e-4).",
            values={**_ALL_STAGES, "stage": "text_to_image", "total_batch_size": 4096, "max_train_steps": 1_000_000,
                    "learning_rate": 1e-4},
            new_model_values=_paper_new_model,
            notes=("The paper trains stage 1 on LAION-2B English image-text pairs (--train-data-dir).",),
        ),
        TrainingRecipe(
            name="paper_stage2",
            description=("CompoDiff stage 2: 40% triplets, 30% text-to-image, 30% inpainting with ClipSeg masks "
                         "(batch 2048, 200K iterations, lr 1e-5)."),
            values={**_ALL_STAGES, "stage": "triplet", "objective_ratios": "triplet=0.4,text_to_image=0.3,masked=0.3",
                    "masked_objective_masks": "data", "redraw_keyword_instructions": True, "keyword_swap_prob": 0.5,
                    "total_batch_size": 2048, "max_train_steps": 200_000, "learning_rate": 1e-5},
            new_model_values=_paper_new_model,
            notes=(
                "Stage 2 starts from a stage-1 model: pass it as --pretrained-model-name-or-path.",
                _LAION_NOTE,
                ("Inpainting rows need ClipSeg masks in the data: examples/precompute_masks.py computes them once "
                 "(examples/precompute_embeddings.py then carries them into the embeddings)."),
            ),
        ),
        TrainingRecipe(
            name="paper_finetune",
            description=("CompoDiff fine-tuning on FashionIQ or CIRR: text and reference conditions (batch 2048, "
                         "50K iterations, lr 1e-5)."),
            values={**_ALL_STAGES, "stage": "triplet", "objective_ratios": "triplet=1", "total_batch_size": 2048,
                    "max_train_steps": 50_000, "learning_rate": 1e-5},
            new_model_values=_paper_new_model,
            notes=("Fine-tuning starts from the stage-2 model: pass it as --pretrained-model-name-or-path, and the "
                   "FashionIQ or CIRR training triplets as --train-data-dir.",),
        ),
    )
}


def recipe_name(text: str) -> str:
    """argparse type of ``--recipe``: a recipe name (``paper-stage2`` is read as ``paper_stage2``)."""
    name = text.strip().replace("-", "_")
    if name not in PAPER_RECIPES:
        raise argparse.ArgumentTypeError(f"expected one of {sorted(PAPER_RECIPES)}, got {text!r}")
    return name


def get_recipe(name: str) -> TrainingRecipe:
    return PAPER_RECIPES[recipe_name(name)]


def _default_of(action: argparse.Action) -> Any:
    """What argparse itself would have set: string defaults go through the flag's type."""
    default = action.default
    if isinstance(default, str) and callable(action.type):
        return action.type(default)
    return default


def parse_with_recipe(
    parser: argparse.ArgumentParser, argv: list[str] | None = None
) -> tuple[argparse.Namespace, dict[str, str]]:
    """Parse ``argv`` and resolve every flag: given on the command line, else the ``--recipe``'s value, else the
    parser's default. Returns the arguments and, per destination, where its value came from (``"command line"``,
    the recipe's name, or ``"default"``). The parser needs a ``recipe`` flag."""
    actions = [action for action in parser._actions
               if action.dest != argparse.SUPPRESS and action.default is not argparse.SUPPRESS]
    args = parser.parse_args(argv, argparse.Namespace(**{action.dest: UNSET for action in actions}))
    sources = {action.dest: "command line" for action in actions if getattr(args, action.dest) is not UNSET}
    recipe = None if args.recipe in (UNSET, None) else PAPER_RECIPES[args.recipe]

    def fill(values: Mapping[str, Any], over: str | None = None) -> None:
        """Set the flags of ``values`` whose source is ``over`` (None: not resolved yet)."""
        for dest, value in values.items():
            assert hasattr(args, dest), f"the recipe sets {dest!r}, which is no flag of this parser"
            if sources.get(dest) == over:
                setattr(args, dest, value)
                sources[dest] = recipe.name

    if recipe is not None:
        fill(recipe.values)
    for action in actions:
        if getattr(args, action.dest) is UNSET:
            setattr(args, action.dest, _default_of(action))
            sources[action.dest] = "default"
    if recipe is not None and args.pretrained_model_name_or_path is None:
        fill(recipe.new_model_values(args), over="default")
    return args, {action.dest: sources[action.dest] for action in actions}


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def config_report(args: argparse.Namespace, sources: Mapping[str, str], skip: tuple[str, ...] = ()) -> dict:
    """What ``--print-config`` prints: the recipe, every resolved value and where it came from, and the recipe's
    notes (JSON-serialisable)."""
    recipe = None if args.recipe is None else PAPER_RECIPES[args.recipe]
    names = [dest for dest in sources if dest not in skip]
    report = {
        "recipe": None if recipe is None else recipe.name,
        "description": None if recipe is None else recipe.description,
        "config": {dest: _jsonable(getattr(args, dest)) for dest in names},
        "sources": {dest: sources[dest] for dest in names},
        "notes": [] if recipe is None else list(recipe.notes),
    }
    json.dumps(report)  # every value must print
    return report
