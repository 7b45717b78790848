# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Training checkpoints of both trainers: ``checkpoint-<step>`` folders, saved whole or not at all, verified on resume.

A checkpoint is ``accelerator.save_state`` (model as safetensors; optimizer, LR scheduler and accelerate's RNG file,
all read back with ``weights_only=True``) plus the loop's own state (:class:`CheckpointState`: data positions,
noise generators, EMA, every global random state) as safetensors + JSON, plus ``checksums.json``. It is written to
``checkpoint-<step>.partial`` and renamed once every rank has written and the checksums are on disk, so ``latest``
never picks a checkpoint a killed run left half-written. A method may narrow the model file to what trains through
accelerate's save/load pre-hooks (FashionBLIP-2:
:func:`~diffusers_cir.training.fashionblip2.register_checkpoint_hooks`); a checkpoint that is sound but made for
another setup raises :class:`CheckpointMismatchError`.

Resuming verifies the checksums first (a file changed after saving is refused by name, even at the same size), then
loads. Checkpoints of earlier versions (``loop_state_N.pt`` and ``custom_checkpoint_N.pkl`` pickles, no checksums)
are read through torch's restricted unpickler (``weights_only=True``), which refuses anything but plain data: a
crafted pickle is an error, never code that runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from ..utils.checksums import MANIFEST_NAME, read_manifest, verify_manifest, write_manifest
from .arguments import flag
from .state import (
    GeneratorState,
    load_state_files,
    random_states,
    save_state_files,
    set_random_states,
    state_file_names,
)

logger = logging.getLogger("diffusers_cir.training")

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
LOOP_STATE = "loop_state_{rank}"
SHARED_STATE = "shared_state"
_LEGACY_LOOP_STATE = "loop_state_{rank}.pt"
_LEGACY_CUSTOM = "custom_checkpoint_{index}.pkl"
_ACCELERATE_CUSTOM = re.compile(r"^custom_checkpoint_\d+\.pkl$")


class CheckpointMismatchError(ValueError):
    """A sound checkpoint that this run cannot continue (it was made with another base model or other settings):
    resuming from another checkpoint of the run would not help, so the message says what to change instead."""


def checkpoint_step(path: str | os.PathLike) -> int:
    return int(CHECKPOINT_PATTERN.match(Path(path).name).group(1))


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
    """The folder ``--resume-from-checkpoint`` names (``latest``: the newest complete one, ``None`` if there is none)."""
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
            f"{flag('resume_from_checkpoint')} {resume_from_checkpoint!r} is not a checkpoint-<step> folder (looked in "
            f"{resume_from_checkpoint!r} and {str(Path(output_dir) / resume_from_checkpoint)!r})."
        )
    return path


def prune_checkpoints(output_dir: str, total_limit: int | None) -> None:
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


class CheckpointState:
    """The loop's own part of a checkpoint: named objects with ``state_dict`` / ``load_state_dict``.

    ``per_rank`` objects (data positions, noise generators) are saved by every rank in ``loop_state_<rank>``, with
    that rank's global random states; shared objects (the EMA, the same on every rank) once, in ``shared_state``.
    ``legacy_custom`` marks the objects an earlier version registered with accelerate, in registration order (their
    ``custom_checkpoint_<i>.pkl`` files).
    """

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.per_rank: dict[str, Any] = {}
        self.shared: dict[str, Any] = {}
        self.legacy_custom: list[str] = []

    def register(self, name: str, obj, *, per_rank: bool, legacy_custom: bool = False) -> None:
        assert name not in self.per_rank and name not in self.shared, name
        (self.per_rank if per_rank else self.shared)[name] = obj
        if legacy_custom:
            self.legacy_custom.append(name)

    def save(self, folder: str | os.PathLike) -> None:
        rank = self.accelerator.process_index
        objects = {name: obj.state_dict() for name, obj in self.per_rank.items()}
        save_state_files(folder, LOOP_STATE.format(rank=rank), {"objects": objects, "random": random_states()})
        if self.shared and self.accelerator.is_main_process:
            save_state_files(folder, SHARED_STATE, {name: obj.state_dict() for name, obj in self.shared.items()})

    def load(self, folder: str | os.PathLike) -> None:
        """Restore every object and this rank's random states (after ``accelerator.load_state``, whose RNG file this
        overrides)."""
        folder = Path(folder)
        rank, processes = self.accelerator.process_index, self.accelerator.num_processes
        written = sorted(folder.glob(LOOP_STATE.format(rank="*") + ".json"))
        if len(written) != processes:
            raise FileNotFoundError(
                f"{folder} holds the loop state of {len(written)} process(es), this run has {processes}: resume with "
                f"the number of processes that wrote it." if written else
                f"{folder / state_file_names(LOOP_STATE.format(rank=rank))[0]} is missing: the checkpoint is incomplete."
            )
        state = load_state_files(folder, LOOP_STATE.format(rank=rank))
        self._load_objects(self.per_rank, state["objects"], folder / f"loop_state_{rank}.json")
        if self.shared:
            self._load_objects(self.shared, load_state_files(folder, SHARED_STATE), folder / f"{SHARED_STATE}.json")
        set_random_states(state["random"])

    @staticmethod
    def _load_objects(objects: dict, states: dict, source: Path) -> None:
        for name, obj in objects.items():
            if name not in states:
                raise KeyError(f"{source} has no state for {name!r}: was it saved with other arguments?")
            obj.load_state_dict(states[name])

    def load_legacy(self, folder: Path) -> None:
        """Read a checkpoint of an earlier version through torch's restricted unpickler (plain data only)."""
        rank = self.accelerator.process_index
        loop_path = folder / _LEGACY_LOOP_STATE.format(rank=rank)
        states = _restricted_load(loop_path) if loop_path.is_file() else {}
        for index, name in enumerate(self.legacy_custom):
            path = folder / _LEGACY_CUSTOM.format(index=index)
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: the checkpoint is incomplete.")
            states[name] = _restricted_load(path)
        for name, obj in {**self.per_rank, **self.shared}.items():
            if name not in states:  # e.g. LinCIR's noise generator, which earlier versions did not save
                logger.warning("%s (an earlier version's checkpoint) has no state for %r: it continues from this run's "
                               "start, so the resumed run is not exactly the uninterrupted one.", folder, name)
                continue
            value = states[name]
            if isinstance(obj, GeneratorState) and not isinstance(value, dict):
                value = {"state": value}  # earlier versions stored the bare generator state
            obj.load_state_dict(value)
        # The global random states come from accelerate's RNG file, which load_state has already applied.


def _restricted_load(path: Path):
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:  # code in it, or a damaged file
        raise ValueError(
            f"{path} (an earlier version's pickle) cannot be read as plain data with torch's restricted unpickler "
            f"(weights_only=True), so it is not read at all: {type(error).__name__}: {error}"
        ) from None


def _is_legacy(folder: Path) -> bool:
    return any(folder.glob("loop_state_*.pt")) or any(folder.glob("custom_checkpoint_*.pkl"))


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: int | None, state: CheckpointState) -> Path:
    """``accelerator.save_state`` and ``state`` into ``checkpoint-<step>.partial``, checksums, then the rename, so
    that a run killed while saving never leaves a checkpoint that ``latest`` would pick."""
    final = Path(output_dir) / f"checkpoint-{step}"
    partial = Path(output_dir) / f"checkpoint-{step}.partial"
    if accelerator.is_main_process:
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    state.save(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_manifest(partial)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        logger.info("Saved state to %s", final)
    accelerator.wait_for_everyone()
    return final


def verify_checkpoint(folder: Path) -> tuple[bool, list[str]]:
    """Check the checksums of ``folder``. Returns whether it is an earlier version's checkpoint (no checksums to
    check) and the files accelerate may read: those the manifest lists (an earlier version's: all of them), never an
    earlier version's ``custom_checkpoint_N.pkl``."""
    manifest = read_manifest(folder)
    if manifest is None:
        if not _is_legacy(folder):
            raise FileNotFoundError(f"{folder / MANIFEST_NAME} is missing: the checkpoint is incomplete.")
        logger.warning("%s was written by an earlier version, without checksums: its files are not verified.", folder)
        names = [path.name for path in folder.iterdir() if path.is_file()]
        return True, [name for name in names if not _ACCELERATE_CUSTOM.match(name)]
    verify_manifest(folder)
    unlisted = sorted(
        path.relative_to(folder).as_posix() for path in folder.rglob("*")
        if path.is_file() and path.name != MANIFEST_NAME and path.relative_to(folder).as_posix() not in manifest["files"]
    )
    if unlisted:
        logger.warning("%s holds files the training run did not write (not read): %s", folder, ", ".join(unlisted))
    return False, [name for name in manifest["files"] if not _ACCELERATE_CUSTOM.match(name)]


@contextlib.contextmanager
def _view_of(folder: Path, names: list[str]):
    """A temporary folder of links to ``names`` in ``folder``, for ``accelerator.load_state``: accelerate refuses a
    folder holding ``custom_checkpoint_N.pkl`` files when no object is registered (as here: the loop state is not
    accelerate's), and should read only the files that were verified."""
    with tempfile.TemporaryDirectory(prefix=f"{folder.name}-view-") as view:
        for name in names:
            link = Path(view, *PurePosixPath(name).parts)
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink((folder / name).resolve(), link)
        yield view


def resume_from_checkpoint(accelerator, checkpoint: Path, state: CheckpointState, flag_value: str) -> int:
    """Verify, then load ``checkpoint`` into the prepared objects and ``state``; returns its step. Any failure names
    the checkpoint and the run's other checkpoints to resume from instead."""
    try:
        legacy, files = verify_checkpoint(checkpoint)
        with _view_of(checkpoint, files) as view:
            accelerator.load_state(view)
        if legacy:
            state.load_legacy(checkpoint)
        else:
            state.load(checkpoint)
    except CheckpointMismatchError as error:
        raise CheckpointMismatchError(f"Cannot resume from {checkpoint} ({flag('resume_from_checkpoint')} "
                                      f"{flag_value}): {error}") from error
    except Exception as error:
        others = [path.name for _, path in list_checkpoints(checkpoint.parent) if path != checkpoint]
        raise RuntimeError(
            f"Cannot resume from {checkpoint} ({flag('resume_from_checkpoint')} {flag_value}): "
            f"{type(error).__name__}: {str(error).rstrip('.')}. If the checkpoint is damaged, resume from another one with "
            f"{flag('resume_from_checkpoint')} <name> ({', '.join(others) if others else 'this run has no other'}) "
            "or delete it."
        ) from error
    return checkpoint_step(checkpoint)


__all__ = [
    "CHECKPOINT_PATTERN",
    "CheckpointMismatchError",
    "CheckpointState",
    "checkpoint_step",
    "list_checkpoints",
    "prune_checkpoints",
    "resolve_resume_checkpoint",
    "resume_from_checkpoint",
    "save_checkpoint",
    "verify_checkpoint",
]
