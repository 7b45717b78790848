"""The synthetic CIR world: determinism, CLIP-like encoder, triplet semantics, held-out compositions."""

import dataclasses

import numpy as np
import pytest
import torch

from diffusers_cir.data.synthetic import (
    ATTRIBUTES,
    CAPTION_TEMPLATE,
    SPLITS,
    SyntheticCIRWorld,
    SyntheticWorldConfig,
    build_synthetic_text_encoder,
    config_from_dict,
    config_to_dict,
)


@pytest.fixture(scope="module")
def world():
    return SyntheticCIRWorld(SyntheticWorldConfig.tiny(seed=0))


def _recall_at_1(world, queries, triplets):
    # The reference is not a valid answer (as in CIRR): mask it out of the gallery.
    scores = torch.nn.functional.normalize(queries, dim=-1) @ world.image_embeds.T
    rows = torch.arange(len(triplets))
    scores[rows, torch.from_numpy(triplets.reference_indices)] = -float("inf")
    return float((scores.argmax(1) == torch.from_numpy(triplets.target_indices)).float().mean())


def test_same_seed_same_world_and_different_seed_differs(world):
    again = SyntheticCIRWorld(SyntheticWorldConfig.tiny(seed=0))
    other = SyntheticCIRWorld(SyntheticWorldConfig.tiny(seed=1))
    assert torch.equal(world.image_embeds, again.image_embeds)
    for (name, a), (_, b) in zip(world.text_encoder.state_dict().items(), again.text_encoder.state_dict().items()):
        assert torch.equal(a, b), name
    for split in SPLITS:
        first, second = world.triplets(split, num_triplets=50, seed=3), again.triplets(split, num_triplets=50, seed=3)
        assert first.modification_texts == second.modification_texts
        np.testing.assert_array_equal(first.target_indices, second.target_indices)
    assert not torch.allclose(world.image_embeds, other.image_embeds)
    assert world.heldout_pairs != other.heldout_pairs or world.triplets("train").modification_texts != other.triplets(
        "train"
    ).modification_texts


def test_encode_text_matches_the_transformers_model_and_clip_tokenization(world):
    texts = ["make it red", "a photo of a red wooden cup", "make it red"]
    encoded = world.encode_text(texts)
    assert encoded.last_hidden_state.shape == (3, 77, world.config.text_hidden_size)
    assert encoded.text_embeds.shape == (3, world.config.projection_dim)
    # Same ids as OpenAI CLIP (bos 49406, eos/pad 49407), 77 tokens.
    assert encoded.input_ids[0, :5].tolist() == [49406, 1078, 585, 736, 49407]
    assert (encoded.input_ids[0, 4:] == 49407).all()
    direct = world.text_encoder(input_ids=world.tokenize(texts))
    torch.testing.assert_close(encoded.text_embeds, direct.text_embeds)
    torch.testing.assert_close(encoded.last_hidden_state, direct.last_hidden_state)
    torch.testing.assert_close(encoded.text_embeds[0], encoded.text_embeds[2])
    assert not torch.allclose(encoded.text_embeds[0], encoded.text_embeds[1])
    with pytest.raises(TypeError, match="list of strings"):
        world.encode_text("make it red")


def test_text_and_image_spaces_are_aligned_and_spread_like_clip(world):
    captions = world.caption_embeds
    images = world.image_embeds
    torch.testing.assert_close(images.norm(dim=-1), torch.ones(world.num_items))
    # Each caption retrieves its own image: the spaces are aligned as in CLIP.
    assert (torch.argmax(captions @ images.T, dim=1) == torch.arange(world.num_items)).float().mean() == 1.0
    # Images are noisy copies, not the captions themselves.
    assert (captions - images).norm(dim=-1).min() > 0
    n = len(captions)
    mean_cosine = float(((captions @ captions.T).sum() - n) / (n * (n - 1)))
    assert abs(mean_cosine - world.config.caption_mean_cosine) < 1e-3
    # The calibrated encoder reproduces the stored caption embeddings from scratch.
    fresh = torch.nn.functional.normalize(world.encode_text(world.captions[:5]).text_embeds, dim=-1)
    torch.testing.assert_close(fresh, captions[:5], atol=1e-5, rtol=1e-5)


def test_triplet_targets_differ_exactly_by_the_stated_edit(world):
    values = world.config.attribute_values
    checked = 0
    for split in SPLITS:
        for triplets in (world.triplets(split), world.triplets(split, num_triplets=200, seed=1)):
            for i in range(len(triplets)):
                reference = world.items[triplets.reference_indices[i]]
                target = world.items[triplets.target_indices[i]]
                edited = triplets.edited_attributes[i].split("+")
                changed = [a for a in ATTRIBUTES if reference.attributes[a] != target.attributes[a]]
                assert sorted(changed) == sorted(edited), (reference, target, triplets.modification_texts[i])
                words = triplets.modification_texts[i].split()
                for attribute in edited:
                    # The text names the new value and no other value of that attribute except the old one.
                    assert target.attributes[attribute] in words
                    named = {v for v in values[attribute] if v in words}
                    assert named <= {target.attributes[attribute], reference.attributes[attribute]}
                checked += 1
    assert checked > 500


def test_splits_hold_out_object_color_compositions(world):
    heldout = np.array([item.heldout for item in world.items])
    per_object = {}
    for obj, _ in world.heldout_pairs:
        per_object[obj] = per_object.get(obj, 0) + 1
    assert per_object == {obj: world.config.heldout_pairs_per_object for obj in world.config.objects}

    train, validation, test = (world.triplets(s) for s in SPLITS)
    for triplets in (train, validation, world.triplets("train", num_triplets=500)):
        assert not heldout[triplets.reference_indices].any() and not heldout[triplets.target_indices].any()
    assert heldout[test.target_indices].all() and not heldout[test.reference_indices].any()
    assert heldout[world.triplets("test", num_triplets=300).target_indices].all()
    train_pairs = set(zip(train.reference_indices.tolist(), train.target_indices.tolist()))
    validation_pairs = set(zip(validation.reference_indices.tolist(), validation.target_indices.tolist()))
    assert len(validation_pairs) > 0 and not train_pairs & validation_pairs
    # Every object and every color is still seen as a training target, so the held-out pairs are learnable.
    train_targets = [world.items[i] for i in train.target_indices]
    assert {item.object for item in train_targets} == set(world.config.objects)
    assert {item.color for item in train_targets} == set(world.config.colors)
    # Test targets are compositions no training triplet ever touches.
    train_compositions = {(item.object, item.color) for item in train_targets}
    assert not train_compositions & {(world.items[i].object, world.items[i].color) for i in test.target_indices}


def test_sampled_triplets_mix_single_and_compound_edits():
    world = SyntheticCIRWorld(SyntheticWorldConfig.tiny(seed=2, compound_edit_probability=0.5))
    triplets = world.triplets("train", num_triplets=2000, seed=0)
    assert len(triplets) == 2000
    compound = np.mean(["+" in e for e in triplets.edited_attributes])
    # Compound draws can be rejected (held-out targets) more often than single ones; the share stays near 0.5.
    assert 0.35 < compound < 0.65
    assert any(" and " in t for t in triplets.modification_texts)


def test_composition_is_needed_and_learnable_from_attributes(world):
    """Baselines stay low on the held-out compositions, yet target embeddings are predictable from attributes.

    The additive model is fit on the *seen* items only (least squares of image embeddings on one-hot
    attributes); it then ranks the unseen-composition targets first. That is the structure a composing model
    has to learn from triplets, and what the baselines cannot exploit.
    """
    test = world.triplets("test")
    baselines = {name: _recall_at_1(world, q, test) for name, q in world.baseline_queries(test).items()}
    codes = world._codes
    sizes = [len(v) for v in world.config.attribute_values.values()]
    features = np.concatenate([np.eye(s)[codes[:, a]] for a, s in enumerate(sizes)] + [np.ones((len(codes), 1))], 1)
    seen = np.array([not item.heldout for item in world.items])
    weights, *_ = np.linalg.lstsq(features[seen], world.image_embeds.numpy()[seen], rcond=None)
    additive = torch.from_numpy((features @ weights).astype(np.float32))
    composed = _recall_at_1(world, additive[test.target_indices], test)
    assert composed >= 0.9, composed
    assert max(baselines.values()) <= composed - 0.5, baselines
    # The world's own evaluation helper (diffusers_cir.metrics underneath) agrees with the local argmax.
    assert world.recall_at_k(additive[test.target_indices], test, ks=(1,))["recall_at1"] == pytest.approx(composed)
    with pytest.raises(ValueError, match="one per triplet"):
        world.recall_at_k(additive[:3], test)


def test_a_small_network_learns_unseen_compositions_from_triplets(world, single_thread):
    """End to end: an MLP on (reference image, edit text embedding) trained on train triplets beats the baselines."""
    torch.manual_seed(0)
    train = world.triplets("train", num_triplets=4000, seed=0)
    test = world.triplets("test")

    def inputs(triplets):
        text = torch.nn.functional.normalize(world.encode_text(triplets.modification_texts).text_embeds, dim=-1)
        return torch.cat([world.image_embeds[torch.from_numpy(triplets.reference_indices)], text], dim=1)

    x, y = inputs(train), world.image_embeds[torch.from_numpy(train.target_indices)]
    width = world.config.projection_dim
    model = torch.nn.Sequential(
        torch.nn.Linear(2 * width, 256), torch.nn.GELU(), torch.nn.Linear(256, 256), torch.nn.GELU(),
        torch.nn.Linear(256, width),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(600):
        batch = torch.randint(len(x), (128,))
        loss = (1 - torch.nn.functional.cosine_similarity(model(x[batch]), y[batch])).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        learned = _recall_at_1(world, model(inputs(test)), test)
    best_baseline = max(_recall_at_1(world, q, test) for q in world.baseline_queries(test).values())
    assert learned >= 0.5 and learned >= best_baseline + 0.15, (learned, best_baseline)


def test_clip_like_text_tower_encodes_paraphrases_alike_and_attends_to_content_words(world):
    """What LinCIR's language-only training needs of the text tower (tests/test_lincir_training.py uses this world).

    The default random tower is dominated by position embeddings: a caption and a paraphrase of another length
    encode unrelated. ``clip_like`` (small position embeddings, content salience) encodes them alike, as CLIP
    does, and its end-of-text token attends mostly to the content words.
    """
    clip_like = SyntheticCIRWorld(SyntheticWorldConfig.clip_like(seed=0))
    random_tower = SyntheticCIRWorld(
        SyntheticWorldConfig.clip_like(seed=0, text_position_scale=1.0, text_content_salience=0.0)
    )
    templates = clip_like.config.caption_templates
    assert len(templates) == 6 and templates[0] == CAPTION_TEMPLATE and "photo" not in clip_like.config.styles
    captions = clip_like.all_captions()
    assert len(captions) == clip_like.num_items * len(templates)
    assert captions[:: len(templates)] == clip_like.captions
    # The default worlds keep their single caption and random tower.
    assert world.all_captions() == world.captions and world.config.caption_templates == (CAPTION_TEMPLATE,)
    assert (world.config.text_position_scale, world.config.text_content_salience) == (1.0, 0.0)

    other_length = [k for k, t in enumerate(templates) if len(t.split()) != len(templates[0].split())]
    assert len(other_length) == 4
    for tower, check in ((clip_like, lambda cos: cos > 0.8), (random_tower, lambda cos: cos < 0.2)):
        embeds = torch.nn.functional.normalize(tower.encode_text(tower.all_captions()).text_embeds, dim=-1)
        embeds = embeds.view(tower.num_items, len(templates), -1)
        for k in other_length:
            cosine = float((embeds[:, k] * embeds[:, 0]).sum(-1).mean())
            assert check(cosine), (tower.config.text_position_scale, templates[k], cosine)

    caption = "there is a red wooden cup in this sketch"
    for config, check in (
        (clip_like.config, lambda share: share > 0.6),
        (dataclasses.replace(clip_like.config, text_content_salience=0.0), lambda share: share < 0.5),
    ):
        encoder = build_synthetic_text_encoder(config, clip_like.tokenizer)
        encoder.set_attn_implementation("eager")
        ids = clip_like.tokenize([caption], padding="longest")
        with torch.no_grad():
            attentions = encoder(input_ids=ids, output_attentions=True).attentions
        words = clip_like.tokenizer.convert_ids_to_tokens(ids[0])
        content = [i for i, w in enumerate(words) if w.removesuffix("</w>") in ("red", "wooden", "cup", "sketch")]
        for layer, attention in enumerate(attentions):
            share = float(attention[0, :, -1, content].sum(-1).mean())  # end-of-text row, averaged over heads
            assert check(share), (config.text_content_salience, layer, share)


def test_config_roundtrip_and_validation(world):
    assert config_from_dict(config_to_dict(world.config)) == world.config
    clip_like = SyntheticWorldConfig.clip_like(seed=3)
    assert config_from_dict(config_to_dict(clip_like)) == clip_like
    with pytest.raises(ValueError, match="must use all of them"):
        SyntheticWorldConfig.tiny(caption_templates=("a {color} {object}",)).validate()
    with pytest.raises(ValueError, match="may only use the fields"):
        SyntheticWorldConfig.tiny(caption_templates=(CAPTION_TEMPLATE, "a {shape}")).validate()
    with pytest.raises(ValueError, match="text_position_scale and text_content_salience"):
        SyntheticWorldConfig.tiny(text_content_salience=-1.0).validate()
    with pytest.raises(ValueError, match="single-token"):
        SyntheticCIRWorld(SyntheticWorldConfig.tiny(objects=("cup", "teapotish")))
    with pytest.raises(ValueError, match="heldout_pairs_per_object"):
        SyntheticWorldConfig.tiny(heldout_pairs_per_object=4).validate()
    with pytest.raises(ValueError, match="split must be one of"):
        world.triplets("dev")
    with pytest.raises(ValueError, match="Unknown SyntheticWorldConfig fields"):
        config_from_dict({"seeds": 1})
    assert world.index_of(**world.items[7].attributes) == 7
    with pytest.raises(ValueError, match="exactly the keywords"):
        world.index_of(object="cup")
