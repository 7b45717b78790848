"""The composition-network family: heads, the three backbones (transformers CLIP, open_clip, BLIP-2) and the pipeline's
call. The contract itself is checked in test_pipeline_contract.py."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline_tester import picture
from tiny_fusion import (
    OPEN_CLIP_CONFIG,
    tiny_blip2_parts,
    tiny_clip_parts,
    tiny_composition_pipeline,
    tiny_head,
    tiny_open_clip_parts,
)

from diffusers_cir import (
    AutoCIRPipeline,
    Clip4CirCombiner,
    Clip4CirPipeline,
    MTSTPipeline,
    SCOTPipeline,
)
from diffusers_cir.pipelines import composition_encoders as encoders

pytestmark = pytest.mark.usefixtures("single_thread")


# --------------------------------------------------------------------------------------------- heads
def test_combiner_is_the_residual_sum_with_a_learned_mixing_coefficient():
    head = tiny_head("combiner")
    image, text = torch.randn(4, 16), torch.randn(4, 16)
    output = head(image, text)
    mixing = output.mixing_weight
    assert mixing.shape == (4, 1) and ((mixing > 0) & (mixing < 1)).all()
    # With the residual branch's output layer at zero, the query is the mix of the raw features alone.
    with torch.no_grad():
        head.combiner.output_layer.weight.zero_()
        head.combiner.output_layer.bias.zero_()
    output = head(image, text)
    torch.testing.assert_close(output.composed_embeds, F.normalize(output.mixing_weight * text + (1 - output.mixing_weight) * image, dim=-1))


def test_combiner_keeps_the_authors_layer_names():
    names = {name for name, _ in tiny_head("combiner").combiner.named_parameters()}
    assert {"text_projection_layer.weight", "image_projection_layer.weight", "combiner_layer.weight",
            "output_layer.weight", "dynamic_scalar.0.weight", "dynamic_scalar.3.weight"} <= names


def test_two_hop_head_composes_its_prototype_with_the_text():
    head = tiny_head("two_hop")
    image, text = torch.randn(3, 16), torch.randn(3, 16)
    output = head(image, text)
    prototype = head.prototype(image, text)
    torch.testing.assert_close(output.prototype, prototype)
    torch.testing.assert_close(output.composed_embeds, head.compose_prototype(prototype, text)[0])
    # the second hop reads the text again: another text, another query from the same prototype
    assert not torch.allclose(head.compose_prototype(prototype, text.flip(0))[0], output.composed_embeds)


@pytest.mark.parametrize("bad", [{"feature_dim": 0}, {"projection_dim": True}, {"dropout": 1.0}])
def test_head_configuration_is_checked(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        Clip4CirCombiner(**{"feature_dim": 8, "projection_dim": 16, "hidden_dim": 16, **bad})


def test_head_refuses_features_of_another_width():
    with pytest.raises(ValueError, match=r"image_features.*\(batch_size, 16\)"):
        tiny_head()(torch.randn(2, 8), torch.randn(2, 16))


# --------------------------------------------------------------------------------------------- open_clip towers
def _open_clip_model(config):
    from diffusers_cir.models._open_clip import build_open_clip_model

    torch.manual_seed(0)
    return build_open_clip_model(config).eval()


@pytest.mark.parametrize("vision_cfg", [OPEN_CLIP_CONFIG["vision_cfg"], {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8}])
def test_open_clip_towers_compute_what_open_clip_computes(vision_cfg):
    """Image and text features of the wrappers equal open_clip's encode_image / encode_text (a ViT and a ResNet),
    with the offline CLIP tokenizer's ids in place of open_clip's tokenizer and the processor in place of its
    transform."""
    import open_clip

    from diffusers_cir import OpenCLIPTextEncoder, OpenCLIPVisionEncoder
    from diffusers_cir.models._open_clip import open_clip_image_processor
    from diffusers_cir.retrieval.images import pixel_values
    from diffusers_cir.utils import build_offline_clip_tokenizer

    config = {**OPEN_CLIP_CONFIG, "vision_cfg": vision_cfg}
    model = _open_clip_model(config)
    vision, text = OpenCLIPVisionEncoder(config).eval(), OpenCLIPTextEncoder(config).eval()
    vision.visual.load_state_dict(model.visual.state_dict())
    text.clip.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("visual.")})

    texts = ["a red cup", "turn the chair into a metal vase and make it green"]
    expected_text = model.encode_text(open_clip.get_tokenizer("ViT-B-32")(texts))
    tokens = encoders.tokenize_texts(build_offline_clip_tokenizer(), text, texts)
    torch.testing.assert_close(encoders.text_features(text, tokens["input_ids"]), expected_text, atol=1e-6, rtol=0)

    images = [picture(0, size=(50, 40)), picture(1, size=(33, 64))]
    transform = open_clip.image_transform(32, is_train=False)
    expected_image = model.encode_image(torch.stack([transform(image) for image in images]))
    processed = pixel_values(open_clip_image_processor(model), images)
    torch.testing.assert_close(encoders.image_features(vision, processed), expected_image, atol=2e-5, rtol=0)


def test_open_clip_components_load_a_registered_model_with_its_weights(tmp_path):
    import open_clip

    (tmp_path / "tiny-test-clip.json").write_text(json.dumps(OPEN_CLIP_CONFIG))
    open_clip.add_model_config(tmp_path / "tiny-test-clip.json")
    model = _open_clip_model(OPEN_CLIP_CONFIG)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    parts = encoders.load_open_clip_components("tiny-test-clip", pretrained=str(tmp_path / "weights.pt"))
    pipe = Clip4CirPipeline(fusion_head=tiny_head(), **parts)
    pipe.set_progress_bar_config(disable=True)
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(pipe.encode_image(pixels), model.encode_image(pixels), atol=1e-6, rtol=0)
    assert parts["image_processor"].crop_size == {"height": 32, "width": 32}


def test_open_clip_text_tower_refuses_ids_shorter_than_its_context():
    from diffusers_cir import OpenCLIPTextEncoder

    with pytest.raises(ValueError, match="padding='max_length', max_length=77"):
        OpenCLIPTextEncoder(OPEN_CLIP_CONFIG)(torch.full((1, 10), 49407))


def test_hugging_face_text_towers_of_open_clip_are_refused():
    from diffusers_cir import OpenCLIPTextEncoder

    config = {**OPEN_CLIP_CONFIG, "text_cfg": {**OPEN_CLIP_CONFIG["text_cfg"], "hf_model_name": "bert-base-uncased"}}
    with pytest.raises(ValueError, match="tokenizer is not CLIP's"):
        OpenCLIPTextEncoder(config)


# --------------------------------------------------------------------------------------------- BLIP-2 towers
def test_blip2_features_are_the_pooled_query_embeddings_and_the_cls_embedding(tmp_path):
    parts = tiny_blip2_parts(tmp_path)
    pixels = torch.randn(2, 3, 32, 32)
    queries = parts["image_encoder"](pixel_values=pixels).image_embeds
    assert queries.shape == (2, 4, 16)
    torch.testing.assert_close(encoders.image_features(parts["image_encoder"], pixels), queries.mean(dim=1))
    tokens = encoders.tokenize_texts(parts["tokenizer"], parts["text_encoder"], ["is red", "has two dogs"])
    assert tokens["max_length"] == 40  # the Q-Former's positions, not BERT's 512
    features = encoders.text_features(parts["text_encoder"], tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(2))
    # the padding of the shorter text does not reach its feature: the attention mask is passed
    alone = encoders.tokenize_texts(parts["tokenizer"], parts["text_encoder"], ["is red"])
    torch.testing.assert_close(encoders.text_features(parts["text_encoder"], alone["input_ids"], alone["attention_mask"]),
                               features[:1], atol=1e-6, rtol=0)


def test_blip2_pipeline_saves_and_reloads(tmp_path):
    pipe = SCOTPipeline(fusion_head=tiny_head(), **tiny_blip2_parts(tmp_path))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "saved")
    loaded = AutoCIRPipeline.from_pretrained(tmp_path / "saved")
    assert type(loaded) is SCOTPipeline and loaded.fingerprint == pipe.fingerprint
    query = dict(image=picture(3), prompt="make it blue")
    torch.testing.assert_close(loaded(**query).image_embeds, pipe(**query).image_embeds, atol=1e-6, rtol=0)


def test_open_clip_pipeline_saves_and_reloads(tmp_path):
    pipe = MTSTPipeline(fusion_head=tiny_head("two_hop"), **tiny_open_clip_parts())
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "saved")
    loaded = AutoCIRPipeline.from_pretrained(tmp_path / "saved")
    assert type(loaded) is MTSTPipeline and loaded.fingerprint == pipe.fingerprint
    query = dict(image=picture(4), prompt="is red")
    torch.testing.assert_close(loaded(**query).image_embeds, pipe(**query).image_embeds, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------- the pipeline
def test_query_is_the_head_over_the_towers_features():
    pipe = tiny_composition_pipeline()
    images, texts = [picture(0), picture(1)], ["is red", "has two dogs"]
    expected = pipe.fusion_head(pipe.encode_image(images), pipe.encode_prompt(texts)).composed_embeds
    output = pipe(image=images, prompt=texts)
    torch.testing.assert_close(output.image_embeds, expected)
    torch.testing.assert_close(pipe(image_embeds=pipe.encode_image(images), prompt_embeds=pipe.encode_prompt(texts)).image_embeds,
                               expected)


def test_a_single_reference_or_text_serves_every_query():
    pipe = tiny_composition_pipeline()
    texts = ["is red", "has two dogs", "make it blue"]
    one_image = pipe(image=picture(0), prompt=texts).image_embeds
    torch.testing.assert_close(one_image, pipe(image=[picture(0)] * 3, prompt=texts).image_embeds)
    one_text = pipe(image=[picture(0), picture(1)], prompt="is red").image_embeds
    assert one_text.shape == (2, 16)
    with pytest.raises(ValueError, match="Batch sizes do not match"):
        pipe(image=[picture(0), picture(1)], prompt=texts)


def test_without_an_image_tower_queries_compose_from_gallery_embeddings():
    with_tower = tiny_composition_pipeline()
    without = tiny_composition_pipeline(with_image_encoder=False)
    embeds = with_tower.encode_image([picture(2)])
    torch.testing.assert_close(without(image_embeds=embeds, prompt="is red").image_embeds,
                               with_tower(image=picture(2), prompt="is red").image_embeds)
    with pytest.raises(ValueError, match="has no `image_encoder`.*image_embeds"):
        without(image=picture(2), prompt="is red")


def test_arguments_are_checked_by_name():
    pipe = tiny_composition_pipeline()
    with pytest.raises(ValueError, match="not both"):
        pipe(image=picture(0), image_embeds=torch.randn(1, 16), prompt="is red")
    with pytest.raises(ValueError, match="modification text"):
        pipe(image=picture(0))
    with pytest.raises(ValueError, match=r"`image_embeds` must be a tensor of shape \(batch_size, 16\)"):
        pipe(image_embeds=torch.randn(1, 8), prompt="is red")
    with pytest.raises(ValueError, match="NaN"):
        pipe(image_embeds=torch.full((1, 16), float("nan")), prompt="is red")


def test_head_and_towers_of_other_widths_or_backbones_are_refused(tmp_path):
    parts = tiny_clip_parts()
    with pytest.raises(ValueError, match="width 8 but the text encoder's features have width 16"):
        Clip4CirPipeline(fusion_head=Clip4CirCombiner(feature_dim=8, projection_dim=8, hidden_dim=8), **parts)
    mixed = {**parts, "image_encoder": tiny_blip2_parts(tmp_path)["image_encoder"]}
    with pytest.raises(ValueError, match="same model"):
        Clip4CirPipeline(fusion_head=tiny_head(), **mixed)


def test_long_texts_are_cut_with_one_warning(caplog):
    pipe = tiny_composition_pipeline()
    with caplog.at_level("WARNING"):
        pipe(image=picture(0), prompt=["red " * 100, "is red"])
    assert "1 of the 2 prompts" in caplog.text
