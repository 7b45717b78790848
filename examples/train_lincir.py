#!/usr/bin/env python
"""Language-only training of LinCIR's projection phi (self-masking projection) with accelerate.

Only text is needed: every caption's keyword phrases are masked with ``$``, phi maps the caption's projected CLIP
text embedding (plus LinCIR's noise) to a pseudo token, and the frozen CLIP text tower must give the masked
caption, with the pseudo token at every ``$``, the embedding of the original caption (mean squared error).
See :mod:`diffusers_cir.text.self_masking`.

Captions are streamed with ``datasets`` (``streaming=True``): local ``.txt`` files (one caption per line),
``.json``/``.jsonl``/``.csv``/``.parquet`` files, a local dataset folder, or a Hub dataset id. LinCIR's own
mixture is ``dangne/gcc_caption_only``, ``FredZhang7/stable-diffusion-prompts-2.47M`` and
``Geonmo/midjourney-prompts-only`` (column ``text``)::

    accelerate launch examples/train_lincir.py \\
        --pretrained-model-name-or-path openai/clip-vit-large-patch14 \\
        --train-data dangne/gcc_caption_only FredZhang7/stable-diffusion-prompts-2.47M Geonmo/midjourney-prompts-only \\
        --batch-size 256 --max-train-steps 20000 --mixed-precision fp16 --output-dir lincir-vit-l

Every flag also takes its snake_case spelling (``--max_train_steps``). ``--pretrained-model-name-or-path`` is a
transformers CLIP checkpoint (both towers in one folder) or a folder with ``text_encoder/`` and ``tokenizer/``
subfolders (a saved :class:`~diffusers_cir.LinCIRPipeline`, for example). The result is a LinCIR pipeline folder in
``--output-dir`` (``phi/``, ``text_encoder/``, ``tokenizer/`` and, when the source has one, the vision tower),
loadable with ``LinCIRPipeline.from_pretrained``.

Validation (optional) reads a precomputed CIR set, ``--validation-data DIR`` with
``DIR/gallery.safetensors`` (tensor ``image_embeds`` ``[G, P]``) and ``DIR/queries.jsonl`` (one
``{"reference": int, "text": str or [str, str], "target": int}`` per line, gallery positions), and reports
Recall@K (``diffusers_cir.metrics``) at ``--validation-steps`` and at the end (``validation_results.json``).

Captions that are empty after cleaning (blank lines, null values) are skipped, counted, and reported at the end
(``skipped_empty_captions``) and in the trackers; a batch trains on the captions it has left.

Keyword extraction uses spaCy when ``--keyword-extractor`` is ``spacy``/``auto`` and the spaCy pipeline is
installed, else the built-in rule (:mod:`diffusers_cir.text.keywords`).

Arguments, the output-folder policy, checkpoints, trackers and the optimizer are shared with the CompoDiff trainer
(:mod:`diffusers_cir.training`). Resuming (``--resume-from-checkpoint``) restores phi, the optimizer, the scheduler,
EMA, the position in the caption stream (torchdata's ``StatefulDataLoader``, per rank) and every random state the loop
draws from: the noise generator, the collator's random-word fallback, the global generators (phi's dropout). With
``--shuffle-buffer-size 0`` and no dataloader workers a resumed run ends with exactly the weights of an uninterrupted
one; the contents of a shuffle buffer are not saved, so the captions that were in it at save time are skipped after a
resume, and with workers the collator's random state lives in the workers. ``latest`` with no checkpoint yet starts a
new run (so a time-limited job can always pass it, with ``--stop-after-steps``). Checkpoints carry checksums, checked
on resume, and are written to ``checkpoint-<step>.partial`` and renamed when complete, so ``latest`` never picks one a
killed run left half-written. A new run refuses an ``--output-dir`` that already holds checkpoints or a saved pipeline
of an earlier run.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import random
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffusers_cir.training.arguments import (
    DROPOUT,
    NON_NEGATIVE_FLOAT,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    TrainingArgumentParser,
    add_checkpointing_arguments,
    add_ema_arguments,
    add_flag,
    add_optimization_arguments,
    add_tracking_arguments,
    flag,
    usage_errors,
)
from diffusers_cir.training.outputs import check_output_dir

logger = logging.getLogger("train_lincir")

_FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
RUN_OUTPUTS = ("model_index.json", "validation_results.json")


# ---------------------------------------------------------------------------------------------------- arguments
def _prompt_template(text: str) -> str:
    """argparse type: the saved pipeline fills the template with ``str.format(text=...)`` and writes the pseudo token
    at its ``$`` (a bad template would otherwise fail only when the pipeline is built, after training, or never,
    giving a pipeline that refuses every query)."""
    if "{text}" not in text:
        raise argparse.ArgumentTypeError(f"expected a template containing '{{text}}', got {text!r}")
    try:
        filled = text.format(text="")
    except (KeyError, IndexError, ValueError) as error:
        raise argparse.ArgumentTypeError(
            f"{text!r}: '{{text}}' must be its only replacement field (write other braces as '{{{{' and '}}}}'); "
            f"str.format failed with {type(error).__name__}: {error}"
        ) from None
    if "$" not in filled:
        raise argparse.ArgumentTypeError(f"expected a template containing '$' (where the reference image goes), got {text!r}")
    return text


def _add_model_arguments(parser) -> None:
    model = parser.add_argument_group("model")
    add_flag(model, "pretrained_model_name_or_path", required=True, help="CLIP checkpoint (folder or Hub id).")
    add_flag(model, "tokenizer_name_or_path", default=None, help="Tokenizer if not stored with the CLIP model.")
    add_flag(model, "phi_hidden_dim", type=POSITIVE_INT, default=None,
             help="Hidden width of a new phi (default 4 x projection_dim). With --resume-phi the width is the "
             "checkpoint's; a different value is refused.")
    add_flag(model, "phi_dropout", type=DROPOUT, default=None,
             help="Dropout of phi while training (default 0.5 for a new phi; with --resume-phi the checkpoint's: a "
             "folder's config, or the method's published value for a released file). Given, it replaces the checkpoint's.")
    add_flag(model, "l2_normalize", action="store_true", default=None,
             help="L2-normalise phi's input (LinCIR's option). A released .pt file does not record it, so pass it when "
             "the file was trained with it; a phi folder records it, and --l2-normalize on a folder saved without it "
             "is refused.")
    add_flag(model, "resume_phi", default=None,
             help="Start from a released phi (.pt), a converted phi folder, or a LinCIR pipeline folder (its phi/).")
    add_flag(model, "prompt_template", type=_prompt_template, default="a photo of $ that {text}",
             help="Saved with the pipeline.")


def _add_data_arguments(parser) -> None:
    data = parser.add_argument_group("data")
    add_flag(data, "train_data", nargs="+", required=True, help="Caption files, dataset folders or Hub ids.")
    add_flag(data, "caption_column", default="text")
    add_flag(data, "dataset_config_name", default=None)
    add_flag(data, "dataset_split", default="train")
    add_flag(data, "shuffle_buffer_size", type=NON_NEGATIVE_INT, default=10_000, help="0 disables shuffling.")
    add_flag(data, "dataloader_num_workers", type=NON_NEGATIVE_INT, default=0)
    add_flag(data, "keyword_extractor", choices=["auto", "spacy", "builtin"], default="auto")
    add_flag(data, "spacy_model", default="en_core_web_sm")
    add_flag(data, "pad_to_max_length", action="store_true",
             help="Pad every caption to the tokenizer's model_max_length (77) instead of the batch's longest caption: "
             "the same loss (up to float rounding) for several times the text-tower work on short captions, but fixed "
             "shapes.")
    add_flag(data, "batch_size", type=POSITIVE_INT, default=256, help="Captions per device and step.")


def _add_training_arguments(parser) -> None:
    training = parser.add_argument_group("training")
    add_flag(training, "output_dir", required=True)
    add_flag(training, "noise_scale", type=NON_NEGATIVE_FLOAT, default=1.0, help="Scale of LinCIR's u*N(0,I) input noise.")
    add_flag(training, "logging_steps", type=POSITIVE_INT, default=50)
    add_flag(training, "no_image_encoder", action="store_true", help="Do not add the vision tower to the saved pipeline.")


def _add_validation_arguments(parser) -> None:
    validation = parser.add_argument_group("validation")
    add_flag(validation, "validation_data", default=None, help="Folder with gallery.safetensors + queries.jsonl.")
    add_flag(validation, "validation_steps", type=POSITIVE_INT, default=None)
    add_flag(validation, "validation_ks", type=POSITIVE_INT, nargs="+", default=[1, 5, 10, 50])
    add_flag(validation, "validation_exclude_reference", action="store_true",
             help="Delete the reference from each ranking (CIRR).")


def build_argument_parser() -> argparse.ArgumentParser:
    parser = TrainingArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_arguments(parser)
    _add_data_arguments(parser)
    _add_training_arguments(parser)
    add_optimization_arguments(parser, max_train_steps=20_000, lr_warmup_steps=0, max_grad_norm=None,
                               adam_weight_decay=0.01, seed=None, weight_decay_aliases=("--weight-decay", "--weight_decay"))
    add_ema_arguments(parser)
    add_checkpointing_arguments(parser, checkpointing_steps=None)
    add_tracking_arguments(parser, report_to="none", project_name="train_lincir")
    _add_validation_arguments(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The checked arguments; a bad one exits with a one-line ``error:`` (status 2) before anything is loaded."""
    parser = build_argument_parser()
    args = parser.parse_args(argv)
    with usage_errors(parser):
        if args.validation_steps is not None and args.validation_data is None:
            raise ValueError(f"{flag('validation_steps')} needs {flag('validation_data')}.")
        check_output_dir(args.output_dir, args.resume_from_checkpoint, args.max_train_steps, RUN_OUTPUTS)
    return args


# ---------------------------------------------------------------------------------------------------- data


def caption_stream(args, process_index: int = 0, num_processes: int = 1):
    """One streaming ``datasets.IterableDataset`` with a single ``text`` column, from every ``--train-data``."""
    from datasets import interleave_datasets, load_dataset
    from datasets.distributed import split_dataset_by_node

    sources = []
    for source in args.train_data:
        extension = os.path.splitext(source)[1].lower()
        if os.path.isfile(source):
            if extension not in _FILE_BUILDERS:
                raise ValueError(f"--train-data file {source!r}: unsupported extension (use {sorted(_FILE_BUILDERS)}).")
            stream = load_dataset(_FILE_BUILDERS[extension], data_files=[source], split="train", streaming=True)
            column = "text" if extension == ".txt" else args.caption_column
        else:
            try:
                stream = load_dataset(source, args.dataset_config_name, split=args.dataset_split, streaming=True)
            except Exception as error:  # datasets raises several types (missing path, Hub offline, unknown split)
                raise ValueError(
                    f"--train-data {source!r} (--dataset-config-name {args.dataset_config_name!r}, --dataset-split "
                    f"{args.dataset_split!r}) cannot be opened: {type(error).__name__}: {error}"
                ) from error
            column = args.caption_column
        if stream.column_names is not None and column not in stream.column_names:
            raise ValueError(f"--train-data {source!r} has no column {column!r} (it has {stream.column_names}); set --caption-column.")
        stream = stream.select_columns([column])
        if column != "text":
            stream = stream.rename_column(column, "text")
        sources.append(stream)
    stream = sources[0] if len(sources) == 1 else interleave_datasets(sources, stopping_strategy="all_exhausted")
    if num_processes > 1:
        stream = split_dataset_by_node(stream, rank=process_index, world_size=num_processes)
    if args.shuffle_buffer_size:
        stream = stream.shuffle(seed=args.seed or 0, buffer_size=args.shuffle_buffer_size)
    return stream


def load_validation_set(folder: str):
    from safetensors.torch import load_file

    gallery_path, queries_path = os.path.join(folder, "gallery.safetensors"), os.path.join(folder, "queries.jsonl")
    for path in (gallery_path, queries_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--validation-data needs {path}.")
    tensors = load_file(gallery_path)
    if "image_embeds" not in tensors:
        raise ValueError(f"{gallery_path} must hold a tensor named 'image_embeds', it has {sorted(tensors)}.")
    if tensors["image_embeds"].ndim != 2:
        raise ValueError(
            f"{gallery_path}: 'image_embeds' must have shape [gallery size, embedding width], got {tuple(tensors['image_embeds'].shape)}."
        )
    queries = []
    with open(queries_path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                query = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{queries_path}:{line_number} is not valid JSON: {error}.") from error
            if not isinstance(query, dict):
                raise ValueError(f"{queries_path}:{line_number} must be a JSON object, got {type(query).__name__}.")
            missing = {"reference", "text", "target"} - set(query)
            if missing:
                raise ValueError(f"{queries_path}:{line_number} lacks {sorted(missing)}.")
            queries.append(query)
    if not queries:
        raise ValueError(f"{queries_path} holds no queries.")
    gallery_size = tensors["image_embeds"].shape[0]
    for line_number, query in enumerate(queries, 1):
        for key in ("reference", "target"):
            if not isinstance(query[key], int) or not 0 <= query[key] < gallery_size:
                raise ValueError(
                    f"{queries_path}: query {line_number} has {key}={query[key]!r}, expected a gallery position in "
                    f"[0, {gallery_size}) (gallery.safetensors holds {gallery_size} embeddings)."
                )
        text = query["text"]
        if not (isinstance(text, str) or (isinstance(text, list) and len(text) == 2 and all(isinstance(t, str) for t in text))):
            raise ValueError(
                f"{queries_path}: query {line_number} has text={text!r}, expected a string or a list of two strings "
                "(FashionIQ's two captions)."
            )
    return tensors["image_embeds"], queries


def load_resumed_phi(args):
    """phi from ``--resume-phi``, with the phi flags of the command line checked against it.

    The weights fix phi's widths, so a ``--phi-hidden-dim`` that differs from the checkpoint's is refused rather than
    ignored. Input normalisation changes the function the weights were trained for: a folder records it and
    ``--l2-normalize`` on a folder saved without it is refused; a released ``.pt`` file does not record it, so the flag
    sets it. ``--phi-dropout`` leaves the weights alone: given, it replaces the checkpoint's dropout.
    """
    from diffusers_cir.conversion.lincir import convert_lincir_phi_checkpoint
    from diffusers_cir.models.textual_inversion_projection import TextualInversionProjection

    path = args.resume_phi
    if os.path.isdir(path):
        # A LinCIR pipeline folder (an earlier run's --output-dir) holds phi in its phi/ subfolder.
        is_pipeline = not os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, "phi", "config.json"))
        phi = TextualInversionProjection.from_pretrained(path, subfolder="phi" if is_pipeline else None)
        if args.l2_normalize and not phi.config.normalize_input:
            raise ValueError(
                f"--l2-normalize was given but --resume-phi {path!r} was saved with normalize_input=False: its weights "
                "expect unnormalised input. Leave --l2-normalize out to train it as saved."
            )
    else:
        phi = convert_lincir_phi_checkpoint(path, dropout=args.phi_dropout, normalize_input=bool(args.l2_normalize))
    if args.phi_hidden_dim is not None and args.phi_hidden_dim != phi.config.hidden_dim:
        raise ValueError(
            f"--phi-hidden-dim {args.phi_hidden_dim} does not match --resume-phi {path!r}, whose hidden layers have "
            f"width {phi.config.hidden_dim}. Leave --phi-hidden-dim out to train at the checkpoint's width."
        )
    if args.phi_dropout is not None and args.phi_dropout != phi.config.dropout:
        phi.hidden_dropout.p = args.phi_dropout
        phi.register_to_config(dropout=args.phi_dropout)  # saved with the pipeline as trained
    return phi


@torch.no_grad()
def evaluate_recall(pipeline, gallery_embeds: torch.Tensor, queries: list[dict], ks, exclude_reference: bool) -> dict:
    """Recall@K (in %) of the pipeline's queries on a precomputed gallery (``diffusers_cir.metrics.recall_at_k``)."""
    from diffusers_cir.metrics import recall_at_k

    references = torch.tensor([int(q["reference"]) for q in queries])
    texts = [q["text"] if isinstance(q["text"], str) else tuple(q["text"]) for q in queries]
    query_embeds = pipeline(image_embeds=gallery_embeds[references], prompt=texts, normalize=True).image_embeds
    scores = query_embeds.float().cpu() @ F.normalize(gallery_embeds.float(), dim=-1).T
    return recall_at_k(
        target_ids=[int(q["target"]) for q in queries],
        exclude_ids=references.tolist() if exclude_reference else None,
        scores=scores,
        gallery_ids=list(range(gallery_embeds.shape[0])),
        ks=ks,
    )


# ---------------------------------------------------------------------------------------------------- the run
@dataclass
class LinCIRRun:
    """What the loop works with, built once by :func:`setup_run`."""

    args: argparse.Namespace
    accelerator: Any
    source_folder: str
    text_encoder: Any
    tokenizer: Any
    phi: Any
    stream: Any
    validation_set: Any = None
    ema: Any = None
    optimizer: Any = None
    lr_scheduler: Any = None
    collator: Any = None
    dataloader: Any = None
    epochs: Any = None
    generator: torch.Generator | None = None
    state: Any = None


@dataclass
class Counters:
    """Where the loop stands: steps, what it logs, what it skipped."""

    global_step: int
    first_step: int
    resumed: bool
    running_loss: float = 0.0
    keyword_share: float = 0.0
    logged_batches: int = 0
    skipped_captions: int = 0  # empty after cleaning (blank lines, nulls): no caption to mask, so not trained on
    stopped_early: bool = False


def load_towers_and_phi(args: argparse.Namespace, accelerator, validation_set):
    """``(source_folder, text_encoder, tokenizer, phi)``: the frozen CLIP text tower in the training precision, and
    phi (resumed, or new with the tower's widths). A ``--resume-phi`` that contradicts the phi flags fails before the
    tower loads."""
    from diffusers_cir.conversion.lincir import load_clip_text_encoder, load_clip_tokenizer
    from diffusers_cir.models.textual_inversion_projection import TextualInversionProjection
    from diffusers_cir.training.components import freeze, pretrained_folder, weight_dtype

    phi = load_resumed_phi(args) if args.resume_phi else None
    source_folder = pretrained_folder(args.pretrained_model_name_or_path)
    text_encoder = load_clip_text_encoder(source_folder)
    tokenizer = load_clip_tokenizer(pretrained_folder(args.tokenizer_name_or_path) or source_folder)
    freeze(text_encoder, accelerator, weight_dtype(accelerator))

    projection_dim, hidden_size = text_encoder.config.projection_dim, text_encoder.config.hidden_size
    if validation_set is not None and validation_set[0].shape[1] != projection_dim:
        raise ValueError(
            f"{flag('validation_data')} {args.validation_data!r}: gallery.safetensors holds embeddings of width "
            f"{validation_set[0].shape[1]}, the CLIP joint space of {flag('pretrained_model_name_or_path')} has width "
            f"{projection_dim}."
        )
    if phi is None:
        phi = TextualInversionProjection(
            input_dim=projection_dim,
            hidden_dim=args.phi_hidden_dim or 4 * projection_dim,
            output_dim=hidden_size,
            dropout=0.5 if args.phi_dropout is None else args.phi_dropout,
            normalize_input=bool(args.l2_normalize),
        )
    if (phi.config.input_dim, phi.config.output_dim) != (projection_dim, hidden_size):
        raise ValueError(
            f"{flag('resume_phi')} {args.resume_phi!r} maps {phi.config.input_dim} -> {phi.config.output_dim}, but the "
            f"CLIP text tower of {flag('pretrained_model_name_or_path')} needs {projection_dim} (its projection_dim) -> "
            f"{hidden_size} (its hidden_size)."
        )
    return source_folder, text_encoder, tokenizer, phi.train()


def build_dataloader(run: LinCIRRun, seed: int) -> None:
    """The self-masking collator and a resumable dataloader over this rank's part of the caption stream. The loader
    gets its own generator: a new iterator (each epoch, and after a resume) would otherwise draw from the global
    generator that phi's dropout draws from, at moments that differ between a resumed and an uninterrupted run."""
    from diffusers_cir.text import SelfMaskingCollator, load_keyword_extractor

    args = run.args
    keyword_extractor = load_keyword_extractor(args.keyword_extractor, args.spacy_model)
    padding = "max_length" if args.pad_to_max_length else "longest"
    run.collator = SelfMaskingCollator(run.tokenizer, keyword_extractor, seed=args.seed, padding=padding)
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader as DataLoader
    except ImportError:  # exact resume of the stream position needs torchdata
        from torch.utils.data import DataLoader

        logger.warning("torchdata is not installed: a resumed run restarts the caption stream from its beginning.")
    # The dataloader is not prepared: each process already reads its own part of the stream.
    run.dataloader = DataLoader(
        run.stream, batch_size=args.batch_size, collate_fn=SkipEmptyCaptions(run.collator),
        num_workers=args.dataloader_num_workers, drop_last=True, generator=torch.Generator().manual_seed(seed),
    )


def checkpoint_state(run: LinCIRRun):
    """What the loop adds to accelerate's checkpoint (``legacy_custom``: what earlier versions registered with
    accelerate, in their order)."""
    from diffusers_cir.training.checkpoints import CheckpointState
    from diffusers_cir.training.state import GeneratorState, PythonRandomState

    state = CheckpointState(run.accelerator)
    if run.ema is not None:
        state.register("ema", run.ema, per_rank=False, legacy_custom=True)
    if hasattr(run.dataloader, "state_dict"):
        state.register("dataloader", run.dataloader, per_rank=True, legacy_custom=True)
    state.register("epochs", run.epochs, per_rank=True, legacy_custom=True)
    state.register("noise_generator", GeneratorState(run.generator), per_rank=True)
    state.register("collator_rng", PythonRandomState(run.collator.rng), per_rank=True)
    return state


def setup_run(args: argparse.Namespace, checkpoint) -> LinCIRRun:
    """Accelerator, data, towers, phi, optimizer and checkpoint state, in the order that makes a mistake fail before
    the expensive parts."""
    from accelerate.utils import set_seed

    from diffusers_cir.training.arguments import lr_warmup_warning
    from diffusers_cir.training.components import build_lr_scheduler, build_optimizer, create_ema
    from diffusers_cir.training.trackers import configure_logging, create_accelerator, init_trackers

    accelerator = create_accelerator(args)
    configure_logging(accelerator)
    warmup_warning = lr_warmup_warning(args)
    if warmup_warning is not None and accelerator.is_main_process:
        logger.warning(warmup_warning)
    if args.resume_from_checkpoint == "latest" and checkpoint is None:
        logger.info("%s latest: no checkpoint in %s yet, starting a new run.", flag("resume_from_checkpoint"), args.output_dir)
    if args.seed is not None:
        set_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    # The data is opened before the models load, so a wrong --train-data / --validation-data fails at once.
    stream = caption_stream(args, accelerator.process_index, accelerator.num_processes)
    validation_set = load_validation_set(args.validation_data) if args.validation_data else None
    source_folder, text_encoder, tokenizer, phi = load_towers_and_phi(args, accelerator, validation_set)
    run = LinCIRRun(args=args, accelerator=accelerator, source_folder=source_folder, text_encoder=text_encoder,
                    tokenizer=tokenizer, phi=phi, stream=stream, validation_set=validation_set)
    run.ema = create_ema(args, phi, accelerator)
    run.optimizer = build_optimizer(args, phi.parameters(), args.learning_rate)
    run.lr_scheduler = build_lr_scheduler(args, run.optimizer, accelerator)
    # Without --seed, a random one: the noise still comes from a generator whose state every checkpoint keeps.
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    build_dataloader(run, seed)
    run.phi, run.optimizer, run.lr_scheduler = accelerator.prepare(run.phi, run.optimizer, run.lr_scheduler)
    run.epochs = EpochCounter()  # passes over the caption stream, restored on resume (it seeds the reshuffle)
    run.generator = torch.Generator(device=accelerator.device).manual_seed(seed + accelerator.process_index)
    run.state = checkpoint_state(run)
    init_trackers(accelerator, args)
    return run


# ---------------------------------------------------------------------------------------------------- pipeline
def unwrapped_phi(run: LinCIRRun, use_ema: bool):
    model = run.accelerator.unwrap_model(run.phi)
    if use_ema and run.ema is not None:
        averaged = copy.deepcopy(model)
        run.ema.copy_to(averaged.parameters())
        model = averaged
    return model


def build_pipeline(run: LinCIRRun, with_vision: bool = False, for_saving: bool = False):
    from diffusers_cir.conversion.lincir import load_clip_image_encoder, load_clip_text_encoder
    from diffusers_cir.pipelines.pipeline_lincir import LinCIRPipeline

    image_encoder = image_processor = None
    text_encoder = run.text_encoder
    if for_saving and text_encoder.dtype != torch.float32:
        # The frozen tower was cast to the mixed-precision dtype for training only: the saved pipeline gets the
        # source's weights as stored, not a half-precision copy next to a float32 phi and vision tower.
        text_encoder = load_clip_text_encoder(run.source_folder).eval().to(run.accelerator.device)
    if with_vision:
        image_encoder, image_processor = load_clip_image_encoder(run.source_folder)
        if image_encoder is None:
            logger.info("%s has no CLIP vision tower: the saved pipeline runs on precomputed image embeddings.", run.source_folder)
    return LinCIRPipeline(
        phi=unwrapped_phi(run, use_ema=True).eval(),
        text_encoder=text_encoder,
        tokenizer=run.tokenizer,
        image_encoder=image_encoder,
        image_processor=image_processor,
        prompt_template=run.args.prompt_template,
    )


def lincir_training_card(args, results: dict | None):
    """The model card info of this run: the command, the CLIP model and data, and the validation it measured."""
    from diffusers_cir.utils.model_card import ModelResult, training_card

    measured = []
    if results:
        measured.append(ModelResult(
            dataset=str(args.validation_data), split="validation", metrics={k: v for k, v in results.items()
                                                                              if isinstance(v, (int, float))},
            protocol="The training script's validation: Recall@K of the validation triplets against their gallery"
            + (", reference excluded." if args.validation_exclude_reference else "."),
        ))
    return training_card(args, build_argument_parser(), "examples/train_lincir.py", measured,
                         [args.pretrained_model_name_or_path], list(args.train_data))


def validate(run: LinCIRRun, step: int, pipeline=None) -> dict | None:
    if run.validation_set is None or not run.accelerator.is_main_process:
        return None
    pipeline = pipeline or build_pipeline(run)
    pipeline.set_progress_bar_config(disable=True)
    args = run.args
    results = evaluate_recall(pipeline, *run.validation_set, ks=args.validation_ks, exclude_reference=args.validation_exclude_reference)
    run.phi.train()
    run.accelerator.log({f"validation/{k}": v for k, v in results.items()}, step=step)
    logger.info("step %d validation: %s", step, json.dumps(results))
    return results


# ---------------------------------------------------------------------------------------------------- the loop
def train_step(run: LinCIRRun, batch: dict) -> torch.Tensor:
    from diffusers_cir.text import self_masking_projection_loss

    args, accelerator = run.args, run.accelerator
    with accelerator.accumulate(run.phi), accelerator.autocast():
        loss = self_masking_projection_loss(
            run.phi,
            run.text_encoder,
            batch["input_ids"].to(accelerator.device),
            batch["masked_input_ids"].to(accelerator.device),
            placeholder_token_id=run.collator.placeholder_token_id,
            noise_scale=args.noise_scale,
            l2_normalize=False,  # phi normalises its own input when configured to
            generator=run.generator,
        )
        accelerator.backward(loss)
        if accelerator.sync_gradients and args.max_grad_norm:
            accelerator.clip_grad_norm_(run.phi.parameters(), args.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss


def after_step(run: LinCIRRun, counters: Counters, progress) -> bool:
    """EMA, logs, checkpoint and validation after an optimizer step; ``True`` when the loop must stop."""
    from diffusers_cir.training.checkpoints import save_checkpoint

    args, accelerator = run.args, run.accelerator
    counters.global_step += 1
    step = counters.global_step
    progress.update(1)
    if run.ema is not None:
        run.ema.step(accelerator.unwrap_model(run.phi).parameters())
    if step % args.logging_steps == 0 or step == args.max_train_steps:
        logs = {
            "train/loss": counters.running_loss / counters.logged_batches,
            "train/lr": run.lr_scheduler.get_last_lr()[0],
            "train/keyword_masked_share": counters.keyword_share / counters.logged_batches,
            "train/skipped_empty_captions": counters.skipped_captions,
        }
        accelerator.log(logs, step=step)
        progress.set_postfix(loss=f"{logs['train/loss']:.4g}")
        counters.running_loss, counters.keyword_share, counters.logged_batches = 0.0, 0.0, 0
    stopping = args.stop_after_steps is not None and step - counters.first_step >= args.stop_after_steps
    counters.stopped_early = stopping and step < args.max_train_steps
    if (args.checkpointing_steps and step % args.checkpointing_steps == 0) or counters.stopped_early:
        save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_total_limit, run.state)
    # The last step is validated once, after training, on the pipeline as saved.
    if args.validation_steps and step % args.validation_steps == 0 and step < args.max_train_steps:
        validate(run, step)
    return counters.stopped_early or step >= args.max_train_steps


def train(run: LinCIRRun, counters: Counters) -> None:
    """Passes over the caption stream until ``--max-train-steps`` (or ``--stop-after-steps``)."""
    args, accelerator = run.args, run.accelerator
    progress = tqdm(total=args.max_train_steps, initial=counters.global_step, desc="LinCIR steps",
                    disable=not accelerator.is_local_main_process)
    first_pass_after_resume = counters.resumed  # may legitimately find the restored epoch exhausted
    done = counters.global_step >= args.max_train_steps
    while not done:
        if hasattr(run.stream, "set_epoch"):
            run.stream.set_epoch(run.epochs.epoch)
        batches_this_epoch = 0
        for batch in run.dataloader:
            counters.skipped_captions += batch["num_skipped_captions"]
            if "input_ids" not in batch:  # every caption of the batch was empty
                continue
            batches_this_epoch += 1
            loss = train_step(run, batch)
            counters.running_loss += accelerator.gather(loss.detach()).mean().item()
            counters.keyword_share += batch["masked_by_keywords"].float().mean().item()
            counters.logged_batches += 1
            if accelerator.sync_gradients and after_step(run, counters, progress):
                done = True
                break
        if done:
            break
        if batches_this_epoch == 0 and not first_pass_after_resume:
            raise ValueError(
                f"The caption stream yielded no full batch of {args.batch_size} captions: check {flag('train_data')} or "
                f"lower {flag('batch_size')}."
            )
        run.epochs.epoch += 1
        first_pass_after_resume = False
    progress.close()


def finish(run: LinCIRRun, counters: Counters, resumed_from_step: int | None) -> dict:
    """Report skipped captions, save the pipeline and validate it as saved (unless stopped early)."""
    args, accelerator = run.args, run.accelerator
    accelerator.wait_for_everyone()
    skipped = int(accelerator.reduce(torch.tensor(counters.skipped_captions, device=accelerator.device), "sum").item())
    summary = {"global_step": counters.global_step, "resumed_from_step": resumed_from_step, "output_dir": args.output_dir,
               "skipped_empty_captions": skipped, "stopped_early": counters.stopped_early}
    if skipped and accelerator.is_main_process:
        logger.warning(
            "Skipped %d caption(s) of %s that are empty after cleaning (blank lines, null values, only '$'): there is "
            "nothing to mask in them, so the batches they were in trained on the others.", skipped, flag("train_data"),
        )
    if counters.stopped_early:
        logger.info("Stopped after %d steps (%s) at step %d; continue with %s latest.", args.stop_after_steps,
                    flag("stop_after_steps"), counters.global_step, flag("resume_from_checkpoint"))
    elif accelerator.is_main_process:
        pipeline = build_pipeline(run, with_vision=not args.no_image_encoder, for_saving=True)
        pipeline.save_pretrained(args.output_dir)
        results = validate(run, counters.global_step, pipeline)  # the numbers of the pipeline as saved
        from diffusers_cir.utils.model_card import write_model_card

        write_model_card(pipeline, args.output_dir, lincir_training_card(args, results))  # with what was measured
        if results is not None:
            summary["validation"] = results
            with open(os.path.join(args.output_dir, "validation_results.json"), "w", encoding="utf-8") as handle:
                json.dump({"step": counters.global_step, **results}, handle, indent=2)
        logger.info("Saved the LinCIR pipeline to %s.", args.output_dir)
    accelerator.end_training()
    return summary


def main(argv: list[str] | None = None) -> dict:
    from diffusers_cir.training.checkpoints import resolve_resume_checkpoint, resume_from_checkpoint

    args = parse_args(argv)
    checkpoint = resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    run = setup_run(args, checkpoint)
    global_step = resumed_from_step = None
    if checkpoint is not None:
        global_step = resumed_from_step = resume_from_checkpoint(run.accelerator, checkpoint, run.state, args.resume_from_checkpoint)
        if run.ema is not None:
            run.ema.to(run.accelerator.device)
        logger.info("Resumed from %s at step %d.", checkpoint, global_step)
    counters = Counters(global_step=global_step or 0, first_step=global_step or 0, resumed=checkpoint is not None)
    train(run, counters)
    return finish(run, counters, resumed_from_step)


class SkipEmptyCaptions:
    """Collate the captions that have text left after cleaning and count the others, instead of training on
    ``"a photo of $"`` against the embedding of an empty caption (what the collator makes of one)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, rows) -> dict:
        from diffusers_cir.text.self_masking import clean_caption

        def has_text(row) -> bool:
            caption = row[self.collator.caption_column] if isinstance(row, dict) else row
            # Not a string: kept, so that the collator names the row and its type.
            return caption is not None and (not isinstance(caption, str) or bool(clean_caption(caption, self.collator.placeholder)))

        kept = [row for row in rows if has_text(row)]
        batch = self.collator(kept) if kept else {}
        batch["num_skipped_captions"] = len(rows) - len(kept)
        return batch


class EpochCounter:
    """The number of completed passes over the caption stream, as a checkpointable object."""

    def __init__(self):
        self.epoch = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
