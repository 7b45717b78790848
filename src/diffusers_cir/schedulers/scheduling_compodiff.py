# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""The CompoDiff sampler: the reference DDIM loop (eta = 1, x0 prediction) on a cosine schedule, exactly.

Two quirks of the reference are kept on purpose, because the released weights were sampled with them:

* the timestep grid is ``linspace(-1, T, steps + 1)`` (float32) without its last element, truncated to int and
  reversed; the network runs on all but the last value, so ``num_inference_steps=10`` makes **9** network calls
  (899, 799, ..., 99) and the last update jumps to the predicted x0;
* the noise estimate uses ``alphas_cumprod[t]`` while the DDIM update uses ``alphas_cumprod_prev``
  (``a = alphas_cumprod_prev[t]``, ``a_next = alphas_cumprod_prev[t_next]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..checks import check_float


@dataclass
class CompoDiffSchedulerOutput(BaseOutput):
    """
    Args:
        prev_sample (`torch.Tensor`): x at the next (less noisy) timestep; the final x0 after the last step.
        pred_original_sample (`torch.Tensor`): the x0 the step was given (or derived).
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def cosine_beta_schedule(num_train_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule in float64, betas clipped to ``[0, max_beta]``."""
    steps = torch.linspace(0, num_train_timesteps, num_train_timesteps + 1, dtype=torch.float64)
    alphas_cumprod = torch.cos(((steps / num_train_timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1 - (alphas_cumprod[1:] / alphas_cumprod[:-1])
    return betas.clamp(0, max_beta)


def reference_update(
    sample: torch.Tensor, x0: torch.Tensor, coefficients: dict[str, torch.Tensor], noise: torch.Tensor | None
) -> torch.Tensor:
    """The reference DDIM update in float32 (see `CompoDiffScheduler.step_coefficients`)."""
    noise_estimate = (coefficients["sqrt_recip"] * sample.float() - x0.float()) / coefficients["sqrt_recipm1"]
    fresh = coefficients["c1"] * noise.float() if noise is not None else 0.0
    return x0.float() * coefficients["sqrt_alpha_next"] + fresh + coefficients["c2"] * noise_estimate


class CompoDiffScheduler(SchedulerMixin, ConfigMixin):
    r"""
    The reference CompoDiff sampler (DDIM with ``eta`` noise, predicting x0) and its training-time ``add_noise``.

    Parameters:
        num_train_timesteps (`int`, defaults to 1000): Diffusion steps of the training schedule.
        cosine_s (`float`, defaults to 0.008): Offset of the cosine schedule.
        max_beta (`float`, defaults to 0.999): Betas are clipped to ``[0, max_beta]``.
        eta (`float`, defaults to 1.0): DDIM stochasticity (1 = the reference).
        prediction_type (`str`, defaults to `"sample"`): The denoiser predicts x0; the only supported value.
        beta_schedule (`str`, defaults to `"squaredcos_cap_v2"`): diffusers' name of this cosine schedule; the only
            supported value.
        clip_sample (`bool`, defaults to `False`): CLIP embeddings are not clipped; the only supported value.

    The last three describe the model rather than a choice, and are written into the configuration as given, so the
    scheduler-swap idiom `DDIMScheduler.from_config(pipe.scheduler.config)` (or `DPMSolverMultistepScheduler`) makes
    a scheduler that fits the CompoDiff denoiser (diffusers leaves values a config took by default out of such a swap,
    and DDIM's own defaults are epsilon prediction on a linear schedule with clipping).

    Example:
        >>> import torch
        >>> from diffusers_cir import CompoDiffScheduler
        >>> scheduler = CompoDiffScheduler()
        >>> scheduler.set_timesteps(10)
        >>> scheduler.timesteps.tolist()
        [899, 799, 699, 599, 499, 399, 299, 199, 99]
        >>> x = torch.randn(2, 8)
        >>> for t in scheduler.timesteps:
        ...     x = scheduler.step(torch.zeros(2, 8), t, x).prev_sample
    """

    order = 1
    _compatibles: ClassVar[list[str]] = ["DDIMScheduler", "DPMSolverMultistepScheduler"]
    # written into the configuration even when left at their defaults (see the class docstring)
    _model_facts: ClassVar[tuple[str, ...]] = ("prediction_type", "beta_schedule", "clip_sample")

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        cosine_s: float = 0.008,
        max_beta: float = 0.999,
        eta: float = 1.0,
        prediction_type: str = "sample",
        beta_schedule: str = "squaredcos_cap_v2",
        clip_sample: bool = False,
    ):
        if prediction_type != "sample":
            raise ValueError(f"CompoDiffScheduler predicts x0: `prediction_type` must be 'sample', got {prediction_type!r}.")
        if beta_schedule != "squaredcos_cap_v2":
            raise ValueError(
                f"CompoDiffScheduler is the cosine schedule: `beta_schedule` must be 'squaredcos_cap_v2', got {beta_schedule!r}."
            )
        if clip_sample:
            raise ValueError("CompoDiffScheduler samples CLIP embeddings, which are not clipped: `clip_sample` must be False.")
        # DDIM's noise is eta times the largest variance the update allows: beyond 1 the square root is NaN
        check_float(eta, "eta", 0.0, 1.0)
        defaulted = [name for name in self.config.get("_use_default_values", []) if name not in self._model_facts]
        self.register_to_config(_use_default_values=defaulted)
        betas = cosine_beta_schedule(num_train_timesteps, cosine_s, max_beta)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        # The reference derives everything in float64 and stores float32 buffers; so do we.
        self.betas = betas.float()
        self.alphas_cumprod = alphas_cumprod.float()
        self.alphas_cumprod_prev = alphas_cumprod_prev.float()
        self.sqrt_alphas_cumprod = alphas_cumprod.sqrt().float()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - alphas_cumprod).sqrt().float()
        self.sqrt_recip_alphas_cumprod = (1.0 / alphas_cumprod).sqrt().float()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / alphas_cumprod - 1).sqrt().float()
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.empty(0, dtype=torch.long)
        self._next_timestep: dict[int, int] = {}

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        """The reference grid; ``self.timesteps`` holds the ``num_inference_steps - 1`` network calls."""
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 2:
            raise ValueError(
                f"`num_inference_steps` must be an integer >= 2 (the reference makes steps - 1 network calls), "
                f"got {num_inference_steps!r}."
            )
        if num_inference_steps > self.config.num_train_timesteps:
            raise ValueError(
                f"`num_inference_steps` ({num_inference_steps}) cannot exceed `num_train_timesteps` "
                f"({self.config.num_train_timesteps})."
            )
        grid = torch.linspace(-1.0, self.config.num_train_timesteps, steps=num_inference_steps + 1)[:-1]
        times = list(reversed(grid.int().tolist()))
        self._next_timestep = dict(zip(times[:-1], times[1:]))
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.tensor(times[:-1], dtype=torch.long, device=device)

    def previous_timestep(self, timestep: int) -> int:
        return self._next_timestep[int(timestep)]

    def step_coefficients(self, timestep: int, eta: float | None = None) -> dict[str, torch.Tensor] | None:
        """The float32 scalars of the update from `timestep` to the next grid value (None for the last step).

        `x_next = x0 * sqrt_alpha_next + c1 * noise + c2 * (sqrt_recip * x - x0) / sqrt_recipm1`. Shared by `step` and
        the CUDA-graph sampler, so both compute the reference update with the same numbers.
        """
        t = int(timestep)
        if t not in self._next_timestep:
            raise ValueError(f"`timestep` {t} is not on the grid set by `set_timesteps`: {self.timesteps.tolist()}.")
        t_next = self._next_timestep[t]
        if t_next < 0:
            return None
        alpha = self.alphas_cumprod_prev[t]
        alpha_next = self.alphas_cumprod_prev[t_next]
        eta = self.config.eta if eta is None else eta
        c1 = eta * ((1 - alpha / alpha_next) * (1 - alpha_next) / (1 - alpha)).sqrt()
        return {
            "sqrt_recip": self.sqrt_recip_alphas_cumprod[t],
            "sqrt_recipm1": self.sqrt_recipm1_alphas_cumprod[t],
            "sqrt_alpha_next": alpha_next.sqrt(),
            "c1": c1,
            "c2": ((1 - alpha_next) - c1.square()).sqrt(),
            "fresh_noise": bool(t_next > 0 and eta > 0),
        }

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> CompoDiffSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One reference DDIM update from ``timestep`` to the next value of the grid.

        Args:
            model_output: the predicted x0 (already guided).
            timestep: a value of ``self.timesteps``.
            sample: the current x_t.
            generator: draws the fresh noise (shape of ``sample``) when the next timestep is positive.
            eta: overrides the configured eta.
            variance_noise: the fresh noise itself, instead of drawing it.
        """
        if self.num_inference_steps is None:
            raise ValueError("Call `set_timesteps` before `step`.")
        x0 = model_output
        coefficients = self.step_coefficients(timestep, eta)
        if coefficients is None:
            prev_sample = x0
        else:
            device, dtype = sample.device, sample.dtype
            fresh_noise = None
            if coefficients["fresh_noise"]:
                if variance_noise is None:
                    variance_noise = randn_tensor(sample.shape, generator=generator, device=device, dtype=dtype)
                elif variance_noise.shape != sample.shape:
                    raise ValueError(
                        f"`variance_noise` must have the shape of `sample` {tuple(sample.shape)}, "
                        f"got {tuple(variance_noise.shape)}."
                    )
                fresh_noise = variance_noise
            coefficients = {k: v.to(device) for k, v in coefficients.items() if k != "fresh_noise"}
            prev_sample = reference_update(sample, x0, coefficients, fresh_noise).to(dtype)
        if not return_dict:
            return (prev_sample, x0)
        return CompoDiffSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """Forward diffusion ``q(x_t | x0) = sqrt(ac[t]) x0 + sqrt(1 - ac[t]) noise`` (training)."""
        timesteps = torch.as_tensor(timesteps, device=original_samples.device).long()
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(original_samples.shape[0])
        if timesteps.min() < 0 or timesteps.max() >= self.config.num_train_timesteps:
            raise ValueError(f"`timesteps` must lie in [0, {self.config.num_train_timesteps}).")
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        sqrt_alpha = self.sqrt_alphas_cumprod.to(original_samples.device)[timesteps].view(shape)
        sqrt_one_minus = self.sqrt_one_minus_alphas_cumprod.to(original_samples.device)[timesteps].view(shape)
        return (sqrt_alpha * original_samples.float() + sqrt_one_minus * noise.float()).to(original_samples.dtype)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
