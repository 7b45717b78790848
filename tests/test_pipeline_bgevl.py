"""BGEVLPipeline and the BGE-VL release layout on tiny components built in code (no download)."""

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from pipeline_tester import picture
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from diffusers_cir import AutoCIRPipeline, BGEVLPipeline
from diffusers_cir.conversion.bgevl import (
    BGEVLConversionError,
    convert_bgevl_checkpoint_to_pipeline,
    is_released_bgevl_folder,
)
from diffusers_cir.utils import build_offline_clip_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

PROJECTION_DIM = 24
LOGGER = "diffusers_cir.pipelines.pipeline_bgevl"


def _text_config():
    # eos_token_id 2, as in every OpenAI-derived CLIP config (and BGE-VL's): pooling at the largest token id
    return dict(vocab_size=49408, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, eos_token_id=2, bos_token_id=0, hidden_act="quick_gelu")


def _vision_config():
    return dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                patch_size=8, hidden_act="quick_gelu")


def _perturb(model, seed):
    """Move every gain and bias off its initial value, so that a dropped one shows up."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def tiny_image_processor():
    return CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def tiny_bgevl_pipeline(seed: int = 0) -> BGEVLPipeline:
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**_text_config(), projection_dim=PROJECTION_DIM))
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**_vision_config(), projection_dim=PROJECTION_DIM))
    pipe = BGEVLPipeline(
        text_encoder=_perturb(text_encoder, seed), tokenizer=build_offline_clip_tokenizer(),
        image_encoder=_perturb(image_encoder, seed + 1), image_processor=tiny_image_processor(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_released_bgevl_folder(path, seed: int = 0):
    """A tiny folder in the layout of BAAI/BGE-VL-base / -large: a CLIPModel save whose config names the authors'
    modeling file in `auto_map`, with the tokenizer and the (default, torchvision-backed) image processor's files."""
    from transformers import CLIPImageProcessor

    torch.manual_seed(seed)
    config = CLIPConfig(text_config=_text_config(), vision_config=_vision_config(), projection_dim=PROJECTION_DIM)
    model = _perturb(CLIPModel(config), seed)
    model.save_pretrained(path)
    build_offline_clip_tokenizer().save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    saved = json.loads((path / "config.json").read_text())
    saved["auto_map"] = {"AutoModel": "modeling_MMRet_CLIP.CLIPModel"}
    saved["architectures"] = ["CLIPModel"]
    (path / "config.json").write_text(json.dumps(saved, indent=2))
    return path


# ------------------------------------------------------------------------------------------------ the composition


def _features(pipe, images, prompts):
    """Raw projected features straight from the towers (no pipeline helper in between)."""
    pixel_values = pipe.image_processor(images=images, return_tensors="pt").pixel_values
    tokens = pipe.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image = pipe.image_encoder(pixel_values=pixel_values).image_embeds
        text = pipe.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).text_embeds
    return image, text


def test_a_composed_query_normalises_the_sum_of_the_raw_features():
    pipe = tiny_bgevl_pipeline()
    images, prompts = [picture(0), picture(1)], ["is red", "has two dogs and a much longer caption"]
    image, text = _features(pipe, images, prompts)
    query = pipe(image=images, prompt=prompts).image_embeds
    torch.testing.assert_close(query, F.normalize(text + image, dim=-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(query.norm(dim=-1), torch.ones(2), atol=1e-6, rtol=0)
    # summing the normalised features instead is a different query: the comparison above can fail
    wrong = F.normalize(F.normalize(text, dim=-1) + F.normalize(image, dim=-1), dim=-1)
    assert (wrong - query).abs().max() > 1e-3


def test_text_only_and_image_only_queries_are_the_normalised_features():
    pipe = tiny_bgevl_pipeline()
    image, text = _features(pipe, [picture(2)], ["a dog"])
    torch.testing.assert_close(pipe(prompt="a dog").image_embeds, F.normalize(text, dim=-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(pipe(image=picture(2)).image_embeds, F.normalize(image, dim=-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(pipe.encode_image([picture(2)]), image, atol=1e-6, rtol=0)  # the gallery side: raw
    torch.testing.assert_close(pipe.encode_prompt("a dog"), text, atol=1e-6, rtol=0)


def test_a_single_reference_or_prompt_is_broadcast():
    pipe = tiny_bgevl_pipeline()
    prompts = ["is red", "is blue", "is green"]
    broadcast = pipe(image=picture(3), prompt=prompts).image_embeds
    repeated = pipe(image=[picture(3)] * 3, prompt=prompts).image_embeds
    torch.testing.assert_close(broadcast, repeated, atol=1e-6, rtol=0)
    one_prompt = pipe(image=[picture(3), picture(4)], prompt="is red").image_embeds
    torch.testing.assert_close(one_prompt, pipe(image=[picture(3), picture(4)], prompt=["is red"] * 2).image_embeds,
                               atol=1e-6, rtol=0)


def test_batching_does_not_change_the_queries():
    pipe = tiny_bgevl_pipeline()
    images, prompts = [picture(seed) for seed in range(5)], [f"variant {seed}" for seed in range(5)]
    whole = pipe(image=images, prompt=prompts).image_embeds
    torch.testing.assert_close(pipe(image=images, prompt=prompts, batch_size=2).image_embeds, whole, atol=1e-6, rtol=0)


def test_long_prompts_are_truncated_with_a_warning(caplog):
    pipe = tiny_bgevl_pipeline()
    long = " ".join(["red"] * 100)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        tokens = pipe.tokenize_prompt(["short", long], max_sequence_length=75)
    assert tokens.input_ids.shape == (2, 75)
    assert tokens.input_ids[1, -1].item() == pipe.tokenizer.eos_token_id  # the end token is kept, the text is cut
    messages = [record.getMessage() for record in caplog.records if record.name == LOGGER]
    assert len(messages) == 1 and "1 of 2 prompts" in messages[0] and "75 tokens" in messages[0] and "prompt 1 (102 tokens)" in messages[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        pipe(prompt=["short", "a bit longer"], max_sequence_length=75)
    assert not [record for record in caplog.records if record.name == LOGGER]
    # 75 and 77 tokens are different queries for a long prompt
    assert (pipe(prompt=long, max_sequence_length=75).image_embeds - pipe(prompt=long).image_embeds).abs().max() > 1e-4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "at least one"),
        (dict(prompt="x", max_sequence_length=78), "max_sequence_length"),
        (dict(prompt="x", max_sequence_length=1), "max_sequence_length"),
        (dict(prompt=["x", 3]), "prompt"),
        (dict(prompt=[]), "prompt"),
        (dict(image_embeds=torch.zeros(2, 7), prompt="x"), "image_embeds"),
        (dict(image_embeds=torch.full((1, PROJECTION_DIM), float("nan")), prompt="x"), "image_embeds"),
        (dict(image_embeds=torch.zeros(0, PROJECTION_DIM), prompt="x"), "image_embeds"),
        (dict(image=torch.zeros(2, 3, 32, 32), prompt=["a", "b", "c"]), "2 reference images but 3 prompts"),
        (dict(image=torch.zeros(3, 32, 32), prompt="x"), "image"),
        (dict(image=[], prompt="x"), "image"),
        (dict(image=[3], prompt="x"), "image"),
        (dict(image="no/such/file.png", prompt="x"), "no file"),
        (dict(prompt="x", batch_size=0), "batch_size"),
        (dict(prompt="x", output_type="pil"), "output_type"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, match):
    pipe = tiny_bgevl_pipeline()
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)
    with pytest.raises(ValueError, match="not both"):
        pipe(image=picture(0), image_embeds=torch.zeros(1, PROJECTION_DIM), prompt="x")


def test_towers_of_different_widths_are_refused():
    pipe = tiny_bgevl_pipeline()
    other = CLIPVisionModelWithProjection(CLIPVisionConfig(**_vision_config(), projection_dim=PROJECTION_DIM + 1))
    with pytest.raises(ValueError, match="projects to 24 dimensions but the image tower to 25"):
        BGEVLPipeline(text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, image_encoder=other,
                      image_processor=pipe.image_processor)


# ------------------------------------------------------------------------------------------------ the release layout


def test_the_released_layout_loads_as_stock_clip_computes(tmp_path):
    release = make_released_bgevl_folder(tmp_path / "BGE-VL-tiny")
    assert is_released_bgevl_folder(release)
    pipe = AutoCIRPipeline.from_pretrained(release, conversion_cache_dir=tmp_path / "cache")
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe) is BGEVLPipeline and type(pipe.image_processor) is CLIPImageProcessorPil
    clip = CLIPModel.from_pretrained(release).eval()
    images, prompts = [picture(5), picture(6)], ["is red", "at night"]
    pixel_values = pipe.image_processor(images=images, return_tensors="pt").pixel_values
    tokens = pipe.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        image = clip.get_image_features(pixel_values=pixel_values)
        text = clip.get_text_features(**tokens)
    image = image if torch.is_tensor(image) else image.pooler_output
    text = text if torch.is_tensor(text) else text.pooler_output
    torch.testing.assert_close(pipe.encode_image(images), image, atol=1e-6, rtol=0)
    torch.testing.assert_close(pipe(image=images, prompt=prompts).image_embeds, F.normalize(image + text, dim=-1),
                               atol=1e-6, rtol=0)
    # converted once: a second load reuses the cache folder
    entries = sorted(path.name for path in (tmp_path / "cache").iterdir())
    AutoCIRPipeline.from_pretrained(release, conversion_cache_dir=tmp_path / "cache")
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == entries


def test_a_plain_clip_folder_is_not_taken_for_bgevl(tmp_path):
    release = make_released_bgevl_folder(tmp_path / "clip")
    config = json.loads((release / "config.json").read_text())
    del config["auto_map"]
    (release / "config.json").write_text(json.dumps(config))
    assert not is_released_bgevl_folder(release)
    with pytest.raises(ValueError, match="bgevl-clip"):  # the layouts are listed
        AutoCIRPipeline.from_pretrained(release, conversion_cache_dir=tmp_path / "cache")


def test_a_release_with_missing_weights_is_refused(tmp_path):
    release = make_released_bgevl_folder(tmp_path / "release")
    weights = load_file(str(release / "model.safetensors"))
    del weights["visual_projection.weight"]
    save_file(weights, str(release / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(BGEVLConversionError, match="visual_projection.weight"):
        convert_bgevl_checkpoint_to_pipeline(release, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_conversion_writes_a_pipeline_folder_and_refuses_to_overwrite_without_asking(tmp_path):
    release = make_released_bgevl_folder(tmp_path / "release")
    convert_bgevl_checkpoint_to_pipeline(release, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "model_index.json").read_text())["_class_name"] == "BGEVLPipeline"
    assert json.loads((tmp_path / "out" / "model_index.json").read_text())["image_processor"][1] == "CLIPImageProcessorPil"
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_bgevl_checkpoint_to_pipeline(release, tmp_path / "out")
    convert_bgevl_checkpoint_to_pipeline(release, tmp_path / "out", overwrite=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_on_the_gpu_agrees_with_float32(tmp_path, dtype):
    release = make_released_bgevl_folder(tmp_path / "release")
    reference = AutoCIRPipeline.from_pretrained(release, conversion_cache_dir=tmp_path / "cache")
    pipe = AutoCIRPipeline.from_pretrained(release, conversion_cache_dir=tmp_path / "cache", torch_dtype=dtype).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    images, prompts = [picture(7), picture(8)], ["is red", "at night"]
    gallery = pipe.encode_image(images)
    assert gallery.dtype == dtype and gallery.device.type == "cuda"
    query = pipe(image=images, prompt=prompts).image_embeds
    assert query.dtype == torch.float32  # the sum and the normalisation run in float32
    expected = reference(image=images, prompt=prompts).image_embeds
    assert F.cosine_similarity(query.cpu(), expected, dim=-1).min() > 0.99
    from_embeds = pipe(image_embeds=gallery, prompt=prompts).image_embeds
    torch.testing.assert_close(from_embeds, query, atol=1e-5, rtol=0)


def test_the_saved_card_names_the_release_and_its_published_numbers_only_for_its_sizes(tmp_path):
    from diffusers_cir.conversion.bgevl import released_model_name

    release = make_released_bgevl_folder(tmp_path / "release")
    convert_bgevl_checkpoint_to_pipeline(release, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "license: mit" in card and "MegaPairs" in card and "diffusers-cir convert bgevl --checkpoint-path" in card
    assert "Table 1" not in card  # tiny sizes: not a release, no published numbers claimed
    large = CLIPConfig(text_config={"hidden_size": 768}, vision_config={"hidden_size": 1024, "num_hidden_layers": 24,
                                                                       "num_attention_heads": 16, "patch_size": 14},
                       projection_dim=768)
    assert released_model_name(large) == "BGE-VL-large"
    assert released_model_name(CLIPConfig(vision_config={"patch_size": 16}, projection_dim=512)) == "BGE-VL-base"
    assert released_model_name(CLIPConfig(projection_dim=512)) is None  # ViT-B/32: no BGE-VL release


def test_convert_bgevl_command(tmp_path, capsys):
    from diffusers_cir.cli import main

    release = make_released_bgevl_folder(tmp_path / "release")
    assert main(["convert", "bgevl", "--checkpoint-path", str(release), "--output", str(tmp_path / "out")]) == 0
    assert "BGEVLPipeline with" in capsys.readouterr().out
    assert type(AutoCIRPipeline.from_pretrained(tmp_path / "out")) is BGEVLPipeline
    capsys.readouterr()
    assert main(["convert", "bgevl", "--checkpoint-path", str(tmp_path / "out"), "--output", str(tmp_path / "again")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("diffusers-cir convert bgevl: error:") and "not a BGE-VL-CLIP release" in error and "\n" not in error
