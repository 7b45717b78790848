import copy

import pytest
import torch
from torch import nn

from diffusers_cir import (
    CompoDiffPipeline,
    CompoDiffScheduler,
    CompoDiffTransformer,
    Int8DynamicLinear,
    quantize_for_cpu,
)
from diffusers_cir.models import cpu_int8

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = dict(embedding_dim=32, text_embedding_dim=48, num_layers=2, num_attention_heads=2, attention_head_dim=16)


def by_hand(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """What an int8 layer computes, in float64 from the definitions: per-output-channel weight scales, per-row
    activation scales, exact integer sums."""
    weight = linear.weight.double()
    weight_scale = weight.abs().amax(dim=1) / 127
    weight_q = torch.round(weight / weight_scale[:, None])
    rows = x.reshape(-1, x.shape[-1]).double()
    row_scale = rows.abs().amax(dim=1, keepdim=True) / 127
    rows_q = torch.round(rows / row_scale)
    y = (rows_q @ weight_q.T) * row_scale * weight_scale + linear.bias.double()
    return y.reshape(*x.shape[:-1], linear.out_features)


@pytest.fixture
def restore_backend():
    saved = cpu_int8._BACKEND
    yield
    cpu_int8._BACKEND = saved


@pytest.mark.parametrize("backend", [None, "int_mm", "float"])
@torch.no_grad()
def test_int8_layer_computes_the_quantised_product_on_every_backend(backend, restore_backend):
    if backend is not None:
        cpu_int8._BACKEND = backend
    linear = nn.Linear(96, 40)
    x = torch.randn(2, 5, 96)
    x[0, 0] *= 50  # one loud row: per-row scales keep the others accurate
    layer = Int8DynamicLinear.from_linear(linear)
    output = layer(x)
    assert output.shape == (2, 5, 40) and output.dtype == torch.float32
    torch.testing.assert_close(output.double(), by_hand(linear, x), rtol=1e-5, atol=1e-5)
    assert cpu_int8.cosine_to(linear(x), output).min() > 0.999


def test_the_probed_backend_gives_exact_integer_sums():
    assert cpu_int8.int8_backend() in ("onednn", "int_mm", "float")
    rows = torch.full((3, 512), 127.0)
    layer = Int8DynamicLinear(512, 8, bias=False)
    layer.weight_int8.fill_(127)
    assert torch.equal(layer.integer_product(rows), torch.full((3, 8), 127.0 * 127 * 512))


@torch.no_grad()
def test_copies_repack_and_casts_keep_the_scales_in_float32():
    linear = nn.Linear(32, 16)
    layer = Int8DynamicLinear.from_linear(linear)
    x = torch.randn(4, 32)
    expected = layer(x)
    torch.testing.assert_close(copy.deepcopy(layer)(x), expected)
    layer.to(torch.bfloat16)
    assert layer.weight_int8.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.float32
    low = layer(x.bfloat16())
    assert low.dtype == torch.bfloat16
    assert cpu_int8.cosine_to(expected, low).min() > 0.999


def test_int8_layers_refuse_gradients_and_saving():
    layer = Int8DynamicLinear.from_linear(nn.Linear(8, 4))
    with pytest.raises(RuntimeError, match="no backward pass"):
        layer(torch.randn(2, 8, requires_grad=True))
    with pytest.raises(RuntimeError, match="quantize_for_cpu"):
        layer.state_dict()


def test_quantize_for_cpu_keeps_the_condition_layers_of_compodiff_in_float32():
    transformer = CompoDiffTransformer(**TINY).eval()
    linear_names = {name for name, module in transformer.named_modules() if type(module) is nn.Linear}
    names = quantize_for_cpu(transformer)
    kept = linear_names - set(names)
    assert names and all(name.startswith("blocks.") for name in names)
    assert "proj_out" in kept and "text_proj" in kept and any(name.startswith("time_embedding") for name in kept)
    assert all(isinstance(transformer.get_submodule(name), Int8DynamicLinear) for name in names)
    assert quantize_for_cpu(transformer) == []  # already quantised layers are skipped


def test_include_and_exclude_patterns_choose_the_layers():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)))
    assert quantize_for_cpu(copy.deepcopy(model), include=["2.*"]) == ["2.0", "2.1"]
    assert quantize_for_cpu(copy.deepcopy(model), exclude=["2.1"]) == ["0", "2.0"]


def test_quantize_for_cpu_names_bad_arguments():
    with pytest.raises(ValueError, match="weights"):
        quantize_for_cpu(nn.Linear(4, 4), weights="int4")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        quantize_for_cpu(torch.zeros(3))
    with torch.device("meta"):
        on_meta = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="meta device"):
        quantize_for_cpu(on_meta)


@torch.no_grad()
def test_an_int8_denoiser_composes_close_to_float32():
    transformer = CompoDiffTransformer(**TINY).eval()
    float_pipe = CompoDiffPipeline(transformer=transformer, scheduler=CompoDiffScheduler())
    int8_pipe = CompoDiffPipeline(transformer=copy.deepcopy(transformer), scheduler=CompoDiffScheduler())
    quantize_for_cpu(int8_pipe.transformer)
    for pipe in (float_pipe, int8_pipe):
        pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(1)
    inputs = dict(image_embeds=torch.randn(4, 32, generator=generator),
                  prompt_embeds=torch.randn(4, 77, 48, generator=generator),
                  negative_prompt_embeds=torch.randn(1, 77, 48, generator=generator),
                  latents=torch.randn(4, 32, generator=generator), num_inference_steps=4)
    expected = float_pipe(**inputs, generator=torch.Generator().manual_seed(2)).image_embeds
    output = int8_pipe(**inputs, generator=torch.Generator().manual_seed(2)).image_embeds
    assert not torch.equal(output, expected)  # the int8 layers did run
    assert cpu_int8.cosine_to(expected, output).min() > 0.98
