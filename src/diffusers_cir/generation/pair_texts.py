# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Stage 6: modification texts of given image pairs (from any folder or dataset), two ways.

* **MTST** (Zhou et al., "Scale Up Composed Image Retrieval Learning via Modification Text Generation"): a generator
  that sees both images writes the modification text of the pair, and the reverse text (target -> reference).
* **FACap / FineCIR style**: a vision-language model describes each image, and a language model writes a
  (fine-grained) modification text from the two descriptions; the descriptions become the captions.

Any transformers image-text-to-text model works (``AutoModelForImageTextToText`` + ``AutoProcessor``). A processor
with a chat template gets both images in one message (LLaVA, Idefics, Qwen2-VL, SmolVLM, ...); a model that takes one
image (BLIP-2) gets the two side by side in one picture. Decoding is greedy unless ``do_sample``.

Example:
    >>> from diffusers_cir.generation.pair_texts import mtst_texts
    >>> texts = mtst_texts(vlm, processor, [(reference, target)], PairTextConfig())  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Sequence

from .config import PairTextConfig


def load_vision_language_model(name_or_path: str, torch_dtype=None, device=None):
    """``(model, processor)`` of an image-text-to-text model."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(name_or_path)
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=torch_dtype)
    return model.to(device or "cpu").eval(), processor


def side_by_side(images: Sequence):
    """The images in one RGB picture, left to right, each scaled to the first one's height."""
    from PIL import Image

    height = images[0].height
    scaled = [im if im.height == height else im.resize((max(1, round(im.width * height / im.height)), height))
              for im in images]
    canvas = Image.new("RGB", (sum(im.width for im in scaled), height))
    x = 0
    for im in scaled:
        canvas.paste(im.convert("RGB"), (x, 0))
        x += im.width
    return canvas


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def _new_tokens(output, input_ids):
    """The generated part: decoder-only models return the prompt first, encoder-decoder ones do not."""
    length = input_ids.shape[1]
    if output.shape[1] >= length and bool((output[:, :length] == input_ids.to(output.device)).all()):
        return output[:, length:]
    return output


def _generate(model, inputs: dict, config: PairTextConfig, seed: int):
    import torch

    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.inference_mode():
        torch.manual_seed(seed)
        return model.generate(**inputs, max_new_tokens=config.max_new_tokens, do_sample=config.do_sample)


def _to_model(inputs, model):
    parameter = next(model.parameters())
    return {k: (v.to(parameter.device, parameter.dtype) if v.is_floating_point() else v.to(parameter.device))
            for k, v in inputs.items()}


def ask_vision_language_model(model, processor, image_sets: Sequence[Sequence], prompt: str, config: PairTextConfig,
                              seed: int = 0) -> list[str]:
    """The first line of the model's answer to ``prompt`` about each set of images, ``config.batch_size`` at a time."""
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.padding_side = "left"
    chat = getattr(processor, "chat_template", None) is not None
    answers: list[str] = []
    for batch_index, start in enumerate(range(0, len(image_sets), config.batch_size)):
        batch = [list(images) for images in image_sets[start : start + config.batch_size]]
        if chat:
            texts = [processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": prompt}]}],
                add_generation_prompt=True) for images in batch]
            flat = [image for images in batch for image in images]
        else:
            texts = [prompt] * len(batch)
            flat = [images[0] if len(images) == 1 else side_by_side(images) for images in batch]
        inputs = _to_model(processor(text=texts, images=flat, padding=True, return_tensors="pt"), model)
        output = _generate(model, inputs, config, seed + batch_index)
        decoded = processor.batch_decode(_new_tokens(output, inputs["input_ids"]), skip_special_tokens=True)
        answers.extend(_first_line(text) for text in decoded)
    return answers


def ask_language_model(model, tokenizer, prompts: Sequence[str], config: PairTextConfig, seed: int = 0) -> list[str]:
    """The first line of a causal LM's answer to each prompt (through its chat template when it has one)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    answers: list[str] = []
    for batch_index, start in enumerate(range(0, len(prompts), config.batch_size)):
        batch = list(prompts[start : start + config.batch_size])
        if getattr(tokenizer, "chat_template", None):
            batch = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                   tokenize=False) for p in batch]
        inputs = _to_model(tokenizer(batch, padding=True, return_tensors="pt"), model)
        output = _generate(model, dict(inputs, pad_token_id=tokenizer.pad_token_id), config, seed + batch_index)
        decoded = tokenizer.batch_decode(_new_tokens(output, inputs["input_ids"]), skip_special_tokens=True)
        answers.extend(_first_line(text) for text in decoded)
    return answers


def mtst_texts(model, processor, pairs: Sequence[tuple], config: PairTextConfig, seed: int = 0
               ) -> list[tuple[str, str | None]]:
    """``(modification text, reverse text or None)`` of each ``(reference, target)`` image pair."""
    forward = ask_vision_language_model(model, processor, [(r, t) for r, t in pairs], config.mtst_prompt, config, seed)
    if not config.reverse:
        return [(text, None) for text in forward]
    reverse = ask_vision_language_model(model, processor, [(t, r) for r, t in pairs], config.mtst_prompt, config,
                                        seed + 1)
    return list(zip(forward, reverse))


def facap_texts(vlm, vlm_processor, llm, llm_tokenizer, pairs: Sequence[tuple], config: PairTextConfig,
                seed: int = 0) -> list[tuple[str, str, str]]:
    """``(reference description, target description, modification text)`` of each image pair."""
    images = [image for pair in pairs for image in pair]
    descriptions = ask_vision_language_model(vlm, vlm_processor, [(image,) for image in images],
                                             config.describe_prompt, config, seed)
    references, targets = descriptions[0::2], descriptions[1::2]
    prompts = [config.facap_prompt.format(reference=r, target=t) for r, t in zip(references, targets)]
    texts = ask_language_model(llm, llm_tokenizer, prompts, config, seed + 1)
    return list(zip(references, targets, texts))
