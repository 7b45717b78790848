"""The one compose path (`retrieval.compose_queries`): a pipeline that composes from the reference's gallery embedding
gets `image_embeds`; one that fuses the reference's pixels (MagicLens-style, stood in for here) gets the images, in
`compose_queries`, `composed_search` and the evaluation alike; what a pipeline cannot take is refused."""

import json
from types import SimpleNamespace

import pytest
import torch
from pipeline_tester import picture
from tiny_components import tiny_image_encoder, tiny_image_processor, tiny_pipeline

from diffusers_cir.retrieval import CLIPVisionEncoder, GalleryIndex, compose_queries, composed_search


class PixelFusionPipeline:
    """Meets the pipeline contract but composes from pixels only (no `image_embeds`), as MagicLens does: the query
    is the tower's embedding of the reference plus a fixed vector per text. It records what each call was given."""

    def __init__(self):
        self.tower = CLIPVisionEncoder(tiny_image_encoder(), tiny_image_processor())
        self.calls = []

    fingerprint = property(lambda self: self.tower.fingerprint)
    embedding_dim = property(lambda self: self.tower.embedding_dim)

    def to(self, device):
        return self

    def encode_image(self, images, batch_size=64, device=None, show_progress=False):
        return self.tower.encode_image(images, batch_size=batch_size)

    @classmethod
    def call_parameters(cls):
        return frozenset({"image", "prompt", "output_type"})

    def text_vector(self, text):
        return torch.randn(self.embedding_dim, generator=torch.Generator().manual_seed(len(text)))

    def __call__(self, image, prompt, output_type="pt"):
        self.calls.append({"image": image, "prompt": prompt})
        text = torch.stack([self.text_vector(t) for t in prompt])
        return SimpleNamespace(image_embeds=self.encode_image(image) + text)


def _normalize(x):
    return torch.nn.functional.normalize(torch.as_tensor(x).float(), dim=-1)


def test_a_pipeline_without_image_embeds_is_given_the_reference_images():
    pipe = PixelFusionPipeline()
    images = [picture(0), picture(1), picture(2)]
    embeds = pipe.encode_image(images)
    queries = compose_queries(pipe, ["is red", ["has two", "two it has"], "x"], reference_embeds=embeds,
                              reference_images=images, batch_size=2)
    assert all(all(isinstance(item, type(images[0])) for item in call["image"]) for call in pipe.calls)
    expected_second = _normalize(_normalize(embeds[1] + pipe.text_vector("has two"))
                                 + _normalize(embeds[1] + pipe.text_vector("two it has")))
    torch.testing.assert_close(queries[1], expected_second, atol=1e-5, rtol=0)
    torch.testing.assert_close(queries[0], _normalize(embeds[0] + pipe.text_vector("is red")), atol=1e-5, rtol=0)

    with pytest.raises(ValueError, match="composes from the reference's pixels .*pass `reference_images`"):
        compose_queries(pipe, ["is red"], reference_embeds=embeds[:1])
    with pytest.raises(ValueError, match="does not take `negative_prompt`; leave it out"):
        compose_queries(pipe, ["is red"], reference_images=images[:1], negative_prompts=["blue"])
    with pytest.raises(ValueError, match="does not take `mask_image`"):
        compose_queries(pipe, ["is red"], reference_images=images[:1], mask_images=[picture(3).convert("L")])
    with pytest.raises(ValueError, match=r"does not accept \['num_inference_steps'\]"):
        compose_queries(pipe, ["is red"], reference_images=images[:1], num_inference_steps=3)
    with pytest.raises(ValueError, match=r"`prompts\[1\]` holds no text"):
        compose_queries(pipe, ["is red", []], reference_images=images[:2])


def test_a_pipeline_with_image_embeds_composes_from_the_gallery_embedding_with_a_generator_per_batch():
    pipe = tiny_pipeline()
    images = [picture(4), picture(5), picture(6)]
    embeds = pipe.encode_image(images)
    queries = compose_queries(pipe, ["is red", "has two", "x"], reference_embeds=embeds, batch_size=2, seed=7,
                              num_inference_steps=3)
    first = pipe(image_embeds=embeds[:2], prompt=["is red", "has two"], num_inference_steps=3,
                 generator=torch.Generator().manual_seed(7)).image_embeds
    second = pipe(image_embeds=embeds[2:], prompt=["x"], num_inference_steps=3,
                  generator=torch.Generator().manual_seed(8)).image_embeds
    torch.testing.assert_close(queries, _normalize(torch.cat([first, second])), atol=1e-5, rtol=0)
    # Pixels given too: the embeddings are used (the image tower does not run again).
    again = compose_queries(pipe, ["is red", "has two", "x"], reference_embeds=embeds, reference_images=[None] * 3,
                            batch_size=2, seed=7, num_inference_steps=3)
    torch.testing.assert_close(again, queries)


def test_composed_search_gives_a_pixel_pipeline_the_reference_image(tmp_path):
    pipe = PixelFusionPipeline()
    paths = []
    for number in range(5):
        paths.append(tmp_path / f"{number}.png")
        picture(10 + number).save(paths[-1])
    gallery = pipe.encode_image([str(path) for path in paths])
    index = GalleryIndex.from_embeddings(gallery.numpy(), ids=[p.name for p in paths],
                                         metadata=[{"path": str(p.resolve())} for p in paths],
                                         model_fingerprint=pipe.fingerprint)
    result = composed_search(pipe, index, image=paths[2], text="is red", k=3)
    assert result.excluded_ids == ["2.png"] and "2.png" not in [hit.id for hit in result.hits]
    query = _normalize(pipe.encode_image([str(paths[2])]) + pipe.text_vector("is red"))
    torch.testing.assert_close(result.query_embeds, query, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="does not take `negative_prompt`"):
        composed_search(pipe, index, image=paths[2], text="is red", negative_text="blue")
    with pytest.raises(ValueError, match=r"does not accept \['num_inference_steps'\]"):
        composed_search(pipe, index, image=paths[2], text="is red", num_inference_steps=4)


def test_evaluation_composes_a_pixel_pipeline_from_the_reference_files(tmp_path):
    from safetensors import safe_open

    from diffusers_cir.evaluation import run_evaluation

    root = tmp_path / "CIRR"
    (root / "dev").mkdir(parents=True)
    names = [f"dev-{i}" for i in range(7)]
    for number, name in enumerate(names):
        picture(30 + number).save(root / "dev" / f"{name}.png")
    (root / "split.rc2.val.json").write_text(json.dumps({name: f"./dev/{name}.png" for name in names}))
    captions = [{"pairid": i, "reference": names[i], "target_hard": names[i + 1], "caption": f"change {i}",
                 "target_soft": {}, "img_set": {"id": i, "members": names[i: i + 6]}} for i in range(2)]
    (root / "cap.rc2.val.json").write_text(json.dumps(captions))
    pipe = PixelFusionPipeline()
    run_evaluation(pipe, "cirr", root, output_dir=tmp_path / "out", progress=False)
    with safe_open(tmp_path / "out" / "query_embeddings.safetensors", framework="pt") as handle:
        queries = handle.get_tensor("query_embeds")
    references = pipe.encode_image([str(root / "dev" / f"{name}.png") for name in names[:2]])
    expected = _normalize(references + torch.stack([pipe.text_vector(f"change {i}") for i in range(2)]))
    torch.testing.assert_close(queries, expected, atol=1e-5, rtol=0)
    assert all("image" in call for call in pipe.calls)


def test_docstring_example_runs():
    import doctest

    import diffusers_cir.retrieval.compose as module

    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
