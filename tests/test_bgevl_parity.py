"""Parity with the authors' BGE-VL code (MegaPairs' modeling_MMRet_CLIP.py): fixtures of the `reference/bgevl_tiny`
layout.

Every number goes through this package's own path: the released `checkpoint/` folder is loaded with
`AutoCIRPipeline.from_pretrained` (the registered layout converts it once), and the pipeline tokenises, preprocesses
the PNG files, encodes and composes. Everything about a fixture (texts, image files, truncation lengths, which images
the one-call API saw, tolerances) is read from its `io.json` and tensor names. Fixture folders: `tests/fixtures/
bgevl_tiny` and every folder of `DIFFUSERS_CIR_EXTRA_FIXTURES` holding a BGE-VL release as `checkpoint/`.
"""

import json
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import fixture_folders
from safetensors.torch import load_file

from diffusers_cir import AutoCIRPipeline, BGEVLPipeline
from diffusers_cir.conversion.bgevl import is_released_bgevl_folder

FOLDERS = [folder for folder in fixture_folders("checkpoint/config.json") if is_released_bgevl_folder(folder / "checkpoint")]

pytestmark = pytest.mark.usefixtures("single_thread")


def _max_error(actual, expected) -> float:
    assert tuple(actual.shape) == tuple(expected.shape), (tuple(actual.shape), tuple(expected.shape))
    return (torch.as_tensor(actual).float().cpu() - expected.float()).abs().max().item()


def _truncations(io: dict) -> dict[str, int]:
    """`{"t77": 77, "t75": 75}`: each tokenisation prefix and the length it truncates at (its name says it; the
    padded width can be shorter when every text is)."""
    found = {}
    for key in io:
        match = re.fullmatch(r"(t(\d+))\.input_ids", key)
        if match:
            found[match.group(1)] = int(match.group(2))
    return found


class Fixture:
    def __init__(self, folder, cache_dir):
        self.folder = folder
        self.io = load_file(str(folder / "io.safetensors"))
        self.meta = json.loads((folder / "io.json").read_text())
        self.pipe = AutoCIRPipeline.from_pretrained(folder / "checkpoint", conversion_cache_dir=cache_dir)
        self.pipe.set_progress_bar_config(disable=True)
        self.texts = self.meta["texts"]
        self.files = [str(folder / image["file"]) for image in self.meta["images"]]
        self.api_index = self.io["api.index"].tolist() if "api.index" in self.io else list(self.meta.get("api_subset_index", []))
        tolerance = self.meta.get("tolerance", {})
        self.tolerance = float(tolerance.get("float_outputs_max_abs", 1e-5))
        self.pixel_tolerance = float(tolerance.get("pixel_values_max_abs", self.tolerance))

    def outputs(self, images) -> dict[str, torch.Tensor]:
        """Every float output of io.safetensors computed by the pipeline, from `images` (the PNG paths, or the
        fixture's pixel values) and the texts."""
        pipe, io = self.pipe, self.io
        out = {}
        with torch.no_grad():
            pixel_values = pipe.preprocess_image(images) if isinstance(images, list) else images
            out["pixel_values"] = pixel_values
            out["image_pooled"] = pipe.image_encoder.vision_model(pixel_values=pixel_values).pooler_output
        out["image_features"] = pipe.encode_image(images)
        out["image_embeds"] = image_embeds = pipe(image=images).image_embeds
        for prefix, length in _truncations(io).items():
            tokens = pipe.tokenize_prompt(self.texts, max_sequence_length=length)
            with torch.no_grad():
                out[f"{prefix}.text_pooled"] = pipe.text_encoder.text_model(**tokens).pooler_output
            out[f"{prefix}.text_features"] = pipe.encode_prompt(self.texts, max_sequence_length=length)
            out[f"{prefix}.text_embeds"] = pipe(prompt=self.texts, max_sequence_length=length).image_embeds
            out[f"{prefix}.query_embeds"] = query = pipe(image=images, prompt=self.texts, max_sequence_length=length).image_embeds
            out[f"{prefix}.similarity"] = query @ image_embeds.T
        if self.api_index:  # the one-call API: padding only, no truncation (the default length covers these texts)
            subset_texts = [self.texts[i] for i in self.api_index]
            subset_images = [images[i] for i in self.api_index] if isinstance(images, list) else images[self.api_index]
            out["api.text_embeds"] = pipe(prompt=subset_texts).image_embeds
            out["api.image_embeds"] = api_images = pipe(image=images).image_embeds
            out["api.query_embeds"] = query = pipe(image=subset_images, prompt=subset_texts).image_embeds
            out["api.similarity"] = query @ api_images.T
        return out


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    cache = {}

    def get(folder):
        if folder not in cache:
            cache[folder] = Fixture(folder, tmp_path_factory.mktemp(f"bgevl-{folder.name}"))
        return cache[folder]

    return get


def test_fixtures_found():
    assert FOLDERS, "tests/fixtures/bgevl_tiny is missing"


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda folder: folder.name)
def test_the_release_loads_as_a_bgevl_pipeline(fixtures, folder):
    fixture = fixtures(folder)
    assert type(fixture.pipe) is BGEVLPipeline
    assert fixture.pipe.embedding_dim == fixture.io["image_features"].shape[1]


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda folder: folder.name)
def test_token_ids_are_the_references(fixtures, folder):
    fixture = fixtures(folder)
    io, pipe = fixture.io, fixture.pipe
    for prefix, length in _truncations(io).items():
        tokens = pipe.tokenize_prompt(fixture.texts, max_sequence_length=length)
        assert torch.equal(tokens.input_ids, io[f"{prefix}.input_ids"]), prefix
        assert torch.equal(tokens.attention_mask, io[f"{prefix}.attention_mask"]), prefix
    if fixture.api_index:
        tokens = pipe.tokenize_prompt([fixture.texts[i] for i in fixture.api_index])
        assert torch.equal(tokens.input_ids, io["api.input_ids"])
        assert torch.equal(tokens.attention_mask, io["api.attention_mask"])


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda folder: folder.name)
def test_every_output_from_the_reference_pixel_values(fixtures, folder):
    """The towers, pooling, projection, composition and normalisation, whatever Pillow is installed."""
    fixture = fixtures(folder)
    outputs = fixture.outputs(fixture.io["pixel_values"])
    errors = {name: _max_error(value, fixture.io[name]) for name, value in outputs.items()}
    assert max(errors.values()) <= fixture.tolerance, errors
    token_tensors = {key for key in fixture.io if key.endswith(("input_ids", "attention_mask"))}  # compared above
    assert set(fixture.io) - {"api.index"} - token_tensors <= set(outputs), "a tensor of the fixture is not compared"


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda folder: folder.name)
def test_every_output_from_the_png_files(fixtures, folder):
    """On any Pillow: the resize runs in Pillow 13's pass order (`diffusers_cir.retrieval.images.resize`)."""
    fixture = fixtures(folder)
    outputs = fixture.outputs(fixture.files)
    errors = {name: _max_error(value, fixture.io[name]) for name, value in outputs.items()}
    assert errors.pop("pixel_values") <= fixture.pixel_tolerance
    assert max(errors.values()) <= fixture.tolerance, errors


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda folder: folder.name)
def test_png_preprocessing_is_the_references_on_any_pillow(fixtures, folder):
    """Geometry (short-side resize, centre crop), rescale and CLIP normalisation give the reference's pixel values
    exactly, also where Pillow 12's own resize is one 8-bit level off (it runs its passes in the other order)."""
    fixture = fixtures(folder)
    pixel_values = fixture.pipe.preprocess_image(fixture.files)
    assert _max_error(pixel_values, fixture.io["pixel_values"]) <= fixture.pixel_tolerance


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda folder: folder.name)
def test_the_comparisons_could_fail(fixtures, folder):
    """Controls: the plausible mistakes the comparisons above must catch do change the outputs."""
    fixture = fixtures(folder)
    io, tolerance = fixture.io, fixture.tolerance
    for prefix in _truncations(io):
        summed_normalised = F.normalize(F.normalize(io[f"{prefix}.text_features"], dim=-1) + io["image_embeds"], dim=-1)
        assert _max_error(summed_normalised, io[f"{prefix}.query_embeds"]) > 100 * tolerance
    truncations = sorted(_truncations(io), key=lambda prefix: _truncations(io)[prefix])
    token_counts = fixture.meta.get("token_counts_untruncated", [])
    if len(truncations) == 2 and token_counts and max(token_counts) > _truncations(io)[truncations[0]]:
        shorter, longer = truncations
        assert _max_error(io[f"{shorter}.text_features"], io[f"{longer}.text_features"]) > 100 * tolerance
