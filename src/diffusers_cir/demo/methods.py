# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""The retrieval methods ``diffusers-cir demo`` compares, as a registry: a method joins by registering a factory.

A method turns queries (reference pictures as files, modification texts) into query embeddings ``[Q, D]`` in the
space of its ``gallery_encoder`` (anything with ``encode_image``, ``fingerprint`` and ``embedding_dim``: a CIR
pipeline, a :class:`~diffusers_cir.retrieval.CLIPVisionEncoder`, ...). The demo indexes the gallery once per distinct
gallery encoder (by fingerprint), so methods that share an image tower share an index, and a method with its own
encoder gets its own.

Built in: ``compodiff`` (the demo's CompoDiff pipeline through :func:`diffusers_cir.retrieval.compose_queries`) and the
usual training-free baselines over the same CLIP pair: ``image_only`` (the reference's embedding), ``text_only`` (the
text's embedding) and ``image_text_sum`` (the sum of both, normalised).

Adding one::

    from diffusers_cir.demo.methods import DemoMethod, register_demo_method

    @register_demo_method("my_method", "what it does, one line")
    def build(context):  # a DemoContext: the world, the demo pipeline, seed, batch size, work_dir
        pipeline = AutoCIRPipeline.from_pretrained("my-pipeline-trained-on-the-picture-world")
        return PipelineMethod("my_method", pipeline)

then ``diffusers-cir demo --methods compodiff,my_method``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["DEMO_METHODS", "DemoContext", "DemoMethod", "PipelineMethod", "register_demo_method"]


@dataclass
class DemoContext:
    """What a method factory may use: the world, the demo's CompoDiff pipeline (its ``image_encoder`` /
    ``text_encoder`` are the world's CLIP pair), the sampling seed and settings, the batch size, and a folder."""

    world: Any
    pipeline: Any
    seed: int = 0
    batch_size: int = 256
    call_kwargs: dict = field(default_factory=dict)  # the demo pipeline's guidance and steps
    show_progress: bool = False
    # A folder of this run for what a method writes (data, a network it trains now); removed with the run's other
    # files unless the user kept them (`diffusers-cir demo --output-dir`).
    work_dir: Path | None = None
    # The pretrained BLIP-2 folder `fashionblip2` fine-tunes (None: pretrain one now, with `blip2_recipe`).
    blip2_dir: Path | None = None
    blip2_recipe: Any = None


class DemoMethod:
    """A method of the demo: ``compose`` gives L2-normalised query embeddings in ``gallery_encoder``'s space."""

    name: str
    gallery_encoder: Any

    def compose(self, references: Sequence[str], texts: Sequence[str]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


@dataclass
class _Registered:
    factory: Callable[[DemoContext], DemoMethod]
    description: str


DEMO_METHODS: dict[str, _Registered] = {}
"""Every registered method by name (``diffusers-cir demo --methods`` chooses among them)."""


def register_demo_method(name: str, description: str):
    """Decorator registering ``factory(context) -> DemoMethod`` as the demo method ``name``."""

    def decorate(factory: Callable[[DemoContext], DemoMethod]):
        DEMO_METHODS[name] = _Registered(factory, description)
        return factory

    return decorate


def build_methods(names: Sequence[str], context: DemoContext) -> list[DemoMethod]:
    """The methods ``names`` (checked against the registry first, so a typo fails before anything runs)."""
    unknown = [name for name in names if name not in DEMO_METHODS]
    if unknown:
        raise ValueError(
            f"Unknown demo method(s) {', '.join(map(repr, unknown))}; registered: {', '.join(DEMO_METHODS)}."
        )
    return [DEMO_METHODS[name].factory(context) for name in names]


class PipelineMethod(DemoMethod):
    """Any CIR pipeline: it composes from the reference pictures and embeds the gallery with its own image side."""

    def __init__(self, name: str, pipeline, batch_size: int = 256, seed: int = 0, show_progress: bool = False,
                 **call_kwargs):
        self.name, self.pipeline, self.gallery_encoder = name, pipeline, pipeline
        self.batch_size, self.seed, self.show_progress, self.call_kwargs = batch_size, seed, show_progress, call_kwargs

    def compose(self, references, texts):
        from ..retrieval import compose_queries

        return compose_queries(
            self.pipeline, list(texts), reference_images=list(references), batch_size=self.batch_size,
            seed=self.seed, show_progress=self.show_progress, **self.call_kwargs,
        )


class ClipBaseline(DemoMethod):
    """A training-free baseline over a CLIP pair: the reference's image embedding, the text's embedding, or both."""

    def __init__(self, name: str, pipeline, use_image: bool, use_text: bool, batch_size: int = 256):
        self.name, self.pipeline, self.gallery_encoder = name, pipeline, pipeline
        self.use_image, self.use_text, self.batch_size = use_image, use_text, batch_size

    @torch.no_grad()
    def compose(self, references, texts):
        normalize = torch.nn.functional.normalize
        query = 0
        if self.use_image:
            query = query + normalize(self.pipeline.encode_image(list(references), batch_size=self.batch_size).float(), dim=-1)
        if self.use_text:
            tokens = self.pipeline.tokenizer(list(texts), padding="longest", return_tensors="pt")
            embeds = torch.cat([
                self.pipeline.text_encoder(input_ids=tokens.input_ids[i:i + self.batch_size]).text_embeds
                for i in range(0, len(texts), self.batch_size)
            ])
            query = query + normalize(embeds.float(), dim=-1)
        return normalize(query, dim=-1)


@register_demo_method("compodiff", "CompoDiff: the diffusion prior trained on the world's triplets")
def _compodiff(context: DemoContext) -> DemoMethod:
    return PipelineMethod("compodiff", context.pipeline, context.batch_size, context.seed, context.show_progress,
                          **context.call_kwargs)


@register_demo_method("image_only", "the reference picture's CLIP embedding (ignores the text)")
def _image_only(context: DemoContext) -> DemoMethod:
    return ClipBaseline("image_only", context.pipeline, use_image=True, use_text=False, batch_size=context.batch_size)


@register_demo_method("text_only", "the modification text's CLIP embedding (ignores the picture)")
def _text_only(context: DemoContext) -> DemoMethod:
    return ClipBaseline("text_only", context.pipeline, use_image=False, use_text=True, batch_size=context.batch_size)


@register_demo_method("image_text_sum", "the sum of both normalised CLIP embeddings")
def _image_text_sum(context: DemoContext) -> DemoMethod:
    return ClipBaseline("image_text_sum", context.pipeline, use_image=True, use_text=True, batch_size=context.batch_size)


# The composition networks and FashionBLIP-2 register themselves here too (they train now, on the world: see
# demo/fusion.py and demo/fashionblip2.py).
from . import fashionblip2, fusion  # noqa: E402,F401
