"""A benchmark split's images through retrieval's one resumable gallery cache (``encode_gallery``), and its
reference images for a pipeline that composes from pixels."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..data.benchmarks import CIRBenchmark, ImageRef
from ..retrieval.gallery import GalleryItem, encode_gallery, items_digest, read_item


@dataclass
class SplitEmbedder:
    """Embeds a split's images with the pipeline into ``cache_dir / <fingerprint> / <digest of the images>``: one
    resumable ``encode_gallery`` folder per pipeline and set of images, reused by later runs."""

    pipeline: Any
    cache_dir: Path
    batch_size: int = 256
    num_workers: int = 0
    part_size: int = 4096
    progress: bool = True

    @property
    def reads_pixels(self) -> bool:
        return getattr(self.pipeline, "reads_pixels", True)

    def __call__(self, benchmark: CIRBenchmark, image_ids: Sequence, what: str) -> torch.Tensor:
        """``[N, D]`` raw float32 gallery embeddings of ``image_ids``, in their order."""
        unique = list(dict.fromkeys(image_ids))
        items = [_gallery_item(benchmark.image(image_id)) for image_id in unique]
        if self.reads_pixels:
            _check_images_exist(benchmark, unique)
        folder = self.cache_dir / _folder_name(self.pipeline.fingerprint) / items_digest(items)[:20]
        gallery = encode_gallery(
            self.pipeline, items, folder, model_name=getattr(self.pipeline, "name_or_path", None),
            batch_size=self.batch_size, part_size=self.part_size, num_workers=self.num_workers,
            show_progress=self.progress, description=f"Encoding {benchmark.description} {what}",
        )
        return torch.from_numpy(gallery.embeddings_of(list(image_ids)))

    def reference_images(self, benchmark: CIRBenchmark) -> "ReferenceImages | None":
        """The queries' reference images, read as each batch is composed (``None`` for a pixel-free pipeline)."""
        if not self.reads_pixels:
            return None
        return ReferenceImages([_gallery_item(benchmark.image(query.reference_id)) for query in benchmark.queries])


class ReferenceImages(Sequence):
    """Images of gallery items, read (upright, 8-bit, cropped) when indexed."""

    def __init__(self, items: list[GalleryItem]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, row: int):
        return read_item(self.items[row])


def _gallery_item(ref: ImageRef) -> GalleryItem:
    return GalleryItem(ref.image_id, path=str(Path(ref.path).resolve()), crop_box=ref.crop_box)


def _folder_name(fingerprint: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", fingerprint)[:120] or "encoder"


def _check_images_exist(benchmark: CIRBenchmark, image_ids: Sequence) -> None:
    missing = benchmark.missing_images(image_ids, limit=1)
    if missing:
        image_id = next(i for i in image_ids if benchmark.image(i).path == missing[0])
        raise FileNotFoundError(
            f"Image {image_id!r} should be at {missing[0]}; the benchmark annotation files do not include the "
            "images: download them from the benchmark's site into the official layout."
        )
