# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""``diffusers-cir generate --demo``: every stage, offline, on tiny random models built in code.

The demo writes its inputs (a dozen captions, caption triplets to teach the tiny LM the triplet format, and a few
drawn image pairs) under ``OUTPUT/generation/demo_inputs/``, then runs all four strategies into ``OUTPUT``. Random
models make random images and texts; what the demo shows is the machinery: shards, resume, counts, card and contact
sheet. Two settings are fitted to the tiny models and recorded as such in the recipe:

* the keyword band is the middle of the tiny CLIP text tower's similarities between the demo's terms (its
  similarities sit far higher than CLIP ViT-L/14's, so 0.5-0.7 would find no replacement);
* the tiny LM is first taught the triplet format on the demo's caption triplets (the fine-tuning loop of
  :mod:`.finetune`, full weights), since a random LM never writes ``instruction %% caption END``.

* the CLIP thresholds: a random CLIP scores every image pair about 1.0 image-image and everything else around 0 with
  a spread of about 0.2, so the paper's thresholds would drop nearly every pair at the image-caption filter. The
  demo's thresholds (:data:`DEMO_FILTERS`) keep about half at each filter, so every filter is seen at work.
"""

from __future__ import annotations

import json
import os

from .config import (
    FilterConfig,
    GenerationConfig,
    ImagePairConfig,
    KeywordConfig,
    LLMConfig,
    MaskConfig,
    PairTextConfig,
)

DEMO_CAPTIONS = (
    "a photo of a red cup on a wooden table",
    "a dog running on the beach",
    "a painting of a house in the snow",
    "a bowl of apples on a kitchen table",
    "a man riding a bicycle in the city",
    "a cat sleeping on a sofa",
    "a boat on a lake at sunset",
    "a bird sitting on a tree",
)

DEMO_EDITS = (
    ("a photo of a red cup on a wooden table", "make the cup blue", "a photo of a blue cup on a wooden table"),
    ("a dog running on the beach", "turn the dog into a horse", "a horse running on the beach"),
    ("a painting of a house in the snow", "make it summer", "a painting of a house in the summer"),
    ("a bowl of apples on a kitchen table", "replace the apples with pears", "a bowl of pears on a kitchen table"),
    ("a man riding a bicycle in the city", "make him ride a horse", "a man riding a horse in the city"),
    ("a cat sleeping on a sofa", "make the cat a dog", "a dog sleeping on a sofa"),
)

DEMO_FILTERS = FilterConfig(image_caption=-0.05, image_image=0.70, directional=0.0, keyword_image=0.14,
                            instruction_image=0.15)

_SHAPES = (((220, 40, 40), "ellipse"), ((40, 80, 220), "rectangle"), ((40, 160, 60), "ellipse"),
           ((230, 200, 40), "rectangle"))


def write_demo_inputs(folder: str) -> dict[str, str]:
    """Captions, caption triplets and drawn image pairs under ``folder``; returns their paths."""
    from PIL import Image, ImageDraw

    os.makedirs(folder, exist_ok=True)
    captions = os.path.join(folder, "captions.txt")
    with open(captions, "w", encoding="utf-8") as handle:
        handle.write("\n".join(DEMO_CAPTIONS) + "\n")
    edits = os.path.join(folder, "caption_triplets.jsonl")
    with open(edits, "w", encoding="utf-8") as handle:
        for caption, edit, output in DEMO_EDITS:
            handle.write(json.dumps({"input": caption, "edit": edit, "output": output}) + "\n")
    pairs = os.path.join(folder, "pairs")
    for index in range(len(_SHAPES)):
        pair = os.path.join(pairs, f"pair-{index:02d}")
        os.makedirs(pair, exist_ok=True)
        for name, (color, shape) in (("reference", _SHAPES[index]), ("target", _SHAPES[(index + 1) % len(_SHAPES)])):
            image = Image.new("RGB", (48, 48), (245, 245, 240))
            draw = ImageDraw.Draw(image)
            getattr(draw, shape)((10 + index, 10, 38, 38 - index), fill=color)
            image.save(os.path.join(pair, f"{name}.png"))
    return {"captions": captions, "caption_triplets": edits, "image_pairs": pairs}


def demo_keyword_band(components, captions) -> tuple[float, float]:
    """The 25th-75th percentile band of the tiny text tower's similarities between the demo's object terms."""
    import torch

    from .keyword_triplets import count_object_terms, encode_terms

    terms = sorted(count_object_terms(captions, components.tagger))
    embeddings = encode_terms(components.clip_model, components.clip_processor, terms)
    similarity = embeddings @ embeddings.T
    off_diagonal = similarity[~torch.eye(len(terms), dtype=torch.bool)]
    low, high = torch.quantile(off_diagonal, torch.tensor([0.25, 0.75])).tolist()
    return round(low, 3), round(high, 3)


def demo_config(inputs: dict[str, str], band: tuple[float, float]) -> GenerationConfig:
    return GenerationConfig(
        strategies=("keyword", "llm", "mtst", "facap"),
        captions=inputs["captions"], image_pairs=inputs["image_pairs"],
        items_per_shard=4, chunk_size=4, seed=0, image_format="png",
        keyword=KeywordConfig(similarity_band=band, tagger="builtin", max_candidates=8),
        llm=LLMConfig(max_new_tokens=120, batch_size=8),
        image=ImagePairConfig(num_seeds=2, keep_per_triplet=1, num_inference_steps=3, guidance_scale=7.5,
                              batch_size=8),
        filters=DEMO_FILTERS,
        masks=MaskConfig(),
        pairs=PairTextConfig(max_new_tokens=12, batch_size=8),
    )


def teach_triplet_format(components, caption_triplets_path: str, steps: int = 60) -> None:
    """Fine-tune the demo's tiny caption editor (full weights) on the demo's caption triplets."""
    from .finetune import FinetuneConfig, finetune_caption_editor, read_caption_triplets

    triplets = read_caption_triplets(caption_triplets_path)
    config = FinetuneConfig(learning_rate=1e-2, max_train_steps=steps, train_batch_size=len(triplets),
                            lr_scheduler="constant", use_lora=False, seed=0)
    model = finetune_caption_editor(components.caption_editor, components.caption_editor_tokenizer, triplets, config,
                                    progress=False)
    components.caption_editor = model.eval()
    components.names["caption_editor"] += f", taught the triplet format for {steps} steps on the demo triplets"


def run_demo(output_dir: str, overwrite: bool = False, progress: bool = True, contact_sheet_rows: int = 48):
    """Run every stage on tiny components into ``output_dir``; returns the :class:`GenerationResult`."""
    from .runner import run_generation
    from .tiny import tiny_components

    inputs = write_demo_inputs(os.path.join(output_dir, "generation", "demo_inputs"))
    components = tiny_components()
    teach_triplet_format(components, inputs["caption_triplets"])
    config = demo_config(inputs, demo_keyword_band(components, DEMO_CAPTIONS))
    return run_generation(config, components, output_dir, overwrite=overwrite, progress=progress,
                          contact_sheet_rows=contact_sheet_rows)
