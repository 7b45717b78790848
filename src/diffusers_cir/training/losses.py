# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""The CompoDiff training loss: noise the target embedding with the scheduler, predict x0, mean squared error."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_timesteps(
    batch_size: int, num_train_timesteps: int, device: torch.device | str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Uniform integer timesteps in ``[0, num_train_timesteps)``."""
    return torch.randint(0, num_train_timesteps, (batch_size,), device=device, generator=generator)


def compodiff_loss(
    transformer,
    noise_scheduler,
    target_image_embeds: torch.Tensor,
    image_embeds: torch.Tensor,
    text_hidden_states: torch.Tensor,
    mask: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """MSE between the denoiser's x0 prediction and the clean target embedding (the reference objective).

    ``x_t = scheduler.add_noise(x0, noise, t)`` with ``t`` uniform over the training timesteps and Gaussian noise,
    both drawn here unless given. Everything is float32 in the loss whatever the autocast precision.

    Args:
        transformer: a :class:`~diffusers_cir.CompoDiffTransformer` (possibly wrapped by accelerate/DDP/PEFT).
        noise_scheduler: a :class:`~diffusers_cir.CompoDiffScheduler` (anything with ``add_noise`` and
            ``config.num_train_timesteps``).
        target_image_embeds: ``[B, D]`` x0.
        image_embeds: ``[B, D]`` reference condition (zeros: none).
        text_hidden_states: ``[B, L, H]``.
        mask: ``[B, S, S]`` or ``None``.

    Returns:
        The scalar loss.
    """
    if target_image_embeds.ndim != 2:
        raise ValueError(
            f"`target_image_embeds` must have shape [batch, dim], got {tuple(target_image_embeds.shape)}."
        )
    batch_size = target_image_embeds.shape[0]
    device = target_image_embeds.device
    if timesteps is None:
        timesteps = sample_timesteps(batch_size, noise_scheduler.config.num_train_timesteps, device, generator)
    if noise is None:
        noise = torch.randn(
            target_image_embeds.shape, device=device, dtype=target_image_embeds.dtype, generator=generator
        )
    noisy = noise_scheduler.add_noise(target_image_embeds, noise, timesteps)
    prediction = transformer(
        noisy, timesteps, image_embeds=image_embeds, text_hidden_states=text_hidden_states, mask=mask
    ).predicted_image_embedding
    return F.mse_loss(prediction.float(), target_image_embeds.float(), reduction="mean")
