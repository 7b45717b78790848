"""Tiny, real components for pipeline tests (built in code, offline)."""

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from diffusers_cir import CompoDiffPipeline, CompoDiffScheduler, CompoDiffTransformer
from diffusers_cir.utils import build_offline_clip_tokenizer

EMBED_DIM = 16
TEXT_DIM = 32


def tiny_transformer(seed: int = 0) -> CompoDiffTransformer:
    torch.manual_seed(seed)
    model = CompoDiffTransformer(
        embedding_dim=EMBED_DIM, text_embedding_dim=TEXT_DIM, num_layers=2, num_attention_heads=2,
        attention_head_dim=8, num_cross_attention_heads=2,
    )
    # Perturb every gain away from 1 so that a dropped scale cannot hide.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("weight") and parameter.ndim == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def tiny_text_encoder(seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    return CLIPTextModel(config).eval()


T5_DIM = 24
# A small SentencePiece-style (unigram) vocabulary, enough for the words the tests use; "</s>" ends every text.
T5_WORDS = ("▁a", "▁red", "▁blue", "▁green", "▁cup", "▁vase", "▁dog", "▁cat", "▁make", "▁it", "▁the", "▁with",
            "▁replace", "▁change", "▁to", "▁photo", "▁of", "▁sketch", "▁as", "▁in", "e", "s", "d", "r", "a", "t", "o")


def tiny_t5_tokenizer() -> T5Tokenizer:
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(word, -1.0 - i) for i, word in enumerate(T5_WORDS)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=77)


def tiny_t5_encoder(seed: int = 0) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(vocab_size=3 + len(T5_WORDS), d_model=T5_DIM, d_kv=8, d_ff=40, num_layers=2, num_heads=3)
    return T5EncoderModel(config).eval()


def tiny_image_encoder(seed: int = 0) -> CLIPVisionModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=EMBED_DIM,
    )
    return CLIPVisionModelWithProjection(config).eval()


def tiny_image_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def tiny_pipeline(with_encoders: bool = True, scheduler=None) -> CompoDiffPipeline:
    components = dict(transformer=tiny_transformer(), scheduler=scheduler or CompoDiffScheduler())
    if with_encoders:
        components.update(
            text_encoder=tiny_text_encoder(), tokenizer=build_offline_clip_tokenizer(),
            image_encoder=tiny_image_encoder(), image_processor=tiny_image_processor(),
        )
    pipe = CompoDiffPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe
