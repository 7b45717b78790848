"""Keyword phrases, self-masking and the self-masking projection loss (LinCIR's language-only training)."""

import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from diffusers_cir import TextualInversionProjection
from diffusers_cir.text import (
    RuleBasedKeywordExtractor,
    SelfMaskingCollator,
    SpacyKeywordExtractor,
    TaggedToken,
    clean_caption,
    keyword_spans,
    load_keyword_extractor,
    mask_caption,
    self_masking_projection_loss,
)
from diffusers_cir.utils import build_offline_clip_tokenizer

PLACEHOLDER_ID = 259


@pytest.fixture(scope="module")
def tokenizer():
    return build_offline_clip_tokenizer()


# ------------------------------------------------------------------------------------------- keywords


@pytest.mark.parametrize(
    "caption,keywords",
    [
        ("a man riding a brown horse on the beach", ["a man", "a brown horse", "the beach"]),
        ("A watercolor of a red wooden cup.", ["A watercolor", "a red wooden cup"]),
        ("two dogs are playing in the snow", ["dogs", "the snow"]),
        ("she holds an umbrella, smiling", ["an umbrella"]),
        ("the", []),  # a run of determiners alone names nothing
        ("it is very big and it was parked there", ["big"]),
        ("12 cats near Paris", ["cats", "Paris"]),
    ],
)
def test_rule_based_keywords(caption, keywords):
    assert RuleBasedKeywordExtractor()(caption) == keywords


def test_keyword_runs_follow_lincirs_parts_of_speech():
    # "a young man riding a horse": what spaCy's tagger gives, with character offsets.
    tagged = [("a", "DET"), ("young", "ADJ"), ("man", "NOUN"), ("riding", "VERB"), ("a", "DET"), ("horse", "NOUN"), (".", "PUNCT")]
    tokens, cursor = [], 0
    for text, pos in tagged:
        tokens.append(TaggedToken(text, pos, cursor, cursor + len(text)))
        cursor += len(text) + 1
    text = " ".join(word for word, _ in tagged)
    assert [text[start:end] for start, end in keyword_spans(tokens)] == ["a young man", "a horse"]
    assert [text[start:end] for start, end in keyword_spans(tokens, keyword_pos=("NOUN",))] == ["man", "horse"]


def test_spacy_extractor_reads_pos_tags_of_any_spacy_like_pipeline():
    def fake_nlp(text):  # the attributes spaCy tokens have: text, pos_, idx
        tags = {"Tall": "ADJ", "trees": "NOUN", "near": "ADP", "the": "DET", "lake": "NOUN"}
        words, cursor = [], 0
        for word in text.split(" "):
            words.append(SimpleNamespace(text=word, pos_=tags[word.capitalize() if word == "tall" else word], idx=cursor))
            cursor += len(word) + 1
        return words

    extractor = SpacyKeywordExtractor(fake_nlp)
    assert extractor("Tall trees near the lake") == ["Tall trees", "the lake"]
    assert mask_caption("Tall trees near the lake", extractor).masked_caption == "$ near $"


def test_extractor_choice_without_spacy_model():
    extractor = load_keyword_extractor("auto", spacy_model="no_such_spacy_pipeline_xyz")
    assert isinstance(extractor, RuleBasedKeywordExtractor)
    with pytest.raises(RuntimeError, match="python -m spacy download no_such_spacy_pipeline_xyz"):
        load_keyword_extractor("spacy", spacy_model="no_such_spacy_pipeline_xyz")
    with pytest.raises(ValueError, match="`kind`"):
        load_keyword_extractor("nltk")


# ------------------------------------------------------------------------------------------- masking


def test_mask_caption_strategies():
    masked = mask_caption("A red car. Costs $5!")
    assert masked.caption == "a red car. costs 5!"  # lower-cased, the placeholder character removed
    assert masked.masked_caption == "$ . $ 5!" and masked.strategy == "keywords"
    fallback = [mask_caption("it is", rng=random.Random(seed)) for seed in range(8)]
    assert all(m.strategy == "random_word" and m.masked_caption.count("$") == 1 for m in fallback)
    assert {m.masked_caption for m in fallback} == {"$ is", "it $"}
    assert mask_caption("it is", rng=random.Random(3)) == mask_caption("it is", rng=random.Random(3))
    empty = mask_caption("   ")
    assert (empty.masked_caption, empty.strategy) == ("a photo of $", "template")
    assert clean_caption(None) == ""
    with pytest.raises(TypeError, match="must be a string"):
        clean_caption(3)


def test_placeholder_stays_one_token_next_to_punctuation(tokenizer):
    masked = mask_caption("a red car.").masked_caption
    ids = tokenizer(masked, add_special_tokens=False).input_ids
    assert PLACEHOLDER_ID in ids
    assert tokenizer("$.", add_special_tokens=False).input_ids != [PLACEHOLDER_ID, tokenizer(".", add_special_tokens=False).input_ids[0]]


def test_collator(tokenizer):
    collator = SelfMaskingCollator(tokenizer, seed=0)
    captions = ["a red car on a road", {"text": "it is"}, "", " ".join(["very"] * 90) + " dog"]
    batch = collator(captions)
    # The last caption is over 77 tokens: even padded to the longest of the batch, both widths are the truncation's.
    assert batch["input_ids"].shape == batch["masked_input_ids"].shape == (4, 77)
    assert ((batch["masked_input_ids"] == PLACEHOLDER_ID).sum(dim=-1) >= 1).all()
    assert batch["masked_input_ids"][0, :5].tolist() == [49406, PLACEHOLDER_ID, 525, PLACEHOLDER_ID, 49407]
    template = tokenizer("a photo of $", padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    # The keyword of the last caption sits after token 77: the placeholder is cut off, the template replaces it.
    assert torch.equal(batch["masked_input_ids"][3], template) and torch.equal(batch["masked_input_ids"][2], template)
    assert batch["masked_by_keywords"].tolist() == [True, False, False, False]
    assert torch.equal(batch["input_ids"][0], tokenizer("a red car on a road", padding="max_length", max_length=77, return_tensors="pt").input_ids[0])
    with pytest.raises(TypeError, match="Caption 0 of the batch must be a string"):
        collator([{"text": 5}])


def test_collator_pads_to_the_longest_caption_or_to_max_length(tokenizer):
    captions = ["a red car on a road", {"text": "it is"}, "", "two small dogs are playing in the deep snow near a wooden fence"]
    longest = SelfMaskingCollator(tokenizer, seed=0)(captions)
    full = SelfMaskingCollator(tokenizer, seed=0, padding="max_length")(captions)
    assert full["input_ids"].shape == full["masked_input_ids"].shape == (4, 77)

    texts = [c["text"] if isinstance(c, dict) else c for c in captions]
    lengths = [len(tokenizer(clean_caption(t)).input_ids) for t in texts]
    masked_lengths = [len(tokenizer(mask_caption(t, rng=random.Random(0)).masked_caption).input_ids) for t in texts]
    width, masked_width = max(lengths), max(masked_lengths)
    assert longest["input_ids"].shape == (4, width) and longest["masked_input_ids"].shape == (4, masked_width)
    assert masked_width < width < 77  # the masked captions are shorter: the two widths differ
    # The same tokens, only the padding tail (end-of-text ids) is shorter.
    assert torch.equal(longest["input_ids"], full["input_ids"][:, :width])
    assert torch.equal(longest["masked_input_ids"], full["masked_input_ids"][:, :masked_width])
    assert (full["input_ids"][:, width:] == tokenizer.pad_token_id).all()
    assert torch.equal(longest["masked_by_keywords"], full["masked_by_keywords"])
    for row, length in zip(longest["input_ids"], lengths):
        assert (row[length:] == tokenizer.pad_token_id).all() and row[length - 1] == tokenizer.eos_token_id


def test_collator_rejects_unknown_padding(tokenizer):
    with pytest.raises(ValueError, match=r"`padding` must be one of \['longest', 'max_length'\], got 'max'"):
        SelfMaskingCollator(tokenizer, padding="max")
    with pytest.raises(ValueError, match="`padding`"):
        SelfMaskingCollator(tokenizer, padding=True)


# ------------------------------------------------------------------------------------------- the loss


def _tiny_text_encoder():
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=24,
        max_position_embeddings=77, eos_token_id=49407, bos_token_id=49406, pad_token_id=49407,
    )
    return CLIPTextModelWithProjection(config).eval().requires_grad_(False)


def test_loss_is_lincirs_objective_and_trains_only_phi(tokenizer, single_thread):
    from diffusers_cir.pipelines.pipeline_lincir import encode_text_with_pseudo_tokens

    text_encoder = _tiny_text_encoder()
    phi = TextualInversionProjection(24, 96, 32, dropout=0.0)
    batch = SelfMaskingCollator(tokenizer, seed=0)(["a red car on a road", "two dogs in the snow", "a cup of tea"])
    generator = torch.Generator().manual_seed(5)
    loss = self_masking_projection_loss(phi, text_encoder, batch["input_ids"], batch["masked_input_ids"], generator=generator)

    # The same draws, in the same order: u ~ U[0,1) per caption, then n ~ N(0, I).
    generator = torch.Generator().manual_seed(5)
    target = text_encoder(input_ids=batch["input_ids"]).text_embeds
    scale = torch.rand((3, 1), generator=generator)
    noise = torch.randn(target.shape, generator=generator)
    pseudo_tokens = phi(target + scale * noise).pseudo_tokens
    expected = F.mse_loss(encode_text_with_pseudo_tokens(text_encoder, batch["masked_input_ids"], pseudo_tokens), target)
    assert torch.allclose(loss, expected, atol=1e-6)

    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in phi.parameters())
    assert all(p.grad is None for p in text_encoder.parameters())


def test_longest_padding_gives_the_embeddings_and_loss_of_max_length_padding(tokenizer, single_thread):
    """CLIP attends causally and pools at the first end-of-text token: padding after it changes nothing."""
    text_encoder = _tiny_text_encoder()
    captions = [
        "a red car parked on a quiet road",
        "two dogs are playing in the snow",
        "a cup of tea",
        "an old clock on a brick wall next to a window with white curtains",
        "it is",
    ]
    longest = SelfMaskingCollator(tokenizer, seed=0)(captions)
    full = SelfMaskingCollator(tokenizer, seed=0, padding="max_length")(captions)
    width = max(len(tokenizer(clean_caption(c)).input_ids) for c in captions)
    assert longest["input_ids"].shape[1] == width < 77 and full["input_ids"].shape[1] == 77
    assert longest["masked_input_ids"].shape[1] < 77

    with torch.no_grad():
        embeds = text_encoder(input_ids=longest["input_ids"]).text_embeds
        reference = text_encoder(input_ids=full["input_ids"]).text_embeds
    assert torch.allclose(embeds, reference, atol=1e-5, rtol=0)

    losses, grads = [], []
    for batch in (longest, full):
        torch.manual_seed(1)  # the same phi for both batches
        phi = TextualInversionProjection(24, 96, 32, dropout=0.0)
        generator = torch.Generator().manual_seed(5)
        loss = self_masking_projection_loss(phi, text_encoder, batch["input_ids"], batch["masked_input_ids"], generator=generator)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in phi.parameters()]))
    assert losses[0] > 0
    assert torch.allclose(losses[0], losses[1], atol=1e-5, rtol=0)
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_a_few_steps_reduce_the_loss(tokenizer, single_thread):
    text_encoder = _tiny_text_encoder()
    phi = TextualInversionProjection(24, 96, 32, dropout=0.0)
    batch = SelfMaskingCollator(tokenizer, seed=0)(["a red car on a road", "two dogs in the snow", "a cup of tea", "an old clock"])
    optimizer = torch.optim.Adam(phi.parameters(), lr=1e-3)

    def loss_without_noise():
        return self_masking_projection_loss(phi, text_encoder, batch["input_ids"], batch["masked_input_ids"], noise_scale=0.0)

    initial = loss_without_noise().item()
    for _ in range(30):
        optimizer.zero_grad()
        loss_without_noise().backward()
        optimizer.step()
    assert loss_without_noise().item() < 0.5 * initial
