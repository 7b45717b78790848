"""Parity with the authors' CompoDiff code: fixtures of `reference/compodiff_tiny` layout.

Every case is computed through this package's own path: the checkpoint is converted with the conversion function,
then the denoiser, the scheduler loop and the pipeline are run on CPU in float32, once with each order of the small
projections (`compodiff_transformer.project`: `x @ W.T` with one CPU thread, `(W @ x.T).T` with several).
"""

import json

import pytest
import torch
from conftest import fixture_folders
from safetensors.torch import load_file

from diffusers_cir import CompoDiffPipeline, CompoDiffScheduler
from diffusers_cir.conversion import convert_compodiff_checkpoint
from diffusers_cir.models import compodiff_transformer

FOLDERS = fixture_folders("original_checkpoint/config.json")
PLAIN_TOLERANCE = 1e-5  # plain denoiser
GUIDED_TOLERANCE = 1e-4  # guided denoiser and sampling runs (guidance amplifies float32 rounding)


def _cases():
    for folder in FOLDERS:
        meta = json.loads((folder / "io.json").read_text())
        for case in meta["cases"]:
            yield pytest.param(folder, case, id=f"{folder.name}-{case}")


@pytest.fixture(autouse=True, params=[1, 2], ids=["x-WT", "W-xT"])
def projection_order(request, monkeypatch):
    monkeypatch.setattr(compodiff_transformer, "_cpu_threads", lambda: request.param)


@pytest.fixture(scope="module")
def loaded():
    cache = {}

    def load(folder):
        if folder not in cache:
            model = convert_compodiff_checkpoint(str(folder / "original_checkpoint"))
            cache[folder] = (model, load_file(str(folder / "io.safetensors")), json.loads((folder / "io.json").read_text()))
        return cache[folder]

    return load


def test_fixtures_found():
    assert FOLDERS, "tests/fixtures/compodiff_tiny is missing"


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda folder: folder.name)
def test_denoiser(loaded, folder):
    model, io, _ = loaded(folder)
    with torch.no_grad():
        out = model(
            io["denoiser.x_t"], io["denoiser.timesteps"], io["denoiser.image_cond"], io["denoiser.text_cond"],
            io["denoiser.mask"],
        ).predicted_image_embedding
    assert out.shape == io["denoiser.out"].shape
    assert (out - io["denoiser.out"]).abs().max().item() <= PLAIN_TOLERANCE


def _guided(model, x, t, image, text, negative, mask, image_scale, text_scale):
    zeros = torch.zeros_like(image)
    t = torch.as_tensor(t).expand(x.shape[0]) if torch.as_tensor(t).ndim == 0 else t
    out = model(
        torch.cat([x] * 3), torch.cat([t] * 3), torch.cat([image, image, zeros]), torch.cat([text, negative, negative]),
        torch.cat([mask] * 3),
    ).predicted_image_embedding
    conditional, negative_out, unconditional = out.chunk(3)
    return unconditional + (conditional - negative_out) * text_scale + (negative_out - unconditional) * image_scale


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda folder: folder.name)
def test_guided_denoiser(loaded, folder):
    model, io, _ = loaded(folder)
    keys = [key for key in io if key.startswith("denoiser.out_cfg_")]
    assert keys
    for key in keys:
        image_scale, text_scale = (float(value) for value in key[len("denoiser.out_cfg_") :].split("_"))
        with torch.no_grad():
            out = _guided(
                model, io["denoiser.x_t"], io["denoiser.timesteps"], io["denoiser.image_cond"], io["denoiser.text_cond"],
                io["denoiser.text_cond_uc"], io["denoiser.mask"], image_scale, text_scale,
            )
        assert (out - io[key]).abs().max().item() <= GUIDED_TOLERANCE, key


@pytest.mark.parametrize("folder,case", list(_cases()))
def test_sampling_through_scheduler(loaded, folder, case):
    """The reference loop written out with CompoDiffScheduler.step, fed the recorded noises."""
    model, io, meta = loaded(folder)
    spec = meta["cases"][case]
    image_scale, text_scale = spec["cond_scale"]
    samples = spec["num_samples_per_batch"]
    repeat = lambda tensor: tensor.repeat_interleave(samples, 0)  # noqa: E731  (b r) order
    text, negative = io[spec.get("text_cond", "denoiser.text_cond")], io[spec.get("negative_text_cond", "denoiser.text_cond_uc")]
    image, mask = repeat(io[f"{case}.image_cond"]), repeat(io[f"{case}.mask"])
    text, negative = repeat(text), repeat(negative)
    scheduler = CompoDiffScheduler(num_train_timesteps=model.config.num_train_timesteps)
    scheduler.set_timesteps(spec["num_inference_steps"])
    x = io[f"{case}.initial_noise"]
    used = 0
    with torch.no_grad():
        for t in scheduler.timesteps:
            x0 = _guided(model, x, t, image, text, negative, mask, image_scale, text_scale)
            noise = None
            if scheduler.previous_timestep(t) > 0:
                noise = io[f"{case}.step_noise.{used}"]
                used += 1
            x = scheduler.step(x0, t, x, variance_noise=noise).prev_sample
    assert used == spec["num_step_noises"]
    out = x.reshape(-1, samples, x.shape[-1]).mean(1)
    assert (out - io[f"{case}.out"]).abs().max().item() <= GUIDED_TOLERANCE


@pytest.mark.parametrize("folder,case", list(_cases()))
def test_sampling_through_pipeline(loaded, folder, case):
    """The pipeline with embeddings given and a seeded generator reproduces the reference draws and result."""
    model, io, meta = loaded(folder)
    spec = meta["cases"][case]
    image_scale, text_scale = spec["cond_scale"]
    pipe = CompoDiffPipeline(transformer=model, scheduler=CompoDiffScheduler())
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(spec["random_seed"])
    out = pipe(
        image_embeds=io[f"{case}.image_cond"],
        prompt_embeds=io[spec.get("text_cond", "denoiser.text_cond")],
        negative_prompt_embeds=io[spec.get("negative_text_cond", "denoiser.text_cond_uc")],
        mask=io[f"{case}.mask"],
        num_inference_steps=spec["num_inference_steps"],
        guidance_scale=text_scale,
        image_guidance_scale=image_scale,
        num_samples_per_query=spec["num_samples_per_batch"],
        generator=generator,
    ).image_embeds
    # the generator was consumed exactly as the reference: the initial noise, then one draw per noisy step
    replay = torch.Generator().manual_seed(spec["random_seed"])
    assert torch.equal(torch.randn(io[f"{case}.initial_noise"].shape, generator=replay), io[f"{case}.initial_noise"])
    for index in range(spec["num_step_noises"]):
        assert torch.equal(torch.randn(io[f"{case}.initial_noise"].shape, generator=replay), io[f"{case}.step_noise.{index}"])
    assert torch.equal(replay.get_state(), generator.get_state())
    assert out.shape == io[f"{case}.out"].shape
    assert (out - io[f"{case}.out"]).abs().max().item() <= GUIDED_TOLERANCE
