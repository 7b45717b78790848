"""Evaluate a CIR pipeline on CIRR, FashionIQ, CIRCO or GeneCIS the way the official code does.

Flow: load the benchmark's official files -> embed the gallery once (``retrieval``'s resumable gallery cache) ->
compose the queries in batches (``retrieval.compose``) -> rank (a ``retrieval.GalleryIndex``: exact search by
default) -> metrics from ``diffusers_cir.metrics`` -> ``metrics.json`` + ``metrics.md``, the rankings, the query
embeddings, and the official submission files for hidden-label test splits.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from safetensors.torch import save_file

from ..checks import check_non_negative_int, check_positive_int, check_seed
from ..data.benchmarks import (
    BENCHMARKS,
    FASHIONIQ_CAPTION_STYLES,
    GENECIS_TASKS,
    CIRBenchmark,
    ImageRef,
    join_fashioniq_captions,
    load_benchmark,
)
from ..metrics import (
    CIRCO_MAP_KS,
    CIRR_RECALL_KS,
    CIRR_SUBSET_KS,
    FASHIONIQ_CATEGORIES,
    FASHIONIQ_RECALL_KS,
    GENECIS_RECALL_KS,
    compute_circo_metrics,
    compute_cirr_metrics,
    fashioniq_average_recall,
    fashioniq_recall_at_k,
    genecis_average_over_tasks,
    genecis_recall_at_k,
)
from ..retrieval.compose import compose_queries
from ..retrieval.gallery import GalleryItem, encode_gallery, items_digest, read_item
from ..retrieval.index import GalleryIndex, normalize_embeddings
from .submissions import CIRCO_DEPTH, CIRR_RECALL_DEPTH, CIRR_SUBSET_DEPTH, circo_submission, cirr_submissions, write_json

__all__ = ["EvaluationResult", "evaluate_split", "run_evaluation", "metrics_markdown"]

IndexFactory = Callable[[np.ndarray, list], GalleryIndex]


def exact_index(gallery_embeds: np.ndarray, gallery_ids: list) -> GalleryIndex:
    """The default ranking of an evaluation: exact cosine search (``torch_exact_search`` in float32 on the CPU)."""
    return GalleryIndex.from_embeddings(gallery_embeds, ids=gallery_ids).to("cpu", backend="torch")


def _unit(embeds: torch.Tensor, name: str) -> torch.Tensor:
    return torch.from_numpy(normalize_embeddings(embeds, name))


@dataclass
class SplitOutput:
    """What one benchmark split (one FashionIQ category, one GeneCIS task) produced."""

    benchmark: CIRBenchmark
    query_embeds: torch.Tensor
    rankings: dict[str, list]
    metrics: dict[str, float] = field(default_factory=dict)
    submissions: dict[str, dict] = field(default_factory=dict)


@dataclass
class EvaluationResult:
    """Metrics (percent; empty for hidden-label splits) and the files written, by role."""

    benchmark: str
    split: str
    metrics: dict[str, float]
    files: dict[str, Path]
    report: dict


def _query_prompts(benchmark: CIRBenchmark, caption_style: str, prompt_template: str) -> list[list[str]]:
    if benchmark.name == "fashioniq":
        return [join_fashioniq_captions(query.captions, caption_style, prompt_template) for query in benchmark.queries]
    return [[prompt_template.format(query.captions[0])] for query in benchmark.queries]


def _cirr_subset_rankings(benchmark, query_embeds, gallery_embeds, position_of) -> list[list]:
    """Each query's image-set members minus the reference, by descending similarity (5 per CIRR query)."""
    rankings = []
    for query, embed in zip(benchmark.queries, query_embeds):
        members = [m for m in dict.fromkeys(query.group_members) if m != query.reference_id]
        scores = gallery_embeds[[position_of[m] for m in members]] @ embed
        order = torch.argsort(scores, descending=True, stable=True).tolist()
        rankings.append([members[i] for i in order])
    return rankings


@dataclass
class _Embedder:
    """Embeds a split's images with the pipeline, through the resumable gallery cache under ``cache_dir``."""

    pipeline: Any
    cache_dir: Path
    batch_size: int = 256
    num_workers: int = 0
    part_size: int = 4096
    progress: bool = True

    def __call__(self, benchmark: CIRBenchmark, image_ids: Sequence, what: str) -> torch.Tensor:
        """``[N, D]`` raw float32 gallery embeddings of ``image_ids``, in their order."""
        unique = list(dict.fromkeys(image_ids))
        items = [_gallery_item(benchmark.image(image_id)) for image_id in unique]
        if getattr(self.pipeline, "reads_pixels", True):
            _check_images_exist(benchmark, unique)
        fingerprint = self.pipeline.fingerprint
        folder = self.cache_dir / _folder_name(fingerprint) / items_digest(items)[:20]
        gallery = encode_gallery(
            self.pipeline, items, folder, model_name=getattr(self.pipeline, "name_or_path", None),
            batch_size=self.batch_size, part_size=self.part_size, num_workers=self.num_workers,
            show_progress=self.progress,
            description=f"Encoding {benchmark.description} {what}",
        )
        return torch.from_numpy(gallery.embeddings_of(list(image_ids)))

    def reference_images(self, benchmark: CIRBenchmark) -> "_ReferenceImages | None":
        """The queries' reference images, read as the pipeline composes each batch (None for a pixel-free one)."""
        if not getattr(self.pipeline, "reads_pixels", True):
            return None
        return _ReferenceImages([_gallery_item(benchmark.image(q.reference_id)) for q in benchmark.queries])


class _ReferenceImages(Sequence):
    def __init__(self, items: list[GalleryItem]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, row: int):
        return read_item(self.items[row])


def _gallery_item(ref: ImageRef) -> GalleryItem:
    return GalleryItem(ref.image_id, path=str(Path(ref.path).resolve()), crop_box=ref.crop_box)


def _folder_name(fingerprint: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", fingerprint)[:120] or "encoder"


def _check_images_exist(benchmark: CIRBenchmark, image_ids: Sequence) -> None:
    missing = benchmark.missing_images(image_ids, limit=1)
    if missing:
        image_id = next(i for i in image_ids if benchmark.image(i).path == missing[0])
        raise FileNotFoundError(
            f"Image {image_id!r} should be at {missing[0]}; the benchmark annotation files do not include the "
            "images: download them from the benchmark's site into the official layout."
        )


def evaluate_split(
    pipeline: Any,
    benchmark: CIRBenchmark,
    embed: _Embedder,
    *,
    caption_style: str = "clip4cir",
    prompt_template: str = "{}",
    query_batch_size: int = 32,
    seed: int = 0,
    call_kwargs: dict | None = None,
    index_factory: IndexFactory = exact_index,
    write_submissions: bool | None = None,
    progress: bool = True,
) -> SplitOutput:
    """Rank and score one loaded benchmark split (see :func:`run_evaluation` for the arguments)."""
    if write_submissions is None:
        write_submissions = not benchmark.has_labels
    reference_ids = [query.reference_id for query in benchmark.queries]

    def compose(reference_embeds: torch.Tensor) -> torch.Tensor:
        return compose_queries(
            pipeline, _query_prompts(benchmark, caption_style, prompt_template), reference_embeds=reference_embeds,
            reference_images=embed.reference_images(benchmark), batch_size=query_batch_size, seed=seed,
            show_progress=progress, **(call_kwargs or {}),
        )

    if benchmark.name == "genecis":
        candidate_ids = list(dict.fromkeys(i for query in benchmark.queries for i in query.candidate_ids))
        embeds = embed(benchmark, candidate_ids + reference_ids, "candidates")
        candidate_embeds = _unit(embeds[: len(candidate_ids)], "candidate embeddings")
        query_embeds = compose(embeds[len(candidate_ids):])
        row_of = {image_id: row for row, image_id in enumerate(candidate_ids)}
        scores = [(candidate_embeds[[row_of[i] for i in query.candidate_ids]] @ query_embed).tolist()
                  for query, query_embed in zip(benchmark.queries, query_embeds)]
        rankings = {str(query.query_id): [query.candidate_ids[j] for j in np.argsort(-np.asarray(row), kind="stable")]
                    for query, row in zip(benchmark.queries, scores)}
        metrics = genecis_recall_at_k(scores, ks=GENECIS_RECALL_KS)
        return SplitOutput(benchmark, query_embeds, rankings, metrics)

    # Gallery and references are embedded together: a reference outside the gallery is one more image.
    embeds = embed(benchmark, list(benchmark.gallery_ids) + reference_ids, "gallery")
    gallery_embeds = _unit(embeds[: len(benchmark.gallery_ids)], "gallery embeddings")
    query_embeds = compose(embeds[len(benchmark.gallery_ids):])
    index = index_factory(gallery_embeds.numpy(), list(benchmark.gallery_ids))
    position_of = {image_id: position for position, image_id in enumerate(benchmark.gallery_ids)}
    queries = benchmark.queries
    output = SplitOutput(benchmark, query_embeds, {})

    if benchmark.name == "cirr":
        depth = max(max(CIRR_RECALL_KS), CIRR_RECALL_DEPTH)
        ranked = index.search(query_embeds, k=depth, exclude_ids=[[q.reference_id] for q in queries]).ids
        subsets = _cirr_subset_rankings(benchmark, query_embeds, gallery_embeds, position_of)
        output.rankings = {str(q.query_id): row for q, row in zip(queries, ranked)}
        if benchmark.has_labels:
            output.metrics = compute_cirr_metrics(
                target_ids=[q.target_id for q in queries], reference_ids=[q.reference_id for q in queries],
                ranked_ids=ranked, ranked_subset_ids=subsets, recall_ks=CIRR_RECALL_KS, subset_ks=CIRR_SUBSET_KS)
        if write_submissions:
            output.submissions = cirr_submissions(
                [q.query_id for q in queries], [q.reference_id for q in queries],
                [row[:CIRR_RECALL_DEPTH] for row in ranked], [row[:CIRR_SUBSET_DEPTH] for row in subsets])
    elif benchmark.name == "fashioniq":
        ranked = index.search(query_embeds, k=max(FASHIONIQ_RECALL_KS)).ids
        output.rankings = {str(q.query_id): row for q, row in zip(queries, ranked)}
        if benchmark.has_labels:
            output.metrics = fashioniq_recall_at_k(target_ids=[q.target_id for q in queries], ranked_ids=ranked)
    elif benchmark.name == "circo":
        # the reference stays: CIRCO does not remove it
        ranked = index.search(query_embeds, k=max(max(CIRCO_MAP_KS), CIRCO_DEPTH)).ids
        output.rankings = {str(q.query_id): row for q, row in zip(queries, ranked)}
        if benchmark.has_labels:
            output.metrics = compute_circo_metrics(
                ground_truth_ids=[q.ground_truth_ids for q in queries], ranked_ids=ranked,
                semantic_aspects=[q.extra.get("semantic_aspects", []) for q in queries],
                query_ids=[q.query_id for q in queries])
        if write_submissions:
            output.submissions = {"circo": circo_submission([q.query_id for q in queries],
                                                            [row[:CIRCO_DEPTH] for row in ranked])}
    else:
        raise ValueError(f"Unknown benchmark {benchmark.name!r}; expected one of {BENCHMARKS}.")
    return output


def metrics_markdown(report: dict) -> str:
    """A markdown table of a run's metrics (percent, 2 decimals) with what was evaluated.

    Example:

    ```py
    >>> print(metrics_markdown({"benchmark": "cirr", "split": "val", "encoder": "x", "metrics": {"avg": 36.75}}))
    ### cirr val (x)
    <BLANKLINE>
    | metric | value |
    |---|---:|
    | avg | 36.75 |

    ```
    """
    lines = [f"### {report['benchmark']} {report['split']} ({report['encoder']})", ""]
    if not report["metrics"]:
        lines.append("Labels of this split are hidden: submit the files listed in metrics.json to the test server.")
        return "\n".join(lines)
    lines += ["| metric | value |", "|---|---:|"]
    lines += [f"| {name} | {value:.2f} |" for name, value in report["metrics"].items()]
    return "\n".join(lines)


def _subsets_for(name: str, subsets: Sequence[str] | None) -> list[str | None]:
    if name == "fashioniq":
        chosen = list(subsets) if subsets else list(FASHIONIQ_CATEGORIES)
        unknown = set(chosen) - set(FASHIONIQ_CATEGORIES)
    elif name == "genecis":
        chosen = list(subsets) if subsets else list(GENECIS_TASKS)
        unknown = set(chosen) - set(GENECIS_TASKS)
    else:
        if subsets:
            raise ValueError(f"{name} has no subsets; `subsets` is for FashionIQ categories and GeneCIS tasks.")
        return [None]
    if unknown:
        raise ValueError(f"Unknown {name} subsets {sorted(unknown)}.")
    return chosen


def run_evaluation(
    pipeline: Any,
    benchmark: str,
    data_root: str | os.PathLike,
    split: str = "val",
    *,
    output_dir: str | os.PathLike,
    subsets: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    caption_style: str = "clip4cir",
    prompt_template: str = "{}",
    query_batch_size: int = 32,
    image_batch_size: int = 256,
    num_workers: int = 0,
    cache_part_size: int = 4096,
    seed: int = 0,
    call_kwargs: dict | None = None,
    write_submissions: bool | None = None,
    index_factory: IndexFactory = exact_index,
    loader_kwargs: dict | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Evaluate ``pipeline`` on ``benchmark`` / ``split`` read from ``data_root`` (official layout).

    Args:
        pipeline: a CIR pipeline (anything meeting the pipeline contract, e.g. ``AutoCIRPipeline.from_pretrained``'s
            result, or the model-free :class:`~diffusers_cir.evaluation.IdHashEncoder`), or a function without
            arguments that builds one: it is called once the arguments and the annotation files have been checked,
            so a typo in them fails before the model loads.
        benchmark: ``"cirr"``, ``"fashioniq"``, ``"circo"`` or ``"genecis"``.
        subsets: FashionIQ categories or GeneCIS tasks (default: all); FashionIQ and GeneCIS averages are over them.
        output_dir: receives ``metrics.json``, ``metrics.md``, ``rankings*.json``, ``query_embeddings*.safetensors``
            and the submission files.
        cache_dir: the gallery cache (default ``<output_dir>/embedding_cache``): one resumable
            :func:`~diffusers_cir.retrieval.encode_gallery` folder per pipeline fingerprint and split; reruns reuse
            it, an interrupted run resumes.
        caption_style: FashionIQ caption joining, ``"clip4cir"`` or ``"searle"`` (both orders, averaged).
        prompt_template: wraps every query text (``"{}"``: unchanged; pipelines apply their own templates).
        image_batch_size, num_workers: images per ``encode_image`` call, and image-reading worker processes.
        cache_part_size: images per resumable part of the gallery cache (an interruption loses at most one part).
        seed: seeds the generator of each composed batch (sampling pipelines): every split is reproducible alone.
        call_kwargs: further pipeline-call arguments (``{"num_inference_steps": 10}``); refused if the pipeline
            does not take them.
        write_submissions: write the server files; default: only for hidden-label splits.
        index_factory: builds the :class:`~diffusers_cir.retrieval.GalleryIndex` a split is ranked with from its
            normalised gallery embeddings and ids (default :func:`exact_index`; a faiss factory string for huge
            galleries: ``lambda e, ids: GalleryIndex.from_embeddings(e, ids, factory="IVF4096,Flat", nprobe=64)``).
            A ranking is as deep as the metrics and submissions need; a gallery smaller than that gives shorter
            lists (the index pads, and only the ids found are kept).
        loader_kwargs: extra arguments of the benchmark loader (``gallery_ids`` for CIRCO, ``image_root`` for GeneCIS).

    Example:

    ```py
    >>> from diffusers_cir import AutoCIRPipeline
    >>> from diffusers_cir.evaluation import run_evaluation
    >>> pipe = AutoCIRPipeline.from_pretrained("compodiff-aesthetic-diffusers").to("cuda")  # doctest: +SKIP
    >>> run_evaluation(pipe, "cirr", "/data/CIRR", "val", output_dir="eval/cirr").metrics["avg"]  # doctest: +SKIP

    ```
    """
    if benchmark not in BENCHMARKS:
        raise ValueError(f"Unknown benchmark {benchmark!r}; choose one of {BENCHMARKS}.")
    if caption_style not in FASHIONIQ_CAPTION_STYLES:
        raise ValueError(f"`caption_style` must be one of {FASHIONIQ_CAPTION_STYLES}, got {caption_style!r}.")
    if "{}" not in prompt_template:
        raise ValueError(f"`prompt_template` must contain '{{}}' where the text goes, got {prompt_template!r}.")
    query_batch_size = check_positive_int(query_batch_size, "query_batch_size")
    image_batch_size = check_positive_int(image_batch_size, "image_batch_size")
    num_workers = check_non_negative_int(num_workers, "num_workers")
    cache_part_size = check_positive_int(cache_part_size, "cache_part_size")
    seed = check_seed(seed)
    # Every split's annotation files are read before any work is done (or any folder created): a missing
    # category or task fails at once instead of after the model has embedded and ranked the ones before it.
    loaded_splits = [
        load_benchmark(benchmark, data_root, split, subset=subset, **(loader_kwargs or {}))
        for subset in _subsets_for(benchmark, subsets)
    ]
    if not hasattr(pipeline, "encode_image"):
        pipeline = pipeline()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    embed = _Embedder(pipeline, output_dir / "embedding_cache" if cache_dir is None else Path(cache_dir),
                      image_batch_size, num_workers, cache_part_size, progress)

    outputs: list[SplitOutput] = []
    for loaded in loaded_splits:
        outputs.append(evaluate_split(
            pipeline, loaded, embed, caption_style=caption_style, prompt_template=prompt_template,
            query_batch_size=query_batch_size, seed=seed, call_kwargs=call_kwargs, index_factory=index_factory,
            write_submissions=write_submissions, progress=progress))

    if not all(output.benchmark.has_labels for output in outputs):
        metrics = {}
    elif benchmark == "fashioniq":
        metrics = fashioniq_average_recall({o.benchmark.subset: o.metrics for o in outputs})
    elif benchmark == "genecis":
        metrics = genecis_average_over_tasks({o.benchmark.subset: o.metrics for o in outputs})
    else:
        metrics = outputs[0].metrics

    files: dict[str, Path] = {}
    for output in outputs:
        suffix = f"_{output.benchmark.subset}" if output.benchmark.subset else ""
        files[f"rankings{suffix}"] = write_json(output.rankings, output_dir / f"rankings{suffix}.json")
        embeddings_path = output_dir / f"query_embeddings{suffix}.safetensors"
        save_file({"query_embeds": output.query_embeds.contiguous()}, str(embeddings_path),
                  metadata={"query_ids": json.dumps([q.query_id for q in output.benchmark.queries])})
        files[f"query_embeddings{suffix}"] = embeddings_path
        for metric, submission in output.submissions.items():
            name = f"{metric}_submission_{split}.json" if benchmark == "cirr" else f"circo_{split}_submission.json"
            files[f"submission_{metric}"] = write_json(submission, output_dir / name)

    report = {
        "benchmark": benchmark,
        "split": split,
        "subsets": [o.benchmark.subset for o in outputs if o.benchmark.subset],
        "encoder": pipeline.fingerprint,
        "scale": "percent",
        "num_queries": {o.benchmark.subset or benchmark: len(o.benchmark) for o in outputs},
        "gallery_size": {o.benchmark.subset or benchmark: len(o.benchmark.gallery_ids) for o in outputs
                         if o.benchmark.gallery_ids is not None},
        "settings": {"caption_style": caption_style, "prompt_template": prompt_template,
                     "query_batch_size": query_batch_size, "search": getattr(index_factory, "__name__", "custom")},
        "metrics": metrics,
        "files": {role: path.name for role, path in files.items()},
    }
    files["markdown"] = output_dir / "metrics.md"
    files["metrics"] = output_dir / "metrics.json"
    report["files"].update({"markdown": "metrics.md", "metrics": "metrics.json"})
    files["markdown"].write_text(metrics_markdown(report) + "\n")
    write_json(report, files["metrics"], indent=2)
    return EvaluationResult(benchmark, split, metrics, files, report)
