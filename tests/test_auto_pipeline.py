"""AutoCIRPipeline: saved folders by their class, released layouts converted once into a cache."""

import os
import shutil
from pathlib import Path

import pytest
import torch

from diffusers_cir import AutoCIRPipeline, CompoDiffPipeline, LinCIRPipeline
from diffusers_cir.conversion import convert_compodiff_checkpoint_to_pipeline

SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference"
COMPODIFF_RELEASE = SHARED / "compodiff_tiny" / "original_checkpoint"
LINCIR = SHARED / "lincir_tiny"

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.skipif(not COMPODIFF_RELEASE.is_dir(), reason="needs ../shared/reference")
def test_released_compodiff_layout_loads_like_convert_then_load(tmp_path):
    release = tmp_path / "CompoDiff-Tiny"
    shutil.copytree(COMPODIFF_RELEASE, release)
    auto = AutoCIRPipeline.from_pretrained(release, conversion_cache_dir=tmp_path / "cache")
    convert_compodiff_checkpoint_to_pipeline(str(release), str(tmp_path / "converted"))
    converted = CompoDiffPipeline.from_pretrained(tmp_path / "converted")
    assert type(auto) is CompoDiffPipeline
    dim = auto.embedding_dim
    text = torch.randn(2, 77, auto.transformer.config.text_embedding_dim)
    kwargs = dict(image_embeds=torch.randn(2, dim), prompt_embeds=text, negative_prompt_embeds=torch.zeros_like(text[:1]),
                  num_inference_steps=5)
    first = auto(**kwargs, generator=torch.Generator().manual_seed(3)).image_embeds
    second = converted(**kwargs, generator=torch.Generator().manual_seed(3)).image_embeds
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    # converted once: a second load reuses the cache folder, a changed release converts again
    entries = sorted(os.listdir(tmp_path / "cache"))
    AutoCIRPipeline.from_pretrained(release, conversion_cache_dir=tmp_path / "cache")
    assert sorted(os.listdir(tmp_path / "cache")) == entries
    (release / "config.json").write_text((release / "config.json").read_text().replace('"timesteps": 1000', '"timesteps": 1000 '))
    AutoCIRPipeline.from_pretrained(release, conversion_cache_dir=tmp_path / "cache")
    assert len(os.listdir(tmp_path / "cache")) == len(entries) + 2  # folder + lock


@pytest.mark.skipif(not LINCIR.is_dir(), reason="needs ../shared/reference")
def test_released_lincir_file_needs_and_uses_a_clip_folder(tmp_path):
    with pytest.raises(ValueError, match="clip_model_name_or_path"):
        AutoCIRPipeline.from_pretrained(LINCIR / "phi_original.pt", conversion_cache_dir=tmp_path)
    from diffusers_cir.utils import build_offline_clip_tokenizer

    clip = tmp_path / "clip"
    shutil.copytree(LINCIR / "text_encoder", clip / "text_encoder")
    build_offline_clip_tokenizer().save_pretrained(clip / "tokenizer")
    pipe = AutoCIRPipeline.from_pretrained(
        LINCIR / "phi_original.pt", clip_model_name_or_path=clip, with_image_encoder=False, conversion_cache_dir=tmp_path
    )
    assert type(pipe) is LinCIRPipeline


def test_a_folder_of_no_known_layout_is_described(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError) as error:
        AutoCIRPipeline.from_pretrained(tmp_path)
    message = str(error.value)
    assert "notes.txt, weights.bin" in message
    assert "compodiff-released" in message and "lincir-phi" in message and "CompoDiffPipeline" in message


def test_a_model_index_naming_an_unknown_class_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(ValueError, match="StableDiffusionPipeline.*not a CIR pipeline"):
        AutoCIRPipeline.from_pretrained(tmp_path)
