# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Query arguments of the pipelines that compose from the reference's pixels (MLLM embedders, caption rewriting).

They take images in every form :func:`diffusers_cir.load_image` reads, modification texts as strings or FashionIQ
caption pairs, and broadcast a single image or text against a list of the other.
"""

from __future__ import annotations

from ..checks import describe
from .utils import check_image_paths, load_images

__all__ = ["as_image_list", "check_queries", "join_caption_pair", "load_distinct_images", "load_images", "split_pairs"]

# FashionIQ captions end in stray punctuation ("is darker.", "has a logo?"): the published methods strip these
# characters from both ends of each caption before joining the pair.
FASHIONIQ_STRIP = ".?, "


def as_image_list(images, name: str) -> list:
    """``images`` (one source or a list/tuple of them) as a non-empty list, every item something ``load_image``
    reads; a path to no file is refused here, before any model runs."""
    from ..retrieval.images import is_image_source

    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ValueError(f"`{name}` is empty: pass at least one image.")
    for index, item in enumerate(items):
        if not is_image_source(item):
            where = f"[{index}]" if isinstance(images, (list, tuple)) else ""
            hint = (
                " Pixel tensors are not accepted: these models tile and resize images themselves, so pass the images."
                if type(item).__name__ == "Tensor"
                else ""
            )
            raise ValueError(
                f"`{name}`{where} must be a PIL image, an image path or URL, encoded bytes, a datasets image dict or "
                f"an array, got {_describe(item)}.{hint}"
            )
    check_image_paths(items, name)
    return items


def _describe(item) -> str:
    shape = getattr(item, "shape", None)
    return f"a {type(item).__name__} of shape {tuple(shape)}" if shape is not None else describe(item)


def load_distinct_images(items: list, name: str) -> list:
    """:func:`load_images` reading each distinct object once (a broadcast reference is decoded once)."""
    loaded: dict[int, object] = {}
    for index, item in enumerate(items):
        if id(item) not in loaded:
            loaded[id(item)] = load_images([item], name, offset=index)[0]
    return [loaded[id(item)] for item in items]


def _check_prompt_items(prompt) -> list:
    items = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(
            f"`prompt` must be a string, or a non-empty list of strings or (str, str) caption pairs, got {describe(prompt)}."
        )
    checked = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            checked.append(item)
        elif isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(text, str) for text in item):
            checked.append(tuple(item))
        else:
            raise ValueError(
                f"`prompt[{index}]` must be a string or a pair of strings (FashionIQ's two captions), got {describe(item)}."
            )
    return checked


def check_queries(image, prompt) -> tuple[list, list]:
    """The reference images and prompt items (strings or caption pairs), one of each per query: a single image or a
    single text serves every query of the other."""
    if image is None:
        raise ValueError("A query needs its reference image: pass `image` (this pipeline reads the pixels).")
    if prompt is None:
        raise ValueError("A query needs a modification text: pass `prompt`.")
    texts = _check_prompt_items(prompt)
    images = as_image_list(image, "image")
    if len(images) != len(texts):
        if len(images) == 1:
            images = images * len(texts)
        elif len(texts) == 1:
            texts = texts * len(images)
        else:
            raise ValueError(
                f"Got {len(images)} reference images but {len(texts)} prompts: pass as many of each, or a single one "
                "of either."
            )
    return images, texts


def join_caption_pair(first: str, second: str, separator: str) -> str:
    return f"{first.strip(FASHIONIQ_STRIP)}{separator}{second.strip(FASHIONIQ_STRIP)}"


def split_pairs(texts: list, separator: str) -> tuple[list[str], list[tuple[int, str]]]:
    """Each query's text (a pair joined in its given order), and ``(row, reversed pair)`` for every pair."""
    forward, reverse_of = [], []
    for row, item in enumerate(texts):
        if isinstance(item, tuple):
            forward.append(join_caption_pair(item[0], item[1], separator))
            reverse_of.append((row, join_caption_pair(item[1], item[0], separator)))
        else:
            forward.append(item)
    return forward, reverse_of
