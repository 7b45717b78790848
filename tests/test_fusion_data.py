"""The composition-network trainer's data and losses: the text-triplet layout, the collator, the objectives."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffusers_cir.data import text_triplets as layout
from diffusers_cir.training.fusion_data import (
    FusionCollator,
    fusion_columns,
    open_fusion_stream,
)
from diffusers_cir.training.fusion_losses import (
    contrastive_loss,
    duplicate_mask,
    prototype_alignment_loss,
)

REPO = Path(__file__).resolve().parents[1]


def _columns(count: int, width: int = 4, bad_row: int | None = None) -> dict:
    rng = np.random.default_rng(0)
    columns = {
        "id": [f"t{i}" for i in range(count)],
        "image_embeds": rng.standard_normal((count, width)).astype(np.float32),
        "caption": [f"a photo of thing {i}" for i in range(count)],
        "modification_text": ["make it red"] * count,
        "modified_caption": [f"a photo of red thing {i}" for i in range(count)],
    }
    if bad_row is not None:
        columns["modified_caption"][bad_row] = columns["caption"][bad_row].upper() + "."
    return columns


# --------------------------------------------------------------------------------------------- the layout
def test_a_text_triplet_needs_three_texts_and_a_caption_that_changes():
    good = {"caption": "a bus", "modification_text": "make it red", "modified_caption": "a red bus"}
    assert layout.text_triplet_problem(good) is None
    assert "changes nothing" in layout.text_triplet_problem({**good, "modified_caption": "A  bus."})
    assert "modification_text is empty" in layout.text_triplet_problem({**good, "modification_text": " "})
    assert "caption is empty or not a string (NoneType)" in layout.text_triplet_problem({**good, "caption": None})
    mapped = {"reference_caption": "a bus", "modification_text": "make it red", "target_caption": "a red bus"}
    assert layout.text_triplet_problem(mapped, layout.SYNTHTRIPLETS_COLUMNS) is None


def test_written_text_triplets_stream_back_and_validate(tmp_path):
    assert layout.write_text_triplets(tmp_path, _columns(6)) == 6
    stream, columns = open_fusion_stream(str(tmp_path), None, "train", "text_triplets")
    assert columns.reference_is_embedding and columns.target_text == "modified_caption"
    rows = list(stream.dataset)
    assert len(rows) == 6
    report = layout.validate_text_triplets(str(tmp_path), progress=False)
    assert report.ok, report.format()


def test_writing_refuses_a_triplet_that_changes_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"'t2' \(row 2\): modified_caption is the caption itself"):
        layout.write_text_triplets(tmp_path, _columns(4, bad_row=2))


def test_data_validate_command_reports_rows_that_are_not_text_triplets(tmp_path):
    from diffusers_cir.data.card import update_dataset_card
    from diffusers_cir.data.shards import ParquetShardWriter

    columns = _columns(5, bad_row=3)
    features = layout.text_triplet_features(4)
    with ParquetShardWriter(str(tmp_path), layout.TEXT_TRIPLET_EMBEDDINGS_CONFIG, "train", features, 10) as writer:
        writer.add_batch(columns)
    update_dataset_card(str(tmp_path), layout.TEXT_TRIPLET_EMBEDDINGS_CONFIG, features, {"train": 5}, default=True)
    result = subprocess.run([sys.executable, "-m", "diffusers_cir.cli", "data", "validate", str(tmp_path), "--json"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1, result.stderr
    problems = json.loads(result.stdout)["problems"]
    assert any("1 row(s) are not text triplets: 't3' (modified_caption is the caption itself" in p for p in problems)


# --------------------------------------------------------------------------------------------- the collator
def test_synthtriplets_columns_name_what_is_missing():
    from diffusers_cir.data.schema import MissingColumnsError

    columns = ["id", "reference_image_embeds", "target_image_embeds", "modification_text"]
    found = fusion_columns("synthtriplets", columns, {})
    assert found.target == "target_image_embeds" and found.reverse_text is None
    with pytest.raises(MissingColumnsError, match="reverse_modification_text"):
        fusion_columns("synthtriplets", columns, {}, needs_reverse_text=True)
    with pytest.raises(MissingColumnsError, match="modified_caption"):
        fusion_columns("text_triplets", columns, {"image_embeds": "reference_image_embeds"})


def test_collator_drops_rows_that_do_not_decode_and_counts_them():
    columns = fusion_columns("text_triplets", ["id"] + list(layout.TEXT_TRIPLET_CONFIGS["text_triplet_embeddings"]), {})
    collate = FusionCollator(columns, text_triplets=True)
    good = {"id": "a", "image_embeds": [1.0, 0.0], "caption": "a cup", "modification_text": "make it red",
            "modified_caption": "a red cup"}
    rows = [good, {**good, "id": "b", "image_embeds": [float("nan"), 1.0]},
            {**good, "id": "c", "modified_caption": "a cup"}, {**good, "id": "d", "image_embeds": [0.0, 1.0, 2.0]}]
    batch = collate(rows)
    assert batch["ids"] == ["a"] and batch["num_skipped"] == 3
    reasons = dict(batch["skipped"])
    assert "non-finite" in reasons["b"] and "changes nothing" in reasons["c"] and "width 3, expected 2" in reasons["d"]
    assert batch["reference_embeds"].shape == (1, 2) and batch["target_texts"] == ["a red cup"]
    assert batch["reference_texts"] == ["a cup"]


def test_collator_preprocesses_images_and_skips_undecodable_ones():
    from pipeline_tester import picture
    from tiny_components import tiny_image_processor

    from diffusers_cir.data.pictures import png_bytes

    columns = fusion_columns("synthtriplets", ["id", "reference_image", "target_image", "modification_text"], {})
    collate = FusionCollator(columns, tiny_image_processor())
    rows = [{"id": str(i), "reference_image": {"bytes": png_bytes(picture(i)), "path": None},
             "target_image": {"bytes": png_bytes(picture(i + 10)), "path": None}, "modification_text": "make it red"}
            for i in range(3)]
    rows[1]["target_image"] = {"bytes": b"not an image", "path": None}
    batch = collate(rows)
    assert batch["ids"] == ["0", "2"] and batch["num_skipped"] == 1
    assert batch["reference_pixel_values"].shape == batch["target_pixel_values"].shape == (2, 3, 32, 32)


def test_synthetic_world_reverse_texts_turn_the_target_back_into_the_reference():
    from diffusers_cir.data.synthetic import SyntheticCIRWorld, SyntheticWorldConfig

    world = SyntheticCIRWorld(SyntheticWorldConfig.tiny(seed=0))
    triplets = world.triplets("train", num_triplets=40, seed=1)
    rows = world.triplet_rows(triplets)
    assert rows["modification_text"] == list(triplets.modification_texts)  # the triplets are unchanged
    for reference, text, edited in zip(triplets.reference_indices, rows["reverse_modification_text"],
                                       triplets.edited_attributes):
        for name in edited.split("+"):  # every reverse edit names the reference's value of the edited attribute
            assert getattr(world.items[reference], name) in text
    assert rows["reverse_modification_text"] == world.reverse_modification_texts(triplets)


# --------------------------------------------------------------------------------------------- losses
def test_contrastive_loss_is_cross_entropy_over_the_batch():
    queries, targets = F.normalize(torch.randn(5, 8), dim=-1), torch.randn(5, 8)
    logits = queries @ F.normalize(targets, dim=-1).T / 0.01
    torch.testing.assert_close(contrastive_loss(queries, targets, 0.01), F.cross_entropy(logits, torch.arange(5)))
    torch.testing.assert_close(contrastive_loss(queries, targets, 0.01, label_smoothing=0.1),
                               F.cross_entropy(logits, torch.arange(5), label_smoothing=0.1))


def test_a_repeated_target_is_not_its_own_negative():
    targets = torch.randn(4, 8)
    targets[2] = targets[0]
    queries = F.normalize(targets, dim=-1)  # every query is its target
    mask = duplicate_mask([bytes(row.numpy().tobytes()) for row in targets])
    assert mask[0, 2] and mask[2, 0] and mask.sum() == 2
    plain, masked = contrastive_loss(queries, targets, 0.1), contrastive_loss(queries, targets, 0.1, duplicates=mask)
    assert masked < plain  # rows 0 and 2 no longer lose probability to their twin
    # label smoothing is spread over the classes each row keeps: finite, as with torch's own
    assert torch.isfinite(contrastive_loss(queries, targets, 0.1, label_smoothing=0.1, duplicates=mask))


def test_the_original_caption_is_one_more_negative():
    queries = F.normalize(torch.randn(3, 8), dim=-1)
    targets = torch.randn(3, 8)
    far = -queries  # a caption opposite to each query costs almost nothing; the query itself costs a lot
    assert contrastive_loss(queries, targets, 0.1, extra_negatives=far) < contrastive_loss(
        queries, targets, 0.1, extra_negatives=queries)


def test_prototype_alignment_sends_no_gradient_to_the_reverse_branch():
    forward, reverse = torch.randn(2, 4, requires_grad=True), torch.randn(2, 4, requires_grad=True)
    prototype_alignment_loss(forward, reverse).backward()
    assert forward.grad is not None and reverse.grad is None
