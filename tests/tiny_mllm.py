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
# The same for a processor, whose messages hold lists of {"type": "image"} / {"type": "text"} items.
VLM_CHAT_TEMPLATE = (
    "{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% else %}{{ item['text'] }}"
    "{% endif %}{% endfor %}<|eot_id|>{% endfor %}"
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


def tiny_tokenizer(chat_template: bool = False, image_token_attribute: bool = True) -> PreTrainedTokenizerFast:
    """The shared tokenizer. `image_token_attribute=False` for BLIP-2, whose processor registers "<image>" itself."""
    extra = {"extra_special_tokens": {"image_token": "<image>"}} if image_token_attribute else {}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()), bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        **extra,
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


def tiny_blip2(seed: int = 0, encoder_decoder: bool = False):
    """A tiny BLIP-2 (OPT decoder, or a T5 encoder-decoder like BLIP-2 FlanT5) and its processor."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        OPTConfig,
        T5Config,
    )

    tokenizer = tiny_tokenizer(image_token_attribute=False)
    vision = Blip2VisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    qformer = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, encoder_hidden_size=32, vocab_size=len(tokenizer))
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if encoder_decoder:
        text = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=tokenizer.pad_token_id, **ids)
    else:
        text = OPTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id, **ids)
    config = Blip2Config(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(), num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    processor = Blip2Processor(image_processor=_clip_like_image_processor("blip"), tokenizer=tokenizer, num_query_tokens=4)
    return Blip2ForConditionalGeneration(config).eval(), processor


def _clip_like_image_processor(kind: str):
    from transformers import BlipImageProcessor, CLIPImageProcessor

    if kind == "blip":
        return BlipImageProcessor(size={"height": 32, "width": 32})
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def tiny_chat_llm(seed: int = 0):
    """A tiny LlamaForCausalLM and its tokenizer with a chat template set in code."""
    from transformers import LlamaForCausalLM

    tokenizer = tiny_tokenizer(chat_template=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(_llama_config(tokenizer)).eval(), tokenizer


def tiny_clip(seed: int = 0, projection_dim: int = 16):
    """Tiny CLIP towers (text and vision with one projection width), the real CLIP tokenizer and an image processor."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionModelWithProjection,
    )

    from diffusers_cir.utils import build_offline_clip_tokenizer

    torch.manual_seed(seed)
    text = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=projection_dim,
    )).eval()
    vision = CLIPVisionModelWithProjection(_clip_vision_config(projection_dim)).eval()
    return text, build_offline_clip_tokenizer(), vision, _clip_like_image_processor("clip")


def tiny_caption_rewrite_pipeline(recipe="cirevl-circo", captioner=None, seed: int = 0, cache_dir=None):
    """The pipeline with tiny models; a preset named by `recipe` generates fewer tokens (random tiny models never
    stop on their own, so every generation runs to its maximum)."""
    import dataclasses

    from diffusers_cir import CaptionRewritePipeline
    from diffusers_cir.pipelines.caption_rewrite_recipes import REWRITE_RECIPES

    if isinstance(recipe, str):
        recipe = dataclasses.replace(REWRITE_RECIPES[recipe], caption_max_new_tokens=8, rewrite_max_new_tokens=12)

    captioner, caption_processor = captioner or tiny_blip2(seed)
    llm, llm_tokenizer = tiny_chat_llm(seed + 1)
    text_encoder, tokenizer, image_encoder, image_processor = tiny_clip(seed + 2)
    pipe = CaptionRewritePipeline(
        captioner=captioner, caption_processor=caption_processor, llm=llm, llm_tokenizer=llm_tokenizer,
        text_encoder=text_encoder, tokenizer=tokenizer, image_encoder=image_encoder, image_processor=image_processor,
        recipe=recipe,
    )
    pipe.caption_cache_dir = cache_dir
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_cirr_with_images(root, num_images: int = 8, num_queries: int = 3):
    """A CIRR-style val split with real pixels: (root, image paths, query texts)."""
    import json

    import numpy as np
    from PIL import Image

    (root / "dev").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"dev-{i}-0-img0" for i in range(num_images)]
    paths = []
    for index, name in enumerate(names):
        size = (40, 40) if index % 2 else (56, 32)  # two aspect ratios: anyres tiling differs
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / "dev" / f"{name}.png")
        paths.append(root / "dev" / f"{name}.png")
    (root / "split.rc2.val.json").write_text(json.dumps({name: f"./dev/{name}.png" for name in names}))
    captions = [{"pairid": i, "reference": names[i], "target_hard": names[i + 1], "caption": f"change {i}",
                 "target_soft": {names[i + 1]: 1.0}, "img_set": {"id": i, "members": names[i : i + 6]}}
                for i in range(num_queries)]
    (root / "cap.rc2.val.json").write_text(json.dumps(captions))
    return root, paths, [f"change {i}" for i in range(num_queries)]


def evaluate_with_the_command_line(pipe, tmp_path):
    """Save `pipe`, run `diffusers-cir evaluate cirr` on a tiny split with real pixels; returns (report, saved
    queries, the pipeline loaded back, reference paths, query texts)."""
    import json

    from safetensors import safe_open

    from diffusers_cir import AutoCIRPipeline
    from diffusers_cir.cli import main

    pipe.save_pretrained(tmp_path / "pipe")
    root, paths, texts = tiny_cirr_with_images(tmp_path / "CIRR")
    output = tmp_path / "out"
    status = main(["evaluate", "cirr", "--pipeline", str(tmp_path / "pipe"), "--data-root", str(root), "--output-dir",
                   str(output), "--device", "cpu", "--no-progress"])
    assert status == 0
    with safe_open(output / "query_embeddings.safetensors", framework="pt") as handle:
        queries = handle.get_tensor("query_embeds")
    loaded = AutoCIRPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    return json.loads((output / "metrics.json").read_text()), queries, loaded, paths, texts
