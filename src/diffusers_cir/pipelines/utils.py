"""Helpers shared by the pipelines."""

from __future__ import annotations

import os


def is_loadable_image(item) -> bool:
    """A PIL image, a file path or URL, encoded bytes or a `datasets` image dict: what `load_image` reads (tensors and
    arrays are pixel values, prepared by the pipeline itself)."""
    import PIL.Image

    return isinstance(item, (PIL.Image.Image, str, os.PathLike, bytes, dict))


def is_image_path(item) -> bool:
    """A file path or an http(s) URL (`str` / `os.PathLike`) standing for an image."""
    return isinstance(item, (str, os.PathLike))


def _path_text(item) -> str:
    path = os.fspath(item)
    return os.fsdecode(path) if isinstance(path, bytes) else path


def check_image_paths(images, name: str, offset: int = 0) -> None:
    """Refuse a path to no file before any image is read (a gallery fails at once, not after hours of encoding).

    `images` is one item or a list/tuple of items; `offset` is the index of `images[0]` in the caller's list.
    """
    items = images if isinstance(images, (list, tuple)) else [images]
    for index, item in enumerate(items):
        if is_image_path(item):
            path = _path_text(item)
            if not path.startswith(("http://", "https://")) and not os.path.isfile(path):
                where = f"[{offset + index}]" if isinstance(images, (list, tuple)) else ""
                raise ValueError(f"`{name}`{where} is the path {path!r}, but there is no file there.")


def load_image_paths(images, name: str, offset: int = 0):
    """`images` with every PIL image, path (or http(s) URL), encoded bytes or image dict replaced by the 8-bit PIL
    image :func:`diffusers_cir.load_image` makes of it (EXIF orientation applied, wide and transparent images
    converted by value range; masks (`name == "mask_image"`) in mode L); tensors and arrays unchanged.

    `images` is one item or a list/tuple of items; `offset` is the index of `images[0]` in the caller's list, for the
    messages.
    """
    from ..retrieval.images import load_image

    check_image_paths(images, name, offset)
    mode = "L" if name == "mask_image" else "RGB"

    def load(item, where: str):
        if not is_loadable_image(item):
            return item
        return load_image(item, mode, name=f"{name}{where}")

    if isinstance(images, (list, tuple)):
        return [load(item, f"[{offset + index}]") for index, item in enumerate(images)]
    return load(images, "")
