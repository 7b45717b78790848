# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""The offline end-to-end demo: synthetic world -> CompoDiff prior -> gallery index -> composed queries -> Recall@K.

Everything runs on CPU without network access:

1. build the seeded synthetic CIR world (:mod:`diffusers_cir.data.synthetic`): items, a tiny CLIP text encoder, image
   embeddings, triplets whose ``test`` split lands on held-out compositions;
2. get a CompoDiff prior for it: train one with the real training loop (:mod:`diffusers_cir.training`) on the world
   written in the SynthTriplets layout, or load the checkpoint shipped in ``diffusers_cir/demo/checkpoint`` (which
   ``diffusers-cir demo --train --update-shipped-checkpoint`` produced);
3. index the gallery with :class:`diffusers_cir.retrieval.GalleryIndex` (faiss);
4. compose the ``test`` queries with :class:`~diffusers_cir.CompoDiffPipeline`, search, and compare Recall@K
   (:func:`diffusers_cir.metrics.recall_at_k`) with the image-only, text-only and image+text-sum baselines.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

SHIPPED_CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"
TEXT_TO_IMAGE_MAPPING = {"target_image_embeds": "image_embeds", "target_caption": "caption"}

# The recipe of the shipped checkpoint and of `diffusers-cir demo --train` (see README / examples/README.md).
DEMO_TRANSFORMER_CONFIG = {
    "num_layers": 2,
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "num_cross_attention_heads": 2,
}
DEMO_GUIDANCE = {"guidance_scale": 2.0, "image_guidance_scale": 1.5}


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


@dataclass
class DemoRecipe:
    """How the demo trains: world size, training steps and the training flags."""

    world: str = "default"  # "default" (2,400 items) or "tiny" (96 items)
    num_train_triplets: int | None = None  # default: 200,000 (default world), 20,000 (tiny)
    max_train_steps: int = 2500
    train_batch_size: int = 256
    learning_rate: float = 2e-3
    validation_steps: int = 500
    seed: int = 0
    extra_args: list[str] = field(default_factory=list)

    @property
    def train_triplets(self) -> int:
        if self.num_train_triplets is not None:
            return self.num_train_triplets
        return 200_000 if self.world == "default" else 20_000

    def training_argv(self, data_dir: str, output_dir: str) -> list[str]:
        argv = world_training_data_argv(data_dir, DEMO_TRANSFORMER_CONFIG) + [
            "--text_drop_prob", "0.05", "--image_drop_prob", "0.05", "--both_drop_prob", "0.05",
            "--learning_rate", str(self.learning_rate),
            "--lr_warmup_steps", "100",
            "--train_batch_size", str(self.train_batch_size),
            "--max_train_steps", str(self.max_train_steps),
            "--checkpointing_steps", str(self.validation_steps),
            "--checkpoints_total_limit", "2",
            "--validation_steps", str(self.validation_steps),
            "--validation_split", "test",
            "--num_validation_queries", "1000",
            "--validation_batch_size", "1000",
            "--validation_guidance_scale", str(DEMO_GUIDANCE["guidance_scale"]),
            "--validation_image_guidance_scale", str(DEMO_GUIDANCE["image_guidance_scale"]),
            "--text_embedding_cache_size", "30000",
            "--shuffle_buffer_size", "10000",
            "--report_to", "none",
            "--seed", str(self.seed),
            "--output_dir", output_dir,
        ]
        return argv + list(self.extra_args)


def build_world(name: str = "default", seed: int = 0):
    """The synthetic world the demo runs on (``"default"``: 2,400 items; ``"tiny"``: 96)."""
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


def train_prior(world, recipe: DemoRecipe, work_dir: str | os.PathLike) -> tuple[str, dict]:
    """Train a CompoDiff prior on ``world`` with the real training loop; returns the pipeline folder and summary."""
    from diffusers_cir.training import main, parse_args

    work_dir = Path(work_dir)
    data_dir = write_training_data(world, work_dir / "data", recipe.train_triplets, recipe.seed)
    output_dir = str(work_dir / "compodiff")
    # The demo trains from scratch each time: an earlier demo run's checkpoints there would be refused.
    shutil.rmtree(output_dir, ignore_errors=True)
    summary = main(parse_args(recipe.training_argv(data_dir, output_dir)))
    return output_dir, summary


def export_checkpoint(pipeline_dir: str | os.PathLike, target: str | os.PathLike, info: dict) -> Path:
    """Write the denoiser of a trained pipeline in half precision (with its scheduler and how it was made) to
    ``target``: the form shipped in the package (the world's text encoder is rebuilt from its seed)."""
    from diffusers_cir.models import CompoDiffTransformer
    from diffusers_cir.schedulers import CompoDiffScheduler

    target = Path(target)
    if target.exists():
        shutil.rmtree(target)
    transformer = CompoDiffTransformer.from_pretrained(pipeline_dir, subfolder="transformer", torch_dtype=torch.float16)
    transformer.save_pretrained(target / "transformer")
    CompoDiffScheduler.from_pretrained(pipeline_dir, subfolder="scheduler").save_pretrained(target / "scheduler")
    with open(target / "training.json", "w", encoding="utf-8") as handle:
        json.dump(info, handle, indent=2)
    return target


def load_shipped_pipeline(world, checkpoint: str | os.PathLike = SHIPPED_CHECKPOINT):
    """A :class:`CompoDiffPipeline` from the shipped denoiser and the world's text encoder and tokenizer."""
    from diffusers_cir.models import CompoDiffTransformer
    from diffusers_cir.pipelines import CompoDiffPipeline
    from diffusers_cir.schedulers import CompoDiffScheduler

    checkpoint = Path(checkpoint)
    if not (checkpoint / "transformer" / "config.json").is_file():
        raise FileNotFoundError(
            f"No demo checkpoint in {checkpoint}. Train one with `diffusers-cir demo --train` (about 10 minutes on 2 CPU "
            "cores), or pass --checkpoint."
        )
    transformer = CompoDiffTransformer.from_pretrained(checkpoint, subfolder="transformer", torch_dtype=torch.float32)
    if transformer.config.text_embedding_dim != world.config.text_hidden_size or (
        transformer.config.embedding_dim != world.config.projection_dim
    ):
        raise ValueError(
            f"The checkpoint in {checkpoint} was trained on another world (text width "
            f"{transformer.config.text_embedding_dim}, embedding width {transformer.config.embedding_dim})."
        )
    scheduler = CompoDiffScheduler.from_pretrained(checkpoint, subfolder="scheduler")
    return CompoDiffPipeline(transformer, scheduler, text_encoder=world.text_encoder, tokenizer=world.tokenizer)


def checkpoint_info(checkpoint: str | os.PathLike = SHIPPED_CHECKPOINT) -> dict:
    path = Path(checkpoint) / "training.json"
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


@dataclass
class DemoResult:
    """What the demo measured: Recall@K per method (fractions), example queries, timings."""

    recalls: dict[str, dict[str, float]]
    examples: list[dict]
    num_queries: int
    gallery_size: int
    seconds: dict[str, float]
    source: str

    @property
    def best_baseline(self) -> tuple[str, float]:
        baselines = {name: values["recall_at1"] for name, values in self.recalls.items() if name != "compodiff"}
        name = max(baselines, key=baselines.get)
        return name, baselines[name]

    def table(self) -> str:
        ks = sorted({int(key.removeprefix("recall_at")) for values in self.recalls.values() for key in values})
        header = f"{'method':<16}" + "".join(f"{'R@' + str(k):>8}" for k in ks)
        lines = [header, "-" * len(header)]
        for name, values in self.recalls.items():
            lines.append(f"{name:<16}" + "".join(f"{values[f'recall_at{k}']:>8.3f}" for k in ks))
        return "\n".join(lines)


def run_demo(
    world_name: str = "default",
    num_queries: int | None = None,
    num_examples: int = 3,
    train: bool = False,
    recipe: DemoRecipe | None = None,
    work_dir: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike = SHIPPED_CHECKPOINT,
    seed: int = 0,
    ks: tuple[int, ...] = (1, 5, 10),
    batch_size: int = 1000,
    show_progress: bool = True,
    log=print,
) -> DemoResult:
    """Run the demo and return its measurements (see the module docstring)."""
    from diffusers_cir.metrics import recall_at_k
    from diffusers_cir.pipelines import CompoDiffPipeline
    from diffusers_cir.retrieval import GalleryIndex
    from diffusers_cir.retrieval.compose import compose_queries

    seconds: dict[str, float] = {}
    start = time.perf_counter()
    world = build_world(world_name, seed)
    seconds["world"] = time.perf_counter() - start
    log(f"World: {world}")

    started = time.perf_counter()
    if train:
        recipe = recipe or DemoRecipe(world=world_name, seed=seed)
        if work_dir is None:
            raise ValueError("Training needs a `work_dir` for the dataset, checkpoints and the trained pipeline.")
        log(f"Training CompoDiff for {recipe.max_train_steps} steps (batch {recipe.train_batch_size}) ...")
        pipeline_dir, _ = train_prior(world, recipe, work_dir)
        pipeline = CompoDiffPipeline.from_pretrained(pipeline_dir)
        source = f"trained now ({recipe.max_train_steps} steps), {pipeline_dir}"
    else:
        pipeline = load_shipped_pipeline(world, checkpoint)
        info = checkpoint_info(checkpoint)
        source = f"shipped checkpoint {checkpoint}" + (f" ({info.get('max_train_steps')} steps)" if info else "")
    pipeline.set_progress_bar_config(disable=True)
    seconds["model"] = time.perf_counter() - started
    log(f"CompoDiff prior: {source}")

    started = time.perf_counter()
    captions = world.captions
    index = GalleryIndex.from_embeddings(
        world.image_embeds.numpy(),
        ids=world.gallery_ids,
        metadata=[{"caption": caption} for caption in captions],
        factory="Flat",
        model=f"synthetic-world-seed{world.config.seed}",
    )
    seconds["index"] = time.perf_counter() - started

    test = world.triplets("test")
    order = np.arange(len(test))
    if num_queries is not None and num_queries < len(test):
        order = np.sort(np.random.default_rng(seed).choice(len(test), num_queries, replace=False))
    references = world.image_embeds[torch.from_numpy(test.reference_indices[order])]
    prompts = [test.modification_texts[i] for i in order]
    ids = np.asarray(world.gallery_ids)
    target_ids = ids[test.target_indices[order]]
    reference_ids = ids[test.reference_indices[order]]

    started = time.perf_counter()
    queries = {
        "compodiff": compose_queries(
            pipeline, prompts, reference_embeds=references, batch_size=batch_size, seed=seed,
            show_progress=show_progress, **DEMO_GUIDANCE,
        )
    }
    seconds["compose"] = time.perf_counter() - started
    subset = type(test)(
        test.split,
        test.reference_indices[order],
        test.target_indices[order],
        prompts,
        [test.edited_attributes[i] for i in order],
    )
    queries.update(world.baseline_queries(subset))

    started = time.perf_counter()
    recalls, rankings = {}, {}
    for name, embeds in queries.items():
        result = index.search(
            embeds.numpy(), k=max(ks), exclude_ids=[[r] for r in reference_ids], model=index.model
        )
        rankings[name] = result.ids
        recalls[name] = recall_at_k(
            target_ids=target_ids, exclude_ids=reference_ids, ranked_ids=result.ids, ks=ks, scale="fraction"
        )
    seconds["search"] = time.perf_counter() - started

    examples = []
    caption_of = dict(zip(world.gallery_ids, captions))
    for position in range(min(num_examples, len(order))):
        examples.append(
            {
                "reference": caption_of[reference_ids[position]],
                "modification": prompts[position],
                "target": caption_of[target_ids[position]],
                "results": [
                    {"caption": caption_of[item], "is_target": item == target_ids[position]}
                    for item in rankings["compodiff"][position][:3]
                ],
            }
        )
    seconds["total"] = time.perf_counter() - start
    return DemoResult(recalls, examples, len(order), len(world.gallery_ids), seconds, source)


def format_result(result: DemoResult) -> str:
    lines = [
        f"Composed retrieval on the held-out compositions: {result.num_queries} queries, gallery of "
        f"{result.gallery_size} (reference excluded)",
        "",
        result.table(),
        "",
    ]
    name, value = result.best_baseline
    compodiff = result.recalls["compodiff"]["recall_at1"]
    lines.append(f"CompoDiff R@1 {compodiff:.3f} vs best baseline ({name}) {value:.3f}: {compodiff - value:+.3f}")
    for number, example in enumerate(result.examples, 1):
        lines += ["", f"Example {number}: [{example['reference']}] + \"{example['modification']}\""]
        lines.append(f"  target: {example['target']}")
        for rank, hit in enumerate(example["results"], 1):
            lines.append(f"  {rank}. {hit['caption']}{'   <- target' if hit['is_target'] else ''}")
    timing = ", ".join(f"{key} {value:.1f}s" for key, value in result.seconds.items())
    lines += ["", f"Time: {timing}"]
    return "\n".join(lines)
