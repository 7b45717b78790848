"""Image encoders for galleries: one interface over a CIR pipeline, a bare CLIP vision model, or a callable.

Queries and gallery must live in one embedding space, so a gallery is embedded with the image encoder of the
pipeline that will compose the queries (``pipe.encode_image``: projected CLIP image embeddings, not normalised).
``image_encoder_fingerprint`` identifies that encoder by its weights, so an index can refuse queries from a
different model even when the model folder was moved or renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


def _vision_model_of(encoder: Any):
    """The ``CLIPVisionModelWithProjection`` inside a pipeline, or the model itself."""
    return getattr(encoder, "image_encoder", None) or encoder


def image_encoder_fingerprint(encoder: Any) -> str | None:
    """A short hash identifying an image encoder by its weights (``None`` if it has no recognisable weights).

    It hashes the output projection (``visual_projection.weight``, rounded to float16 so that float32 and float16
    loads of the same checkpoint agree) together with its shape: two different CLIP checkpoints never share it.
    For other ``torch.nn.Module`` encoders it hashes the last parameter tensor instead.

    Example:
        >>> from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
        >>> config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                           num_attention_heads=2, image_size=32, patch_size=16, projection_dim=16)
        >>> _ = torch.manual_seed(0)
        >>> len(image_encoder_fingerprint(CLIPVisionModelWithProjection(config)))
        16
    """
    model = _vision_model_of(encoder)
    projection = getattr(model, "visual_projection", None)
    weight = getattr(projection, "weight", None)
    if weight is None and isinstance(model, torch.nn.Module):
        parameters = list(model.parameters())
        weight = parameters[-1] if parameters else None
    if weight is None:
        return None
    values = weight.detach().to("cpu", torch.float16).contiguous().numpy()
    digest = hashlib.sha256(json.dumps(list(values.shape)).encode())
    digest.update(values.tobytes())
    return digest.hexdigest()[:16]


class ClipVisionEmbedder:
    """Embed PIL images with a ``CLIPVisionModelWithProjection`` and its ``CLIPImageProcessor``.

    Returns the projected ``image_embeds`` (not normalised), exactly like ``CompoDiffPipeline.encode_image``.
    """

    def __init__(self, model, image_processor, device: str | torch.device | None = None):
        if image_processor is None:
            raise ValueError(
                "A bare CLIP vision model needs its `image_processor` (a transformers CLIPImageProcessor)."
            )
        self.model = model.eval()
        self.image_processor = image_processor
        if device is not None:
            self.model.to(device)

    @torch.no_grad()
    def __call__(self, images: list) -> torch.Tensor:
        parameter = next(self.model.parameters())
        pixel_values = self.image_processor(images=images, return_tensors="pt").pixel_values
        pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
        return self.model(pixel_values=pixel_values).image_embeds


class PipelineEmbedder:
    """Embed PIL images with a CIR pipeline's ``encode_image`` (CompoDiff, LinCIR)."""

    def __init__(self, pipeline, device: str | torch.device | None = None):
        self.pipeline = pipeline
        if device is not None:
            pipeline.to(device)

    @torch.no_grad()
    def __call__(self, images: list) -> torch.Tensor:
        return self.pipeline.encode_image(images, batch_size=len(images))


def as_image_embedder(encoder: Any, image_processor=None, device: str | torch.device | None = None) -> Callable:
    """Wrap ``encoder`` as ``embed(list_of_PIL_images) -> [B, D]`` (a tensor or array).

    ``encoder`` may be a pipeline with ``encode_image``, a ``CLIPVisionModelWithProjection`` (with
    ``image_processor``), or any callable with that signature (returned unchanged).

    Example:
        >>> embed = as_image_embedder(lambda images: np.ones((len(images), 4)))
        >>> embed([None, None]).shape
        (2, 4)
    """
    if hasattr(encoder, "encode_image"):
        return PipelineEmbedder(encoder, device=device)
    if isinstance(encoder, torch.nn.Module) and hasattr(encoder, "visual_projection"):
        return ClipVisionEmbedder(encoder, image_processor, device=device)
    if callable(encoder):
        return encoder
    raise TypeError(
        "`encoder` must be a pipeline with `encode_image`, a CLIPVisionModelWithProjection (with `image_processor`),"
        f" or a callable mapping a list of PIL images to [B, D] embeddings; got {type(encoder).__name__}."
    )


def load_image_encoder(model: str | os.PathLike, device: str | torch.device = "cpu", torch_dtype=None):
    """Load the gallery image encoder of ``model``: ``(CLIPVisionModelWithProjection, CLIPImageProcessor)``.

    ``model`` is a CIR pipeline folder (``model_index.json``, whose ``image_encoder`` / ``image_processor``
    sub-folders are loaded, so the text encoder and denoiser stay on disk) or a CLIP vision model folder.
    """
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    folder = Path(model)
    if (folder / "model_index.json").exists():
        index = json.loads((folder / "model_index.json").read_text())
        if not index.get("image_encoder") or index["image_encoder"][0] is None:
            raise ValueError(f"The pipeline in {folder} has no `image_encoder`: it cannot embed gallery images.")
        encoder_folder, processor_folder = folder / "image_encoder", folder / "image_processor"
    elif (folder / "config.json").exists():
        encoder_folder = processor_folder = folder
    else:
        raise ValueError(
            f"`model` {str(model)!r} is neither a pipeline folder (model_index.json) nor a CLIP vision model folder "
            "(config.json). Download a Hub model first (huggingface_hub.snapshot_download) and pass its folder."
        )
    encoder = CLIPVisionModelWithProjection.from_pretrained(encoder_folder, torch_dtype=torch_dtype).to(device)
    processor = CLIPImageProcessor.from_pretrained(processor_folder)
    return encoder.eval(), processor


def load_cir_pipeline(model: str | os.PathLike, device: str | torch.device = "cpu", torch_dtype=None):
    """Load a CIR pipeline folder with the class named in its ``model_index.json`` (CompoDiff or LinCIR)."""
    import diffusers_cir

    folder = Path(model)
    index_path = folder / "model_index.json"
    if not index_path.exists():
        raise ValueError(f"`model` {str(model)!r} is not a pipeline folder: it has no model_index.json.")
    class_name = json.loads(index_path.read_text()).get("_class_name")
    pipeline_class = getattr(diffusers_cir, str(class_name), None)
    if pipeline_class is None or not hasattr(pipeline_class, "from_pretrained"):
        raise ValueError(
            f"{index_path} names pipeline class {class_name!r}, which diffusers_cir does not provide "
            "(expected CompoDiffPipeline or LinCIRPipeline)."
        )
    kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    return pipeline_class.from_pretrained(folder, **kwargs).to(device)


def embeddings_to_numpy(embeddings: Any) -> np.ndarray:
    if hasattr(embeddings, "detach"):
        embeddings = embeddings.detach().float().cpu().numpy()
    return np.asarray(embeddings, dtype=np.float32)
