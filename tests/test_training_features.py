"""Training-script features beyond the embeddings path: images encoded on the fly with the masked objective, bf16
mixed precision, gradient checkpointing and accumulation, EMA, and tensorboard logging."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def write_image_triplets(folder: Path, rows: int = 24) -> None:
    from PIL import Image

    from diffusers_cir.data.card import update_dataset_card
    from diffusers_cir.data.schema import images_features
    from diffusers_cir.data.shards import ParquetShardWriter

    rng = np.random.default_rng(0)

    def png():
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    features = images_features()
    with ParquetShardWriter(str(folder), "images", "train", features, rows_per_shard=12) as writer:
        for index in range(rows):
            writer.add({"id": f"row-{index}", "reference_image": png(), "target_image": png(),
                        "modification_text": ["make it red", "as a sketch", "paint it blue"][index % 3],
                        "reference_caption": "a photo of a cup", "target_caption": f"a photo of thing {index}"})
    update_dataset_card(str(folder), "images", features, {"train": rows}, default=True)


def write_encoders(folder: Path) -> None:
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from diffusers_cir.utils import build_offline_clip_tokenizer

    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 max_position_embeddings=77, eos_token_id=49407, pad_token_id=49407)
                  ).save_pretrained(folder / "text_encoder")
    build_offline_clip_tokenizer().save_pretrained(folder / "tokenizer")
    vision = folder / "image_encoder"
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=32, patch_size=8,
                                                   projection_dim=16)).save_pretrained(vision)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(vision)


@pytest.mark.slow
def test_images_masked_objective_bf16_checkpointing_accumulation_ema_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    write_image_triplets(tmp_path / "data")
    write_encoders(tmp_path)
    output = tmp_path / "model"
    argv = [
        "--train_data_dir", str(tmp_path / "data"), "--dataset_config_name", "images",
        "--transformer_config", json.dumps({"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8,
                                            "num_cross_attention_heads": 2}),
        "--text_encoder_name_or_path", str(tmp_path / "text_encoder"),
        "--tokenizer_name_or_path", str(tmp_path / "tokenizer"),
        "--image_encoder_name_or_path", str(tmp_path / "image_encoder"),
        "--objective_ratios", "triplet=0.4,text_to_image=0.2,masked=0.4",
        "--mixed_precision", "bf16", "--gradient_checkpointing", "--gradient_accumulation_steps", "2",
        "--use_ema", "--train_batch_size", "6", "--max_train_steps", "3", "--checkpointing_steps", "100",
        "--shuffle_buffer_size", "0", "--report_to", "tensorboard", "--output_dir", str(output),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(REPO / "examples" / "train_compodiff.py")] + argv,
                            capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-5000:]
    log = result.stdout + result.stderr
    assert "Total optimization steps = 3" in log and "Gradient accumulation steps = 2" in log
    assert "36 rows yielded" in log  # 3 steps x 2 accumulated batches x 6 rows, over the 24-row epoch boundary
    counts = dict(part.split() for part in log.split("Rows per objective (this rank): ")[1].splitlines()[0].split(", "))
    assert sum(int(v) for v in counts.values()) == 36
    assert all(int(counts[name]) > 0 for name in ("triplet", "text_to_image", "masked")), counts

    from diffusers_cir import CompoDiffPipeline

    pipe = CompoDiffPipeline.from_pretrained(str(output))
    assert pipe.image_encoder is not None and pipe.transformer.config.embedding_dim == 16
    assert pipe.transformer.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    events = list((output / "logs").rglob("events.out.tfevents.*"))
    assert events and max(path.stat().st_size for path in events) > 0
