# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""What every trainer does after an optimiser step: checkpoint, validate, and stop early when asked."""

from __future__ import annotations

import time
from typing import Any, Callable

from .checkpoints import save_checkpoint


def after_step(
    run: Any, global_step: int, first_step: int, train_start: float, validate: Callable, last_metrics: dict | None
) -> tuple[bool, dict | None]:
    """Run the step cadence of ``run`` (a trainer's run object with ``args``, ``accelerator``, ``state`` and
    ``validation_seconds``): a checkpoint every ``--checkpointing-steps`` and at an early stop, a validation every
    ``--validation-steps`` and at the last step (timed without earlier validations), and ``--stop-after-steps``.

    Returns ``(stop now, the last validation metrics)``.
    """
    args = run.args
    stopping = args.stop_after_steps is not None and global_step - first_step >= args.stop_after_steps
    stop_early = stopping and global_step < args.max_train_steps
    if global_step % args.checkpointing_steps == 0 or stop_early:
        save_checkpoint(run.accelerator, args.output_dir, global_step, args.checkpoints_total_limit, run.state)
    if args.validation_steps is not None and (
        global_step % args.validation_steps == 0 or global_step == args.max_train_steps
    ):
        last_metrics = validate(run, global_step, time.perf_counter() - train_start - run.validation_seconds)
    return stop_early, last_metrics
