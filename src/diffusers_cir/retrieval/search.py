"""Composed search in one call: reference image + modification text -> ranked gallery images (+ an HTML page).

Example:
    >>> from diffusers_cir.retrieval import composed_search
    >>> result = composed_search("models/compodiff", "galleries/coco-index", image="dog.jpg",
    ...                          text="as a pencil sketch", k=20)  # doctest: +SKIP
    >>> for hit in result.hits:  # doctest: +SKIP
    ...     print(hit.rank, hit.score, hit.id)
    >>> result.save_html("results.html")  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..checks import check_positive_int, check_string
from .compose import compose_queries
from .encoders import load_pipeline, query_fingerprint
from .images import load_image
from .index import GalleryIndex, SearchHit, SearchResult

THUMBNAIL_SIZE = 224


def _open_image(image: Any, name: str, mode: str = "RGB") -> tuple[Image.Image, str | None]:
    """The image read by :func:`~diffusers_cir.load_image` and, for a file, its absolute path (to find it in the
    gallery)."""
    path = str(Path(image).resolve()) if isinstance(image, (str, os.PathLike)) else None
    return load_image(image, mode, name=name), path


@dataclass
class ComposedSearchResult:
    """The ranked results of one composed query, with what is needed to show them."""

    hits: list[SearchHit]
    query_embeds: torch.Tensor
    reference_image: Image.Image | None
    reference_path: str | None
    text: str
    negative_text: str | None = None
    mask_image: Image.Image | None = None
    excluded_ids: list = field(default_factory=list)
    search_result: SearchResult | None = None

    def format_table(self) -> str:
        """A plain-text table: rank, score, id, path."""
        lines = [f"{'rank':>4}  {'score':>7}  id"]
        for hit in self.hits:
            path = (hit.metadata or {}).get("path")
            location = f"  {path}" if path and path != hit.id else ""
            lines.append(f"{hit.rank:>4}  {hit.score:7.4f}  {hit.id}{location}")
        return "\n".join(lines)

    def to_html(self) -> str:
        """A self-contained HTML page: the query (reference, texts, mask) and the result thumbnails."""
        query = [f"<p><b>Text:</b> {html.escape(self.text)}</p>"]
        if self.negative_text:
            query.append(f"<p><b>Negative text:</b> {html.escape(self.negative_text)}</p>")
        if self.excluded_ids:
            excluded = ", ".join(html.escape(str(item)) for item in self.excluded_ids)
            query.append(f"<p><b>Excluded from the results:</b> {excluded}</p>")
        figures = []
        if self.reference_image is not None:
            figures.append(_figure(self.reference_image, "reference", self.reference_path or ""))
        if self.mask_image is not None:
            figures.append(_figure(self.mask_image, "mask", ""))
        cards = []
        for hit in self.hits:
            path = (hit.metadata or {}).get("path")
            thumbnail = _thumbnail_of(path)
            caption = f"#{hit.rank} &middot; {hit.score:.4f}<br>{html.escape(str(hit.id))}"
            cards.append(_card(thumbnail, caption, path))
        return _PAGE.format(query="\n".join(query), reference="\n".join(figures), results="\n".join(cards))

    def save_html(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_html(), encoding="utf-8")
        return path


def _data_uri(image: Image.Image) -> str:
    image = image.copy()
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _thumbnail_of(path: str | None) -> str | None:
    if not path:
        return None
    try:
        return _data_uri(load_image(path))
    except (OSError, ValueError):
        return None  # the card then says the file is unavailable


def _figure(image: Image.Image, label: str, title: str) -> str:
    return (
        f'<figure><img src="{_data_uri(image)}" title="{html.escape(title)}">'
        f"<figcaption>{html.escape(label)}</figcaption></figure>"
    )


def _card(thumbnail: str | None, caption: str, path: str | None) -> str:
    body = f'<img src="{thumbnail}">' if thumbnail else '<div class="missing">image not available</div>'
    title = html.escape(path or "")
    return f'<figure title="{title}">{body}<figcaption>{caption}</figcaption></figure>'


_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>diffusers-cir search</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; width: 224px; }}
figure img {{ max-width: 224px; max-height: 224px; display: block; }}
figcaption {{ font-size: 0.85em; word-break: break-all; }}
.missing {{ width: 224px; height: 160px; background: #eee; display: flex; align-items: center; justify-content: center; }}
</style></head>
<body>
<h2>Query</h2>
<div class="grid">{reference}</div>
{query}
<h2>Results</h2>
<div class="grid">{results}</div>
</body></html>
"""


def _path_lookup(index: GalleryIndex) -> dict[str, Any]:
    if index.metadata is None:
        return {}
    return {
        entry["path"]: item_id
        for item_id, entry in zip(index.ids.tolist(), index.metadata)
        if entry is not None and entry.get("path")
    }


@torch.no_grad()
def composed_search(
    pipeline: Any,
    index: GalleryIndex | str | os.PathLike,
    image: Any = None,
    text: str = "",
    negative_text: str | None = None,
    mask: Any = None,
    k: int = 20,
    exclude_reference: bool = True,
    exclude_ids: list | None = None,
    num_inference_steps: int | None = None,
    generator: torch.Generator | None = None,
    device: str | None = None,
    **pipeline_kwargs,
) -> ComposedSearchResult:
    """Compose a query (reference image + text, optional negative text and mask) and search a gallery index.

    Args:
        pipeline: a CIR pipeline, or what ``AutoCIRPipeline.from_pretrained`` loads (a folder, a Hub id, ...).
        index: a ``GalleryIndex`` or the folder of a saved one. Its embedding model must be the pipeline's gallery
            encoder (checked by fingerprint, then by name).
        image: the reference image (anything :func:`~diffusers_cir.load_image` reads); ``None`` for a text-only
            query.
        text: the modification text ("as a pencil sketch").
        negative_text: what the result should not have.
        mask: a mask image: the region of the reference to change.
        k: number of results.
        exclude_reference: leave out the gallery item whose file is the reference image (reported in
            ``excluded_ids``), as CIR benchmarks do.
        exclude_ids: further ids to leave out.
        num_inference_steps: sampler steps (default: the pipeline's own).
        generator: makes a sampling pipeline's query deterministic (a deterministic pipeline does not need one).
        pipeline_kwargs: forwarded to the pipeline (``guidance_scale``, ``image_guidance_scale``, ...).

    A negative text, a mask or an argument the pipeline cannot take is refused, not dropped.

    Returns:
        A ``ComposedSearchResult``: ``hits`` (rank, id, score, metadata), ``format_table()``, ``save_html(path)``.
    """
    k = check_positive_int(k, "k")  # before loading a pipeline and composing the query, not after
    text = check_string(text, "text")
    if isinstance(pipeline, (str, os.PathLike)):
        pipeline = load_pipeline(pipeline, device=device or "cpu")
    if isinstance(index, (str, os.PathLike)):
        index = GalleryIndex.load(index)
    reference_image, reference_path = _open_image(image, "image") if image is not None else (None, None)
    mask_image = _open_image(mask, "mask", mode="L")[0] if mask is not None else None

    # Fail before the (slow) pipeline call when the gallery comes from another encoder.
    index.check_query_model(getattr(pipeline, "name_or_path", None), query_fingerprint(pipeline, index.model_fingerprint))

    if num_inference_steps is not None:
        pipeline_kwargs["num_inference_steps"] = num_inference_steps
    if generator is not None and "generator" in pipeline.call_parameters():
        pipeline_kwargs["generator"] = generator
    query_embeds = compose_queries(
        pipeline, [text], reference_images=None if reference_image is None else [reference_image],
        negative_prompts=[negative_text], mask_images=[mask_image], seed=None, **pipeline_kwargs,
    )

    excluded = list(exclude_ids or [])
    if exclude_reference and reference_path is not None:
        reference_id = _path_lookup(index).get(reference_path)
        if reference_id is not None and reference_id not in excluded:
            excluded.append(reference_id)
    result = index.search(query_embeds.numpy(), k=k, exclude_ids=[excluded] if excluded else None)
    return ComposedSearchResult(
        hits=result.hits(0),
        query_embeds=query_embeds,
        reference_image=reference_image,
        reference_path=reference_path,
        text=text,
        negative_text=negative_text,
        mask_image=mask_image,
        excluded_ids=excluded,
        search_result=result,
    )
