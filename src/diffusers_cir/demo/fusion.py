# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""The composition networks as demo methods: ``diffusers-cir demo --methods compodiff,combiner,scot,mtst``.

Each is trained now, on the picture world the demo runs on, by the real trainer
(:mod:`diffusers_cir.training.train_fusion`), over the demo pipeline's own CLIP pair (the one its CompoDiff and the
baselines use): the world's ``train`` triplets are written once in the SynthTriplets ``embeddings`` layout with the
CLIP image features of their pictures (and MTST's reverse texts), each head trains on them in seconds, and the saved
folder is loaded back with ``AutoCIRPipeline`` and queried from the reference picture files like every other method.
Its gallery side is the same CLIP image tower, so it shares the baselines' index.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .methods import DemoContext, DemoMethod, PipelineMethod, register_demo_method

# Demo name -> the trainer's --method, and the method's one-line description.
FUSION_METHODS = {
    "combiner": ("clip4cir", "CLIP4Cir's Combiner over the CLIP pair, trained now on the world's triplets"),
    "scot": ("scot", "SCOT's composition network, trained now on text triplets (target caption as the target)"),
    "mtst": ("mtst", "MTST's two-hop head with reverse texts, trained now on the world's triplets"),
}
# SCOT trains from text triplets: the SynthTriplets rows serve as (caption, modification, modified caption).
SCOT_COLUMNS = ('{"image_embeds": "reference_image_embeds", "caption": "reference_caption", '
                '"modified_caption": "target_caption"}')


@dataclass
class FusionRecipe:
    """How the demo trains a composition head (our choice: a clear margin in about a minute of 2-core CPU)."""

    train_triplets: int = 20_000
    max_train_steps: int = 300
    train_batch_size: int = 256
    learning_rate: float = 2e-3

    def training_argv(self, method: str, data_dir: str, output_dir: str, seed: int) -> list[str]:
        argv = ["--method", FUSION_METHODS[method][0], "--pretrained-model-name-or-path", data_dir,
                "--train-data-dir", data_dir, "--dataset-config-name", "embeddings",
                "--train-batch-size", str(self.train_batch_size), "--learning-rate", str(self.learning_rate),
                "--max-train-steps", str(self.max_train_steps), "--checkpointing-steps", "100000",
                "--text-feature-cache-size", "100000", "--report-to", "none", "--seed", str(seed),
                "--output-dir", output_dir]
        if method == "scot":
            argv += ["--column-mapping", SCOT_COLUMNS]
        return argv


def _reverse_texts(world, triplets, seed: int) -> list[str]:
    """MTST's reverse modification texts: the same attributes edited back, from the target to the reference."""
    rng = np.random.default_rng([world.config.seed, 0x7E5E, seed])
    texts = []
    for reference, target, edited in zip(triplets.reference_indices, triplets.target_indices,
                                         triplets.edited_attributes):
        back = {name: world.items[int(reference)].attributes[name] for name in edited.split("+")}
        texts.append(world._edit_text(int(target), back, rng))
    return texts


def write_fusion_data(context: DemoContext, recipe: FusionRecipe) -> str:
    """The world's ``train`` triplets with the CLIP image features of their pictures, and the CLIP pair beside them
    (``text_encoder/``, ``tokenizer/``, ``image_encoder/``, ``image_processor/``), once per demo run."""
    import torch

    from ..data.card import update_dataset_card
    from ..data.schema import EMBEDDINGS_CONFIG
    from ..data.shards import ParquetShardWriter
    from ..data.synthetic import _synthetic_features, _write_columns

    folder = Path(context.work_dir) / "fusion-data"
    if (folder / "image_encoder").is_dir():
        return str(folder)
    world, pipeline = context.world, context.pipeline
    pictures = [world.picture(index) for index in range(world.num_items)]
    features = pipeline.encode_image(pictures, batch_size=context.batch_size).float()
    triplets = world.triplets("train", num_triplets=recipe.train_triplets, seed=context.seed)
    references = torch.from_numpy(np.asarray(triplets.reference_indices))
    targets = torch.from_numpy(np.asarray(triplets.target_indices))
    ids = world.gallery_ids
    columns = {
        "id": [f"pictures-{world.config.seed}-train-{i:08d}" for i in range(len(triplets))],
        "reference_image_embeds": features[references].numpy(),
        "target_image_embeds": features[targets].numpy(),
        "modification_text": list(triplets.modification_texts),
        "reference_caption": [world.items[int(i)].caption for i in references],
        "target_caption": [world.items[int(i)].caption for i in targets],
        "reverse_modification_text": _reverse_texts(world, triplets, context.seed),
        "reference_id": [ids[int(i)] for i in references],
        "target_id": [ids[int(i)] for i in targets],
    }
    schema = _synthetic_features(features.shape[1])["embeddings"]
    with ParquetShardWriter(str(folder), EMBEDDINGS_CONFIG, "train", schema, 10_000, overwrite=True) as writer:
        _write_columns(writer, columns, False, "writing the composition networks' triplets")
    update_dataset_card(str(folder), EMBEDDINGS_CONFIG, schema, {"train": len(triplets)}, default=True,
                        body="The picture world's train triplets with the demo CLIP pair's image features.")
    for name in ("text_encoder", "tokenizer", "image_encoder", "image_processor"):
        getattr(pipeline, name).save_pretrained(folder / name)
    return str(folder)


def train_fusion_method(name: str, context: DemoContext, recipe: FusionRecipe | None = None):
    """Train the composition network ``name`` on the demo's world; the pipeline as a user would load it."""
    from ..pipelines.auto import AutoCIRPipeline
    from ..training.fusion_arguments import parse_args
    from ..training.train_fusion import main

    recipe = recipe or FusionRecipe()
    data_dir = write_fusion_data(context, recipe)
    output_dir = os.path.join(str(context.work_dir), name)
    shutil.rmtree(output_dir, ignore_errors=True)  # each demo trains from scratch
    main(parse_args(recipe.training_argv(name, data_dir, output_dir, context.seed)))
    pipeline = AutoCIRPipeline.from_pretrained(output_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _register(name: str) -> None:
    @register_demo_method(name, FUSION_METHODS[name][1])
    def build(context: DemoContext) -> DemoMethod:
        pipeline = train_fusion_method(name, context)
        return PipelineMethod(name, pipeline, context.batch_size, context.seed, context.show_progress)


for _name in FUSION_METHODS:
    _register(_name)
