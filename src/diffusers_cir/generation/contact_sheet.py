# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Stage 9: an HTML contact sheet of generated triplets for a person to look at.

One self-contained file (thumbnails inlined as data URIs): per row the reference image, the instruction (and the
reverse text), the target image, the mask over the target, the captions, the keyword pair and the CLIP scores.
Pixels are read with :func:`diffusers_cir.load_image`.

Example:
    >>> from diffusers_cir.generation.contact_sheet import write_contact_sheet
    >>> write_contact_sheet("my_generated_dataset", max_rows=32)  # doctest: +SKIP
    'my_generated_dataset/generation/train/contact_sheet.html'
"""

from __future__ import annotations

import base64
import html
import io
import os

from ..data import schema
from .output import run_dir

THUMBNAIL = 160

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
td, th { border-bottom: 1px solid #ddd; padding: 6px 10px; vertical-align: top; text-align: left; }
img { width: 160px; height: auto; display: block; image-rendering: pixelated; }
.text { max-width: 22em; } .instruction { font-weight: 600; font-size: 1.05em; }
.muted { color: #777; font-size: 0.85em; } .scores { font-family: monospace; font-size: 0.85em; }
"""


def _data_uri(value, mask_over=None) -> str:
    """A PNG data URI of an image column value (a thumbnail; a mask is drawn in red over ``mask_over``)."""
    from PIL import Image

    from ..retrieval.images import load_image

    image = load_image(value, name="contact sheet image")
    if mask_over is not None:
        base = load_image(mask_over, name="contact sheet image").resize(image.size)
        red = Image.new("RGB", image.size, (255, 0, 0))
        image = Image.composite(Image.blend(base, red, 0.5), base, load_image(value, mode="L"))
    scale = THUMBNAIL / max(image.size)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _text(value) -> str:
    return html.escape(str(value)) if value not in (None, "") else '<span class="muted">-</span>'


def _scores(row: dict) -> str:
    names = [name for name in sorted(row) if name.startswith("clip_") and row[name] is not None]
    parts = [f"{name[5:]} {row[name]:.3f}" for name in names]
    return "<br>".join(parts) or '<span class="muted">-</span>'


def _row_html(row: dict) -> str:
    reference, target = row[schema.REFERENCE_IMAGE], row[schema.TARGET_IMAGE]
    mask = row.get(schema.MASK)
    mask_cell = (f'<img src="{_data_uri(mask, mask_over=target)}" alt="mask"><div class="muted">'
                 f'{_text(row.get("mask_term"))}</div>') if mask else '<span class="muted">no mask</span>'
    reverse = row.get("reverse_modification_text")
    keywords = (f'<div class="muted">{_text(row.get("source_keyword"))} &rarr; {_text(row.get("target_keyword"))}</div>'
                if row.get("source_keyword") else "")
    return (
        "<tr>"
        f'<td><img src="{_data_uri(reference)}" alt="reference"><div class="muted text">'
        f'{_text(row.get(schema.REFERENCE_CAPTION))}</div></td>'
        f'<td class="text"><div class="instruction">{_text(row[schema.MODIFICATION_TEXT])}</div>{keywords}'
        + (f'<div class="muted">reverse: {_text(reverse)}</div>' if reverse else "")
        + f'<div class="muted">{_text(row.get("method"))} &middot; {_text(row.get("id"))}</div></td>'
        f'<td><img src="{_data_uri(target)}" alt="target"><div class="muted text">'
        f'{_text(row.get(schema.TARGET_CAPTION))}</div></td>'
        f"<td>{mask_cell}</td>"
        f'<td class="scores">{_scores(row)}<div class="muted">{_text(row.get("generator"))} seed '
        f'{_text(row.get("seed"))}</div></td>'
        "</tr>"
    )


def write_contact_sheet(folder: str, split: str = "train", max_rows: int = 48, path: str | None = None) -> str:
    """Write the first ``max_rows`` rows of ``folder``'s ``images`` split as an HTML page; returns its path
    (default ``folder/generation/{split}/contact_sheet.html``)."""
    from ..data.shards import parquet_file, shard_files

    rows = []
    for shard in shard_files(folder, schema.IMAGES_CONFIG, split):
        for batch in parquet_file(shard).iter_batches(batch_size=64):
            rows.extend(batch.to_pylist())
            if len(rows) >= max_rows:
                break
        if len(rows) >= max_rows:
            break
    rows = rows[:max_rows]
    body = "\n".join(_row_html(row) for row in rows) or '<tr><td colspan="5">No triplet survived the filters.</td></tr>'
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Generated triplets: {html.escape(os.path.basename(
        os.path.abspath(folder)))} ({html.escape(split)})</title><style>{_STYLE}</style></head>
<body>
<h1>Generated triplets</h1>
<p class="muted">{len(rows)} row(s) of {html.escape(os.path.abspath(folder))}, split {html.escape(split)}.</p>
<table>
<thead><tr><th>reference</th><th>instruction</th><th>target</th><th>mask</th><th>scores</th></tr></thead>
<tbody>
{body}
</tbody></table>
</body></html>
"""
    path = path or os.path.join(run_dir(folder, split), "contact_sheet.html")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(page)
    return path
