"""Parity with the authors' LinCIR code: fixtures of the `reference/lincir_tiny` layout.

Every number goes through this package's own path: `phi_original.pt` is converted with the conversion function
(and round-tripped through safetensors), and the pipeline computes the pseudo tokens and the query embeddings.
Fixture folders: `tests/fixtures/lincir_tiny` and every folder of `DIFFUSERS_CIR_EXTRA_FIXTURES` with a
`phi_original.pt`.
"""

import json

import pytest
import torch
from conftest import fixture_folders
from safetensors.torch import load_file
from transformers import CLIPTextModelWithProjection

from diffusers_cir import LinCIRPipeline, TextualInversionProjection
from diffusers_cir.conversion import convert_lincir_phi_checkpoint
from diffusers_cir.utils import build_offline_clip_tokenizer

FOLDERS = fixture_folders("phi_original.pt")
TOLERANCE = 1e-5  # float32 on CPU, as the reference README states


# Every test here runs on one intra-op thread (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


def _max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    return (actual.float() - expected.float()).abs().max().item()


@pytest.fixture(scope="module")
def tokenizer():
    return build_offline_clip_tokenizer()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, tokenizer):
    cache = {}

    def load(folder):
        if folder not in cache:
            io = load_file(str(folder / "io.safetensors"))
            meta = json.loads((folder / "io.json").read_text()) if (folder / "io.json").is_file() else {}
            # Convert, save as safetensors and reload: the parity covers the converted files users get.
            saved = tmp_path_factory.mktemp(f"phi-{folder.name}")
            convert_lincir_phi_checkpoint(str(folder / "phi_original.pt"), output_dir=saved)
            phi = TextualInversionProjection.from_pretrained(saved).eval()
            text_encoder = CLIPTextModelWithProjection.from_pretrained(str(folder / "text_encoder")).eval()
            placeholder_id = meta.get("placeholder_token_id", 259)  # CLIP's "$"
            placeholder = tokenizer.decode([placeholder_id]).strip()
            pipe = LinCIRPipeline(phi=phi, text_encoder=text_encoder, tokenizer=tokenizer, placeholder_token=placeholder)
            pipe.set_progress_bar_config(disable=True)
            assert pipe.placeholder_token_id == placeholder_id
            cache[folder] = (pipe, io, meta)
        return cache[folder]

    return load


def test_fixtures_found():
    assert FOLDERS, "tests/fixtures/lincir_tiny is missing"


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda folder: folder.name)
def test_converted_phi_config_matches_the_checkpoint(loaded, folder):
    pipe, io, meta = loaded(folder)
    config = pipe.phi.config
    expected = meta.get("phi", {})
    assert (config.input_dim, config.output_dim) == (io["image_embeds"].shape[1], io["pseudo_tokens"].shape[1])
    for key in ("input_dim", "hidden_dim", "output_dim"):
        if key in expected:
            assert config[key] == expected[key]
    assert config.activation == "gelu" and config.num_hidden_layers == 2


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda folder: folder.name)
def test_pseudo_tokens(loaded, folder):
    pipe, io, _ = loaded(folder)
    with torch.no_grad():
        pseudo_tokens = pipe.phi(io["image_embeds"]).pseudo_tokens
    assert _max_error(pseudo_tokens, io["pseudo_tokens"]) <= TOLERANCE


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda folder: folder.name)
def test_pipeline_query_embeddings(loaded, folder):
    pipe, io, _ = loaded(folder)
    out = pipe(image_embeds=io["image_embeds"], prompt_input_ids=io["input_ids"])
    assert _max_error(out.pseudo_tokens, io["pseudo_tokens"]) <= TOLERANCE
    assert _max_error(out.image_embeds, io["text_embeds"]) <= TOLERANCE
    # Chunked encoding (one query per forward pass) gives the same numbers.
    chunked = pipe(image_embeds=io["image_embeds"], prompt_input_ids=io["input_ids"], batch_size=1)
    assert _max_error(chunked.image_embeds, io["text_embeds"]) <= TOLERANCE


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda folder: folder.name)
def test_last_hidden_state(loaded, folder):
    pipe, io, _ = loaded(folder)
    with torch.no_grad():
        text_embeds, last_hidden_state = pipe.encode_prompt_with_pseudo_tokens(
            io["input_ids"], io["pseudo_tokens"], output_hidden_states=True
        )
    assert _max_error(last_hidden_state, io["last_hidden_state"]) <= TOLERANCE
    assert _max_error(text_embeds, io["text_embeds"]) <= TOLERANCE


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda folder: folder.name)
def test_the_pseudo_token_is_what_changes_the_output(loaded, folder):
    pipe, io, _ = loaded(folder)
    with torch.no_grad():
        plain = pipe.text_encoder(input_ids=io["input_ids"]).text_embeds
    assert _max_error(plain, io["text_embeds_without_pseudo_token"]) <= TOLERANCE
    # The control differs from the real output, so the comparisons above could fail.
    assert _max_error(io["text_embeds"], io["text_embeds_without_pseudo_token"]) > 100 * TOLERANCE


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda folder: folder.name)
def test_saved_pipeline_reproduces_the_reference(loaded, folder, tmp_path):
    pipe, io, _ = loaded(folder)
    pipe.save_pretrained(tmp_path)
    reloaded = LinCIRPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    out = reloaded(image_embeds=io["image_embeds"], prompt_input_ids=io["input_ids"])
    assert _max_error(out.image_embeds, io["text_embeds"]) <= TOLERANCE
