# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Command-line arguments both trainers share, and how they report a bad one.

Flags are kebab-case (``--max-train-steps``); the snake_case spelling each flag had (``--max_train_steps``) stays an
alias. Values are checked while the command line is read, with :mod:`diffusers_cir.checks`, and every argument error
(a bad value, flags that cannot go together, an output folder that would mix two runs) is one line
``<script>: error: <message>`` on stderr with exit status 2, before anything is loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import json

from ..checks import argparse_type, check_float, check_int, check_probability

__all__ = [
    "DROPOUT",
    "LR_SCHEDULERS",
    "NON_NEGATIVE_FLOAT",
    "NON_NEGATIVE_INT",
    "POSITIVE_FLOAT",
    "POSITIVE_INT",
    "PROBABILITY",
    "SEED",
    "TrainingArgumentParser",
    "add_checkpointing_arguments",
    "add_ema_arguments",
    "add_flag",
    "add_optimization_arguments",
    "add_tracking_arguments",
    "flag",
    "json_object",
    "lr_warmup_warning",
    "usage_errors",
]

# diffusers.optimization.get_scheduler names that need no more arguments than the trainers pass (not
# "piecewise_constant": it needs step rules).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")

POSITIVE_INT = argparse_type(check_int, minimum=1)
NON_NEGATIVE_INT = argparse_type(check_int, minimum=0)
# accelerate's set_seed seeds numpy, whose seeds end at 2**32 - 1.
SEED = argparse_type(check_int, minimum=0, maximum=2**32 - 1)
POSITIVE_FLOAT = argparse_type(check_float, float, minimum=0.0, exclusive_minimum=True)
NON_NEGATIVE_FLOAT = argparse_type(check_float, float, minimum=0.0)
PROBABILITY = argparse_type(check_probability, float)
DROPOUT = argparse_type(check_probability, float, allow_one=False)  # [0, 1): a rate of 1 drops everything


class TrainingArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error convention: one line ``<prog>: error: <message>``, exit status 2 (argparse
    itself prints the whole usage first, 40 lines for the CompoDiff trainer, which hides the message)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


@contextlib.contextmanager
def usage_errors(parser: argparse.ArgumentParser):
    """Report a ``ValueError`` raised by the checks in the block as an argument error of ``parser``."""
    try:
        yield
    except ValueError as error:
        parser.error(str(error))


def flag(dest: str) -> str:
    """How messages name the flag of ``dest``: ``max_train_steps`` -> ``--max-train-steps``."""
    return "--" + dest.replace("_", "-")


def add_flag(group, dest: str, *aliases: str, **kwargs) -> argparse.Action:
    """``--kebab-case`` flag of ``dest``, with ``--snake_case`` (and ``aliases``) accepted too."""
    names = [flag(dest)]
    for name in ("--" + dest, *aliases):
        if name not in names:
            names.append(name)
    return group.add_argument(*names, dest=dest, **kwargs)


def json_object(text: str) -> dict:
    """argparse type: a JSON object (``'{"modification_text": "edit"}'``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} (not valid JSON: {error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def add_optimization_arguments(
    parser: argparse.ArgumentParser,
    *,
    max_train_steps: int,
    lr_warmup_steps: int,
    max_grad_norm: float | None,
    adam_weight_decay: float,
    seed: int | None,
    weight_decay_aliases: tuple[str, ...] = (),
) -> argparse._ArgumentGroup:
    """Steps, AdamW, LR schedule, gradient clipping, mixed precision and seed (defaults differ per trainer)."""
    group = parser.add_argument_group("optimization")
    add_flag(group, "max_train_steps", type=POSITIVE_INT, default=max_train_steps, help="Optimizer steps.")
    add_flag(group, "gradient_accumulation_steps", type=POSITIVE_INT, default=1)
    add_flag(group, "learning_rate", type=POSITIVE_FLOAT, default=1e-4)
    add_flag(group, "lr_scheduler", default="constant_with_warmup", choices=LR_SCHEDULERS,
             help="diffusers.optimization.get_scheduler name.")
    add_flag(group, "lr_warmup_steps", type=NON_NEGATIVE_INT, default=lr_warmup_steps)
    add_flag(group, "adam_beta1", type=argparse_type(check_float, float, minimum=0.0, maximum=1.0,
                                                     exclusive_maximum=True), default=0.9)
    add_flag(group, "adam_beta2", type=argparse_type(check_float, float, minimum=0.0, maximum=1.0,
                                                     exclusive_maximum=True), default=0.999)
    add_flag(group, "adam_weight_decay", *weight_decay_aliases, type=NON_NEGATIVE_FLOAT, default=adam_weight_decay)
    add_flag(group, "adam_epsilon", type=NON_NEGATIVE_FLOAT, default=1e-8)
    add_flag(group, "max_grad_norm", type=NON_NEGATIVE_FLOAT, default=max_grad_norm,
             help="Gradient clipping norm; 0 (or leaving it unset where the default is none) turns clipping off.")
    add_flag(group, "mixed_precision", default=None, choices=["no", "fp16", "bf16"],
             help="Overrides the accelerate config.")
    add_flag(group, "seed", type=SEED, default=seed, help="In [0, 2**32 - 1] (numpy's seed range).")
    return group


def add_ema_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("EMA")
    add_flag(group, "use_ema", action=argparse.BooleanOptionalAction, default=False,
             help="Keep an EMA of the weights (checkpointed, saved as the model); --no-use-ema turns off a recipe's.")
    add_flag(
        group, "ema_decay", type=PROBABILITY, default=0.9999,
        help="Upper bound, in [0, 1], of the EMA decay: diffusers' EMAModel raises the per-step decay along "
        "(1 + step) / (10 + step) (or the --ema-warmup curve) and caps it here; 0 makes the EMA the weights themselves.",
    )
    add_flag(group, "ema_warmup", action="store_true",
             help="EMA decay warm-up (1 - (1 + step/inv_gamma)^-power), useful for short runs.")
    return group


def add_checkpointing_arguments(
    parser: argparse.ArgumentParser, *, checkpointing_steps: int | None
) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("checkpointing")
    add_flag(group, "checkpointing_steps", type=POSITIVE_INT, default=checkpointing_steps,
             help="Save a checkpoint-<step> folder every N steps.")
    add_flag(group, "checkpoints_total_limit", type=POSITIVE_INT, default=None, help="Keep at most N checkpoints.")
    add_flag(
        group, "resume_from_checkpoint", default=None,
        help='"latest" or a checkpoint folder name/path. "latest" with no checkpoint starts a new run. Without it, an '
        "--output-dir that already holds checkpoints is refused (a new run would mix its checkpoints with them), and so "
        "is a checkpoint past --max-train-steps. A new run is also refused where an earlier one left its final model "
        "or validation results. Checkpoints are verified against the checksums written with them.",
    )
    add_flag(
        group, "stop_after_steps", type=POSITIVE_INT, default=None,
        help="Stop this invocation after N optimizer steps (counted from where it started) with a checkpoint and no "
        "final save, for time-limited jobs: the next one continues with --resume-from-checkpoint latest.",
    )
    return group


def add_tracking_arguments(
    parser: argparse.ArgumentParser, *, report_to: str, project_name: str
) -> argparse._ArgumentGroup:
    from .trackers import report_to_type

    group = parser.add_argument_group("logging")
    add_flag(
        group, "report_to", type=report_to_type, default=report_to,
        help='"auto" (tensorboard when installed, else none), "none", "all" (every installed tracker), or one tracker '
        'accelerate supports and that is installed ("tensorboard", "wandb", "mlflow", ...).',
    )
    add_flag(group, "tracker_project_name", default=project_name)
    add_flag(group, "logging_dir", default="logs", help="Tracker logs, relative to --output-dir.")
    return group


def lr_warmup_warning(args: argparse.Namespace) -> str | None:
    """What to warn about when the warmup outlasts the run: the learning rate would still be rising at the last step.

    A warning, not an error: a short run with the warmup of the full one (a smoke test) can be intentional. The
    ``constant`` scheduler has no warmup, so there is nothing to say about it.
    """
    if args.lr_scheduler == "constant" or args.lr_warmup_steps <= args.max_train_steps:
        return None
    return (
        f"{flag('lr_warmup_steps')} {args.lr_warmup_steps} is larger than {flag('max_train_steps')} "
        f"{args.max_train_steps}: the learning rate is still warming up when training ends and never reaches its peak "
        f"({flag('learning_rate')} {args.learning_rate:g}{' scaled by --scale-lr' if getattr(args, 'scale_lr', False) else ''}), "
        f"only about {args.max_train_steps / args.lr_warmup_steps:.0%} of it. Lower {flag('lr_warmup_steps')} if that "
        "is not intended."
    )
