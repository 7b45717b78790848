# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Stage 2: caption triplets written by a causal language model.

SynthTriplets18M fine-tuned OPT-6.7B on InstructPix2Pix's 452k (caption, instruction, edited caption) triplets and
sampled 30M more from it. Any transformers causal LM works here (a peft LoRA adapter on top, too); fine-tune one with
``examples/generation/finetune_caption_editor.py``. Prompt and completion use InstructPix2Pix's separators::

    {caption}\\n##\\n{instruction}\\n%%\\n{edited caption}\\nEND

A sample that does not have that shape (no separator, no END before the token budget ran out, an empty part, or an
edited caption equal to the caption) is not a triplet and is counted as such.

Example:
    >>> from diffusers_cir.generation.llm_triplets import format_completion, format_prompt, parse_completion
    >>> format_prompt("a cat on a sofa")
    'a cat on a sofa\\n##\\n'
    >>> parse_completion(format_completion("make it a dog", "a dog on a sofa"))
    ('make it a dog', 'a dog on a sofa')
"""

from __future__ import annotations

from typing import Sequence

from .config import LLMConfig
from .records import CaptionTriplet

PROMPT_END = "\n##\n"
EDIT_SEPARATOR = "\n%%\n"
COMPLETION_END = "\nEND"


def format_prompt(caption: str) -> str:
    return " ".join(caption.split()) + PROMPT_END


def format_completion(instruction: str, edited_caption: str) -> str:
    return " ".join(instruction.split()) + EDIT_SEPARATOR + " ".join(edited_caption.split()) + COMPLETION_END


def parse_completion(text: str) -> tuple[str, str] | None:
    """``(instruction, edited caption)`` of a sampled completion, or None if it is not one."""
    if COMPLETION_END not in text:
        return None
    text = text.split(COMPLETION_END, 1)[0]
    if text.count(EDIT_SEPARATOR) != 1:
        return None
    instruction, edited = (" ".join(part.split()) for part in text.split(EDIT_SEPARATOR))
    if not instruction or not edited:
        return None
    return instruction, edited


def tokenize_caption_triplet(tokenizer, caption: str, instruction: str, edited_caption: str, max_length: int = 256):
    """``{"input_ids", "labels"}`` of one training example: the loss is on the completion (and EOS) only."""
    prompt = tokenizer(format_prompt(caption), add_special_tokens=False)["input_ids"]
    completion = tokenizer(format_completion(instruction, edited_caption), add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    input_ids = (bos + prompt + completion + [tokenizer.eos_token_id])[:max_length]
    labels = ([-100] * (len(bos) + len(prompt)) + completion + [tokenizer.eos_token_id])[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def collate_caption_triplets(examples: Sequence[dict], pad_token_id: int) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding) tensors."""
    import torch

    length = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for example in examples:
        pad = length - len(example["input_ids"])
        batch["input_ids"].append(example["input_ids"] + [pad_token_id] * pad)
        batch["attention_mask"].append([1] * len(example["input_ids"]) + [0] * pad)
        batch["labels"].append(example["labels"] + [-100] * pad)
    return {key: torch.tensor(value) for key, value in batch.items()}


def load_caption_editor(model_name_or_path: str, adapter: str | None = None, torch_dtype=None, device=None):
    """``(model, tokenizer)``: a transformers causal LM (with a peft adapter folder on top when given), for
    :func:`sample_caption_triplets`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter or model_name_or_path) if adapter else None
    if tokenizer is None or tokenizer.eos_token_id is None:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=torch_dtype)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.to(device or "cpu").eval(), tokenizer


def sample_caption_triplets(
    model, tokenizer, captions: Sequence[str], config: LLMConfig, seed: int
) -> list[CaptionTriplet | None]:
    """One sampled triplet per caption (None where the sample is not a triplet), ``config.batch_size`` per call.

    The sampling noise is seeded with ``seed`` (the caller derives it from the first item of the batch) inside
    ``torch.random.fork_rng``, so it neither depends on nor disturbs the global random state.
    """
    import torch

    device = next(model.parameters()).device
    tokenizer.padding_side = "left"  # generation continues at the right end of every row
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results: list[CaptionTriplet | None] = []
    for batch_index, start in enumerate(range(0, len(captions), config.batch_size)):
        batch = list(captions[start : start + config.batch_size])
        prompts = [(tokenizer.bos_token or "") + format_prompt(c) for c in batch]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed + batch_index)
            output = model.generate(
                **inputs, do_sample=True, temperature=config.temperature, top_p=config.top_p,
                max_new_tokens=config.max_new_tokens, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
            )
        texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for caption, text in zip(batch, texts):
            parsed = parse_completion(text)
            reference = " ".join(caption.split())
            if parsed is None or parsed[1] == reference:
                results.append(None)
                continue
            results.append(CaptionTriplet(reference, parsed[0], parsed[1], method="llm"))
    return results
