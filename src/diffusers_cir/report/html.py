# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Self-contained HTML pages of retrieval results: a metrics table, plots, and a grid of queries with their top
results (thumbnails inlined as data URIs, hits marked). Used by ``diffusers-cir demo`` and the evaluation report.

Pixels are read with :func:`diffusers_cir.load_image`; an image that cannot be read is shown as a grey box naming
its id, so a page never fails for one missing file.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

THUMBNAIL_SIZE = 112


@dataclass
class ResultView:
    """One ranked result: its id, score, where its picture is (anything ``load_image`` reads, or ``None``) and
    whether it is a correct answer."""

    id: Any
    score: float | None = None
    image: Any = None
    is_hit: bool = False


@dataclass
class QueryView:
    """One query: its reference picture, text(s), the target id(s), and ranked results per method."""

    title: str
    text: str
    reference: Any = None
    reference_id: Any = None
    targets: list[ResultView] = field(default_factory=list)
    results: dict[str, list[ResultView]] = field(default_factory=dict)
    note: str = ""


def thumbnail_uri(source: Any, size: int = THUMBNAIL_SIZE) -> str | None:
    """A PNG data URI of ``source`` shrunk to fit ``size`` pixels (small pictures are enlarged without smoothing,
    so that 64 px pictures stay sharp); ``None`` when it cannot be read."""
    from PIL import Image

    from ..retrieval.images import load_image

    if source is None:
        return None
    try:
        image = load_image(source)
    except (ValueError, OSError):
        return None
    scale = size / max(image.size)
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BICUBIC
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _tile(source: Any, caption: str, css: str = "", cache: dict | None = None) -> str:
    key = source if isinstance(source, (str, bytes)) else None
    if cache is not None and key is not None and key in cache:
        uri = cache[key]
    else:
        uri = thumbnail_uri(source)
        if cache is not None and key is not None:
            cache[key] = uri
    body = f'<img src="{uri}" alt="">' if uri else '<div class="missing">no image</div>'
    return f'<figure class="{css}">{body}<figcaption>{caption}</figcaption></figure>'


def metrics_table(rows: dict[str, dict[str, float]], percent: bool = False, best: bool = True) -> str:
    """An HTML table: one row per name (method, category, ...), one column per metric; the best value of each
    column in bold."""
    columns = list(dict.fromkeys(key for values in rows.values() for key in values))
    tops = {column: max((values[column] for values in rows.values() if column in values), default=None)
            for column in columns}
    head = "".join(f"<th>{html.escape(_label(column))}</th>" for column in columns)
    body = []
    for name, values in rows.items():
        cells = []
        for column in columns:
            value = values.get(column)
            text = "" if value is None else (f"{100 * value:.1f}" if percent else f"{value:.3f}")
            cells.append(f"<td><b>{text}</b></td>" if best and value is not None and value == tops[column] else f"<td>{text}</td>")
        body.append(f"<tr><th>{html.escape(name)}</th>{''.join(cells)}</tr>")
    return f'<table class="metrics"><tr><th></th>{head}</tr>{"".join(body)}</table>'


def _label(metric: str) -> str:
    from ..utils.model_card import _metric_label

    return _metric_label(metric)


def query_grid(queries: Sequence[QueryView]) -> str:
    """Every query as a block: reference and target pictures, the text, then one row of results per method, the
    correct results outlined in green."""
    cache: dict = {}
    blocks = []
    for query in queries:
        head = []
        if query.reference is not None or query.reference_id is not None:
            head.append(_tile(query.reference, f"reference<br>{html.escape(str(query.reference_id or ''))}", "reference", cache))
        for target in query.targets:
            head.append(_tile(target.image, f"target<br>{html.escape(str(target.id))}", "target", cache))
        rows = []
        for method, results in query.results.items():
            tiles = [
                _tile(result.image, f"#{rank} {html.escape(str(result.id))}"
                      + ("" if result.score is None else f"<br>{result.score:.3f}"), "hit" if result.is_hit else "", cache)
                for rank, result in enumerate(results, 1)
            ]
            rows.append(f'<div class="method"><div class="name">{html.escape(method)}</div>{"".join(tiles)}</div>')
        note = f'<p class="note">{html.escape(query.note)}</p>' if query.note else ""
        blocks.append(
            f'<section class="query"><h3>{html.escape(query.title)}</h3>'
            f'<p class="text">&ldquo;{html.escape(query.text)}&rdquo;</p>{note}'
            f'<div class="row">{"".join(head)}</div>{"".join(rows)}</section>'
        )
    return "\n".join(blocks)


def page(title: str, sections: Sequence[str], subtitle: str = "") -> str:
    """A complete HTML document holding ``sections`` (HTML fragments), with the styles of this module."""
    sub = f"<p>{html.escape(subtitle)}</p>" if subtitle else ""
    return _PAGE.format(title=html.escape(title), subtitle=sub, body="\n".join(sections))


_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table.metrics {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
table.metrics td, table.metrics th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
.query {{ border-top: 1px solid #ddd; padding: 0.5em 0; }}
.query h3 {{ margin: 0.2em 0; font-size: 1em; }}
.text {{ font-size: 1.1em; margin: 0.2em 0 0.5em; }}
.note {{ color: #666; margin: 0; }}
.row, .method {{ display: flex; flex-wrap: wrap; gap: 6px; align-items: flex-start; margin: 4px 0; }}
.method .name {{ width: 120px; font-weight: bold; padding-top: 40px; }}
figure {{ margin: 0; width: 116px; text-align: center; }}
figure img {{ width: 112px; height: 112px; border: 2px solid transparent; image-rendering: pixelated; }}
figure.hit img {{ border-color: #1a9c3c; }}
figure.reference img {{ border-color: #555; }}
figure.target img {{ border-color: #1a9c3c; border-style: dashed; }}
figcaption {{ font-size: 0.75em; word-break: break-all; }}
.missing {{ width: 112px; height: 112px; background: #eee; display: flex; align-items: center; justify-content: center; }}
</style></head>
<body><h1>{title}</h1>{subtitle}
{body}
</body></html>
"""
