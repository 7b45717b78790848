"""Evaluate a CIR pipeline on CIRR, FashionIQ, CIRCO or GeneCIS the way the official code does.

Evaluation is benchmark protocol (data, :mod:`.protocols`) -> retrieval -> metrics, the same steps for every
benchmark: load the official files -> embed the gallery once (``retrieval``'s resumable gallery cache) -> compose
the queries (``retrieval.compose``) -> rank (a ``retrieval.GalleryIndex``, exact search by default; per-query
candidates by similarity) -> the protocol's metric from ``diffusers_cir.metrics`` -> ``metrics.json`` +
``metrics.md``, the rankings, the query embeddings, and the official submission files for hidden-label splits.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from safetensors.torch import save_file

from ..checks import check_non_negative_int, check_positive_int, check_seed, check_string
from ..data.benchmarks import CIRBenchmark, load_benchmark
from ..metrics import CIRR_AVG_DEFINITIONS
from ..retrieval.compose import compose_queries
from ..retrieval.ensemble import compose_ldre_queries
from ..retrieval.index import GalleryIndex, normalize_embeddings
from .gallery import SplitEmbedder
from .protocols import BenchmarkProtocol, get_protocol
from .rewrite_ensemble import (
    LDRE_TEMPERATURE,
    LDRE_TOP_K,
    check_rewrite_ensemble,
    resolve_rewrite_ensemble,
    rewrite_ensemble_settings,
)
from .submissions import write_json

__all__ = ["EvaluationResult", "evaluate_split", "exact_index", "run_evaluation", "metrics_markdown"]

IndexFactory = Callable[[np.ndarray, list], GalleryIndex]


def exact_index(gallery_embeds: np.ndarray, gallery_ids: list) -> GalleryIndex:
    """The default ranking of an evaluation: exact cosine search (``torch_exact_search`` in float32 on the CPU)."""
    return GalleryIndex.from_embeddings(gallery_embeds, ids=gallery_ids).to("cpu", backend="torch")


@dataclass
class SplitOutput:
    """What one benchmark split (one FashionIQ category, one GeneCIS task) produced."""

    benchmark: CIRBenchmark
    query_embeds: torch.Tensor
    rankings: dict[str, list]
    metrics: dict[str, float] = field(default_factory=dict)
    submissions: dict[str, tuple[str, dict]] = field(default_factory=dict)
    ensemble_weights: list[float] | None = None  # LDRE's slot weights, when its ensemble made the queries


@dataclass
class EvaluationResult:
    """Metrics (percent; empty for hidden-label splits) and the files written, by role."""

    benchmark: str
    split: str
    metrics: dict[str, float]
    files: dict[str, Path]
    report: dict


def _columns(benchmark: CIRBenchmark, names) -> dict[str, list]:
    """The per-query columns of the loaded split a protocol reads (see :mod:`.protocols`)."""
    fields = {"query_ids": "query_id", "target_ids": "target_id", "reference_ids": "reference_id",
              "ground_truth_ids": "ground_truth_ids"}
    columns = {name: [getattr(query, attribute) for query in benchmark.queries] for name, attribute in fields.items()}
    for name in names:
        if name.startswith("extra:"):
            columns[name] = [query.extra.get(name.removeprefix("extra:"), []) for query in benchmark.queries]
    return columns


def _rank_candidates(query_embeds: torch.Tensor, embeds: torch.Tensor, row_of: dict, candidates: list[list]):
    """Each query's own candidates by descending cosine similarity (stable), and their scores in the given order."""
    rankings, scores = [], []
    for query_embed, ids in zip(query_embeds, candidates):
        row_scores = embeds[[row_of[i] for i in ids]] @ query_embed
        order = torch.argsort(row_scores, descending=True, stable=True).tolist()
        rankings.append([ids[i] for i in order])
        scores.append(row_scores.tolist())
    return rankings, scores


def evaluate_split(
    pipeline: Any,
    benchmark: CIRBenchmark,
    protocol: BenchmarkProtocol,
    embed: SplitEmbedder,
    *,
    prompt_template: str = "{}",
    query_batch_size: int = 32,
    seed: int = 0,
    call_kwargs: dict | None = None,
    index_factory: IndexFactory = exact_index,
    write_submissions: bool | None = None,
    rewrite_ensemble: str | None = None,
    progress: bool = True,
) -> SplitOutput:
    """Rank and score one loaded benchmark split by ``protocol`` (see :func:`run_evaluation` for the arguments;
    ``rewrite_ensemble`` here is resolved: ``"ldre"``, or anything else for the pipeline's own queries)."""
    queries = benchmark.queries
    shared = benchmark.gallery_ids is not None  # one gallery for every query, or per-query candidates (GeneCIS)
    pool = list(benchmark.gallery_ids) if shared else list(dict.fromkeys(i for q in queries for i in q.candidate_ids))
    columns = _columns(benchmark, protocol.metric_inputs.values())
    # The gallery and the references are embedded together: a reference outside the gallery is one more image.
    embeds = embed(benchmark, pool + columns["reference_ids"], "gallery" if shared else "candidates")
    pool_embeds = torch.from_numpy(normalize_embeddings(embeds[: len(pool)], f"{benchmark.description} gallery"))
    texts = [protocol.query_texts(query, prompt_template) for query in queries]
    options = dict(batch_size=query_batch_size, seed=seed, show_progress=progress,
                   **{**protocol.call_kwargs, **(call_kwargs or {})})
    weights = None
    if rewrite_ensemble == "ldre":  # the ensemble's queries replace the mean of the rewrites (LDRE's CIRCO ranking)
        query_embeds, weights = compose_ldre_queries(
            pipeline, [text[0] if len(text) == 1 else text for text in texts], pool_embeds,
            reference_images=embed.reference_images(benchmark), top_k=LDRE_TOP_K, temperature=LDRE_TEMPERATURE, **options)
    else:
        query_embeds = compose_queries(pipeline, texts, reference_embeds=embeds[len(pool):],
                                       reference_images=embed.reference_images(benchmark), **options)
    row_of = {image_id: row for row, image_id in enumerate(pool)}
    if shared:
        exclude = [[reference] for reference in columns["reference_ids"]] if protocol.exclude_reference else None
        index = index_factory(pool_embeds.numpy(), pool)
        columns["ranked_ids"] = index.search(query_embeds, k=protocol.depth, exclude_ids=exclude).ids
    else:
        columns["ranked_ids"], columns["candidate_scores"] = _rank_candidates(
            query_embeds, pool_embeds, row_of, [query.candidate_ids for query in queries])
    if protocol.rank_group_members:
        members = [[m for m in dict.fromkeys(q.group_members) if m != q.reference_id] for q in queries]
        columns["group_rankings"] = _rank_candidates(query_embeds, pool_embeds, row_of, members)[0]

    output = SplitOutput(benchmark, query_embeds, {str(q.query_id): row for q, row in zip(queries, columns["ranked_ids"])},
                         ensemble_weights=None if weights is None else weights.tolist())
    if benchmark.has_labels:
        output.metrics = protocol.score(columns)
    if (not benchmark.has_labels if write_submissions is None else write_submissions) and protocol.submission:
        output.submissions = protocol.submission(columns, benchmark.split)
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
    settings = report.get("settings", {})
    if settings.get("protocol"):  # which protocol ran: the official one, or a named variant (and what it changes)
        described = f": {settings['description']}" if settings.get("description") else ""
        lines += [f"Protocol: `{settings['protocol']}`{described}.", ""]
    if settings.get("rewrite_ensemble"):  # how a CaptionRewritePipeline's rewrites became one query
        ensemble = settings["rewrite_ensemble"]
        lines += [f"Rewrite ensemble: `{ensemble['name']}`: {ensemble['description']}.", ""]
    if not report["metrics"]:
        lines.append("Labels of this split are hidden: submit the files listed in metrics.json to the test server.")
        return "\n".join(lines)
    lines += ["| metric | value |", "|---|---:|"]
    lines += [f"| {name} | {value:.2f} |" for name, value in report["metrics"].items()]
    definitions = report.get("metric_definitions") or {}
    if definitions:  # metrics published under one name with several definitions: say which is which
        lines += [""] + [f"- `{name}`: {text}" for name, text in definitions.items()]
    return "\n".join(lines)


def metric_definitions(benchmark: str, metrics: dict) -> dict[str, str]:
    """What the metrics of ``benchmark`` that the literature defines in more than one way mean, with their sources
    (CIRR's two "Avg" columns), for those present in ``metrics``."""
    known = {"cirr": CIRR_AVG_DEFINITIONS}.get(benchmark, {})
    return {name: text for name, text in known.items() if name in metrics}


def _check_protocol_fits(pipeline: Any, protocol: BenchmarkProtocol) -> None:
    """Refuse, before the gallery is embedded, a protocol fixing a pipeline argument the pipeline does not take (the
    bgevl protocol's 75-token truncation is an argument of BGEVLPipeline)."""
    accepted = pipeline.call_parameters()
    refused = sorted(name for name in protocol.call_kwargs if name not in accepted)
    if refused:
        raise ValueError(
            f"The {protocol.benchmark} protocol {protocol.name!r} sets {refused}, which {type(pipeline).__name__} does "
            "not take: it is a protocol for another model. Leave `protocol` out for the official one."
        )


def _subsets_for(protocol: BenchmarkProtocol, subsets: Sequence[str] | None) -> list[str | None]:
    if not protocol.subsets:
        if subsets:
            raise ValueError(
                f"{protocol.benchmark} has no subsets; `subsets` is for FashionIQ categories and GeneCIS tasks."
            )
        return [None]
    chosen = list(subsets) if subsets else list(protocol.subsets)
    unknown = set(chosen) - set(protocol.subsets)
    if unknown:
        raise ValueError(f"Unknown {protocol.benchmark} subsets {sorted(unknown)}.")
    return chosen


def _write_outputs(outputs: list[SplitOutput], output_dir: Path) -> dict[str, Path]:
    """Rankings, query embeddings and submission files of every split, by role."""
    files: dict[str, Path] = {}
    for output in outputs:
        suffix = f"_{output.benchmark.subset}" if output.benchmark.subset else ""
        files[f"rankings{suffix}"] = write_json(output.rankings, output_dir / f"rankings{suffix}.json")
        embeddings_path = output_dir / f"query_embeddings{suffix}.safetensors"
        save_file({"query_embeds": output.query_embeds.contiguous()}, str(embeddings_path),
                  metadata={"query_ids": json.dumps([q.query_id for q in output.benchmark.queries])})
        files[f"query_embeddings{suffix}"] = embeddings_path
        for role, (name, content) in output.submissions.items():
            files[role] = write_json(content, output_dir / name)
    return files


def run_evaluation(
    pipeline: Any,
    benchmark: str,
    data_root: str | os.PathLike,
    split: str = "val",
    *,
    output_dir: str | os.PathLike,
    protocol: str | BenchmarkProtocol | None = None,
    subsets: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    caption_style: str | None = None,
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
    rewrite_ensemble: str | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Evaluate ``pipeline`` on ``benchmark`` / ``split`` read from ``data_root`` (official layout).

    Args:
        pipeline: a CIR pipeline (anything meeting the pipeline contract, e.g. ``AutoCIRPipeline.from_pretrained``'s
            result, or the model-free :class:`~diffusers_cir.evaluation.IdHashEncoder`), or a function without
            arguments that builds one: it is called once the arguments and the annotation files have been checked,
            so a typo in them fails before the model loads.
        benchmark: ``"cirr"``, ``"fashioniq"``, ``"circo"`` or ``"genecis"``.
        protocol: how the benchmark is evaluated: a preset's name in :data:`~.protocols.PROTOCOLS` or a
            :class:`~.protocols.BenchmarkProtocol`; default: the benchmark's official one.
        subsets: FashionIQ categories or GeneCIS tasks (default: all); FashionIQ and GeneCIS averages are over them.
        output_dir: receives ``metrics.json``, ``metrics.md``, ``rankings*.json``, ``query_embeddings*.safetensors``
            and the submission files.
        cache_dir: the gallery cache (default ``<output_dir>/embedding_cache``): one resumable
            :func:`~diffusers_cir.retrieval.encode_gallery` folder per pipeline fingerprint and split; reruns reuse
            it, an interrupted run resumes.
        caption_style: FashionIQ caption joining, the name of a FashionIQ protocol: ``"clip4cir"`` (default) or
            ``"searle"`` (both orders, averaged).
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
            A ranking is as deep as the protocol says; a gallery smaller than that gives shorter lists (the index
            pads, and only the ids found are kept).
        loader_kwargs: extra arguments of the benchmark loader (``gallery_ids`` for CIRCO, ``image_root`` for GeneCIS).
        rewrite_ensemble: how a CaptionRewritePipeline's rewrites become one query: ``"ldre"``, LDRE's adaptive
            ensemble over the split (:func:`~diffusers_cir.retrieval.compose_ldre_queries`), or ``"mean"``, the
            pipeline's ``image_embeds``. Default: as the LDRE authors rank, ``"ldre"`` for an LDRE-recipe pipeline
            on CIRCO and ``"mean"`` otherwise (see :mod:`.rewrite_ensemble`). The report records which ran.

    Example:

    ```py
    >>> from diffusers_cir import AutoCIRPipeline
    >>> from diffusers_cir.evaluation import run_evaluation
    >>> pipe = AutoCIRPipeline.from_pretrained("compodiff-aesthetic-diffusers").to("cuda")  # doctest: +SKIP
    >>> run_evaluation(pipe, "cirr", "/data/CIRR", "val", output_dir="eval/cirr").metrics["avg"]  # doctest: +SKIP

    ```
    """
    if protocol is not None and caption_style is not None:
        raise ValueError("Pass `protocol` or `caption_style` (a FashionIQ protocol's name), not both.")
    if not isinstance(protocol, BenchmarkProtocol):
        argument = "caption_style" if caption_style is not None else "protocol"
        protocol = get_protocol(benchmark, protocol if caption_style is None else caption_style, argument=argument)
    if protocol.benchmark != benchmark:
        raise ValueError(f"`protocol` {protocol.name!r} evaluates {protocol.benchmark}, not {benchmark}.")
    if "{}" not in check_string(prompt_template, "prompt_template"):
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
        for subset in _subsets_for(protocol, subsets)
    ]
    check_rewrite_ensemble(rewrite_ensemble, loaded_splits, protocol, prompt_template)
    if not hasattr(pipeline, "encode_image"):
        pipeline = pipeline()
    rewrite_ensemble = resolve_rewrite_ensemble(pipeline, benchmark, rewrite_ensemble)
    _check_protocol_fits(pipeline, protocol)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    embed = SplitEmbedder(pipeline, output_dir / "embedding_cache" if cache_dir is None else Path(cache_dir),
                          image_batch_size, num_workers, cache_part_size, progress)
    outputs = [
        evaluate_split(pipeline, loaded, protocol, embed, prompt_template=prompt_template,
                       query_batch_size=query_batch_size, seed=seed, call_kwargs=call_kwargs,
                       index_factory=index_factory, write_submissions=write_submissions,
                       rewrite_ensemble=rewrite_ensemble, progress=progress)
        for loaded in loaded_splits
    ]
    if not all(output.benchmark.has_labels for output in outputs):
        metrics = {}
    elif protocol.average is not None:
        metrics = protocol.average({output.benchmark.subset: output.metrics for output in outputs})
    else:
        metrics = outputs[0].metrics
    files = _write_outputs(outputs, output_dir)
    report = {
        "benchmark": benchmark,
        "split": split,
        "subsets": [o.benchmark.subset for o in outputs if o.benchmark.subset],
        "encoder": pipeline.fingerprint,
        "scale": "percent",
        "num_queries": {o.benchmark.subset or benchmark: len(o.benchmark) for o in outputs},
        "gallery_size": {o.benchmark.subset or benchmark: len(o.benchmark.gallery_ids) for o in outputs
                         if o.benchmark.gallery_ids is not None},
        "settings": {"protocol": protocol.name, **protocol.settings, "prompt_template": prompt_template,
                     "query_batch_size": query_batch_size, "search": getattr(index_factory, "__name__", "custom")},
        "metrics": metrics,
        "metric_definitions": metric_definitions(benchmark, metrics),
        "files": {role: path.name for role, path in files.items()},
    }
    if rewrite_ensemble is not None:
        report["settings"]["rewrite_ensemble"] = rewrite_ensemble_settings(rewrite_ensemble)
    if rewrite_ensemble == "ldre":
        report["ldre_slot_weights"] = {o.benchmark.subset or benchmark: o.ensemble_weights for o in outputs}
    files["markdown"] = output_dir / "metrics.md"
    files["metrics"] = output_dir / "metrics.json"
    report["files"].update({"markdown": "metrics.md", "metrics": "metrics.json"})
    files["markdown"].write_text(metrics_markdown(report) + "\n")
    write_json(report, files["metrics"], indent=2)
    return EvaluationResult(benchmark, split, metrics, files, report)
