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

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..models.compodiff_transformer import CompoDiffTransformer
from ..schedulers.scheduling_compodiff import CompoDiffScheduler, reference_update
from .inputs import shape_of


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


def guidance_changes_prediction(guidance_scale: float, image_guidance_scale: float) -> bool:
    """False for `w_text = w_image = 1`, where the guided x0 `u + (c - n) + (n - u)` is the conditional prediction
    `c` itself: the negative and unconditional branches need not run (diffusers' `do_classifier_free_guidance`)."""
    return not (guidance_scale == 1 and image_guidance_scale == 1)


class GuidedDenoiser:
    """The guided x0 prediction of one batch of queries, step after step.

    The three-branch context (see `CompoDiffTransformer.encode_guidance_context`) is encoded on the first guided step
    and the conditional one on the first unguided step (`w_text = w_image = 1`), so guidance may change between
    steps (a step callback setting `pipe._guidance_scale`). The prediction is float32 whatever the model precision.
    """

    def __init__(self, transformer: CompoDiffTransformer, conditions: dict, samples: int):
        self.transformer = transformer
        self.conditions = conditions
        self.samples = samples
        self.dtype = transformer.dtype
        self._guided = self._conditional = None

    def _repeated(self, context):
        return context.repeat_interleave(self.samples) if self.samples > 1 else context

    def __call__(self, latents, timestep, guidance_scale, image_guidance_scale, timestep_embeds=None) -> torch.Tensor:
        conditions = self.conditions
        if not guidance_changes_prediction(guidance_scale, image_guidance_scale):
            if self._conditional is None:
                self._conditional = self._repeated(self.transformer.encode_context(
                    conditions["image_embeds"], conditions["prompt_embeds"], conditions["mask"]
                ))
            return self.transformer(
                latents.to(self.dtype), timestep, context=self._conditional, timestep_embeds=timestep_embeds
            ).predicted_image_embedding.float()
        if self._guided is None:
            self._guided = self._repeated(self.transformer.encode_guidance_context(
                conditions["image_embeds"], conditions["prompt_embeds"], conditions["negative_prompt_embeds"],
                conditions["mask"],
            ))
        prediction = self.transformer(
            torch.cat([latents] * 3).to(self.dtype), timestep, context=self._guided, timestep_embeds=timestep_embeds
        ).predicted_image_embedding
        return guided_prediction(prediction.float(), guidance_scale, image_guidance_scale)


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
    controls=None,
) -> torch.Tensor:
    """Run the whole reference loop; returns the final sample `[batch * samples, D]` (samples not yet averaged).

    `controls` (the pipeline, in an eager call) is read before every step: its `guidance_scale` and
    `image_guidance_scale` replace the given ones, and once its `interrupt` is set the remaining steps are skipped
    (as in diffusers pipelines, the sample is returned as it is).
    """
    conditions = dict(image_embeds=image_embeds, prompt_embeds=prompt_embeds,
                      negative_prompt_embeds=negative_prompt_embeds, mask=mask)
    denoise = GuidedDenoiser(transformer, conditions, num_samples_per_query)
    noises = iter(step_noises)
    # The sample, the guidance combination and the update stay in float32 whatever the model precision: guidance
    # multiplies the branch difference by up to 7.5, which would amplify half-precision rounding step after step.
    latents = latents.float()
    # every step's time token in one call of the time MLP (the grid is known up front); a graph capture passes the
    # grid already on the device, since a host-to-device copy cannot be captured
    if timesteps is None:
        timesteps = torch.tensor(plan.timesteps, device=latents.device)
    time_tokens = transformer.embed_timesteps(timesteps)
    for index, (t, coefficients) in enumerate(zip(plan.timesteps, plan.coefficients)):
        if controls is not None:
            if controls.interrupt:
                continue
            guidance_scale, image_guidance_scale = controls.guidance_scale, controls.image_guidance_scale
        x0 = denoise(latents, t, guidance_scale, image_guidance_scale, timestep_embeds=time_tokens[index : index + 1])
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


class CompoDiffSamplingMixin:
    """The sampling loops of `CompoDiffPipeline`: the reference sampler (eager, or replayed as a CUDA graph) and any
    diffusers scheduler predicting x0; both call the step callback and read the pipeline's guidance scales and
    `interrupt` before every step, as diffusers pipelines do."""

    # the state of the running (or last) call, read through the properties of the same names (diffusers' names)
    _guidance_scale, _image_guidance_scale, _num_timesteps, _interrupt = 7.5, 1.5, 0, False

    @property
    def guidance_scale(self) -> float:
        """Text guidance `w_text` of the running (or last) call; a step callback may change `pipe._guidance_scale`."""
        return self._guidance_scale

    @property
    def image_guidance_scale(self) -> float:
        """Image guidance `w_image` of the running (or last) call; a callback may change `pipe._image_guidance_scale`."""
        return self._image_guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether guidance changes the prediction this step: not for `w_text = w_image = 1`, where the guided x0 is
        the conditional prediction and the other two branches do not run."""
        return guidance_changes_prediction(self._guidance_scale, self._image_guidance_scale)

    @property
    def num_timesteps(self) -> int:
        """Denoiser steps of the running (or last) call: one callback per step (`num_inference_steps - 1` with
        `CompoDiffScheduler`)."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` (from a callback) to skip the remaining steps of the running call."""
        return self._interrupt

    def _step_kwargs(self, generator, eta) -> dict:
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "generator" in accepted:
            kwargs["generator"] = generator
        if eta is not None:
            kwargs["eta"] = eta
        return kwargs

    def _call_back(self, callback, index, timestep, latents, tensor_inputs) -> torch.Tensor:
        """Run `callback_on_step_end(pipe, step, timestep, kwargs)`; the latents it returns replace the sample.

        A callback must return the dict it was given, changed or not (diffusers' convention). One that returns
        `None` (a forgotten `return`) is refused rather than taken as "no change": a callback that set
        `callback_kwargs["latents"]` and forgot to return it would otherwise be ignored without a word. So are keys
        this pipeline does not take back, and latents of another shape.
        """
        step_locals = {"latents": latents}
        callback_kwargs = {}
        for name in tensor_inputs:  # a loop, not a comprehension (Python 3.11 scoping)
            callback_kwargs[name] = step_locals[name]
        returned = callback(self, index, timestep, callback_kwargs)
        name = getattr(callback, "__name__", type(callback).__name__)
        if not isinstance(returned, dict):
            raise ValueError(
                f"`callback_on_step_end` ({name}) returned {type(returned).__name__} at step {index}: it must return "
                "the dict it was given (`callback_kwargs`), changed or not."
            )
        unknown = sorted(set(returned) - set(self._callback_tensor_inputs))
        if unknown:
            raise ValueError(
                f"`callback_on_step_end` ({name}) returned {unknown} at step {index}, which this pipeline does not "
                f"take back: it may return {self._callback_tensor_inputs}."
            )
        new = returned.get("latents", latents)
        if not isinstance(new, torch.Tensor) or new.shape != latents.shape:
            raise ValueError(
                f"`callback_on_step_end` ({name}) returned `latents` of shape {shape_of(new)} at step {index}; they "
                f"must keep the shape {tuple(latents.shape)}."
            )
        return new

    def enable_cuda_graphs(self, max_graphs: int = 8, compile_blocks: bool = False) -> None:
        """Capture the whole sampling run (context included) as a CUDA graph per input shape and replay it.

        Opt-in low-latency mode for the reference `CompoDiffScheduler` on CUDA: the first call of each shape
        (batch size, samples, steps, guidance scales) captures, later calls replay. Calls with a
        `callback_on_step_end`, other schedulers and CPU execution use the eager path.

        `compile_blocks=True` also compiles every transformer block with `torch.compile` (fusing its many small
        element-wise kernels) before capture; the first call then takes a minute to compile.
        """
        if compile_blocks:
            self.transformer.compile_repeated_blocks(dynamic=False)
        self._graph_sampler = CompoDiffGraphSampler(max_graphs=max_graphs)

    def disable_cuda_graphs(self) -> None:
        self._graph_sampler = None

    def _sample_reference(
        self, conditions, latents, num_inference_steps, samples, generator, eta, callback_on_step_end, tensor_inputs
    ) -> torch.Tensor:
        device = latents.device
        plan = ReferencePlan.build(self.scheduler, num_inference_steps, eta, device)
        self._num_timesteps = len(plan.timesteps)
        # Every draw up front, in the reference's order (after the initial noise, one per noisy step).
        step_noises = [
            randn_tensor(latents.shape, generator=generator, device=device, dtype=torch.float32)
            for _ in range(plan.noisy_steps)
        ]
        options = {"guidance_scale": self.guidance_scale, "image_guidance_scale": self.image_guidance_scale,
                   "num_samples_per_query": samples}
        graph_sampler = getattr(self, "_graph_sampler", None)
        if graph_sampler is not None and device.type == "cuda" and callback_on_step_end is None:
            inputs = dict(conditions, latents=latents, step_noises=step_noises)
            return graph_sampler(self.transformer, plan, inputs, **options)

        progress_bar = self.progress_bar(total=len(plan.timesteps))

        def on_step(index, timestep, step_latents):
            if callback_on_step_end is not None:
                step_latents = self._call_back(callback_on_step_end, index, timestep, step_latents, tensor_inputs)
            progress_bar.update()
            return step_latents

        with progress_bar:
            return reference_sampling_loop(
                self.transformer, plan, latents=latents, step_noises=step_noises, on_step=on_step, controls=self,
                **conditions, **options,
            )

    def _sample_with_scheduler(
        self, conditions, latents, num_inference_steps, samples, generator, eta, callback_on_step_end, tensor_inputs
    ) -> torch.Tensor:
        """Any diffusers scheduler configured for x0 prediction (`prediction_type="sample"`, checked by
        `check_inputs`)."""
        denoise = GuidedDenoiser(self.transformer, conditions, samples)
        self.scheduler.set_timesteps(num_inference_steps, device=latents.device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        latents = latents * self.scheduler.init_noise_sigma
        step_kwargs = self._step_kwargs(generator, eta)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for index, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                model_input = self.scheduler.scale_model_input(latents, t)
                x0 = denoise(model_input, t, self.guidance_scale, self.image_guidance_scale)
                latents = self.scheduler.step(x0, t, latents, **step_kwargs).prev_sample
                if callback_on_step_end is not None:
                    latents = self._call_back(callback_on_step_end, index, t, latents, tensor_inputs)
                progress_bar.update()
        return latents


def mix_and_normalize(result: torch.Tensor, source: torch.Tensor | None, source_weight: float, normalize: bool):
    """`(1 - w) * result + w * source` (no source for text-only queries), L2-normalised on request."""
    if source_weight and source is not None:
        result = (1 - source_weight) * result + source_weight * source
    return torch.nn.functional.normalize(result, dim=-1) if normalize else result
