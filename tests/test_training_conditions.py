"""What the denoiser reads in a CompoDiff training step, against what the pipeline feeds it at inference: the reference
embedding's scale on every data path, and the masked (inpainting) objective from the data's precomputed masks."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny_components import (
    EMBED_DIM,
    tiny_pipeline,
)

from diffusers_cir import CompoDiffPipeline
from diffusers_cir.data.precompute import _ProcessorPreprocess
from diffusers_cir.training.compodiff_step import (
    Conditioning,
    reference_condition,
    training_loss,
)
from diffusers_cir.training.components import FrozenEncoders
from diffusers_cir.training.conditioning import ObjectiveRatios
from diffusers_cir.training.masking import masked_image_embeds

pytestmark = pytest.mark.usefixtures("single_thread")


def assert_binomial(frequency: float, probability: float, draws: int, sigmas: float = 5.0) -> None:
    tolerance = sigmas * math.sqrt(probability * (1 - probability) / draws)
    assert abs(frequency - probability) <= tolerance, (frequency, probability, tolerance)
NORM = math.sqrt(EMBED_DIM)  # a new model's reference scale: the target scale, --embedding-scale auto


class RecordingDenoiser(torch.nn.Module):
    """The tiny denoiser, recording the conditions of every call."""

    def __init__(self, transformer):
        super().__init__()
        self.inner, self.calls = transformer, []

    @property
    def config(self):
        return self.inner.config

    def forward(self, noisy, timesteps, image_embeds=None, text_hidden_states=None, mask=None):
        self.calls.append({"image_embeds": image_embeds.detach().clone(),
                           "mask": None if mask is None else mask.detach().clone()})
        return self.inner(noisy, timesteps, image_embeds=image_embeds, text_hidden_states=text_hidden_states, mask=mask)


def _pictures(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(count)]


def _run(source: str, objective_ratios: str = "triplet=1", masks: str = "boxes", norm: float | None = NORM):
    pipe = tiny_pipeline()
    args = SimpleNamespace(text_drop_prob=0.0, image_drop_prob=0.0, both_drop_prob=0.0, condition_dropout="independent",
                           text_embedding_cache_size=0, stage="triplet", masked_objective_masks=masks,
                           embedding_scale="auto")
    encoders = FrozenEncoders(pipe.text_encoder, pipe.tokenizer, pipe.image_encoder, pipe.image_processor)
    recorder = RecordingDenoiser(pipe.transformer)
    run = SimpleNamespace(
        args=args, encoders=encoders, source=source, transformer=recorder, unwrapped=pipe.transformer,
        noise_scheduler=pipe.scheduler, accelerator=SimpleNamespace(device=torch.device("cpu")), dtype=torch.float32,
        noise_generator=torch.Generator().manual_seed(0), ratios=ObjectiveRatios.parse(objective_ratios),
        objective_rows={"triplet": 0, "text_to_image": 0, "masked": 0},
    )
    return pipe, run, Conditioning(run, norm)


def _batch(pipe, references, targets, texts, caption=None, **extra) -> dict:
    caption = torch.zeros(len(texts), dtype=torch.bool) if caption is None else caption
    input_ids = pipe.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return {"ids": [str(i) for i in range(len(texts))], "input_ids": input_ids, "is_text_to_image": caption,
            "reference_image_embeds": references, "target_image_embeds": targets, **extra}


def _inference_reference(pipe, **inputs) -> torch.Tensor:
    """The reference embedding the pipeline hands the denoiser."""
    seen = []
    original = pipe.transformer.encode_guidance_context

    def spy(image_embeds, *args, **kwargs):
        seen.append(image_embeds.detach().clone())
        return original(image_embeds, *args, **kwargs)

    pipe.transformer.encode_guidance_context = spy
    try:
        pipe(prompt="make it red", generator=torch.Generator().manual_seed(0), num_inference_steps=3, **inputs)
    finally:
        del pipe.transformer.encode_guidance_context
    return seen[0]  # [queries, D]: the guidance context builds its three branches from it


def test_the_reference_scale_is_the_same_in_training_and_at_inference_on_every_data_path():
    pictures = _pictures(2)
    pipe, run, conditioning = _run("embeddings")
    inference_pipe = CompoDiffPipeline(**{**pipe.components, "image_embeds_norm": NORM})
    inference_pipe.set_progress_bar_config(disable=True)
    at_inference = _inference_reference(inference_pipe, image=pictures)
    assert torch.allclose(at_inference.norm(dim=-1), torch.full((2,), NORM), atol=1e-4)
    # the same through precomputed reference embeddings (raw, as encode_image gives them, or unit-norm as stored)
    raw = pipe.encode_image(pictures)
    for given in (raw, F.normalize(raw, dim=-1), 3.7 * raw):
        torch.testing.assert_close(_inference_reference(inference_pipe, image_embeds=given), at_inference,
                                   rtol=0, atol=1e-5)

    # training, `embeddings` configuration: the precompute step stores unit-norm embeddings
    stored = F.normalize(raw, dim=-1)
    training_loss(run, conditioning, _batch(pipe, stored, stored.flip(0), ["make it red"] * 2))
    torch.testing.assert_close(run.transformer.calls[-1]["image_embeds"], at_inference, rtol=0, atol=1e-5)

    # training, `images` configuration: encoded on the fly, raw norms
    pipe, run, conditioning = _run("images")
    pixels = _ProcessorPreprocess(pipe.image_processor)(pictures)
    batch = _batch(pipe, None, None, ["make it red"] * 2, reference_pixel_values=pixels, target_pixel_values=pixels)
    training_loss(run, conditioning, batch)
    torch.testing.assert_close(run.transformer.calls[-1]["image_embeds"], at_inference, rtol=0, atol=1e-5)


def test_a_model_without_a_recorded_norm_reads_raw_embeddings_and_refuses_unit_norm_data():
    raw = torch.randn(3, EMBED_DIM) * 5
    assert torch.equal(reference_condition(raw, None), raw)
    assert torch.equal(reference_condition(torch.zeros(2, EMBED_DIM), NORM), torch.zeros(2, EMBED_DIM))  # no reference
    pipe, run, conditioning = _run("embeddings", norm=None)
    targets = torch.randn(3, EMBED_DIM)
    training_loss(run, conditioning, _batch(pipe, raw, targets, ["make it red"] * 3))  # raw data: fine
    torch.testing.assert_close(run.transformer.calls[-1]["image_embeds"], raw)
    pipe, run, conditioning = _run("embeddings", norm=None)
    with pytest.raises(ValueError, match="stores them L2-normalised"):
        training_loss(run, conditioning, _batch(pipe, F.normalize(raw, dim=-1), targets, ["make it red"] * 3))


def test_masked_objective_from_precomputed_masks_and_masked_embeddings():
    pipe, run, conditioning = _run("embeddings", objective_ratios="masked=1", masks="data")
    masks = torch.zeros(4, 64, 64)
    masks[0, :32] = 1
    masks[1, :, 40:] = 1  # rows 0, 1 have a mask; row 2 has none; row 3 is a triplet row
    masked = torch.randn(4, EMBED_DIM)
    masked[2] = 0
    references = torch.randn(4, EMBED_DIM)
    caption = torch.tensor([True, True, True, False])
    batch = _batch(pipe, references.masked_fill(caption[:, None], 0), torch.randn(4, EMBED_DIM), ["a cup"] * 4,
                   caption, mask=masks, masked_target_image_embeds=masked)
    training_loss(run, conditioning, batch)
    call = run.transformer.calls[-1]
    torch.testing.assert_close(call["image_embeds"][:2], F.normalize(masked[:2], dim=-1) * NORM)
    assert torch.equal(call["mask"][:2], masks[:2])
    # a caption row without a mask is trained as text-to-image: no reference, no mask
    assert not call["image_embeds"][2].any() and not call["mask"][2].any()
    torch.testing.assert_close(call["image_embeds"][3], F.normalize(references[3], dim=-1) * NORM)
    assert run.objective_rows == {"triplet": 1, "text_to_image": 1, "masked": 2}


def test_masked_objective_blanks_the_datas_mask_in_images():
    pipe, run, conditioning = _run("images", objective_ratios="masked=1", masks="data")
    pixels = _ProcessorPreprocess(pipe.image_processor)(_pictures(2))
    masks = torch.zeros(2, 64, 64)
    masks[:, 16:48, 16:48] = 1
    batch = _batch(pipe, None, None, ["a cup", "a vase"], torch.tensor([True, True]), mask=masks,
                   reference_pixel_values=torch.zeros_like(pixels), target_pixel_values=pixels)
    training_loss(run, conditioning, batch)
    call = run.transformer.calls[-1]
    expected = F.normalize(masked_image_embeds(pipe.image_encoder, pixels, masks), dim=-1) * NORM
    torch.testing.assert_close(call["image_embeds"], expected, rtol=0, atol=1e-5)
    assert torch.equal(call["mask"], masks) and run.objective_rows["masked"] == 2


# ------------------------------------------------------------------------------------------ keyword triplets
def _keyword_rows(count: int) -> list[dict]:
    return [{"id": f"k{i}", "reference_image_embeds": [1.0, 0.0, float(i)], "target_image_embeds": [0.0, 1.0, float(i)],
             "modification_text": "stored text", "source_keyword": "cup", "target_keyword": "vase",
             "mask": np.ones((4, 4), np.float32)} for i in range(count)]


def test_keyword_triplets_get_a_template_drawn_each_epoch_and_a_swap_half_of_the_time():
    from diffusers_cir.data.streaming import TripletCollator
    from diffusers_cir.generation.templates import KEYWORD_TEMPLATES, fill_template

    collate = TripletCollator("embeddings", keyword_templates=KEYWORD_TEMPLATES, keyword_swap_probability=0.5,
                              return_mask=True, seed=3)
    rows = _keyword_rows(4000)
    batch = collate(rows)
    forward = {fill_template(t, "cup", "vase") for t in KEYWORD_TEMPLATES}
    backward = {fill_template(t, "vase", "cup") for t in KEYWORD_TEMPLATES}
    swapped = batch["reference_image_embeds"][:, 1] == 1.0  # the stored target became the reference
    assert_binomial(swapped.float().mean().item(), 0.5, len(rows))
    for text, is_swapped, mask in zip(batch["texts"], swapped, batch["mask"]):
        assert text in (backward if is_swapped else forward)
        assert bool(mask.any()) != bool(is_swapped)  # a stored mask is of the target: a swapped row has none
    assert torch.equal(batch["target_image_embeds"][swapped, 0], torch.ones(int(swapped.sum())))
    # every template is drawn, and a new epoch draws again (the same draws for the same epoch: exact resume)
    assert len({fill_template(t, "cup", "vase") for t in KEYWORD_TEMPLATES} & set(batch["texts"])) == len(forward)
    again = collate(rows[:200])["texts"]
    collate.epoch = 1
    next_epoch = collate(rows[:200])["texts"]
    assert again == batch["texts"][:200] and next_epoch != again


def test_rows_without_a_keyword_pair_keep_their_text_and_caption_rows_their_caption():
    from diffusers_cir.data.streaming import TripletCollator
    from diffusers_cir.generation.templates import KEYWORD_TEMPLATES, fill_template

    collate = TripletCollator("embeddings", keyword_templates=KEYWORD_TEMPLATES, keyword_swap_probability=1.0,
                              text_to_image_probability=0.5, seed=0)
    plain = {"id": "p", "reference_image_embeds": [1.0, 0.0], "target_image_embeds": [0.0, 1.0],
             "modification_text": "make it red", "target_caption": "a red cup", "source_keyword": None}
    rows = [dict(plain, id=f"p{i}") for i in range(40)] + [
        dict(plain, id=f"k{i}", source_keyword="cup", target_keyword="vase") for i in range(40)]
    batch = collate(rows)
    for row_id, text, caption, reference in zip(batch["ids"], batch["texts"], batch["is_text_to_image"],
                                                batch["reference_image_embeds"]):
        if caption:
            assert text == "a red cup" and not reference.any()  # caption rows: the target's caption, no swap
        elif row_id.startswith("p"):
            assert text == "make it red" and reference[0] == 1.0  # no pair: the stored text, no swap
        else:
            assert text in {fill_template(t, "vase", "cup") for t in KEYWORD_TEMPLATES}
            assert reference[1] == 1.0  # swapped with probability 1
    assert batch["is_text_to_image"].any() and not batch["is_text_to_image"].all()


def test_the_loader_epoch_reaches_the_collator():
    from diffusers_cir.data.streaming import TripletCollator, TripletDataLoader

    collate = TripletCollator("embeddings")
    loader = TripletDataLoader(SimpleNamespace(set_epoch=lambda epoch: None), collate, [], shuffle=False)
    loader.set_epoch(7)
    assert collate.epoch == 7
