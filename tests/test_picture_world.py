"""The built-in picture world: pictures, captions, splits, triplets, the dataset it writes, and its tokenizer."""

import itertools

import numpy as np
import pytest

from diffusers_cir.data.pictures import (
    ATTRIBUTES,
    PictureWorld,
    PictureWorldConfig,
    render_pool,
    write_triplet_dataset,
)


@pytest.fixture(scope="module")
def tiny():
    return PictureWorld(PictureWorldConfig.tiny())


def test_pictures_are_deterministic_and_variants_differ(tiny):
    first, again = np.asarray(tiny.picture(5)), np.asarray(PictureWorld(PictureWorldConfig.tiny()).picture(5))
    assert first.shape == (64, 64, 3) and np.array_equal(first, again)
    assert not np.array_equal(first, np.asarray(tiny.picture(5, variant=1)))
    assert not np.array_equal(first, np.asarray(PictureWorld(PictureWorldConfig.tiny(seed=1)).picture(5)))


def test_every_attribute_changes_the_picture():
    world = PictureWorld(PictureWorldConfig(objects=("circle", "star"), colors=("red", "blue"),
                                            materials=("wooden", "glass", "metal", "stone"),
                                            styles=("photo", "cartoon", "sketch", "painting"),
                                            positions=("left", "center", "right", "top", "bottom")))
    base = {"object": "circle", "color": "red", "material": "wooden", "style": "photo", "position": "left"}
    reference = np.asarray(world.picture(world.index_of(**base)), dtype=np.int16)
    for attribute in ATTRIBUTES:
        for value in world.config.attribute_values[attribute]:
            if value == base[attribute]:
                continue
            other = np.asarray(world.picture(world.index_of(**{**base, attribute: value})), dtype=np.int16)
            changed = (np.abs(other - reference).max(-1) > 24).mean()
            assert changed > 0.02, (attribute, value, changed)  # a visible share of the pixels


def test_captions_name_every_attribute(tiny):
    item = tiny.items[tiny.index_of(object="star", color="blue", material="metal", style="cartoon", position="right")]
    assert item.caption == "a cartoon of a blue metal star on the right"
    assert len(set(tiny.captions)) == tiny.num_items == 3 * 3 * 2 * 2 * 2


def test_splits_hold_out_object_colour_pairs(tiny):
    heldout = {item.index for item in tiny.items if item.heldout}
    assert heldout and len(tiny.heldout_pairs) == 3  # one colour per object
    for split in ("train", "validation"):
        triplets = tiny.triplets(split)
        assert not heldout & set(triplets.reference_indices) and not heldout & set(triplets.target_indices)
    test = tiny.triplets("test")
    assert len(test) > 0 and set(test.target_indices) <= heldout and not heldout & set(test.reference_indices)
    sampled = tiny.triplets("train", num_triplets=500, seed=3)
    assert len(sampled) == 500 and not heldout & set(sampled.target_indices)
    assert any("+" in kind for kind in sampled.edited_attributes)  # some compound edits


def test_a_triplet_text_states_the_target_of_every_edited_attribute(tiny):
    sampled = tiny.triplets("train", num_triplets=300, seed=1)
    for reference, target, text, kind in zip(sampled.reference_indices, sampled.target_indices,
                                             sampled.modification_texts, sampled.edited_attributes):
        reference, target = tiny.items[reference].attributes, tiny.items[target].attributes
        changed = {name for name in ATTRIBUTES if reference[name] != target[name]}
        assert changed == set(kind.split("+")), (text, kind)
        for name in changed:
            assert (target[name] if name != "position" else target[name].replace("center", "middle")) in text


def test_written_dataset_loads_with_datasets(tiny, tmp_path):
    import datasets

    pool = render_pool(tiny, 2, workers=1, progress=False).numpy()
    written = write_triplet_dataset(tiny, tmp_path, pool, 50, gallery_embeds=np.ones((tiny.num_items, 8), np.float32),
                                    progress=False)
    assert written["images/train"] == 50 and written["gallery/test"] == tiny.num_items
    train = datasets.load_dataset(str(tmp_path), "images", split="train")
    row = train[0]
    assert row["reference_image"].size == (64, 64) and row["modification_text"]
    variants = {np.asarray(train[i]["reference_image"]).tobytes() for i in range(len(train))}
    assert len(variants) > len({train[i]["reference_id"] for i in range(len(train))})  # jittered variants
    gallery = datasets.load_dataset(str(tmp_path), "gallery", split="test")
    assert gallery[3]["id"] == tiny.gallery_ids[3] and np.array_equal(np.asarray(gallery[3]["image"]),
                                                                      np.asarray(tiny.picture(3)))
    embeddings = datasets.load_dataset(str(tmp_path), "embeddings", split="test")
    assert len(embeddings) == len(tiny.triplets("test")) and len(embeddings[0]["target_image_embeds"]) == 8


def test_world_tokenizer_keeps_clips_tokens_of_the_worlds_words():
    pytest.importorskip("open_clip")
    from diffusers_cir.utils import build_offline_clip_tokenizer
    from diffusers_cir.utils.tokenizer import build_clip_tokenizer_for_words

    small = build_clip_tokenizer_for_words(PictureWorld.vocabulary())
    clip = build_offline_clip_tokenizer()
    world = PictureWorld(PictureWorldConfig())
    for text in itertools.islice(itertools.chain(world.captions, world.triplets("train", 100).modification_texts), 150):
        assert small.tokenize(text) == clip.tokenize(text), text
    assert len(small) < 1000
    assert small("make it magenta")["input_ids"][-1] == small.eos_token_id  # an unknown word still tokenises
