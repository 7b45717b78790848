# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""The one door through which pixels enter the package: :func:`load_image`.

Pipelines, ``index build``, ``search``, evaluation, dataset streaming and training all read images here, so a phone
photo used as a query embeds exactly like the same file in the gallery. What it does, in order:

1. Opens the source: a PIL image, a file path, an http(s) URL, encoded bytes, a ``datasets`` image dict
   (``{"bytes": ..., "path": ...}``) or a numpy array.
2. Applies the EXIF orientation tag (``PIL.ImageOps.exif_transpose``): a JPEG stored sideways with orientation 6 gives
   the same pixels as its upright twin.
3. Converts to 8-bit by value range, never by clipping:

   * 16-bit integer images (``I;16`` modes, 16-bit PNG/TIFF): ``round(v / 257)``, the 8-bit rendering of 16-bit data;
   * 32-bit integer images (mode ``I``): values already within ``[0, 255]`` are kept; within ``[0, 65535]`` they are
     16-bit data (older Pillow opens 16-bit PNGs this way) and divided by 257; otherwise the image's own
     ``[min, max]`` is stretched to ``[0, 255]``;
   * 32-bit float images (mode ``F``) and float arrays: ``[0, 1]`` data is multiplied by 255, ``[0, 255]`` data is
     kept, anything else is stretched from its ``[min, max]``; NaN or infinite values are refused;
   * palette, CMYK, YCbCr, LAB, HSV and 1-bit images go through Pillow's own conversion.

4. Composites transparency (``RGBA``, ``LA``, ``PA``, a palette with a transparent colour) over a background:
   **white** for images (``mode="RGB"``, how product photos with a cut-out background are shown), **black** for masks
   (``mode="L"``: a transparent pixel is not part of the mask).

Errors are ``ValueError`` naming the argument and the source; a missing file is a ``FileNotFoundError``.

Example:
    >>> import numpy as np
    >>> from diffusers_cir import load_image
    >>> wide = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)  # 16-bit data
    >>> image = load_image(wide)
    >>> image.mode, image.size, np.asarray(image)[2, 3].tolist()
    ('RGB', (4, 3), [214, 214, 214])
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageSource", "is_image_source", "load_image"]

ImageSource = Any  # PIL.Image.Image | str | os.PathLike | bytes | dict | np.ndarray

_URL_PREFIXES = ("http://", "https://")
_URL_TIMEOUT_SECONDS = 30
_BACKGROUNDS = {"RGB": (255, 255, 255), "L": 0}


def is_image_source(item: Any) -> bool:
    """Whether ``item`` is something :func:`load_image` reads (as opposed to a tensor of pixel values)."""
    return isinstance(item, (Image.Image, str, os.PathLike, bytes, bytearray, memoryview, np.ndarray)) or (
        isinstance(item, dict) and ("bytes" in item or "path" in item)
    )


def load_image(source: ImageSource, mode: str = "RGB", *, name: str = "image") -> Image.Image:
    """Read ``source`` as an 8-bit ``RGB`` image (or ``L`` for masks), upright (see the module docstring).

    Args:
        source: a PIL image, a file path (``str`` / ``os.PathLike``), an http(s) URL, encoded bytes, a ``datasets``
            image dict (``{"bytes": ..., "path": ...}``) or a numpy array (``[H, W]``, ``[H, W, 1|3|4]``).
        mode: ``"RGB"`` (images) or ``"L"`` (masks).
        name: the argument name used in error messages (``"image"``, ``"mask_image"``, ``"images[3]"``).
    """
    if mode not in _BACKGROUNDS:
        raise ValueError(f"`mode` must be 'RGB' or 'L', got {mode!r}.")
    image = _open(source, name)
    try:
        image = ImageOps.exif_transpose(image)
        if image.width == 0 or image.height == 0:
            raise ValueError(f"`{name}` is an empty image ({image.width}x{image.height} pixels).")
        return _to_8bit(image, mode, name)
    except (OSError, SyntaxError) as error:  # truncated or corrupt data is only found when the pixels are read
        raise ValueError(f"`{name}`: {_describe_source(source)} could not be read as an image ({error}).") from error


def _describe_source(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fsdecode(source))
    if isinstance(source, dict) and source.get("path"):
        return repr(source["path"])
    return f"the {type(source).__name__}"


def _open(source: Any, name: str) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return _from_array(source, name)
    if isinstance(source, dict):
        data, path = source.get("bytes"), source.get("path")
        if data is None and not path:
            raise ValueError(f"`{name}` is an image dict with neither 'bytes' nor 'path'.")
        source = data if data is not None else path
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            return Image.open(io.BytesIO(bytes(source)))
        if isinstance(source, (str, os.PathLike)):
            text = os.fsdecode(source)
            if text.startswith(_URL_PREFIXES):
                return Image.open(io.BytesIO(_download(text)))
            if not Path(text).is_file():
                raise FileNotFoundError(f"`{name}` is the path {text!r}, but there is no file there.")
            return Image.open(text)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise ValueError(f"`{name}`: {_describe_source(source)} could not be read as an image ({error}).") from error
    raise ValueError(
        f"`{name}` must be a PIL image, an image file path or URL, encoded bytes, an image dict or a numpy array, "
        f"got {type(source).__name__}."
    )


def _download(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=_URL_TIMEOUT_SECONDS) as response:  # noqa: S310 - http(s) only
        return response.read()


def _from_array(array: np.ndarray, name: str) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"`{name}` as an array must be [H, W] or [H, W, 1|3|4], got shape {tuple(array.shape)}.")
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        array = _scale_to_8bit(array, name)
    return Image.fromarray(np.ascontiguousarray(array))


def _scale_to_8bit(values: np.ndarray, name: str) -> np.ndarray:
    """8-bit values from wider data by its value range (see the module docstring)."""
    if values.dtype.kind == "f":
        values = values.astype(np.float64)
        if not np.isfinite(values).all():
            raise ValueError(f"`{name}` holds NaN or infinite pixel values.")
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if low >= 0 and high <= 1:
            scaled = values * 255
        elif low >= 0 and high <= 255:
            scaled = values
        else:
            scaled = (values - low) * (255 / (high - low)) if high > low else np.zeros_like(values)
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    if values.dtype.kind not in "iu":
        raise ValueError(f"`{name}` has pixel values of dtype {values.dtype}; expected integers, floats or bools.")
    wide = values.astype(np.int64)
    low, high = (int(wide.min()), int(wide.max())) if wide.size else (0, 0)
    if values.dtype == np.uint16 or (low >= 0 and high <= 65535 and high > 255):
        scaled = np.rint(wide / 257.0)
    elif low >= 0 and high <= 255:
        scaled = wide
    else:
        scaled = np.rint((wide - low) * (255 / (high - low))) if high > low else np.zeros_like(wide)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _to_8bit(image: Image.Image, mode: str, name: str) -> Image.Image:
    if image.mode.startswith("I;16"):
        image = Image.fromarray(_scale_to_8bit(np.asarray(image).astype(np.uint16), name))
    elif image.mode in ("I", "F"):
        image = Image.fromarray(_scale_to_8bit(np.asarray(image), name))
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        image = _composite(image, mode)
    elif image.mode == "L" and "transparency" in image.info:
        image = _composite(image.convert("LA"), mode)
    elif image.mode == "RGB" and "transparency" in image.info:
        image = _composite(image.convert("RGBA"), mode)
    return image.convert(mode) if image.mode != mode else image.copy()


def _composite(image: Image.Image, mode: str) -> Image.Image:
    """Alpha-composite over the background of ``mode`` (white for images, black for masks)."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _BACKGROUNDS["RGB"] if mode == "RGB" else (0, 0, 0))
    return Image.alpha_composite(background, rgba).convert("RGB")


def resize(image: Image.Image, size: tuple[int, int], resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    """``image.resize(size, resample)`` with the pass order of Pillow 13 on every Pillow version.

    Pillow resizes in two separable 8-bit passes, and the order changes the rounding: Pillow 13 runs the vertical pass
    first when the height shrinks more than twice as much as the width, Pillow 12 and older always run the horizontal
    one first (one level apart on some pixels). Reference outputs of the authors' code were computed with Pillow 13;
    on older Pillow the same order is obtained by resizing the transposed image.
    """
    width, height = size
    vertical_first = 0 < image.height - height and image.height - height > (image.width - width) * 2
    if not vertical_first or int(Image.__version__.split(".")[0]) >= 13:
        return image.resize(size, resample)
    transpose = Image.Transpose.TRANSPOSE
    return image.transpose(transpose).resize((height, width), resample).transpose(transpose)


def pixel_values(image_processor, images: list):
    """``image_processor(images=images, return_tensors="pt").pixel_values``, with a PIL-backend processor's resize done
    by :func:`resize` (so that it is Pillow 13's whatever Pillow is installed; the processor then finds each image at
    its target size and leaves it)."""
    if _resizes_with_pil(image_processor):
        images = [_resize_for(image_processor, image) if isinstance(image, Image.Image) else image for image in images]
    return image_processor(images=images, return_tensors="pt").pixel_values


def _resizes_with_pil(image_processor) -> bool:
    size = getattr(image_processor, "size", None)
    shortest_edge = size.get("shortest_edge") if hasattr(size, "get") else getattr(size, "shortest_edge", None)
    backends = {cls.__name__ for cls in type(image_processor).__mro__}
    if getattr(image_processor, "pads_before_resize", False):  # TargetPadImageProcessor: pad, then resize
        return False
    return "PilBackend" in backends and bool(getattr(image_processor, "do_resize", False)) and bool(shortest_edge) and (
        not (size.get("longest_edge") if hasattr(size, "get") else getattr(size, "longest_edge", None))
    )


def _resize_for(image_processor, image: Image.Image) -> Image.Image:
    """``image`` at the size a shortest-edge PIL processor resizes it to (transformers' own size rule)."""
    from transformers.image_transforms import get_resize_output_image_size

    size = image_processor.size
    shortest_edge = size.get("shortest_edge") if hasattr(size, "get") else size.shortest_edge
    array = np.asarray(image)
    height, width = get_resize_output_image_size(
        array if array.ndim == 3 else array[..., None], size=int(shortest_edge), default_to_square=False,
        input_data_format="channels_last",
    )
    resample = image_processor.resample if image_processor.resample is not None else Image.Resampling.BILINEAR
    return resize(image, (width, height), int(resample))
