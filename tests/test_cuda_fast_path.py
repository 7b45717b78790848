"""CUDA-only checks of the fast sampling path (skipped without a GPU)."""

import pytest
import torch
from tiny_components import EMBED_DIM, TEXT_DIM, tiny_transformer

from diffusers_cir import CompoDiffPipeline, CompoDiffScheduler

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _pipe(dtype=torch.float32):
    pipe = CompoDiffPipeline(transformer=tiny_transformer(), scheduler=CompoDiffScheduler()).to("cuda", dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _inputs(batch, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    return dict(
        image_embeds=torch.randn(batch, EMBED_DIM, generator=generator).to("cuda", dtype),
        prompt_embeds=torch.randn(batch, 77, TEXT_DIM, generator=generator).to("cuda", dtype),
        negative_prompt_embeds=torch.randn(1, 77, TEXT_DIM, generator=generator).to("cuda", dtype),
    )


@pytest.mark.parametrize("batch,samples", [(1, 1), (5, 2)])
def test_cuda_graph_equals_eager(batch, samples):
    pipe = _pipe()
    inputs = _inputs(batch)
    eager = pipe(**inputs, num_samples_per_query=samples, generator=torch.Generator("cuda").manual_seed(3)).image_embeds
    pipe.enable_cuda_graphs()
    first = pipe(**inputs, num_samples_per_query=samples, generator=torch.Generator("cuda").manual_seed(3)).image_embeds
    replay = pipe(**inputs, num_samples_per_query=samples, generator=torch.Generator("cuda").manual_seed(3)).image_embeds
    other = pipe(**inputs, num_samples_per_query=samples, generator=torch.Generator("cuda").manual_seed(4)).image_embeds
    assert torch.allclose(eager, first, atol=1e-5) and torch.allclose(first, replay, atol=1e-6)
    assert not torch.allclose(first, other)  # new noise is copied into the graph on every replay


def test_cuda_matches_cpu():
    pipe = CompoDiffPipeline(transformer=tiny_transformer(), scheduler=CompoDiffScheduler())
    pipe.set_progress_bar_config(disable=True)
    inputs = {k: v.cpu() for k, v in _inputs(3).items()}
    latents = torch.randn(3, EMBED_DIM)
    cpu = pipe(**inputs, latents=latents, num_inference_steps=2).image_embeds
    pipe.to("cuda")
    gpu = pipe(**{k: v.cuda() for k, v in inputs.items()}, latents=latents.cuda(), num_inference_steps=2).image_embeds
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-4)


def test_bf16_runs():
    pipe = _pipe(torch.bfloat16)
    out = pipe(**_inputs(4, torch.bfloat16), generator=torch.Generator("cuda").manual_seed(0)).image_embeds
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("per_query_negative", [False, True])
def test_fused_kernels_equal_the_pytorch_path_full_size(per_query_negative):
    """Full-size widths (16 self-attention heads, 8 cross-attention heads of 64, 77 text tokens), float32."""
    from diffusers_cir import CompoDiffTransformer

    torch.manual_seed(0)
    transformer = CompoDiffTransformer(num_layers=2).to("cuda").eval()
    pipe = CompoDiffPipeline(transformer=transformer, scheduler=CompoDiffScheduler())
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(1)
    batch = 6
    inputs = dict(
        image_embeds=torch.randn(batch, 768, generator=generator).cuda(),
        prompt_embeds=torch.randn(batch, 77, 1280, generator=generator).cuda(),
        negative_prompt_embeds=torch.randn(batch if per_query_negative else 1, 77, 1280, generator=generator).cuda(),
        mask=(torch.rand(batch, 64, 64, generator=generator) > 0.5).float().cuda(),
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    outputs = {}
    for fused in (False, True):
        transformer.set_fused_attention(fused)
        with torch.no_grad():
            context = transformer.encode_guidance_context(
                inputs["image_embeds"], inputs["prompt_embeds"], inputs["negative_prompt_embeds"], inputs["mask"])
        assert (context.self_attention_tables is not None) == fused
        outputs[fused] = pipe(**inputs, num_inference_steps=5, num_samples_per_query=2,
                              generator=torch.Generator("cuda").manual_seed(2)).image_embeds
    transformer.set_fused_attention(True)
    torch.testing.assert_close(outputs[True], outputs[False], rtol=1e-4, atol=1e-4)
