# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""FashionBLIP-2's fine-tuning pieces: peft LoRA adapters on BLIP-2's Q-Former and the contrastive objective of
composed queries against their target images, both through the pipeline's own Q-Former passes
(:func:`~diffusers_cir.pipelines.pipeline_fashionblip2.query_states` and ``candidate_states``), so what trains is
what retrieves.

The hooks at the end make it the ``fashionblip2`` method of ``examples/train_fusion.py``
(:mod:`.fusion_methods`): the run's trained module is a :class:`FashionBLIP2Trainee` (the adapted model and the head
in one module, so that accelerate wraps, checkpoints and synchronises both through one ``forward``); the objective is
the trainer's contrastive loss (duplicate targets are not negatives, label smoothing) on the heads' scores.

Checkpoints (``checkpoint-<step>``) hold only what trains: accelerate's save and load pre-hooks
(:func:`register_checkpoint_hooks`) swap the trainee's full state dict for peft's adapter state dict and the head's,
and record an exact fingerprint of the frozen BLIP-2 it was made on (:data:`CHECKPOINT_BASE`); resuming rebuilds the
frozen part from ``--pretrained-model-name-or-path`` and refuses another base. A real BLIP-2's checkpoint is then
megabytes instead of gigabytes. The saved pipeline folder stays the whole model, adapters merged."""

from __future__ import annotations

import copy
import json
import os

import torch
import torch.nn.functional as F

from ..pipelines.pipeline_fashionblip2 import candidate_states, query_states

__all__ = ["CHECKPOINT_BASE", "QFORMER_LORA_TARGETS", "FashionBLIP2Trainee", "add_qformer_adapters", "base_record",
           "check_base", "fashionblip2_loss", "fashionblip2_pipeline", "fashionblip2_training_loss",
           "load_fashionblip2", "merged_model", "prepare_fashionblip2", "register_checkpoint_hooks"]

# The Q-Former's self- and cross-attention query and value projections (BLIP-2's vision tower names its fused
# projection `qkv`, so it stays frozen).
QFORMER_LORA_TARGETS = ("query", "value")


def add_qformer_adapters(model, rank: int = 8, alpha: int = 16, dropout: float = 0.0,
                         target_modules=QFORMER_LORA_TARGETS):
    """``model`` (a ``Blip2ForImageTextRetrieval``) wrapped by peft with LoRA adapters; only they train."""
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    # A string is a regex peft matches against the full module names; a sequence, names' last parts.
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets))


def merged_model(model):
    """The plain ``Blip2ForImageTextRetrieval`` of an adapted one, adapters merged into its weights (what a saved
    :class:`~diffusers_cir.FashionBLIP2Pipeline` holds)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def fashionblip2_loss(model, head, reference_pixels: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor, target_pixels: torch.Tensor, temperature: float = 0.07):
    """InfoNCE of each composed query against the batch's target images (the other rows' targets are the
    negatives); scores are the heads' mean cosine similarity. Returns the loss and the batch's Recall@1."""
    references = model.vision_model(pixel_values=reference_pixels).last_hidden_state
    targets = model.vision_model(pixel_values=target_pixels).last_hidden_state
    queries = head(query_states(model, references, input_ids, attention_mask), side="query").embeds
    candidates = head(candidate_states(model, targets), side="candidate").embeds
    logits = queries @ candidates.T / temperature
    labels = torch.arange(logits.shape[0], device=logits.device)
    recall = (logits.argmax(dim=1) == labels).float().mean()
    return F.cross_entropy(logits, labels), recall.detach()


# --------------------------------------------------------------------------------------------------- the trainer
class FashionBLIP2Trainee(torch.nn.Module):
    """The adapted ``Blip2ForImageTextRetrieval`` and the matching head; ``forward`` gives a batch's composed queries
    and its targets' candidate embeddings (both unit vectors, so their inner products are the multi-head scores)."""

    def __init__(self, model, head):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, reference_pixels, input_ids, attention_mask, target_pixels):
        references = self.model.vision_model(pixel_values=reference_pixels).last_hidden_state
        targets = self.model.vision_model(pixel_values=target_pixels).last_hidden_state
        queries = self.head(query_states(self.model, references, input_ids, attention_mask), side="query").embeds
        candidates = self.head(candidate_states(self.model, targets), side="candidate").embeds
        return queries, candidates

    def trainable_state_dict(self) -> dict:
        """What trains, for a checkpoint: the LoRA adapters (peft's selection of them, under ``model.``) and the
        matching head (under ``head.``); the frozen BLIP-2 is left out."""
        from peft import get_peft_model_state_dict

        adapters = get_peft_model_state_dict(self.model, save_embedding_layers=False)
        head = self.head.state_dict()
        return {**{f"model.{key}": value for key, value in adapters.items()},
                **{f"head.{key}": value for key, value in head.items()}}

    def load_trainable_state_dict(self, state: dict) -> None:
        """The inverse of :meth:`trainable_state_dict` (every adapter and head tensor must be there, nothing else)."""
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        adapters = {key[len("model."):]: value for key, value in state.items() if key.startswith("model.")}
        head = {key[len("head."):]: value for key, value in state.items() if key.startswith("head.")}
        expected = set(get_peft_model_state_dict(self.model, save_embedding_layers=False))
        others = sorted(set(state) - {f"model.{key}" for key in adapters} - {f"head.{key}" for key in head})
        if set(adapters) != expected or others:
            missing, unexpected = sorted(expected - set(adapters)), sorted(set(adapters) - expected) + others
            raise KeyError(f"the adapter weights do not fit this run's LoRA adapters (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}): were they saved with other --lora-* flags?")
        result = set_peft_model_state_dict(self.model, adapters)
        assert not result.unexpected_keys, result.unexpected_keys
        self.head.load_state_dict(head)


# What a checkpoint of the fashionblip2 method records beside the weights: the base model it needs.
CHECKPOINT_BASE = "fashionblip2_base.json"
_CHECKPOINT_FORMAT = "diffusers_cir.training.fashionblip2/1"


def base_record(model, source: str) -> dict:
    """The identity of the frozen base ``model`` (before adapters): an exact digest of its configuration and
    weights, and where it was loaded from (for the messages)."""
    from ..utils.fingerprint import module_digest

    return {"format": _CHECKPOINT_FORMAT, "base_fingerprint": module_digest(model, exact=True), "base": source}


def _lora_settings(model) -> dict:
    config = model.peft_config["default"]
    targets = config.target_modules
    return {"r": config.r, "lora_alpha": config.lora_alpha,
            "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets}


def check_base(saved: dict, base: dict, lora: dict) -> None:
    """Refuse a checkpoint made on another base model or with other LoRA settings: it holds only the adapters and
    the head, so resuming on another base would silently continue a different model."""
    from .arguments import flag
    from .checkpoints import CheckpointMismatchError

    if saved.get("base_fingerprint") != base["base_fingerprint"]:
        raise CheckpointMismatchError(
            f"it was made on the base model {saved.get('base')!r} (fingerprint {saved.get('base_fingerprint')}), but "
            f"{flag('pretrained_model_name_or_path')} {base['base']!r} has other weights or configuration (fingerprint "
            f"{base['base_fingerprint']}). Its checkpoints hold only the LoRA adapters and the matching head: resume "
            f"with the base model the run started from, or start a new run in another {flag('output_dir')}.")
    if saved.get("lora") != lora:
        raise CheckpointMismatchError(
            f"its LoRA adapters are {saved.get('lora')}, this run's are {lora}: resume with the {flag('lora_rank')}, "
            f"{flag('lora_alpha')} and {flag('lora_target_modules')} the run started with.")


def register_checkpoint_hooks(accelerator, base: dict) -> None:
    """Make ``accelerator.save_state`` write, and ``load_state`` read, only what trains of a
    :class:`FashionBLIP2Trainee` (:meth:`~FashionBLIP2Trainee.trainable_state_dict`, in accelerate's own model file)
    plus :data:`CHECKPOINT_BASE`; loading re-creates the frozen part from ``--pretrained-model-name-or-path`` (already
    loaded) after checking that it is the base the checkpoint was made on."""
    from accelerate.utils import SAFE_WEIGHTS_NAME
    from safetensors.torch import load_file

    def trainees(models):
        found = [(index, accelerator.unwrap_model(model)) for index, model in enumerate(models)]
        return [(index, model) for index, model in found if isinstance(model, FashionBLIP2Trainee)]

    def save(models, weights, output_dir):
        for index, trainee in trainees(models):
            weights[index] = trainee.trainable_state_dict()
            if accelerator.is_main_process:
                with open(os.path.join(output_dir, CHECKPOINT_BASE), "w", encoding="utf-8") as handle:
                    json.dump({**base, "lora": _lora_settings(trainee.model)}, handle, indent=2)

    def load(models, input_dir):
        for index, trainee in reversed(trainees(models)):
            weights = os.path.join(input_dir, SAFE_WEIGHTS_NAME if index == 0 else
                                   SAFE_WEIGHTS_NAME.replace(".", f"_{index}."))
            record = os.path.join(input_dir, CHECKPOINT_BASE)
            if not os.path.isfile(record):
                raise FileNotFoundError(f"{CHECKPOINT_BASE} is missing: without it the base model the checkpoint was "
                                        "made on cannot be checked.")
            with open(record, encoding="utf-8") as handle:
                check_base(json.load(handle), base, _lora_settings(trainee.model))
            trainee.load_trainable_state_dict(load_file(weights))
            del models[index]  # loaded here: accelerate must not load it again

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def load_fashionblip2(args):
    """The ``Encoders`` of a run: ``model`` (a ``Blip2ForImageTextRetrieval``), tokenizer and image processor from a
    BLIP-2 checkpoint, or those and the matching head of a saved ``FashionBLIP2Pipeline`` folder (training goes on)."""
    from transformers import AutoImageProcessor, AutoTokenizer, Blip2ForImageTextRetrieval

    from ..pipelines.auto import AutoCIRPipeline
    from ..pipelines.pipeline_fashionblip2 import FashionBLIP2Pipeline
    from .arguments import flag
    from .components import pretrained_folder
    from .fusion_components import Encoders, _model_type

    folder = pretrained_folder(args.pretrained_model_name_or_path, args.revision)
    source = args.pretrained_model_name_or_path
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        pipeline = AutoCIRPipeline.from_pretrained(folder)
        if not isinstance(pipeline, FashionBLIP2Pipeline):
            raise ValueError(f"{flag('pretrained_model_name_or_path')} {source!r} is a {type(pipeline).__name__} "
                             "folder: --method fashionblip2 goes on from a FashionBLIP2Pipeline or a BLIP-2 checkpoint.")
        return Encoders(None, pipeline.tokenizer, None, pipeline.image_processor, pipeline.matching_head, source,
                        model=pipeline.model)
    if _model_type(folder) != "blip-2":
        raise ValueError(f"{flag('pretrained_model_name_or_path')} {source!r} is neither a BLIP-2 checkpoint "
                         "(config.json of model_type 'blip-2') nor a FashionBLIP2Pipeline folder (model_index.json).")
    if not os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
        raise ValueError(f"{flag('pretrained_model_name_or_path')} {source!r} has no preprocessor_config.json: "
                         "FashionBLIP-2 trains on pixels and needs BLIP-2's image processor.")
    model = Blip2ForImageTextRetrieval.from_pretrained(folder).eval()
    return Encoders(None, AutoTokenizer.from_pretrained(folder), None, AutoImageProcessor.from_pretrained(folder),
                    None, source, model=model)


def prepare_fashionblip2(run) -> None:
    """LoRA on the Q-Former (float32: only the adapters and the head train), optimizer, LR scheduler, accelerate."""
    from .components import build_lr_scheduler, build_optimizer

    args, accelerator = run.args, run.accelerator
    base = base_record(run.parts.model, run.parts.source)
    model = add_qformer_adapters(run.parts.model, rank=args.lora_rank, alpha=args.lora_alpha,
                                 dropout=args.lora_dropout, target_modules=args.lora_target_modules or QFORMER_LORA_TARGETS)
    trainee = FashionBLIP2Trainee(model, run.head).to(accelerator.device).train()
    run.optimizer = build_optimizer(args, [p for p in trainee.parameters() if p.requires_grad], args.learning_rate)
    run.lr_scheduler = build_lr_scheduler(args, run.optimizer, accelerator)
    run.head, run.optimizer, run.lr_scheduler = accelerator.prepare(trainee, run.optimizer, run.lr_scheduler)
    register_checkpoint_hooks(accelerator, base)


def _tokens(run, texts: list[str]) -> dict:
    """The modification texts' tokens as :meth:`FashionBLIP2Pipeline.tokenize_prompt` makes them (cut at the Q-Former's
    positions; a cut text is logged)."""
    tokenizer, model = run.parts.tokenizer, run.parts.model
    max_length = min(int(tokenizer.model_max_length), int(model.config.qformer_config.max_position_embeddings))
    tokens = tokenizer(texts, padding="longest", max_length=max_length, truncation=True, return_tensors="pt")
    cut = int((tokens.attention_mask.sum(dim=1) >= max_length).sum())
    if cut:
        run.log.warning(f"{cut} modification text(s) of this batch cut at the Q-Former's {max_length} positions.")
    device = run.accelerator.device
    return {"input_ids": tokens.input_ids.to(device), "attention_mask": tokens.attention_mask.to(device)}


def fashionblip2_training_loss(run, batch: dict):
    """The trainer's contrastive loss of a batch's composed queries against its target images' candidate embeddings
    (a target image twice in the batch is not a negative of its twin); the batch's Recall@1 is logged beside it."""
    from .fusion_losses import contrastive_loss, duplicate_mask

    device = run.accelerator.device
    references = batch["reference_pixel_values"].to(device)
    targets = batch["target_pixel_values"].to(device)
    tokens = _tokens(run, batch["texts"])
    queries, candidates = run.head(references, tokens["input_ids"], tokens["attention_mask"], targets)
    keys = [bytes(row.cpu().numpy().tobytes()) for row in batch["target_pixel_values"]]
    loss = contrastive_loss(queries, candidates, run.args.temperature, run.args.label_smoothing,
                            duplicates=duplicate_mask(keys))
    rows = torch.arange(queries.shape[0], device=queries.device)
    recall = ((queries @ candidates.T).argmax(dim=1) == rows).float().mean()
    return loss, {"contrastive": loss.detach(), "recall_at1": recall.detach()}


def fashionblip2_pipeline(run, for_saving: bool = False):
    """The run's ``FashionBLIP2Pipeline``; when saving, a copy with the adapters merged (no peft in the folder)."""
    from ..pipelines.pipeline_fashionblip2 import FashionBLIP2Pipeline

    trainee = run.unwrap(run.head)
    model, head = trainee.model, trainee.head
    if for_saving:
        model, head = merged_model(copy.deepcopy(model)).to(torch.float32), copy.deepcopy(head).to(torch.float32)
    pipeline = FashionBLIP2Pipeline(model=model.eval(), matching_head=head.eval(), tokenizer=run.parts.tokenizer,
                                    image_processor=run.parts.image_processor)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
