"""CaptionRewritePipeline (caption -> chat LLM rewrite -> CLIP, CIReVL / LDRE) with tiny models built in code."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline_tester import exif_rotated_twin, picture
from tiny_mllm import (
    VLM_CHAT_TEMPLATE,
    tiny_blip2,
    tiny_caption_rewrite_pipeline,
    tiny_chat_llm,
    tiny_clip,
    tiny_llava_next,
    tiny_llava_next_processor,
)

from diffusers_cir import CaptionRewritePipeline, load_image
from diffusers_cir.pipelines.caption_rewrite_recipes import (
    LDRE_SYSTEM_PROMPT,
    REWRITE_RECIPES,
    RewriteRecipe,
    fill_rewrite_template,
    parse_rewrite,
)
from diffusers_cir.retrieval import ldre_ensemble

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def pipe():
    return tiny_caption_rewrite_pipeline()


def scripted_llm(pipe, answer_for):
    """Make the LLM answer `answer_for(chat_text)` for every chat; returns the list of chats it was given."""
    seen = []
    tokenizer = pipe.llm_tokenizer

    def generate(input_ids, attention_mask=None, num_return_sequences=1, **kwargs):
        rows = []
        for ids in input_ids:
            chat = tokenizer.decode(ids, skip_special_tokens=False).replace(tokenizer.pad_token, "")
            seen.append(chat)
            answer = tokenizer(answer_for(chat), add_special_tokens=False, return_tensors="pt").input_ids[0]
            rows.extend([torch.cat([ids, answer])] * num_return_sequences)
        width = max(len(row) for row in rows)
        return torch.stack([torch.nn.functional.pad(row, (0, width - len(row)), value=tokenizer.pad_token_id) for row in rows])

    pipe.llm.generate = generate
    return seen


# --------------------------------------------------------------------------------------------- recipes and parsing


def test_the_rewrite_is_read_from_the_first_edited_description_line():
    answer = "Sure.\nEdited Description: a red dog on grass\nEdited Description: other"
    assert parse_rewrite(answer, "make it red", "instruction") == "a red dog on grass"
    # CIReVL stops at a blank line, and falls back to the modification text itself.
    assert parse_rewrite("Thinking...\n\nEdited Description: late", "make it red", "instruction") == "make it red"
    assert parse_rewrite("Edited Description:   ", "make it red", "instruction") == "make it red"
    # LDRE's prompt ends with the prefix, so the model answers directly: its first line is the rewrite.
    assert parse_rewrite(" two cats on a couch.\nnote", "x", "first_line") == "two cats on a couch."
    assert parse_rewrite("", "x", "first_line") == "x"


def test_the_user_message_is_filled_in_one_pass():
    template = REWRITE_RECIPES["ldre"].rewrite_template
    message = fill_rewrite_template(template, caption="a {instruction} sign", instruction="make it red")
    assert message.endswith("Image Content: a {instruction} sign\nInstruction: make it red\nEdited Description:")


def test_every_recipe_is_valid_and_bad_recipes_are_refused():
    for recipe in REWRITE_RECIPES.values():
        assert recipe.check() is recipe
    assert REWRITE_RECIPES["ldre"].num_captions == 15 and REWRITE_RECIPES["ldre"].caption_do_sample
    with pytest.raises(ValueError, match="at least as many beams"):
        RewriteRecipe.resolve({"num_captions": 3, "caption_num_beams": 2})
    with pytest.raises(ValueError, match="unknown fields"):
        RewriteRecipe.resolve({"num_caption": 3})
    with pytest.raises(ValueError, match="rewrite_template"):
        RewriteRecipe.resolve({"rewrite_template": "Instruction: {instruction}"})
    with pytest.raises(ValueError, match="`recipe` must be one of"):
        RewriteRecipe.resolve("cireVL")


# --------------------------------------------------------------------------------------------- the flow


def test_a_query_is_the_clip_embedding_of_the_llms_rewrite_of_the_caption(pipe):
    seen = scripted_llm(pipe, lambda chat: "Edited Description: a red dog on grass\n\nanything else")
    out = pipe(image=[picture(0), picture(1)], prompt=["is red", ("is red.", "has dogs?")])
    assert out.rewrites == [["a red dog on grass"], ["a red dog on grass"]]
    assert out.caption_embeds is None and out.rewrite_embeds.shape == (2, 1, pipe.embedding_dim)
    expected = pipe.encode_text(["a red dog on grass"] * 2)
    torch.testing.assert_close(out.image_embeds, expected, atol=1e-6, rtol=0)
    # The LLM read the recipe's instruction, then the caption and the modification (a FashionIQ pair joined).
    assert f"Image Content: {out.captions[0][0]}\nInstruction: is red" in seen[0]
    assert f"Image Content: {out.captions[1][0]}\nInstruction: is red and has dogs" in seen[1]
    assert "Edited Description:" in seen[0] and "<|start_header_id|>user" in seen[0] and "system" not in seen[0]


def test_a_rewrite_longer_than_clip_reads_is_cut_with_a_warning(pipe, caplog):
    long = "a red dog " * 40
    scripted_llm(pipe, lambda chat: f"Edited Description: {long}")
    with caplog.at_level("WARNING"):
        out = pipe(image=picture(1), prompt="is red")
    assert out.rewrites == [[long.strip()]]
    assert "1 of the 1 rewritten captions of this call is longer than the 77 tokens" in caplog.text


def test_without_an_answer_cireVL_falls_back_to_the_modification_text(pipe):
    scripted_llm(pipe, lambda chat: "I cannot help with that.")
    out = pipe(image=picture(2), prompt="has two dogs")
    assert out.rewrites == [["has two dogs"]]
    torch.testing.assert_close(out.image_embeds, pipe.encode_text(["has two dogs"]), atol=1e-6, rtol=0)


def test_ldre_ensembles_every_captions_rewrite():
    ldre = tiny_caption_rewrite_pipeline("ldre")
    seen = scripted_llm(ldre, lambda chat: f" the edit number {len(chat) % 7}")
    out = ldre(image=picture(3), prompt="is red", output_caption_embeds=True)
    assert len(out.captions[0]) == 15 and len(out.rewrites[0]) == 15
    assert len(set(out.captions[0])) > 1  # nucleus sampling: the captions differ
    torch.testing.assert_close(out.image_embeds, ldre.encode_text(out.rewrites[0]).mean(0, keepdim=True), atol=1e-6, rtol=0)
    # Every rewrite's and caption's embedding comes out, in order, for LDRE's adaptive (CIRCO) ensemble.
    torch.testing.assert_close(out.rewrite_embeds[0], ldre.encode_text(out.rewrites[0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.caption_embeds[0], ldre.encode_text(out.captions[0]), atol=1e-6, rtol=0)
    queries, weights = ldre_ensemble(out.rewrite_embeds, out.caption_embeds, ldre.encode_image([picture(4), picture(5)]))
    assert queries.shape == out.image_embeds.shape and weights.shape == (15,)
    assert all(LDRE_SYSTEM_PROMPT in chat and "<|start_header_id|>system" in chat for chat in seen)
    # Sampling is seeded: the same call gives the same query, and the caller's random state is left alone.
    state = torch.random.get_rng_state()
    again = ldre(image=picture(3), prompt="is red")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert again.captions == out.captions
    torch.testing.assert_close(again.image_embeds, out.image_embeds, atol=0, rtol=0)


def test_generation_batches_do_not_change_captions_or_rewrites():
    pipe = tiny_caption_rewrite_pipeline({"rewrite_fallback": "first_line", "caption_prompt": "a photo of"})
    images = [picture(4), picture(5, size=(64, 30)), picture(6)]
    assert pipe.generate_captions(images, batch_size=1) == pipe.generate_captions(images, batch_size=3)
    captions, instructions = ["a dog", "two red cars on a long street"], ["is blue", "x"]
    assert pipe.rewrite(captions, instructions, batch_size=1) == pipe.rewrite(captions, instructions, batch_size=2)


@pytest.mark.parametrize("kind", ["blip2-t5", "llava-next-chat"])
def test_other_captioners_work_through_the_same_path(kind):
    if kind == "blip2-t5":
        captioner = tiny_blip2(encoder_decoder=True)
    else:
        model = tiny_llava_next()
        processor = tiny_llava_next_processor(model)
        processor.chat_template = VLM_CHAT_TEMPLATE
        captioner = (model, processor)
    pipe = tiny_caption_rewrite_pipeline(captioner=captioner)
    images = [picture(7), picture(8, size=(64, 30))]
    captions = pipe.generate_captions(images, batch_size=2)
    assert [len(group) for group in captions] == [1, 1]
    assert captions == [pipe.generate_captions([image])[0] for image in images]
    if kind == "llava-next-chat":  # the prompt went in as a chat turn holding the image, and is not in the caption
        inputs = pipe._caption_inputs([images[0]], "Describe the image")
        text = pipe.caption_processor.tokenizer.decode(inputs["input_ids"][0])
        assert "<|start_header_id|>user<|end_header_id|>" in text and "Describe the image" in text


# --------------------------------------------------------------------------------------------- the caption cache


def test_captions_are_cached_per_image_and_captioner(tmp_path):
    pipe = tiny_caption_rewrite_pipeline(cache_dir=tmp_path)
    first = pipe.generate_captions([picture(9), picture(10)])
    files = sorted(tmp_path.rglob("*.json"))
    assert len(files) == 2 and json.loads(files[0].read_text())["captions"][0] in (first[0][0], first[1][0])
    exif_rotated_twin(picture(11, size=(48, 40)), tmp_path / "sideways.jpg")
    from_path = pipe(image=str(tmp_path / "sideways.jpg"), prompt="is red").captions

    def no_generation(**kwargs):
        raise AssertionError("a cached image was captioned again")

    original = pipe.captioner.generate
    pipe.captioner.generate = no_generation
    assert pipe.generate_captions([picture(10), picture(9)]) == [first[1], first[0]]
    # The key is the decoded, upright pixels: the EXIF-rotated file's captions serve its turned pixels.
    turned = load_image(tmp_path / "sideways.jpg")
    assert turned.size == (48, 40) and pipe.generate_captions([turned]) == from_path
    pipe.captioner.generate = original
    # Other caption settings are another captioner: a new folder, nothing reused.
    other = CaptionRewritePipeline(**pipe.components, recipe={"caption_prompt": "a photo of"})
    other.caption_cache_dir = tmp_path
    other.generate_captions([picture(9)])
    assert len([path for path in tmp_path.iterdir() if path.is_dir()]) == 2
    # A damaged entry is ignored and written again.
    files[0].write_text("{not json")
    pipe.generate_captions([picture(9), picture(10)])
    assert json.loads(files[0].read_text())["captions"]


# --------------------------------------------------------------------------------------------- refusals


def test_components_that_cannot_work_together_are_refused():
    captioner, processor = tiny_blip2()
    llm, llm_tokenizer = tiny_chat_llm()
    text_encoder, tokenizer, image_encoder, image_processor = tiny_clip()
    components = {
        "captioner": captioner, "caption_processor": processor, "llm": llm, "llm_tokenizer": llm_tokenizer,
        "text_encoder": text_encoder, "tokenizer": tokenizer, "image_encoder": image_encoder,
        "image_processor": image_processor,
    }
    llm_tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        CaptionRewritePipeline(**components)
    llm_tokenizer.chat_template = "{{ messages }}"
    with pytest.raises(ValueError, match="one CLIP model"):
        CaptionRewritePipeline(**{**components, "image_encoder": tiny_clip(projection_dim=8)[2]})
    assert "image_embeds" not in CaptionRewritePipeline.call_parameters()


def test_diffusers_cir_evaluate_composes_from_the_reference_pixels(tmp_path):
    from tiny_mllm import evaluate_with_the_command_line

    from diffusers_cir.retrieval import compose_queries

    report, queries, loaded, paths, texts = evaluate_with_the_command_line(tiny_caption_rewrite_pipeline(), tmp_path)
    assert report["encoder"] == loaded.fingerprint and "recall_at1" in report["metrics"]
    expected = compose_queries(loaded, texts, reference_images=[str(path) for path in paths[: len(texts)]])
    torch.testing.assert_close(queries, expected, atol=1e-5, rtol=0)
