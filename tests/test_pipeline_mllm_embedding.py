"""MLLMEmbeddingPipeline (E5-V / BGE-VL-MLLM prompts on LLaVA-NeXT) with a tiny LLaVA-NeXT built in code."""

import json
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import LlavaNextForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline_tester import picture
from tiny_mllm import tiny_llava_next, tiny_llava_next_processor, tiny_mllm_pipeline

from diffusers_cir import AutoCIRPipeline, MLLMEmbeddingPipeline
from diffusers_cir.pipelines.pipeline_mllm_embedding import MLLM_PROMPT_PRESETS

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def pipe():
    return tiny_mllm_pipeline()


def test_pooling_is_the_last_tokens_final_hidden_state_of_the_full_model(pipe):
    # The authors' formula: model(**inputs, output_hidden_states=True).hidden_states[-1][:, -1, :] on one prompt.
    image = picture(0)
    inputs = pipe.processor(text=[pipe.prompts.image_prompt], images=[image], return_tensors="pt")
    with torch.no_grad():
        expected = pipe.model(**inputs, output_hidden_states=True).hidden_states[-1][:, -1, :]
    torch.testing.assert_close(pipe.encode_image([image]), expected, atol=1e-6, rtol=0)


def test_a_batch_embeds_like_one_prompt_at_a_time(pipe):
    # Images of different aspect ratios give different numbers of image tokens, so the batch is left-padded.
    images = [picture(1, size=(40, 48)), picture(2, size=(64, 24)), picture(3, size=(20, 20))]
    inputs = pipe.processor(text=[pipe.prompts.image_prompt] * 3, images=images, return_tensors="pt", padding=True)
    assert (inputs["attention_mask"] == 0).any(), "the batch must need padding for this test to mean anything"
    one_by_one = torch.cat([pipe.encode_image([image]) for image in images])
    torch.testing.assert_close(pipe.encode_image(images, batch_size=3), one_by_one, atol=1e-5, rtol=0)
    queries = pipe(image=images, prompt=["is red", "has two dogs on a beach at night", "x"]).image_embeds
    alone = torch.cat([pipe(image=image, prompt=text).image_embeds for image, text in zip(images, ["is red", "has two dogs on a beach at night", "x"])])
    torch.testing.assert_close(queries, alone, atol=1e-5, rtol=0)


def test_the_query_is_the_composed_prompt_filled_with_the_text(pipe):
    image = picture(4)
    filled = pipe.prompts.composed_prompt.replace("{text}", "is red")
    assert 'Modify this image with "is red", desribe modified image in one word:<|eot_id|>' in filled
    expected = pipe.embed_prompts([filled], [image])
    torch.testing.assert_close(pipe(image=image, prompt="is red").image_embeds, expected, atol=1e-6, rtol=0)
    other = pipe(image=image, prompt="is blue").image_embeds
    assert not torch.allclose(other, expected)


def test_a_fashioniq_pair_averages_both_caption_orders(pipe):
    image = picture(5)
    template = pipe.prompts.composed_prompt
    forward = pipe.embed_prompts([template.replace("{text}", "is red, has no sleeves")], [image])
    backward = pipe.embed_prompts([template.replace("{text}", "has no sleeves, is red")], [image])
    query = pipe(image=image, prompt=[("is red.", "has no sleeves?")]).image_embeds
    torch.testing.assert_close(query, (forward + backward) / 2, atol=1e-6, rtol=0)


# E5-V's retrieval.py writes its CIR prompts for LLaVA-Mistral; for E5-V it deletes "[INST] " and " [/INST]" and wraps
# what is left in the README's Llama-3 template. The strings below are quoted from that file (commit bcefe73).
_E5V_LLAVA_PROMPTS = {
    "e5-v": ("[INST] <image>\n Describe this image in one word: [/INST]",
             '[INST] <image>Modify this image with "<sent>", desribe modified image in one word: [/INST]'),
    **{
        f"e5-v-fashioniq-{category}": (
            f"[INST] <image>\n Describe this {word} in one word based on its style: [/INST]",
            f"[INST] <image> change the style of this {word} to <sent>\n Desribe this modified {word} in one word based "
            "on its style: [/INST]",
        )
        for category, word in (("dress", "dress"), ("shirt", "shirt"), ("toptee", "shirt"))
    },
}
_LLAMA3_TEMPLATE = "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n \n"


@pytest.mark.parametrize("name", sorted(_E5V_LLAVA_PROMPTS))
def test_e5v_presets_are_the_authors_cir_prompts_as_evaluated(name):
    def as_e5v(prompt):
        return _LLAMA3_TEMPLATE.format(prompt.replace("[INST] ", "").replace(" [/INST]", "")).replace("<sent>", "{text}")

    gallery, composed = _E5V_LLAVA_PROMPTS[name]
    preset = MLLM_PROMPT_PRESETS[name]
    assert (preset.image_prompt, preset.composed_prompt) == (as_e5v(gallery), as_e5v(composed))
    # The text prompt is the README's, which keeps its trailing space.
    assert preset.text_prompt == _LLAMA3_TEMPLATE.format("{text}\nSummary above sentence in one word: ")


def test_every_preset_builds_and_the_gallery_prompt_keys_the_fingerprint(pipe):
    fingerprints = {}
    for name in MLLM_PROMPT_PRESETS:
        other = tiny_mllm_pipeline(prompts=name)
        assert other.prompts.name == name
        fingerprints[name] = other.fingerprint
    # E5-V spells FashionIQ's toptee "shirt": those two galleries are the same; every other pair differs.
    assert fingerprints["e5-v-fashioniq-shirt"] == fingerprints["e5-v-fashioniq-toptee"]
    assert len(set(fingerprints.values())) == len(MLLM_PROMPT_PRESETS) - 1
    assert tiny_mllm_pipeline().fingerprint == pipe.fingerprint


def test_bge_vl_mllm_resizes_every_image_to_512_square_first():
    bge = tiny_mllm_pipeline(prompts="bge-vl-mllm")
    image = picture(6, size=(40, 60))
    resized = image.resize((512, 512), PIL.Image.Resampling.BICUBIC)
    inputs = bge.processor(text=[bge.prompts.image_prompt], images=[resized], return_tensors="pt")
    with torch.no_grad():
        expected = bge.model(**inputs, output_hidden_states=True).hidden_states[-1][:, -1, :]
    torch.testing.assert_close(bge.encode_image([image]), expected, atol=1e-6, rtol=0)


def test_encode_text_uses_the_text_prompt_and_refuses_a_preset_without_one(pipe):
    texts = ["a dog on the grass", "a red car"]
    expected = pipe.embed_prompts([pipe.prompts.text_prompt.replace("{text}", text) for text in texts])
    torch.testing.assert_close(pipe.encode_text(texts), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="has no text prompt"):
        tiny_mllm_pipeline(prompts="bge-vl-mllm").encode_text("a dog")


def test_bad_prompts_and_inputs_are_refused_by_name(pipe):
    model = tiny_llava_next()
    with pytest.raises(ValueError, match="`prompts` must be one of"):
        MLLMEmbeddingPipeline(model=model, processor=tiny_llava_next_processor(model), prompts="e5v")
    with pytest.raises(ValueError, match="composed_prompt"):
        MLLMEmbeddingPipeline(
            model=model, processor=tiny_llava_next_processor(model),
            prompts={"image_prompt": "<image> one word:", "composed_prompt": "<image> no text here"},
        )
    with pytest.raises(ValueError, match=r"`image`\[0\] must be a PIL image.*Pixel tensors"):
        pipe(image=[torch.zeros(3, 32, 32)], prompt="is red")
    with pytest.raises(ValueError, match="2 reference images but 3 prompts"):
        pipe(image=[picture(0), picture(1)], prompt=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"`prompt\[1\]` must be a string or a pair"):
        pipe(image=picture(0), prompt=["a", ("b", "c", "d")])
    with pytest.raises(ValueError, match="`batch_size` must be an integer >= 1"):
        pipe.encode_image([picture(0)], batch_size=0)


def test_a_processor_of_another_model_is_refused():
    model = tiny_llava_next()
    model.config.image_token_id = 5
    with pytest.raises(ValueError, match="image token"):
        MLLMEmbeddingPipeline(model=model, processor=tiny_llava_next_processor(model))


def _released_folder(folder: Path, architectures=None, legacy_processor=False) -> tuple[Path, MLLMEmbeddingPipeline]:
    """A tiny model saved the way E5-V / BGE-VL-MLLM are published: one transformers folder."""
    model = tiny_llava_next(seed=3)
    processor = tiny_llava_next_processor(model)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    if architectures:
        config["architectures"] = architectures
        config["auto_map"] = {"AutoModel": "modeling_llavanext_for_embedding.LLaVANextForEmbedding"}
    (folder / "config.json").write_text(json.dumps(config))
    if legacy_processor:  # saved before processors expanded image tokens
        for name in ("processor_config.json", "preprocessor_config.json"):
            path = folder / name
            if path.is_file():
                saved = json.loads(path.read_text())
                for key in ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens"):
                    saved.pop(key, None)
                path.write_text(json.dumps(saved))
    return folder, model, processor


@pytest.mark.parametrize("architectures, preset", [(None, "e5-v"), (["LLaVANextForEmbedding"], "bge-vl-mllm")])
def test_a_released_folder_loads_through_auto_pipeline(tmp_path, architectures, preset):
    folder, model, processor = _released_folder(tmp_path / "released", architectures, legacy_processor=True)
    loaded = AutoCIRPipeline.from_pretrained(folder, conversion_cache_dir=tmp_path / "cache")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is MLLMEmbeddingPipeline and loaded.prompts.name == preset
    direct = MLLMEmbeddingPipeline(model=model, processor=processor, prompts=preset)
    images = [picture(7), picture(8, size=(64, 30))]
    torch.testing.assert_close(loaded.encode_image(images), direct.encode_image(images), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        loaded(image=images[0], prompt="is red").image_embeds, direct(image=images[0], prompt="is red").image_embeds,
        atol=1e-6, rtol=0,
    )
    assert loaded.fingerprint == direct.fingerprint
    converted = next(path for path in (tmp_path / "cache").glob("llava-next-embedder-*") if path.is_dir())
    model_config = json.loads((converted / "model" / "config.json").read_text())
    assert model_config["architectures"] == ["LlavaNextForConditionalGeneration"] and "auto_map" not in model_config
    weights = next((converted / "model").glob("*.safetensors"))
    assert weights.stat().st_ino == next(folder.glob("*.safetensors")).stat().st_ino  # hard-linked, not copied


def test_a_released_folder_takes_another_prompt_set(tmp_path):
    folder, _, _ = _released_folder(tmp_path / "released")
    loaded = AutoCIRPipeline.from_pretrained(folder, prompts="e5-v-fashioniq-dress", conversion_cache_dir=tmp_path / "cache")
    assert loaded.prompts == MLLM_PROMPT_PRESETS["e5-v-fashioniq-dress"]


def test_device_map_with_disk_offload_gives_the_same_embeddings(tmp_path, pipe):
    pipe.save_pretrained(tmp_path / "saved")
    offloaded = MLLMEmbeddingPipeline.from_pretrained(
        tmp_path / "saved", device_map="auto", max_memory={"cpu": "200KB"}, offload_folder=str(tmp_path / "offload"),
    )
    offloaded.set_progress_bar_config(disable=True)
    assert "disk" in set(offloaded.model.hf_device_map.values())
    images = [picture(9), picture(10, size=(64, 30))]
    torch.testing.assert_close(offloaded.encode_image(images), pipe.encode_image(images), atol=1e-5, rtol=0)


def test_a_released_folder_loads_in_bfloat16_with_disk_offload_through_auto_pipeline(tmp_path):
    # How a 7-8B model is meant to load: bfloat16 weights, layers placed by accelerate and spilled to disk.
    folder, _, processor = _released_folder(tmp_path / "released")
    loaded = AutoCIRPipeline.from_pretrained(
        folder, torch_dtype=torch.bfloat16, device_map="auto", max_memory={"cpu": "60KB"},  # the model: 135 kB
        offload_folder=str(tmp_path / "offload"), conversion_cache_dir=tmp_path / "cache",
    )
    loaded.set_progress_bar_config(disable=True)
    assert loaded.model.dtype == torch.bfloat16 and "disk" in set(loaded.model.hf_device_map.values())
    # The same weights loaded whole: from_pretrained keeps the rotary inverse frequencies in float32 (a model cast
    # with .to(torch.bfloat16) rounds them too, and embeds up to 8e-3 apart), so placement alone must change nothing.
    whole = LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16)
    in_memory = MLLMEmbeddingPipeline(model=whole, processor=processor)
    images = [picture(11), picture(12, size=(64, 30))]
    gallery = loaded.encode_image(images, batch_size=2)
    assert gallery.dtype == torch.bfloat16 and torch.isfinite(gallery.float()).all()
    torch.testing.assert_close(gallery, in_memory.encode_image(images, batch_size=2), atol=0, rtol=0)
    query = loaded(image=images[0], prompt="is red", output_type="np").image_embeds
    assert query.dtype == np.float32
    expected = in_memory(image=images[0], prompt="is red").image_embeds.float().numpy()
    np.testing.assert_array_equal(query, expected)


def test_diffusers_cir_evaluate_composes_from_the_reference_pixels(tmp_path, pipe):
    from tiny_mllm import evaluate_with_the_command_line

    from diffusers_cir.retrieval import compose_queries

    report, queries, loaded, paths, texts = evaluate_with_the_command_line(pipe, tmp_path)
    assert report["encoder"] == loaded.fingerprint and "recall_at1" in report["metrics"]
    expected = compose_queries(loaded, texts, reference_images=[str(path) for path in paths[: len(texts)]])
    torch.testing.assert_close(queries, expected, atol=1e-5, rtol=0)
