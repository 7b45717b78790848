# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""MagicLens image preprocessing, exactly as the authors' code does it.

google-deepmind/magiclens prepares every image (queries and index alike) with ``data_utils.process_img`` and then
the model prepares it again before the CLIP vision tower (``model.py``):

1. the decoded RGB pixels (here: from :func:`diffusers_cir.load_image`, which also applies EXIF orientation) as
   float32, divided by the image's own maximum over all pixels and channels plus 1e-12 (not by 255: an image whose
   brightest value is 180 is stretched so that it reaches 1);
2. resized straight to ``squash_size`` x ``squash_size`` (224) with antialiased bilinear resampling: no crop, the
   aspect ratio is not kept (``jax.image.resize(..., "bilinear")``, whose triangle kernel widens when downsampling;
   ``torch.nn.functional.interpolate(..., antialias=True)`` computes the same weights);
3. the largest centred square crop (offset ``(long - short) // 2``), the same resize to ``image_size`` (the vision
   tower's resolution), and CLIP's per-channel normalisation. For the released models ``image_size`` is 224, so
   step 3 is only the normalisation.

Pixel values come out channels-first, ``[B, 3, image_size, image_size]``, as transformers' CLIP vision tower takes
them. Saved and loaded as ``preprocessor_config.json`` (transformers' :class:`ImageProcessingMixin`), so a pipeline
folder records its preprocessing and the gallery fingerprint covers it.
"""

from __future__ import annotations

from typing import TypedDict

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from transformers.image_processing_base import BatchFeature, ImageProcessingMixin

# The two constants scenic's CLIP model normalises with (OpenAI CLIP's).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class MagicLensImageProcessorKwargs(TypedDict, total=False):
    do_divide_by_max: bool
    squash_size: int | None
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]


def resize_bilinear_antialiased(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize ``[B, C, H, W]`` float pixels like ``jax.image.resize(method="bilinear")`` (antialiased): an axis whose
    length already matches is left untouched."""
    if tuple(pixels.shape[-2:]) == (height, width):
        return pixels
    return F.interpolate(pixels, size=(height, width), mode="bilinear", antialias=True, align_corners=False)


def center_crop_square(pixels: torch.Tensor) -> torch.Tensor:
    """The largest centred square of ``[..., H, W]`` pixels; the offset along the longer axis is rounded down."""
    height, width = pixels.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return pixels[..., top : top + side, left : left + side]


class MagicLensImageProcessor(ImageProcessingMixin):
    r"""
    Images -> MagicLens pixel values (see the module docstring for the exact steps).

    Args:
        do_divide_by_max (`bool`, defaults to `True`):
            Scale each image by its own maximum (the authors' ``process_img``); `False` scales by 1/255.
        squash_size (`int`, *optional*, defaults to 224):
            The square size every image is first resized to, ignoring its aspect ratio; `None` skips that step (then
            the crop of step 3 does the work, as when an image goes straight into the authors' model).
        image_size (`int`, defaults to 224):
            The vision tower's input resolution.
        image_mean, image_std (`tuple` of 3 `float`):
            Per-channel normalisation (CLIP's by default).

    Example:
        >>> import PIL.Image
        >>> from diffusers_cir.pipelines.image_processing_magiclens import MagicLensImageProcessor
        >>> processor = MagicLensImageProcessor(image_size=32)
        >>> processor(PIL.Image.new("RGB", (300, 200), (90, 40, 10))).pixel_values.shape
        torch.Size([1, 3, 32, 32])
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = MagicLensImageProcessorKwargs

    def __init__(
        self,
        do_divide_by_max: bool = True,
        squash_size: int | None = 224,
        image_size: int = 224,
        image_mean: tuple[float, float, float] = CLIP_MEAN,
        image_std: tuple[float, float, float] = CLIP_STD,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for name, value in (("squash_size", squash_size), ("image_size", image_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        for name, value in (("image_mean", image_mean), ("image_std", image_std)):
            if len(value) != 3:
                raise ValueError(f"`{name}` must hold one value per RGB channel, got {value!r}.")
        if min(image_std) <= 0:
            raise ValueError(f"`image_std` must be positive, got {image_std!r}.")
        self.do_divide_by_max = bool(do_divide_by_max)
        self.squash_size = squash_size
        self.image_size = image_size
        self.image_mean = [float(value) for value in image_mean]
        self.image_std = [float(value) for value in image_std]

    def to_unit_range(self, image) -> torch.Tensor:
        """One RGB image (PIL, or an ``[H, W, 3]`` array of 8-bit values) as float32 ``[3, H, W]`` in [0, 1] (step 1)."""
        if isinstance(image, PIL.Image.Image):
            if image.mode != "RGB":
                raise ValueError(f"Images must be RGB (read them with diffusers_cir.load_image), got mode {image.mode!r}.")
            array = np.asarray(image, dtype=np.float32)
        else:
            array = np.asarray(image, dtype=np.float32)
            if array.ndim != 3 or array.shape[-1] != 3:
                raise ValueError(f"An image array must be [H, W, 3] RGB values, got shape {array.shape}.")
        pixels = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
        if self.do_divide_by_max:
            return pixels / (pixels.max() + 1e-12)
        return pixels / 255.0

    def squash(self, image) -> torch.Tensor:
        """Steps 1-2, the authors' ``process_img``: float32 ``[3, squash_size, squash_size]``."""
        pixels = self.to_unit_range(image)
        if self.squash_size is None:
            return pixels
        return resize_bilinear_antialiased(pixels[None], self.squash_size, self.squash_size)[0]

    def model_inputs(self, pixels: torch.Tensor) -> torch.Tensor:
        """Step 3 on ``[B, 3, H, W]`` values in [0, 1]: centred square crop, resize to ``image_size``, normalisation."""
        pixels = center_crop_square(pixels)
        pixels = resize_bilinear_antialiased(pixels, self.image_size, self.image_size)
        mean = torch.tensor(self.image_mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def preprocess(self, images, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        """RGB images (one or a list of PIL images or ``[H, W, 3]`` arrays) -> ``pixel_values`` ``[B, 3, R, R]``."""
        if kwargs:
            raise TypeError(f"MagicLensImageProcessor takes no options per call, got {sorted(kwargs)}.")
        if return_tensors not in ("pt", None):
            raise ValueError(f"`return_tensors` must be 'pt' (or None), got {return_tensors!r}.")
        if isinstance(images, (PIL.Image.Image, np.ndarray)):
            images = [images]
        pixels = [self.model_inputs(self.squash(image)[None]) for image in images]
        if not pixels:
            raise ValueError("`images` is empty.")
        return BatchFeature(data={"pixel_values": torch.cat(pixels)}, tensor_type="pt")

    def __call__(self, images, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        return self.preprocess(images, return_tensors=return_tensors, **kwargs)
