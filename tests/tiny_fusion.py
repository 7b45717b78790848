"""Tiny, real components of the composition-network pipelines (built in code, offline): CLIP, open_clip and BLIP-2
towers with a few layers, and the heads."""

from __future__ import annotations

import torch
from tiny_components import EMBED_DIM, tiny_image_encoder, tiny_image_processor
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from diffusers_cir import Clip4CirCombiner, Clip4CirPipeline, TwoHopFusionHead
from diffusers_cir.utils import build_offline_clip_tokenizer

OPEN_CLIP_CONFIG = {
    "embed_dim": EMBED_DIM,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def tiny_clip_text_encoder(seed: int = 0) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=EMBED_DIM, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    return CLIPTextModelWithProjection(config).eval()


def tiny_head(kind: str = "combiner", seed: int = 0):
    torch.manual_seed(seed)
    head_class = Clip4CirCombiner if kind == "combiner" else TwoHopFusionHead
    return head_class(feature_dim=EMBED_DIM, projection_dim=32, hidden_dim=48).eval()


def tiny_clip_parts(seed: int = 0) -> dict:
    return {"text_encoder": tiny_clip_text_encoder(seed), "tokenizer": build_offline_clip_tokenizer(),
            "image_encoder": tiny_image_encoder(seed), "image_processor": tiny_image_processor()}


def tiny_composition_pipeline(pipeline_class=Clip4CirPipeline, head: str = "combiner", with_image_encoder: bool = True):
    parts = tiny_clip_parts()
    if not with_image_encoder:
        parts.update(image_encoder=None, image_processor=None)
    pipe = pipeline_class(fusion_head=tiny_head(head), **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_open_clip_parts(seed: int = 0) -> dict:
    from diffusers_cir import OpenCLIPTextEncoder, OpenCLIPVisionEncoder

    torch.manual_seed(seed)
    return {"text_encoder": OpenCLIPTextEncoder(OPEN_CLIP_CONFIG).eval(), "tokenizer": build_offline_clip_tokenizer(),
            "image_encoder": OpenCLIPVisionEncoder(OPEN_CLIP_CONFIG).eval(), "image_processor": tiny_image_processor()}


def tiny_blip2_config():
    from transformers import Blip2Config

    return Blip2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        qformer_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "vocab_size": 64, "max_position_embeddings": 40, "encoder_hidden_size": 32,
                        "cross_attention_frequency": 1, "use_qformer_text_input": True},
        num_query_tokens=4, image_text_hidden_size=EMBED_DIM,
    )


def tiny_bert_tokenizer(folder):
    """A BERT WordPiece tokenizer over a tiny vocabulary (written to `folder`)."""
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "is", "red", "has", "two", "dogs", "make", "it", "a", "the",
             "blue", "cup", "with", "long", "sleeves", "and"]
    words += [f"w{i}" for i in range(64 - len(words))]
    path = folder / "vocab.txt"
    path.write_text("\n".join(words) + "\n")
    # transformers 5's BertTokenizer takes `vocab` (a file or a dict); an unknown `vocab_file` left every word [UNK].
    return BertTokenizer(vocab=str(path), model_max_length=512)


def tiny_blip2_parts(folder, seed: int = 0) -> dict:
    from transformers import (
        Blip2TextModelWithProjection,
        Blip2VisionModelWithProjection,
        BlipImageProcessor,
    )

    torch.manual_seed(seed)
    config = tiny_blip2_config()
    return {"text_encoder": Blip2TextModelWithProjection(config).eval(), "tokenizer": tiny_bert_tokenizer(folder),
            "image_encoder": Blip2VisionModelWithProjection(config).eval(),
            "image_processor": BlipImageProcessor(size={"height": 32, "width": 32})}


def tiny_fashionblip2_pipeline(seed: int = 0):
    """A FashionBLIP2Pipeline over a tiny BLIP-2 (the config above) with a 2-head matching head."""
    import tempfile
    from pathlib import Path

    from transformers import Blip2ForImageTextRetrieval, BlipImageProcessor

    from diffusers_cir import FashionBLIP2Pipeline, MultiHeadMatchingHead

    torch.manual_seed(seed)
    model = Blip2ForImageTextRetrieval(tiny_blip2_config()).eval()
    # BLIP-2 starts its query tokens at zero and its patch embedding at std 0.02: at random init the query tokens and
    # the patch features barely differ, so the Q-Former's cross-attention would carry next to nothing of the image.
    # Trained checkpoints are far from that; give the tiny model that property.
    with torch.no_grad():
        model.query_tokens.normal_(std=1.0)
        model.vision_model.embeddings.patch_embedding.weight.normal_(std=0.5)
    head = MultiHeadMatchingHead(hidden_size=32, num_heads=2, head_dim=8).eval()
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = tiny_bert_tokenizer(Path(folder))
    pipe = FashionBLIP2Pipeline(model=model, matching_head=head, tokenizer=tokenizer,
                                image_processor=BlipImageProcessor(size={"height": 32, "width": 32}))
    pipe.set_progress_bar_config(disable=True)
    return pipe
