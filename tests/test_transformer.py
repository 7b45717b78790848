import pytest
import torch
from tiny_components import EMBED_DIM, TEXT_DIM, tiny_transformer

from diffusers_cir.models.compodiff_transformer import relative_position_bucket


def _inputs(batch=3):
    return dict(
        hidden_states=torch.randn(batch, EMBED_DIM),
        timestep=torch.randint(0, 1000, (batch,)),
        image_embeds=torch.randn(batch, EMBED_DIM),
        text_hidden_states=torch.randn(batch, 77, TEXT_DIM),
        mask=(torch.rand(batch, 64, 64) > 0.5).float(),
    )


def test_shapes_and_layouts():
    model = tiny_transformer()
    inputs = _inputs()
    with torch.no_grad():
        flat = model(**inputs).predicted_image_embedding
        inputs3 = dict(inputs, hidden_states=inputs["hidden_states"][:, None], image_embeds=inputs["image_embeds"][:, None])
        nested = model(**inputs3).predicted_image_embedding
        (as_tuple,) = model(**inputs, return_dict=False)
    assert flat.shape == (3, EMBED_DIM)
    assert nested.shape == (3, 1, EMBED_DIM)
    assert torch.allclose(flat, nested[:, 0], atol=1e-6)
    assert torch.equal(flat, as_tuple)


def test_every_condition_matters_and_rows_are_independent():
    model = tiny_transformer()
    inputs = _inputs()
    with torch.no_grad():
        base = model(**inputs).predicted_image_embedding
        for name in ("timestep", "image_embeds", "text_hidden_states", "mask", "hidden_states"):
            changed = dict(inputs)
            value = inputs[name]
            # a random change: a constant shift of x_t is invisible by design (every LayerNorm removes it)
            changed[name] = (value + torch.randn_like(value.float()).to(value.dtype) * 5 + 7) if name != "mask" else 1 - value
            if name == "timestep":
                changed[name] = (value + 37) % 1000
            out = model(**changed).predicted_image_embedding
            assert not torch.allclose(out, base, atol=1e-5), name
        single = model(**{k: v[1:2] for k, v in inputs.items()}).predicted_image_embedding
    assert torch.allclose(single, base[1:2], atol=1e-5)


def test_precomputed_context_equals_direct_call():
    model = tiny_transformer()
    inputs = _inputs()
    with torch.no_grad():
        direct = model(**inputs).predicted_image_embedding
        context = model.encode_context(inputs["image_embeds"], inputs["text_hidden_states"], inputs["mask"])
        reused = model(inputs["hidden_states"], inputs["timestep"], context=context).predicted_image_embedding
    assert torch.equal(direct, reused)
    with pytest.raises(ValueError, match="context"):
        model(torch.randn(2, EMBED_DIM), 5, context=context)


def test_missing_mask_is_zero_mask():
    model = tiny_transformer()
    inputs = _inputs()
    with torch.no_grad():
        a = model(**dict(inputs, mask=None)).predicted_image_embedding
        b = model(**dict(inputs, mask=torch.zeros(3, 64, 64))).predicted_image_embedding
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(hidden_states=torch.randn(3, EMBED_DIM + 1)), "hidden_states"),
        (dict(image_embeds=torch.randn(2, EMBED_DIM)), "text_hidden_states"),
        (dict(text_hidden_states=torch.randn(3, 77, TEXT_DIM + 2)), "text_hidden_states"),
        (dict(mask=torch.zeros(3, 32, 32)), "mask"),
        (dict(timestep=torch.zeros(2, dtype=torch.long)), "timestep"),
    ],
)
def test_bad_inputs(override, message):
    with pytest.raises(ValueError, match=message):
        tiny_transformer()(**dict(_inputs(), **override))


def test_gradient_checkpointing_gives_the_same_gradients():
    inputs = _inputs()
    grads = []
    for checkpointing in (False, True):
        model = tiny_transformer().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        model(**inputs).predicted_image_embedding.square().mean().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name
    assert "rotary_frequencies" not in grads[0]


def test_relative_position_buckets():
    relative = torch.tensor([-200, -100, -20, -16, -15, -1, 0, 1, 5])
    buckets = relative_position_bucket(relative, 32, 128)
    # keys after the query (positive) share bucket 0; exact buckets up to 15; log buckets beyond; capped at 31
    assert buckets.tolist()[4:] == [15, 1, 0, 0, 0]
    assert buckets[3] == 16 and buckets[0] == 31 and 16 < buckets[2] < buckets[1] <= 31


def test_half_precision_forward_uses_its_own_eps():
    model = tiny_transformer().to(torch.bfloat16)
    inputs = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in _inputs().items()}
    with torch.no_grad():
        out = model(**inputs).predicted_image_embedding
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert model.norm_out.half_precision_eps == 1e-3


def test_float64_is_a_more_precise_float32_not_a_half_precision():
    """The larger LayerNorm epsilon is for bf16/fp16 only: float64 tracks float32 (and the softmax stays in float64)."""
    model = tiny_transformer()
    inputs = _inputs()
    negative = torch.randn(1, 77, TEXT_DIM)
    with torch.no_grad():
        single = model(**inputs).predicted_image_embedding
        context = model.encode_guidance_context(
            inputs["image_embeds"], inputs["text_hidden_states"], negative, inputs["mask"], fused=False
        )
        guided = model(torch.cat([inputs["hidden_states"]] * 3), 500, context=context).predicted_image_embedding
        model.double()
        double_inputs = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}
        single64 = model(**double_inputs).predicted_image_embedding
        context = model.encode_guidance_context(
            double_inputs["image_embeds"], double_inputs["text_hidden_states"], negative.double(), double_inputs["mask"],
            fused=False,
        )
        guided64 = model(torch.cat([double_inputs["hidden_states"]] * 3), 500, context=context).predicted_image_embedding
    assert single64.dtype == guided64.dtype == torch.float64
    assert torch.allclose(single64.float(), single, atol=1e-5)
    assert torch.allclose(guided64.float(), guided, atol=1e-5)


def _count_linear_forwards(monkeypatch):
    calls = []
    original = torch.nn.Linear.forward

    def counted(self, hidden_states):
        calls.append(tuple(hidden_states.shape))
        return original(self, hidden_states)

    monkeypatch.setattr(torch.nn.Linear, "forward", counted)
    return calls


def test_small_row_projection_takes_the_weight_major_order_only_where_it_may(monkeypatch):
    from diffusers_cir.models import compodiff_transformer as module

    calls = _count_linear_forwards(monkeypatch)
    layer = torch.nn.Linear(48, 96)
    rows = torch.randn(3, 2, 48)
    expected = torch.nn.functional.linear(rows, layer.weight, layer.bias)

    monkeypatch.setattr(module, "_cpu_threads", lambda: 2)
    with torch.no_grad():
        out = module.project(layer, rows)
    assert calls == []  # computed as (W @ x.T).T, not through the module
    assert out.shape == (3, 2, 96) and out.is_contiguous()
    assert torch.allclose(out, expected, atol=1e-6)

    many = torch.randn(module.SMALL_ROW_LINEAR_MAX_ROWS + 1, 48)
    with torch.no_grad():
        module.project(layer, many)  # too many rows: the usual order
        module.project(layer.double(), rows.double())  # not float32
        layer.float()
    assert calls == [tuple(many.shape), (3, 2, 48)]
    calls.clear()

    module.project(layer, rows)  # grad enabled (training): through the module
    with torch.no_grad():
        handle = layer.register_forward_hook(lambda *args: None)
        module.project(layer, rows)  # a hooked layer keeps its hooks
        handle.remove()
        monkeypatch.setattr(module, "_cpu_threads", lambda: 1)
        module.project(layer, rows)  # one thread: nothing to split
    assert len(calls) == 3


def test_small_row_projection_changes_no_output(monkeypatch):
    """The whole denoiser (direct call and guided context) with both projection orders."""
    from diffusers_cir.models import compodiff_transformer as module

    model = tiny_transformer()
    inputs = _inputs(2)
    negative = torch.randn(1, 77, TEXT_DIM)
    calls = _count_linear_forwards(monkeypatch)
    outputs, module_calls = {}, {}
    for threads in (1, 2):
        calls.clear()
        monkeypatch.setattr(module, "_cpu_threads", lambda threads=threads: threads)
        with torch.no_grad():
            direct = model(**inputs).predicted_image_embedding
            context = model.encode_guidance_context(
                inputs["image_embeds"], inputs["text_hidden_states"], negative, inputs["mask"], fused=False
            )
            guided = model(torch.cat([inputs["hidden_states"]] * 3), 500, context=context).predicted_image_embedding
        outputs[threads] = (direct, guided)
        module_calls[threads] = len(calls)
    # with one thread every projection goes through its module; with two only the contexts' many-row ones do
    assert 0 < module_calls[2] < module_calls[1] // 4
    for one, two in zip(outputs[1], outputs[2]):
        assert torch.allclose(one, two, atol=1e-5, rtol=0)


def test_compiled_blocks_equal_eager_on_cpu(monkeypatch):
    """The CPU low-latency mode: `compile_repeated_blocks` (regional compilation), the weight-major small
    projections traced into the graph with no graph break on the thread count."""
    import copy

    import torch._dynamo

    from diffusers_cir.models import compodiff_transformer as module

    model = tiny_transformer()
    inputs = _inputs(1)
    negative = torch.randn(1, 77, TEXT_DIM)
    with torch.no_grad():
        context = model.encode_guidance_context(
            inputs["image_embeds"], inputs["text_hidden_states"], negative, inputs["mask"], fused=False
        )
        x = torch.cat([inputs["hidden_states"]] * 3)
        block_inputs = (x.new_zeros(3, 2, EMBED_DIM), *model._rotary_and_bias(2, x.device, x.dtype), context.cross_attention_kv[0])
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model.blocks[0])(*block_inputs)  # the real thread-count check
        assert explanation.graph_break_count == 0, explanation.break_reasons

        monkeypatch.setattr(module, "_cpu_threads", torch.compiler.assume_constant_result(lambda: 2))
        eager = model(x, 500, context=context).predicted_image_embedding
        compiled_model = copy.deepcopy(model)
        compiled_model.compile_repeated_blocks(dynamic=False)
        compiled = compiled_model(x, 500, context=context).predicted_image_embedding
    assert torch.allclose(compiled, eager, atol=1e-5, rtol=0)


def test_precomputed_time_tokens_equal_the_timestep_path():
    """`embed_timesteps` embeds several steps in one call; `forward(timestep_embeds=...)` uses them instead."""
    model = tiny_transformer()
    inputs = _inputs(3)
    timesteps = torch.tensor([999, 500, 3])
    with torch.no_grad():
        tokens = model.embed_timesteps(timesteps)
        assert tokens.shape == (3, EMBED_DIM)
        for index, t in enumerate(timesteps.tolist()):
            direct = model(**dict(inputs, timestep=t)).predicted_image_embedding
            given = model(**dict(inputs, timestep=None), timestep_embeds=tokens[index : index + 1]).predicted_image_embedding
            assert torch.allclose(direct, given, atol=1e-6)
        per_row = model(**dict(inputs, timestep=timesteps)).predicted_image_embedding
        assert torch.allclose(per_row, model(**inputs, timestep_embeds=tokens).predicted_image_embedding, atol=1e-6)
        assert not torch.allclose(per_row, model(**dict(inputs, timestep=timesteps.flip(0))).predicted_image_embedding)
    with pytest.raises(ValueError, match=r"`timestep_embeds` must have shape \[1 or 3, 16\], got \(2, 16\)"):
        model(**inputs, timestep_embeds=tokens[:2])
    with pytest.raises(ValueError, match=r"`timestep` must have shape \[n\], got \(\)"):
        model.embed_timesteps(torch.tensor(5))


def test_dtype_cast_drops_only_diffusers_empty_float32_list_warning():
    """diffusers 0.42 warns "... should be kept in float32: []" on every cast; ours drop exactly that record."""
    import logging

    from diffusers import ModelMixin

    from diffusers_cir.models._dtype_cast import QuietDtypeCastMixin

    class Plain(ModelMixin):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)

    class Listing(QuietDtypeCastMixin, Plain):
        _keep_in_fp32_modules = ["linear"]

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffusers.models.modeling_utils")
    logger.addHandler(handler)
    try:
        def warnings_of(model):
            records.clear()
            model.to(torch.bfloat16)
            return [r.getMessage() for r in records if "should be kept in float32" in r.getMessage()]

        assert warnings_of(tiny_transformer()) == []
        from diffusers_cir import TextualInversionProjection

        assert warnings_of(TextualInversionProjection(8, 16, 8)) == []
        assert len(warnings_of(Plain())) == 1  # the filter is gone after our cast: diffusers' own models still warn
        assert "float32: ['linear']" in warnings_of(Listing())[0]  # a model that lists modules keeps its warning
    finally:
        logger.removeHandler(handler)
