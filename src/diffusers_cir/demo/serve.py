# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""``diffusers-cir serve``: a gradio page for composed search.

Pick or upload a reference picture, type the modification text (and a negative text where the model takes one), draw
a mask on the picture with the brush (where the model takes one), set the guidance and the number of steps (the
sliders shown are the ones the chosen model's ``call_parameters()`` has), choose among the loaded models, and see the
top results with their ids and scores. Every search is one :func:`diffusers_cir.retrieval.composed_search` call.

Two backends:

* :func:`picture_world_backend` (no arguments): the built-in picture world's gallery, drawn into a folder and indexed
  through the retrieval API, with the shipped demo pipeline;
* :func:`index_backend` (``--index DIR --model PATH ...``): any saved index and any registered pipelines (loaded
  through ``AutoCIRPipeline``), each checked against the index's gallery encoder.
"""

from __future__ import annotations

import hashlib
import html
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# The query settings a page may offer, with their slider ranges (shown only when the model's call takes them).
SLIDERS = {
    "guidance_scale": ("Text guidance", 0.0, 15.0, 0.1),
    "image_guidance_scale": ("Image guidance", 0.0, 5.0, 0.1),
    "num_inference_steps": ("Steps", 1, 50, 1),
}


def pixel_digest(image) -> str:
    """A digest of a picture's RGB pixels: finds a pasted or uploaded copy of a gallery picture."""
    rgb = image.convert("RGB")
    return hashlib.sha1(rgb.tobytes() + f"{rgb.size}".encode()).hexdigest()


@dataclass
class ServedModel:
    """A loaded pipeline and the query settings the page starts from."""

    name: str
    pipeline: Any
    defaults: dict = field(default_factory=dict)

    @property
    def parameters(self) -> frozenset:
        return self.pipeline.call_parameters()

    def setting_defaults(self) -> dict:
        """Slider values: the model's recorded defaults, else its ``__call__``'s own defaults."""
        signature = inspect.signature(type(self.pipeline).__call__).parameters
        values = {}
        for name in SLIDERS:
            if name in self.parameters:
                default = signature[name].default if name in signature else None
                values[name] = self.defaults.get(name, default if default is not inspect.Parameter.empty else None)
        return values


@dataclass
class ServeBackend:
    """An index, the models that search it, reference pictures to offer, and the pixel digests of gallery pictures
    (a reference that is a gallery picture is left out of its own results, as benchmarks do)."""

    index: Any
    models: dict[str, ServedModel]
    examples: list[str] = field(default_factory=list)
    gallery_digests: dict[str, Any] = field(default_factory=dict)
    title: str = "diffusers-cir: composed image retrieval"
    description: str = ""

    def gallery_id_of(self, image) -> str | None:
        """The id of the gallery picture ``image`` is a pixel-exact copy of, else ``None``."""
        return None if image is None else self.gallery_digests.get(pixel_digest(image))

    def describe_reference(self, image) -> str:
        """One line on the reference the page holds (what the server received, before any search)."""
        if image is None:
            return "No reference picture: the search composes from the text alone."
        found = self.gallery_id_of(image)
        where = f"the gallery picture {found}, left out of its results" if found else "not a gallery picture"
        return f"Reference: {image.width}x{image.height}, {where}."

    def search(self, model_name: str, image, text: str, negative_text: str = "", mask=None, k: int = 12,
               settings: dict | None = None, exclude_reference: bool = True, seed: int = 0):
        """Run one query; returns ``(hits, excluded ids)`` (hits of :func:`composed_search`)."""
        import torch

        from ..retrieval import composed_search

        if model_name not in self.models:
            raise ValueError(f"Unknown model {model_name!r}; loaded: {', '.join(self.models)}.")
        if not text or not text.strip():
            raise ValueError("Type a modification text (what to change), e.g. 'make it blue'.")
        model = self.models[model_name]
        kwargs = {name: value for name, value in (settings or {}).items() if name in model.parameters and value is not None}
        if "num_inference_steps" in kwargs:
            kwargs["num_inference_steps"] = int(kwargs["num_inference_steps"])
        excluded = []
        if exclude_reference:
            reference_id = self.gallery_id_of(image)
            if reference_id is not None:
                excluded.append(reference_id)
        result = composed_search(
            model.pipeline, self.index, image=image, text=text.strip(),
            negative_text=negative_text.strip() or None if negative_text else None, mask=mask, k=int(k),
            exclude_ids=excluded, generator=torch.Generator().manual_seed(int(seed)), **kwargs,
        )
        return result.hits, result.excluded_ids


def picture_world_backend(world_name: str = "default", pipeline_dir=None, work_dir=None, seed: int = 0,
                          show_progress: bool = True) -> ServeBackend:
    """The built-in picture world and its shipped CompoDiff (or the demo pipeline in ``pipeline_dir``); the gallery
    pictures and the index are written into ``work_dir`` (default: a new temporary folder, left for the caller to
    remove: the page shows the pictures from there)."""
    import tempfile

    from ..retrieval import GalleryItem
    from . import (
        SHIPPED_PIPELINE,
        _gallery_index,
        build_picture_world,
        demo_settings,
        load_demo_pipeline,
    )

    pipeline_dir = Path(pipeline_dir or SHIPPED_PIPELINE)
    world = build_picture_world(world_name, seed)
    work = Path(work_dir or tempfile.mkdtemp(prefix="diffusers-cir-serve-"))
    paths = world.render_gallery(work / "gallery", progress=show_progress)
    pipeline = load_demo_pipeline(pipeline_dir)
    items = [GalleryItem(id=item_id, path=path) for item_id, path in zip(world.gallery_ids, paths)]
    index = _gallery_index(pipeline, items, work, show_progress)
    from ..retrieval import load_image

    digests = {pixel_digest(load_image(path)): item_id for path, item_id in zip(paths, world.gallery_ids)}
    test = world.triplets("test")
    picks = np.random.default_rng(seed).choice(len(test), min(8, len(test)), replace=False)
    examples = list(dict.fromkeys(paths[int(test.reference_indices[i])] for i in picks))
    name = "CompoDiff (picture world)"
    model = ServedModel(name, pipeline, demo_settings(pipeline_dir).get("call_kwargs", {}))
    return ServeBackend(
        index, {name: model}, examples, digests,
        title="diffusers-cir: composed retrieval on the picture world",
        description=(f"{world.num_items} pictures of objects in colours, materials, styles and positions. Pick a "
                     "picture (or upload one), say what to change (\"make it blue\", \"move it to the left\", \"as a "
                     "sketch\"), and search."),
    )


def index_backend(index_dir, model_paths, device: str | None = None) -> ServeBackend:
    """Any saved index and the pipelines ``model_paths`` (default: the model the index was built with)."""
    from ..retrieval import GalleryIndex, load_pipeline
    from ..retrieval.encoders import query_fingerprint

    index = GalleryIndex.load(index_dir)
    model_paths = list(model_paths) or ([index.model] if index.model else [])
    if not model_paths:
        raise ValueError(f"--model is needed: the index {index_dir} does not record the model it was built with.")
    models = {}
    for path in model_paths:
        pipeline = load_pipeline(path, device=device)
        pipeline.set_progress_bar_config(disable=True)
        # Refused now, not at the first query, when the gallery was embedded by another encoder.
        index.check_query_model(getattr(pipeline, "name_or_path", None), query_fingerprint(pipeline, index.model_fingerprint))
        name = Path(str(path)).name or str(path)
        models[name if name not in models else str(path)] = ServedModel(name, pipeline)
    paths = [entry.get("path") for entry in (index.metadata or []) if entry and entry.get("path")]
    return ServeBackend(index, models, paths[:8], title=f"diffusers-cir: composed search over {Path(index_dir).name}",
                        description=f"{len(index)} gallery images.")


def _split_editor(value):
    """``(reference picture, mask or None)`` of an ImageEditor value: the background is the picture, anything drawn
    on the layers is the mask (white where drawn)."""
    from PIL import Image

    if value is None:
        return None, None
    background = value.get("background") if isinstance(value, dict) else value
    if background is None:
        return None, None
    reference = background.convert("RGB")
    mask = None
    for layer in (value.get("layers") or []) if isinstance(value, dict) else []:
        if layer is None:
            continue
        alpha = np.asarray(layer.convert("RGBA").getchannel("A")) > 0
        if alpha.shape != (reference.height, reference.width):
            alpha = np.asarray(Image.fromarray(alpha).resize(reference.size, Image.Resampling.NEAREST))
        mask = alpha if mask is None else (mask | alpha)
    if mask is not None and not mask.any():
        mask = None
    return reference, None if mask is None else Image.fromarray((mask * 255).astype(np.uint8), "L")


def _thumbnail(hit):
    from ..retrieval import load_image

    path = (hit.metadata or {}).get("path")
    try:
        return load_image(path) if path else None
    except (ValueError, OSError):
        return None


def build_app(backend: ServeBackend):
    """The gradio ``Blocks`` of ``backend`` (launch it with ``.launch()``)."""
    import gradio as gr

    first = next(iter(backend.models.values()))
    defaults = first.setting_defaults()

    def controls_for(model_name):
        model = backend.models[model_name]
        values = model.setting_defaults()
        updates = [gr.update(visible="negative_prompt" in model.parameters)]
        updates += [gr.update(visible=name in values, value=values.get(name)) for name in SLIDERS]
        return updates

    def run(model_name, editor, text, negative_text, k, exclude, seed, *slider_values):
        reference, mask = _split_editor(editor)
        if mask is not None and "mask_image" not in backend.models[model_name].parameters:
            raise gr.Error(f"{model_name} takes no mask: erase the drawing, or choose another model.")
        settings = dict(zip(SLIDERS, slider_values))
        try:
            hits, excluded = backend.search(model_name, reference, text, negative_text or "", mask, k, settings,
                                            exclude, seed)
        except ValueError as error:
            raise gr.Error(str(error)) from None
        gallery = [(_thumbnail(hit), f"#{hit.rank} {hit.id} ({hit.score:.3f})") for hit in hits]
        gallery = [(image, caption) for image, caption in gallery if image is not None]
        rows = [[hit.rank, str(hit.id), round(hit.score, 4)] for hit in hits]
        note = f"Left out of the results: {', '.join(map(str, excluded))} (the reference)." if excluded else ""
        if mask is not None:
            note += " The drawn region is what to change."
        return gallery, rows, note.strip()

    with gr.Blocks(title=backend.title, analytics_enabled=False) as app:
        gr.Markdown(f"## {html.escape(backend.title)}\n{backend.description}")
        with gr.Row():
            with gr.Column(scale=1):
                editor = gr.ImageEditor(
                    label="Reference picture (upload or pick below; draw on it to mark the region to change)",
                    type="pil", format="png", image_mode="RGBA", sources=["upload", "clipboard"], height=300,
                    brush=gr.Brush(colors=["#ffffff", "#ff0000"], default_size=8), elem_id="reference",
                )
                reference_note = gr.Markdown(backend.describe_reference(None), elem_id="reference-note")
                if backend.examples:
                    gr.Examples(examples=[[path] for path in backend.examples], inputs=[editor], label="Pictures")
                text = gr.Textbox(label="Modification text", placeholder="make it blue", elem_id="text")
                negative = gr.Textbox(label="Negative text (optional)", placeholder="what the result should not have",
                                      visible="negative_prompt" in first.parameters, elem_id="negative-text")
                model = gr.Dropdown(list(backend.models), value=first.name, label="Model", elem_id="model")
                sliders = []
                for name, (label, low, high, step) in SLIDERS.items():
                    sliders.append(gr.Slider(low, high, value=defaults.get(name, low), step=step, label=label,
                                             visible=name in defaults, elem_id=name.replace("_", "-")))
                with gr.Row():
                    k = gr.Slider(1, 50, value=12, step=1, label="Results")
                    seed = gr.Number(value=0, precision=0, label="Seed")
                exclude = gr.Checkbox(value=True, label="Leave the reference out of the results")
                search = gr.Button("Search", variant="primary", elem_id="search")
            with gr.Column(scale=2):
                note = gr.Markdown(elem_id="note")
                results = gr.Gallery(label="Results", columns=6, height=330, object_fit="contain", format="png",
                                     elem_id="results")
                table = gr.Dataframe(headers=["rank", "id", "score"], label="Ranking", interactive=False,
                                     elem_id="ranking")
        # What the server holds as the reference, as soon as it has it: an upload ends with `upload` (its `change`
        # comes first, still empty), a picked example or a cleared editor with `change`.
        for event in (editor.change, editor.upload):
            event(lambda value: backend.describe_reference(_split_editor(value)[0]), inputs=[editor],
                  outputs=[reference_note], trigger_mode="always_last", show_progress="hidden")
        model.change(controls_for, inputs=[model], outputs=[negative, *sliders])
        inputs = [model, editor, text, negative, k, exclude, seed, *sliders]
        search.click(run, inputs=inputs, outputs=[results, table, note])
        text.submit(run, inputs=inputs, outputs=[results, table, note])
    return app


def launch(backend: ServeBackend, host: str = "127.0.0.1", port: int | None = None):
    """Serve ``backend`` until interrupted."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    app = build_app(backend)
    app.queue(default_concurrency_limit=1)  # one query at a time: the models are not shared across threads
    app.launch(server_name=host, server_port=port, share=False, ssr_mode=False, footer_links=[], quiet=False)
