# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""How the demo's pipeline is made (``diffusers-cir demo --train``): the picture world's CLIP pair, then CompoDiff.

1. draw every item of the world in several variants (:func:`~diffusers_cir.data.pictures.render_pool`);
2. train the CLIP pair contrastively on (picture, caption) (:func:`~diffusers_cir.demo.encoders.train_clip`);
3. write the world in the SynthTriplets layout (:func:`~diffusers_cir.data.pictures.write_triplet_dataset`): the
   triplets as pictures, the gallery, and its embeddings for validation;
4. train CompoDiff on it with the training script's own entry point (:mod:`diffusers_cir.training`): the triplet,
   text-to-image and masked objectives, encoding the pictures with the frozen CLIP image tower on the fly;
5. (``--update-shipped-pipeline``) save the pipeline in float16, with its model card and ``demo.json`` (the recipe
   and the measured Recall@K), as the package's shipped demo pipeline.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .encoders import ClipRecipe

DEMO_SETTINGS_FILE = "demo.json"
PICTURE_TEXT_TO_IMAGE_MAPPING = {"target_image": "image", "target_caption": "caption"}


@dataclass
class PictureDemoRecipe:
    """Everything ``diffusers-cir demo --train`` trains with (the shipped pipeline's recipe by default)."""

    world: str = "default"
    seed: int = 0
    clip: ClipRecipe = field(default_factory=ClipRecipe)
    num_train_triplets: int = 30_000
    steps: int = 3000
    batch_size: int = 128
    learning_rate: float = 1e-3
    transformer_config: dict = field(default_factory=lambda: {
        "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 32, "num_cross_attention_heads": 2,
        "mask_size": 16,
    })
    objective_ratios: str = "triplet=0.6,text_to_image=0.2,masked=0.2"
    # What the demo and `serve` compose with (validated during training with the same values).
    call_kwargs: dict = field(default_factory=lambda: {
        "num_inference_steps": 10, "guidance_scale": 2.0, "image_guidance_scale": 1.5,
    })

    def training_argv(self, data_dir: str, clip_dir: str, output_dir: str) -> list[str]:
        """The arguments of ``examples/train_compodiff.py`` (what :func:`train_demo_pipeline` runs)."""
        validation_steps = max(1, min(500, self.steps))
        return [
            "--train_data_dir", data_dir,
            "--dataset_config_name", "images",
            "--text_encoder_name_or_path", os.path.join(clip_dir, "text_encoder"),
            "--tokenizer_name_or_path", os.path.join(clip_dir, "tokenizer"),
            "--image_encoder_name_or_path", os.path.join(clip_dir, "image_encoder"),
            "--transformer_config", json.dumps(self.transformer_config),
            "--text_to_image_data_dir", data_dir,
            "--text_to_image_config_name", "gallery",
            "--text_to_image_split", "test",
            "--text_to_image_column_mapping", json.dumps(PICTURE_TEXT_TO_IMAGE_MAPPING),
            "--objective_ratios", self.objective_ratios,
            "--text_drop_prob", "0.05", "--image_drop_prob", "0.05", "--both_drop_prob", "0.05",
            "--learning_rate", str(self.learning_rate),
            "--lr_scheduler", "cosine",
            "--lr_warmup_steps", str(min(100, self.steps // 10)),
            "--train_batch_size", str(self.batch_size),
            "--max_train_steps", str(self.steps),
            "--checkpointing_steps", str(validation_steps),
            "--checkpoints_total_limit", "1",
            "--validation_steps", str(validation_steps),
            "--validation_split", "validation",
            "--num_validation_queries", "1000",
            "--validation_batch_size", "500",
            "--validation_inference_steps", str(self.call_kwargs["num_inference_steps"]),
            "--validation_guidance_scale", str(self.call_kwargs["guidance_scale"]),
            "--validation_image_guidance_scale", str(self.call_kwargs["image_guidance_scale"]),
            "--text_embedding_cache_size", "20000",
            "--shuffle_buffer_size", "5000",
            "--report_to", "none",
            "--seed", str(self.seed),
            "--output_dir", output_dir,
        ]

    def to_dict(self) -> dict:
        return asdict(self)


def train_demo_pipeline(world, recipe: PictureDemoRecipe, work_dir: str | os.PathLike, progress: bool = True,
                        log=print) -> tuple[Path, dict]:
    """Train the CLIP pair and CompoDiff on ``world`` (steps 1-4 of the module docstring) under ``work_dir``;
    returns the trained pipeline folder and what was measured on the way.

    A CLIP pair already trained with the same recipe in ``work_dir/clip`` (with ``work_dir/clip_summary.json``) is
    reused, so an interrupted or repeated run trains CompoDiff only."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from ..data.pictures import render_pool, write_triplet_dataset
    from ..training import main, parse_args
    from .encoders import normalize_pixels, train_clip

    work_dir = Path(work_dir)
    pool = render_pool(world, recipe.clip.variants, progress=progress)
    clip_dir, summary_file = work_dir / "clip", work_dir / "clip_summary.json"
    if summary_file.is_file() and json.loads(summary_file.read_text(encoding="utf-8")).get("recipe") == recipe.clip.to_dict():
        log(f"Reusing the CLIP pair trained with this recipe in {clip_dir}")
        clip_summary = json.loads(summary_file.read_text(encoding="utf-8"))
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(clip_dir / "image_encoder").eval()
        image_processor = CLIPImageProcessor.from_pretrained(clip_dir / "image_encoder")
    else:
        log(f"Training the CLIP pair for {recipe.clip.steps} steps (batch {recipe.clip.batch_size}) ...")
        text_encoder, tokenizer, image_encoder, image_processor, clip_summary = train_clip(
            world, recipe.clip, pool=pool, progress=progress, log=log)
        clip_summary["recipe"] = recipe.clip.to_dict()
        text_encoder.save_pretrained(clip_dir / "text_encoder")
        tokenizer.save_pretrained(clip_dir / "tokenizer")
        image_encoder.save_pretrained(clip_dir / "image_encoder")
        image_processor.save_pretrained(clip_dir / "image_encoder")  # the training script looks for it there
        summary_file.write_text(json.dumps(clip_summary, indent=2), encoding="utf-8")  # last: marks the pair complete
    with torch.no_grad():
        pixels = normalize_pixels(pool[:, 0], image_processor)
        gallery = torch.cat([image_encoder(pixel_values=pixels[i:i + 512]).image_embeds for i in range(0, len(pixels), 512)])
    data_dir = work_dir / "data"
    written = write_triplet_dataset(world, data_dir, pool.numpy(), recipe.num_train_triplets,
                                    gallery_embeds=gallery.numpy(), seed=recipe.seed, progress=progress)
    output_dir = work_dir / "compodiff"
    shutil.rmtree(output_dir, ignore_errors=True)  # a new run: an earlier run's checkpoints there would be refused
    log(f"Training CompoDiff for {recipe.steps} steps (batch {recipe.batch_size}) ...")
    summary = main(parse_args(recipe.training_argv(str(data_dir), str(clip_dir), str(output_dir))))
    info = {"clip": clip_summary, "rows": written, "validation": summary.get("metrics") or {}}
    return output_dir, info


def shipped_command(recipe: PictureDemoRecipe) -> str:
    argv = ["diffusers-cir", "demo", "--train", "--update-shipped-pipeline"]
    defaults = PictureDemoRecipe()
    if recipe.world != defaults.world:
        argv += ["--world", recipe.world]
    if recipe.steps != defaults.steps:
        argv += ["--steps", str(recipe.steps)]
    if recipe.clip.steps != defaults.clip.steps:
        argv += ["--clip-steps", str(recipe.clip.steps)]
    return shlex.join(argv)


def export_pipeline(pipeline_dir: str | os.PathLike, target: str | os.PathLike, recipe: PictureDemoRecipe,
                    clip_summary: dict, measure) -> Path:
    """Save the trained pipeline in float16 into ``target`` (replacing it), with ``demo.json`` and its model card.

    ``measure(folder) -> (DemoResult, command)`` runs the demo on the saved float16 folder: the card records what the
    shipped weights themselves reproduce, and the command that measures it again.
    """
    from ..pipelines import CompoDiffPipeline

    target = Path(target)
    pipeline = CompoDiffPipeline.from_pretrained(pipeline_dir, dtype=torch.float16)
    pipeline._loaded_model_card = None  # the training run's card names its temporary folders: the shipped one doesn't
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    pipeline.save_pretrained(staging)
    _forget_origin(staging)
    settings = {"world": recipe.world, "seed": recipe.seed, "call_kwargs": recipe.call_kwargs,
                "recipe": recipe.to_dict(), "clip": clip_summary, "command": shipped_command(recipe)}
    (staging / DEMO_SETTINGS_FILE).write_text(json.dumps(settings, indent=2), encoding="utf-8")
    result, command = measure(staging)
    settings["measured"] = {"recalls": result.recalls, "num_queries": result.num_queries,
                            "gallery_size": result.gallery_size, "command": command}
    (staging / DEMO_SETTINGS_FILE).write_text(json.dumps(settings, indent=2), encoding="utf-8")
    write_shipped_card(staging)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target


def _forget_origin(folder: Path) -> None:
    """Drop the ``_name_or_path`` diffusers records in the saved configurations: it names the training run's folder,
    which means nothing where the package is installed (loading sets it to where the folder is then)."""
    for path in [folder / "model_index.json", *folder.glob("*/config.json")]:
        config = json.loads(path.read_text(encoding="utf-8"))
        if config.pop("_name_or_path", None) is not None:
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def shipped_card_info(settings: dict):
    """The model card of a demo pipeline folder, from its ``demo.json`` alone (the recipe and what was measured)."""
    from ..utils.model_card import ModelCardInfo, ModelResult

    recipe, clip, measured = settings["recipe"], settings.get("clip", {}), settings.get("measured", {})
    world = f"{settings['world']}, seed {settings['seed']}"
    results = []
    recalls = measured.get("recalls", {})
    if "compodiff" in recalls:
        baselines = "; ".join(f"{name} R@1 {values['recall_at1']:.3f}" for name, values in recalls.items()
                              if name != "compodiff")
        results.append(ModelResult(
            dataset=f"picture world ({world}), test split", split="test", dataset_id="diffusers-cir-picture-world",
            metrics={key: round(value, 4) for key, value in recalls["compodiff"].items()},
            protocol=(f"Recall@K over the {measured.get('gallery_size', 'whole')}-picture gallery, the reference "
                      f"excluded, on {measured['num_queries']} test queries (edits into held-out object-colour "
                      f"pairs), composed with {settings['call_kwargs']}. The CLIP baselines on the same queries: "
                      f"{baselines}."),
            command=measured.get("command"),
        ))
    return ModelCardInfo(
        model_name="CompoDiff for the diffusers-cir picture world",
        description=("A small CompoDiff, with the CLIP pair it was trained with, for the package's built-in picture "
                     "world (pictures of objects in colours, materials, styles and positions): what "
                     "`diffusers-cir demo` and `diffusers-cir serve` run. Not a model of real photographs."),
        datasets=[f"diffusers-cir picture world ({world})"],
        license="apache-2.0",
        made_with=settings["command"],
        results=results,
        notes=[f"The CLIP pair was trained for {recipe['clip']['steps']} steps (gallery picture -> its own caption "
               f"among all captions: R@1 {clip.get('image_to_text_r1', float('nan')):.3f}); CompoDiff for "
               f"{recipe['steps']} steps at batch {recipe['batch_size']} on {recipe['num_train_triplets']} triplets "
               f"({recipe['objective_ratios']}). Weights stored in float16."],
    )


def write_shipped_card(folder: str | os.PathLike) -> Path:
    """(Re)write ``folder/README.md`` of a demo pipeline folder from its weights and ``demo.json``; its usage example
    loads the folder as the installed package holds it (``SHIPPED_PIPELINE``), not by the path it was written at."""
    from ..pipelines import CompoDiffPipeline
    from ..utils.model_card import write_model_card

    folder = Path(folder)
    settings = json.loads((folder / DEMO_SETTINGS_FILE).read_text(encoding="utf-8"))
    pipeline = CompoDiffPipeline.from_pretrained(folder)
    pipeline._loaded_model_card = None  # the card is made from demo.json alone
    path = write_model_card(pipeline, folder, shipped_card_info(settings))
    assert path is not None, f"{folder / 'README.md'} is not a generated card"
    text = path.read_text(encoding="utf-8")
    load = f'AutoCIRPipeline.from_pretrained("{folder}")'
    imports = "from diffusers_cir import AutoCIRPipeline, composed_search\n"
    assert load in text and imports in text, "the card's usage example changed: update write_shipped_card"
    text = text.replace(load, "AutoCIRPipeline.from_pretrained(SHIPPED_PIPELINE)").replace(
        imports, imports + "from diffusers_cir.demo import SHIPPED_PIPELINE  # this folder, in the installed package\n", 1)
    path.write_text(text, encoding="utf-8")
    return path
