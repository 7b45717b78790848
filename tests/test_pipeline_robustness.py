"""Hostile but fair inputs through the public pipeline calls: each ends in a clear error naming the argument (and the
shape or value, and what to do) or in the correct result, never in a crash deep inside a library or a silently wrong
(NaN, cut, multiplied) answer. CompoDiff and LinCIR on tiny components."""

import logging

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler
from test_lincir_pipeline import tiny_pipeline as tiny_lincir
from tiny_components import EMBED_DIM, TEXT_DIM, tiny_pipeline

from diffusers_cir import CompoDiffScheduler

pytestmark = pytest.mark.usefixtures("single_thread")

NAN, INF = float("nan"), float("inf")


def _picture(size=(40, 36), seed=0):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _with(value, index=0, shape=(1, EMBED_DIM)):
    tensor = torch.randn(*shape)
    tensor.view(-1)[index] = value
    return tensor


@pytest.fixture(scope="module")
def compodiff():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def lincir():
    return tiny_lincir(with_vision=True)


def _compose(pipe, **kwargs):
    kwargs.setdefault("num_inference_steps", 3)
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return pipe(**kwargs).image_embeds


def _generators(*seeds):
    return [torch.Generator().manual_seed(seed) for seed in seeds]


# ------------------------------------------------------------------------------------------------ CompoDiff: refused

PIXELS = (3, 32, 32)  # the tiny image encoder's input
COMPODIFF_REFUSED = {
    # a batch of masks cannot make queries of one image and one text
    "mask [3, H, W] for one query": (
        dict(image=_picture(), prompt="x", mask_image=torch.zeros(3, 32, 32)),
        r"`mask_image` is a tensor/array of shape \(3, 32, 32\), a batch of 3 masks \[B, H, W\], for 1 query: give one "
        r"mask per query, or one mask for all as \[H, W\] or \[1, H, W\]",
    ),
    "mask array [2, H, W] for three queries": (
        dict(prompt=["a", "b", "c"], mask_image=np.zeros((2, 32, 32), dtype=np.float32)),
        r"a batch of 2 masks \[B, H, W\], for 3 queries",
    ),
    "mask [2, 1, H, W] for one query": (
        dict(image=_picture(), prompt="x", mask_image=torch.zeros(2, 1, 32, 32)),
        r"`mask_image` is a tensor/array of shape \(2, 1, 32, 32\), a batch of 2 masks",
    ),
    "empty mask": (dict(prompt="x", mask_image=torch.zeros(0, 5)), r"`mask_image` must be \[H, W\] or \[1, H, W\] .* got \(0, 5\)"),
    # non-finite tensors, named
    "NaN image_embeds": (dict(image_embeds=_with(NAN), prompt="x"), r"`image_embeds` holds 1 NaN or infinite value"),
    "inf prompt_embeds": (
        dict(image_embeds=torch.randn(1, EMBED_DIM), prompt_embeds=_with(INF, 5, (1, 77, TEXT_DIM))),
        r"`prompt_embeds` holds 1 NaN or infinite value\(s\) \(shape \(1, 77, 32\)\)",
    ),
    "-inf negative_prompt_embeds": (
        dict(prompt="x", negative_prompt_embeds=_with(-INF, 3, (1, 77, TEXT_DIM))),
        r"`negative_prompt_embeds` holds 1 NaN or infinite",
    ),
    "NaN bfloat16 prompt_embeds": (
        dict(prompt_embeds=_with(NAN, 0, (1, 77, TEXT_DIM)).bfloat16()), r"`prompt_embeds` holds 1 NaN",
    ),
    "NaN mask": (dict(prompt="x", mask=_with(NAN, 7, (1, 64, 64))), r"`mask` holds 1 NaN"),
    "NaN latents": (dict(prompt="x", latents=_with(NAN, 2)), r"`latents` holds 1 NaN"),
    "NaN pixel tensor": (dict(image=_with(NAN, 9, (1, *PIXELS)), prompt="x"), r"`image` holds 1 NaN"),
    "inf pixel tensor in a list": (
        dict(image=[_picture(), _with(INF, 0, PIXELS)], prompt="x"), r"`image\[1\]` holds 1 NaN or infinite",
    ),
    "NaN float array image": (
        dict(image=np.full((20, 20, 3), NAN, dtype=np.float32), prompt="x"), r"`image` holds 1200 NaN or infinite",
    ),
    "NaN array mask_image": (
        dict(image=_picture(), prompt="x", mask_image=np.full((32, 32), NAN)), r"`mask_image\[0\]` holds 1024 NaN",
    ),
    # non-finite or absurd scalars, refused at the boundary
    "guidance_scale nan": (dict(prompt="x", guidance_scale=NAN), r"`guidance_scale` must be a finite number in \[-10000.0, 10000.0\], got nan"),
    "guidance_scale inf": (dict(prompt="x", guidance_scale=INF), r"`guidance_scale` must be a finite number"),
    "guidance_scale 1e30": (dict(prompt="x", guidance_scale=1e30), r"`guidance_scale` .* got 1e\+30"),
    "guidance_scale -1e5": (dict(prompt="x", guidance_scale=-1e5), r"`guidance_scale` .* got -100000.0"),
    "guidance_scale as text": (dict(prompt="x", guidance_scale="7.5"), r"`guidance_scale` must be a finite number .* \(str\)"),
    "image_guidance_scale nan": (dict(prompt="x", image_guidance_scale=NAN), r"`image_guidance_scale` must be a finite"),
    "image_guidance_scale 2e4": (dict(prompt="x", image_guidance_scale=2e4), r"`image_guidance_scale` .* got 20000.0"),
    "source_weight nan": (dict(image_embeds=torch.randn(1, EMBED_DIM), prompt="x", source_weight=NAN), r"`source_weight` must be a finite number in \[0.0, 1.0\], got nan"),
    "source_weight 1.5": (dict(prompt="x", source_weight=1.5), r"`source_weight` .* got 1.5"),
    "eta 100": (dict(prompt="x", eta=100.0), r"`eta` must be a finite number in \[0.0, 1.0\], got 100.0"),
    "eta -0.5": (dict(prompt="x", eta=-0.5), r"`eta` .* got -0.5"),
    "eta nan": (dict(prompt="x", eta=NAN), r"`eta` .* got nan"),
    "num_images_per_prompt True": (dict(prompt="x", num_images_per_prompt=True), r"`num_images_per_prompt` must be an integer >= 1, got True \(bool\)"),
    # pixels the image encoder cannot take
    "1-channel pixel tensor": (
        dict(image=torch.zeros(1, 1, 32, 32), prompt="x"),
        r"`image` is a tensor of shape \(1, 1, 32, 32\): pixel values must be \(3, 32, 32\) .* Pass PIL images or file paths",
    ),
    "4-channel pixel tensor": (dict(image=torch.zeros(1, 4, 32, 32), prompt="x"), r"`image` is a tensor of shape \(1, 4, 32, 32\)"),
    "wrong-size pixel tensor": (dict(image=torch.zeros(2, 3, 20, 20), prompt="x"), r"`image` is a tensor of shape \(2, 3, 20, 20\)"),
    "2-dim pixel tensor": (dict(image=torch.zeros(32, 32), prompt="x"), r"`image` is a tensor of shape \(32, 32\)"),
    "empty pixel tensor": (dict(image=torch.zeros(1, 3, 0, 0), prompt="x"), r"`image` is a tensor of shape \(1, 3, 0, 0\)"),
    "1-channel tensor in a list": (
        dict(image=[_picture(), torch.zeros(1, 32, 32)], prompt="x"),
        r"`image`\[1\] is a tensor of shape \(1, 32, 32\): pixel values of one image must be \(3, 32, 32\)",
    ),
    "0x0 image": (dict(image=PIL.Image.new("RGB", (0, 0)), prompt="x"), r"`image` is an empty image \(0x0 pixels\)"),
    "0x10 image in a list": (dict(image=[_picture(), PIL.Image.new("RGB", (0, 10))], prompt="x"), r"`image\[1\]` is an empty image \(0x10 pixels\)"),
    "0x0 array": (dict(image=np.zeros((0, 0, 3), dtype=np.uint8), prompt="x"), r"`image` is an empty image \(an array of shape \(0, 0, 3\)\)"),
    "an int among the images": (dict(image=[_picture(), 3], prompt="x"), r"`image`\[1\] is a int: an image is a PIL image"),
    # tensors with no data
    "meta image_embeds": (
        dict(image_embeds=torch.zeros(1, EMBED_DIM, device="meta"), prompt="x"),
        r"`image_embeds` is a tensor on the meta device \(shape \(1, 16\)\): it has a shape but no values",
    ),
    "meta prompt_embeds": (dict(prompt_embeds=torch.zeros(1, 77, TEXT_DIM, device="meta")), r"`prompt_embeds` is a tensor on the meta device"),
    "meta latents": (dict(prompt="x", latents=torch.zeros(1, EMBED_DIM, device="meta")), r"`latents` is a tensor on the meta device"),
    "meta mask": (dict(prompt="x", mask=torch.zeros(1, 64, 64, device="meta")), r"`mask` is a tensor on the meta device"),
    "meta pixel tensor": (dict(image=torch.zeros(1, *PIXELS, device="meta"), prompt="x"), r"`image` is a tensor on the meta device"),
    # callbacks that do not return what they were given
    "callback returning None": (
        dict(prompt="x", callback_on_step_end=lambda pipe, step, t, kwargs: None),
        r"`callback_on_step_end` \(<lambda>\) returned NoneType at step 0: it must return the dict it was given",
    ),
    "callback returning a list": (
        dict(prompt="x", callback_on_step_end=lambda pipe, step, t, kwargs: [kwargs["latents"]]),
        r"`callback_on_step_end` \(<lambda>\) returned list at step 0",
    ),
    "callback returning prompt_embeds": (
        dict(prompt="x", callback_on_step_end=lambda pipe, step, t, kwargs: {"prompt_embeds": torch.zeros(1)}),
        r"returned \['prompt_embeds'\] at step 0, which this pipeline does not take back: it may return \['latents'\]",
    ),
    "callback returning latents of another shape": (
        dict(prompt="x", callback_on_step_end=lambda pipe, step, t, kwargs: {"latents": torch.zeros(2, EMBED_DIM)}),
        r"returned `latents` of shape \(2, 16\) at step 0; they must keep the shape \(1, 16\)",
    ),
}


@pytest.mark.parametrize("kwargs, message", list(COMPODIFF_REFUSED.values()), ids=list(COMPODIFF_REFUSED))
def test_compodiff_refuses_by_name(compodiff, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _compose(compodiff, **kwargs)


def test_compodiff_refuses_them_with_another_scheduler_too():
    pipe = tiny_pipeline(with_encoders=False, scheduler=DDIMScheduler.from_config(CompoDiffScheduler().config))
    query = dict(image_embeds=torch.randn(1, EMBED_DIM), prompt_embeds=torch.randn(1, 77, TEXT_DIM),
                 negative_prompt_embeds=torch.randn(1, 77, TEXT_DIM))
    with pytest.raises(ValueError, match=r"`eta` must be a finite number in \[0.0, 1.0\], got 100.0"):
        _compose(pipe, **query, eta=100.0)
    with pytest.raises(ValueError, match=r"`callback_on_step_end` \(<lambda>\) returned NoneType at step 0"):
        _compose(pipe, **query, callback_on_step_end=lambda pipe, step, t, kwargs: None)
    with pytest.raises(ValueError, match=r"`eta` must be a finite number in \[0.0, 1.0\], got 3.0"):
        CompoDiffScheduler(eta=3.0)


def test_gallery_encoding_refuses_pixels_it_cannot_embed(compodiff):
    with pytest.raises(ValueError, match=r"`images` is a tensor of shape \(4, 1, 32, 32\)"):
        compodiff.encode_image(torch.zeros(4, 1, 32, 32))
    with pytest.raises(ValueError, match=r"`images\[1\]` holds 1 NaN"):
        compodiff.encode_image([_picture(), _with(NAN, 0, PIXELS)])
    with pytest.raises(ValueError, match=r"`images` is a tensor on the meta device"):
        compodiff.encode_image(torch.zeros(2, *PIXELS, device="meta"))
    with pytest.raises(ValueError, match=r"`images\[0\]` is an empty image \(0x0 pixels\)"):
        compodiff.encode_image([PIL.Image.new("RGB", (0, 0))])


# ------------------------------------------------------------------------------------------- CompoDiff: correct results


def test_a_mask_batch_matching_the_queries_is_one_mask_per_query(compodiff):
    masks = torch.zeros(3, 32, 32)
    masks[0, :, :16], masks[1, :16], masks[2, 8:24, 8:24] = 1, 1, 1
    image, prompts = _picture(), ["a", "b", "c"]
    batched = _compose(compodiff, image=image, prompt=prompts, mask_image=masks, generator=_generators(0, 1, 2))
    assert batched.shape == (3, EMBED_DIM)
    for index in range(3):
        alone = _compose(compodiff, image=image, prompt=prompts[index], mask_image=masks[index],
                         generator=_generators(index))
        torch.testing.assert_close(batched[index : index + 1], alone, atol=1e-5, rtol=0)
    shared = _compose(compodiff, image=image, prompt=["a", "b"], mask_image=masks[:1])  # [1, H, W]: one for all
    torch.testing.assert_close(shared, _compose(compodiff, image=image, prompt=["a", "b"], mask_image=masks[0]), atol=1e-6, rtol=0)


def test_finite_extreme_values_within_the_bounds_compose(compodiff):
    for kwargs in (dict(guidance_scale=1e4), dict(guidance_scale=-1e4, image_guidance_scale=0.0), dict(eta=0.0),
                   dict(eta=1.0), dict(source_weight=1.0)):
        out = _compose(compodiff, image_embeds=torch.randn(1, EMBED_DIM), prompt="x", **kwargs)
        assert torch.isfinite(out).all(), kwargs
    # source_weight 1 is the reference embedding itself
    reference = torch.randn(1, EMBED_DIM)
    torch.testing.assert_close(_compose(compodiff, image_embeds=reference, prompt="x", source_weight=1.0), reference)


def test_every_tensor_argument_is_checked_in_one_pass_per_call(compodiff, monkeypatch):
    """One finiteness check (one host synchronisation) per call, however many tensors and steps: not one per step."""
    import diffusers_cir.pipelines.inputs as inputs

    seen = []
    real = inputs.check_finite_tensors
    monkeypatch.setattr(inputs, "check_finite_tensors", lambda tensors: seen.append(sorted(tensors)) or real(tensors))
    _compose(compodiff, image=[_picture(), torch.randn(*PIXELS)], prompt=["a", "b"], mask=torch.zeros(1, 64, 64),
             latents=torch.randn(2, EMBED_DIM), negative_prompt_embeds=torch.randn(1, 77, TEXT_DIM), num_inference_steps=6)
    assert seen == [["image[1]", "latents", "mask", "negative_prompt_embeds"]]


def test_a_callback_that_returns_what_it_was_given_changes_nothing(compodiff):
    plain = _compose(compodiff, prompt="x")
    echoed = _compose(compodiff, prompt="x", callback_on_step_end=lambda pipe, step, t, kwargs: kwargs)
    emptied = _compose(compodiff, prompt="x", callback_on_step_end=lambda pipe, step, t, kwargs: {})
    torch.testing.assert_close(echoed, plain, atol=0, rtol=0)
    torch.testing.assert_close(emptied, plain, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------- truncated prompts


def _truncation_warnings(caplog):
    return [record.getMessage() for record in caplog.records if "tokens the CLIP text encoder reads" in record.getMessage()]


def test_compodiff_warns_once_per_call_how_many_texts_were_cut(compodiff, caplog):
    long = "a red wooden chair next to a blue table " * 40
    with caplog.at_level(logging.WARNING):
        _compose(compodiff, image_embeds=torch.randn(3, EMBED_DIM), prompt=[long, "short", long], negative_prompt=long)
    assert _truncation_warnings(caplog) == [
        "3 of the 4 texts (prompts and negative prompts) of this call are longer than the 77 tokens the CLIP text "
        "encoder reads (start and end tokens included) and were cut to the first 77 (the longest had 362): the "
        "words after the cut do not count. Shorten them."
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _compose(compodiff, prompt=["short", "a " * 75])  # 75 words + start and end: exactly 77 tokens, nothing cut
        compodiff.encode_prompt(long, do_classifier_free_guidance=False)
    assert len(_truncation_warnings(caplog)) == 1 and _truncation_warnings(caplog)[0].startswith("1 of the 1 texts")


def test_lincir_warns_once_per_call_how_many_prompts_were_cut(lincir, caplog):
    long = "is the same dress but in a darker shade of red " * 30
    with caplog.at_level(logging.WARNING):
        out = lincir(image_embeds=torch.randn(3, 24), prompt=[long, "is blue", (long, "has a collar")]).image_embeds
    assert out.shape == (3, 24) and torch.isfinite(out).all()
    warnings = _truncation_warnings(caplog)
    assert len(warnings) == 1 and warnings[0].startswith("3 of the 4 prompts of this call are longer than the 77 tokens")


# ------------------------------------------------------------------------------------------- LinCIR


LINCIR_REFUSED = {
    "NaN image_embeds": (dict(image_embeds=_with(NAN, 0, (2, 24)), prompt="x"), r"`image_embeds` holds 1 NaN or infinite value\(s\) \(shape \(2, 24\)\)"),
    "inf pseudo_tokens": (dict(pseudo_tokens=_with(INF, 4, (1, 32)), prompt="x"), r"`pseudo_tokens` holds 1 NaN or infinite"),
    "NaN pixel tensor": (dict(image=_with(NAN, 0, (1, 3, 30, 30)), prompt="x"), r"`image` holds 1 NaN"),
    "meta image_embeds": (dict(image_embeds=torch.zeros(1, 24, device="meta"), prompt="x"), r"`image_embeds` is a tensor on the meta device"),
    "meta pseudo_tokens": (dict(pseudo_tokens=torch.zeros(1, 32, device="meta"), prompt="x"), r"`pseudo_tokens` is a tensor on the meta device"),
    "meta prompt_input_ids": (
        dict(image_embeds=torch.randn(1, 24), prompt_input_ids=torch.zeros(1, 8, dtype=torch.long, device="meta")),
        r"`prompt_input_ids` is a tensor on the meta device",
    ),
    "1-channel pixel tensor": (dict(image=torch.zeros(1, 1, 30, 30), prompt="x"), r"`image` must be a tensor of shape \(N, 3, 30, 30\), got \(1, 1, 30, 30\)"),
    "wrong-size pixel tensor": (dict(image=torch.zeros(2, 3, 32, 32), prompt="x"), r"`image` must be a tensor of shape \(N, 3, 30, 30\), got \(2, 3, 32, 32\)"),
    "token ids past 77": (
        dict(image_embeds=torch.randn(1, 24), prompt_input_ids=torch.full((1, 100), 259)),
        r"`prompt_input_ids` holds 100 tokens per prompt, more than the 77 positions of the text encoder: tokenise "
        r"with truncation=True, max_length=77",
    ),
    "0x0 image": (dict(image=PIL.Image.new("RGB", (0, 0)), prompt="x"), r"`image\[0\]` is an empty image \(0x0 pixels\)"),
}


@pytest.mark.parametrize("kwargs, message", list(LINCIR_REFUSED.values()), ids=list(LINCIR_REFUSED))
def test_lincir_refuses_by_name(lincir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        lincir(**kwargs)


def test_lincir_gallery_encoding_refuses_pixels_it_cannot_embed(lincir):
    with pytest.raises(ValueError, match=r"`images` must be a tensor of shape \(N, 3, 30, 30\), got \(2, 1, 30, 30\)"):
        lincir.encode_image(torch.zeros(2, 1, 30, 30))
    pixels = torch.zeros(2, 3, 30, 30)
    pixels[0, 0, 0, 0] = pixels[1, 2, 3, 4] = NAN
    with pytest.raises(ValueError, match=r"`images` holds 2 NaN or infinite value\(s\) \(shape \(2, 3, 30, 30\)\)"):
        lincir.encode_image(pixels)
