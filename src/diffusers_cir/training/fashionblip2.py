# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""FashionBLIP-2's fine-tuning pieces: peft LoRA adapters on BLIP-2's Q-Former and the contrastive objective of
composed queries against their target images, both through the pipeline's own Q-Former passes
(:func:`~diffusers_cir.pipelines.pipeline_fashionblip2.query_states` and ``candidate_states``), so what trains is
what retrieves."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..pipelines.pipeline_fashionblip2 import candidate_states, query_states

__all__ = ["QFORMER_LORA_TARGETS", "add_qformer_adapters", "fashionblip2_loss", "merged_model"]

# The Q-Former's self- and cross-attention query and value projections (BLIP-2's vision tower names its fused
# projection `qkv`, so it stays frozen).
QFORMER_LORA_TARGETS = ("query", "value")


def add_qformer_adapters(model, rank: int = 8, alpha: int = 16, dropout: float = 0.0,
                         target_modules=QFORMER_LORA_TARGETS):
    """``model`` (a ``Blip2ForImageTextRetrieval``) wrapped by peft with LoRA adapters; only they train."""
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                                            target_modules=list(target_modules)))


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
