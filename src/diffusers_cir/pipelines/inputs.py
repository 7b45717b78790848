# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Checks of pipeline call arguments, shared by every CIR pipeline's one `check_inputs`.

Scalars go through :mod:`diffusers_cir.checks`; this module adds what only pipelines take: tensors of a given shape
and with data (finite, not on the meta device), per-query lists of images, generators, and the warning for texts the
tokenizer cuts. Each check raises ``ValueError`` naming the argument, what it holds and what is
expected; the steps of a pipeline call after `check_inputs` trust what these let through.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch

from ..checks import check_finite_tensors
from .utils import is_image_path


def shape_of(value) -> str:
    """A tensor's or array's shape as a tuple, anything else by its type name (for messages)."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return str(tuple(value.shape))
    return type(value).__name__


def check_not_both(name: str, value, other_name: str, other, note: str = "") -> None:
    if value is not None and other is not None:
        raise ValueError(f"Pass either `{name}`{note} or `{other_name}`, not both.")


def check_tensor(value, name: str, shape: tuple, rows_of: str | None = None) -> torch.Tensor:
    """`value` if it is a tensor of `shape`: an int entry is an exact size, a string names a free one
    (`("batch_size", 768)`), shown as such in the message. With `rows_of` (what a row is), it must have a row."""
    if not (
        isinstance(value, torch.Tensor)
        and value.ndim == len(shape)
        and all(isinstance(size, str) or value.shape[axis] == size for axis, size in enumerate(shape))
    ):
        spelled = ", ".join(str(size) for size in shape)
        raise ValueError(f"`{name}` must be a tensor of shape ({spelled}), got {shape_of(value)}.")
    # A batch with no rows composes no query; broadcast against another argument's single entry it would even drop
    # that entry silently and return an empty result.
    if rows_of is not None and value.shape[0] == 0:
        raise ValueError(f"`{name}` holds no {rows_of} (shape {tuple(value.shape)}): pass at least one.")
    return value


def check_float_pixels(value: torch.Tensor, name: str) -> None:
    """A pixel tensor is the image processor's output (normalised floats). An integer tensor is raw 0-255 pixels
    (``torchvision.io.read_image`` makes ``uint8 [3, H, W]``), which the tower would read as values a hundred times
    too large and embed without an error."""
    if not value.is_floating_point():
        raise ValueError(
            f"`{name}` is a {str(value.dtype).replace('torch.', '')} tensor, but a pixel tensor is preprocessed pixel "
            "values (floats, as the pipeline's image processor makes them). Pass raw pixels as a PIL image or an "
            "array, or run the image processor first."
        )


def check_pixel_tensor(value, name: str, size: int, channels: int = 3) -> torch.Tensor:
    """`value` if it is a batch of preprocessed pixel values `[N, channels, size, size]` (float, on a real device,
    finite): what the image encoder reads."""
    check_tensor(value, name, ("N", channels, size, size), rows_of="image")
    check_float_pixels(value, name)
    check_tensor_data({name: value})
    return value


def image_list(images, name: str) -> list:
    """A list of per-query images (PIL, paths, arrays or tensors) from one image, a list, or a batched tensor/array.

    A 4-dimensional tensor/array is a batch of images; for `mask_image` a 3-dimensional tensor (and an array whose
    last axis is not a channel axis) is a batch of `[H, W]` masks.
    """
    if isinstance(images, PIL.Image.Image) or is_image_path(images):
        return [images]
    if isinstance(images, torch.Tensor):
        if images.ndim == 4 or (name == "mask_image" and images.ndim == 3):
            return list(images)
        return [images]
    if isinstance(images, np.ndarray):
        if images.ndim == 4 or (name == "mask_image" and images.ndim == 3 and images.shape[-1] not in (1, 3, 4)):
            return list(images)
        return [images]
    if isinstance(images, (list, tuple)) and len(images) > 0:
        return list(images)
    raise ValueError(
        f"`{name}` must be a PIL image, an image file path, a list of them, or a tensor/array, got {type(images).__name__}"
        + (" (empty)" if isinstance(images, (list, tuple)) else "")
        + "."
    )


def check_generator(generator, rows: int, rows_text: str) -> None:
    """A generator, or a list of one generator per row of noise (`rows_text` says how the rows are counted)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != rows or not all(isinstance(item, torch.Generator) for item in generator):
            raise ValueError(
                f"`generator` as a list must hold one torch.Generator per row of noise: {rows} ({rows_text}), got a "
                f"list of {len(generator)} holding {sorted({type(item).__name__ for item in generator})}; or pass a "
                "single generator."
            )
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"`generator` must be a torch.Generator or a list of them, got {type(generator).__name__}.")


def check_batch_sizes(sizes: dict[str, int]) -> int:
    """The number of queries: every condition holds one entry per query, or a single one that serves every query."""
    batch_size = max(sizes.values())
    empty = [name for name, size in sizes.items() if size == 0]
    if empty and batch_size > 0:
        raise ValueError(
            f"`{empty[0]}` holds no entries (an empty batch) while {sizes}: give it one entry per query, or a single "
            "one for all."
        )
    if any(size not in (1, batch_size) for size in sizes.values()):
        raise ValueError(
            f"Batch sizes do not match: {sizes}. Give each condition one entry per query, or a single one for all."
        )
    if batch_size == 0:
        raise ValueError(f"No query to compose: {' and '.join(f'`{name}`' for name in sizes)} hold no entries.")
    return batch_size


def is_batch(images, name: str) -> bool:
    """Whether `images` is one tensor/array holding several entries (what `image_list` splits), not a list."""
    return isinstance(images, (torch.Tensor, np.ndarray)) and len(image_list(images, name)) > 1


def check_tensor_data(tensors: dict) -> None:
    """Refuse arguments that hold no data (meta tensors) or NaN/infinite values, which would make every output NaN
    without an error, naming the first such argument. `None` entries are skipped; float numpy arrays are checked too.

    Tensors are checked with :func:`diffusers_cir.checks.check_finite_tensors`: one reduction each and one host
    synchronisation for all of them, once per pipeline call.
    """
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.is_meta:
            raise ValueError(
                f"`{name}` is a tensor on the meta device (shape {tuple(value.shape)}): it has a shape but no values. "
                "Pass a tensor on the CPU or an accelerator (a model or tensor made on the meta device needs its "
                "weights or data loaded first)."
            )
        if isinstance(value, np.ndarray) and value.dtype.kind in "fc" and not np.isfinite(value).all():
            count = int((~np.isfinite(value)).sum())
            raise ValueError(
                f"`{name}` holds {count} NaN or infinite value(s) (shape {value.shape}): every value must be finite."
            )
    check_finite_tensors({name: value for name, value in tensors.items() if isinstance(value, torch.Tensor)})


def warn_truncated(tokenizer, texts: list[str], kept: list[int], logger, what: str = "prompts",
                   limit: int | None = None, reader: str = "the CLIP text encoder") -> None:
    """Warn, once for the call, how many of `texts` (`what` they are) the tokenizer cut to `limit` tokens (default:
    its `model_max_length`; pass the limit the call truncated at when it is another, such as a text tower's
    positions) that `reader` reads (`kept`: the token counts it returned). Only the texts that reached the limit are
    tokenised again, without truncation."""
    limit = tokenizer.model_max_length if limit is None else limit
    full = [text for text, count in zip(texts, kept) if count >= limit]
    if not full:
        return
    lengths = [len(ids) for ids in tokenizer(full, truncation=False, verbose=False)["input_ids"]]
    cut = sum(length > limit for length in lengths)
    if cut:
        logger.warning(
            f"{cut} of the {len(texts)} {what} of this call {'is' if cut == 1 else 'are'} longer than the {limit} "
            f"tokens {reader} reads (start and end tokens included) and {'was' if cut == 1 else 'were'} "
            f"cut to the first {limit} (the longest had {max(lengths)}): the words after the cut do not count. "
            "Shorten them."
        )


def clip_input_size(processor) -> tuple[int, int] | None:
    """`(height, width)` of the pixel values an image processor produces, when it center-crops to a fixed size."""
    crop_size = getattr(processor, "crop_size", None) if processor is not None else None
    if crop_size is None or not getattr(processor, "do_center_crop", False):
        return None
    if isinstance(crop_size, int):
        return (crop_size, crop_size)
    crop_size = dict(crop_size)
    if crop_size.get("height") is None or crop_size.get("width") is None:
        return None
    return (crop_size["height"], crop_size["width"])


def first_of_encode_prompt(value, name: str):
    """`encode_prompt` returned the prompt tensor alone before it returned `(prompt_embeds, negative_prompt_embeds)`
    as diffusers pipelines do: its new result, passed where the old one went (`negative_prompt_embeds=
    pipe.encode_prompt([""])`), is read as its first element, with a deprecation warning."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], torch.Tensor):
        from diffusers.utils import deprecate

        deprecate(
            f"{name} as the tuple of encode_prompt", "1.0.0",
            f"`CompoDiffPipeline.encode_prompt` returns `(prompt_embeds, negative_prompt_embeds)`: pass `{name}=` "
            "its first element (`encode_prompt(text, do_classifier_free_guidance=False)[0]` encodes one text).",
        )
        return value[0]
    return value
