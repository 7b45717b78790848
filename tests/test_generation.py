"""Generation stages one by one, on tiny components built in code: templates, keyword triplets, LLM triplets,
Prompt-to-Prompt, filters, masks, image-pair texts, sources, configuration and the command line."""

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffusers_cir.generation import tiny
from diffusers_cir.generation.config import FilterConfig, GenerationConfig, ImagePairConfig, LLMConfig, PairTextConfig
from diffusers_cir.generation.records import Candidate


@pytest.fixture(scope="module")
def clip():
    return tiny.tiny_clip_model()


@pytest.fixture(scope="module")
def sd_pipe():
    return tiny.tiny_stable_diffusion_pipeline()


def _image(color, size=24):
    from PIL import Image

    return Image.new("RGB", (size, size), color)


# --------------------------------------------------------------------------------------------- templates
def test_the_47_templates_keep_the_papers_two_repeats_and_fill_both_keywords():
    from diffusers_cir.generation.templates import (
        KEYWORD_TEMPLATES,
        REPEATED_TEMPLATES,
        draw_instruction,
        fill_template,
    )

    assert len(KEYWORD_TEMPLATES) == 47
    repeats = {t: [i for i, u in enumerate(KEYWORD_TEMPLATES) if u == t] for t in set(KEYWORD_TEMPLATES)}
    assert {t: tuple(i) for t, i in repeats.items() if len(i) > 1} == dict(REPEATED_TEMPLATES)
    assert len(set(KEYWORD_TEMPLATES)) == 45
    for template in KEYWORD_TEMPLATES:
        filled = fill_template(template, "SRC", "TGT")
        assert "TGT" in filled and "$" not in filled
    counts = np.bincount([draw_instruction("a", "b", np.random.default_rng(s))[1] for s in range(4700)], minlength=47)
    assert counts.min() > 0  # every template is drawn


# --------------------------------------------------------------------------------------------- keyword triplets
def test_object_terms_are_noun_heads_with_either_tagger():
    from diffusers_cir.generation.keyword_triplets import object_terms
    from diffusers_cir.text.keywords import RuleBasedKeywordExtractor, SpacyKeywordExtractor

    caption = "a man riding a brown horse on the beach"
    assert [t for t, _, _ in object_terms(RuleBasedKeywordExtractor().tag(caption))] == ["man", "horse", "beach"]

    # spaCy's coarse tags through a stand-in pipeline (no spaCy model can be downloaded here)
    tags = {"a": "DET", "fire": "NOUN", "truck": "NOUN", "near": "ADP", "red": "ADJ", "barn": "NOUN", "Paris": "PROPN"}

    def nlp(text):
        position, tokens = 0, []
        for word in text.split():
            position = text.index(word, position)
            tokens.append(SimpleNamespace(text=word, pos_=tags[word], idx=position))
            position += len(word)
        return tokens

    terms = object_terms(SpacyKeywordExtractor(nlp).tag("a fire truck near a red barn a Paris"))
    assert [t for t, _, _ in terms] == ["truck", "barn", "paris"]


def test_band_candidates_keep_only_similarities_inside_the_band_most_similar_first():
    from diffusers_cir.generation.keyword_triplets import band_candidates

    angles = np.radians([0, 50, 55, 59, 80, 125])  # cosine with term 0: 1, .64, .57, .52, .17, -.57 (no ties)
    embeddings = torch.tensor(np.stack([np.cos(angles), np.sin(angles)], 1), dtype=torch.float32)
    terms = ["t0", "t1", "t2", "t3", "t4", "t5"]
    similarity = (embeddings @ embeddings.T).numpy()
    candidates = band_candidates(terms, embeddings, band=(0.5, 0.7), max_candidates=2, chunk_size=4)
    for i, term in enumerate(terms):
        inside = [j for j in range(6) if j != i and 0.5 <= similarity[i, j] <= 0.7]
        expected = sorted(inside, key=lambda j: -similarity[i, j])[:2]
        assert [c for c, _ in candidates.get(term, [])] == [terms[j] for j in expected], term
        assert all(0.5 <= s <= 0.7 for _, s in candidates.get(term, []))
    assert [c for c, _ in candidates["t0"]] == ["t1", "t2"]  # t3 (0.52) is cut by max_candidates


def test_keyword_triplet_replaces_the_term_fixes_the_article_and_stores_the_pair(clip):
    from diffusers_cir.generation.keyword_triplets import (
        KeywordVocabulary,
        build_keyword_vocabulary,
        make_keyword_triplet,
        replace_span,
    )
    from diffusers_cir.generation.templates import KEYWORD_TEMPLATES, fill_template
    from diffusers_cir.text.keywords import RuleBasedKeywordExtractor

    assert replace_span("A cup on a table", 2, 5, "apple") == "An apple on a table"
    assert replace_span("an owl here", 3, 6, "cat") == "a cat here"
    tagger = RuleBasedKeywordExtractor()
    vocabulary = KeywordVocabulary(["cup", "vase"], [2, 1], {"cup": [("vase", 0.6)]})
    triplet = make_keyword_triplet("a red cup on the table", tagger, vocabulary, np.random.default_rng(3))
    assert triplet.target_caption == "a red vase on the table"
    assert (triplet.source_keyword, triplet.target_keyword) == ("cup", "vase")
    assert triplet.modification_text == fill_template(KEYWORD_TEMPLATES[triplet.template_index], "cup", "vase")
    assert make_keyword_triplet("a table", tagger, vocabulary, np.random.default_rng(0)) is None
    # same generator seed, same triplet
    again = make_keyword_triplet("a red cup on the table", tagger, vocabulary, np.random.default_rng(3))
    assert again == triplet

    model, processor = clip
    captions = ["a cup on a table", "a dog on a sofa", "a cup near a dog", "a bird"]
    built = build_keyword_vocabulary(captions, tagger, model, processor, band=(-1.0, 1.0), min_term_count=2)
    assert built.terms == ["cup", "dog"] and built.counts == [2, 2]  # "table", "sofa", "bird" seen once
    assert [c for c, _ in built.replacements("cup")] == ["dog"]


def test_keyword_vocabulary_round_trips_through_parquet(tmp_path):
    from diffusers_cir.generation.keyword_triplets import KeywordVocabulary

    vocabulary = KeywordVocabulary(["a", "b", "c"], [3, 2, 1], {"a": [("b", 0.625), ("c", 0.5)], "b": [("a", 0.625)]})
    vocabulary.save(str(tmp_path / "v.parquet"))
    assert KeywordVocabulary.load(str(tmp_path / "v.parquet")) == vocabulary


# --------------------------------------------------------------------------------------------- LLM triplets
def test_llm_completion_format_round_trips_and_malformed_samples_are_refused():
    from diffusers_cir.generation.llm_triplets import (
        format_completion,
        parse_completion,
        tokenize_caption_triplet,
    )

    completion = format_completion("make it  red", "a red\ncar") + " trailing"
    assert parse_completion(completion) == ("make it red", "a red car")
    for bad in ("make it red\n%%\na red car", "no separator\nEND", "\n%%\na car\nEND", "a\n%%\nb\n%%\nc\nEND"):
        assert parse_completion(bad) is None, bad
    tokenizer = tiny.tiny_byte_level_tokenizer()
    example = tokenize_caption_triplet(tokenizer, "a car", "make it red", "a red car")
    prompt_length = len(tokenizer("a car\n##\n", add_special_tokens=False)["input_ids"]) + 1  # + BOS
    assert example["labels"][:prompt_length] == [-100] * prompt_length
    assert example["labels"][prompt_length:] == example["input_ids"][prompt_length:]
    assert example["input_ids"][-1] == tokenizer.eos_token_id


def test_llm_sampling_is_seeded_and_leaves_the_global_random_state_alone():
    from diffusers_cir.generation.llm_triplets import sample_caption_triplets

    model, tokenizer = tiny.tiny_causal_lm()
    calls = []
    original = model.generate

    def generate(**kwargs):
        output = original(**kwargs)
        calls.append(output)
        return output

    model.generate = generate
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    captions = ["a cat on a sofa", "a red car"]
    first = sample_caption_triplets(model, tokenizer, captions, LLMConfig(max_new_tokens=6), seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    sample_caption_triplets(model, tokenizer, captions, LLMConfig(max_new_tokens=6), seed=5)
    sample_caption_triplets(model, tokenizer, captions, LLMConfig(max_new_tokens=6), seed=6)
    assert torch.equal(calls[0], calls[1]) and not torch.equal(calls[0], calls[2])
    assert first == [None, None]  # a random LM writes no triplet


# --------------------------------------------------------------------------------------------- Prompt-to-Prompt
def test_token_alignment_maps_shared_and_swapped_tokens_to_the_reference():
    from diffusers_cir.generation.prompt_to_prompt import token_alignment

    assert token_alignment([1, 2, 3, 4], [1, 2, 9, 4]) == [0, 1, 2, 3]
    assert token_alignment([1, 2, 3, 4], [1, 8, 9, 2, 3, 4]) == [0, -1, -1, 1, 2, 3]
    assert token_alignment([1, 2, 3, 4], [1, 4]) == [0, 3]


def test_controller_edits_only_active_targets_of_the_conditional_half():
    from diffusers_cir.generation.prompt_to_prompt import PromptToPromptController

    pairs, heads, queries, keys = 2, 3, 5, 4
    maps = torch.tensor([[0, 1, -1, 3], [3, 2, 1, 0]])
    controller = PromptToPromptController(maps, cross_steps=[2, 0], self_steps=[1, 1], max_self_tokens=5)
    probs = torch.rand(4 * pairs * heads, queries, keys)  # guidance: [uncond pairs, cond pairs]
    edited = controller.edit(probs, heads, True, controller.active_pairs(True, queries))
    before, after = probs.view(8, heads, queries, keys), edited.view(8, heads, queries, keys)
    assert torch.equal(after[:5], before[:5]) and torch.equal(after[6:], before[6:])  # uncond, sources, pair 1
    expected = before[5].clone()
    expected[..., [0, 1, 3]] = before[4][..., [0, 1, 3]]  # token 2 keeps the target's own map
    assert torch.equal(after[5], expected)
    assert controller.active_pairs(False, queries + 1) is None  # self-attention too large to share
    controller.step = 2
    assert controller.active_pairs(True, queries) is None and controller.active_pairs(False, queries) is None


def test_processor_computes_what_diffusers_computes_when_nothing_is_edited(sd_pipe):
    from diffusers_cir.generation.prompt_to_prompt import PromptToPromptController, apply_prompt_to_prompt

    unet = sd_pipe.unet
    latents, text = torch.randn(4, 4, 8, 8), torch.randn(4, 77, 32)
    with torch.no_grad():
        reference = unet(latents, 10, encoder_hidden_states=text).sample
        for explicit in (False, True):  # SDPA path, then explicit probabilities with an edit that changes nothing
            steps = [5, 5] if explicit else [0, 0]
            controller = PromptToPromptController(torch.full((2, 77), -1), steps, [0, 0], max_self_tokens=1)
            with apply_prompt_to_prompt(unet, controller):
                output = unet(latents, 10, encoder_hidden_states=text).sample
            torch.testing.assert_close(output, reference, rtol=1e-4, atol=1e-5)
    assert all(type(p).__name__ != "PromptToPromptAttnProcessor" for p in unet.attn_processors.values())


def test_image_pairs_are_seeded_per_pair_whatever_the_batch(sd_pipe):
    from diffusers_cir.generation.image_pairs import PairRequest, draw_image_pairs

    config = ImagePairConfig(num_inference_steps=2, batch_size=3, self_replace_max_tokens=64)
    requests = [PairRequest("a red cup", "a blue cup", seed=s, self_replace=0.5) for s in (1, 2, 3)]
    together = draw_image_pairs(sd_pipe, requests, config)
    alone = draw_image_pairs(sd_pipe, requests[1:2], config)
    assert len(together) == 3 and together[0][0].size == (16, 16)
    assert np.array_equal(np.asarray(alone[0][1]), np.asarray(together[1][1]))
    assert not np.array_equal(np.asarray(together[0][1]), np.asarray(together[1][1]))


# --------------------------------------------------------------------------------------------- filters
def _candidate(index, **scores):
    return Candidate("keyword", index, 0, _image((index, 0, 0)), _image((0, index, 0)), "make it red",
                     "a cup", "a vase", "cup", "vase", scores=scores)


def test_filters_run_in_order_and_count_each_one():
    from diffusers_cir.generation.filters import applicable_filters, apply_filters

    good = dict(image_image=0.9, reference_caption=0.3, target_caption=0.3, directional=0.3, source_keyword=0.3,
                target_keyword=0.3, instruction=0.0)
    candidates = [_candidate(0, **good), _candidate(1, **{**good, "target_caption": 0.1}),
                  _candidate(2, **{**good, "image_image": 0.5}), _candidate(3, **{**good, "directional": 0.1}),
                  _candidate(4, **{**good, "source_keyword": 0.1}), _candidate(5, **good)]
    # candidate 5's target image (0, 5, 0) is flagged: the candidate goes, with both its images
    kept, counts = apply_filters(candidates, "keyword", FilterConfig(),
                                 nsfw=lambda images: [image.getpixel((0, 0)) == (0, 5, 0) for image in images])
    assert [c.item_index for c in kept] == [0]
    assert counts == {"image_caption": {"in": 6, "kept": 5}, "image_image": {"in": 5, "kept": 4},
                      "directional": {"in": 4, "kept": 3}, "keyword_image": {"in": 3, "kept": 2},
                      "nsfw": {"in": 2, "kept": 1}}
    assert applicable_filters("llm", FilterConfig(directional=None, nsfw=False)) == [
        "image_caption", "image_image", "instruction_image"]
    assert applicable_filters("mtst", FilterConfig()) == ["nsfw"]
    assert applicable_filters("facap", FilterConfig(filter_given_pairs=True)) == [
        "image_caption", "image_image", "directional", "instruction_image", "nsfw"]
    with pytest.raises(ValueError, match="safety checker"):
        apply_filters(candidates, "keyword", FilterConfig())


def test_clip_scores_match_clip_features_and_the_safety_checker_flags_what_it_should(clip):
    from diffusers_cir.generation.filters import compute_clip_scores, encode_images, encode_texts, nsfw_flags

    model, processor = clip
    candidate = _candidate(200)
    compute_clip_scores(model, processor, [candidate])
    images = encode_images(model, processor, [candidate.reference_image, candidate.target_image])
    texts = encode_texts(model, processor, ["a cup", "a vase", "make it red"])
    assert candidate.scores["image_image"] == pytest.approx(float(images[0] @ images[1]), abs=1e-5)
    assert candidate.scores["target_caption"] == pytest.approx(float(images[1] @ texts[1]), abs=1e-5)
    direction = torch.nn.functional.cosine_similarity(images[1] - images[0], texts[1] - texts[0], dim=0)
    assert candidate.scores["directional"] == pytest.approx(float(direction), abs=1e-5)
    assert candidate.scores["instruction"] == pytest.approx(float(images[1] @ texts[2]), abs=1e-5)

    checker, extractor = tiny.tiny_safety_checker()
    dark, bright = _image((5, 5, 5)), _image((250, 250, 250))
    with torch.no_grad():  # make the bright image's own embedding a concept: it must be flagged, the dark one not
        pixels = extractor(images=[dark, bright], return_tensors="pt")["pixel_values"]
        embeds = checker.visual_projection(checker.vision_model(pixels)[1])
        checker.concept_embeds[:] = embeds[1]
        cosine = torch.nn.functional.cosine_similarity(embeds[0], embeds[1], dim=0)
        checker.concept_embeds_weights[:] = (1 + cosine) / 2
        checker.special_care_embeds_weights[:] = 2.0
    assert nsfw_flags(checker, extractor, [dark, bright, dark]) == [False, True, False]


# --------------------------------------------------------------------------------------------- masks
def test_masks_are_64x64_binary_and_follow_the_threshold():
    from diffusers_cir.generation.masks import changed_words, clipseg_masks, mask_term

    assert changed_words("a red cup on a table", "a blue cup on a big table.") == "blue big"
    assert changed_words("a red cup", "a cup") is None
    assert mask_term(_candidate(1)) == "vase"
    model, processor = tiny.tiny_clipseg()
    images, terms = [_image((200, 10, 10)), _image((10, 10, 200), 40)], ["cup", "a big dog"]
    masks = clipseg_masks(model, processor, images, terms, size=64, threshold=0.5)
    assert [(m.size, m.mode) for m in masks] == [((64, 64), "L")] * 2
    assert set(np.unique(np.asarray(masks[0]))) <= {0, 255}
    assert all(np.asarray(m).min() == 255 for m in clipseg_masks(model, processor, images, terms, threshold=0.0))
    assert all(np.asarray(m).max() == 0 for m in clipseg_masks(model, processor, images, terms, threshold=1.0))


# --------------------------------------------------------------------------------------------- image-pair texts
@pytest.mark.parametrize("builder", [tiny.tiny_vision_language_model, tiny.tiny_blip2])
def test_mtst_texts_from_a_multi_image_chat_model_or_a_one_image_model(builder):
    from diffusers_cir.generation.pair_texts import mtst_texts

    model, processor = builder()
    seen = []
    original = model.generate

    def generate(**kwargs):
        seen.append(kwargs["pixel_values"].shape)
        return original(**kwargs)

    model.generate = generate
    pairs = [(_image((250, 0, 0), 40), _image((0, 0, 250))), (_image((0, 250, 0)), _image((9, 9, 9), 30))]
    config = PairTextConfig(max_new_tokens=4, batch_size=2)
    texts = mtst_texts(model, processor, pairs, config)
    assert len(texts) == 2 and all(isinstance(f, str) and isinstance(r, str) for f, r in texts)
    assert mtst_texts(model, processor, pairs, config) == texts  # greedy: the same texts again
    # a chat model sees both images of a pair (4 images per call), a one-image model one side-by-side picture each
    assert seen[0][0] == (4 if builder is tiny.tiny_vision_language_model else 2)
    assert len(seen) == 4  # forward and reverse texts, twice


def test_facap_describes_each_image_then_asks_the_language_model():
    from diffusers_cir.generation.pair_texts import facap_texts, side_by_side

    vlm, processor = tiny.tiny_vision_language_model()
    llm, tokenizer = tiny.tiny_causal_lm()
    prompts = []
    original = tokenizer.__call__

    class Recording(type(tokenizer)):
        def __call__(self, text, *args, **kwargs):
            prompts.extend(text if isinstance(text, list) else [text])
            return original(text, *args, **kwargs)

    tokenizer.__class__ = Recording
    pairs = [(_image((250, 0, 0)), _image((0, 0, 250)))]
    (reference, target, text), = facap_texts(vlm, processor, llm, tokenizer, pairs, PairTextConfig(max_new_tokens=3))
    assert any(f"Reference image: {reference}" in p and f"Target image: {target}" in p for p in prompts)
    assert isinstance(text, str)
    assert side_by_side([_image((1, 1, 1), 10), _image((2, 2, 2), 20)]).size == (20, 10)  # scaled to one height


# --------------------------------------------------------------------------------------------- sources
def test_caption_and_pair_sources(tmp_path):
    from diffusers_cir.generation.sources import load_captions, load_image_pairs

    (tmp_path / "captions.txt").write_text("a cat\n  a   dog  \n\na car\n")
    captions = load_captions(str(tmp_path / "captions.txt"))
    assert captions.column == "text" and len(captions) in (3, 4)
    assert "a dog" in captions.texts(0, len(captions))
    (tmp_path / "c.jsonl").write_text(json.dumps({"prompt": "a cat", "n": 1}) + "\n")
    assert load_captions(str(tmp_path / "c.jsonl")).texts(0, 1) == ["a cat"]
    (tmp_path / "d.jsonl").write_text(json.dumps({"a": "x", "b": "y"}) + "\n")
    with pytest.raises(ValueError, match="--caption-column"):
        load_captions(str(tmp_path / "d.jsonl"))

    folder = tmp_path / "pairs"
    for index in range(2):
        (folder / f"p{index}").mkdir(parents=True)
        _image((index * 100, 0, 0)).save(folder / f"p{index}" / "reference.png")
        _image((0, index * 100, 0), 30).save(folder / f"p{index}" / "target.jpg")
    pairs = load_image_pairs(str(folder))
    (reference, target), = pairs.images(1, 2)
    assert reference.getpixel((0, 0)) == (100, 0, 0) and target.size == (30, 30)
    listing = tmp_path / "listed"
    listing.mkdir()
    _image((7, 7, 7)).save(listing / "r.png")
    (listing / "pairs.jsonl").write_text(json.dumps({"src": "r.png", "dst": "r.png"}) + "\n")
    with pytest.raises(ValueError, match="--reference-column"):
        load_image_pairs(str(listing))
    pairs = load_image_pairs(str(listing), {"reference_image": "src", "target_image": "dst"})
    assert pairs.images(0, 1)[0][0].getpixel((1, 1)) == (7, 7, 7)


# --------------------------------------------------------------------------------------------- configuration, CLI
def test_config_checks_name_the_field_and_round_trip_through_json():
    config = GenerationConfig(strategies=("keyword", "mtst"), captions="c.txt", image_pairs="p")
    config.check()
    assert GenerationConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for bad, match in ((dict(strategies=("nope",)), "strategies"), (dict(strategies=("keyword",)), "captions"),
                       (dict(captions="c", items_per_shard=0), "items_per_shard"),
                       (dict(captions="c", image=ImagePairConfig(num_seeds=2, keep_per_triplet=3)), "keep_per_triplet"),
                       (dict(captions="c", filters=FilterConfig(image_image=1.5)), "filters.image_image")):
        with pytest.raises(ValueError, match=match):
            GenerationConfig(**bad).check()


def test_generate_help_is_light_and_user_errors_are_one_line(tmp_path, capsys):
    code = ("import argparse, sys; from diffusers_cir.commands import generate; "
            "generate.register(argparse.ArgumentParser().add_subparsers()); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'datasets') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"
    from diffusers_cir import cli

    output = str(tmp_path / "out")
    for argv, message in ((["--demo", "--captions", "x", "--no-masks"], "--captions, --no-masks cannot be used with"),
                          (["--strategy", "keyword"], "need `captions`"),
                          (["--strategy", "mtst", "--image-pairs", "nowhere"], "neither a file"),
                          (["--strategy", "llm", "--captions", "x", "--keep-per-triplet", "9"], "keep_per_triplet")):
        assert cli.main(["generate", "--output", output] + argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("diffusers-cir generate: error:") and message in lines[0], lines
    with pytest.raises(SystemExit):
        cli.main(["generate", "--output", output, "--min-image-image", "2"])
    assert "expected a number in [-1, 1] or 'off'" in capsys.readouterr().err
