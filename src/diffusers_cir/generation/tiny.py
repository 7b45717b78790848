# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Tiny, random-weight components of every generation stage, built in code (no download): the offline demo and the
tests run the real stage code on them.

Each builder returns the same classes a real run loads (a ``StableDiffusionPipeline``, a transformers ``CLIPModel``,
``CLIPSegForImageSegmentation``, an OPT causal LM, a LLaVA image-text-to-text model, diffusers'
``StableDiffusionSafetyChecker``), only small. Their outputs mean nothing: random weights. The causal LM and the VLM use
a byte-level BPE tokenizer trained here on a few sentences (``tokenizers``), so every text round-trips.
"""

from __future__ import annotations

import torch

from ..utils import build_offline_clip_tokenizer

CLIP_PROJECTION_DIM = 16
SD_IMAGE_SIZE = 16  # pixels; the tiny VAE halves it once (8x8 latents keep the CPU demo fast)
IMAGE_TOKEN = "<image>"

# A little English for the byte-level BPE: the merges only make tokens shorter, any text still round-trips.
_TOKENIZER_CORPUS = (
    "a photo of a red cup on a wooden table",
    "a painting of a dog in the snow",
    "make it blue\n%%\na photo of a blue cup on a wooden table\nEND",
    "replace the dog with a cat\n##\n",
    "the second image shows a different object than the first image",
    "describe the image in detail",
)

_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def tiny_byte_level_tokenizer(image_token: bool = True):
    """A byte-level BPE ``PreTrainedTokenizerFast`` (vocabulary of about 300) with ``<s>``, ``</s>``, ``<pad>`` (and the
    ``<image>`` token as its ``image_token``), trained on a few sentences: exact round-trips of any text, newlines
    included. BLIP-2's processor adds an image token of its own: build its tokenizer with ``image_token=False``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "</s>", "<s>"] + ([IMAGE_TOKEN] if image_token else []),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(list(_TOKENIZER_CORPUS) * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN} if image_token else None,
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def tiny_clip_model(seed: int = 0):
    """``(CLIPModel, CLIPProcessor)``: text and vision towers of width 32 projected to 16, 32x32 images."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=CLIP_PROJECTION_DIM,
    )
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=build_offline_clip_tokenizer(),
    )
    return CLIPModel(config).eval(), processor


def tiny_stable_diffusion_pipeline(seed: int = 0):
    """A ``StableDiffusionPipeline`` with a UNet of ``block_out_channels=(32, 64)``, a two-block VAE (16-pixel images,
    8x8 latents), a width-32 CLIP text encoder, the real CLIP tokenizer and DDIM; no safety checker (the NSFW
    filter is a stage of its own)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=SD_IMAGE_SIZE // 2, in_channels=4,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8, sample_size=SD_IMAGE_SIZE,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=build_offline_clip_tokenizer(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_safety_checker(seed: int = 0):
    """``(StableDiffusionSafetyChecker, CLIPImageProcessor)`` with a width-32 vision tower (diffusers' own class)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=CLIP_PROJECTION_DIM,
    )
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return StableDiffusionSafetyChecker(config).eval(), processor


def tiny_clipseg(seed: int = 0):
    """``(CLIPSegForImageSegmentation, CLIPSegProcessor)``: width-32 towers on 32x32 images, decoder width 16."""
    from transformers import (
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        CLIPSegProcessor,
        ViTImageProcessor,
    )

    torch.manual_seed(seed)
    config = CLIPSegConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=CLIP_PROJECTION_DIM, reduce_dim=16, extract_layers=[0, 1], decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    processor = CLIPSegProcessor(
        image_processor=ViTImageProcessor(size={"height": 32, "width": 32}, do_resize=True),
        tokenizer=build_offline_clip_tokenizer(),
    )
    return CLIPSegForImageSegmentation(config).eval(), processor


def tiny_causal_lm(seed: int = 0, tokenizer=None):
    """``(OPTForCausalLM, tokenizer)``: the paper's OPT family, 2 layers of width 32, on the tiny byte-level BPE."""
    from transformers import OPTConfig, OPTForCausalLM

    tokenizer = tokenizer or tiny_byte_level_tokenizer()
    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
        max_position_embeddings=512, word_embed_proj_dim=32, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = OPTForCausalLM(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def tiny_vision_language_model(seed: int = 0, tokenizer=None):
    """``(LlavaForConditionalGeneration, LlavaProcessor)``: a width-32 CLIP vision tower on 32x32 images (16 image
    tokens each) and a 2-layer Llama, with a chat template that takes several images in one message."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = tokenizer or tiny_byte_level_tokenizer()
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=_CHAT_TEMPLATE,
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, processor


def tiny_blip2(seed: int = 0):
    """``(Blip2ForConditionalGeneration, Blip2Processor)``: a one-image model without a chat template (4 query
    tokens, width-32 towers, a 1-layer OPT), for the side-by-side path of the pair-text stage."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor, OPTConfig

    tokenizer = tiny_byte_level_tokenizer(image_token=False)
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                               tokenizer=tokenizer, num_query_tokens=4)  # adds its <image> token to the tokenizer
    torch.manual_seed(seed)
    text_config = OPTConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, ffn_dim=37, num_attention_heads=4,
        word_embed_proj_dim=32, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
                            encoder_hidden_size=32),
        text_config=text_config.to_dict(), num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids(processor.image_token.content),
    )
    model = Blip2ForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


def tiny_components(strategies=("keyword", "llm", "mtst", "facap"), seed: int = 0, nsfw: bool = True,
                    masks: bool = True):
    """A :class:`~diffusers_cir.generation.components.GenerationComponents` of tiny random models for ``strategies``
    (the built-in tagger for keywords; the same tiny OPT as caption editor and FACap instruction LM)."""
    from ..text.keywords import RuleBasedKeywordExtractor
    from .components import GenerationComponents

    strategies = set(strategies)
    generated = strategies & {"keyword", "llm"}
    parts = GenerationComponents()
    names = {}
    parts.clip_model, parts.clip_processor = tiny_clip_model(seed)
    names["clip"] = "tiny random CLIPModel (built in code)"
    if generated:
        parts.image_pipelines = {"tiny-stable-diffusion": tiny_stable_diffusion_pipeline(seed)}
        names["stable_diffusion"] = ["tiny random StableDiffusionPipeline (built in code)"]
    if nsfw:
        parts.safety_checker, parts.safety_feature_extractor = tiny_safety_checker(seed)
        names["safety_checker"] = "tiny random StableDiffusionSafetyChecker (built in code)"
    if masks and generated:
        parts.clipseg_model, parts.clipseg_processor = tiny_clipseg(seed)
        names["clipseg"] = "tiny random CLIPSegForImageSegmentation (built in code)"
    if strategies & {"llm", "facap"}:
        model, tokenizer = tiny_causal_lm(seed)
        if "llm" in strategies:
            parts.caption_editor, parts.caption_editor_tokenizer = model, tokenizer
            names["caption_editor"] = "tiny random OPTForCausalLM (built in code)"
        if "facap" in strategies:
            parts.instruction_llm, parts.instruction_llm_tokenizer = model, tokenizer
            names["instruction_llm"] = "tiny random OPTForCausalLM (built in code)"
    if strategies & {"mtst", "facap"}:
        parts.vlm, parts.vlm_processor = tiny_vision_language_model(seed)
        names["vlm"] = "tiny random LlavaForConditionalGeneration (built in code)"
    if "keyword" in strategies:
        parts.tagger = RuleBasedKeywordExtractor()
        names["tagger"] = "builtin"
    parts.names = names
    return parts
