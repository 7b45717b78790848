"""Gallery encoders: the gallery side of the pipeline contract, and loading one from a folder.

Whatever embeds a gallery meets the gallery side of the pipeline contract (:class:`GalleryEncoder`):
``encode_image(images, batch_size=64, device=None, show_progress=False) -> [N, D]`` (raw embeddings; retrieval
normalises), ``fingerprint`` (changes whenever the embeddings would) and ``embedding_dim``. Every CIR pipeline
does; :class:`CLIPVisionEncoder` is a bare CLIP vision tower (``index build --model`` on a
``CLIPVisionModelWithProjection`` folder) with the same contract, and its fingerprint is the one of a pipeline
holding the same tower, so an index built from the bare tower serves that pipeline's queries.

An encoder whose ``reads_pixels`` attribute is ``False`` (the model-free
:class:`~diffusers_cir.evaluation.IdHashEncoder`) is given the images' ids instead of their pixels.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = [
    "CLIPVisionEncoder",
    "GalleryEncoder",
    "check_pipeline_options",
    "legacy_fingerprint",
    "load_gallery_encoder",
    "load_pipeline",
    "query_fingerprint",
]


@runtime_checkable
class GalleryEncoder(Protocol):
    """The gallery side of the pipeline contract (what ``index build`` and ``evaluate`` embed galleries with)."""

    fingerprint: str
    embedding_dim: int

    def encode_image(self, images, batch_size: int = 64, device=None, show_progress: bool = False) -> torch.Tensor: ...


class CLIPVisionEncoder:
    """A bare CLIP vision tower (``CLIPVisionModelWithProjection`` + ``CLIPImageProcessor``) as a gallery encoder.

    ``encode_image`` returns the projected ``image_embeds`` (not normalised), as a CIR pipeline holding the same tower
    as its ``image_encoder`` does; ``fingerprint`` hashes the same components under the same names, so the two agree.

    Example:
        >>> from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection
        >>> config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
        ...                           num_attention_heads=2, image_size=32, patch_size=16, projection_dim=8)
        >>> processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        >>> encoder = CLIPVisionEncoder(CLIPVisionModelWithProjection(config), processor)
        >>> import numpy as np
        >>> encoder.encode_image([np.zeros((40, 40, 3), dtype=np.uint8)]).shape, encoder.embedding_dim
        (torch.Size([1, 8]), 8)
    """

    _gallery_components = ("image_encoder", "image_processor")

    def __init__(self, image_encoder, image_processor):
        self.image_encoder = image_encoder.eval()
        self.image_processor = image_processor

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, processor_folder: str | os.PathLike | None = None,
                        torch_dtype: torch.dtype | None = None, processor_class: str = "CLIPImageProcessor",
                        ) -> "CLIPVisionEncoder":
        """Load the tower from ``folder`` and its preprocessing from ``processor_folder`` (default: ``folder``) with
        the transformers class ``processor_class`` (a pipeline records it: transformers 5's ``CLIPImageProcessor``
        resizes with torchvision, ``CLIPImageProcessorPil`` with PIL, and their pixels differ)."""
        import transformers
        from transformers import CLIPVisionModelWithProjection

        kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
        encoder = CLIPVisionModelWithProjection.from_pretrained(folder, **kwargs)
        return cls(encoder, getattr(transformers, processor_class).from_pretrained(processor_folder or folder))

    @property
    def embedding_dim(self) -> int:
        return int(self.image_encoder.config.projection_dim)

    @property
    def fingerprint(self) -> str:
        from ..utils.fingerprint import gallery_fingerprint

        return gallery_fingerprint(self, self._gallery_components)

    @property
    def device(self) -> torch.device:
        return self.image_encoder.device

    def to(self, device) -> "CLIPVisionEncoder":
        self.image_encoder.to(device)
        return self

    @torch.no_grad()
    def encode_image(self, images, batch_size: int = 64, device=None, show_progress: bool = False) -> torch.Tensor:
        """``[N, D]`` projected image embeddings of anything :func:`~diffusers_cir.load_image` reads."""
        from tqdm.auto import tqdm

        from .images import is_image_source, load_image, pixel_values

        images = [images] if is_image_source(images) and not isinstance(images, (list, tuple)) else list(images)
        device = device or self.device
        starts = range(0, len(images), batch_size)
        embeds = []
        for start in tqdm(starts, desc="Encoding images", unit="batch", disable=not show_progress):
            batch = [load_image(item, name=f"images[{start + i}]") for i, item in enumerate(images[start : start + batch_size])]
            pixels = pixel_values(self.image_processor, batch)
            pixels = pixels.to(device=device, dtype=self.image_encoder.dtype)
            embeds.append(self.image_encoder(pixel_values=pixels).image_embeds)
        return torch.cat(embeds) if embeds else torch.empty(0, self.embedding_dim)


def _is_clip_vision_folder(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "CLIPVisionModelWithProjection" in (config.get("architectures") or [])


def _load_tower_of_pipeline(folder: Path, torch_dtype) -> CLIPVisionEncoder | None:
    """The CLIP tower of a pipeline folder whose gallery side is exactly ``image_encoder`` + ``image_processor``
    (CompoDiff, LinCIR), loaded alone: the text encoder and the denoiser stay on disk. ``None`` for other pipelines.

    Such a pipeline embeds galleries as its bare tower does (the contract tests check it for every registered class).
    """
    from ..pipelines.auto import pipeline_class_for_folder, read_model_index

    index = read_model_index(folder)
    pipeline_class = pipeline_class_for_folder(folder)
    if tuple(pipeline_class._gallery_components) != CLIPVisionEncoder._gallery_components:
        return None
    entry = index.get("image_encoder")
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[1] is None:
        raise ValueError(f"The pipeline in {folder} has no `image_encoder`: it cannot embed gallery images.")
    if entry[1] != "CLIPVisionModelWithProjection":
        return None
    processor = index.get("image_processor")
    processor_class = processor[1] if isinstance(processor, (list, tuple)) and len(processor) == 2 else None
    if processor_class not in ("CLIPImageProcessor", "CLIPImageProcessorPil"):
        return None  # another preprocessing: the whole pipeline embeds the gallery
    return CLIPVisionEncoder.from_pretrained(folder / "image_encoder", folder / "image_processor", torch_dtype,
                                             processor_class=processor_class)


def load_pipeline(model: str | os.PathLike, device=None, torch_dtype: torch.dtype | None = None):
    """A CIR pipeline through :class:`~diffusers_cir.AutoCIRPipeline` (a saved folder, a Hub id or a released
    layout), moved to ``device``, progress bars off (callers show their own)."""
    from ..pipelines.auto import AutoCIRPipeline

    kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    pipeline = AutoCIRPipeline.from_pretrained(model, **kwargs)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device) if device is not None else pipeline


def load_gallery_encoder(model: str | os.PathLike, device=None, torch_dtype: torch.dtype | None = None):
    """What ``index build --model`` embeds a gallery with: a CLIP vision folder as :class:`CLIPVisionEncoder`; a
    pipeline whose gallery side is its CLIP tower as that tower alone (same fingerprint, less memory); any other
    pipeline folder, Hub id or released layout through :func:`load_pipeline`."""
    folder = Path(model)
    encoder = None
    if folder.is_dir() and (folder / "model_index.json").is_file():
        encoder = _load_tower_of_pipeline(folder, torch_dtype)
    elif folder.is_dir() and _is_clip_vision_folder(folder):
        encoder = CLIPVisionEncoder.from_pretrained(folder, torch_dtype=torch_dtype)
    if encoder is None:
        try:
            encoder = load_pipeline(model, torch_dtype=torch_dtype)
        except ValueError as error:
            if "matches no released layout" not in str(error):
                raise
            raise ValueError(
                f"{error}\n  - a CLIP vision model folder: config.json of a CLIPVisionModelWithProjection and its "
                "preprocessor_config.json"
            ) from error
    return encoder.to(device) if device is not None else encoder


def check_pipeline_options(model: str | os.PathLike, options: dict[str, str]) -> None:
    """Refuse options the pipeline in ``model`` cannot take, before anything loads: ``options`` maps how the caller
    names each option given (a command-line flag) to the pipeline argument it becomes; the class is read from
    ``model_index.json``. A Hub id or a released layout is checked when its pipeline is called instead."""
    from ..pipelines.auto import pipeline_class_for_folder

    if not options or not (Path(model) / "model_index.json").is_file():
        return
    pipeline_class = pipeline_class_for_folder(model)
    refused = [name for name, argument in options.items() if argument not in pipeline_class.call_parameters()]
    if refused:
        raise ValueError(
            f"{', '.join(refused)}: {pipeline_class.__name__} ({model}) does not take "
            f"{'this option' if len(refused) == 1 else 'these options'}."
        )


# ------------------------------------------------------------------------------------------- older fingerprints


def legacy_fingerprint(encoder: Any) -> str | None:
    """The model fingerprint diffusers-cir 0.1.0.dev0 recorded before ``pipe.fingerprint``: 16 hex characters of a
    SHA-256 over the shape and float16 values of the image tower's ``visual_projection`` weight. ``None`` when the
    encoder has no such tower."""
    tower = getattr(encoder, "image_encoder", None)
    weight = getattr(getattr(tower, "visual_projection", None), "weight", None)
    if weight is None:
        return None
    values = weight.detach().to("cpu", torch.float16).contiguous().numpy()
    digest = hashlib.sha256(json.dumps(list(values.shape)).encode())
    digest.update(values.tobytes())
    return digest.hexdigest()[:16]


def query_fingerprint(encoder: Any, recorded: str | None) -> str | None:
    """The fingerprint of ``encoder`` to compare with one a gallery ``recorded``.

    Galleries embedded before ``pipe.fingerprint`` recorded a 16-character digest of the tower's output projection
    (:func:`legacy_fingerprint`); for them the same digest of ``encoder`` is returned, so they keep serving the
    model that made them, checked as they were when built.
    """
    if recorded is not None and len(recorded) == 16:
        legacy = legacy_fingerprint(encoder)
        if legacy is not None:
            return legacy
    return getattr(encoder, "fingerprint", None)
