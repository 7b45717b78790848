"""The model-free stand-in of an evaluation (``diffusers-cir evaluate --dry-run``): :class:`IdHashEncoder`.

A real evaluation runs a CIR pipeline through the pipeline contract (``encode_image``, ``fingerprint``,
``embedding_dim``, ``pipe(image_embeds=..., prompt=...)``); the stand-in meets the same contract without pixels or
weights, to check data layouts and output files.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace
from typing import Any, Sequence

import torch

__all__ = ["IdHashEncoder"]


def _stable_seed(value: Any) -> int:
    return int.from_bytes(hashlib.sha256(f"{type(value).__name__}:{value}".encode()).digest()[:8], "little")


class _EveryName(frozenset):
    def __contains__(self, name: object) -> bool:
        return True


class IdHashEncoder:
    """A model-free stand-in meeting the pipeline contract: each image id and each prompt gets a fixed pseudo-random
    embedding, and a query is ``reference + text_weight * prompt_embedding``.

    It reads no pixels (``reads_pixels = False``: the gallery cache hands it the images' ids), so it runs on the
    annotation files alone. Scores are meaningless; the point is a deterministic run of the whole evaluation flow
    (loading, caching, ranking, metrics, files).

    Example:

    ```py
    >>> encoder = IdHashEncoder(embedding_dim=8)
    >>> gallery = encoder.encode_image(["a", 7])
    >>> bool(torch.equal(gallery, encoder.encode_image(["a", 7]))), tuple(gallery.shape)
    (True, (2, 8))
    >>> tuple(encoder(image_embeds=gallery, prompt=["is red", "has two"]).image_embeds.shape)
    (2, 8)

    ```
    """

    reads_pixels = False

    def __init__(self, embedding_dim: int = 64, text_weight: float = 0.5):
        self.embedding_dim = embedding_dim
        self.text_weight = text_weight
        self.fingerprint = f"id-hash-{embedding_dim}"

    def _embed(self, value: Any) -> torch.Tensor:
        generator = torch.Generator().manual_seed(_stable_seed(value))
        return torch.randn(self.embedding_dim, generator=generator)

    def to(self, device) -> "IdHashEncoder":
        return self

    def encode_image(self, images: Sequence, batch_size: int = 64, device=None, show_progress: bool = False):
        """``[N, D]`` embeddings of image ids (what the gallery cache passes an encoder that reads no pixels)."""
        if not len(images):
            return torch.empty(0, self.embedding_dim)
        return torch.stack([self._embed(image_id) for image_id in images])

    @classmethod
    def call_parameters(cls) -> frozenset[str]:
        """Every name: the stand-in takes (and ignores) any option a protocol or the command line gives a pipeline,
        so a dry run runs the evaluation as given."""
        return _EveryName()

    def __call__(self, image_embeds: torch.Tensor, prompt: Sequence[str], output_type: str = "pt", **ignored):
        assert image_embeds.shape[0] == len(prompt), f"{image_embeds.shape[0]} references, {len(prompt)} prompts"
        text = torch.stack([self._embed(f"prompt:{text}") for text in prompt])
        return SimpleNamespace(image_embeds=image_embeds.float() + self.text_weight * text)
