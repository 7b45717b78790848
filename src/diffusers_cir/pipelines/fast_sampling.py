# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""The reference CompoDiff sampling loop, written so that it can run eagerly or as one captured CUDA graph.

Everything that does not depend on the step is done once per query (text projection, mask embedding and the
cross-attention keys/values of the three guidance contexts, see
`CompoDiffTransformer.encode_guidance_context`); the three guidance branches run as one batch; the time tokens of
all steps come from one call of the time MLP (`CompoDiffTransformer.embed_timesteps`); all random draws are made up
front, in the reference order (initial noise, then one draw per noisy step), so a seeded generator gives the same numbers as the reference whether or not a graph is used.

On CUDA the transformer runs the fused Triton kernels of `diffusers_cir.models.fused_inference` (about 1,700 kernels
for 10 steps of the 12-layer model instead of 2,600 to 4,300). A CUDA graph removes the launch overhead that still
bounds small batches: `CompoDiffPipeline.enable_cuda_graphs()` captures one graph per input shape and replays it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..models.compodiff_transformer import CompoDiffTransformer
from ..schedulers.scheduling_compodiff import CompoDiffScheduler, reference_update


@dataclass(frozen=True)
class ReferencePlan:
    """The grid and update coefficients of one sampling run (built once, reused by every replay)."""

    timesteps: tuple[int, ...]
    coefficients: tuple[dict[str, torch.Tensor] | None, ...]
    noisy_steps: int
    signature: tuple  # the coefficients as Python floats: identifies the plan without reading the device

    @classmethod
    def build(cls, scheduler: CompoDiffScheduler, num_inference_steps: int, eta: float | None, device) -> "ReferencePlan":
        scheduler.set_timesteps(num_inference_steps)
        coefficients, signature = [], []
        for t in scheduler.timesteps.tolist():
            step = scheduler.step_coefficients(t, eta)
            signature.append(None if step is None else tuple((k, float(v)) for k, v in sorted(step.items())))
            if step is not None:
                fresh = step.pop("fresh_noise")
                step = {key: value.to(device) for key, value in step.items()}
                step["fresh_noise"] = fresh
            coefficients.append(step)
        noisy = sum(1 for step in coefficients if step is not None and step["fresh_noise"])
        return cls(tuple(scheduler.timesteps.tolist()), tuple(coefficients), noisy, tuple(signature))


def guided_prediction(prediction: torch.Tensor, guidance_scale: float, image_guidance_scale: float) -> torch.Tensor:
    """`u + (c - n) * w_text + (n - u) * w_image` from the stacked branches `[c, n, u]`."""
    conditional, negative, unconditional = prediction.chunk(3)
    return unconditional + (conditional - negative) * guidance_scale + (negative - unconditional) * image_guidance_scale


def reference_sampling_loop(
    transformer: CompoDiffTransformer,
    plan: ReferencePlan,
    image_embeds: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    mask: torch.Tensor,
    latents: torch.Tensor,
    step_noises: list[torch.Tensor],
    guidance_scale: float,
    image_guidance_scale: float,
    num_samples_per_query: int,
    timesteps: torch.Tensor | None = None,
    on_step: Callable[[int, int, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run the whole reference loop; returns the final sample `[batch * samples, D]` (samples not yet averaged)."""
    context = transformer.encode_guidance_context(image_embeds, prompt_embeds, negative_prompt_embeds, mask)
    if num_samples_per_query > 1:
        context = context.repeat_interleave(num_samples_per_query)
    noises = iter(step_noises)
    # The sample, the guidance combination and the update stay in float32 whatever the model precision: guidance
    # multiplies the branch difference by up to 7.5, which would amplify half-precision rounding step after step.
    latents = latents.float()
    model_dtype = transformer.dtype
    # every step's time token in one call of the time MLP (the grid is known up front); a graph capture passes the
    # grid already on the device, since a host-to-device copy cannot be captured
    if timesteps is None:
        timesteps = torch.tensor(plan.timesteps, device=latents.device)
    time_tokens = transformer.embed_timesteps(timesteps)
    for index, (t, coefficients) in enumerate(zip(plan.timesteps, plan.coefficients)):
        model_input = torch.cat([latents] * 3).to(model_dtype)
        prediction = transformer(
            model_input, t, context=context, timestep_embeds=time_tokens[index : index + 1]
        ).predicted_image_embedding
        x0 = guided_prediction(prediction.float(), guidance_scale, image_guidance_scale)
        if coefficients is None:
            latents = x0
        else:
            noise = next(noises) if coefficients["fresh_noise"] else None
            latents = reference_update(latents, x0, coefficients, noise)
        if on_step is not None:
            latents = on_step(index, t, latents)
    return latents


class CompoDiffGraphSampler:
    """Captures `reference_sampling_loop` (context included) as one CUDA graph per input signature and replays it."""

    def __init__(self, max_graphs: int = 8):
        self.max_graphs = max_graphs
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict, torch.Tensor]] = {}

    def clear(self) -> None:
        self._graphs.clear()

    def __call__(self, transformer: CompoDiffTransformer, plan: ReferencePlan, inputs: dict, **options) -> torch.Tensor:
        key = (
            id(transformer), plan.timesteps, plan.signature,
            tuple((name, tuple(t.shape), t.dtype) for name, t in inputs.items() if isinstance(t, torch.Tensor)),
            len(inputs["step_noises"]), tuple(sorted(options.items())),
        )
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                self._graphs.pop(next(iter(self._graphs)))
            entry = self._capture(transformer, plan, inputs, options)
            self._graphs[key] = entry
        graph, static, output, _ = entry
        for name, value in inputs.items():
            if name == "step_noises":
                for buffer, noise in zip(static["step_noises"], value):
                    buffer.copy_(noise)
            else:
                static[name].copy_(value)
        graph.replay()
        return output.clone()

    @staticmethod
    def _capture(transformer, plan, inputs, options):
        static = {
            name: ([noise.clone() for noise in value] if name == "step_noises" else value.clone())
            for name, value in inputs.items()
        }
        device = static["latents"].device
        timesteps = torch.tensor(plan.timesteps, device=device)

        def run():
            return reference_sampling_loop(transformer, plan, timesteps=timesteps, **static, **options)

        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up cuBLAS/SDPA workspaces outside the capture
                run()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = run()
        # The graph reads the plan's coefficient and timestep tensors by address: keep them alive with it.
        return graph, static, output, (plan, timesteps)
