# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""The accelerator, logging and experiment trackers of a training run (both trainers)."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os

__all__ = ["configure_logging", "create_accelerator", "init_trackers", "report_to_type", "resolve_report_to"]


def report_to_type(text: str) -> str:
    """argparse type of ``--report-to``: a tracker accelerate knows and whose package is installed (accelerate itself
    only warns about a missing one, then logs nothing), or ``auto`` / ``none`` / ``all``."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    trackers = [tracker.value for tracker in LoggerType if tracker != LoggerType.ALL]
    accepted = ["auto", "none", "all", *trackers]
    if text not in accepted:
        raise argparse.ArgumentTypeError(f"expected one of {accepted}, got {text!r}")
    if text in trackers and text not in {LoggerType(tracker).value for tracker in get_available_trackers()}:
        raise argparse.ArgumentTypeError(
            f"{text!r}: the {text} package is not installed, so nothing would be logged. Install it, or pass "
            "--report-to none (or auto: tensorboard when installed)"
        )
    return text


def resolve_report_to(report_to: str) -> str | None:
    """What accelerate's ``log_with`` gets: ``auto`` is tensorboard when installed, else nothing."""
    if report_to == "auto":
        for module in ("tensorboard", "tensorboardX"):
            if importlib.util.find_spec(module) is not None:
                return "tensorboard"
        return None
    return None if report_to == "none" else report_to


def create_accelerator(args: argparse.Namespace):
    """An ``Accelerator`` for ``args`` (accumulation, precision, trackers, ``--output-dir``/``--logging-dir``)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=resolve_report_to(args.report_to),
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
    )


def configure_logging(accelerator) -> None:
    """Log lines with time and level; the libraries' own logs at warning level on the local main process only."""
    import datasets
    import diffusers
    import transformers

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    main = accelerator.is_local_main_process
    for library in (datasets, transformers):
        (library.utils.logging.set_verbosity_warning if main else library.utils.logging.set_verbosity_error)()
    (diffusers.utils.logging.set_verbosity_info if main else diffusers.utils.logging.set_verbosity_error)()


def init_trackers(accelerator, args: argparse.Namespace) -> None:
    """Start the trackers on the main process, with every argument as the run's configuration."""
    if accelerator.is_main_process:
        config = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
                  for key, value in vars(args).items()}
        accelerator.init_trackers(args.tracker_project_name, config)
