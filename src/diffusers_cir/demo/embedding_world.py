# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""The synthetic embedding world (:mod:`diffusers_cir.data.synthetic`) as training data for the CompoDiff training
script: what the training tests run on (the demo itself runs on the picture world, see :mod:`diffusers_cir.demo`)."""

from __future__ import annotations

import json
import os

TEXT_TO_IMAGE_MAPPING = {"target_image_embeds": "image_embeds", "target_caption": "caption"}


def world_training_data_argv(data_dir: str, transformer_config: dict) -> list[str]:
    """The training script's data and model flags for a world written by `write_training_data`: its triplets and
    text encoder, its gallery as text-to-image pairs (30% of the batches), and a denoiser of `transformer_config`."""
    return [
        "--train_data_dir", data_dir,
        "--text_encoder_name_or_path", os.path.join(data_dir, "text_encoder"),
        "--tokenizer_name_or_path", os.path.join(data_dir, "tokenizer"),
        "--transformer_config", json.dumps(transformer_config),
        "--text_to_image_data_dir", data_dir,
        "--text_to_image_config_name", "gallery",
        "--text_to_image_split", "test",
        "--text_to_image_column_mapping", json.dumps(TEXT_TO_IMAGE_MAPPING),
        "--objective_ratios", "triplet=0.7,text_to_image=0.3",
    ]


def build_world(name: str = "default", seed: int = 0):
    """The synthetic embedding world (``"default"``: 2,400 items; ``"tiny"``: 96)."""
    from diffusers_cir.data.synthetic import SyntheticCIRWorld, SyntheticWorldConfig

    if name not in ("default", "tiny"):
        raise ValueError(f"`world` must be 'default' or 'tiny', got {name!r}.")
    config = SyntheticWorldConfig(seed=seed) if name == "default" else SyntheticWorldConfig.tiny(seed=seed)
    return SyntheticCIRWorld(config)


def write_training_data(world, folder: str | os.PathLike, num_train_triplets: int, seed: int = 0) -> str:
    """The world in the SynthTriplets ``embeddings`` layout (plus its ``gallery``), with the frozen text encoder and
    tokenizer saved next to it, ready for ``examples/train_compodiff.py``."""
    folder = str(folder)
    world.write_embeddings_dataset(
        folder,
        num_triplets={"train": num_train_triplets, "validation": None, "test": None},
        rows_per_shard=max(1_000, num_train_triplets // 4),
        seed=seed,
        overwrite=True,
        progress=False,
    )
    world.text_encoder.save_pretrained(os.path.join(folder, "text_encoder"))
    world.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    return folder
