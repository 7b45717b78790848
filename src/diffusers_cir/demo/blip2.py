# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""The demo's small BLIP-2: what ``diffusers-cir demo --methods fashionblip2`` fine-tunes.

FashionBLIP-2 fine-tunes a *pretrained* BLIP-2 with LoRA adapters; no BLIP-2 weights ship with transformers and the
demo never downloads, so the package ships a small one pretrained on the picture world, made here. It is stock
``transformers.Blip2ForImageTextRetrieval`` (a ViT over 64 px pictures in 16 px patches, a Q-Former with 8 query
tokens over a BERT WordPiece vocabulary of the world's words) trained from random weights, vision tower included,
with BLIP-2's first-stage image-text contrast (ITC: the best-matching query token against the text's ``[CLS]``) on
(picture, caption) pairs, one row per item in a batch (items are distinct attribute combinations: no false
negatives).

BLIP-2's other two first-stage objectives are left out. Image-grounded captioning needs a language-model head
``Blip2ForImageTextRetrieval`` does not have. Image-text matching (ITM) was tried: at full weight it pulled ITC down
to chance within tens of steps; at weight 0.1 it stayed at its prior for 1,500 steps while halving the steps per
second. Two defaults of the configurations are changed for training from scratch: the vision tower's
``initializer_range`` (1e-10 in ``Blip2VisionConfig``: every picture gave the same output) and the Q-Former's dropout
(0.1 held ITC at chance).

``diffusers-cir demo --methods fashionblip2 --train-blip2 --update-shipped-pipeline`` trains it again and ships it
(:func:`export_blip2`).
"""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .encoders import PairTrainingRecipe, normalize_pixels, train_on_pairs

SHIPPED_BLIP2 = Path(__file__).resolve().parent / "picture_world_blip2"
RECIPE_FILE = "blip2_pretraining.json"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass
class Blip2Recipe(PairTrainingRecipe):
    """Sizes and first-stage training settings of the demo's BLIP-2 (our choice: about 13 minutes of 2-core CPU)."""

    steps: int = 3000
    width: int = 64  # the vision tower's and the Q-Former's width
    vision_layers: int = 4
    qformer_layers: int = 2
    num_heads: int = 4
    patch_size: int = 16  # 16 patches per 64 px picture, as the demo's CLIP
    num_query_tokens: int = 8
    temperature: float = 0.07  # BLIP-2's initial ITC temperature, kept fixed


def build_blip2(recipe: Blip2Recipe, image_size: int):
    """``(model, tokenizer, image_processor)``: an untrained ``Blip2ForImageTextRetrieval`` sized by ``recipe``, a
    BERT WordPiece tokenizer over the picture world's words, and BLIP's image processor at the pictures' size."""
    from transformers import BertTokenizer, Blip2Config, Blip2ForImageTextRetrieval, BlipImageProcessor

    from ..data.pictures import PictureWorld

    words = list(SPECIAL_TOKENS) + [word for word in PictureWorld.vocabulary() if word not in SPECIAL_TOKENS]
    tokenizer = BertTokenizer(vocab={word: index for index, word in enumerate(words)}, model_max_length=32)
    width = recipe.width
    config = Blip2Config(
        vision_config={"hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": recipe.vision_layers,
                       "num_attention_heads": recipe.num_heads, "image_size": image_size,
                       "patch_size": recipe.patch_size,
                       # Blip2VisionConfig defaults to 1e-10 (a pretrained tower is always loaded): from scratch,
                       # that tower outputs the same zeros for every picture and barely learns.
                       "initializer_range": 0.02},
        qformer_config={"hidden_size": width, "intermediate_size": 4 * width,
                        "num_hidden_layers": recipe.qformer_layers, "num_attention_heads": recipe.num_heads,
                        "vocab_size": len(words), "max_position_embeddings": 32, "encoder_hidden_size": width,
                        "cross_attention_frequency": 1, "use_qformer_text_input": True,
                        # BERT's dropout of 0.1 holds a Q-Former trained from scratch at chance: off.
                        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
        num_query_tokens=recipe.num_query_tokens, image_text_hidden_size=width,
    )
    torch.manual_seed(recipe.seed)
    model = Blip2ForImageTextRetrieval(config)
    with torch.no_grad():  # BLIP-2 starts its query tokens at zero; from scratch, distinct tokens learn faster
        model.query_tokens.normal_(std=1.0)
    processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    return model, tokenizer, processor


def contrastive_features(model, patches: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """BLIP-2's ITC features: the query tokens' projections of the pictures ``[B, Q, D]`` and the texts' ``[CLS]``
    projection ``[T, D]``, unit vectors (what ``Blip2ForImageTextRetrieval`` compares without its ITM head)."""
    from ..pipelines.pipeline_fashionblip2 import candidate_states

    images = F.normalize(model.vision_projection(candidate_states(model, patches)), dim=-1)
    texts = model.qformer(query_embeds=model.embeddings(input_ids=input_ids), query_length=0,
                          attention_mask=attention_mask).last_hidden_state
    return images, F.normalize(model.text_projection(texts[:, 0]), dim=-1)


def contrastive_loss(model, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """BLIP-2's ITC over a batch of matching (picture, caption) rows, all rows distinct: symmetric InfoNCE of the
    best-matching query token against the text's ``[CLS]``."""
    patches = model.vision_model(pixel_values=pixels).last_hidden_state
    images, texts = contrastive_features(model, patches, input_ids, attention_mask)
    scores = torch.einsum("bqd,td->bqt", images, texts).max(dim=1).values / temperature  # [B pictures, B texts]
    rows = torch.arange(len(scores))
    return (F.cross_entropy(scores, rows) + F.cross_entropy(scores.T, rows)) / 2


@torch.no_grad()
def caption_retrieval(model, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      batch_size: int = 512) -> dict:
    """Over the whole world, by ITC: is each picture's own caption the best of all captions, and the reverse."""
    images, texts = [], []
    for start in range(0, len(pixels), batch_size):
        part = slice(start, start + batch_size)
        patches = model.vision_model(pixel_values=pixels[part]).last_hidden_state
        image, text = contrastive_features(model, patches, input_ids[part], attention_mask[part])
        images.append(image), texts.append(text)
    scores = torch.einsum("bqd,td->bqt", torch.cat(images), torch.cat(texts)).max(dim=1).values
    truth = torch.arange(len(scores))
    return {"image_to_text_r1": float((scores.argmax(1) == truth).float().mean()),
            "text_to_image_r1": float((scores.argmax(0) == truth).float().mean())}


def pretrain_blip2(world, recipe: Blip2Recipe | None = None, pool: torch.Tensor | None = None, progress: bool = True,
                   log=print):
    """Train the small BLIP-2 on ``world``'s (picture, caption) pairs; returns ``(model, tokenizer,
    image_processor, summary)`` (the model in float32, eval mode; ``summary``: the final ITC loss and
    :func:`caption_retrieval` over the gallery pictures)."""
    from ..data.pictures import render_pool

    recipe = recipe or Blip2Recipe()
    model, tokenizer, processor = build_blip2(recipe, world.config.image_size)
    if pool is None:
        pool = render_pool(world, recipe.variants, progress=progress)
    captions = tokenizer(world.captions, padding="longest", return_tensors="pt")

    def loss(items, pixels):
        return contrastive_loss(model, pixels, captions.input_ids[items], captions.attention_mask[items],
                                recipe.temperature)

    losses = train_on_pairs(model, world, recipe, pool, processor, loss, "pretraining the BLIP-2 (ITC)",
                            progress=progress, log=log, no_decay=("embedding", "query_tokens"))
    summary = {"final_itc": float(np.mean(losses[-50:])), **caption_retrieval(
        model, normalize_pixels(pool[:, 0], processor), captions.input_ids, captions.attention_mask)}
    log(f"BLIP-2: ITC {summary['final_itc']:.3f}, image->caption R@1 {summary['image_to_text_r1']:.3f}, "
        f"caption->image R@1 {summary['text_to_image_r1']:.3f}")
    return model, tokenizer, processor, summary


def save_blip2(folder: str | Path, model, tokenizer, processor, recipe: Blip2Recipe, summary: dict) -> Path:
    """The BLIP-2 checkpoint folder ``--method fashionblip2`` starts from (config, weights, tokenizer, image
    processor), with the recipe and what was measured in ``blip2_pretraining.json``."""
    folder = Path(folder)
    for part in (model, tokenizer, processor):
        part.save_pretrained(folder)
    (folder / RECIPE_FILE).write_text(json.dumps({"recipe": recipe.to_dict(), "summary": summary}, indent=2) + "\n",
                                      encoding="utf-8")
    return folder


def pretrained_blip2(folder: str | Path) -> dict:
    """``blip2_pretraining.json`` of a folder :func:`save_blip2` wrote (``{}`` when there is none)."""
    path = Path(folder) / RECIPE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def shipped_blip2_command(recipe: Blip2Recipe) -> str:
    argv = ["diffusers-cir", "demo", "--methods", "fashionblip2", "--train-blip2", "--update-shipped-pipeline"]
    if recipe.steps != Blip2Recipe().steps:
        argv += ["--blip2-steps", str(recipe.steps)]
    return shlex.join(argv)


def export_blip2(trained: str | Path, target: str | Path | None = None, measured: dict | None = None) -> Path:
    """Copy a trained BLIP-2 folder into ``target`` (default: the shipped one, replaced), adding ``measured`` (the
    demo's Recall@K with it) and the command that made it to its ``blip2_pretraining.json``."""
    target = Path(target if target is not None else SHIPPED_BLIP2)
    info = pretrained_blip2(trained)
    assert info, f"{trained} is not a folder save_blip2 wrote"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(trained, target)
    info["made_with"] = shipped_blip2_command(Blip2Recipe(**info["recipe"]))
    if measured:
        info["fashionblip2_demo"] = measured
    (target / RECIPE_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return target

