# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""The HTML report of an evaluation, read from what ``diffusers-cir evaluate`` wrote.

It reads the output folder (``metrics.json``: benchmark, split, subsets, metrics, settings, the files by role;
``rankings*.json``: every query's ranked ids) and, for the pictures and the ground truth, the benchmark's annotation
files through :func:`diffusers_cir.data.benchmarks.load_benchmark` (its image locations). It writes ``report.html``
next to them: the metrics table (one row per FashionIQ category or GeneCIS task, plus the average), Recall@K curves
(matplotlib), and a grid of queries with their top-K results, the ground truth outlined in green. Without the images
on disk the grid still marks the hits by id.

Example:
    >>> from diffusers_cir.report.evaluation import write_evaluation_report
    >>> write_evaluation_report("eval/cirr-val", data_root="/data/CIRR")  # doctest: +SKIP
    PosixPath('eval/cirr-val/report.html')
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

REPORT_NAME = "report.html"


def read_evaluation(output_dir: str | os.PathLike) -> tuple[dict, dict[str | None, dict]]:
    """``(metrics.json, {subset or None: {query id: ranked ids}})`` of an evaluation output folder."""
    output_dir = Path(output_dir)
    path = output_dir / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{output_dir} holds no metrics.json: is it the --output-dir of `diffusers-cir evaluate`?")
    report = json.loads(path.read_text(encoding="utf-8"))
    rankings = {}
    for subset in report.get("subsets") or [None]:
        name = f"rankings_{subset}.json" if subset else "rankings.json"
        file = output_dir / report.get("files", {}).get(f"rankings_{subset}" if subset else "rankings", name)
        if file.is_file():
            rankings[subset] = json.loads(file.read_text(encoding="utf-8"))
    return report, rankings


def metric_rows(report: dict) -> dict[str, dict[str, float]]:
    """The flat metrics as table rows: ``<subset>_<metric>`` keys (FashionIQ categories, GeneCIS tasks) become one
    row per subset, ``average_<metric>`` the average row, everything else one row named after the benchmark."""
    metrics = {key: value for key, value in (report.get("metrics") or {}).items() if isinstance(value, (int, float))}
    prefixes = [*(report.get("subsets") or []), "average"]
    rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        prefix = next((p for p in prefixes if key.startswith(p + "_")), None)
        row = prefix or f"{report.get('benchmark', '')} {report.get('split', '')}".strip()
        rows.setdefault(row, {})[key[len(prefix) + 1:] if prefix else key] = value
    if "average" in rows:
        rows["average"] = rows.pop("average")
    return rows


def _query_views(benchmark, rankings: dict, num_queries: int, k: int, seed: int):
    """Evenly spread queries of a loaded split, their top-``k`` with the ground truth marked."""
    import numpy as np

    from .html import QueryView, ResultView

    queries = [query for query in benchmark.queries if str(query.query_id) in rankings]
    if not queries:
        return []
    picks = np.sort(np.random.default_rng(seed).choice(len(queries), min(num_queries, len(queries)), replace=False))

    def path(image_id):
        return benchmark.images[image_id].path if image_id in benchmark.images else None

    views = []
    for position in picks:
        query = queries[int(position)]
        truth = set(query.ground_truth_ids or ([query.target_id] if query.target_id is not None else []))
        ranked = rankings[str(query.query_id)][:k]
        found = next((rank for rank, item in enumerate(rankings[str(query.query_id)], 1) if item in truth), None)
        views.append(QueryView(
            title=f"{benchmark.description}, query {query.query_id}",
            text=" / ".join(query.captions),
            reference=path(query.reference_id),
            reference_id=query.reference_id,
            targets=[ResultView(item, image=path(item), is_hit=True) for item in list(truth)[:3]],
            results={"ranking": [ResultView(item, None, path(item), item in truth) for item in ranked]},
            note=("labels hidden (test split)" if not truth else
                  f"first ground truth at rank {found}" if found else "no ground truth in the ranking"),
        ))
    return views


def write_evaluation_report(
    output_dir: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    html_path: str | os.PathLike | None = None,
    num_queries: int = 12,
    k: int = 10,
    seed: int = 0,
    loader_kwargs: dict | None = None,
) -> Path:
    """Write the report of the evaluation in ``output_dir`` (default ``output_dir/report.html``); ``data_root``: the
    benchmark folder the evaluation read (for the query grid; without it the report has the metrics only)."""
    from ..data.benchmarks import load_benchmark
    from .html import metrics_table, page, query_grid
    from .plots import recall_at_k_svg, recall_curves

    report, rankings = read_evaluation(output_dir)
    percent = report.get("scale") == "percent"
    rows = metric_rows(report)
    sections = [_settings(report)]
    if rows:
        sections += ["<h2>Metrics</h2>" + (" <small>(percent)</small>" if percent else ""),
                     metrics_table(rows, percent=False)]
        curves = {name: curve for name, values in rows.items() if len(curve := recall_curves(values)) >= 2}
        sections.append(recall_at_k_svg(curves, percent=percent) if curves else "")
    else:
        sections.append("<p>No metrics: the labels of this split are hidden (see the submission files).</p>")
    if data_root is not None:
        sections.append(f"<h2>Queries</h2><p>Top {k} of {num_queries} queries per split; the ground truth is outlined "
                        "in green.</p>")
        for subset, ranking in rankings.items():
            benchmark = load_benchmark(report["benchmark"], data_root, report["split"], subset=subset,
                                       **(loader_kwargs or {}))
            sections.append(query_grid(_query_views(benchmark, ranking, num_queries, k, seed)))
    title = f"{report.get('benchmark', 'evaluation')} {report.get('split', '')} evaluation".strip()
    path = Path(html_path) if html_path is not None else Path(output_dir) / REPORT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page(title, sections), encoding="utf-8")
    return path


def _settings(report: dict) -> str:
    items = [("queries", report.get("num_queries")), ("gallery", report.get("gallery_size")),
             ("encoder fingerprint", report.get("encoder")), *sorted((report.get("settings") or {}).items())]
    cells = "".join(f"<li><b>{html.escape(str(name))}</b>: {html.escape(_short(value))}</li>"
                    for name, value in items if value not in (None, {}, []))
    return f"<ul>{cells}</ul>"


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) < 200 else text[:197] + "..."
