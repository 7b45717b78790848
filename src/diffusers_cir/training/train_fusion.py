# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Train a composition network with accelerate: CLIP4Cir's Combiner, SCOT, MTST, FashionBLIP-2
(``examples/train_fusion.py``).

The loop of ``examples/train_fusion.py`` and of ``diffusers-cir demo --methods ...``; it shares arguments, the
output-folder policy, checkpoints, trackers and the optimizer with the CompoDiff and LinCIR trainers
(:mod:`diffusers_cir.training`). Per step: the batch's reference features (precomputed embeddings, or the image tower
on pixels), the modification texts' features (the text tower, cached while it is frozen), the head's queries, and
the method's objective (:mod:`.fusion_losses`) against the targets (image features, or SCOT's modified captions).
FashionBLIP-2 replaces the pooled-tower steps with its own hooks (:mod:`.fashionblip2`): its Q-Former reads the
reference pixels with the text, and LoRA adapters and the matching head train in one module.

Resuming (``--resume-from-checkpoint latest``) restores the head (and LoRA adapters), optimizer, LR scheduler, EMA,
every rank's data position and the generator the head's dropout draws from: dropout runs on a forked global random
state seeded from that generator, so it does not depend on when the data iterator was created. A resumed run ends
with the weights of an uninterrupted one, bit for bit (unless ``--text-feature-cache-size`` is set: a cached text's
features come from another batch than in the uninterrupted run, equal only up to the last bits).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..pipelines import composition_encoders as encoders
from .arguments import flag, lr_warmup_warning
from .cadence import after_step
from .checkpoints import (
    CheckpointState,
    resolve_resume_checkpoint,
    resume_from_checkpoint,
)
from .components import (
    build_lr_scheduler,
    build_optimizer,
    create_ema,
    freeze,
    weight_dtype,
)
from .fusion_arguments import VALIDATION_LOG
from .fusion_methods import FUSION_METHODS, build_head
from .state import GeneratorState
from .trackers import configure_logging, create_accelerator, init_trackers

logger = logging.getLogger("diffusers_cir.training")

__all__ = ["FusionRun", "main", "setup_run"]


@dataclass
class FusionRun:
    """What the loop works with, built once by :func:`setup_run`."""

    args: argparse.Namespace
    accelerator: Any
    log: Any
    method: Any
    head: Any
    parts: Any  # fusion_components.Encoders
    kind: str
    dtype: torch.dtype
    columns: Any = None
    loader: Any = None
    text_features: Any = None
    ema: Any = None
    optimizer: Any = None
    lr_scheduler: Any = None
    dropout_generator: torch.Generator | None = None
    state: CheckpointState | None = None
    retrieval_set: Any = None
    trained_towers: dict = field(default_factory=dict)
    validation_seconds: float = 0.0

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model)


# --------------------------------------------------------------------------------------------------- setup
def open_stream(args: argparse.Namespace):
    """The training stream and its columns, opened before the models load so that a wrong data flag fails at once."""
    from .fusion_data import open_fusion_stream

    try:
        return open_fusion_stream(args.train_data_dir, args.dataset_config_name, args.train_split, args.layout,
                                  args.column_mapping, needs_reverse_text=args.reverse_text_weight > 0,
                                  revision=args.revision)
    except (FileNotFoundError, ValueError, KeyError) as error:
        raise ValueError(
            f"{flag('train_data_dir')} {args.train_data_dir!r} ({flag('dataset_config_name')} {args.dataset_config_name!r}, "
            f"{flag('train_split')} {args.train_split!r}, {flag('layout')} {args.layout}) could not be read: {error}"
        ) from error


def prepare_model(run: FusionRun) -> None:
    """Frozen towers in the training precision (LoRA-adapted ones in float32), the head, optimizer, EMA."""
    args, accelerator, parts = run.args, run.accelerator, run.parts
    towers = {"text_encoder": args.lora_text_encoder, "image_encoder": args.lora_image_encoder}
    for name, adapt in towers.items():
        tower = getattr(parts, name)
        if tower is None:
            continue
        if adapt:
            from .fusion_components import add_lora

            tower = add_lora(tower.requires_grad_(False), args, run.kind).to(accelerator.device).train()
            run.trained_towers[name] = tower
        else:
            freeze(tower, accelerator, run.dtype)
        setattr(parts, name, tower)
    run.head.train()
    run.ema = create_ema(args, run.head, accelerator)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    trainable = [p for p in run.head.parameters() if p.requires_grad]
    for tower in run.trained_towers.values():
        trainable += [p for p in tower.parameters() if p.requires_grad]
    run.optimizer = build_optimizer(args, trainable, args.learning_rate)
    run.lr_scheduler = build_lr_scheduler(args, run.optimizer, accelerator)
    names = list(run.trained_towers)
    prepared = accelerator.prepare(run.head, *run.trained_towers.values(), run.optimizer, run.lr_scheduler)
    run.head, run.optimizer, run.lr_scheduler = prepared[0], prepared[-2], prepared[-1]
    for name, tower in zip(names, prepared[1:-2]):
        run.trained_towers[name] = tower
        setattr(parts, name, tower)


def build_loader(run: FusionRun, stream) -> None:
    from ..data.streaming import build_triplet_dataloader
    from .data import EndlessLoader
    from .fusion_data import FusionCollator

    args, accelerator = run.args, run.accelerator
    collator = FusionCollator(run.columns, run.parts.image_processor, text_triplets=args.layout == "text_triplets")
    run.loader = EndlessLoader(build_triplet_dataloader(
        stream, args.train_batch_size, num_workers=args.dataloader_num_workers, rank=accelerator.process_index,
        world_size=accelerator.num_processes, shuffle=True, shuffle_buffer_size=args.shuffle_buffer_size,
        seed=args.seed, collator=collator,
    ), name="training")


def reads_pixels(columns) -> bool:
    """Whether the run encodes images (references or targets) with the image tower."""
    return not columns.reference_is_embedding or (columns.target is not None and not columns.target_is_embedding)


def check_data_against_encoders(run: FusionRun) -> None:
    columns, parts = run.columns, run.parts
    needs_pixels = reads_pixels(columns)
    if run.method.needs_pixels and (columns.reference_is_embedding or columns.target_is_embedding):
        raise ValueError(f"--method {run.method.name} reads reference and target images, but {flag('train_data_dir')} "
                         f"{run.args.train_data_dir!r} ({flag('dataset_config_name')} {run.args.dataset_config_name!r}) "
                         "holds embeddings: pick its images configuration.")
    has_image_tower = parts.image_encoder is not None or parts.model is not None
    if needs_pixels and (not has_image_tower or parts.image_processor is None):
        raise ValueError(f"{flag('train_data_dir')} holds images, but {run.parts.source!r} has no image tower (and "
                         "processor) to encode them: use an embedding configuration or encoders with an image tower.")
    if run.args.lora_image_encoder and not needs_pixels:
        raise ValueError(f"{flag('lora_image_encoder')} adapts the image tower, which precomputed embeddings never "
                         f"run: train on an image configuration ({flag('dataset_config_name')}).")


def checkpoint_state(run: FusionRun) -> CheckpointState:
    """The loop's part of a checkpoint: this rank's data position and dropout generator, and the EMA."""
    state = CheckpointState(run.accelerator)
    state.register("training", run.loader, per_rank=True)
    state.register("dropout_generator", GeneratorState(run.dropout_generator), per_rank=True)
    if run.ema is not None:
        state.register("ema", run.ema, per_rank=False)
    return state


def setup_run(args: argparse.Namespace) -> FusionRun:
    """Accelerator and logging, data, encoders, head, optimizer and checkpoint state, in the order that makes a
    mistake fail before the expensive parts."""
    from accelerate.logging import get_logger
    from accelerate.utils import set_seed

    from .fusion_components import (
        TextFeatureCache,
        apply_image_preprocessing,
        load_encoders,
        recorded_image_preprocessing,
    )

    accelerator = create_accelerator(args)
    configure_logging(accelerator)
    log = get_logger("diffusers_cir.training")
    log.info(accelerator.state, main_process_only=False)
    warmup_warning = lr_warmup_warning(args)
    if warmup_warning is not None:
        log.warning(warmup_warning)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    set_seed(args.seed)

    stream, columns = open_stream(args)
    # Before the models load: a flag that contradicts how the data's embeddings were made fails at once.
    recorded = recorded_image_preprocessing(args, columns.reference_is_embedding or columns.target_is_embedding)
    method = FUSION_METHODS[args.method]
    parts = (method.load or load_encoders)(args)
    if parts.model is not None:  # a model that composes by itself: its Q-Former's width feeds the head
        kind, width = type(parts.model).__name__, int(parts.model.config.qformer_config.hidden_size)
    else:
        kind = encoders.encoder_kind(parts.text_encoder, parts.image_encoder)
        width = encoders.feature_dim(parts.text_encoder)
    head = parts.fusion_head if parts.fusion_head is not None else build_head(args.head, width, args)
    run = FusionRun(args=args, accelerator=accelerator, log=log, method=method, head=head,
                    parts=parts, kind=kind, dtype=weight_dtype(accelerator), columns=columns)
    check_data_against_encoders(run)
    preprocessing = apply_image_preprocessing(args, parts, method, reads_pixels(columns), recorded)
    if preprocessing is not None:
        made = ", as the training embeddings were made (their dataset card)" if recorded is not None else ""
        log.info(f"Image preprocessing (training images and the saved pipeline): {preprocessing}{made}")
        if not reads_pixels(columns) and args.image_preprocessing is not None and recorded is None:
            log.warning(f"{flag('image_preprocessing')} {args.image_preprocessing}: this run trains on precomputed "
                        "embeddings; the saved pipeline preprocesses queries and gallery this way, so the embeddings "
                        "should have been made the same way.")
    if args.reverse_text_weight > 0 and not hasattr(head, "prototype"):
        raise ValueError(f"{flag('reverse_text_weight')} aligns first-hop prototypes: it needs a two-hop head "
                         f"({flag('head')} two-hop), not a {type(head).__name__}.")
    (method.prepare or prepare_model)(run)
    build_loader(run, stream)
    cache_size = 0 if args.lora_text_encoder else args.text_feature_cache_size
    run.text_features = TextFeatureCache(parts.text_encoder, parts.tokenizer, cache_size, accelerator.device, run.dtype)
    run.dropout_generator = torch.Generator().manual_seed(args.seed + 1_000_003 * accelerator.process_index)
    run.state = checkpoint_state(run)
    prepare_validation(run)
    init_trackers(accelerator, args)
    return run


# --------------------------------------------------------------------------------------------------- features
def _image_features(run: FusionRun, batch: dict, key: str) -> torch.Tensor:
    """Features of the batch's references or targets: stored embeddings, or the image tower on the pixels."""
    device = run.accelerator.device
    if f"{key}_embeds" in batch:
        return batch[f"{key}_embeds"].to(device).float()
    pixels = batch[f"{key}_pixel_values"].to(device, dtype=next(run.parts.image_encoder.parameters()).dtype)
    if "image_encoder" in run.trained_towers:
        return encoders.image_features(run.parts.image_encoder, pixels).float()
    with torch.no_grad():
        return encoders.image_features(run.parts.image_encoder, pixels).float()


def _text_features(run: FusionRun, texts: list[str]) -> torch.Tensor:
    if "text_encoder" in run.trained_towers:
        return run.text_features.encode(texts)
    return run.text_features(texts)


def training_loss(run: FusionRun, batch: dict) -> tuple[torch.Tensor, dict]:
    """The objective of one batch and its parts (for the logs)."""
    from .fusion_losses import (
        contrastive_loss,
        duplicate_mask,
        prototype_alignment_loss,
    )

    args = run.args
    if run.method.loss is not None:
        return run.method.loss(run, batch)
    references = _image_features(run, batch, "reference")
    texts = _text_features(run, batch["texts"])
    compose = run.method.compose or (lambda run_, image, text: run_.head(image, text))
    output = compose(run, references, texts)
    parts = {}
    if args.objective == "image":
        targets = _image_features(run, batch, "target")
        keys = [bytes(row.detach().cpu().numpy().tobytes()) for row in targets]
        parts["contrastive"] = contrastive_loss(output.composed_embeds, targets, args.temperature, args.label_smoothing,
                                                duplicates=duplicate_mask(keys))
    else:
        targets = _text_features(run, batch["target_texts"])
        captions = _text_features(run, batch["reference_texts"]) if args.caption_negatives else None
        parts["contrastive"] = contrastive_loss(output.composed_embeds, targets, args.temperature, args.label_smoothing,
                                                extra_negatives=captions, duplicates=duplicate_mask(batch["target_texts"]))
    loss = parts["contrastive"]
    if args.reverse_text_weight > 0:
        head = run.unwrap(run.head)
        reverse = head.prototype(targets, _text_features(run, batch["reverse_texts"]))
        parts["prototype_alignment"] = prototype_alignment_loss(output.prototype, reverse)
        loss = loss + args.reverse_text_weight * parts["prototype_alignment"]
    return loss, {name: value.detach() for name, value in parts.items()}


# --------------------------------------------------------------------------------------------------- validation
def prepare_validation(run: FusionRun) -> None:
    from .train_compodiff import load_validation_set

    args = run.args
    if args.validation_steps is None or not run.accelerator.is_main_process:
        return
    run.retrieval_set = load_validation_set(args, args.num_validation_queries)
    run.log.info(f"Validation: {len(run.retrieval_set)} queries, gallery of {len(run.retrieval_set.gallery_ids)}")


def build_pipeline(run: FusionRun, for_saving: bool = False):
    """The run's pipeline: the head (its EMA weights when kept), the towers (LoRA merged when saving)."""
    from ..pipelines import PIPELINES

    if run.method.pipeline is not None:
        return run.method.pipeline(run, for_saving)
    parts, head = run.parts, run.unwrap(run.head)
    if run.ema is not None:
        head = copy.deepcopy(head)
        run.ema.copy_to(head.parameters())
    towers = {}
    stored = None
    if for_saving and run.dtype != torch.float32:
        # The frozen towers were cast to the training precision: save them as stored instead.
        from .fusion_components import load_encoders

        stored = load_encoders(run.args)
    for name in ("text_encoder", "image_encoder"):
        tower = getattr(parts, name)
        if stored is not None and name not in run.trained_towers:
            tower = getattr(stored, name)
        if name in run.trained_towers:
            tower = run.unwrap(tower)
            if for_saving:
                from .fusion_components import merged_tower

                tower = merged_tower(tower)
        towers[name] = tower
    if for_saving:
        head = head.to(torch.float32)
        towers = {name: None if tower is None else tower.to(torch.float32) for name, tower in towers.items()}
    pipeline_class = PIPELINES[run.method.pipeline_class]
    pipeline = pipeline_class(fusion_head=head.eval(), tokenizer=parts.tokenizer, text_encoder=towers["text_encoder"],
                              image_encoder=towers["image_encoder"],
                              image_processor=parts.image_processor if towers["image_encoder"] is not None else None)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def validate(run: FusionRun, step: int, train_seconds: float) -> dict:
    """Recall@K of the pipeline's composed queries (main process; every rank waits)."""
    from ..retrieval.compose import compose_queries
    from .validation import recall_of_queries

    accelerator, args = run.accelerator, run.args
    metrics: dict = {}
    if accelerator.is_main_process and run.retrieval_set is not None:
        start = time.perf_counter()
        run.head.eval()
        for tower in run.trained_towers.values():
            tower.eval()
        pipeline = build_pipeline(run)
        queries = compose_queries(pipeline, run.retrieval_set.prompts, reference_embeds=run.retrieval_set.reference_image_embeds,
                                  batch_size=args.validation_batch_size)
        metrics = recall_of_queries(queries, run.retrieval_set, args.validation_recall_ks)
        run.head.train()
        for tower in run.trained_towers.values():
            tower.train()
        seconds = time.perf_counter() - start
        run.validation_seconds += seconds
        record = {"step": step, **{f"val/{k}": v for k, v in metrics.items()}, "val/seconds": seconds,
                  "train/seconds": train_seconds}
        logger.info("Validation at step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        with open(os.path.join(args.output_dir, VALIDATION_LOG), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        accelerator.log({key: value for key, value in record.items() if key != "step"}, step=step)
    accelerator.wait_for_everyone()
    return metrics


# --------------------------------------------------------------------------------------------------- the loop
def next_batch(run: FusionRun) -> dict | None:
    """The next batch, or ``None`` when some rank's batch has fewer than two rows (a contrastive loss needs negatives,
    and every rank must run the same number of backward passes)."""
    batch = run.loader.next_batch()
    rows = len(batch["ids"])
    too_small = torch.tensor([int(rows < 2)], device=run.accelerator.device)
    if run.accelerator.num_processes > 1:
        too_small = run.accelerator.reduce(too_small, "max")
    if int(too_small.item()):
        if rows:
            run.log.warning(f"Rank {run.accelerator.process_index}: a batch of {rows} row(s) skipped (a batch needs two "
                            "rows on every rank: the others are each query's negatives).", main_process_only=False)
        return None
    return batch


def train_step(run: FusionRun, batch: dict) -> tuple[float, dict]:
    """One optimizer (or accumulation) step. The head's dropout draws from the run's own generator on a forked
    global random state, so a resumed run draws the same masks as an uninterrupted one."""
    args, accelerator = run.args, run.accelerator
    seed = int(torch.randint(0, 2**62, (1,), generator=run.dropout_generator))
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with accelerator.accumulate(run.head), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        with accelerator.autocast():
            loss, parts = training_loss(run, batch)
        accelerator.backward(loss)
        if accelerator.sync_gradients and args.max_grad_norm > 0:
            parameters = [p for group in run.optimizer.param_groups for p in group["params"]]
            accelerator.clip_grad_norm_(parameters, args.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    value = accelerator.gather(loss.detach()[None]).mean().item()
    return value, {name: accelerator.gather(part[None]).mean().item() for name, part in parts.items()}


def train(run: FusionRun, global_step: int) -> tuple[int, bool, dict]:
    """Optimizer steps to ``--max-train-steps`` (or ``--stop-after-steps``) with checkpoints and validation."""
    from tqdm.auto import tqdm

    args, accelerator = run.args, run.accelerator
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    last_metrics: dict = {}
    train_start, first_step = time.perf_counter(), global_step
    while global_step < args.max_train_steps:
        batch = next_batch(run)
        if batch is None:
            continue
        loss, parts = train_step(run, batch)
        if not accelerator.sync_gradients:
            continue
        if run.ema is not None:
            run.ema.step(run.unwrap(run.head).parameters())
        global_step += 1
        progress.update(1)
        logs = {"train_loss": loss, "lr": run.lr_scheduler.get_last_lr()[0], **{f"train/{k}": v for k, v in parts.items()}}
        progress.set_postfix(loss=f"{loss:.4g}")
        accelerator.log(logs, step=global_step)
        stop_early, last_metrics = after_step(run, global_step, first_step, train_start, validate, last_metrics)
        if stop_early:
            progress.close()
            return global_step, True, last_metrics
    progress.close()
    return global_step, False, last_metrics


def training_model_card(args, metrics: dict | None):
    """The saved folder's model card: the command that trains the same weights again, sources, last validation."""
    from ..utils.model_card import ModelResult, training_card
    from .fusion_arguments import build_argument_parser

    results = []
    if metrics:
        data = args.validation_data_dir or args.train_data_dir
        results.append(ModelResult(
            dataset=f"{data} ({args.validation_split})", split=args.validation_split, metrics=dict(metrics),
            protocol=f"The training script's validation: Recall@K of {args.num_validation_queries} composed queries "
                     f"against the {args.validation_gallery_config!r} gallery, reference excluded.",
        ))
    sources = [args.pretrained_model_name_or_path, args.open_clip_model]
    return training_card(args, build_argument_parser(args.method), "examples/train_fusion.py", results, sources,
                         [args.train_data_dir])


def main(args: argparse.Namespace) -> dict:
    """Train with arguments from :func:`~diffusers_cir.training.fusion_arguments.parse_args` (which checked them);
    returns ``global_step``, ``stopped_early``, the last validation ``metrics``, ``saved`` and the ``data`` summary."""
    checkpoint = resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    run = setup_run(args)
    accelerator = run.accelerator
    global_step = 0
    if args.resume_from_checkpoint and checkpoint is None:
        accelerator.print(f"No checkpoint in {args.output_dir} to resume from: starting a new training run.")
    if checkpoint is not None:
        accelerator.print(f"Resuming from checkpoint {checkpoint}")
        global_step = resume_from_checkpoint(accelerator, checkpoint, run.state, args.resume_from_checkpoint)
        if run.ema is not None:
            run.ema.to(accelerator.device)
    trainable = sum(p.numel() for group in run.optimizer.param_groups for p in group["params"])
    run.log.info(f"***** {run.method.name}: {type(run.unwrap(run.head)).__name__} over {run.kind} towers, "
                 f"{args.objective} objective, {trainable:,} trainable parameters, batch {args.train_batch_size} x "
                 f"{accelerator.num_processes} process(es), steps {global_step} -> {args.max_train_steps} *****")
    global_step, stopped_early, metrics = train(run, global_step)
    accelerator.wait_for_everyone()
    saved = {}
    if stopped_early:
        accelerator.print(f"Stopped after {args.stop_after_steps} steps ({flag('stop_after_steps')}) at step "
                          f"{global_step}; continue with {flag('resume_from_checkpoint')} latest.")
    elif accelerator.is_main_process:
        build_pipeline(run, for_saving=True).save_pretrained(args.output_dir, model_card=training_model_card(args, metrics))
        saved["pipeline"] = args.output_dir
        run.log.info(f"Saved pipeline to {args.output_dir}")
    summary = run.loader.summary()
    if accelerator.is_main_process:
        run.log.info(f"Data: {summary}")
    accelerator.end_training()
    return {"global_step": global_step, "stopped_early": stopped_early, "metrics": metrics, "saved": saved,
            "data": summary}
