"""What the evaluation runner needs from a model: embed images, compose queries. Pipelines plug in here.

Any object with ``fingerprint``, ``encode_images(images)`` and ``compose(reference_embeds, prompts)`` works
(:class:`CIREncoder`). :class:`PipelineEncoder` wraps a CompoDiff or LinCIR pipeline folder;
:class:`IdHashEncoder` is a model-free stand-in (deterministic embeddings per image id, no pixels) used by
tests and by ``diffusers-cir evaluate --dry-run`` to check data layouts and output files.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import torch

from ..data.benchmarks.base import ImageRef

__all__ = ["CIREncoder", "PipelineEncoder", "IdHashEncoder", "pipeline_class_for_folder"]

PIPELINE_CLASSES = ("CompoDiffPipeline", "LinCIRPipeline")


@runtime_checkable
class CIREncoder(Protocol):
    """The model side of an evaluation.

    * ``fingerprint``: a string that changes whenever the image embeddings would (keys the gallery cache).
    * ``encode_images(images)``: ``[N, D]`` embeddings of :class:`~diffusers_cir.data.benchmarks.ImageRef` s.
    * ``compose(reference_embeds, prompts)``: ``[B, D]`` composed query embeddings, in the gallery's space.
    """

    fingerprint: str

    def encode_images(self, images: Sequence[ImageRef]) -> torch.Tensor: ...

    def compose(self, reference_embeds: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


def pipeline_class_for_folder(folder: str | os.PathLike):
    """The pipeline class named by ``<folder>/model_index.json`` (``_class_name``), imported lazily.

    Example:

    ```py
    >>> pipeline_class_for_folder("compodiff-aesthetic-diffusers").__name__  # doctest: +SKIP
    'CompoDiffPipeline'

    ```
    """
    index_path = Path(folder) / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a pipeline folder: {index_path} is missing. Pass a folder saved with "
            "`save_pretrained` (CompoDiff or LinCIR); download Hub repos with huggingface_hub.snapshot_download first."
        )
    class_name = json.loads(index_path.read_text()).get("_class_name")
    if class_name not in PIPELINE_CLASSES:
        raise ValueError(f"{index_path} names {class_name!r}; the evaluation supports {list(PIPELINE_CLASSES)}.")
    import diffusers_cir

    pipeline_class = getattr(diffusers_cir, class_name, None)
    if pipeline_class is None:
        raise ImportError(f"{index_path} needs diffusers_cir.{class_name}, which this installation does not provide.")
    return pipeline_class


def _folder_fingerprint(folder: Path, class_name: str) -> str:
    # Config files by content, weights by name and size: cheap, and changes whenever a component is replaced.
    digest = hashlib.sha256(class_name.encode())
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode())
            if path.suffix in (".json", ".txt"):
                digest.update(path.read_bytes())
            else:
                digest.update(str(path.stat().st_size).encode())
    return f"{class_name}-{digest.hexdigest()[:16]}"


def load_image(ref: ImageRef):
    """An image of a benchmark read by :func:`diffusers_cir.load_image` (upright, 8-bit RGB), cropped to
    ``ref.crop_box`` (x, y, width, height) when set."""
    from ..retrieval.images import load_image as read_image

    if not Path(ref.path).is_file():
        raise FileNotFoundError(
            f"Image {ref.image_id!r} should be at {ref.path}; the benchmark annotation files do not include the "
            "images: download them from the benchmark's site into the official layout."
        )
    image = read_image(ref.path, name=f"image {ref.image_id!r}")
    if ref.crop_box is not None:
        x, y, width, height = ref.crop_box
        image = image.crop((x, y, x + width, y + height))
    return image


class PipelineEncoder:
    """A CompoDiff / LinCIR pipeline as a :class:`CIREncoder`.

    Args:
        pipeline: a loaded ``CompoDiffPipeline`` or ``LinCIRPipeline``.
        fingerprint: cache key of its image embeddings (from the folder in :meth:`from_pretrained`).
        image_batch_size: images per ``pipeline.encode_image`` call.
        num_workers: image-decoding worker processes.
        seed: seeds one generator per composed batch (CompoDiff samples; LinCIR is deterministic).
        call_kwargs: extra arguments of the pipeline call, e.g. ``{"num_inference_steps": 10,
            "negative_prompt": ""}`` for CompoDiff; arguments the pipeline does not accept raise a ``ValueError``.

    Example:

    ```py
    >>> encoder = PipelineEncoder.from_pretrained("compodiff-aesthetic-diffusers", device="cuda")  # doctest: +SKIP
    >>> encoder.compose(encoder.encode_images(refs), ["as a pencil sketch"] * len(refs))  # doctest: +SKIP

    ```
    """

    def __init__(
        self,
        pipeline: Any,
        fingerprint: str,
        image_batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        call_kwargs: dict | None = None,
    ):
        self.pipeline = pipeline
        self.fingerprint = fingerprint
        self.image_batch_size = image_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self._batches_composed = 0
        accepted = set(inspect.signature(pipeline.__call__).parameters)
        self.call_kwargs = dict(call_kwargs or {})
        unknown = sorted(set(self.call_kwargs) - accepted)
        if unknown:
            raise ValueError(f"{type(pipeline).__name__} does not accept {unknown}; its arguments are {sorted(accepted)}.")
        self._takes_generator = "generator" in accepted

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        device: str | torch.device | None = None,
        torch_dtype: torch.dtype | None = None,
        **kwargs,
    ) -> "PipelineEncoder":
        """Load the pipeline class named in ``model_index.json`` from a local folder."""
        folder = Path(folder)
        pipeline_class = pipeline_class_for_folder(folder)
        load_kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
        pipeline = pipeline_class.from_pretrained(folder, **load_kwargs)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        pipeline = pipeline.to(device)
        pipeline.set_progress_bar_config(disable=True)  # the runner shows its own progress
        return cls(pipeline, _folder_fingerprint(folder, pipeline_class.__name__), **kwargs)

    @torch.no_grad()
    def encode_images(self, images: Sequence[ImageRef]) -> torch.Tensor:
        loader = torch.utils.data.DataLoader(
            list(images), batch_size=self.image_batch_size, num_workers=self.num_workers,
            collate_fn=lambda refs: [load_image(ref) for ref in refs],
        )
        embeds = [self.pipeline.encode_image(batch, batch_size=self.image_batch_size).float().cpu() for batch in loader]
        return torch.cat(embeds) if embeds else torch.empty(0, 0)

    @torch.no_grad()
    def compose(self, reference_embeds: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        kwargs = dict(self.call_kwargs)
        if self._takes_generator:
            # One generator per batch, seeded by the batch number: reruns give the same queries.
            kwargs["generator"] = torch.Generator().manual_seed(self.seed + self._batches_composed)
        self._batches_composed += 1
        dtype = getattr(self.pipeline, "dtype", torch.float32)
        output = self.pipeline(
            image_embeds=reference_embeds.to(self.pipeline.device, dtype), prompt=list(prompts), output_type="pt", **kwargs
        )
        return output.image_embeds.float().cpu()


def _stable_seed(value: Any) -> int:
    return int.from_bytes(hashlib.sha256(f"{type(value).__name__}:{value}".encode()).digest()[:8], "little")


class IdHashEncoder:
    """A model-free stand-in: each image id and each prompt gets a fixed pseudo-random embedding.

    ``compose`` returns ``reference + text_weight * prompt_embedding``. Scores are meaningless; the point is a
    deterministic, pixel-free run of the whole evaluation flow (loading, caching, ranking, metrics, files).

    Example:

    ```py
    >>> encoder = IdHashEncoder(embedding_dim=8)
    >>> refs = [ImageRef("a", Path("a.png")), ImageRef(7, Path("7.jpg"))]
    >>> bool(torch.equal(encoder.encode_images(refs), encoder.encode_images(refs))), tuple(encoder.encode_images(refs).shape)
    (True, (2, 8))

    ```
    """

    def __init__(self, embedding_dim: int = 64, text_weight: float = 0.5):
        self.embedding_dim = embedding_dim
        self.text_weight = text_weight
        self.fingerprint = f"id-hash-{embedding_dim}"

    def _embed(self, value: Any) -> torch.Tensor:
        generator = torch.Generator().manual_seed(_stable_seed(value))
        return torch.randn(self.embedding_dim, generator=generator)

    def encode_images(self, images: Sequence[ImageRef]) -> torch.Tensor:
        if not images:
            return torch.empty(0, self.embedding_dim)
        return torch.stack([self._embed(ref.image_id) for ref in images])

    def compose(self, reference_embeds: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if reference_embeds.shape[0] != len(prompts):
            raise ValueError(f"{reference_embeds.shape[0]} references but {len(prompts)} prompts.")
        text = torch.stack([self._embed(f"prompt:{prompt}") for prompt in prompts])
        return reference_embeds.float() + self.text_weight * text
