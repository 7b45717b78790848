"""Parity with the authors' MagicLens code (JAX/Flax on scenic): fixtures of the `reference/magiclens_tiny` layout.

Every number goes through this package's own path: `checkpoint.pkl` is read without unpickling and converted with
`config.json` into a pipeline folder, which is saved and loaded back through `AutoCIRPipeline`; the PNG files are read
with `diffusers_cir.load_image` and preprocessed by the pipeline's image processor; texts are tokenised by the
pipeline. `io.json` says what each tensor of `io.safetensors` is, so nothing about a particular fixture (sizes, texts,
images) is written here. Fixture folders: `tests/fixtures/magiclens_tiny` and every folder of
`DIFFUSERS_CIR_EXTRA_FIXTURES` with a `checkpoint.pkl`.
"""

import json

import pytest
import torch
from conftest import fixture_folders
from safetensors.torch import load_file

from diffusers_cir import AutoCIRPipeline, load_image
from diffusers_cir.conversion.magiclens import convert_magiclens_checkpoint_to_pipeline
from diffusers_cir.pipelines.image_processing_magiclens import MagicLensImageProcessor
from diffusers_cir.pipelines.pipeline_magiclens import normalize_embeddings

FOLDERS = fixture_folders("checkpoint.pkl")
TOLERANCE = 1e-4  # every tensor, float32 on CPU (the reference README)
EMBEDDING_TOLERANCE = 1e-5  # the final normalised query and gallery embeddings, and their scores

pytestmark = pytest.mark.usefixtures("single_thread")


def _max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert tuple(actual.shape) == tuple(expected.shape), (tuple(actual.shape), tuple(expected.shape))
    return (actual.float() - expected.float()).abs().max().item()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    cache = {}

    def load(folder):
        if folder not in cache:
            io = load_file(str(folder / "io.safetensors"))
            meta = json.loads((folder / "io.json").read_text())
            saved = tmp_path_factory.mktemp(f"magiclens-{folder.name}") / "pipeline"
            convert_magiclens_checkpoint_to_pipeline(folder / "checkpoint.pkl", saved, config_path=folder / "config.json")
            pipe = AutoCIRPipeline.from_pretrained(saved)
            pipe.set_progress_bar_config(disable=True)
            cache[folder] = (pipe, io, meta, _run_all(pipe, folder, io, meta))
        return cache[folder]

    return load


def _intermediates(pipe, pixel_values, input_ids) -> dict[str, torch.Tensor]:
    """Every tensor the fixtures record for one batch, named as in io.safetensors (without the batch prefix)."""
    captured = {}
    hook = pipe.fusion.pooler.attention.register_forward_hook(
        lambda module, args, output: captured.__setitem__("pool_attn_output", output[0])
    )
    try:
        with torch.no_grad():
            image_embeds, vision_tokens = pipe.encode_pixels(pixel_values, output_hidden_states=True)
            text_embeds, text_tokens = pipe.encode_text(input_ids, output_hidden_states=True)
            fused = pipe.fusion(image_embeds, text_embeds, output_hidden_states=True, output_attentions=True)
    finally:
        hook.remove()
    tensors = {
        "pixels": pixel_values.permute(0, 2, 3, 1),  # the fixtures are NHWC
        "ids": input_ids,
        "clip_image_embed": image_embeds,
        "clip_text_embed": text_embeds,
        "clip_vision_tokens": vision_tokens,
        "clip_text_tokens_ln_final": text_tokens,
        "mm_encoder_input": fused.hidden_states[0],
        "mm_encoder_output": fused.last_hidden_state,
        "pool_attn_output": captured["pool_attn_output"],
        "pool_attn_probs": fused.pooler_attentions,
        "pooler_output": fused.pooler_output,
        "multimodal_embed": fused.embeds,
        "multimodal_embed_norm": normalize_embeddings(fused.embeds),
    }
    for index, hidden in enumerate(fused.hidden_states[1:]):
        tensors[f"mm_encoder_layer{index}"] = hidden
    return tensors


def _run_all(pipe, folder, io, meta) -> dict[str, torch.Tensor]:
    """Our value for every tensor of io.safetensors, from the PNG files and the texts of io.json."""
    context = io["query.ids"].shape[1]
    images = [load_image(folder / entry["file"]) for entry in meta["images"]]
    ours = {"images_224": torch.stack([pipe.image_processor.squash(image) for image in images]).permute(0, 2, 3, 1)}
    pixel_values = pipe.image_processor(images).pixel_values
    ours["pixels"] = pixel_values.permute(0, 2, 3, 1)
    batches = {
        "query": pipe.tokenize(meta["query_texts"], pad_to=context),
        "gallery": pipe.tokenize([meta["gallery_text"]] * len(images), pad_to=context),
    }
    for prefix, input_ids in batches.items():
        ours.update({f"{prefix}.{name}": value for name, value in _intermediates(pipe, pixel_values, input_ids).items()})
    ours["scores"] = ours["query.multimodal_embed_norm"] @ ours["gallery.multimodal_embed_norm"].T
    if "direct_image" in meta:
        # The second path: an image that goes straight into the model (values / 255, no squash), so the model's own
        # centre crop and resize do the work.
        direct = MagicLensImageProcessor(
            do_divide_by_max=False, squash_size=None, image_size=pipe.image_processor.image_size,
            image_mean=pipe.image_processor.image_mean, image_std=pipe.image_processor.image_std,
        )
        image = load_image(folder / meta["direct_image"]["file"])
        ours["direct.image"] = direct.to_unit_range(image)[None].permute(0, 2, 3, 1)
        ids = pipe.tokenize([meta["direct_text"]], pad_to=context)
        ours.update({f"direct.{name}": value for name, value in _intermediates(pipe, direct(image).pixel_values, ids).items()})
    return ours


def test_fixtures_found():
    assert FOLDERS, "tests/fixtures/magiclens_tiny is missing"


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda folder: folder.name)
def test_every_recorded_tensor_matches(loaded, folder):
    pipe, io, meta, ours = loaded(folder)
    assert set(io) <= set(ours), f"tensors the test does not compute: {sorted(set(io) - set(ours))}"
    errors = {name: _max_error(ours[name], io[name]) for name in io}
    assert max(errors.values()) <= TOLERANCE, {name: error for name, error in errors.items() if error > TOLERANCE}


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda folder: folder.name)
def test_token_ids_are_exact(loaded, folder):
    pipe, io, meta, ours = loaded(folder)
    for name in [name for name in io if name.endswith(".ids")]:
        assert torch.equal(ours[name].long(), io[name].long()), name


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda folder: folder.name)
def test_normalised_embeddings_and_scores(loaded, folder):
    pipe, io, meta, ours = loaded(folder)
    for name in [name for name in io if name.endswith("multimodal_embed_norm")] + ["scores"]:
        assert _max_error(ours[name], io[name]) <= EMBEDDING_TOLERANCE, name


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda folder: folder.name)
def test_the_pipeline_calls_give_the_reference_embeddings(loaded, folder):
    """The user-facing calls (pixels in through load_image, texts padded to the longest, not to the context) give the
    reference's normalised query and gallery embeddings."""
    pipe, io, meta, ours = loaded(folder)
    paths = [str(folder / entry["file"]) for entry in meta["images"]]
    query = pipe(image=paths, prompt=meta["query_texts"], normalize=True).image_embeds
    assert _max_error(query, io["query.multimodal_embed_norm"]) <= EMBEDDING_TOLERANCE
    gallery = normalize_embeddings(pipe.encode_image(paths, batch_size=3))
    assert _max_error(gallery, io["gallery.multimodal_embed_norm"]) <= EMBEDDING_TOLERANCE
    assert _max_error(query @ gallery.T, io["scores"]) <= EMBEDDING_TOLERANCE
