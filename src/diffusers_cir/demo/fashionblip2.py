# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""FashionBLIP-2 as a demo method: ``diffusers-cir demo --methods ...,fashionblip2``.

FashionBLIP-2 fine-tunes a pretrained BLIP-2 with LoRA adapters on the Q-Former and a multi-head matching head, on
pixels. Here the pretrained BLIP-2 is the small one the package ships for the picture world (first-stage pretrained on
the world's pictures and captions, :mod:`.blip2`; ``--train-blip2`` pretrains it again now), and the fine-tuning is the
real trainer (``examples/train_fusion.py --method fashionblip2``, :mod:`diffusers_cir.training.train_fusion`) on the
world's ``train`` triplets written as pictures in the SynthTriplets ``images`` layout. The saved folder is loaded back
with ``AutoCIRPipeline`` and queried from the reference picture files like every other method; it reads the pictures
with its own towers, so it gets a gallery index of its own.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .methods import DemoContext, DemoMethod, PipelineMethod, register_demo_method

# LoRA on every linear layer of the Q-Former and of the vision tower (our choice). The trainer's default, the Q-Former's
# query and value projections only, reached R@1 0.282 on the default world against 0.602 with these (1,000 steps).
DEMO_LORA_TARGETS = r".*(qformer.*\.(query|key|value|dense)|vision_model.*\.(qkv|projection|fc1|fc2))"


@dataclass
class FashionBLIP2Recipe:
    """How the demo fine-tunes FashionBLIP-2 (our choice: a clear margin in about two minutes of 2-core CPU)."""

    train_triplets: int = 20_000
    variants: int = 3  # pictures per item the triplets draw from (variant 0 is the gallery picture)
    max_train_steps: int = 1000
    train_batch_size: int = 64
    learning_rate: float = 2e-3
    lora_rank: int = 8
    num_matching_heads: int = 4
    matching_head_dim: int = 32
    lora_target_modules: str = DEMO_LORA_TARGETS

    def training_argv(self, blip2_dir: str, data_dir: str, output_dir: str, seed: int) -> list[str]:
        return ["--method", "fashionblip2", "--pretrained-model-name-or-path", blip2_dir,
                "--train-data-dir", data_dir, "--dataset-config-name", "images",
                "--train-batch-size", str(self.train_batch_size), "--learning-rate", str(self.learning_rate),
                "--max-train-steps", str(self.max_train_steps), "--checkpointing-steps", "100000",
                "--lora-rank", str(self.lora_rank), "--lora-alpha", str(2 * self.lora_rank),
                "--num-matching-heads", str(self.num_matching_heads),
                "--matching-head-dim", str(self.matching_head_dim),
                "--lora-target-modules", self.lora_target_modules,
                "--report-to", "none", "--seed", str(seed), "--output-dir", output_dir]


def write_picture_triplets(context: DemoContext, recipe: FashionBLIP2Recipe) -> str:
    """The world's ``train`` triplets as pictures (random variants) in the SynthTriplets ``images`` layout, once per
    demo run."""
    from ..data.pictures import render_pool, write_triplet_dataset

    folder = Path(context.work_dir) / "picture-triplets"
    if not (folder / "picture_world.json").is_file():
        pool = render_pool(context.world, recipe.variants, progress=context.show_progress)
        write_triplet_dataset(context.world, folder, pool.numpy(), recipe.train_triplets, seed=context.seed,
                              progress=context.show_progress)
    return str(folder)


def blip2_folder(context: DemoContext, log=print) -> str:
    """The pretrained BLIP-2 to fine-tune: ``context.blip2_dir``, or (``None``) one pretrained now on the world."""
    from .blip2 import Blip2Recipe, pretrain_blip2, pretrained_blip2, save_blip2

    if context.blip2_dir is not None:
        if not (Path(context.blip2_dir) / "config.json").is_file():
            raise FileNotFoundError(f"No BLIP-2 checkpoint in {context.blip2_dir}: pretrain one now with "
                                    "`diffusers-cir demo --methods fashionblip2 --train-blip2`.")
        return str(context.blip2_dir)
    folder = Path(context.work_dir) / "blip2"
    recipe = context.blip2_recipe or Blip2Recipe(seed=context.seed)
    # One pretrained with this recipe in a kept --output-dir is reused; another recipe's is trained over.
    if pretrained_blip2(folder).get("recipe") != recipe.to_dict():
        log(f"Pretraining the BLIP-2 for {recipe.steps} steps (batch {recipe.batch_size}) ...")
        model, tokenizer, processor, summary = pretrain_blip2(context.world, recipe, progress=context.show_progress,
                                                              log=log)
        save_blip2(folder, model, tokenizer, processor, recipe, summary)
    return str(folder)


def train_fashionblip2(context: DemoContext, recipe: FashionBLIP2Recipe | None = None, log=print):
    """Fine-tune FashionBLIP-2 on the demo's world; the pipeline as a user would load it."""
    from ..pipelines.auto import AutoCIRPipeline
    from ..training.fusion_arguments import parse_args
    from ..training.train_fusion import main

    recipe = recipe or FashionBLIP2Recipe()
    blip2_dir = blip2_folder(context, log)
    data_dir = write_picture_triplets(context, recipe)
    output_dir = os.path.join(str(context.work_dir), "fashionblip2")
    shutil.rmtree(output_dir, ignore_errors=True)  # each demo trains from scratch
    main(parse_args(recipe.training_argv(blip2_dir, data_dir, output_dir, context.seed)))
    pipeline = AutoCIRPipeline.from_pretrained(output_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@register_demo_method("fashionblip2", "FashionBLIP-2: the shipped small BLIP-2 with LoRA and multi-head matching, "
                      "fine-tuned now on the world's triplets as pictures")
def _fashionblip2(context: DemoContext) -> DemoMethod:
    pipeline = train_fashionblip2(context)
    return PipelineMethod("fashionblip2", pipeline, context.batch_size, context.seed, context.show_progress)
