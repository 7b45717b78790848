"""CompoDiff's text encoders: CLIP, T5 (transformers T5EncoderModel) and CLIP + T5 joined; the pipeline saves and
loads each, and training encodes texts exactly as the pipeline does. Tiny T5 configs built in code."""

import json
import os

import pytest
import torch
from tiny_components import (
    EMBED_DIM,
    T5_DIM,
    TEXT_DIM,
    tiny_t5_encoder,
    tiny_t5_tokenizer,
    tiny_text_encoder,
)

from diffusers_cir import (
    AutoCIRPipeline,
    CompoDiffPipeline,
    CompoDiffScheduler,
    CompoDiffTransformer,
)
from diffusers_cir.data.streaming import TripletCollator
from diffusers_cir.models.compodiff_text import (
    CompoDiffTextConditioner,
    join_text_hidden_states,
)
from diffusers_cir.training import CachedTextEncoder
from diffusers_cir.utils import build_offline_clip_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")
TEXTS = ["make it red", "replace the cup with a vase", ""]


def pipeline(text_embedding_dim: int, **text_components) -> CompoDiffPipeline:
    torch.manual_seed(0)
    transformer = CompoDiffTransformer(embedding_dim=EMBED_DIM, text_embedding_dim=text_embedding_dim, num_layers=1,
                                       num_attention_heads=2, attention_head_dim=8, num_cross_attention_heads=2).eval()
    pipe = CompoDiffPipeline(transformer=transformer, scheduler=CompoDiffScheduler(), **text_components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def clip_and_t5() -> dict:
    return dict(text_encoder=tiny_text_encoder(), tokenizer=build_offline_clip_tokenizer(),
                text_encoder_2=tiny_t5_encoder(), tokenizer_2=tiny_t5_tokenizer())


def t5_only() -> dict:
    return dict(text_encoder=tiny_t5_encoder(), tokenizer=tiny_t5_tokenizer())


def query(pipe) -> torch.Tensor:
    return pipe(image_embeds=torch.randn(2, EMBED_DIM, generator=torch.Generator().manual_seed(1)),
                prompt=["make it red", "a blue cup"], negative_prompt="a dog",
                generator=torch.Generator().manual_seed(0)).image_embeds


def test_joined_sequences_keep_each_encoder_in_its_own_tokens_and_features():
    clip, t5 = torch.randn(2, 5, 3), torch.randn(2, 4, 2)
    joined = join_text_hidden_states([clip, t5])
    assert joined.shape == (2, 9, 5)
    assert torch.equal(joined[:, :5, :3], clip) and torch.equal(joined[:, 5:, 3:], t5)
    assert not joined[:, :5, 3:].any() and not joined[:, 5:, :3].any()
    # Through the denoiser's linear text projection: a projection per encoder (column blocks) with a shared bias.
    projection = torch.nn.Linear(5, 7)
    projected = projection(joined)
    weight, bias = projection.weight, projection.bias
    torch.testing.assert_close(projected[:, :5], clip @ weight[:, :3].T + bias)
    torch.testing.assert_close(projected[:, 5:], t5 @ weight[:, 3:].T + bias)


def test_t5_encoder_alone_gives_77_tokens_of_its_width_masked_like_its_tokenizer():
    components = t5_only()
    pipe = pipeline(T5_DIM, **components)
    prompt_embeds, negative = pipe.encode_prompt(TEXTS)
    assert prompt_embeds.shape == (3, 77, T5_DIM) and negative.shape == (1, 77, T5_DIM)
    tokens = components["tokenizer"](TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        expected = components["text_encoder"](input_ids=tokens.input_ids,
                                              attention_mask=tokens.attention_mask).last_hidden_state
        unmasked = components["text_encoder"](input_ids=tokens.input_ids).last_hidden_state
    torch.testing.assert_close(prompt_embeds, expected, rtol=0, atol=0)
    assert (unmasked - expected).abs().max() > 1e-4  # the padding mask is applied


def test_clip_and_t5_together_is_the_two_encodings_joined():
    components = clip_and_t5()
    pipe = pipeline(TEXT_DIM + T5_DIM, **components)
    prompt_embeds, _ = pipe.encode_prompt(TEXTS)
    assert prompt_embeds.shape == (3, 154, TEXT_DIM + T5_DIM)
    clip = pipeline(TEXT_DIM, text_encoder=components["text_encoder"], tokenizer=components["tokenizer"])
    t5 = pipeline(T5_DIM, text_encoder=components["text_encoder_2"], tokenizer=components["tokenizer_2"])
    expected = join_text_hidden_states([clip.encode_prompt(TEXTS)[0], t5.encode_prompt(TEXTS)[0]])
    torch.testing.assert_close(prompt_embeds, expected, rtol=0, atol=0)


@pytest.mark.parametrize("components, width", [(t5_only, T5_DIM), (clip_and_t5, TEXT_DIM + T5_DIM)],
                         ids=["t5", "clip+t5"])
def test_pipeline_saves_and_loads_every_text_encoder(components, width, tmp_path):
    pipe = pipeline(width, **components())
    before = query(pipe)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    encoders = [index[name][1] for name in ("text_encoder", "text_encoder_2") if index.get(name, [None])[0]]
    assert "T5EncoderModel" in encoders
    for loader in (CompoDiffPipeline.from_pretrained, AutoCIRPipeline.from_pretrained):
        reloaded = loader(str(tmp_path))
        reloaded.set_progress_bar_config(disable=True)
        assert type(reloaded.text_encoder).__name__ == index["text_encoder"][1]
        torch.testing.assert_close(query(reloaded), before, rtol=0, atol=0)


def test_a_second_text_encoder_needs_its_tokenizer():
    with pytest.raises(ValueError, match="`text_encoder_2` and `tokenizer_2` go together"):
        pipeline(TEXT_DIM + T5_DIM, text_encoder=tiny_text_encoder(), tokenizer=build_offline_clip_tokenizer(),
                 text_encoder_2=tiny_t5_encoder())


def test_training_encodes_collated_ids_exactly_as_the_pipeline_encodes_prompts():
    components = clip_and_t5()
    pipe = pipeline(TEXT_DIM + T5_DIM, **components)
    collate = TripletCollator("embeddings", tokenizer=components["tokenizer"], tokenizer_2=components["tokenizer_2"])
    rows = [{"id": str(i), "reference_image_embeds": [0.0, 1.0], "target_image_embeds": [1.0, 0.0],
             "modification_text": text} for i, text in enumerate(TEXTS[:2])]
    batch = collate(rows)
    encode = CachedTextEncoder(CompoDiffTextConditioner(**components), max_entries=4)
    training = encode([batch["input_ids"], batch["input_ids_2"]])
    torch.testing.assert_close(training, pipe.encode_prompt(TEXTS[:2])[0], rtol=0, atol=1e-6)
    again = encode([batch["input_ids"], batch["input_ids_2"]])  # from the cache, keyed by both encoders' ids
    torch.testing.assert_close(again, training)
    assert encode.hits == 2 and encode.misses == 2


def test_training_with_a_t5_encoder_beside_clip_saves_a_pipeline_that_reloads(tmp_path):
    from diffusers_cir.demo import build_world, write_training_data
    from diffusers_cir.training import main, parse_args

    data = write_training_data(build_world("tiny", seed=0), tmp_path / "world", num_train_triplets=64)
    tiny_t5_encoder().save_pretrained(tmp_path / "t5")
    tiny_t5_tokenizer().save_pretrained(tmp_path / "t5")
    output = tmp_path / "run"
    summary = main(parse_args([
        "--train-data-dir", data, "--text-encoder-name-or-path", os.path.join(data, "text_encoder"),
        "--tokenizer-name-or-path", os.path.join(data, "tokenizer"), "--text-encoder-2-name-or-path",
        str(tmp_path / "t5"), "--tokenizer-2-name-or-path", str(tmp_path / "t5"),
        "--transformer-config", json.dumps({"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8}),
        "--train-batch-size", "8", "--max-train-steps", "2", "--shuffle-buffer-size", "0", "--report-to", "none",
        "--output-dir", str(output),
    ]))
    assert summary["global_step"] == 2
    reloaded = AutoCIRPipeline.from_pretrained(str(output))
    assert type(reloaded.text_encoder_2).__name__ == "T5EncoderModel"
    assert reloaded.transformer.config.text_embedding_dim == reloaded.text_conditioner.hidden_size
    assert reloaded.encode_prompt("make it red")[0].shape[1] == 154
