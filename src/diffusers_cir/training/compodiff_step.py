# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""One CompoDiff training step: the conditions of a batch (objectives, masks, reference scale, dropout) and its loss.

The masked (inpainting) objective is the paper's stage-2 "inpainting" task: 30% of its rows, on LAION image-text
pairs, with ClipSeg masks of the caption's object terms resized to 64x64. The paper does not say how an inpainting
row is conditioned; this package's design (the same at inference, see :meth:`CompoDiffPipeline.prepare_mask`): the
reference condition is the CLIP embedding of the target image with the masked pixels zeroed, the text is the target's
caption, the mask is the mask, and the model predicts the embedding of the whole target. Its masks are random boxes
(``--masked-objective-masks boxes``, images only) or the data's precomputed ClipSeg masks (``data``: the images, or
the ``masked_target_image_embeds`` written next to the embeddings). A caption row drawn for the masked objective whose
data has no mask is trained as text-to-image. Triplet rows carry their stored mask (zeros when there is none).

The reference embedding is given the same scale in training and at inference on every data path (stored embeddings,
images encoded on the fly, masked images): L2-normalised and multiplied by the pipeline's ``image_embeds_norm``
(:func:`reference_condition`), or used as the encoder gives it for models whose pipeline has none (the released
models). A new model takes the target scale (``--embedding-scale``), which the saved pipeline records.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from .compodiff_arguments import embedding_scale

__all__ = ["Conditioning", "pretrained_image_embeds_norm", "reference_condition", "training_loss"]


def reference_condition(reference: torch.Tensor, norm: float | None) -> torch.Tensor:
    """The reference image embedding as the denoiser reads it: rescaled to L2 norm ``norm`` (a zero row, "no
    reference", stays zero), or as given when ``norm`` is ``None``."""
    return reference if norm is None else F.normalize(reference, dim=-1) * norm


def pretrained_image_embeds_norm(folder: str | None) -> float | None:
    """The ``image_embeds_norm`` recorded in a pipeline folder's ``model_index.json`` (``None``: absent)."""
    if folder is None or not os.path.isfile(os.path.join(folder, "model_index.json")):
        return None
    with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as handle:
        value = json.load(handle).get("image_embeds_norm")
    return None if value is None else float(value)


class Conditioning:
    """Per-run constants of a step: condition dropout, the text conditioner (cached), the ``""`` encoding, the masked
    share of caption rows, the target scale and the reference norm."""

    def __init__(self, run, reference_norm: float | None):
        from .conditioning import CachedTextEncoder, ConditionDropout

        args = run.args
        self.dropout = ConditionDropout(args.text_drop_prob, args.image_drop_prob, args.both_drop_prob,
                                        independent=args.condition_dropout == "independent")
        conditioner = run.encoders.text_conditioner
        self.encode_text = CachedTextEncoder(conditioner, max_entries=args.text_embedding_cache_size)
        self.null_text = self.encode_text(conditioner.tokenize([""])[0])
        self.masked_share = run.ratios.masked_share_of_caption_rows if args.stage == "triplet" else 0.0
        self.boxes = args.masked_objective_masks == "boxes"
        self.scale = embedding_scale(args, run.unwrapped.config.embedding_dim)
        self.reference_norm = reference_norm
        self._reference_checked = reference_norm is not None

    def check_reference_scale(self, reference: torch.Tensor) -> None:
        """Refuse, once, unit-norm stored references for a model that reads raw CLIP norms (no ``image_embeds_norm``):
        the pipeline would feed it raw embeddings at inference."""
        if self._reference_checked:
            return
        norms = reference.float().norm(dim=-1)
        norms = norms[norms > 0]
        if len(norms) and bool(((norms - 1).abs() < 1e-3).all()):
            raise ValueError(
                "The model reads reference embeddings as the image encoder gives them (its pipeline records no "
                "image_embeds_norm, as the released models), but the training data stores them L2-normalised: it would "
                "learn from another scale than the pipeline feeds it. Precompute the embeddings without normalising "
                "(`examples/precompute_embeddings.py --no-normalize`), or train from the `images` configuration."
            )
        self._reference_checked = True


def _masked_rows(run, batch: dict, is_caption: torch.Tensor, conditioning: Conditioning) -> torch.Tensor | None:
    """Which caption rows train the masked objective (a draw per row; with data masks, only rows that have one)."""
    if conditioning.masked_share <= 0:
        return None
    device = is_caption.device
    draw = torch.rand(len(batch["ids"]), device=device, generator=run.noise_generator)
    rows = is_caption & (draw < conditioning.masked_share)
    if not conditioning.boxes:
        mask = batch.get("mask")
        has_mask = mask.to(device).flatten(1).any(dim=1) if mask is not None else torch.zeros_like(rows)
        if run.source == "embeddings":
            has_mask &= batch["masked_target_image_embeds"].to(device).flatten(1).any(dim=1)
        rows &= has_mask
    return rows


def _image_embeddings(run, batch: dict, is_caption, masked_rows):
    """``(target, reference, boxes)`` for a batch of the `images` configuration, encoded on the fly; masked rows get
    the embedding of the target with its mask (random boxes, or the data's) blanked as reference."""
    from .masking import masked_image_embeds, random_box_masks

    device, rows = run.accelerator.device, len(batch["ids"])
    target_pixels = batch["target_pixel_values"].to(device, dtype=run.dtype)
    with torch.no_grad():
        target = run.encoders.image_encoder(pixel_values=target_pixels).image_embeds.float()
        reference = run.encoders.image_encoder(
            pixel_values=batch["reference_pixel_values"].to(device, dtype=run.dtype)
        ).image_embeds.float()
    # Caption rows have no reference: zero it (CLIP of black pixels is not zero).
    reference = torch.where(is_caption[:, None], torch.zeros_like(reference), reference)
    boxes = None
    if masked_rows is not None and bool(masked_rows.any()):
        if run.args.masked_objective_masks == "boxes":
            boxes = random_box_masks(rows, run.unwrapped.config.mask_size, device=device, generator=run.noise_generator)
        else:
            boxes = batch["mask"].to(device).float()
        blanked = masked_image_embeds(run.encoders.image_encoder, target_pixels, boxes).float()
        reference = torch.where(masked_rows[:, None], blanked, reference)
    return target, reference, boxes


def _count_objectives(run, rows: int, is_caption: torch.Tensor, masked_rows: torch.Tensor | None) -> None:
    masked_count = int(masked_rows.sum()) if masked_rows is not None else 0
    run.objective_rows["masked"] += masked_count
    run.objective_rows["text_to_image"] += int(is_caption.sum()) - masked_count
    run.objective_rows["triplet"] += rows - int(is_caption.sum())


def training_loss(run, conditioning: Conditioning, batch: dict) -> torch.Tensor:
    """The loss of one batch (conditions built, dropped and noised with the run's noise generator)."""
    from .losses import compodiff_loss

    device, rows = run.accelerator.device, len(batch["ids"])
    is_caption = batch["is_text_to_image"].to(device)
    masked_rows = _masked_rows(run, batch, is_caption, conditioning)
    boxes = None
    if run.source == "embeddings":
        target = batch["target_image_embeds"].to(device).float()
        reference = batch["reference_image_embeds"].to(device).float()
        if masked_rows is not None and bool(masked_rows.any()):
            masked = batch["masked_target_image_embeds"].to(device).float()
            reference = torch.where(masked_rows[:, None], masked, reference)
            boxes = batch["mask"].to(device).float()
        conditioning.check_reference_scale(reference)
    else:
        target, reference, boxes = _image_embeddings(run, batch, is_caption, masked_rows)
    mask = batch.get("mask")
    if mask is not None:
        mask = torch.where(is_caption[:, None, None], 0.0, mask.to(device).float())  # caption rows: no edit region
    if boxes is not None:
        mask = torch.where(masked_rows[:, None, None], boxes, mask if mask is not None else torch.zeros_like(boxes))
    _count_objectives(run, rows, is_caption, masked_rows)

    if conditioning.scale is not None:
        target = F.normalize(target, dim=-1) * conditioning.scale
    reference = reference_condition(reference, conditioning.reference_norm)
    text_ids = [batch["input_ids"]] + ([batch["input_ids_2"]] if "input_ids_2" in batch else [])
    text_hidden_states = conditioning.encode_text([ids.to(device) for ids in text_ids])
    image_embeds, text_hidden_states, _, _ = conditioning.dropout.apply(
        reference, text_hidden_states, conditioning.null_text, generator=run.noise_generator
    )
    return compodiff_loss(run.transformer, run.noise_scheduler, target, image_embeds, text_hidden_states, mask,
                          generator=run.noise_generator)
