# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""CLIP4Cir's "target pad" preprocessing: CLIP's preprocessing after padding elongated images towards a target ratio.

CLIP4Cir (ABaldrati/CLIP4Cir, ``src/data_utils.py``: ``TargetPad`` and ``targetpad_transform``; the default
``--transform targetpad --target-ratio 1.25`` of ``combiner_train.py``, ``clip_fine_tune.py``, ``validate.py`` and
``cirr_test_submission.py``) and CIReVL (ExplainableML/Vision_by_Language, the same ``src/data_utils.py`` code and
``--preprocess-type targetpad`` with ratio 1.25 in ``src/main.py``) prepare every image, queries and gallery alike:

1. ``ratio = max(w, h) / min(w, h)``; an image with ``ratio < target_ratio`` is left as it is (one exactly at the
   target ratio goes through step 2, which then pads nothing);
2. otherwise ``scaled = max(w, h) / target_ratio`` (a float) and each side of the short axis gets
   ``max(int((scaled - side) / 2), 0)`` zero pixels (``int`` truncates; the long axis gets none): left and right
   for a portrait image, top and bottom for a landscape one, black (fill 0) in RGB;
3. resize the shortest side to the model's input size (bicubic, PIL's resampling, as torchvision's ``Resize`` does
   on PIL images; the long side becomes ``int(size * long / short)``);
4. centre crop to ``size x size`` with torchvision's offset ``int(round((long - size) / 2))`` (Python's round, half
   to even: transformers' own crop rounds down, one pixel apart when ``long - size`` is 3 modulo 4);
5. ``/ 255`` and CLIP's per-channel normalisation.

``target_ratio=1.0`` pads every image to a square (CLIP4Cir's ``SquarePad``); ``target_ratio=None`` skips the padding
(plain CLIP preprocessing with torchvision's crop offset). Saved as ``preprocessor_config.json`` like any
transformers image processor, so a pipeline folder keeps it and its gallery fingerprint covers it.

The authors read images with ``PIL.Image.open`` and pad in the file's own mode before converting to RGB; here pixels
enter through :func:`diffusers_cir.load_image` (RGB, transparency composited), so only RGB images pad identically.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from transformers import CLIPImageProcessorPil

# diffusers finds how to load a component named in model_index.json by looking its loadable base classes up in the
# component's own module: this name must be an attribute of this module.
from transformers.image_processing_base import ImageProcessingMixin  # noqa: F401
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.processing_utils import ImagesKwargs

__all__ = ["IMAGE_PREPROCESSINGS", "TargetPadImageProcessor", "image_processor_for", "resizes_and_crops_like_clip",
           "target_pad_widths"]

IMAGE_PREPROCESSINGS = ("clip", "targetpad")
CLIP4CIR_TARGET_RATIO = 1.25  # the authors' default (CLIP4Cir's scripts and CIReVL's main.py)


class TargetPadImageProcessorKwargs(ImagesKwargs, total=False):
    target_ratio: float | None


def target_pad_widths(width: int, height: int, target_ratio: float | None) -> tuple[int, int]:
    """``(horizontal, vertical)``: zero pixels added on EACH side of the width and of the height (step 2)."""
    if target_ratio is None or max(width, height) / min(width, height) < target_ratio:
        return 0, 0
    scaled = max(width, height) / target_ratio
    return max(int((scaled - width) / 2), 0), max(int((scaled - height) / 2), 0)


def check_target_ratio(target_ratio, name: str = "target_ratio"):
    if target_ratio is None:
        return None
    if isinstance(target_ratio, bool) or not isinstance(target_ratio, (int, float)) or not np.isfinite(target_ratio) or (
            target_ratio < 1):
        raise ValueError(f"`{name}` must be a number >= 1 (the long / short side ratio padded towards; 1 pads to a "
                         f"square) or None (no padding), got {target_ratio!r}.")
    return float(target_ratio)


class TargetPadImageProcessor(CLIPImageProcessorPil):
    r"""
    CLIP preprocessing after CLIP4Cir's target pad (see the module docstring for the exact steps).

    Args:
        target_ratio (`float` or `None`, defaults to 1.25):
            Images whose long / short side ratio is at least this are zero-padded on the short side up to it; `1.0`
            pads to a square, `None` pads nothing.
        size, crop_size, resample, image_mean, image_std, ...:
            As [`~transformers.CLIPImageProcessor`] (defaults: OpenAI CLIP's 224 px, bicubic, CLIP's mean and std).

    Example:
        >>> import PIL.Image
        >>> from diffusers_cir import TargetPadImageProcessor
        >>> processor = TargetPadImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        >>> processor.target_pad(PIL.Image.new("RGB", (300, 100))).size  # padded to 300 x 240
        (300, 240)
        >>> processor(PIL.Image.new("RGB", (300, 100)), return_tensors="pt").pixel_values.shape
        torch.Size([1, 3, 32, 32])
    """

    valid_kwargs = TargetPadImageProcessorKwargs
    target_ratio = CLIP4CIR_TARGET_RATIO
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    # retrieval.images.pixel_values resizes PIL images before a shortest-edge PIL processor sees them; this one pads
    # first, so it must resize the padded image itself.
    pads_before_resize = True

    def __init__(self, target_ratio: float | None = CLIP4CIR_TARGET_RATIO, **kwargs):
        super().__init__(target_ratio=target_ratio, **kwargs)
        self.target_ratio = check_target_ratio(target_ratio)

    def _set_attributes(self, **kwargs):
        # `None` is a meaningful target ratio (no padding), which the base class would replace by the class default.
        target_ratio = kwargs.pop("target_ratio", self.target_ratio)
        super()._set_attributes(**kwargs)
        self.target_ratio = target_ratio

    def target_pad(self, image: Image.Image) -> Image.Image:
        """Step 2 on one PIL image (a new image; the same one when nothing is padded)."""
        horizontal, vertical = target_pad_widths(image.width, image.height, self.target_ratio)
        if not horizontal and not vertical:
            return image
        padded = Image.new(image.mode, (image.width + 2 * horizontal, image.height + 2 * vertical))
        padded.paste(image, (horizontal, vertical))
        return padded

    def _preprocess(self, images: list[np.ndarray], target_ratio: float | None = None, **kwargs):
        # The images arrive channels-first; pad them before the base class's resize, crop and normalisation.
        ratio = check_target_ratio(target_ratio) if target_ratio is not None else self.target_ratio
        padded = []
        for image in images:
            height, width = image.shape[-2:]
            horizontal, vertical = target_pad_widths(width, height, ratio)
            padded.append(np.pad(image, ((0, 0), (vertical, vertical), (horizontal, horizontal))))
        return super()._preprocess(padded, **kwargs)

    def center_crop(self, image: np.ndarray, size, **kwargs) -> np.ndarray:
        """torchvision's ``CenterCrop`` offsets (rounded half to even) on a channels-first image at least as large."""
        height, width = image.shape[-2:]
        if size.height > height or size.width > width:
            return super().center_crop(image, size, **kwargs)
        top, left = int(round((height - size.height) / 2.0)), int(round((width - size.width) / 2.0))
        return image[..., top : top + size.height, left : left + size.width]


def image_processor_for(image_processor, preprocessing: str, target_ratio: float | None = None):
    """``image_processor`` (a tower's CLIP-style processor) made to do ``preprocessing``: ``"targetpad"`` (a
    :class:`TargetPadImageProcessor` with its size, crop, resampling, mean and std, padding towards ``target_ratio``:
    the processor's own ratio when it already pads, else 1.25) or ``"clip"`` (the processor itself; a target-pad one
    becomes a plain ``CLIPImageProcessorPil`` with the same settings)."""
    if preprocessing not in IMAGE_PREPROCESSINGS:
        raise ValueError(f"`preprocessing` must be one of {IMAGE_PREPROCESSINGS}, got {preprocessing!r}.")
    padding = isinstance(image_processor, TargetPadImageProcessor)
    if preprocessing == "clip":
        return CLIPImageProcessorPil(**_clip_settings(image_processor)) if padding else image_processor
    if target_ratio is None:
        target_ratio = image_processor.target_ratio if padding else CLIP4CIR_TARGET_RATIO
    return TargetPadImageProcessor(target_ratio=check_target_ratio(target_ratio), **_clip_settings(image_processor))


def resizes_and_crops_like_clip(image_processor) -> bool:
    """Whether ``image_processor`` resizes the shortest side and centre-crops (what target padding goes before)."""
    size = dict(getattr(image_processor, "size", None) or {})
    return bool(size.get("shortest_edge")) and not size.get("longest_edge") and bool(
        getattr(image_processor, "do_center_crop", False))


def _clip_settings(image_processor) -> dict:
    size = dict(getattr(image_processor, "size", None) or {})
    crop = dict(getattr(image_processor, "crop_size", None) or {})
    if not resizes_and_crops_like_clip(image_processor):
        raise ValueError(
            f"Target padding goes before CLIP's shortest-side resize and centre crop, but the image processor "
            f"({type(image_processor).__name__}, size={size}, do_center_crop="
            f"{getattr(image_processor, 'do_center_crop', None)}) does not resize and crop that way: use 'clip' "
            "preprocessing with these encoders."
        )
    names = ("resample", "image_mean", "image_std", "do_rescale", "rescale_factor", "do_normalize", "do_convert_rgb")
    settings = {name: getattr(image_processor, name) for name in names if getattr(image_processor, name, None) is not None}
    return {"size": {"shortest_edge": int(size["shortest_edge"])}, "crop_size": crop, "do_resize": True,
            "do_center_crop": True, **settings}
