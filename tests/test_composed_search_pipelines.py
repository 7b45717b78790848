"""`composed_search` works with every pipeline family and refuses what a pipeline cannot use."""

import numpy as np
import pytest
import torch
from PIL import Image
from test_lincir_pipeline import tiny_pipeline as tiny_lincir_pipeline

from diffusers_cir.retrieval import GalleryIndex, composed_search


def _images(count):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)) for _ in range(count)]


def test_lincir_composed_search_equals_the_pipeline_ranking():
    pipe = tiny_lincir_pipeline(with_vision=True)
    images = _images(6)
    gallery = pipe.encode_image(images).float()
    index = GalleryIndex(gallery.shape[1], model_fingerprint=pipe.fingerprint)
    index.add(gallery.numpy(), ids=[f"g{i}" for i in range(6)])
    result = composed_search(pipe, index, image=images[0], text="is red", k=3, exclude_reference=False)
    query = pipe(image=[images[0]], prompt=["is red"]).image_embeds.float()
    scores = torch.nn.functional.normalize(query, dim=-1) @ torch.nn.functional.normalize(gallery, dim=-1).T
    expected = [f"g{i}" for i in scores[0].argsort(descending=True)[:3].tolist()]
    assert [hit.id for hit in result.hits] == expected
    with pytest.raises(ValueError, match="negative_prompt"):
        composed_search(pipe, index, image=images[0], text="is red", negative_text="blue", k=3)
