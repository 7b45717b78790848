# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""The HTML page of ``diffusers-cir demo``: Recall@K per method (table and curves), then example queries with each
method's top results, the target outlined. Self-contained: the pictures are inlined."""

from __future__ import annotations

import html
import os
from pathlib import Path


def write_demo_page(result, path: str | os.PathLike, world) -> Path:
    from ..report.html import QueryView, ResultView, metrics_table, page, query_grid
    from ..report.plots import recall_at_k_svg, recall_curves

    paths = {}
    for example in result.examples:
        paths[example["reference"]] = example["reference_path"]
        paths[example["target"]] = example["target_path"]
    gallery_dir = Path(result.examples[0]["reference_path"]).parent if result.examples else None

    def picture(item_id):
        if item_id in paths:
            return paths[item_id]
        return str(gallery_dir / f"{item_id}.png") if gallery_dir is not None else None

    views = []
    for number, example in enumerate(result.examples, 1):
        views.append(QueryView(
            title=f"Example {number}: {example['reference_caption']}",
            text=example["text"],
            reference=example["reference_path"],
            reference_id=example["reference"],
            targets=[ResultView(example["target"], image=example["target_path"], is_hit=True)],
            results={method: [ResultView(hit["id"], hit["score"], picture(hit["id"]), hit["is_target"]) for hit in hits]
                     for method, hits in example["results"].items()},
            note=f"target: {example['target_caption']}",
        ))
    methods = "".join(f"<li><b>{html.escape(name)}</b>: {html.escape(text)}</li>" for name, text in result.methods.items())
    sections = [
        f"<p>{result.num_queries} test queries: a reference picture and a modification text whose target is an "
        f"object-colour pair no training triplet reached; {result.gallery_size} gallery pictures, the reference "
        f"excluded. Model: {html.escape(result.source)}.</p><ul>{methods}</ul>",
        "<h2>Recall@K</h2>",
        metrics_table(result.recalls),
        recall_at_k_svg({name: recall_curves(values) for name, values in result.recalls.items()}),
        "<h2>Example queries</h2><p>Each method's top 5; the target is outlined in green.</p>",
        query_grid(views),
    ]
    document = page("diffusers-cir demo: composed retrieval on the picture world", sections,
                    subtitle=f"{world!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document, encoding="utf-8")
    return path
