"""Helpers shared by the pipelines."""

from __future__ import annotations

import os


def is_loadable_image(item) -> bool:
    """A PIL image, a file path or URL, encoded bytes or a `datasets` image dict: what `load_image` reads (tensors and
    arrays are pixel values, prepared by the pipeline itself)."""
    import PIL.Image

    return isinstance(item, (PIL.Image.Image, str, os.PathLike, bytes, dict))


def loadable_image_list(images, name: str) -> list | tuple:
    """`images` (one loadable image, or a non-empty list/tuple of them) as a list or tuple; anything else is refused
    with a message that also names the pixel tensor the caller takes instead."""
    items = [images] if is_loadable_image(images) else images
    if not isinstance(items, (list, tuple)) or not items or not all(is_loadable_image(item) for item in items):
        kinds = sorted({type(item).__name__ for item in items}) if isinstance(items, (list, tuple)) else []
        raise ValueError(
            f"`{name}` must be a PIL image, an image file path or URL, encoded bytes, a datasets image dict, a "
            f"non-empty list of them, or a pixel tensor (N, 3, H, W); got {type(images).__name__}"
            f"{f' holding {kinds}' if kinds else ''}."
        )
    return items


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


def load_images(items: list, name: str, offset: int = 0) -> list:
    """8-bit RGB PIL images of ``items`` (EXIF orientation applied, wide images and arrays by value range); `offset`
    is the index of `items[0]` in the caller's list, for the messages."""
    from ..retrieval.images import load_image

    return [load_image(item, "RGB", name=f"{name}[{offset + index}]") for index, item in enumerate(items)]


def projected_image_embeds(image_encoder, pixel_values):
    """A CLIP vision tower's projected embeddings (`CLIPVisionModelWithProjection.image_embeds`)."""
    return image_encoder(pixel_values=pixel_values).image_embeds


def encode_pixel_batches(
    image_encoder, image_processor, batches, batch_size: int, device, name: str = "images", features=None
):
    """The image tower's embeddings of every batch, concatenated: the one road from gallery images to a tower.

    A batch is a pixel tensor ``(n, 3, H, W)``, used as it is, or a list of images, read with :func:`load_images` and
    made pixel values by :func:`diffusers_cir.retrieval.images.pixel_values` only when its turn comes (a gallery is
    never all in memory). Every batch but the last holds `batch_size` items, so a message names an image by its index
    in the caller's list `name`. `features(image_encoder, pixel_values)` reads the embeddings (default
    :func:`projected_image_embeds`); the pixels go to `device` in the tower's dtype. Pass `batches` wrapped in a
    progress bar to show one.
    """
    import torch

    from ..retrieval.images import pixel_values

    features = features or projected_image_embeds
    embeds = []
    for index, batch in enumerate(batches):
        if not torch.is_tensor(batch):
            batch = pixel_values(image_processor, load_images(batch, name, offset=index * batch_size))
        embeds.append(features(image_encoder, batch.to(device=device, dtype=image_encoder.dtype)))
    return torch.cat(embeds)
