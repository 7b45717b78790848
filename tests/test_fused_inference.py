"""The fused attention of guided CompoDiff inference: its PyTorch statement equals the model's attention modules
(always), and the Triton kernels equal it (on CPU through Triton's interpreter, in a subprocess since the
interpreter is chosen when the kernels are defined; on CUDA in tests/test_cuda_fast_path.py)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusers_cir import CompoDiffTransformer
from diffusers_cir.models import fused_inference as fa

HERE = Path(__file__).resolve().parent


def small_transformer(heads=4, head_dim=16, cross_heads=2, seed=0):
    torch.manual_seed(seed)
    model = CompoDiffTransformer(embedding_dim=64, text_embedding_dim=32, num_layers=2, num_attention_heads=heads,
                                 attention_head_dim=head_dim, num_cross_attention_heads=cross_heads).eval()
    with torch.no_grad():  # non-trivial null keys, bias and gains
        for name, parameter in model.named_parameters():
            if "weight" in name and parameter.ndim == 1 or "null_kv" in name or "relative_position" in name:
                parameter.normal_(1.0 if parameter.ndim == 1 else 0.0, 0.5)
    return model


def guidance_inputs(batch=3, length=7, per_query_negative=False, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return dict(
        image_embeds=torch.randn(batch, 64, generator=generator),
        text_hidden_states=torch.randn(batch, length, 32, generator=generator),
        negative_text_hidden_states=torch.randn(batch if per_query_negative else 1, length, 32, generator=generator),
        mask=(torch.rand(batch, 64, 64, generator=generator) > 0.5).float(),
    )


@torch.no_grad()
def test_self_attention_statement_equals_the_model_module():
    model = small_transformer()
    attention = model.blocks[0].self_attn
    hidden = torch.randn(9, 2, 64)
    cos, sin, bias = model._rotary_and_bias(2, hidden.device, torch.float32)
    expected = attention(hidden, (cos, sin), bias)
    normed = attention.norm(hidden)
    tables = fa.self_attention_tables(cos, sin, bias, 16)
    out = fa.multi_query_self_attention_reference(
        attention.to_q(normed), attention.to_kv(normed), attention.null_kv, *tables, attention.cosine_sim_scale
    )
    torch.testing.assert_close(attention.out_norm(attention.to_out(out)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_query_negative", [False, True])
@pytest.mark.parametrize("samples", [1, 3])
@torch.no_grad()
def test_guidance_cross_attention_statement_equals_the_factored_module(per_query_negative, samples):
    model = small_transformer()
    inputs = guidance_inputs(per_query_negative=per_query_negative)
    factored = model.encode_guidance_context(**inputs, fused=False).repeat_interleave(samples)
    fused = model.encode_guidance_context(**inputs, fused=True).repeat_interleave(samples)
    assert isinstance(fused.cross_attention_kv[0], fa_kv_type()) and fused.batch_size == factored.batch_size
    attention = model.blocks[1].cross_attn
    hidden = torch.randn(factored.batch_size, 2, 64)
    expected = attention(hidden, factored.cross_attention_kv[1])
    layer = fused.cross_attention_kv[1]
    out = fa.guidance_cross_attention_reference(
        attention.to_q(attention.norm(hidden)), layer.conditional_kv, layer.negative_kv, attention.null_kv,
        attention.heads, layer.samples,
    )
    torch.testing.assert_close(attention.out_norm(attention.to_out(out)), expected, rtol=1e-5, atol=1e-5)


def fa_kv_type():
    from diffusers_cir.models.compodiff_transformer import FusedGuidanceKeyValues

    return FusedGuidanceKeyValues


def test_fused_context_is_chosen_only_where_the_kernels_run():
    model = small_transformer()
    inputs = guidance_inputs()
    with torch.no_grad():
        context = model.encode_guidance_context(**inputs)
    expected = fa.fused_attention_available("cpu")  # False on CPU unless Triton's interpreter is on
    assert (context.self_attention_tables is not None) == expected
    model.set_fused_attention(False)
    with torch.no_grad():
        assert model.encode_guidance_context(**inputs).self_attention_tables is None
    # training (autograd on) always takes the PyTorch path
    model.set_fused_attention(True)
    assert model.encode_guidance_context(**inputs).self_attention_tables is None
    assert not fa.fused_attention_supports(heads=3, head_dim=16, tokens=2)
    assert not fa.fused_attention_supports(heads=4, head_dim=24, tokens=2)
    assert not fa.fused_attention_supports(heads=4, head_dim=16, tokens=3)


@torch.no_grad()
def test_residual_norm_and_swiglu_statements_equal_the_block_modules():
    model = small_transformer()
    block, following = model.blocks[0], model.blocks[1]
    hidden = torch.randn(9, 2, 64)
    normed = block.cross_attn.norm(hidden)
    update = block.cross_attn.to_out(torch.randn(9, 2, 32))
    expected_hidden = block.cross_attn.out_norm(update) + hidden
    new_hidden, new_normed = fa.residual_norm_reference(
        update, hidden, block.cross_attn.out_norm.weight, block.ff.norm.weight, 1e-5, 1e-5)
    torch.testing.assert_close(new_hidden, expected_hidden, rtol=0, atol=0)
    torch.testing.assert_close(new_normed, block.ff.norm(expected_hidden), rtol=0, atol=0)
    feed_forward = block.ff(normed) + hidden  # the module normalises its input itself
    manual = block.ff.proj_out(fa.swiglu_reference(block.ff.proj_in(block.ff.norm(normed)))) + hidden
    torch.testing.assert_close(manual, feed_forward, rtol=1e-6, atol=1e-6)
    new_hidden, new_normed = fa.residual_norm_reference(manual - hidden, hidden, None, following.self_attn.norm.weight, 0, 1e-5)
    torch.testing.assert_close(new_normed, following.self_attn.norm(feed_forward), rtol=1e-6, atol=1e-6)


def test_fused_context_refuses_autograd():
    model = small_transformer()
    with torch.no_grad():
        context = model.encode_guidance_context(**guidance_inputs(), fused=True)
    with pytest.raises(ValueError, match="no backward pass"):
        model(torch.randn(9, 64), 10, context=context)


def test_cross_attention_kernel_rejects_mismatched_shapes():
    query = torch.randn(9, 2, 32)
    with pytest.raises(ValueError, match="conditional_kv"):
        fa.guidance_cross_attention(query, torch.randn(3, 8, 64), torch.randn(1, 7, 64), torch.randn(2, 16), 2)
    with pytest.raises(ValueError, match="3 x 2 x 1 rows"):
        fa.guidance_cross_attention(query, torch.randn(2, 9, 64), torch.randn(1, 7, 64), torch.randn(2, 16), 2)


INTERPRETER_CHECK = r"""
import torch
from diffusers_cir.models import fused_inference as fa
from test_fused_inference import guidance_inputs, small_transformer

assert fa.fused_attention_available("cpu")
model = small_transformer(heads=8, head_dim=16, cross_heads=4)
worst = {}
with torch.no_grad():
    for per_query in (False, True):
        inputs = guidance_inputs(batch=3, length=13, per_query_negative=per_query)
        for samples in (1, 7):  # 7: the shared-negative kernel spans several programs, the last one partial
            context = model.encode_guidance_context(**inputs, fused=True).repeat_interleave(samples)
            layer = context.cross_attention_kv[0]
            attention = model.blocks[0].cross_attn
            query = attention.to_q(attention.norm(torch.randn(context.batch_size, 2, 64)))
            args = (query, layer.conditional_kv, layer.negative_kv, attention.null_kv, attention.heads, samples)
            kernel, statement = fa.guidance_cross_attention(*args), fa.guidance_cross_attention_reference(*args)
            worst["cross"] = max(worst.get("cross", 0), ((kernel - statement).abs().max() / statement.abs().max()).item())
    attention = model.blocks[1].self_attn
    hidden = attention.norm(torch.randn(7, 2, 64))
    tables = context.self_attention_tables
    args = (attention.to_q(hidden), attention.to_kv(hidden), attention.null_kv, *tables, attention.cosine_sim_scale)
    kernel, statement = fa.multi_query_self_attention(*args), fa.multi_query_self_attention_reference(*args)
    worst["self"] = ((kernel - statement).abs().max() / statement.abs().max()).item()
    update, residual = torch.randn(5, 2, 64), torch.randn(5, 2, 64)
    gains = (model.blocks[0].cross_attn.out_norm.weight, model.blocks[0].ff.norm.weight)
    for out_gain in (gains[0], None):
        for kernel, statement in zip(fa.residual_norm(update, residual, out_gain, gains[1], 1e-5, 1e-3),
                                     fa.residual_norm_reference(update, residual, out_gain, gains[1], 1e-5, 1e-3)):
            worst["residual_norm"] = max(worst.get("residual_norm", 0), (kernel - statement).abs().max().item())
    hidden = torch.randn(3, 2, 2 * 1500)  # more than one block of columns, and a partial one
    worst["swiglu"] = (fa.swiglu(hidden) - fa.swiglu_reference(hidden)).abs().max().item()
    # the whole model: fused context and kernels against the factored PyTorch path
    inputs = guidance_inputs(batch=2, length=13)
    x = torch.randn(6, 64)
    fused = model(x, 400, context=model.encode_guidance_context(**inputs, fused=True)).predicted_image_embedding
    plain = model(x, 400, context=model.encode_guidance_context(**inputs, fused=False)).predicted_image_embedding
    worst["model"] = ((fused - plain).abs().max() / plain.abs().max()).item()
    # without the stacked query/key-value weight (as when an unfused LoRA adapter wraps the projections)
    context = model.encode_guidance_context(**inputs, fused=True)
    assert all(layer.self_attention_qkv_weight is not None for layer in context.cross_attention_kv)
    for layer in context.cross_attention_kv:
        layer.self_attention_qkv_weight = None
    separate = model(x, 400, context=context).predicted_image_embedding
    worst["model_separate_projections"] = ((separate - plain).abs().max() / plain.abs().max()).item()
print(worst)
assert all(value < 2e-6 for value in worst.values()), worst
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_kernels_equal_the_statement_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", INTERPRETER_CHECK], capture_output=True, text=True, env=env,
                            timeout=300, cwd=HERE)
    assert result.returncode == 0, result.stdout + result.stderr
