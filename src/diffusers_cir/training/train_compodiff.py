# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Train CompoDiff with accelerate: stage 1 (text-to-image prior) and stage 2 (composed retrieval), full or LoRA.

This is the training loop of ``examples/train_compodiff.py`` and of ``diffusers-cir demo`` (which is why it lives in
the library, not in the example); it follows diffusers' prior training example (``train_text_to_image_prior.py``):
accelerate for devices, mixed precision, gradient accumulation and checkpointing; diffusers' ``EMAModel`` and
``get_scheduler``; PEFT ``LoraConfig`` for LoRA. Arguments, output-folder policy, checkpoints, trackers and component
loading are shared with the LinCIR trainer (:mod:`diffusers_cir.training`).

What is specific to CompoDiff (see :mod:`diffusers_cir.training.conditioning`): the denoiser predicts x0 of a
CLIP image embedding (MSE); stage 2 mixes the triplet, text-to-image and masked objectives; classifier-free
dropout drops the text to the ``""`` encoding, the image to zeros, or both.

Resuming (``--resume-from-checkpoint latest``) restores the model, EMA, optimizer, LR scheduler, the global random
states, this loop's own noise generator and every rank's data position. The training noise comes from a dedicated
generator (saved per rank), not from the global RNG, because creating a data iterator draws from the global RNG and
a resumed run creates its iterator at a different moment than an uninterrupted one.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .arguments import flag, lr_warmup_warning
from .cadence import after_step
from .checkpoints import CheckpointState, resolve_resume_checkpoint, resume_from_checkpoint
from .compodiff_arguments import VALIDATION_LOG, embedding_scale
from .components import (
    build_lr_scheduler,
    build_optimizer,
    create_ema,
    freeze,
    load_compodiff_components,
    load_frozen_encoders,
    pretrained_folder,
    weight_dtype,
)
from .state import GeneratorState
from .trackers import configure_logging, create_accelerator, init_trackers

logger = logging.getLogger("diffusers_cir.training")


@dataclass
class CompoDiffRun:
    """What the loop works with, built once by :func:`setup_run`."""

    args: argparse.Namespace
    accelerator: Any
    log: Any  # accelerate's logger (main_process_only)
    transformer: Any
    noise_scheduler: Any
    encoders: Any  # FrozenEncoders: text encoder(s), tokenizer(s), image encoder and processor
    dtype: torch.dtype
    source: str  # "embeddings" or "images"
    loaders: dict
    caption_rows: int
    ratios: Any
    lora_config: Any = None
    ema: Any = None
    optimizer: Any = None
    lr_scheduler: Any = None
    noise_generator: torch.Generator | None = None
    state: CheckpointState | None = None
    retrieval_set: Any = None
    objective_rows: dict = field(default_factory=lambda: {"triplet": 0, "text_to_image": 0, "masked": 0})
    skipped_for_peers: int = 0
    validation_seconds: float = 0.0
    image_embeds_norm: float | None = None  # the reference scale (see compodiff_step.reference_condition)

    @functools.cached_property
    def unwrapped(self):
        """The model inside accelerate's wrappers (asked for only once the transformer is prepared)."""
        return self.accelerator.unwrap_model(self.transformer)


# --------------------------------------------------------------------------------------------------- data
def open_streams(args: argparse.Namespace):
    """The triplet stream and the optional caption stream, opened before the models load so that a wrong data flag
    fails at once, named by its flags."""
    from ..data.streaming import load_triplet_stream

    def open_stream(flags: str, *load_args, **load_kwargs):
        try:
            return load_triplet_stream(*load_args, **load_kwargs)
        except (FileNotFoundError, ValueError) as error:  # not MissingColumnsError (a KeyError): it names its columns
            raise ValueError(f"{flags} could not be opened: {error}") from error

    stream = open_stream(
        f"{flag('train_data_dir')} {args.train_data_dir!r} ({flag('dataset_config_name')} {args.dataset_config_name!r}, "
        f"{flag('train_split')} {args.train_split!r})",
        args.train_data_dir, args.dataset_config_name, split=args.train_split, column_mapping=args.column_mapping,
        stage=args.stage, revision=args.revision,
    )
    if args.text_to_image_data_dir is None:
        return stream, None
    config = args.text_to_image_config_name or args.dataset_config_name
    caption_stream = open_stream(
        f"{flag('text_to_image_data_dir')} {args.text_to_image_data_dir!r} ({flag('text_to_image_config_name')} "
        f"{config!r}, {flag('text_to_image_split')} {args.text_to_image_split!r})",
        args.text_to_image_data_dir, config, split=args.text_to_image_split,
        column_mapping=args.text_to_image_column_mapping, stage="text_to_image", revision=args.revision,
    )
    return stream, caption_stream


def build_loaders(run: CompoDiffRun, stream, caption_stream) -> None:
    """Per-rank resumable loaders: triplets, plus a fixed number of caption rows per batch from the caption data."""
    from ..data.streaming import build_triplet_dataloader
    from .data import EndlessLoader

    args, accelerator = run.args, run.accelerator
    caption_share = run.ratios.caption_row_probability if args.stage == "triplet" else 0.0
    if caption_stream is not None:
        run.caption_rows = min(args.train_batch_size - 1, max(1, round(args.train_batch_size * caption_share)))

    def loader_for(data_stream, batch_size, seed, text_to_image_probability, name):
        features = getattr(data_stream.dataset, "features", None) or {}
        return EndlessLoader(
            build_triplet_dataloader(
                data_stream, batch_size, tokenizer=run.encoders.tokenizer, image_processor=run.encoders.image_processor,
                num_workers=args.dataloader_num_workers, rank=accelerator.process_index,
                world_size=accelerator.num_processes, shuffle=True, shuffle_buffer_size=args.shuffle_buffer_size,
                seed=seed, text_to_image_probability=text_to_image_probability,
                return_mask=data_stream.column_mapping["mask"].split(".")[0] in features,
                tokenizer_2=run.encoders.tokenizer_2, keyword_templates=keyword_templates(args),
                keyword_swap_probability=args.keyword_swap_prob,
            ),
            name=name,
        )

    caption_rows = run.caption_rows
    run.loaders = {"triplets": loader_for(stream, args.train_batch_size - caption_rows, args.seed,
                                          0.0 if caption_rows else caption_share, "training")}
    if caption_rows:
        if caption_stream.source != stream.source:
            raise ValueError(
                f"{flag('text_to_image_data_dir')} holds {caption_stream.source} but the triplets hold {stream.source}; "
                "both must be embeddings or both images."
            )
        run.loaders["captions"] = loader_for(caption_stream, caption_rows, args.seed + 1, 0.0, "text-to-image")
    if accelerator.num_processes > 1:
        own = run.loaders["triplets"].loader.dataset.num_shards
        run.log.info(
            f"Rank {accelerator.process_index} reads {own} of the {stream.num_shards} training shards"
            + ("" if own < stream.num_shards else " (too few shards to split: it keeps 1 row in "
               f"{accelerator.num_processes})"),
            main_process_only=False,
        )


# --------------------------------------------------------------------------------------------------- model
def prepare_denoiser(run: CompoDiffRun) -> None:
    """Frozen encoders in the training precision; LoRA adapters or full training; gradient checkpointing; EMA."""
    from diffusers.training_utils import cast_training_params

    args, accelerator = run.args, run.accelerator
    for encoder in (run.encoders.text_encoder, run.encoders.text_encoder_2, run.encoders.image_encoder):
        if encoder is not None:
            freeze(encoder, accelerator, run.dtype)
    if args.use_lora:
        from peft import LoraConfig

        run.transformer.requires_grad_(False)
        run.transformer.to(accelerator.device, dtype=run.dtype)
        run.lora_config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                     init_lora_weights="gaussian", target_modules=args.lora_target_modules)
        run.transformer.add_adapter(run.lora_config)
        if accelerator.mixed_precision == "fp16":
            cast_training_params(run.transformer, dtype=torch.float32)  # LoRA weights train in float32
    run.transformer.train()
    if args.gradient_checkpointing:
        run.transformer.enable_gradient_checkpointing()
    run.ema = create_ema(args, run.transformer, accelerator)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    trainable = [parameter for parameter in run.transformer.parameters() if parameter.requires_grad]
    run.optimizer = build_optimizer(args, trainable, learning_rate)
    run.lr_scheduler = build_lr_scheduler(args, run.optimizer, accelerator)
    run.transformer, run.optimizer, run.lr_scheduler = accelerator.prepare(
        run.transformer, run.optimizer, run.lr_scheduler
    )


def checkpoint_state(run: CompoDiffRun) -> CheckpointState:
    """What the loop adds to accelerate's checkpoint: every rank's data position and noise generator (a stream per
    rank), and the EMA."""
    state = CheckpointState(run.accelerator)
    for name, loader in run.loaders.items():
        state.register(name, loader, per_rank=True)
    state.register("noise_generator", GeneratorState(run.noise_generator), per_rank=True)
    if run.ema is not None:
        state.register("ema", run.ema, per_rank=False, legacy_custom=True)
    return state


# --------------------------------------------------------------------------------------------------- validation
def load_validation_set(args: argparse.Namespace, num_queries: int):
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
            f"({flag('validation_data_dir')} / {flag('validation_split')}), which could not be opened: {error}"
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
        gallery_ids, gallery_embeds = [], []
        for row in gallery[next(iter(gallery))]:
            gallery_ids.append(row["id"])
            gallery_embeds.append(row["image_embeds"])
        return RetrievalSet(
            references, prompts, np.asarray(target_ids), torch.tensor(np.asarray(gallery_embeds, dtype=np.float32)),
            np.asarray(gallery_ids), np.asarray(reference_ids) if all(r is not None for r in reference_ids) else None,
        )
    return RetrievalSet.from_triplets(references, prompts, targets)


def prepare_validation(run: CompoDiffRun) -> None:
    args = run.args
    if args.validation_steps is None or not run.accelerator.is_main_process:
        return
    run.retrieval_set = load_validation_set(args, args.num_validation_queries)
    gallery_size = len(run.retrieval_set.gallery_ids)
    run.log.info(f"Validation: {len(run.retrieval_set)} queries, gallery of {gallery_size}")
    too_large = [k for k in args.validation_recall_ks if k > gallery_size]
    if too_large:
        # recall_of_queries leaves out the K a gallery this small cannot rank: say so instead of dropping them.
        run.log.warning(
            f"{flag('validation_recall_ks')} {','.join(map(str, args.validation_recall_ks))}: Recall@K for "
            f"K={too_large} will not be reported, the validation gallery has only {gallery_size} images."
        )


def run_validation(
    args, accelerator, transformer, noise_scheduler, encoders, retrieval_set, step, train_seconds=None,
    image_embeds_norm: float | None = None,
) -> dict:
    """Recall@K of the denoiser's composed queries; appended to ``validation_log.jsonl`` and logged to trackers."""
    from ..pipelines import CompoDiffPipeline
    from .validation import evaluate_composed_retrieval

    was_training = transformer.training
    transformer.eval()
    pipeline = CompoDiffPipeline(
        transformer=transformer,
        scheduler=copy.deepcopy(noise_scheduler),  # sampling state stays out of the training scheduler
        text_encoder=encoders.text_encoder,
        tokenizer=encoders.tokenizer,
        text_encoder_2=encoders.text_encoder_2,
        tokenizer_2=encoders.tokenizer_2,
        image_embeds_norm=image_embeds_norm,
    )
    pipeline.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    metrics = evaluate_composed_retrieval(
        pipeline, retrieval_set, ks=args.validation_recall_ks, batch_size=args.validation_batch_size,
        num_inference_steps=args.validation_inference_steps, guidance_scale=args.validation_guidance_scale,
        image_guidance_scale=args.validation_image_guidance_scale, seed=args.seed,
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


def validate(run: CompoDiffRun, step: int, train_seconds: float) -> dict:
    """Validate the EMA weights (when kept) on the main process; every rank waits for it."""
    started = time.perf_counter()
    metrics = {}
    if run.accelerator.is_main_process and run.retrieval_set is not None:
        unwrapped = run.unwrapped
        if run.ema is not None:
            run.ema.store(unwrapped.parameters())
            run.ema.copy_to(unwrapped.parameters())
        metrics = run_validation(run.args, run.accelerator, unwrapped, run.noise_scheduler, run.encoders,
                                 run.retrieval_set, step, train_seconds=train_seconds,
                                 image_embeds_norm=run.image_embeds_norm)
        if run.ema is not None:
            run.ema.restore(unwrapped.parameters())
    run.accelerator.wait_for_everyone()
    run.validation_seconds += time.perf_counter() - started
    return metrics


# --------------------------------------------------------------------------------------------------- the step
def next_batch(run: CompoDiffRun) -> dict | None:
    """The next batch of every loader merged, or ``None`` when it must be skipped (empty here, or on another rank:
    every rank must run the same number of backward passes)."""
    from .data import merge_batches

    batch = run.loaders["triplets"].next_batch()
    if "captions" in run.loaders:
        batch = merge_batches(batch, run.loaders["captions"].next_batch())
    rows = len(batch["ids"])
    if run.accelerator.num_processes > 1:
        any_empty = run.accelerator.reduce(torch.tensor([int(rows == 0)], device=run.accelerator.device), "max")
        if int(any_empty.item()):
            run.skipped_for_peers += rows
            if rows:
                run.log.warning(f"Rank {run.accelerator.process_index}: {rows} rows skipped because another rank's "
                                "batch was empty (every row of it failed to decode).", main_process_only=False)
            return None
    return batch if rows else None


# --------------------------------------------------------------------------------------------------- the loop
def train(run: CompoDiffRun, global_step: int) -> tuple[int, bool, dict]:
    """Optimizer steps from ``global_step`` to ``--max-train-steps`` (or ``--stop-after-steps``), with checkpoints and
    validation; returns ``(global_step, stopped_early, last validation metrics)``."""
    from tqdm.auto import tqdm

    from .compodiff_step import Conditioning, training_loss

    args, accelerator = run.args, run.accelerator
    conditioning = Conditioning(run, run.image_embeds_norm)
    progress_bar = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
    last_metrics: dict = {}
    train_loss, samples_since_log, log_start = 0.0, 0, time.perf_counter()
    train_start, first_step = time.perf_counter(), global_step
    while global_step < args.max_train_steps:
        batch = next_batch(run)
        if batch is None:
            continue
        with accelerator.accumulate(run.transformer):
            loss = training_loss(run, conditioning, batch)
            train_loss += accelerator.gather(loss.detach()[None]).mean().item() / args.gradient_accumulation_steps
            samples_since_log += len(batch["ids"]) * accelerator.num_processes
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(run.transformer.parameters(), args.max_grad_norm)
            run.optimizer.step()
            run.lr_scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue
        if run.ema is not None:
            run.ema.step(run.unwrapped.parameters())
        global_step += 1
        progress_bar.update(1)
        logs = {"train_loss": train_loss, "lr": run.lr_scheduler.get_last_lr()[0],
                "samples_per_second": samples_since_log / max(time.perf_counter() - log_start, 1e-9)}
        progress_bar.set_postfix(loss=f"{train_loss:.4g}", lr=f"{logs['lr']:.2e}")
        accelerator.log(logs, step=global_step)
        train_loss, samples_since_log, log_start = 0.0, 0, time.perf_counter()

        stop_early, last_metrics = after_step(run, global_step, first_step, train_start, validate, last_metrics)
        if stop_early:
            progress_bar.close()
            return global_step, True, last_metrics
    progress_bar.close()
    return global_step, False, last_metrics


def training_model_card(args, metrics: dict | None):
    """The model card info of this run (diffusers_cir.utils.model_card): its command, sources and last validation."""
    from ..utils.model_card import ModelResult, training_card
    from .compodiff_arguments import build_argument_parser

    results = []
    if metrics:
        data = args.validation_data_dir or args.train_data_dir
        results.append(ModelResult(
            dataset=f"{data} ({args.validation_split})", split=args.validation_split, metrics=dict(metrics),
            protocol=(f"The training script's validation: Recall@K of {args.num_validation_queries} composed queries "
                      f"against the {args.validation_gallery_config!r} gallery, reference excluded, "
                      f"{args.validation_inference_steps} steps, guidance {args.validation_guidance_scale} (text) / "
                      f"{args.validation_image_guidance_scale} (image)."),
        ))
    sources = [args.pretrained_model_name_or_path, args.text_encoder_name_or_path, args.text_encoder_2_name_or_path,
               args.image_encoder_name_or_path]
    # The command spells out every resolved value that differs from the parser's default, so it trains the same
    # weights without the recipe (whose values it lists); the per-device batch follows from --total-batch-size.
    command = argparse.Namespace(**{**vars(args), "recipe": None})
    if args.total_batch_size is not None:
        command.train_batch_size = None
    return training_card(command, build_argument_parser(), "examples/train_compodiff.py", results, sources,
                         [args.train_data_dir, args.text_to_image_data_dir])


def save_final_model(run: CompoDiffRun, metrics: dict | None = None) -> dict:
    """The LoRA weights, or the pipeline with the EMA weights (when kept) and the encoders as stored."""
    from ..pipelines import CompoDiffPipeline

    args, model, saved = run.args, run.unwrapped, {}
    if args.use_lora:
        from peft.utils import get_peft_model_state_dict

        CompoDiffPipeline.save_lora_weights(
            args.output_dir, transformer_lora_layers=get_peft_model_state_dict(model),
            transformer_lora_adapter_metadata=run.lora_config.to_dict(),
        )
        saved["lora"] = os.path.join(args.output_dir, "pytorch_lora_weights.safetensors")
        return saved
    if run.ema is not None:
        run.ema.copy_to(model.parameters())
    encoders = run.encoders
    if run.dtype != torch.float32:
        # The frozen encoders were cast to the training precision: save them as stored instead.
        encoders = load_frozen_encoders(args, pretrained_folder(args.pretrained_model_name_or_path, args.revision))

    def as_stored(module):
        return module.to(torch.float32) if module is not None else None

    pipeline = CompoDiffPipeline(
        transformer=model if model.dtype == torch.float32 else model.to(torch.float32),
        scheduler=run.noise_scheduler,
        text_encoder=as_stored(encoders.text_encoder),
        tokenizer=run.encoders.tokenizer,
        text_encoder_2=as_stored(encoders.text_encoder_2),
        tokenizer_2=run.encoders.tokenizer_2,
        image_encoder=as_stored(encoders.image_encoder),
        image_processor=run.encoders.image_processor if encoders.image_encoder is not None else None,
        image_embeds_norm=run.image_embeds_norm,
    )
    pipeline.save_pretrained(args.output_dir, model_card=training_model_card(args, metrics))
    saved["pipeline"] = args.output_dir
    return saved


# --------------------------------------------------------------------------------------------------- main
def resolve_batch_size(args: argparse.Namespace, accelerator) -> None:
    """``--total-batch-size`` -> the per-device ``train_batch_size`` of this many processes and accumulation steps."""
    if args.total_batch_size is None:
        return
    shares = accelerator.num_processes * args.gradient_accumulation_steps
    if args.total_batch_size % shares:
        raise ValueError(
            f"{flag('total_batch_size')} {args.total_batch_size} does not divide into {accelerator.num_processes} "
            f"processes x {args.gradient_accumulation_steps} accumulation steps: choose a multiple of {shares}, or "
            f"set {flag('gradient_accumulation_steps')} so that it divides."
        )
    args.train_batch_size = args.total_batch_size // shares


def image_embeds_norm(args: argparse.Namespace, embedding_dim: int) -> float | None:
    """The reference scale of this run: a pretrained model's recorded one (``None``: the released convention, raw
    encoder norms), or for a new model the target scale (``--embedding-scale``; 1 with ``none``)."""
    from .compodiff_step import pretrained_image_embeds_norm

    if args.pretrained_model_name_or_path is not None:
        return pretrained_image_embeds_norm(pretrained_folder(args.pretrained_model_name_or_path, args.revision))
    return embedding_scale(args, embedding_dim) or 1.0


def keyword_templates(args: argparse.Namespace):
    """The instruction templates keyword triplets are re-drawn from (``None``: stored texts)."""
    if not args.redraw_keyword_instructions:
        return None
    from ..generation.templates import KEYWORD_TEMPLATES

    return KEYWORD_TEMPLATES


def setup_run(args: argparse.Namespace) -> CompoDiffRun:
    """Accelerator and logging, data, components, optimizer and checkpoint state, in the order that makes a mistake
    fail before the expensive parts."""
    from accelerate.logging import get_logger
    from accelerate.utils import set_seed

    from .conditioning import ObjectiveRatios

    accelerator = create_accelerator(args)
    configure_logging(accelerator)
    log = get_logger("diffusers_cir.training")
    resolve_batch_size(args, accelerator)
    log.info(accelerator.state, main_process_only=False)
    warmup_warning = lr_warmup_warning(args)
    if warmup_warning is not None:
        log.warning(warmup_warning)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    set_seed(args.seed)  # the same on every rank for the weights; each rank then draws its own training noise

    stream, caption_stream = open_streams(args)
    transformer, noise_scheduler, encoders = load_compodiff_components(args, stream)
    run = CompoDiffRun(
        args=args, accelerator=accelerator, log=log, transformer=transformer, noise_scheduler=noise_scheduler,
        encoders=encoders, dtype=weight_dtype(accelerator), source=stream.source, loaders={}, caption_rows=0,
        ratios=ObjectiveRatios.parse(args.objective_ratios),
        image_embeds_norm=image_embeds_norm(args, transformer.config.embedding_dim),
    )
    build_loaders(run, stream, caption_stream)
    prepare_denoiser(run)
    run.noise_generator = torch.Generator(device=accelerator.device).manual_seed(
        args.seed + 1_000_003 * accelerator.process_index)
    run.state = checkpoint_state(run)
    prepare_validation(run)
    init_trackers(accelerator, args)
    return run


def log_run_start(run: CompoDiffRun, global_step: int) -> None:
    args, accelerator = run.args, run.accelerator
    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    scale = embedding_scale(args, run.unwrapped.config.embedding_dim)
    trainable = sum(p.numel() for p in run.transformer.parameters() if p.requires_grad)
    run.log.info("***** Running training *****")
    run.log.info(f"  Stage = {args.stage}; objectives = {run.ratios if args.stage == 'triplet' else 'text_to_image'}")
    if run.caption_rows:
        run.log.info(f"  Rows per batch: {args.train_batch_size - run.caption_rows} triplets + {run.caption_rows} captions")
    run.log.info(f"  Target embeddings: {'as stored' if scale is None else f'L2-normalised x {scale:.4g}'}")
    run.log.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    run.log.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    run.log.info(f"  Gradient accumulation steps = {args.gradient_accumulation_steps}")
    run.log.info(f"  Total optimization steps = {args.max_train_steps}; starting at {global_step}")
    run.log.info(f"  Trainable parameters = {trainable:,}")


def main(args: argparse.Namespace) -> dict:
    """Train with arguments from :func:`~diffusers_cir.training.compodiff_arguments.parse_args` (which checked them);
    returns a summary (``global_step``, ``stopped_early``, final validation ``metrics``, ``saved`` paths, ``data``
    summaries, ``objective_rows``)."""
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
        if global_step == args.max_train_steps:  # e.g. stopped after its last checkpoint, before the final save
            run.log.warning(f"{checkpoint.name} is already at {flag('max_train_steps')} {args.max_train_steps}: "
                            "nothing left to train, saving the final model from it.")
    log_run_start(run, global_step)
    global_step, stopped_early, last_metrics = train(run, global_step)

    accelerator.wait_for_everyone()
    saved = {}
    if stopped_early:
        accelerator.print(f"Stopped after {args.stop_after_steps} steps ({flag('stop_after_steps')}) at step "
                          f"{global_step}; continue with {flag('resume_from_checkpoint')} latest.")
    elif accelerator.is_main_process:
        saved = save_final_model(run, last_metrics)
        run.log.info(f"Saved {', '.join(saved)} to {args.output_dir}")
    summary = {name: loader.summary() for name, loader in run.loaders.items()}
    if accelerator.is_main_process:  # a run stopped by --stop-after-steps reports its data too
        for name, text in summary.items():
            run.log.info(f"Data ({name}): {text}")
        run.log.info("Rows per objective (this rank): " + ", ".join(f"{k} {v}" for k, v in run.objective_rows.items()))
        if run.skipped_for_peers:
            run.log.warning(f"{run.skipped_for_peers} rows were skipped to keep ranks in step (empty batch elsewhere).")
    accelerator.end_training()
    return {"global_step": global_step, "stopped_early": stopped_early, "metrics": last_metrics, "saved": saved,
            "data": summary, "objective_rows": run.objective_rows}
