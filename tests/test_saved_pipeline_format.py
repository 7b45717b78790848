"""A pipeline folder saved by an earlier release must keep loading and computing the same embedding."""

import json
import sys

import torch
from conftest import FIXTURES
from safetensors.torch import load_file

from diffusers_cir import CompoDiffPipeline

FOLDER = FIXTURES / "saved_compodiff_pipeline"


def test_committed_folder_reloads_and_computes_the_same_embeddings():
    sys.path.insert(0, str(FIXTURES))
    from make_saved_pipeline import fixed_query, run

    index = json.loads((FOLDER / "model_index.json").read_text())
    assert index["_class_name"] == "CompoDiffPipeline"
    pipe = CompoDiffPipeline.from_pretrained(FOLDER)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder is None and pipe.tokenizer is None
    out = run(pipe, fixed_query())
    expected = load_file(str(FOLDER / "expected.safetensors"))["image_embeds"]
    assert out.shape == expected.shape
    assert torch.allclose(out, expected, atol=1e-4, rtol=0)
