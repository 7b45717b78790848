# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""What a trainer may do with its ``--output-dir``: the same policy for both trainers, checked before any work.

- A new run (no ``--resume-from-checkpoint``) into a folder holding an earlier run's checkpoints is refused: its
  checkpoints would mix with the old ones, and ``latest`` could later resume the old run.
- A new run (also ``latest`` when there is no checkpoint yet) into a folder holding an earlier run's final model or
  validation results is refused: it would overwrite that model and mix its results with the earlier ones.
- A checkpoint past ``--max-train-steps`` is refused: there is nothing left to train, and its weights would be saved
  as a final model of more steps than asked for.
"""

from __future__ import annotations

from pathlib import Path

from .arguments import flag
from .checkpoints import checkpoint_step, list_checkpoints, resolve_resume_checkpoint

__all__ = ["check_output_dir"]


def check_output_dir(
    output_dir: str, resume_from_checkpoint: str | None, max_train_steps: int, run_outputs: tuple[str, ...]
) -> Path | None:
    """The checkpoint to resume from (``None``: a new run), or a ``ValueError`` naming the flags and what to do.
    ``run_outputs`` are the file names a finished run leaves in ``output_dir``."""
    checkpoint = resolve_resume_checkpoint(output_dir, resume_from_checkpoint)
    if checkpoint is not None:
        _check_not_past_the_end(output_dir, resume_from_checkpoint, checkpoint, max_train_steps)
        return checkpoint
    if resume_from_checkpoint is None:
        earlier = list_checkpoints(output_dir)
        if earlier:
            raise ValueError(
                f"{flag('output_dir')} {output_dir!r} already holds checkpoints of an earlier run "
                f"({', '.join(path.name for _, path in earlier)}) and {flag('resume_from_checkpoint')} is not set: pass "
                f"{flag('resume_from_checkpoint')} latest to continue that run, or choose another {flag('output_dir')} "
                "(or delete those checkpoints) to start a new one."
            )
    found = [name for name in run_outputs if (Path(output_dir) / name).exists()]
    if found:
        raise ValueError(
            f"{flag('output_dir')} {output_dir!r} already holds the outputs of an earlier run ({', '.join(found)}) and "
            "there is no checkpoint to resume from: a new run would overwrite that model and mix its validation results "
            f"with the earlier ones. Choose another {flag('output_dir')}, or delete them to start over."
        )
    return None


def _check_not_past_the_end(output_dir: str, flag_value: str, checkpoint: Path, max_train_steps: int) -> None:
    step = checkpoint_step(checkpoint)
    if step <= max_train_steps:
        return
    earlier = [path.name for other, path in list_checkpoints(output_dir) if other <= max_train_steps]
    raise ValueError(
        f"{flag('resume_from_checkpoint')} {flag_value!r} is {checkpoint.name}, at step {step}, past "
        f"{flag('max_train_steps')} {max_train_steps}: there is nothing left to train, and its weights are not those "
        f"of step {max_train_steps}. Raise {flag('max_train_steps')} above {step} to train on, or resume from a "
        f"checkpoint at or before step {max_train_steps} ("
        + (", ".join(earlier) if earlier else f"{output_dir!r} has none") + ")."
    )
