"""MagicLensPipeline with tiny components: tokenisation and the text mask as scenic's, preprocessing facts, query
shapes and broadcasting, errors, reduced precision."""

import logging

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection

from diffusers_cir import MagicLensFusion, MagicLensImageProcessor, MagicLensPipeline
from diffusers_cir.pipelines.pipeline_magiclens import normalize_embeddings, text_attention_mask
from diffusers_cir.utils import build_offline_clip_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

EMBED_DIM = 16


def tiny_magiclens_pipeline(seed: int = 0) -> MagicLensPipeline:
    torch.manual_seed(seed)
    common = {"hidden_act": "quick_gelu", "projection_dim": EMBED_DIM}
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        patch_size=8, **common))
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, eos_token_id=49407,
        pad_token_id=0, **common))
    fusion = MagicLensFusion(embed_dim=EMBED_DIM, num_layers=2, num_attention_heads=2, ff_dim=32,
                             pooler_num_attention_heads=4)
    with torch.no_grad():  # move the zero-initialised pooler pieces so that they take part
        fusion.pooler.query.normal_()
        fusion.pooler.attention.per_dim_scale.normal_()
    pipe = MagicLensPipeline(
        image_encoder=image_encoder.eval(), text_encoder=text_encoder.eval(),
        tokenizer=build_offline_clip_tokenizer(pad_token="!"), fusion=fusion.eval(),
        image_processor=MagicLensImageProcessor(image_size=32),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return tiny_magiclens_pipeline()


def picture(seed: int, size=(48, 36)) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def test_tokens_are_those_of_openai_clip_with_zero_padding(pipe):
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer()
    texts = ["Find a DOG &amp; a cat, but at NIGHT", "same scene but pop!+ brighter", "  naïve   café\tÉté ",
             "mojibake Ã© and ﬁne", "emoji 😀 ok", ""]
    ids = pipe.tokenize(texts)
    longest = max(len(reference.encode(text)) for text in texts) + 2
    assert ids.shape == (len(texts), longest)
    for row, text in enumerate(texts):
        expected = [49406] + reference.encode(text) + [49407]
        assert ids[row, : len(expected)].tolist() == expected
        assert not ids[row, len(expected):].any()
    assert pipe.tokenize(["a photo"], pad_to=77).shape == (1, 77)


def test_text_mask_is_causal_and_hides_id_zero_from_everything():
    ids = torch.tensor([[49406, 320, 0, 536, 49407, 0, 0]])
    mask = text_attention_mask(ids, torch.float32)[0, 0]
    visible = mask == 0
    for query in range(7):
        for key in range(7):
            assert visible[query, key] == (key <= query and ids[0, query] > 0 and ids[0, key] > 0)
    assert (mask[~visible] < -1e37).all() and torch.isfinite(mask).all()  # not -inf: a blind row attends uniformly
    for dtype in (torch.float16, torch.bfloat16):  # adding a negative logit must not make it -inf either
        assert torch.isfinite(text_attention_mask(ids, dtype) - 100).all()


def test_the_real_token_zero_never_reaches_the_text_embedding(pipe):
    """CLIP numbers "!" 0, like padding: scenic hides it, so its embedding cannot change the result."""
    ids = pipe.tokenize(["same scene but pop!+ brighter colors"])
    assert (ids[0, 1:-1] == 0).any()
    with torch.no_grad():
        before = pipe.encode_text(ids)
        table = pipe.text_encoder.get_input_embeddings().weight
        saved = table[0].clone()
        table[0] = 3 * torch.randn_like(saved)  # a direction LayerNorm keeps
        after = pipe.encode_text(ids)
        table[0] = saved
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


def test_padding_length_changes_nothing(pipe):
    texts = ["make it red", "inside view of this building at night"]
    with torch.no_grad():
        short = pipe.encode_text(pipe.tokenize(texts))
        full = pipe.encode_text(pipe.tokenize(texts, pad_to=77))
    torch.testing.assert_close(short, full, atol=1e-6, rtol=0)


def test_a_prompt_longer_than_the_context_is_cut_with_a_warning(pipe, caplog):
    text = " ".join(["red"] * 90)
    with caplog.at_level(logging.WARNING):
        ids = pipe.tokenize([text, "blue"])
    assert ids.shape == (2, 77) and ids[0, -1] == 49407 and ids[1, 3:].eq(0).all()
    assert "1 of the 2 prompts of this call is longer than the 77 tokens" in caplog.text
    assert "the longest had 92" in caplog.text and caplog.text.count("longer than") == 1


def test_images_are_scaled_by_their_own_maximum(pipe):
    values = np.random.default_rng(0).choice([0, 60, 120, 180], size=(30, 40, 3)).astype(np.uint8)
    bright, dim = PIL.Image.fromarray(values), PIL.Image.fromarray(values // 3)  # maxima 180 and 60
    embeds = pipe.encode_image([bright, dim])
    torch.testing.assert_close(embeds[0], embeds[1], atol=1e-6, rtol=0)
    processor = MagicLensImageProcessor(image_size=32, do_divide_by_max=False)  # /255 instead
    assert not torch.allclose(processor(bright).pixel_values, processor(dim).pixel_values)


def test_empty_prompt_gives_the_gallery_embedding_and_pairs_join_with_and(pipe):
    image = picture(1)
    torch.testing.assert_close(pipe(image=image, prompt="").image_embeds, pipe.encode_image([image]), atol=1e-6, rtol=0)
    joined = pipe(image=image, prompt="is red and has long sleeves").image_embeds
    paired = pipe(image=image, prompt=[("is red", "has long sleeves")]).image_embeds
    torch.testing.assert_close(paired, joined, atol=0, rtol=0)


def test_single_reference_or_prompt_broadcasts_and_batches_agree(pipe):
    images, prompts = [picture(2), picture(3), picture(4)], ["make it red", "at night", "a sketch of it"]
    full = pipe(image=images, prompt=prompts).image_embeds
    chunked = pipe(image=images, prompt=prompts, batch_size=2).image_embeds
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=0)
    one_image = pipe(image=images[0], prompt=prompts).image_embeds
    torch.testing.assert_close(one_image[0], full[0], atol=1e-6, rtol=0)
    assert not torch.allclose(one_image[1], full[1])
    one_prompt = pipe(image=images, prompt=prompts[0]).image_embeds
    torch.testing.assert_close(one_prompt[0], full[0], atol=1e-6, rtol=0)
    normalized = pipe(image=images, prompt=prompts, normalize=True).image_embeds
    torch.testing.assert_close(normalized, normalize_embeddings(full), atol=1e-6, rtol=0)
    torch.testing.assert_close(pipe.encode_image(images, batch_size=2), pipe.encode_image(images), atol=1e-6, rtol=0)


def test_bad_calls_are_refused_by_name(pipe):
    with pytest.raises(ValueError, match="`image` is required"):
        pipe(prompt="make it red")
    with pytest.raises(ValueError, match="2 reference images but 3 prompts"):
        pipe(image=[picture(0), picture(1)], prompt=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"`prompt\[1\]`"):
        pipe(image=picture(0), prompt=["a", 3])
    with pytest.raises(ValueError, match="`prompt` must be"):
        pipe(image=picture(0), prompt=[])
    with pytest.raises(ValueError, match=r"`image\[1\]` is a int"):
        pipe(image=[picture(0), 7], prompt="a")
    with pytest.raises(ValueError, match="no file"):
        pipe.encode_image(["/nonexistent/picture.png"])
    with pytest.raises(TypeError):  # the reference's gallery embedding cannot stand for its pixels
        pipe(image_embeds=torch.zeros(1, EMBED_DIM), prompt="a")
    assert "image_embeds" not in MagicLensPipeline.call_parameters()


def test_components_that_disagree_are_refused():
    pipe = tiny_magiclens_pipeline()
    with pytest.raises(ValueError, match="embedding width"):
        MagicLensPipeline(
            image_encoder=pipe.image_encoder, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
            fusion=MagicLensFusion(embed_dim=8, num_layers=1, num_attention_heads=2, ff_dim=16, pooler_num_attention_heads=2),
            image_processor=pipe.image_processor,
        )
    with pytest.raises(ValueError, match="image_size"):
        MagicLensPipeline(
            image_encoder=pipe.image_encoder, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
            fusion=pipe.fusion, image_processor=MagicLensImageProcessor(image_size=64),
        )


def test_bfloat16_on_cpu_follows_float32():
    pipe = tiny_magiclens_pipeline()
    images, prompts = [picture(5), picture(6)], ["make it red", "at night"]
    reference = pipe(image=images, prompt=prompts, normalize=True).image_embeds
    pipe.to(torch.bfloat16)
    low = pipe(image=images, prompt=prompts, normalize=True).image_embeds
    assert low.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(low.float(), reference, dim=-1).min() > 0.99


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_half_precision_follows_cpu_float32(dtype):
    pipe = tiny_magiclens_pipeline()
    images, prompts = [picture(7), picture(8)], ["make it red", "at night"]
    reference = pipe(image=images, prompt=prompts, normalize=True).image_embeds
    gallery = normalize_embeddings(pipe.encode_image(images))
    pipe.to("cuda", dtype)
    query = pipe(image=images, prompt=prompts, normalize=True).image_embeds
    assert query.device.type == "cuda" and query.dtype == dtype
    assert torch.nn.functional.cosine_similarity(query.float().cpu(), reference, dim=-1).min() > 0.99
    on_gpu = normalize_embeddings(pipe.encode_image(images, device="cuda"))
    assert torch.nn.functional.cosine_similarity(on_gpu.float().cpu(), gallery, dim=-1).min() > 0.99
