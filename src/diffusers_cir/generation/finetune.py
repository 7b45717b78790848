# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Fine-tuning a causal LM to write caption triplets (the LLM stage's model), with peft LoRA and accelerate.

SynthTriplets18M fine-tuned OPT-6.7B on InstructPix2Pix's 452k caption triplets (columns ``input``, ``edit``,
``output`` in its release). The loss is on the completion only (``instruction``, the edited caption and EOS; see
:func:`diffusers_cir.generation.llm_triplets.tokenize_caption_triplet`).
``examples/generation/finetune_caption_editor.py`` is the command line over :func:`finetune_caption_editor`; the
offline demo uses the same loop (full weights, since LoRA cannot teach a random tiny model anything in a few steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..checks import check_choice, check_float, check_int, check_positive_int, check_probability


@dataclass
class FinetuneConfig:
    learning_rate: float = 1e-4
    max_train_steps: int = 1000
    train_batch_size: int = 8  # per device
    gradient_accumulation_steps: int = 1
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 256  # tokens per example (prompt + completion)
    use_lora: bool = True
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] | None = None  # default: peft's for the architecture
    seed: int = 0

    def check(self) -> "FinetuneConfig":
        check_float(self.learning_rate, "learning_rate", 0.0, exclusive_minimum=True)
        for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "max_length", "lora_rank"):
            check_positive_int(getattr(self, name), name)
        check_int(self.lr_warmup_steps, "lr_warmup_steps", 0)
        check_choice(self.lr_scheduler, "lr_scheduler", ("linear", "cosine", "constant", "constant_with_warmup"))
        check_float(self.weight_decay, "weight_decay", 0.0)
        check_float(self.max_grad_norm, "max_grad_norm", 0.0)
        check_float(self.lora_alpha, "lora_alpha", 0.0, exclusive_minimum=True)
        check_probability(self.lora_dropout, "lora_dropout", allow_one=False)
        return self


def read_caption_triplets(path: str, caption_column: str = "input", instruction_column: str = "edit",
                          edited_column: str = "output", max_items: int | None = None) -> list[tuple[str, str, str]]:
    """``(caption, instruction, edited caption)`` rows of a JSONL / CSV / Parquet file, a dataset folder or a Hub id
    (InstructPix2Pix's column names by default); rows with an empty part are left out."""
    from .sources import _load_any

    dataset = _load_any(path)
    missing = [c for c in (caption_column, instruction_column, edited_column) if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{path!r} has no column {missing}; its columns are {dataset.column_names}. Name them with "
                         "--caption_column / --instruction_column / --edited_caption_column.")
    if max_items is not None:
        dataset = dataset.select(range(min(max_items, len(dataset))))
    rows = zip(dataset[caption_column], dataset[instruction_column], dataset[edited_column])
    return [(str(c), str(i), str(e)) for c, i, e in rows if c and i and e]


def add_lora(model, config: FinetuneConfig):
    """``model`` wrapped by peft with LoRA adapters (``lora_target_modules``, or peft's default for its type)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_target_modules) if config.lora_target_modules else None,
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def finetune_caption_editor(model, tokenizer, triplets: Sequence[tuple[str, str, str]], config: FinetuneConfig,
                            accelerator=None, output_dir: str | None = None, checkpointing_steps: int | None = None,
                            resume: bool | str = False, progress: bool = True, log=print):
    """Train ``model`` (wrapped with LoRA when ``config.use_lora``) on ``triplets``; returns the unwrapped model.

    With ``output_dir`` and ``checkpointing_steps``, the accelerator state is saved every so many steps into
    ``output_dir/checkpoint-<step>`` with the trainers' checkpoint code (:mod:`diffusers_cir.training.checkpoints`:
    written whole or not at all, with content checksums, and no pickle read back). ``resume`` (``True`` or
    ``"latest"``, or a ``checkpoint-<step>`` name) verifies that checkpoint and continues from it (weights, optimizer,
    scheduler, step and random states; the interrupted epoch's data order is not replayed); a changed file is refused
    by name. The caller saves the result.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from ..training.checkpoints import CheckpointState, save_checkpoint
    from .llm_triplets import collate_caption_triplets, tokenize_caption_triplet

    config.check()
    if not triplets:
        raise ValueError("No caption triplets to train on.")
    accelerator = accelerator or Accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps)
    set_seed(config.seed)
    if config.use_lora:
        model = add_lora(model, config)
    model.train()
    examples = [tokenize_caption_triplet(tokenizer, *t, max_length=config.max_length) for t in triplets]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loader = torch.utils.data.DataLoader(
        examples, batch_size=config.train_batch_size, shuffle=True,
        collate_fn=lambda batch: collate_caption_triplets(batch, pad_id),
        generator=torch.Generator().manual_seed(config.seed),
    )
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                              num_training_steps=config.max_train_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    # No loop objects of its own: the checkpoint holds accelerate's state and the global random states.
    state = CheckpointState(accelerator)
    step = _resume(accelerator, output_dir, resume, state, log) if resume and output_dir else 0
    bar = tqdm(total=config.max_train_steps, initial=step, desc="fine-tuning", unit="step",
               disable=not (progress and accelerator.is_local_main_process))
    while step < config.max_train_steps:
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
                if output_dir and checkpointing_steps and step % checkpointing_steps == 0:
                    save_checkpoint(accelerator, output_dir, step, None, state)
                if step >= config.max_train_steps:
                    break
    bar.close()
    accelerator.wait_for_everyone()
    return accelerator.unwrap_model(model)


def _resume(accelerator, output_dir: str, resume: bool | str, state, log) -> int:
    from ..training.checkpoints import resolve_resume_checkpoint, resume_from_checkpoint

    checkpoint = resolve_resume_checkpoint(output_dir, "latest" if resume is True else resume)
    if checkpoint is None:
        log(f"No checkpoint in {output_dir}: starting from step 0.")
        return 0
    step = resume_from_checkpoint(accelerator, checkpoint, state, str(resume) if resume is not True else "latest")
    log(f"Resuming from {checkpoint.name} (step {step}).")
    return step
