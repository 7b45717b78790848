# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""The demo's small CLIP: image and text towers trained contrastively on the picture world.

``transformers.CLIPModel`` with tiny configurations (a ViT over 64 px pictures in 16 px patches, a text transformer
over a CLIP tokenizer restricted to the world's words, see
:func:`~diffusers_cir.utils.tokenizer.build_clip_tokenizer_for_words`) is trained with its own symmetric contrastive
loss (``return_loss=True``) on (picture, caption) pairs: jittered variants of every item's picture against its
caption, one item per row of a batch (no false negatives). The towers are then split into the
``CLIPVisionModelWithProjection`` / ``CLIPTextModelWithProjection`` that ``CompoDiffPipeline`` takes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..data.pictures import PictureWorld, render_pool


@dataclass
class PairTrainingRecipe:
    """What the demo's contrastive trainings on (picture, caption) pairs share (:func:`train_on_pairs`)."""

    variants: int = 6  # pictures per item in the training pool (variant 0 is the gallery picture)
    steps: int = 1500
    batch_size: int = 256
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.05
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ClipRecipe(PairTrainingRecipe):
    """Sizes and training settings of the demo's CLIP pair."""

    hidden_size: int = 64  # vision width
    text_hidden_size: int = 64  # text width: also CompoDiff's text_embedding_dim
    projection_dim: int = 64  # the shared embedding space: CompoDiff's embedding_dim
    num_layers: int = 4
    text_num_layers: int = 2
    num_heads: int = 4
    patch_size: int = 16  # 16 tokens per 64 px picture: 4x cheaper than 8 px patches, and enough


def picture_image_processor(image_size: int):
    """CLIP preprocessing at the world's picture size: a picture of that size is only normalised."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def build_clip_model(recipe: ClipRecipe, vocab_size: int, image_size: int, seed: int = 0):
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    text_config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=recipe.text_hidden_size, intermediate_size=4 * recipe.text_hidden_size,
        num_hidden_layers=recipe.text_num_layers, num_attention_heads=recipe.num_heads, max_position_embeddings=77,
        projection_dim=recipe.projection_dim, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=recipe.hidden_size, intermediate_size=4 * recipe.hidden_size, num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads, image_size=image_size, patch_size=recipe.patch_size,
        projection_dim=recipe.projection_dim,
    )
    torch.manual_seed(seed)
    config = CLIPConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(),
                        projection_dim=recipe.projection_dim)
    return CLIPModel(config)


def normalize_pixels(pictures: torch.Tensor, image_processor) -> torch.Tensor:
    """CLIP pixel values ``[N, 3, H, W]`` of ``uint8 [N, H, W, 3]`` pictures already at the processor's size (what the
    processor computes for them: checked in the tests)."""
    mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
    return (pictures.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def train_clip(world: PictureWorld, recipe: ClipRecipe | None = None, pool: torch.Tensor | None = None,
               progress: bool = True, log=print):
    """Train the CLIP pair on ``world``; returns ``(text_encoder, tokenizer, image_encoder, image_processor,
    summary)`` (the towers in float32, eval mode; ``summary``: loss and the retrieval check below).

    The check: for every gallery picture, is its own caption the nearest of all captions (image-to-text R@1), and
    the reverse, over the whole world.
    """
    from ..utils.tokenizer import build_clip_tokenizer_for_words

    recipe = recipe or ClipRecipe()
    tokenizer = build_clip_tokenizer_for_words(PictureWorld.vocabulary())
    image_processor = picture_image_processor(world.config.image_size)
    model = build_clip_model(recipe, len(tokenizer), world.config.image_size, seed=recipe.seed)
    if pool is None:
        pool = render_pool(world, recipe.variants, progress=progress)
    # Padded to the longest caption, not to 77: the tower is causal and pools the end-of-text state, so what follows
    # it changes nothing, and the short batch is five times faster.
    caption_ids = tokenizer(world.captions, padding="longest", return_tensors="pt").input_ids

    def loss(items, pixels):
        return model(input_ids=caption_ids[items], pixel_values=pixels, return_loss=True).loss

    def clamp_temperature():  # CLIP clamps its temperature at 100
        model.logit_scale.clamp_(0, math.log(100))

    losses = train_on_pairs(model, world, recipe, pool, image_processor, loss, "training the CLIP pair",
                            progress=progress, log=log, after_step=clamp_temperature)
    text_encoder, image_encoder = split_towers(model)
    summary = {"final_loss": float(np.mean(losses[-50:])), **caption_retrieval(
        text_encoder, image_encoder, caption_ids, normalize_pixels(pool[:, 0], image_processor))}
    log(f"CLIP pair: loss {summary['final_loss']:.3f}, image->caption R@1 {summary['image_to_text_r1']:.3f}, "
        f"caption->image R@1 {summary['text_to_image_r1']:.3f}")
    return text_encoder, tokenizer, image_encoder, image_processor, summary


def train_on_pairs(model, world: PictureWorld, recipe: PairTrainingRecipe, pool: torch.Tensor, image_processor, loss,
                   description: str, progress: bool = True, log=print, no_decay: tuple[str, ...] = ("embedding",),
                   after_step=None) -> list[float]:
    """Train ``model`` (in place; eval mode after) on (picture, caption) pairs; returns the loss of every step.

    Each step draws ``recipe.batch_size`` distinct items (one row per item: no false negatives) and a random variant
    of each from ``pool`` (``uint8 [items, variants, H, W, 3]``), and calls ``loss(items, pixel_values)``; AdamW with
    weight decay on the matrices whose names hold none of ``no_decay``, a cosine schedule after a warmup, gradients
    clipped at norm 1, then ``after_step()`` (under ``torch.no_grad``)."""
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from tqdm.auto import tqdm

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and not any(word in n for word in no_decay)]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and not any(word in n for word in no_decay))]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                   {"params": other, "weight_decay": 0.0}], lr=recipe.learning_rate)
    schedule = get_cosine_schedule_with_warmup(optimizer, recipe.warmup_steps, recipe.steps)
    generator = torch.Generator().manual_seed(recipe.seed)
    batch = min(recipe.batch_size, world.num_items)
    model.train()
    bar = tqdm(range(recipe.steps), desc=description, disable=not progress)
    losses = []
    for _ in bar:
        items = torch.randperm(world.num_items, generator=generator)[:batch]
        variants = torch.randint(recipe.variants, (batch,), generator=generator)
        value = loss(items, normalize_pixels(pool[items, variants], image_processor))
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if after_step is not None:
            with torch.no_grad():
                after_step()
        losses.append(value.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if not progress and len(losses) % 100 == 0:
            log(f"{description}: step {len(losses)}, loss {np.mean(losses[-100:]):.3f}")
    model.eval()
    return losses


def split_towers(model):
    """``(CLIPTextModelWithProjection, CLIPVisionModelWithProjection)`` holding ``model``'s trained weights."""
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    text = CLIPTextModelWithProjection(model.config.text_config)
    vision = CLIPVisionModelWithProjection(model.config.vision_config)
    state = model.state_dict()
    for tower in (text, vision):
        missing, unexpected = tower.load_state_dict({k: v for k, v in state.items() if k in tower.state_dict()},
                                                    strict=False)
        assert not missing and not unexpected, (missing, unexpected)
    return text.eval().requires_grad_(False), vision.eval().requires_grad_(False)


@torch.no_grad()
def caption_retrieval(text_encoder, image_encoder, caption_ids, pixel_values, batch_size: int = 512) -> dict:
    texts = torch.cat([text_encoder(input_ids=caption_ids[i:i + batch_size]).text_embeds
                       for i in range(0, len(caption_ids), batch_size)])
    images = torch.cat([image_encoder(pixel_values=pixel_values[i:i + batch_size]).image_embeds
                        for i in range(0, len(pixel_values), batch_size)])
    scores = torch.nn.functional.normalize(images, dim=-1) @ torch.nn.functional.normalize(texts, dim=-1).T
    truth = torch.arange(len(scores))
    return {"image_to_text_r1": float((scores.argmax(1) == truth).float().mean()),
            "text_to_image_r1": float((scores.argmax(0) == truth).float().mean())}
