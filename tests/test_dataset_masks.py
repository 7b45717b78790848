"""ClipSeg masks computed once into a dataset (examples/precompute_masks.py), carried into the embeddings with the
masked targets' embeddings, and trained on by the masked objective (--masked-objective-masks data)."""

import io
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import load_script
from PIL import Image

from diffusers_cir.data.precompute import (
    blank_masked_pixels,
    precompute_embeddings,
    transformers_embedder,
)
from diffusers_cir.data.schema import images_features
from diffusers_cir.data.shards import ParquetShardWriter, record_split
from diffusers_cir.data.streaming import decode_mask
from diffusers_cir.generation.dataset_masks import precompute_masks, row_mask_term
from diffusers_cir.generation.masks import clipseg_masks
from diffusers_cir.generation.tiny import tiny_clipseg
from diffusers_cir.text.keywords import RuleBasedKeywordExtractor

datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.usefixtures("single_thread")
EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "precompute_masks.py")


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


ROWS = [  # (reference caption, target caption, keyword pair)
    ("a red cup on a table", "a red vase on a table", ("cup", "vase")),  # keyword triplet: the target keyword
    ("a dog", "a dog with a hat", (None, None)),  # the words the target caption adds
    (None, "a cat sleeping on a sofa", (None, None)),  # caption only: an object term from the tagger
    (None, None, (None, None)),  # nothing to segment: no mask
]


@pytest.fixture
def image_dataset(tmp_path):
    from datasets import Features, Value

    features = Features({**images_features(), "source_keyword": Value("string"), "target_keyword": Value("string")})
    folder = str(tmp_path / "dataset")
    with ParquetShardWriter(folder, "images", "train", features, rows_per_shard=2) as writer:
        for i, (reference, target, (source_keyword, target_keyword)) in enumerate(ROWS * 2):
            writer.add({"id": f"row-{i}", "reference_image": {"bytes": _png(i), "path": None},
                        "target_image": {"bytes": _png(100 + i), "path": None}, "modification_text": f"edit {i}",
                        "reference_caption": reference, "target_caption": target,
                        "source_keyword": source_keyword, "target_keyword": target_keyword})
    record_split(folder, "images", features, "train", 2 * len(ROWS), default=True)
    return folder


def test_what_each_row_segments():
    tagger = RuleBasedKeywordExtractor()
    assert row_mask_term({"mask_term": "lamp", "target_keyword": "vase"}, tagger) == "lamp"
    assert row_mask_term({"target_keyword": "vase", "target_caption": "a vase"}, tagger) == "vase"
    assert row_mask_term({"reference_caption": "a dog", "target_caption": "a dog with a hat"}, tagger) == "with a hat"
    caption_only = {"id": "x", "target_caption": "a cat sleeping on a sofa"}
    assert row_mask_term(caption_only, tagger) in {"cat", "sofa"}
    assert row_mask_term(caption_only, None) is None  # no tagger: caption-only rows get no mask
    assert {row_mask_term({**caption_only, "id": str(i)}, tagger) for i in range(40)} == {"cat", "sofa"}


def test_masks_then_embeddings_then_training_on_them(image_dataset, tmp_path):
    model, processor = tiny_clipseg(seed=0)
    model.save_pretrained(tmp_path / "clipseg")
    processor.save_pretrained(tmp_path / "clipseg")
    script = load_script(EXAMPLE, "precompute_masks_example")
    assert script.main(["--dataset", image_dataset, "--model", str(tmp_path / "clipseg"), "--tagger", "builtin",
                        "--no-progress"]) == 0
    rows = sorted(datasets.load_dataset(image_dataset, "images", split="train", streaming=True), key=lambda row: int(row["id"][4:]))
    assert [row["mask_term"] for row in rows[:4]] == ["vase", "with a hat", rows[2]["mask_term"], None]
    assert rows[2]["mask_term"] in {"cat", "sofa"} and rows[3]["mask"] is None
    # the stored masks are the generator's ClipSeg masks of those terms, 64x64
    images = [Image.open(io.BytesIO(_png(100 + i))).convert("RGB") for i in range(3)]
    expected = clipseg_masks(model, processor, images, [row["mask_term"] for row in rows[:3]], 64, 0.5, 16)
    for row, mask in zip(rows, expected):
        assert np.array_equal(np.asarray(row["mask"].convert("L")), np.asarray(mask))
    # a second run keeps the shards that have masks
    summary = precompute_masks(image_dataset, model, processor, progress=False)
    assert summary.shards_done == [] and len(summary.shards_skipped) == 4

    # embeddings carry the mask, the keyword pair and the masked target's embedding
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                                   num_attention_heads=4, image_size=32, patch_size=8,
                                                   projection_dim=16)).save_pretrained(tmp_path / "clip")
    embedder = transformers_embedder(str(tmp_path / "clip"))
    precompute_embeddings(image_dataset, embedder, num_workers=0, progress=False)
    from diffusers_cir.data.precompute import record_embeddings_card

    record_embeddings_card(image_dataset, embedder.name, embedder.embedding_dim)
    embedded = sorted(datasets.load_dataset(image_dataset, "embeddings", split="train", streaming=True),
                      key=lambda row: int(row["id"][4:]))
    assert embedded[0]["source_keyword"] == "cup" and embedded[0]["target_keyword"] == "vase"
    target_pixels = embedder.preprocess([images[0]])
    mask = torch.from_numpy(decode_mask(embedded[0]["mask"], 64))[None]
    masked = F.normalize(embedder.encode(blank_masked_pixels(target_pixels, mask)), dim=-1)[0]
    torch.testing.assert_close(torch.tensor(embedded[0]["masked_target_image_embeds"]), masked, rtol=0, atol=1e-5)
    assert not any(embedded[3]["masked_target_image_embeds"])  # no mask, no masked embedding

    # the masked objective trains from them without images
    from tiny_components import tiny_text_encoder

    from diffusers_cir.training import main, parse_args
    from diffusers_cir.utils import build_offline_clip_tokenizer

    tiny_text_encoder().save_pretrained(tmp_path / "text")
    build_offline_clip_tokenizer().save_pretrained(tmp_path / "text")
    summary = main(parse_args([
        "--train-data-dir", image_dataset, "--text-encoder-name-or-path", str(tmp_path / "text"),
        "--tokenizer-name-or-path", str(tmp_path / "text"), "--objective-ratios", "triplet=0.5,masked=0.5",
        "--masked-objective-masks", "data", "--redraw-keyword-instructions", "--keyword-swap-prob", "0.5",
        "--transformer-config", json.dumps({"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8}),
        "--train-batch-size", "8", "--max-train-steps", "3", "--shuffle-buffer-size", "0", "--report-to", "none",
        "--output-dir", str(tmp_path / "run"),
    ]))
    assert summary["objective_rows"]["masked"] > 0 and summary["objective_rows"]["triplet"] > 0
