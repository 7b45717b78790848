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
        --pretrained_model_name_or_path openai/clip-vit-large-patch14 \\
        --train_data dangne/gcc_caption_only FredZhang7/stable-diffusion-prompts-2.47M Geonmo/midjourney-prompts-only \\
        --batch_size 256 --max_train_steps 20000 --mixed_precision fp16 --output_dir lincir-vit-l

``--pretrained_model_name_or_path`` is a transformers CLIP checkpoint (both towers in one folder) or a folder with
``text_encoder/`` and ``tokenizer/`` subfolders (a saved :class:`~diffusers_cir.LinCIRPipeline`, for example).
The result is a LinCIR pipeline folder in ``--output_dir`` (``phi/``, ``text_encoder/``, ``tokenizer/`` and, when
the source has one, the vision tower), loadable with ``LinCIRPipeline.from_pretrained``.

Validation (optional) reads a precomputed CIR set, ``--validation_data DIR`` with
``DIR/gallery.safetensors`` (tensor ``image_embeds`` ``[G, P]``) and ``DIR/queries.jsonl`` (one
``{"reference": int, "text": str or [str, str], "target": int}`` per line, gallery positions), and reports
Recall@K (``diffusers_cir.metrics``) at ``--validation_steps`` and at the end (``validation_results.json``).

Captions that are empty after cleaning (blank lines, null values) are skipped, counted, and reported at the end
(``skipped_empty_captions``) and in the trackers; a batch trains on the captions it has left.

Keyword extraction uses spaCy when ``--keyword_extractor`` is ``spacy``/``auto`` and the spaCy pipeline is
installed, else the built-in rule (:mod:`diffusers_cir.text.keywords`).

Resuming (``--resume_from_checkpoint``) restores phi, the optimizer, the scheduler, EMA and the position in the
caption stream (torchdata's ``StatefulDataLoader``); the contents of the shuffle buffer are not saved, so the
captions that were in it at save time are skipped after a resume. ``latest`` with no checkpoint yet starts a new
run (so a time-limited job can always pass it). Checkpoints are written to ``checkpoint-<step>.partial`` and renamed
when complete, so ``latest`` never picks one a killed run left half-written. A run without
``--resume_from_checkpoint`` refuses an ``--output_dir`` that already holds checkpoints (they would mix with the new
run's, and ``latest`` could later resume the old run).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

logger = logging.getLogger("train_lincir")

_FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from diffusers_cir.training.train_compodiff import LR_SCHEDULERS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", required=True, help="CLIP checkpoint (folder or Hub id).")
    model.add_argument("--tokenizer_name_or_path", default=None, help="Tokenizer if not stored with the CLIP model.")
    model.add_argument(
        "--phi_hidden_dim",
        type=int,
        default=None,
        help="Hidden width of a new phi (default 4 x projection_dim). With --resume_phi the width is the checkpoint's; "
        "a different value is refused.",
    )
    model.add_argument(
        "--phi_dropout",
        type=float,
        default=None,
        help="Dropout of phi while training (default 0.5 for a new phi; with --resume_phi the checkpoint's: a folder's "
        "config, or the method's published value for a released file). Given, it replaces the checkpoint's.",
    )
    model.add_argument(
        "--l2_normalize",
        action="store_true",
        default=None,
        help="L2-normalise phi's input (LinCIR's option). A released .pt file does not record it, so pass it when the "
        "file was trained with it; a phi folder records it, and --l2_normalize on a folder saved without it is refused.",
    )
    model.add_argument(
        "--resume_phi",
        default=None,
        help="Start from a released phi (.pt), a converted phi folder, or a LinCIR pipeline folder (its phi/).",
    )
    model.add_argument("--prompt_template", default="a photo of $ that {text}", help="Saved with the pipeline.")

    data = parser.add_argument_group("data")
    data.add_argument("--train_data", nargs="+", required=True, help="Caption files, dataset folders or Hub ids.")
    data.add_argument("--caption_column", default="text")
    data.add_argument("--dataset_config_name", default=None)
    data.add_argument("--dataset_split", default="train")
    data.add_argument("--shuffle_buffer_size", type=int, default=10_000, help="0 disables shuffling.")
    data.add_argument("--dataloader_num_workers", type=int, default=0)
    data.add_argument("--keyword_extractor", choices=["auto", "spacy", "builtin"], default="auto")
    data.add_argument("--spacy_model", default="en_core_web_sm")
    data.add_argument(
        "--pad_to_max_length",
        action="store_true",
        help="Pad every caption to the tokenizer's model_max_length (77) instead of the batch's longest caption: "
        "the same loss (up to float rounding) for several times the text-tower work on short captions, but fixed shapes.",
    )

    training = parser.add_argument_group("training")
    training.add_argument("--output_dir", required=True)
    training.add_argument("--batch_size", type=int, default=256, help="Captions per device and step.")
    training.add_argument("--max_train_steps", type=int, default=20_000)
    training.add_argument("--learning_rate", type=float, default=1e-4)
    training.add_argument("--weight_decay", type=float, default=0.01)
    # Checked here: a misspelt name failed in get_scheduler only after the data was opened and the CLIP towers loaded.
    training.add_argument("--lr_scheduler", default="constant_with_warmup", choices=LR_SCHEDULERS)
    training.add_argument("--lr_warmup_steps", type=int, default=0)
    training.add_argument("--gradient_accumulation_steps", type=int, default=1)
    training.add_argument("--max_grad_norm", type=float, default=None)
    training.add_argument("--noise_scale", type=float, default=1.0, help="Scale of LinCIR's u*N(0,I) input noise.")
    training.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    training.add_argument("--use_ema", action="store_true")
    training.add_argument("--ema_decay", type=float, default=0.9999)
    training.add_argument("--seed", type=int, default=None)
    training.add_argument("--checkpointing_steps", type=int, default=None)
    training.add_argument("--checkpoints_total_limit", type=int, default=None)
    training.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help='A checkpoint-<step> folder (a path, or a name in --output_dir) or "latest" (the newest complete one; '
        "a new run when there is none).",
    )
    training.add_argument("--report_to", default=None, help="accelerate tracker (tensorboard, wandb, ...).")
    training.add_argument("--logging_steps", type=int, default=50)
    training.add_argument("--no_image_encoder", action="store_true", help="Do not add the vision tower to the saved pipeline.")

    validation = parser.add_argument_group("validation")
    validation.add_argument("--validation_data", default=None, help="Folder with gallery.safetensors + queries.jsonl.")
    validation.add_argument("--validation_steps", type=int, default=None)
    validation.add_argument("--validation_ks", type=int, nargs="+", default=[1, 5, 10, 50])
    validation.add_argument(
        "--validation_exclude_reference", action="store_true", help="Delete the reference from each ranking (CIRR)."
    )
    args = parser.parse_args(argv)

    # Every number is checked here, not when first used (--logging_steps 0 failed at the first step, a bad
    # --validation_ks at the first validation, --checkpoints_total_limit 0 kept one checkpoint anyway).
    for flag, low, what in (
        ("phi_hidden_dim", 1, "a positive integer"),
        ("batch_size", 1, "a positive integer"),
        ("max_train_steps", 1, "a positive integer"),
        ("gradient_accumulation_steps", 1, "a positive integer"),
        ("logging_steps", 1, "a positive integer"),
        ("checkpointing_steps", 1, "a positive integer"),
        ("checkpoints_total_limit", 1, "a positive integer"),
        ("validation_steps", 1, "a positive integer"),
        ("shuffle_buffer_size", 0, "0 (no shuffling) or a positive integer"),
        ("dataloader_num_workers", 0, "0 or a positive integer"),
        ("lr_warmup_steps", 0, "0 or a positive integer"),
        ("noise_scale", 0, "a number >= 0"),
    ):
        value = getattr(args, flag)
        if value is not None and value < low:
            parser.error(f"--{flag} must be {what}, got {value}.")
    for flag in ("learning_rate", "max_grad_norm"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            parser.error(f"--{flag} must be a positive number, got {value}.")
    if args.phi_dropout is not None and not 0 <= args.phi_dropout < 1:
        parser.error(f"--phi_dropout must be in [0, 1), got {args.phi_dropout}.")
    if not 0 <= args.ema_decay <= 1:
        parser.error(f"--ema_decay must be in [0, 1], got {args.ema_decay}.")
    if min(args.validation_ks) < 1:
        parser.error(f"--validation_ks must be positive integers, got {' '.join(map(str, args.validation_ks))}.")
    if args.validation_steps is not None and args.validation_data is None:
        parser.error("--validation_steps needs --validation_data.")
    # The saved pipeline fills the template with str.format(text=...) and writes the pseudo token at its "$": a bad
    # template would otherwise fail only when the pipeline is built, after training (or never, giving a pipeline
    # that refuses every query).
    if "{text}" not in args.prompt_template:
        parser.error(f"--prompt_template must contain '{{text}}', got {args.prompt_template!r}.")
    try:
        filled = args.prompt_template.format(text="")
    except (KeyError, IndexError, ValueError) as error:
        parser.error(
            f"--prompt_template {args.prompt_template!r}: '{{text}}' must be its only replacement field (write other "
            f"braces as '{{{{' and '}}}}'); str.format failed with {type(error).__name__}: {error}."
        )
    if "$" not in filled:
        parser.error(f"--prompt_template must contain '$' (where the reference image goes), got {args.prompt_template!r}.")
    return args


# ---------------------------------------------------------------------------------------------------- data


def caption_stream(args, process_index: int = 0, num_processes: int = 1):
    """One streaming ``datasets.IterableDataset`` with a single ``text`` column, from every ``--train_data``."""
    from datasets import interleave_datasets, load_dataset
    from datasets.distributed import split_dataset_by_node

    sources = []
    for source in args.train_data:
        extension = os.path.splitext(source)[1].lower()
        if os.path.isfile(source):
            if extension not in _FILE_BUILDERS:
                raise ValueError(f"--train_data file {source!r}: unsupported extension (use {sorted(_FILE_BUILDERS)}).")
            stream = load_dataset(_FILE_BUILDERS[extension], data_files=[source], split="train", streaming=True)
            column = "text" if extension == ".txt" else args.caption_column
        else:
            try:
                stream = load_dataset(source, args.dataset_config_name, split=args.dataset_split, streaming=True)
            except Exception as error:  # datasets raises several types (missing path, Hub offline, unknown split)
                raise ValueError(
                    f"--train_data {source!r} (--dataset_config_name {args.dataset_config_name!r}, --dataset_split "
                    f"{args.dataset_split!r}) cannot be opened: {type(error).__name__}: {error}"
                ) from error
            column = args.caption_column
        if stream.column_names is not None and column not in stream.column_names:
            raise ValueError(f"--train_data {source!r} has no column {column!r} (it has {stream.column_names}); set --caption_column.")
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
            raise FileNotFoundError(f"--validation_data needs {path}.")
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
    """phi from ``--resume_phi``, with the phi flags of the command line checked against it.

    The weights fix phi's widths, so a ``--phi_hidden_dim`` that differs from the checkpoint's is refused rather than
    ignored. Input normalisation changes the function the weights were trained for: a folder records it and
    ``--l2_normalize`` on a folder saved without it is refused; a released ``.pt`` file does not record it, so the flag
    sets it. ``--phi_dropout`` leaves the weights alone: given, it replaces the checkpoint's dropout.
    """
    from diffusers_cir.conversion.lincir import convert_lincir_phi_checkpoint
    from diffusers_cir.models.textual_inversion_projection import TextualInversionProjection

    path = args.resume_phi
    if os.path.isdir(path):
        # A LinCIR pipeline folder (an earlier run's --output_dir) holds phi in its phi/ subfolder.
        is_pipeline = not os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, "phi", "config.json"))
        phi = TextualInversionProjection.from_pretrained(path, subfolder="phi" if is_pipeline else None)
        if args.l2_normalize and not phi.config.normalize_input:
            raise ValueError(
                f"--l2_normalize was given but --resume_phi {path!r} was saved with normalize_input=False: its weights "
                "expect unnormalised input. Leave --l2_normalize out to train it as saved."
            )
    else:
        phi = convert_lincir_phi_checkpoint(path, dropout=args.phi_dropout, normalize_input=bool(args.l2_normalize))
    if args.phi_hidden_dim is not None and args.phi_hidden_dim != phi.config.hidden_dim:
        raise ValueError(
            f"--phi_hidden_dim {args.phi_hidden_dim} does not match --resume_phi {path!r}, whose hidden layers have "
            f"width {phi.config.hidden_dim}. Leave --phi_hidden_dim out to train at the checkpoint's width."
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


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from diffusers_cir.conversion.lincir import (
        load_clip_image_encoder,
        load_clip_text_encoder,
        load_clip_tokenizer,
    )
    from diffusers_cir.models.textual_inversion_projection import TextualInversionProjection
    from diffusers_cir.pipelines.pipeline_lincir import LinCIRPipeline
    from diffusers_cir.pipelines.auto import resolve_pretrained_path
    from diffusers_cir.text import SelfMaskingCollator, load_keyword_extractor, self_masking_projection_loss
    from diffusers_cir.training.train_compodiff import (
        CHECKPOINT_PATTERN,
        check_output_dir,
        lr_warmup_warning,
        save_checkpoint,
    )

    # Before any model or data is loaded: a new run must not mix its checkpoints with an earlier run's.
    checkpoint = check_output_dir(args.output_dir, args.resume_from_checkpoint, args.max_train_steps)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs")),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    warmup_warning = lr_warmup_warning(args)
    if warmup_warning is not None and accelerator.is_main_process:
        logger.warning(warmup_warning)
    if args.resume_from_checkpoint == "latest" and checkpoint is None:
        logger.info("--resume_from_checkpoint latest: no checkpoint in %s yet, starting a new run.", args.output_dir)
    if args.seed is not None:
        set_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    # The data is opened before the models load, so a wrong --train_data / --validation_data fails at once.
    stream = caption_stream(args, accelerator.process_index, accelerator.num_processes)
    validation_set = load_validation_set(args.validation_data) if args.validation_data else None

    # Before the CLIP towers load: a checkpoint that contradicts the phi flags fails at once.
    phi = load_resumed_phi(args) if args.resume_phi else None

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    source_folder = resolve_pretrained_path(args.pretrained_model_name_or_path, {})
    text_encoder = load_clip_text_encoder(source_folder)
    tokenizer = load_clip_tokenizer(resolve_pretrained_path(args.tokenizer_name_or_path, {}) if args.tokenizer_name_or_path else source_folder)
    text_encoder.requires_grad_(False).eval().to(accelerator.device, dtype=weight_dtype)

    projection_dim, hidden_size = text_encoder.config.projection_dim, text_encoder.config.hidden_size
    if validation_set is not None and validation_set[0].shape[1] != projection_dim:
        raise ValueError(
            f"--validation_data {args.validation_data!r}: gallery.safetensors holds embeddings of width "
            f"{validation_set[0].shape[1]}, the CLIP joint space of --pretrained_model_name_or_path has width {projection_dim}."
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
            f"--resume_phi {args.resume_phi!r} maps {phi.config.input_dim} -> {phi.config.output_dim}, but the CLIP text tower of "
            f"--pretrained_model_name_or_path needs {projection_dim} (its projection_dim) -> {hidden_size} (its hidden_size)."
        )
    phi.train()
    ema_phi = None
    if args.use_ema:
        ema_phi = EMAModel(phi.parameters(), decay=args.ema_decay, model_cls=TextualInversionProjection, model_config=phi.config)

    optimizer = torch.optim.AdamW(phi.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )

    keyword_extractor = load_keyword_extractor(args.keyword_extractor, args.spacy_model)
    padding = "max_length" if args.pad_to_max_length else "longest"
    collator = SelfMaskingCollator(tokenizer, keyword_extractor, seed=args.seed, padding=padding)
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader as DataLoader
    except ImportError:  # exact resume of the stream position needs torchdata
        from torch.utils.data import DataLoader

        logger.warning("torchdata is not installed: a resumed run restarts the caption stream from its beginning.")
    dataloader = DataLoader(
        stream, batch_size=args.batch_size, collate_fn=SkipEmptyCaptions(collator), num_workers=args.dataloader_num_workers, drop_last=True
    )

    # The dataloader is not prepared: each process already reads its own part of the stream.
    phi, optimizer, lr_scheduler = accelerator.prepare(phi, optimizer, lr_scheduler)
    if ema_phi is not None:
        ema_phi.to(accelerator.device)
        accelerator.register_for_checkpointing(ema_phi)
    if hasattr(dataloader, "state_dict"):
        accelerator.register_for_checkpointing(dataloader)
    epochs = EpochCounter()  # passes over the caption stream, restored on resume (it seeds the reshuffle)
    accelerator.register_for_checkpointing(epochs)

    if accelerator.is_main_process:
        accelerator.init_trackers("train_lincir", config={k: str(v) for k, v in vars(args).items()})

    global_step, resumed_from_step = 0, None
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        global_step = resumed_from_step = int(CHECKPOINT_PATTERN.match(checkpoint.name).group(1))
        logger.info("Resumed from %s at step %d.", checkpoint, global_step)

    def unwrapped_phi(use_ema: bool) -> TextualInversionProjection:
        model = accelerator.unwrap_model(phi)
        if use_ema and ema_phi is not None:
            averaged = copy.deepcopy(model)
            ema_phi.copy_to(averaged.parameters())
            model = averaged
        return model

    def build_pipeline(with_vision: bool = False, for_saving: bool = False) -> LinCIRPipeline:
        image_encoder = image_processor = None
        frozen_text_encoder = text_encoder
        if for_saving and weight_dtype != torch.float32:
            # The frozen tower was cast to the mixed-precision dtype for training only: the saved pipeline gets the
            # source's weights as stored, not a half-precision copy next to a float32 phi and vision tower.
            frozen_text_encoder = load_clip_text_encoder(source_folder).eval().to(accelerator.device)
        if with_vision:
            image_encoder, image_processor = load_clip_image_encoder(source_folder)
            if image_encoder is None:
                logger.info("%s has no CLIP vision tower: the saved pipeline runs on precomputed image embeddings.", source_folder)
        return LinCIRPipeline(
            phi=unwrapped_phi(use_ema=True).eval(),
            text_encoder=frozen_text_encoder,
            tokenizer=tokenizer,
            image_encoder=image_encoder,
            image_processor=image_processor,
            prompt_template=args.prompt_template,
        )

    def validate(step: int, pipeline: LinCIRPipeline | None = None) -> dict | None:
        if validation_set is None or not accelerator.is_main_process:
            return None
        pipeline = pipeline or build_pipeline()
        pipeline.set_progress_bar_config(disable=True)
        results = evaluate_recall(pipeline, *validation_set, ks=args.validation_ks, exclude_reference=args.validation_exclude_reference)
        phi.train()
        accelerator.log({f"validation/{k}": v for k, v in results.items()}, step=step)
        logger.info("step %d validation: %s", step, json.dumps(results))
        return results

    progress = tqdm(total=args.max_train_steps, initial=global_step, desc="LinCIR steps", disable=not accelerator.is_local_main_process)
    placeholder_id = collator.placeholder_token_id
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed + accelerator.process_index) if args.seed is not None else None
    running_loss, keyword_share, logged_batches = 0.0, 0.0, 0
    skipped_captions = 0  # empty after cleaning (blank lines, nulls): no caption to mask, so not trained on
    first_pass_after_resume = resumed_from_step is not None  # may legitimately find the restored epoch exhausted
    while global_step < args.max_train_steps:
        if hasattr(stream, "set_epoch"):
            stream.set_epoch(epochs.epoch)
        batches_this_epoch = 0
        for batch in dataloader:
            skipped_captions += batch["num_skipped_captions"]
            if "input_ids" not in batch:  # every caption of the batch was empty
                continue
            batches_this_epoch += 1
            with accelerator.accumulate(phi), accelerator.autocast():
                loss = self_masking_projection_loss(
                    phi,
                    text_encoder,
                    batch["input_ids"].to(accelerator.device),
                    batch["masked_input_ids"].to(accelerator.device),
                    placeholder_token_id=placeholder_id,
                    noise_scale=args.noise_scale,
                    l2_normalize=False,  # phi normalises its own input when configured to
                    generator=generator,
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(phi.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            running_loss += accelerator.gather(loss.detach()).mean().item()
            keyword_share += batch["masked_by_keywords"].float().mean().item()
            logged_batches += 1
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            if ema_phi is not None:
                ema_phi.step(accelerator.unwrap_model(phi).parameters())
            if global_step % args.logging_steps == 0 or global_step == args.max_train_steps:
                logs = {
                    "train/loss": running_loss / logged_batches,
                    "train/lr": lr_scheduler.get_last_lr()[0],
                    "train/keyword_masked_share": keyword_share / logged_batches,
                    "train/skipped_empty_captions": skipped_captions,
                }
                accelerator.log(logs, step=global_step)
                progress.set_postfix(loss=f"{logs['train/loss']:.4g}")
                running_loss, keyword_share, logged_batches = 0.0, 0.0, 0
            if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
            # The last step is validated once, after training, on the pipeline as saved.
            if args.validation_steps and global_step % args.validation_steps == 0 and global_step < args.max_train_steps:
                validate(global_step)
            if global_step >= args.max_train_steps:
                break
        if batches_this_epoch == 0 and not first_pass_after_resume:
            raise ValueError(
                f"The caption stream yielded no full batch of {args.batch_size} captions: check --train_data or lower --batch_size."
            )
        epochs.epoch += 1
        first_pass_after_resume = False
    progress.close()

    accelerator.wait_for_everyone()
    skipped_captions = int(accelerator.reduce(torch.tensor(skipped_captions, device=accelerator.device), "sum").item())
    summary = {
        "global_step": global_step,
        "resumed_from_step": resumed_from_step,
        "output_dir": args.output_dir,
        "skipped_empty_captions": skipped_captions,
    }
    if skipped_captions and accelerator.is_main_process:
        logger.warning(
            "Skipped %d caption(s) of --train_data that are empty after cleaning (blank lines, null values, only '$'): "
            "there is nothing to mask in them, so the batches they were in trained on the others.",
            skipped_captions,
        )
    if accelerator.is_main_process:
        pipeline = build_pipeline(with_vision=not args.no_image_encoder, for_saving=True)
        pipeline.save_pretrained(args.output_dir)
        results = validate(global_step, pipeline)  # the numbers of the pipeline as saved
        if results is not None:
            summary["validation"] = results
            with open(os.path.join(args.output_dir, "validation_results.json"), "w", encoding="utf-8") as handle:
                json.dump({"step": global_step, **results}, handle, indent=2)
        logger.info("Saved the LinCIR pipeline to %s.", args.output_dir)
    accelerator.end_training()
    return summary


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
