# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Inputs of the masked objective: random box masks, and the embeddings of images with the mask blanked.

At inference the pipeline zeroes the masked pixels of the (normalised) reference image before CLIP encoding and
passes the 64x64 mask to the denoiser (:meth:`CompoDiffPipeline.prepare_mask`). The masked objective trains exactly
that: from the embedding of the masked target image, the target's caption and the mask, predict the full target
embedding.
"""

from __future__ import annotations

import torch

from ..data.precompute import blank_masked_pixels


def random_box_masks(
    batch_size: int,
    size: int = 64,
    min_fraction: float = 0.1,
    max_fraction: float = 0.5,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``[batch_size, size, size]`` float masks, each one axis-aligned box (1 inside) covering between
    ``min_fraction`` and ``max_fraction`` of each side."""
    if not 0 < min_fraction <= max_fraction <= 1:
        raise ValueError(
            f"Need 0 < min_fraction <= max_fraction <= 1, got min_fraction={min_fraction}, max_fraction={max_fraction}."
        )
    draws = torch.rand(batch_size, 4, device=device, generator=generator)
    heights = (min_fraction + (max_fraction - min_fraction) * draws[:, 0]) * size
    widths = (min_fraction + (max_fraction - min_fraction) * draws[:, 1]) * size
    heights, widths = heights.round().clamp(1, size), widths.round().clamp(1, size)
    tops = ((size - heights) * draws[:, 2]).floor()
    lefts = ((size - widths) * draws[:, 3]).floor()
    grid = torch.arange(size, device=device, dtype=torch.float32)
    rows = (grid[None] >= tops[:, None]) & (grid[None] < (tops + heights)[:, None])
    columns = (grid[None] >= lefts[:, None]) & (grid[None] < (lefts + widths)[:, None])
    return (rows[:, :, None] & columns[:, None, :]).float()


@torch.no_grad()
def masked_image_embeds(image_encoder, pixel_values: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """CLIP image embeddings ``[B, D]`` of ``pixel_values`` (normalised, ``[B, 3, H, W]``) with the mask region
    zeroed, the mask (``[B, S, S]``, 1 = blank) resized to the pixel grid with nearest interpolation."""
    if pixel_values.ndim != 4 or masks.ndim != 3 or masks.shape[0] != pixel_values.shape[0]:
        raise ValueError(
            f"Need `pixel_values` [B, 3, H, W] and `masks` [B, S, S] with the same B, got "
            f"{tuple(pixel_values.shape)} and {tuple(masks.shape)}."
        )
    return image_encoder(pixel_values=blank_masked_pixels(pixel_values, masks)).image_embeds
