"""LinCIRPipeline behaviour on tiny components built in code (no download)."""

import doctest
import importlib
import json
import random

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from diffusers_cir import LinCIRPipeline, LinCIRPipelineOutput, TextualInversionProjection
from diffusers_cir.utils import build_offline_clip_tokenizer

PLACEHOLDER_ID = 259  # "$" in CLIP's vocabulary
TOLERANCE = 1e-5


# Every test here runs on one intra-op thread (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_text_encoder(hidden_size=32, projection_dim=24, seed=0, eos_token_id=49407):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=projection_dim,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=eos_token_id,
        pad_token_id=49407,
    )
    model = CLIPTextModelWithProjection(config).eval()
    with torch.no_grad():  # move every gain and bias off its initial value so a missing one shows up
        for name, parameter in model.named_parameters():
            if "layer_norm" in name or name.endswith("bias"):
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def tiny_vision(projection_dim=24, seed=1):
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=30, patch_size=10,
        projection_dim=projection_dim,
    )
    processor = CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    return CLIPVisionModelWithProjection(config).eval(), processor


def tiny_pipeline(hidden_size=32, projection_dim=24, with_vision=False, **kwargs):
    text_encoder = tiny_text_encoder(hidden_size, projection_dim)
    phi = TextualInversionProjection(input_dim=projection_dim, hidden_dim=4 * projection_dim, output_dim=hidden_size, dropout=0.5)
    image_encoder, image_processor = tiny_vision(projection_dim) if with_vision else (None, None)
    pipe = LinCIRPipeline(
        phi=phi.eval(), text_encoder=text_encoder, tokenizer=build_offline_clip_tokenizer(),
        image_encoder=image_encoder, image_processor=image_processor, **kwargs,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_encoding(text_encoder, input_ids, pseudo_tokens, placeholder_id=PLACEHOLDER_ID):
    """An independent implementation written from the reference description: token embeddings with the pseudo
    token at every placeholder, position embeddings, causal attention written out by hand, final layer norm,
    pooling at the largest token id, projection."""
    model = text_encoder.text_model
    batch, length = input_ids.shape
    hidden = model.embeddings.token_embedding(input_ids)
    hidden = torch.where((input_ids == placeholder_id)[..., None], pseudo_tokens[:, None, :], hidden)
    hidden = hidden + model.embeddings.position_embedding.weight[:length][None]
    causal = torch.full((length, length), float("-inf")).triu(1)
    for layer in model.encoder.layers:
        attention = layer.self_attn
        heads, width = attention.num_heads, attention.head_dim
        normed = layer.layer_norm1(hidden)
        q, k, v = (proj(normed).view(batch, length, heads, width).transpose(1, 2) for proj in (attention.q_proj, attention.k_proj, attention.v_proj))
        weights = torch.softmax(q @ k.transpose(-1, -2) * width**-0.5 + causal, dim=-1)
        hidden = hidden + attention.out_proj((weights @ v).transpose(1, 2).reshape(batch, length, heads * width))
        hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
    hidden = model.final_layer_norm(hidden)
    pooled = hidden[torch.arange(batch), input_ids.argmax(dim=-1)]
    return text_encoder.text_projection(pooled), hidden


def random_prompt_ids(tokenizer, rng, num_placeholders):
    words = ["red", "dog", "on", "a", "table", "that", "is", "made", "of", "glass", "two", "cats", "blue", "sky"]
    tokens = [rng.choice(words) for _ in range(rng.randint(2, 12))]
    for _ in range(num_placeholders):
        tokens.insert(rng.randint(0, len(tokens)), "$")
    return tokenizer(" ".join(tokens), padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


# ------------------------------------------------------------------------------------------- the encoding


@pytest.mark.parametrize("hidden_size,projection_dim,batch_size", [(32, 24, 1), (48, 40, 5), (32, 24, 3)])
def test_matches_an_independent_implementation(hidden_size, projection_dim, batch_size):
    """Other widths, several `$` per prompt at any position, any batch size."""
    pipe = tiny_pipeline(hidden_size, projection_dim)
    rng = random.Random(hidden_size + batch_size)
    input_ids = torch.cat([random_prompt_ids(pipe.tokenizer, rng, rng.randint(1, 3)) for _ in range(batch_size)])
    assert ((input_ids == PLACEHOLDER_ID).sum(dim=-1) >= 1).all()
    image_embeds = torch.randn(batch_size, projection_dim)
    out = pipe(image_embeds=image_embeds, prompt_input_ids=input_ids)
    with torch.no_grad():
        pseudo_tokens = pipe.phi(image_embeds).pseudo_tokens
        expected_embeds, expected_hidden = reference_encoding(pipe.text_encoder, input_ids, pseudo_tokens)
        _, hidden = pipe.encode_prompt_with_pseudo_tokens(input_ids, pseudo_tokens, output_hidden_states=True)
    assert torch.allclose(out.pseudo_tokens, pseudo_tokens, atol=TOLERANCE, rtol=0)
    assert (out.image_embeds - expected_embeds).abs().max() <= TOLERANCE
    assert (hidden - expected_hidden).abs().max() <= TOLERANCE


def test_legacy_eos_config_pools_at_the_same_position():
    """Old CLIP configs carry `eos_token_id=2` (transformers then pools at the largest id, as the reference)."""
    pipe = tiny_pipeline()
    legacy = LinCIRPipeline(
        phi=pipe.phi, text_encoder=tiny_text_encoder(eos_token_id=2), tokenizer=pipe.tokenizer
    )
    legacy.set_progress_bar_config(disable=True)
    input_ids = random_prompt_ids(pipe.tokenizer, random.Random(3), 2)
    image_embeds = torch.randn(1, 24)
    out = legacy(image_embeds=image_embeds, prompt_input_ids=input_ids)
    with torch.no_grad():
        expected, _ = reference_encoding(legacy.text_encoder, input_ids, legacy.phi(image_embeds).pseudo_tokens)
    assert (out.image_embeds - expected).abs().max() <= TOLERANCE


def test_every_placeholder_receives_the_pseudo_token():
    pipe = tiny_pipeline()
    image_embeds = torch.randn(1, 24)
    one = pipe(image_embeds=image_embeds, prompt="a $ and a cat", prompt_template="{text}").image_embeds
    two = pipe(image_embeds=image_embeds, prompt="a $ and a $", prompt_template="{text}").image_embeds
    other_image = pipe(image_embeds=torch.randn(1, 24), prompt="a $ and a $", prompt_template="{text}").image_embeds
    assert not torch.allclose(one, two, atol=1e-4)
    assert not torch.allclose(two, other_image, atol=1e-4)


def test_prompt_strings_are_formatted_with_the_template():
    pipe = tiny_pipeline()
    image_embeds = torch.randn(2, 24)
    texts = ["is red", "has two dogs on a beach"]
    out = pipe(image_embeds=image_embeds, prompt=texts)
    # prompts are padded to the call's longest prompt
    ids = pipe.tokenizer([f"a photo of $ that {t}" for t in texts], padding="longest", return_tensors="pt").input_ids
    assert torch.equal(pipe(image_embeds=image_embeds, prompt_input_ids=ids).image_embeds, out.image_embeds)
    # which gives the embeddings of 77-token padding (causal attention, end-of-text pooling) at a fraction of the cost
    padded = pipe.tokenizer([f"a photo of $ that {t}" for t in texts], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape[1] < padded.shape[1] == 77
    assert torch.allclose(pipe(image_embeds=image_embeds, prompt_input_ids=padded).image_embeds, out.image_embeds, atol=1e-5)
    custom = pipe(image_embeds=image_embeds, prompt=texts, prompt_template="$ {text}").image_embeds
    ids = pipe.tokenizer([f"$ {t}" for t in texts], padding="longest", return_tensors="pt").input_ids
    assert torch.equal(pipe(image_embeds=image_embeds, prompt_input_ids=ids).image_embeds, custom)
    assert not torch.allclose(custom, out.image_embeds, atol=1e-4)


def test_prompt_without_placeholder_is_an_error():
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match=r"Prompts \[1\] hold no placeholder"):
        pipe(image_embeds=torch.randn(2, 24), prompt=["a $ here", "none there"], prompt_template="{text}")
    long_text = " ".join(["word"] * 90)  # the placeholder is cut off by truncation to 77 tokens
    with pytest.raises(ValueError, match="no placeholder"):
        pipe(image_embeds=torch.randn(1, 24), prompt=long_text, prompt_template="{text} $")


def test_pseudo_tokens_input_skips_phi():
    pipe = tiny_pipeline()
    image_embeds = torch.randn(3, 24)
    with torch.no_grad():
        pseudo_tokens = pipe.phi(image_embeds).pseudo_tokens
    expected = pipe(image_embeds=image_embeds, prompt=["a", "b", "c"]).image_embeds
    assert torch.allclose(pipe(pseudo_tokens=pseudo_tokens, prompt=["a", "b", "c"]).image_embeds, expected, atol=TOLERANCE)


def test_a_single_reference_or_prompt_is_broadcast():
    pipe = tiny_pipeline()
    image_embeds = torch.randn(3, 24)
    texts = ["is red", "is blue", "is green"]
    one_image = pipe(image_embeds=image_embeds[:1], prompt=texts).image_embeds
    assert torch.allclose(one_image, pipe(image_embeds=image_embeds[:1].repeat(3, 1), prompt=texts).image_embeds, atol=TOLERANCE)
    one_prompt = pipe(image_embeds=image_embeds, prompt="is red").image_embeds
    assert torch.allclose(one_prompt, pipe(image_embeds=image_embeds, prompt=["is red"] * 3).image_embeds, atol=TOLERANCE)
    with pytest.raises(ValueError, match="3 references .* but 2 prompts"):
        pipe(image_embeds=image_embeds, prompt=["a", "b"])


def test_fashioniq_caption_pairs_average_both_orders():
    pipe = tiny_pipeline()
    image_embeds = torch.randn(2, 24)
    pairs = [("is darker.", "has a logo?"), ("is longer, ", "is red")]
    out = pipe(image_embeds=image_embeds, prompt=pairs).image_embeds
    forward = pipe(image_embeds=image_embeds, prompt=["is darker and has a logo", "is longer and is red"]).image_embeds
    backward = pipe(image_embeds=image_embeds, prompt=["has a logo and is darker", "is red and is longer"]).image_embeds
    expected = (F.normalize(forward, dim=-1) + F.normalize(backward, dim=-1)) / 2
    assert torch.allclose(out, expected, atol=TOLERANCE)
    # Mixed with a plain caption, and one pair broadcast over several references.
    mixed = pipe(image_embeds=image_embeds, prompt=[pairs[0], "is longer and is red"]).image_embeds
    assert torch.allclose(mixed[0], expected[0], atol=TOLERANCE) and torch.allclose(mixed[1], forward[1], atol=TOLERANCE)
    broadcast = pipe(image_embeds=image_embeds, prompt=[pairs[0]]).image_embeds
    single = pipe(image_embeds=image_embeds[1:], prompt=[pairs[0]]).image_embeds
    assert torch.allclose(broadcast[1], single[0], atol=TOLERANCE)
    with pytest.raises(ValueError, match=r"prompt\[0\]"):
        pipe(image_embeds=image_embeds[:1], prompt=[("a", "b", "c")])


def test_chunking_normalisation_and_output_types():
    pipe = tiny_pipeline()
    image_embeds = torch.randn(5, 24)
    texts = [f"variant {i}" for i in range(5)]
    full = pipe(image_embeds=image_embeds, prompt=texts)
    chunked = pipe(image_embeds=image_embeds, prompt=texts, batch_size=2)
    assert isinstance(full, LinCIRPipelineOutput)
    assert torch.allclose(full.image_embeds, chunked.image_embeds, atol=TOLERANCE)
    normalized = pipe(image_embeds=image_embeds, prompt=texts, normalize=True).image_embeds
    assert torch.allclose(normalized.norm(dim=-1), torch.ones(5), atol=1e-6)
    assert torch.allclose(normalized, F.normalize(full.image_embeds, dim=-1), atol=1e-6)
    as_numpy = pipe(image_embeds=image_embeds, prompt=texts, output_type="np", return_dict=False)
    assert isinstance(as_numpy[0], np.ndarray) and as_numpy[0].shape == (5, 24) and as_numpy[1].shape == (5, 32)
    np.testing.assert_allclose(as_numpy[0], full.image_embeds.numpy(), atol=TOLERANCE)


def test_input_errors_name_the_argument():
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="exactly one of `image`, `image_embeds`, `pseudo_tokens`"):
        pipe(prompt="x")
    with pytest.raises(ValueError, match="exactly one of `image`, `image_embeds`, `pseudo_tokens`"):
        pipe(image_embeds=torch.randn(1, 24), pseudo_tokens=torch.randn(1, 32), prompt="x")
    with pytest.raises(ValueError, match="exactly one of `prompt` and `prompt_input_ids`"):
        pipe(image_embeds=torch.randn(1, 24))
    with pytest.raises(ValueError, match=r"`image_embeds` must be a tensor of shape \(batch_size, 24\), got \(2, 7\)"):
        pipe(image_embeds=torch.randn(2, 7), prompt="x")
    with pytest.raises(ValueError, match=r"`pseudo_tokens` must be a tensor of shape \(batch_size, 32\)"):
        pipe(pseudo_tokens=torch.randn(2, 24), prompt="x")
    with pytest.raises(ValueError, match="`output_type`"):
        pipe(image_embeds=torch.randn(1, 24), prompt="x", output_type="pil")
    with pytest.raises(ValueError, match="`batch_size`"):
        pipe(image_embeds=torch.randn(1, 24), prompt="x", batch_size=0)
    with pytest.raises(ValueError, match="`prompt_template` must contain"):
        pipe(image_embeds=torch.randn(1, 24), prompt="x", prompt_template="a photo of $")
    with pytest.raises(ValueError, match=r"`prompt\[0\]`"):
        pipe(image_embeds=torch.randn(1, 24), prompt=[3])
    with pytest.raises(ValueError, match="pseudo tokens of width 16"):
        LinCIRPipeline(phi=TextualInversionProjection(24, 96, 16), text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    with pytest.raises(ValueError, match="takes embeddings of width 12"):
        LinCIRPipeline(phi=TextualInversionProjection(12, 48, 32), text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    with pytest.raises(ValueError, match="single token"):
        tiny_pipeline(placeholder_token="two words").placeholder_token_id


def test_a_batch_with_no_rows_is_refused_by_name():
    """Zero references broadcast against one prompt (or zero prompts against one reference) used to return an empty
    result that silently dropped the other argument; the CompoDiff pipeline refuses empty input too."""
    pipe = tiny_pipeline(with_vision=True)
    with pytest.raises(ValueError, match=r"`image_embeds` holds no reference embedding \(shape \(0, 24\)\)"):
        pipe(image_embeds=torch.randn(0, 24), prompt="x")
    with pytest.raises(ValueError, match=r"`image_embeds` holds no reference embedding \(shape \(0, 24\)\)"):
        pipe(image_embeds=torch.randn(0, 24), prompt=["x", "y"])
    with pytest.raises(ValueError, match=r"`pseudo_tokens` holds no pseudo token \(shape \(0, 32\)\)"):
        pipe(pseudo_tokens=torch.randn(0, 32), prompt="x")
    ids = pipe.tokenizer(["a photo of $"], return_tensors="pt").input_ids
    with pytest.raises(ValueError, match=r"`prompt_input_ids` holds no prompt \(shape \(0, 6\)\)"):
        pipe(image_embeds=torch.randn(1, 24), prompt_input_ids=ids[:0])
    with pytest.raises(ValueError, match=r"`image` holds no image \(shape \(0, 3, 30, 30\)\)"):
        pipe(image=torch.zeros(0, 3, 30, 30), prompt="x")
    with pytest.raises(ValueError, match=r"`images` holds no image \(shape \(0, 3, 30, 30\)\)"):
        pipe.encode_image(torch.zeros(0, 3, 30, 30))
    with pytest.raises(ValueError, match=r"`image` is an empty list"):
        pipe(image=[], prompt="x")


def test_prompt_input_ids_and_batch_size_are_checked_before_the_towers_run():
    pipe = tiny_pipeline(with_vision=True)
    ids = pipe.tokenizer(["a photo of $"], return_tensors="pt").input_ids
    with pytest.raises(ValueError, match=r"`prompt_input_ids` must hold integer token ids, got dtype torch.float32"):
        pipe(image_embeds=torch.randn(1, 24), prompt_input_ids=ids.float())
    outside = ids.clone()
    outside[0, 1], outside[0, 2] = 49408, -1
    with pytest.raises(ValueError, match=r"`prompt_input_ids` holds ids outside the text encoder's vocabulary \[0, 49408\): \[-1, 49408\]"):
        pipe(image_embeds=torch.randn(1, 24), prompt_input_ids=outside)
    # A bool is an int to Python: True was taken as a chunk size and failed inside torch.
    with pytest.raises(ValueError, match=r"`batch_size` must be an integer >= 1, got True \(bool\)"):
        pipe(image_embeds=torch.randn(1, 24), prompt="x", batch_size=True)
    with pytest.raises(ValueError, match=r"`batch_size` must be an integer >= 1, got True \(bool\)"):
        pipe.encode_image(_images(2), batch_size=True)


# ------------------------------------------------------------------------------------------- images


def _images(count):
    rng = np.random.default_rng(0)
    return [PIL.Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)) for _ in range(count)]


def test_encode_image_batches_and_matches_the_vision_tower():
    pipe = tiny_pipeline(with_vision=True)
    images = _images(3)
    embeds = pipe.encode_image(images, batch_size=2, show_progress=True)
    with torch.no_grad():
        expected = pipe.image_encoder(pixel_values=pipe.image_processor(images=images, return_tensors="pt").pixel_values).image_embeds
    assert embeds.shape == (3, 24)
    assert torch.allclose(embeds, expected, atol=TOLERANCE)
    pixels = pipe.image_processor(images=images, return_tensors="pt").pixel_values
    assert torch.allclose(pipe.encode_image(pixels), expected, atol=TOLERANCE)
    from_pixels = pipe(image=images, prompt=["a", "b", "c"]).image_embeds
    assert torch.allclose(from_pixels, pipe(image_embeds=embeds, prompt=["a", "b", "c"]).image_embeds, atol=TOLERANCE)
    with pytest.raises(TypeError, match="`images` must be"):
        pipe.encode_image([3])


def test_image_paths_are_read_like_the_pil_images_of_the_files(tmp_path):
    """CompoDiffPipeline and LinCIRPipeline both take a path wherever they take a PIL image (LinCIR refused paths,
    CompoDiff a single one)."""
    pipe = tiny_pipeline(with_vision=True)
    images = _images(2)
    for index, image in enumerate(images):
        image.save(tmp_path / f"{index}.png")
    files = [PIL.Image.open(tmp_path / f"{index}.png") for index in range(2)]
    expected = pipe(image=files[0], prompt="is red").image_embeds
    for path in (str(tmp_path / "0.png"), tmp_path / "0.png", [tmp_path / "0.png"]):
        torch.testing.assert_close(pipe(image=path, prompt="is red").image_embeds, expected, atol=0, rtol=0)
    mixed = pipe(image=[files[0], str(tmp_path / "1.png")], prompt=["a", "b"]).image_embeds
    torch.testing.assert_close(mixed, pipe(image=files, prompt=["a", "b"]).image_embeds, atol=0, rtol=0)
    torch.testing.assert_close(
        pipe.encode_image([tmp_path / "1.png", files[0]], batch_size=1), pipe.encode_image(files[::-1], batch_size=1),
        atol=0, rtol=0,
    )
    with pytest.raises(ValueError, match=r"`image` is the path 'not an image', but there is no file there"):
        pipe(image="not an image", prompt="x")
    with pytest.raises(ValueError, match=r"`images`\[2\] is the path .*missing\.png', but there is no file there"):
        pipe.encode_image([files[0], files[1], tmp_path / "missing.png"], batch_size=1)


def test_without_vision_tower_images_are_an_error():
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="no `image_encoder`"):
        pipe(image=_images(1), prompt="x")


# ------------------------------------------------------------------------------------------- save / load


def test_save_and_load_round_trip(tmp_path):
    pipe = tiny_pipeline(with_vision=True, prompt_template="a picture of $ , {text}")
    image_embeds = torch.randn(2, 24)
    expected = pipe(image_embeds=image_embeds, prompt=["a", "b"]).image_embeds
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["phi"] == ["diffusers_cir.models.textual_inversion_projection", "TextualInversionProjection"]
    assert index["prompt_template"] == "a picture of $ , {text}"
    reloaded = LinCIRPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert reloaded.config.prompt_template == "a picture of $ , {text}"
    assert isinstance(reloaded.image_encoder, CLIPVisionModelWithProjection)
    assert torch.allclose(reloaded(image_embeds=image_embeds, prompt=["a", "b"]).image_embeds, expected, atol=TOLERANCE)
    assert torch.allclose(reloaded.encode_image(_images(2)), pipe.encode_image(_images(2)), atol=TOLERANCE)


def test_saved_folder_with_the_short_library_form_loads(tmp_path):
    """`model_index.json` entries written as ["diffusers_cir", "TextualInversionProjection"] keep loading."""
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["phi"] = ["diffusers_cir", "TextualInversionProjection"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    reloaded = LinCIRPipeline.from_pretrained(tmp_path)
    assert reloaded.image_encoder is None and reloaded.image_processor is None
    image_embeds = torch.randn(1, 24)
    reloaded.set_progress_bar_config(disable=True)
    assert torch.allclose(
        reloaded(image_embeds=image_embeds, prompt="x").image_embeds, pipe(image_embeds=image_embeds, prompt="x").image_embeds, atol=TOLERANCE
    )


# ------------------------------------------------------------------------------------------- integration


def test_gallery_cache_and_compose_path_drive_the_pipeline(tmp_path):
    """Retrieval's gallery cache (what index build and evaluate embed with) and its compose path call LinCIR."""
    from diffusers_cir.retrieval import compose_queries, encode_gallery, load_gallery_encoder

    pipe = tiny_pipeline(with_vision=True)
    pipe.save_pretrained(tmp_path / "lincir")
    images = _images(3)
    for index, image in enumerate(images):
        image.save(tmp_path / f"{index}.png")
    encoder = load_gallery_encoder(tmp_path / "lincir")
    assert encoder.fingerprint == pipe.fingerprint
    gallery = encode_gallery(encoder, [tmp_path / f"{index}.png" for index in range(3)], tmp_path / "gallery",
                             batch_size=2, show_progress=False)
    reference_embeds = torch.from_numpy(np.concatenate([part[0] for part in gallery.iter_parts()]))
    assert torch.allclose(reference_embeds, pipe.encode_image(images), atol=TOLERANCE)
    composed = compose_queries(pipe, ["is red", "is blue", "is green"], reference_embeds=reference_embeds)
    expected = pipe(image_embeds=reference_embeds, prompt=["is red", "is blue", "is green"], normalize=True).image_embeds
    assert torch.allclose(composed, expected, atol=TOLERANCE)
    # FashionIQ (both caption orders as separate prompts, averaged) equals the pipeline's pair mode.
    queries = compose_queries(pipe, [["is dark and has a logo", "has a logo and is dark"]],
                              reference_embeds=reference_embeds[:1])
    paired = pipe(image_embeds=reference_embeds[:1], prompt=[("is dark", "has a logo")], normalize=True).image_embeds
    assert torch.allclose(queries, paired, atol=TOLERANCE)


# ------------------------------------------------------------------------------------------- docs


@pytest.mark.parametrize(
    "module",
    [
        "diffusers_cir.models.textual_inversion_projection",
        "diffusers_cir.pipelines.pipeline_lincir",
        "diffusers_cir.conversion.lincir",
        "diffusers_cir.text.keywords",
        "diffusers_cir.text.self_masking",
    ],
)
def test_docstring_examples_run(module):
    results = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert results.attempted > 0 and results.failed == 0


@pytest.mark.parametrize("template", ["a {photo} of $ that {text}", "a {} $ that {text}", "a photo of $ that {text} }"])
def test_prompt_template_with_other_fields_is_refused_by_name(template):
    """str.format would fail with a bare KeyError/IndexError deep in the call; the message names the argument."""
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="`prompt_template` .* '\\{text\\}' must be its only replacement field"):
        pipe(image_embeds=torch.randn(1, 24), prompt="x", prompt_template=template)
    with pytest.raises(ValueError, match="`prompt_template`"):
        tiny_pipeline(prompt_template=template)
    # escaped braces are fine
    escaped = pipe(image_embeds=torch.randn(1, 24), prompt="x", prompt_template="a {{photo}} of $ that {text}")
    assert escaped.image_embeds.shape == (1, 24)
