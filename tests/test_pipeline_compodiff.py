import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from PIL import Image
from tiny_components import EMBED_DIM, TEXT_DIM, tiny_pipeline

from diffusers_cir import CompoDiffPipeline, CompoDiffScheduler


def _images(count, seed=0, size=(40, 48)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)) for _ in range(count)]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def test_image_and_text_query_is_deterministic(pipe):
    images = _images(2)
    one = pipe(image=images, prompt=["make it red", "as a sketch"], generator=_gen(1)).image_embeds
    two = pipe(image=images, prompt=["make it red", "as a sketch"], generator=_gen(1)).image_embeds
    three = pipe(image=images, prompt=["make it red", "as a sketch"], generator=_gen(2)).image_embeds
    assert one.shape == (2, EMBED_DIM)
    assert torch.equal(one, two)
    assert not torch.allclose(one, three)


def test_images_equal_their_embeddings(pipe):
    images = _images(2)
    embeds = pipe.encode_image(images)
    assert embeds.shape == (2, EMBED_DIM)
    from_images = pipe(image=images, prompt=["a", "b"], generator=_gen()).image_embeds
    from_embeds = pipe(image_embeds=embeds, prompt=["a", "b"], generator=_gen()).image_embeds
    assert torch.allclose(from_images, from_embeds, atol=1e-6)


def test_prompts_equal_their_embeddings(pipe):
    image_embeds = torch.randn(2, EMBED_DIM)
    texts = ["make it red", "as a sketch"]
    a = pipe(image_embeds=image_embeds, prompt=texts, negative_prompt="blurry", generator=_gen()).image_embeds
    prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(texts, negative_prompt="blurry")
    assert prompt_embeds.shape == (2, 77, TEXT_DIM) and negative_prompt_embeds.shape == (1, 77, TEXT_DIM)
    b = pipe(
        image_embeds=image_embeds, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
        generator=_gen(),
    ).image_embeds
    assert torch.allclose(a, b, atol=1e-6)
    # the prompts and the negative text share one text-tower call
    negative = pipe.encode_prompt("blurry", do_classifier_free_guidance=False)
    assert negative[1] is None
    torch.testing.assert_close(negative[0], negative_prompt_embeds, atol=1e-6, rtol=0)
    calls = []
    handle = pipe.text_encoder.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        pipe(image_embeds=image_embeds, prompt=texts, negative_prompt="blurry", generator=_gen())
        pipe(image_embeds=image_embeds, prompt=texts, negative_prompt_embeds=negative[0], generator=_gen())
    finally:
        handle.remove()
    assert calls == [3, 2]
    # the default negative text is the empty string
    c = pipe(image_embeds=image_embeds, prompt=texts, generator=_gen()).image_embeds
    d = pipe(image_embeds=image_embeds, prompt=texts, negative_prompt="", generator=_gen()).image_embeds
    assert torch.equal(c, d)
    assert not torch.allclose(a, c)


def test_encode_prompt_follows_diffusers_and_its_old_result_still_works(pipe):
    """`encode_prompt` returns `(prompt_embeds, negative_prompt_embeds)` as diffusers pipelines do (it returned the
    prompt tensor alone): repeated per image, `None` without guidance; the tuple passed where the old tensor went
    still composes the same query, with a deprecation warning."""
    texts = ["make it red", "as a sketch"]
    prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(texts, num_images_per_prompt=3, negative_prompt=["a", "b"])
    once, negatives_once = pipe.encode_prompt(texts, negative_prompt=["a", "b"])
    torch.testing.assert_close(prompt_embeds, once.repeat_interleave(3, dim=0))
    torch.testing.assert_close(negative_prompt_embeds, negatives_once.repeat_interleave(3, dim=0))
    assert pipe.encode_prompt(texts, do_classifier_free_guidance=False)[1] is None
    image_embeds = torch.randn(2, EMBED_DIM)
    expected = pipe(image_embeds=image_embeds, prompt=texts, negative_prompt="", generator=_gen()).image_embeds
    old_negative = pipe.encode_prompt([""])  # the README's old idiom: encode the negative text once
    with pytest.warns(FutureWarning, match="encode_prompt` returns `\\(prompt_embeds, negative_prompt_embeds\\)"):
        got = pipe(image_embeds=image_embeds, prompt=texts, negative_prompt_embeds=old_negative, generator=_gen())
    torch.testing.assert_close(got.image_embeds, expected, atol=1e-6, rtol=0)
    with pytest.warns(FutureWarning):
        got = pipe(image_embeds=image_embeds, prompt_embeds=pipe.encode_prompt(texts), generator=_gen())
    torch.testing.assert_close(got.image_embeds, expected, atol=1e-6, rtol=0)


def test_text_only_uses_a_zero_image(pipe):
    a = pipe(prompt=["a red cup"], generator=_gen()).image_embeds
    b = pipe(image_embeds=torch.zeros(1, EMBED_DIM), prompt=["a red cup"], generator=_gen()).image_embeds
    assert torch.equal(a, b)
    # source weight has nothing to mix without an image
    c = pipe(prompt=["a red cup"], source_weight=0.5, generator=_gen()).image_embeds
    assert torch.equal(a, c)


def test_guidance_formula(pipe):
    """With one step the result is exactly the guided x0 of the three branches."""
    transformer = pipe.transformer
    image_embeds = torch.randn(2, EMBED_DIM)
    prompt_embeds, negative = torch.randn(2, 77, TEXT_DIM), torch.randn(2, 77, TEXT_DIM)
    latents = torch.randn(2, EMBED_DIM)
    out = pipe(
        image_embeds=image_embeds, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative, latents=latents,
        num_inference_steps=2, guidance_scale=3.0, image_guidance_scale=0.5,
    ).image_embeds
    t = int(pipe.scheduler.timesteps[0])
    mask = torch.zeros(2, 64, 64)
    with torch.no_grad():
        c = transformer(latents, t, image_embeds, prompt_embeds, mask).predicted_image_embedding
        n = transformer(latents, t, image_embeds, negative, mask).predicted_image_embedding
        u = transformer(latents, t, torch.zeros_like(image_embeds), negative, mask).predicted_image_embedding
    assert torch.allclose(out, u + (c - n) * 3.0 + (n - u) * 0.5, atol=1e-5)


def test_samples_are_averaged(pipe):
    image_embeds = torch.randn(2, EMBED_DIM)
    latents = torch.randn(6, EMBED_DIM)
    prompts = ["a", "b"]
    out = pipe(image_embeds=image_embeds, prompt=prompts, num_samples_per_query=3, latents=latents, num_inference_steps=2).image_embeds
    singles = [
        pipe(image_embeds=image_embeds, prompt=prompts, latents=latents[i::3], num_inference_steps=2).image_embeds
        for i in range(3)
    ]
    assert torch.allclose(out, torch.stack(singles).mean(0), atol=1e-5)


def test_source_weight_and_normalize(pipe):
    image_embeds = torch.randn(1, EMBED_DIM)
    base = pipe(image_embeds=image_embeds, prompt="x", generator=_gen()).image_embeds
    mixed = pipe(image_embeds=image_embeds, prompt="x", source_weight=0.1, generator=_gen()).image_embeds
    assert torch.allclose(mixed, 0.9 * base + 0.1 * image_embeds, atol=1e-6)
    normalized = pipe(image_embeds=image_embeds, prompt="x", normalize=True, generator=_gen()).image_embeds
    assert torch.allclose(normalized, base / base.norm(dim=-1, keepdim=True), atol=1e-6)


def test_mask_image_recipe(pipe):
    images = _images(1, size=(64, 64))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, 32:] = 255
    mask_image = Image.fromarray(mask)
    mask64, pixel_mask = pipe.prepare_mask(mask_image, 1, torch.device("cpu"))
    assert mask64.shape == (1, 64, 64) and set(mask64.unique().tolist()) == {0.0, 1.0}
    assert mask64[0, :, :30].sum() == 0 and mask64[0, :, 34:].min() == 1
    # the masked pixels are zeroed before the reference is encoded
    pixel_values = pipe.image_processor(images=images, return_tensors="pt").pixel_values
    expected_embeds = pipe.image_encoder(pixel_values=pixel_values * (1 - pixel_mask)).image_embeds
    masked = pipe(image=images, prompt="x", mask_image=mask_image, generator=_gen()).image_embeds
    by_hand = pipe(image_embeds=expected_embeds, prompt="x", mask=mask64, generator=_gen()).image_embeds
    assert torch.allclose(masked, by_hand, atol=1e-5)
    unmasked = pipe(image=images, prompt="x", generator=_gen()).image_embeds
    assert not torch.allclose(masked, unmasked)


def test_batches_broadcast_negative_and_mask(pipe):
    image_embeds = torch.randn(3, EMBED_DIM)
    prompts = ["a", "b", "c"]
    batched = pipe(image_embeds=image_embeds, prompt=prompts, negative_prompt="n", mask=torch.ones(1, 64, 64), latents=torch.randn(3, EMBED_DIM).clone(), num_inference_steps=2)
    assert batched.image_embeds.shape == (3, EMBED_DIM)


def test_callback_can_replace_latents(pipe):
    seen = []

    def callback(pipeline, step, timestep, kwargs):
        seen.append((step, int(timestep), kwargs["latents"].shape))
        return {"latents": torch.zeros_like(kwargs["latents"])}

    out = pipe(image_embeds=torch.randn(1, EMBED_DIM), prompt="x", num_inference_steps=3, callback_on_step_end=callback)
    assert [s[0] for s in seen] == [0, 1]
    assert torch.equal(out.image_embeds, torch.zeros(1, EMBED_DIM))


def test_return_tuple_and_numpy(pipe):
    (out,) = pipe(prompt="x", return_dict=False, generator=_gen())
    assert isinstance(out, torch.Tensor)
    assert isinstance(pipe(prompt="x", output_type="np").image_embeds, np.ndarray)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_embeds=torch.randn(1, EMBED_DIM + 1), prompt="x"), "image_embeds"),
        (dict(image_embeds=torch.randn(2, EMBED_DIM), prompt=["x", "y", "z"]), "Batch sizes"),
        (dict(image_embeds=torch.randn(2, EMBED_DIM), prompt="x", mask_image=[Image.new("L", (8, 8))] * 3), "Batch sizes"),
        (dict(image_embeds=torch.randn(1, EMBED_DIM), prompt="x", mask=torch.zeros(1, 32, 32)), "mask"),
        (dict(prompt="x", num_inference_steps=-1), "num_inference_steps"),
        (dict(prompt="x", num_inference_steps=0), "num_inference_steps"),
        (dict(image=_images(1), image_embeds=torch.randn(1, EMBED_DIM), prompt="x"), "not both"),
        (dict(prompt="x", prompt_embeds=torch.randn(1, 77, TEXT_DIM)), "not both"),
        (dict(prompt_embeds=torch.randn(1, 77, TEXT_DIM + 1)), "prompt_embeds"),
        (dict(image_embeds=torch.randn(1, EMBED_DIM)), "prompt"),
        (dict(prompt=3), "prompt"),
        (dict(prompt="x", negative_prompt=5), r"`negative_prompt` must be a string or a non-empty list of strings, got 5 \(int\)\."),
        (dict(prompt=["x", "y"], negative_prompt=["a", None]), r"`negative_prompt` .* got list holding \['NoneType', 'str'\]"),
        (dict(prompt="x", num_samples_per_query=0), "num_samples_per_query"),
        (dict(prompt="x", output_type="pil"), "output_type"),
        (dict(prompt="x", latents=torch.randn(2, EMBED_DIM)), "latents"),
        (dict(prompt="x", mask_image=Image.new("L", (8, 8)), mask=torch.zeros(1, 64, 64)), "not both"),
        (dict(prompt="x", num_samples_per_query=True), "num_samples_per_query"),
        (dict(prompt=[]), r"`prompt` must be a string or a non-empty list of strings, got list \(empty\)"),
        (dict(prompt_embeds=torch.randn(0, 77, TEXT_DIM)), "No query to compose: `prompt_embeds`"),
        (dict(prompt=["x", "y"], generator=[_gen(0)]), r"`generator` as a list .* 2 \(2 queries x 1 num_images_per_prompt x 1 num_samples_per_query\), got a list of 1"),
        (dict(prompt=["x", "y"], num_samples_per_query=2, generator=[_gen(0), _gen(1)]), r"`generator` .* 4 \(2 queries x 1 num_images_per_prompt x 2 num_samples_per_query"),
        (dict(prompt="x", generator=0), "`generator` must be a torch.Generator"),
    ],
)
def test_bad_inputs(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)


def test_embeddings_only_pipeline():
    pipe = tiny_pipeline(with_encoders=False)
    out = pipe(image_embeds=torch.randn(2, EMBED_DIM), prompt_embeds=torch.randn(2, 77, TEXT_DIM),
               negative_prompt_embeds=torch.randn(1, 77, TEXT_DIM), generator=_gen())
    assert out.image_embeds.shape == (2, EMBED_DIM)
    with pytest.raises(ValueError, match="text_encoder"):
        pipe(image_embeds=torch.randn(1, EMBED_DIM), prompt="x")
    with pytest.raises(ValueError, match="image_encoder"):
        pipe.encode_image(_images(1))


def test_save_and_reload(tmp_path, pipe):
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers_cir.models.compodiff_transformer", "CompoDiffTransformer"]
    reloaded = CompoDiffPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    images = _images(1)
    for name in ("transformer", "text_encoder", "image_encoder"):
        original, loaded = getattr(pipe, name).state_dict(), getattr(reloaded, name).state_dict()
        assert original.keys() == loaded.keys()
        assert all(torch.equal(original[key], loaded[key]) for key in original), name
    a = pipe(image=images, prompt="make it blue", generator=_gen()).image_embeds
    b = reloaded(image=images, prompt="make it blue", generator=_gen()).image_embeds
    # Same weights; freshly loaded tensors may take another GEMM path (last-bit float32 noise in the CLIP
    # encoders), which guidance (7.5) amplifies to ~1e-5, as in the parity tolerances.
    assert torch.allclose(pipe.encode_image(images), reloaded.encode_image(images), atol=1e-6, rtol=0)
    assert torch.allclose(a, b, atol=1e-4, rtol=0)


def test_short_component_paths_reload(tmp_path, pipe):
    """`["diffusers_cir", "Class"]` entries in model_index.json are public API too."""
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["transformer"] = ["diffusers_cir", "CompoDiffTransformer"]
    index["scheduler"] = ["diffusers_cir", "CompoDiffScheduler"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    reloaded = CompoDiffPipeline.from_pretrained(tmp_path)
    assert type(reloaded.transformer).__name__ == "CompoDiffTransformer"


def test_missing_folder_without_network():
    # a repo id that is not in the cache, resolved with local_files_only: the error path, never a download
    with pytest.raises(OSError, match="not a local folder"):
        CompoDiffPipeline.from_pretrained("someone/not-a-cached-repo", local_files_only=True)


class _ConstantPrior(torch.nn.Module):
    """Predicts the same x0 whatever x_t: every correct x0-prediction sampler must end exactly there."""


def _constant_x0_pipeline(scheduler, target):
    pipe = tiny_pipeline(with_encoders=False, scheduler=scheduler)
    transformer = pipe.transformer
    original = transformer.forward

    def forward(hidden_states, timestep, *args, **kwargs):
        out = original(hidden_states, timestep, *args, **kwargs)
        out.predicted_image_embedding = target.repeat(3, 1).to(out.predicted_image_embedding)
        return out

    transformer.forward = forward
    return pipe


@pytest.mark.parametrize(
    "scheduler",
    [
        CompoDiffScheduler(),
        DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample", clip_sample=False),
        DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample"),
    ],
    ids=["compodiff", "ddim", "dpm-solver"],
)
def test_diffusers_schedulers_work(scheduler):
    target = torch.randn(2, EMBED_DIM)
    pipe = _constant_x0_pipeline(scheduler, target)
    kwargs = dict(image_embeds=torch.randn(2, EMBED_DIM), prompt_embeds=torch.randn(2, 77, TEXT_DIM),
                  negative_prompt_embeds=torch.randn(2, 77, TEXT_DIM), num_inference_steps=5)
    out = pipe(**kwargs, generator=_gen(0)).image_embeds
    assert torch.allclose(out, target, atol=1e-4)
    # and on the real (random) prior they run, deterministically
    real = tiny_pipeline(with_encoders=False, scheduler=scheduler)
    a = real(**kwargs, generator=_gen(0)).image_embeds
    b = real(**kwargs, generator=_gen(0)).image_embeds
    assert torch.isfinite(a).all() and torch.equal(a, b)


def test_ddim_eta_is_passed():
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample", clip_sample=False)
    pipe = tiny_pipeline(with_encoders=False, scheduler=scheduler)
    kwargs = dict(image_embeds=torch.randn(1, EMBED_DIM), prompt_embeds=torch.randn(1, 77, TEXT_DIM),
                  negative_prompt_embeds=torch.randn(1, 77, TEXT_DIM), num_inference_steps=4)
    deterministic = pipe(**kwargs, eta=0.0, generator=_gen(0)).image_embeds
    stochastic = pipe(**kwargs, eta=1.0, generator=_gen(0)).image_embeds
    assert not torch.allclose(deterministic, stochastic)


def test_encode_prompt_runs_without_autograd(pipe):
    """A cached `encode_prompt` result (the README's encode-the-negative-once advice) must not hold the text tower's
    autograd graph; an empty list is refused with a message naming `prompt`."""
    prompt_embeds, negative = pipe.encode_prompt([""])
    assert prompt_embeds.grad_fn is None and not prompt_embeds.requires_grad
    assert negative.grad_fn is None and not negative.requires_grad
    with pytest.raises(ValueError, match=r"`prompt` must be a string or a non-empty list of strings, got list \(empty\)"):
        pipe.encode_prompt([])


def test_generator_list_gives_each_row_its_generator(pipe):
    """One generator per row of noise (query-major): query i with samples `(2i, 2i+1)` gives the same result in a
    batch as alone with those generators."""
    image_embeds, prompts = torch.randn(2, EMBED_DIM), ["a", "b"]
    batched = pipe(image_embeds=image_embeds, prompt=prompts, num_samples_per_query=2,
                   generator=[_gen(seed) for seed in range(4)], num_inference_steps=3).image_embeds
    second = pipe(image_embeds=image_embeds[1:], prompt=prompts[1:], num_samples_per_query=2,
                  generator=[_gen(2), _gen(3)], num_inference_steps=3).image_embeds
    assert torch.allclose(batched[1:], second, atol=1e-4)


@pytest.mark.parametrize("batch_size", [0, -1, 2.0])
def test_encode_image_refuses_a_bad_batch_size(pipe, batch_size):
    with pytest.raises(ValueError, match=rf"`batch_size` must be an integer >= 1, got {batch_size} \({type(batch_size).__name__}\)"):
        pipe.encode_image(_images(2), batch_size=batch_size)


def test_array_mask_of_the_photo_size_covers_what_the_pil_mask_covers(pipe):
    """A mask drawn over a non-square photo (e.g. a segmentation array of its height and width) must select the same
    content whether given as PIL or as an array/tensor: both go through the image processor's resize and crop."""
    image = _images(1, size=(40, 64))[0]
    drawn = np.zeros((40, 64), dtype=np.uint8)
    drawn[:, 48:] = 255  # the right quarter of the photo
    from_pil = pipe.prepare_mask(Image.fromarray(drawn), 1, torch.device("cpu"))
    for as_array in (drawn, drawn.astype(bool), torch.from_numpy(drawn > 0).float()[None]):
        from_array = pipe.prepare_mask(as_array, 1, torch.device("cpu"))
        assert torch.equal(from_array[0], from_pil[0]) and torch.equal(from_array[1], from_pil[1])
    a = pipe(image=image, prompt="x", mask_image=Image.fromarray(drawn), generator=_gen()).image_embeds
    b = pipe(image=image, prompt="x", mask_image=drawn, generator=_gen()).image_embeds
    assert torch.equal(a, b)
    # a mask already at the CLIP input size (preprocessed pixel values) is read in that grid as it is
    grid = (torch.rand(32, 32, generator=_gen()) > 0.5).float()
    assert torch.equal(pipe.prepare_mask(grid, 1, torch.device("cpu"))[1][0, 0], grid)


def test_readme_notebook_snippet_runs(monkeypatch):
    """The README's "In a notebook" code, on tiny components and CPU (same dtype, bfloat16): the query (always
    float32) must be comparable with the gallery embeddings (model dtype) as written."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    snippet = re.search(r"## In a notebook\s+```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.setattr(CompoDiffPipeline, "from_pretrained", classmethod(lambda cls, *args, **kwargs: tiny_pipeline()))
    monkeypatch.setattr(Image, "open", lambda path: _images(1, seed=len(path))[0])
    namespace = {"paths": ["a.jpg", "bb.jpg", "ccc.jpg"]}
    exec(compile(snippet.replace('"cuda"', '"cpu"'), "README.md", "exec"), namespace)
    assert namespace["scores"].shape == (1, 3) and torch.isfinite(namespace["scores"]).all()


def test_one_reference_one_text_or_one_mask_serves_every_query(pipe):
    """A single entry of a condition is shared by every query, as if it were repeated."""
    image = _images(1)
    texts = ["make it red", "as a sketch", "at night"]
    embeds = pipe.encode_image(image)
    shared = pipe(image=image, prompt=texts, generator=_gen()).image_embeds
    repeated = pipe(image_embeds=embeds.expand(3, -1), prompt=texts, generator=_gen()).image_embeds
    assert shared.shape == (3, EMBED_DIM)
    assert torch.allclose(shared, repeated, atol=1e-6)
    assert not torch.allclose(shared[0], shared[1])

    references = torch.randn(3, EMBED_DIM)
    one_text = pipe(image_embeds=references, prompt="as a sketch", generator=_gen()).image_embeds
    three_texts = pipe(image_embeds=references, prompt=["as a sketch"] * 3, generator=_gen()).image_embeds
    assert torch.allclose(one_text, three_texts, atol=1e-6)

    left, right = np.zeros((40, 48), dtype=np.uint8), np.zeros((40, 48), dtype=np.uint8)
    left[:, :24], right[:, 24:] = 255, 255
    masks = [Image.fromarray(left), Image.fromarray(right)]
    one_image = pipe(image=image, prompt="x", mask_image=masks, generator=_gen()).image_embeds
    two_images = pipe(image=image * 2, prompt=["x", "x"], mask_image=masks, generator=_gen()).image_embeds
    assert one_image.shape == (2, EMBED_DIM)
    assert torch.allclose(one_image, two_images, atol=1e-6)
    assert not torch.allclose(one_image[0], one_image[1])
    one_mask = pipe(image=image * 2, prompt=["x", "y"], mask_image=masks[0], generator=_gen()).image_embeds
    both_masks = pipe(image=image * 2, prompt=["x", "y"], mask_image=[masks[0]] * 2, generator=_gen()).image_embeds
    assert torch.allclose(one_mask, both_masks, atol=1e-6)


def test_a_list_mixing_pil_images_and_pixel_tensors_prepares_each_as_it_would_be_alone(pipe):
    """A pixel-value tensor next to a PIL image was normalised a second time by the image processor (a silently
    different query), and a tensor first made stacking fail with a bare TypeError."""
    images = _images(3, seed=4)
    pixels = pipe.image_processor(images=images, return_tensors="pt").pixel_values  # [3, 3, H, W]
    alone = pipe.encode_image(images)
    for mixed in ([images[0], pixels[1], images[2]], [pixels[0], images[1], pixels[2]], [pixels[0][None], images[1], images[2]]):
        torch.testing.assert_close(pipe.encode_image(mixed), alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pipe.encode_image(mixed, batch_size=2), alone, atol=1e-5, rtol=1e-5)
        expected = pipe(image=images, prompt=["a", "b", "c"], generator=_gen()).image_embeds
        got = pipe(image=mixed, prompt=["a", "b", "c"], generator=_gen()).image_embeds
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    with pytest.raises(ValueError, match=r"`image`\[1\] is a tensor of shape \(3, 20, 20\): pixel values of one image must be \(3, 32, 32\)"):
        pipe(image=[images[0], torch.zeros(3, 20, 20)], prompt=["a", "b"])
    with pytest.raises(ValueError, match=r"`image`\[1\] is a tensor of shape \(2, 3, 32, 32\)"):
        pipe(image=[images[0], pixels[:2]], prompt=["a", "b"])


def test_image_and_mask_paths_are_read_like_the_pil_images_of_the_files(pipe, tmp_path, monkeypatch):
    """A single path was refused (`image` must be a PIL image ...) while a list of paths was accepted, and a list of
    mask paths failed with a bare numpy TypeError."""
    from pathlib import Path

    from PIL import ImageOps

    photo, other = _images(2, seed=7)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated, as phone photos are stored
    photo.save(tmp_path / "photo.jpg", exif=exif.tobytes())
    other.save(tmp_path / "other.png")
    mask = np.zeros((40, 48), dtype=np.uint8)
    mask[:, 24:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    photo_image = ImageOps.exif_transpose(Image.open(tmp_path / "photo.jpg")).convert("RGB")
    other_image, mask_image = Image.open(tmp_path / "other.png"), Image.open(tmp_path / "mask.png")
    assert photo_image.size == (40, 48)  # the rotation is applied

    expected = pipe(image=photo_image, prompt="x", mask_image=mask_image, generator=_gen()).image_embeds
    for path in (str(tmp_path / "photo.jpg"), tmp_path / "photo.jpg", [tmp_path / "photo.jpg"]):
        for mask_path in (str(tmp_path / "mask.png"), Path(tmp_path / "mask.png"), [str(tmp_path / "mask.png")]):
            got = pipe(image=path, prompt="x", mask_image=mask_path, generator=_gen()).image_embeds
            torch.testing.assert_close(got, expected, atol=0, rtol=0)
    mixed = pipe(image=[photo_image, tmp_path / "other.png"], prompt=["a", "b"], generator=_gen()).image_embeds
    torch.testing.assert_close(
        mixed, pipe(image=[photo_image, other_image], prompt=["a", "b"], generator=_gen()).image_embeds, atol=0, rtol=0
    )
    torch.testing.assert_close(
        pipe.encode_image([tmp_path / "other.png", str(tmp_path / "photo.jpg")], batch_size=1),
        pipe.encode_image([other_image, photo_image], batch_size=1), atol=0, rtol=0,
    )

    def no_text_tower(*args, **kwargs):
        raise AssertionError("the text tower ran before the missing file was noticed")

    monkeypatch.setattr(pipe, "encode_prompt", no_text_tower)
    missing = str(tmp_path / "missing.png")
    with pytest.raises(ValueError, match=r"`image` is the path .*missing\.png', but there is no file there"):
        pipe(image=missing, prompt="x")
    with pytest.raises(ValueError, match=r"`mask_image`\[1\] is the path .*missing\.png'"):
        pipe(image=[photo_image] * 2, prompt="x", mask_image=[mask_image, missing])
    with pytest.raises(ValueError, match=r"`images`\[2\] is the path .*missing\.png'"):
        pipe.encode_image([other_image, other_image, missing], batch_size=1)


def test_num_images_per_prompt_beside_num_samples_per_query(pipe):
    """Rows of noise are query-major, then image, then sample: each of a query's `num_images_per_prompt` outputs is
    the average of its own `num_samples_per_query` samples."""
    image_embeds, prompts = torch.randn(2, EMBED_DIM), ["a", "b"]
    latents = torch.randn(2 * 3 * 2, EMBED_DIM)
    out = pipe(image_embeds=image_embeds, prompt=prompts, num_images_per_prompt=3, num_samples_per_query=2,
               latents=latents, num_inference_steps=2).image_embeds
    assert out.shape == (6, EMBED_DIM)
    for query in range(2):
        for image in range(3):
            rows = latents[(query * 3 + image) * 2 : (query * 3 + image + 1) * 2]
            alone = pipe(image_embeds=image_embeds[query : query + 1], prompt=prompts[query], num_samples_per_query=2,
                         latents=rows, num_inference_steps=2).image_embeds
            torch.testing.assert_close(out[query * 3 + image], alone[0], atol=1e-5, rtol=0)
    # the latent output is every sample, before averaging
    latent = pipe(image_embeds=image_embeds, prompt=prompts, num_images_per_prompt=3, num_samples_per_query=2,
                  latents=latents, num_inference_steps=2, output_type="latent").image_embeds
    assert latent.shape == (12, EMBED_DIM)
    torch.testing.assert_close(latent.view(6, 2, -1).mean(1), out, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="`num_images_per_prompt` must be an integer >= 1"):
        pipe(prompt="x", num_images_per_prompt=0)
    with pytest.raises(ValueError, match=r"`latents` must be a tensor of shape \(12, 16\)"):
        pipe(image_embeds=image_embeds, prompt=prompts, num_images_per_prompt=3, num_samples_per_query=2,
             latents=latents[:6])


def test_guidance_of_one_is_the_conditional_branch_alone(pipe):
    """With `w_text = w_image = 1` the guided x0 `u + (c - n) + (n - u)` is `c`: only that branch runs."""
    transformer = pipe.transformer
    image_embeds, prompt_embeds = torch.randn(2, EMBED_DIM), torch.randn(2, 77, TEXT_DIM)
    latents = torch.randn(2, EMBED_DIM)
    rows = []
    handle = transformer.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        out = pipe(image_embeds=image_embeds, prompt_embeds=prompt_embeds, negative_prompt_embeds=torch.randn(2, 77, TEXT_DIM),
                   latents=latents, num_inference_steps=2, guidance_scale=1.0, image_guidance_scale=1.0).image_embeds
    finally:
        handle.remove()
    assert rows == [2] and pipe.do_classifier_free_guidance is False
    t = int(pipe.scheduler.timesteps[0])
    with torch.no_grad():
        conditional = transformer(latents, t, image_embeds, prompt_embeds, torch.zeros(2, 64, 64)).predicted_image_embedding
    torch.testing.assert_close(out, conditional, atol=1e-5, rtol=0)


@pytest.mark.parametrize("swap", ["compodiff", "ddim"])
def test_a_callback_switching_guidance_off_mid_run_takes_effect(swap):
    """The loop reads `pipe.guidance_scale` / `pipe.image_guidance_scale` before every step (diffusers' callback
    convention): switching guidance off after step 0 gives the run whose later steps are unguided."""
    scheduler = CompoDiffScheduler() if swap == "compodiff" else DDIMScheduler.from_config(CompoDiffScheduler().config)
    pipe = tiny_pipeline(with_encoders=False, scheduler=scheduler)
    kwargs = dict(image_embeds=torch.randn(1, EMBED_DIM), prompt_embeds=torch.randn(1, 77, TEXT_DIM),
                  negative_prompt_embeds=torch.randn(1, 77, TEXT_DIM), num_inference_steps=4)

    def guidance_off(pipe, step, timestep, callback_kwargs):
        pipe._guidance_scale, pipe._image_guidance_scale = 1.0, 1.0
        return callback_kwargs

    switched = pipe(**kwargs, callback_on_step_end=guidance_off, generator=_gen()).image_embeds
    assert (pipe.guidance_scale, pipe.image_guidance_scale) == (1.0, 1.0)
    guided = pipe(**kwargs, generator=_gen()).image_embeds
    unguided = pipe(**kwargs, guidance_scale=1.0, image_guidance_scale=1.0, generator=_gen()).image_embeds
    assert not torch.allclose(switched, guided) and not torch.allclose(switched, unguided)
