"""Tiny, real multimodal-LLM components built in code (offline): LLaVA-NeXT, BLIP-2, a chat LLM, CLIP.

Every text model shares one byte-level BPE tokenizer trained here on a few sentences (any text tokenises, bytes as
the fallback), with the special tokens the prompts use.
"""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "a photo of a dog on the grass", "a red car parked in a city street at night", "Describe this image in one word",
    "Modify this image with", "desribe modified image in one word", "Summary above sentence in one word",
    "Image Content: a cat on a sofa", "Instruction: make it blue", "Edited Description: a blue cat on a sofa",
    "is red and has two dogs", "change the style of this dress to", "Retrieve the target image",
]
LLAMA3_SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
SPECIALS = ["<pad>", "<s>", "</s>", "<image>", *LLAMA3_SPECIALS]

# A minimal Llama-3-style chat template, set in code (a real chat LLM ships its own).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS * 3, trainer)
    return tokenizer.to_str()


def tiny_tokenizer(chat_template: bool = False) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<s>", eos_token="</s>", pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _clip_vision_config(projection_dim: int = 16):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
        projection_dim=projection_dim,
    )


def _llama_config(tokenizer, hidden_size: int = 32):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )


PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


def tiny_llava_next(seed: int = 0):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    tokenizer = tiny_tokenizer()
    config = LlavaNextConfig(
        vision_config=_clip_vision_config(), text_config=_llama_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    return LlavaNextForConditionalGeneration(config).eval()


def tiny_llava_next_processor(model=None):
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS
    )
    strategy = model.config.vision_feature_select_strategy if model is not None else "default"
    return LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tiny_tokenizer(), patch_size=8,
        vision_feature_select_strategy=strategy, num_additional_image_tokens=1,
    )


def tiny_mllm_pipeline(prompts="e5-v", seed: int = 0):
    from diffusers_cir import MLLMEmbeddingPipeline

    model = tiny_llava_next(seed)
    pipe = MLLMEmbeddingPipeline(model=model, processor=tiny_llava_next_processor(model), prompts=prompts)
    pipe.set_progress_bar_config(disable=True)
    return pipe
