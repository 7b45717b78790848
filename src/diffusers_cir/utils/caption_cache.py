# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Captions kept on disk per image and captioner, so a reference image is captioned once across runs.

A benchmark asks many queries of the same reference image (CIRR and FashionIQ reuse references; an evaluation is
often run again with another LLM or recipe), and captioning with a multi-billion-parameter model dominates the cost.
An entry is keyed by

* the image: a digest of its decoded 8-bit RGB pixels and size (two files with the same pixels share it, an
  EXIF-rotated JPEG and its upright twin too, since pixels enter through :func:`diffusers_cir.load_image`);
* the captioner: a digest of the model's weights and configuration, its processor's settings and the caption
  settings of the recipe (prompt, number of captions, decoding, seed).

Layout: ``<root>/<captioner key>/<first two hex digits of the image key>/<image key>.json`` holding
``{"captions": [...]}``. Entries are written to a temporary file and renamed into place, so concurrent runs and
interrupted ones never leave half a file; a file that cannot be read as an entry is ignored (and rewritten).
The default root is ``$DIFFUSERS_CIR_CACHE/captions``, else ``$HF_HOME/diffusers_cir/captions``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

__all__ = ["CaptionCache", "captioner_key", "default_caption_cache_dir", "image_key"]


def default_caption_cache_dir() -> Path:
    if os.environ.get("DIFFUSERS_CIR_CACHE"):
        return Path(os.environ["DIFFUSERS_CIR_CACHE"]) / "captions"
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "diffusers_cir" / "captions"


def image_key(image) -> str:
    """Digest of a PIL image's pixels (mode, size and bytes)."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def captioner_key(captioner, processor, settings: dict) -> str:
    """Digest of the captioning model, its processor and the caption settings."""
    from .fingerprint import module_digest, processor_digest

    digest = hashlib.blake2b(digest_size=16)
    digest.update(module_digest(captioner).encode())
    digest.update(processor_digest(processor).encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


class CaptionCache:
    """Captions of one captioner under ``root`` (``root=None``: nothing is kept)."""

    def __init__(self, root: str | os.PathLike | None, captioner: str):
        self.folder = None if root is None else Path(root) / captioner

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> list[str] | None:
        if self.folder is None:
            return None
        try:
            entry = json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        captions = entry.get("captions") if isinstance(entry, dict) else None
        if not isinstance(captions, list) or not captions or not all(isinstance(text, str) for text in captions):
            return None
        return captions

    def put(self, key: str, captions: list[str]) -> None:
        if self.folder is None:
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                json.dump({"captions": captions}, file)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
