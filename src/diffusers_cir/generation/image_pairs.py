# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Stage 3: (reference, target) images of caption triplets, drawn by Stable Diffusion with Prompt-to-Prompt.

SynthTriplets18M drew its images with Stable Diffusion 1.5, 2.0, 2.1 and an anime model (several generators, so the
images are not biased towards one) and Prompt-to-Prompt, several seeds per caption pair, then kept what the CLIP
filters let through. Any diffusers ``StableDiffusionPipeline`` works here; which one draws an item is drawn per item.

Each :class:`PairRequest` carries its own seed and self-attention share, so a pair's images do not depend on which
other pairs share its batch (up to the numerics of batched kernels); the caller draws both per item.

Example:
    >>> from diffusers_cir.generation.image_pairs import PairRequest, draw_image_pairs
    >>> pairs = draw_image_pairs(pipe, [PairRequest("a cup", "a vase", seed=0, self_replace=0.4)],
    ...                          ImagePairConfig(num_inference_steps=30))  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .config import ImagePairConfig
from .prompt_to_prompt import PromptToPromptController, apply_prompt_to_prompt, token_alignment


@dataclass
class PairRequest:
    reference_caption: str
    target_caption: str
    seed: int
    self_replace: float  # share of the steps with shared self-attention
    cross_replace: float = 0.8  # share of the steps with shared cross-attention


def image_size(pipe, config: ImagePairConfig) -> tuple[int, int]:
    """``(height, width)`` of the images: the config's, or the pipeline's default."""
    default = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return config.height or default, config.width or default


def _initial_noise(pipe, requests: Sequence[PairRequest], height: int, width: int):
    """Latents ``[2 * pairs, C, h, w]``: each pair's reference and target start from the same noise of its seed."""
    import torch

    shape = (pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(r.seed)) for r in requests]
    return torch.stack([n for n in noise for _ in range(2)])


def _token_maps(pipe, prompts: list[str]):
    import torch

    tokenizer = pipe.tokenizer
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)["input_ids"]
    return torch.tensor([token_alignment(ids[i], ids[i + 1]) for i in range(0, len(ids), 2)])


def draw_image_pairs(pipe, requests: Sequence[PairRequest], config: ImagePairConfig) -> list[tuple]:
    """``(reference, target)`` PIL images of each request, ``config.batch_size`` pairs per denoising batch."""
    import torch

    height, width = image_size(pipe, config)
    steps = config.num_inference_steps
    results: list[tuple] = []
    for start in range(0, len(requests), config.batch_size):
        batch = list(requests[start : start + config.batch_size])
        prompts = [text for r in batch for text in (r.reference_caption, r.target_caption)]
        controller = PromptToPromptController(
            _token_maps(pipe, prompts),
            cross_steps=[round(r.cross_replace * steps) for r in batch],
            self_steps=[round(r.self_replace * steps) for r in batch],
            max_self_tokens=config.self_replace_max_tokens,
        )
        latents = _initial_noise(pipe, batch, height, width).to(pipe.device, pipe.unet.dtype)
        # Stochastic schedulers draw step noise too: the same generator seed for a pair's two rows.
        generators = [torch.Generator("cpu").manual_seed(r.seed + 1) for r in batch for _ in range(2)]
        with apply_prompt_to_prompt(pipe.unet, controller):
            output = pipe(
                prompt=prompts, latents=latents, generator=generators, num_inference_steps=steps,
                guidance_scale=config.guidance_scale, height=height, width=width, output_type="pil",
                callback_on_step_end=controller.step_callback,
            )
        images = output.images
        results.extend((images[i], images[i + 1]) for i in range(0, len(images), 2))
    return results
