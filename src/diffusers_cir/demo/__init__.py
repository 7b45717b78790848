# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""The offline end-to-end demo on pixels: the built-in picture world, its CompoDiff, the baselines, Recall@K.

Everything runs on CPU without network access:

1. draw the picture world's gallery (:mod:`diffusers_cir.data.pictures`) into a folder;
2. load the CompoDiff pipeline shipped in ``diffusers_cir/demo/picture_world`` (its CLIP pair was trained
   contrastively on the world, CompoDiff on its triplets, by ``diffusers-cir demo --train
   --update-shipped-pipeline``), or train one now (``--train``, :mod:`.training`);
3. index the gallery through the retrieval API (:func:`~diffusers_cir.retrieval.encode_gallery`,
   :func:`~diffusers_cir.retrieval.build_index_from_embedding_files`), once per gallery encoder;
4. compose the ``test`` queries (reference picture files + modification texts) with every method of
   :mod:`.methods` (CompoDiff and the image-only, text-only and image+text baselines; more can be registered), rank
   the gallery (the reference excluded), and compare Recall@K (:func:`diffusers_cir.metrics.recall_at_k`);
5. write an HTML page: the table, the curves, and example queries with each method's top results.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .embedding_world import (
    TEXT_TO_IMAGE_MAPPING,
    build_world,
    world_training_data_argv,
    write_training_data,
)

SHIPPED_PIPELINE = Path(__file__).resolve().parent / "picture_world"
DEFAULT_METHODS = ("compodiff", "image_only", "text_only", "image_text_sum")
# The trained methods (the others are training-free baselines), with the names the summary prints.
TRAINED_METHODS = {"compodiff": "CompoDiff", "combiner": "Combiner (CLIP4Cir)", "scot": "SCOT", "mtst": "MTST",
                   "fashionblip2": "FashionBLIP-2"}
WORLDS = ("default", "tiny")

__all__ = [
    "DEFAULT_METHODS", "SHIPPED_PIPELINE", "TEXT_TO_IMAGE_MAPPING", "WORLDS", "DemoResult", "build_picture_world",
    "build_world", "demo_settings", "format_result", "load_demo_pipeline", "run_demo", "world_training_data_argv",
    "write_training_data",
]


def build_picture_world(name: str = "default", seed: int = 0):
    """The picture world of ``diffusers-cir demo --world NAME`` (``"default"``: 1,728 items; ``"tiny"``: 72)."""
    from ..data.pictures import PictureWorld, PictureWorldConfig

    if name not in WORLDS:
        raise ValueError(f"`world` must be one of {WORLDS}, got {name!r}.")
    return PictureWorld(PictureWorldConfig(seed=seed) if name == "default" else PictureWorldConfig.tiny(seed=seed))


def demo_settings(pipeline_dir: str | os.PathLike = SHIPPED_PIPELINE) -> dict:
    """``demo.json`` of a demo pipeline folder: the guidance and steps to compose with, the recipe, what was
    measured (``{}`` for a pipeline without one)."""
    from .training import DEMO_SETTINGS_FILE

    path = Path(pipeline_dir) / DEMO_SETTINGS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def load_demo_pipeline(pipeline_dir: str | os.PathLike = SHIPPED_PIPELINE):
    """The demo's CompoDiff pipeline (float32, CPU, progress bars off) from ``pipeline_dir``."""
    import torch

    from ..pipelines import AutoCIRPipeline

    if not (Path(pipeline_dir) / "model_index.json").is_file():
        raise FileNotFoundError(
            f"No demo pipeline in {pipeline_dir}. Train one with `diffusers-cir demo --train` (CPU: tens of minutes "
            "on 2 cores), or pass --pipeline."
        )
    pipeline = AutoCIRPipeline.from_pretrained(pipeline_dir, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@dataclass
class DemoResult:
    """What the demo measured: Recall@K per method (fractions), the example queries, timings, the page written."""

    recalls: dict[str, dict[str, float]]
    examples: list[dict]
    num_queries: int
    gallery_size: int
    seconds: dict[str, float]
    source: str
    page: str | None = None
    methods: dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        ks = sorted({int(key.removeprefix("recall_at")) for values in self.recalls.values() for key in values})
        header = f"{'method':<16}" + "".join(f"{'R@' + str(k):>8}" for k in ks)
        lines = [header, "-" * len(header)]
        for name, values in self.recalls.items():
            lines.append(f"{name:<16}" + "".join(f"{values[f'recall_at{k}']:>8.3f}" for k in ks))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"recalls": self.recalls, "examples": self.examples, "num_queries": self.num_queries,
                "gallery_size": self.gallery_size, "seconds": self.seconds, "source": self.source, "page": self.page}


def _gallery_index(encoder, items, work_dir: Path, show_progress: bool):
    """The gallery index of ``encoder``: embedded and built through the retrieval API, once per fingerprint."""
    from ..retrieval import build_index_from_embedding_files, encode_gallery

    folder = work_dir / f"index-{encoder.fingerprint[:12]}"
    embeddings = encode_gallery(encoder, items, folder / "embeddings", model_name=str(getattr(encoder, "name_or_path", "")),
                                batch_size=256, show_progress=show_progress, description="Embedding the gallery")
    return build_index_from_embedding_files(embeddings, folder / "index", factory="Flat", show_progress=False)


def _select_queries(test, num_queries: int | None, seed: int) -> np.ndarray:
    order = np.arange(len(test))
    if num_queries is not None and num_queries < len(test):
        order = np.sort(np.random.default_rng(seed).choice(len(test), num_queries, replace=False))
    return order


def _examples(world, queries, rankings: dict, scores: dict, paths: list[str], count: int, seed: int) -> list[dict]:
    """Queries of every kind of edit in turn (drawn at random within a kind), with each method's top 5."""
    by_kind: dict[str, list[int]] = {}
    for position in np.random.default_rng(seed).permutation(len(queries)):
        by_kind.setdefault(queries.edited_attributes[position], []).append(int(position))
    chosen = []
    for round_ in range(max((len(v) for v in by_kind.values()), default=0)):
        for positions in by_kind.values():
            if round_ < len(positions) and len(chosen) < count:
                chosen.append(positions[round_])
    examples = []
    ids = world.gallery_ids
    for position in chosen:
        reference, target = int(queries.reference_indices[position]), int(queries.target_indices[position])
        examples.append({
            "reference": ids[reference], "reference_caption": world.items[reference].caption,
            "reference_path": paths[reference], "text": queries.modification_texts[position],
            "target": ids[target], "target_caption": world.items[target].caption, "target_path": paths[target],
            "results": {
                method: [{"id": item, "score": float(score), "is_target": item == ids[target]}
                         for item, score in zip(rankings[method][position][:5], scores[method][position][:5])]
                for method in rankings
            },
        })
    return examples


def run_demo(
    world_name: str = "default",
    methods: tuple[str, ...] | list[str] = DEFAULT_METHODS,
    num_queries: int | None = 1000,
    num_examples: int = 6,
    pipeline_dir: str | os.PathLike = SHIPPED_PIPELINE,
    train: bool = False,
    recipe=None,
    work_dir: str | os.PathLike | None = None,
    seed: int = 0,
    ks: tuple[int, ...] = (1, 5, 10, 50),
    html: str | os.PathLike | None = None,
    batch_size: int = 256,
    show_progress: bool = True,
    log=print,
    blip2_dir: str | os.PathLike | None = None,
    blip2_recipe=None,
) -> DemoResult:
    """Run the demo (see the module docstring) and return its measurements; ``html``: write the page there.

    ``blip2_dir``: the pretrained BLIP-2 that ``fashionblip2`` fine-tunes (default: the shipped one); with
    ``blip2_recipe`` (a :class:`~diffusers_cir.demo.blip2.Blip2Recipe`) and no ``blip2_dir``, one is pretrained now."""
    from ..metrics import recall_at_k
    from ..retrieval import GalleryItem
    from .methods import DemoContext, build_methods

    seconds: dict[str, float] = {}
    start = time.perf_counter()
    temporary = tempfile.TemporaryDirectory(prefix="diffusers-cir-demo-") if work_dir is None else None
    work = Path(work_dir if work_dir is not None else temporary.name)
    try:
        world = build_picture_world(world_name, seed)
        log(f"World: {world}")
        if train:
            from .training import PictureDemoRecipe, train_demo_pipeline

            recipe = recipe or PictureDemoRecipe(world=world_name, seed=seed)
            pipeline_dir, _ = train_demo_pipeline(world, recipe, work / "training", progress=show_progress, log=log)
            call_kwargs, source = dict(recipe.call_kwargs), f"trained now ({recipe.steps} CompoDiff steps), {pipeline_dir}"
        else:
            settings = demo_settings(pipeline_dir)
            call_kwargs = settings.get("call_kwargs", {})
            source = f"{'shipped pipeline' if Path(pipeline_dir) == SHIPPED_PIPELINE else 'pipeline'} {pipeline_dir}"
            if settings.get("world") not in (None, world_name):
                source += f" (trained on the {settings['world']} world: its test pairs are not held out here)"
        pipeline = load_demo_pipeline(pipeline_dir)
        seconds["model"] = time.perf_counter() - start
        log(f"CompoDiff: {source}")

        started = time.perf_counter()
        paths = world.render_gallery(work / "gallery", progress=show_progress)
        items = [GalleryItem(id=item_id, path=path) for item_id, path in zip(world.gallery_ids, paths)]
        (work / "methods").mkdir(parents=True, exist_ok=True)
        context = DemoContext(world=world, pipeline=pipeline, seed=seed, batch_size=batch_size,
                              call_kwargs=call_kwargs, show_progress=show_progress, work_dir=work / "methods",
                              blip2_dir=_blip2_dir(blip2_dir, blip2_recipe), blip2_recipe=blip2_recipe)
        built = build_methods(list(methods), context)
        indexes = {}
        for method in built:
            fingerprint = method.gallery_encoder.fingerprint
            if fingerprint not in indexes:
                indexes[fingerprint] = _gallery_index(method.gallery_encoder, items, work, show_progress)
        seconds["gallery"] = time.perf_counter() - started

        test = world.triplets("test")
        queries = test.subset(_select_queries(test, num_queries, seed))
        reference_paths = [paths[i] for i in queries.reference_indices]
        ids = np.asarray(world.gallery_ids)
        target_ids, reference_ids = ids[queries.target_indices], ids[queries.reference_indices]
        recalls, rankings, scores = {}, {}, {}
        for method in built:
            started = time.perf_counter()
            embeds = method.compose(reference_paths, queries.modification_texts)
            index = indexes[method.gallery_encoder.fingerprint]
            result = index.search(np.asarray(embeds, dtype=np.float32), k=max(ks), exclude_ids=[[r] for r in reference_ids])
            rankings[method.name], scores[method.name] = result.ids, result.scores
            recalls[method.name] = recall_at_k(target_ids=target_ids, exclude_ids=reference_ids, ranked_ids=result.ids,
                                               ks=ks, scale="fraction")
            seconds[method.name] = time.perf_counter() - started
        examples = _examples(world, queries, rankings, scores, paths, num_examples, seed)
        seconds["total"] = time.perf_counter() - start
        descriptions = {method.name: _description(method.name) for method in built}
        result = DemoResult(recalls, examples, len(queries), world.num_items, seconds, source, methods=descriptions)
        if html is not None:
            from .page import write_demo_page

            result.page = str(write_demo_page(result, html, world))
        return result
    finally:
        if temporary is not None:
            temporary.cleanup()


def _blip2_dir(blip2_dir, blip2_recipe) -> Path | None:
    from .blip2 import SHIPPED_BLIP2

    if blip2_dir is not None:
        return Path(blip2_dir)
    return None if blip2_recipe is not None else SHIPPED_BLIP2


def _description(name: str) -> str:
    from .methods import DEMO_METHODS

    return DEMO_METHODS[name].description if name in DEMO_METHODS else ""


def format_result(result: DemoResult) -> str:
    lines = [
        f"Composed retrieval on pictures: {result.num_queries} test queries (edits into held-out object-colour "
        f"pairs), gallery of {result.gallery_size} (reference excluded)",
        "",
        result.table(),
    ]
    trained = [name for name in result.recalls if name in TRAINED_METHODS]
    baselines = {name: values["recall_at1"] for name, values in result.recalls.items() if name not in TRAINED_METHODS}
    if trained and baselines:
        best = max(baselines, key=baselines.get)
        lines.append("")
        for name in trained:
            recall = result.recalls[name]["recall_at1"]
            lines.append(f"{TRAINED_METHODS[name]} R@1 {recall:.3f} vs best baseline ({best}) {baselines[best]:.3f}: "
                         f"{recall - baselines[best]:+.3f}")
    for number, example in enumerate(result.examples, 1):
        lines += ["", f"Example {number}: [{example['reference_caption']}] + \"{example['text']}\"",
                  f"  target: {example['target_caption']}"]
        for method, hits in example["results"].items():
            marks = " ".join(f"{hit['id']}{'*' if hit['is_target'] else ''}" for hit in hits[:3])
            lines.append(f"  {method:<15} {marks}")
    if result.examples:
        lines.append("  (* = the target)")
    timing = ", ".join(f"{key} {value:.1f}s" for key, value in result.seconds.items())
    lines += ["", f"Time: {timing}"]
    if result.page:
        lines.append(f"Wrote {result.page}")
    return "\n".join(lines)
