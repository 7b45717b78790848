import pytest
import torch

from diffusers_cir import CompoDiffScheduler
from diffusers_cir.schedulers.scheduling_compodiff import cosine_beta_schedule


def test_reference_grid():
    scheduler = CompoDiffScheduler()
    scheduler.set_timesteps(10)
    assert scheduler.timesteps.tolist() == [899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert scheduler.previous_timestep(99) == -1
    scheduler.set_timesteps(25)
    grid = list(reversed(torch.linspace(-1.0, 1000, 26)[:-1].int().tolist()))
    assert scheduler.timesteps.tolist() == grid[:-1]
    assert len(scheduler.timesteps) == 24


def test_schedule_is_cosine():
    scheduler = CompoDiffScheduler()
    betas = cosine_beta_schedule(1000)
    assert betas.max() <= 0.999 and betas.min() >= 0
    assert torch.allclose(scheduler.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), atol=1e-7)
    assert scheduler.alphas_cumprod_prev[0] == 1.0
    assert torch.equal(scheduler.alphas_cumprod_prev[1:], scheduler.alphas_cumprod[:-1])


def test_last_step_returns_x0_and_noise_is_used_only_when_next_is_positive():
    scheduler = CompoDiffScheduler()
    scheduler.set_timesteps(3)  # grid -1, 332, 666 -> calls at 666, 332
    x0 = torch.randn(4, 8)
    sample = torch.randn(4, 8)
    last = scheduler.timesteps[-1]
    assert scheduler.previous_timestep(last) == -1
    assert torch.equal(scheduler.step(x0, last, sample).prev_sample, x0)
    first = scheduler.timesteps[0]
    a = scheduler.step(x0, first, sample, variance_noise=torch.zeros(4, 8)).prev_sample
    b = scheduler.step(x0, first, sample, variance_noise=torch.ones(4, 8)).prev_sample
    assert not torch.allclose(a, b)
    c = scheduler.step(x0, first, sample, eta=0.0, variance_noise=torch.ones(4, 8)).prev_sample
    d = scheduler.step(x0, first, sample, eta=0.0, variance_noise=torch.zeros(4, 8)).prev_sample
    assert torch.equal(c, d)


def test_generator_makes_steps_deterministic():
    scheduler = CompoDiffScheduler()
    scheduler.set_timesteps(10)
    x0, sample = torch.randn(2, 8), torch.randn(2, 8)
    t = scheduler.timesteps[0]
    one = scheduler.step(x0, t, sample, generator=torch.Generator().manual_seed(3)).prev_sample
    two = scheduler.step(x0, t, sample, generator=torch.Generator().manual_seed(3)).prev_sample
    assert torch.equal(one, two)


def test_add_noise():
    scheduler = CompoDiffScheduler()
    x0, noise = torch.randn(3, 8), torch.randn(3, 8)
    t = torch.tensor([0, 500, 999])
    noisy = scheduler.add_noise(x0, noise, t)
    a = scheduler.alphas_cumprod[t].double()[:, None]
    expected = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()
    assert torch.allclose(noisy.double(), expected, atol=1e-6)
    with pytest.raises(ValueError, match="timesteps"):
        scheduler.add_noise(x0, noise, torch.tensor([0, 1, 1000]))


@pytest.mark.parametrize("steps", [0, 1, -3, 2.5, 1001])
def test_bad_step_counts(steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        CompoDiffScheduler().set_timesteps(steps)


def test_step_needs_grid():
    scheduler = CompoDiffScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(torch.zeros(1, 2), 10, torch.zeros(1, 2))
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="not on the grid"):
        scheduler.step(torch.zeros(1, 2), 10, torch.zeros(1, 2))


def test_save_and_reload(tmp_path):
    scheduler = CompoDiffScheduler(eta=0.5)
    scheduler.save_pretrained(tmp_path)
    reloaded = CompoDiffScheduler.from_pretrained(tmp_path)
    assert reloaded.config.eta == 0.5
    assert torch.equal(reloaded.alphas_cumprod, scheduler.alphas_cumprod)


@pytest.mark.parametrize("scheduler_name", ["DDIMScheduler", "DPMSolverMultistepScheduler"])
def test_scheduler_swap_idiom_makes_an_x0_cosine_scheduler(tmp_path, scheduler_name):
    """`DDIMScheduler.from_config(pipe.scheduler.config)` took DDIM's own defaults (epsilon prediction, a linear
    schedule, clipping), which the pipeline refuses or which sample the wrong schedule: the facts of the model are
    written into the config even at their defaults, also after a save and reload."""
    import diffusers

    scheduler_class = getattr(diffusers, scheduler_name)
    assert scheduler_class in CompoDiffScheduler().compatibles
    scheduler = CompoDiffScheduler()
    scheduler.save_pretrained(tmp_path)
    for config in (scheduler.config, CompoDiffScheduler.from_pretrained(tmp_path).config):
        swapped = scheduler_class.from_config(config)
        assert swapped.config.prediction_type == "sample"
        assert swapped.config.beta_schedule == "squaredcos_cap_v2"
        assert not getattr(swapped.config, "clip_sample", False)
        # the same cosine schedule as the reference sampler
        torch.testing.assert_close(swapped.alphas_cumprod, scheduler.alphas_cumprod, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(beta_schedule="linear"), "`beta_schedule` must be 'squaredcos_cap_v2'"),
        (dict(clip_sample=True), "`clip_sample` must be False"),
        (dict(prediction_type="epsilon"), "`prediction_type` must be 'sample'"),
    ],
)
def test_the_model_facts_have_one_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CompoDiffScheduler(**kwargs)
