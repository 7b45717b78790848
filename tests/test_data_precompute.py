"""Embedding precomputation: correct embeddings per row, rank sharding, resume, bad rows, card, script, open_clip."""

import io
import json
import os
import runpy
import sys

import numpy as np
import pytest
import torch
from PIL import Image

datasets = pytest.importorskip("datasets")

from diffusers_cir.data.card import read_card_infos  # noqa: E402
from diffusers_cir.data.precompute import (  # noqa: E402
    open_clip_embedder,
    precompute_embeddings,
    record_embeddings_card,
    transformers_embedder,
)
from diffusers_cir.data.schema import embeddings_features, images_features  # noqa: E402
from diffusers_cir.data.shards import ParquetShardWriter, record_split, shard_files, validate_dataset  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "precompute_embeddings.py")
BROKEN_ID = "row-3"


def _png(seed):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (36, 28, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def image_dataset(tmp_path):
    folder = str(tmp_path / "dataset")
    with ParquetShardWriter(folder, "images", "train", images_features(), rows_per_shard=2) as writer:
        for i in range(8):
            target = b"\x89PNG broken" if f"row-{i}" == BROKEN_ID else _png(100 + i)
            writer.add({"id": f"row-{i}", "reference_image": {"bytes": _png(i), "path": None},
                        "target_image": {"bytes": target, "path": None}, "modification_text": f"edit {i}",
                        "reference_caption": None, "target_caption": f"caption {i}"})
    record_split(folder, "images", images_features(), "train", 8, default=True)
    return folder


@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=16)
    folder = str(tmp_path_factory.mktemp("tiny_clip"))
    CLIPVisionModelWithProjection(config).eval().save_pretrained(folder)
    return folder


def _read(folder, config="embeddings"):
    return {r["id"]: r for r in datasets.load_dataset(folder, config, split="train", streaming=True)}


def test_two_ranks_encode_every_decodable_row_and_resume(image_dataset, tiny_clip_folder):
    from transformers import CLIPVisionModelWithProjection

    embedder = transformers_embedder(tiny_clip_folder)
    summaries = [
        precompute_embeddings(image_dataset, embedder, batch_size=3, num_workers=0, rank=rank, world_size=2, progress=False)
        for rank in range(2)
    ]
    assert [len(s.shards_done) for s in summaries] == [2, 2]
    assert sum(s.num_rows for s in summaries) == 7 and summaries[0].images_per_second > 0
    assert [row_id for s in summaries for row_id, _ in s.skipped_rows] == [BROKEN_ID]
    assert [os.path.basename(p) for p in shard_files(image_dataset, "embeddings", "train")] == [
        f"train-{i:05d}-of-00004.parquet" for i in range(4)
    ]
    record_embeddings_card(image_dataset, embedder.name, embedder.embedding_dim)
    infos = read_card_infos(image_dataset)
    assert infos["embeddings"].features == embeddings_features(16)
    assert infos["embeddings"].splits["train"].num_examples == 7

    rows = _read(image_dataset)
    assert sorted(rows) == sorted(f"row-{i}" for i in range(8) if f"row-{i}" != BROKEN_ID)
    model = CLIPVisionModelWithProjection.from_pretrained(tiny_clip_folder).eval()
    pixels = embedder.preprocess([Image.open(io.BytesIO(_png(5))).convert("RGB"), Image.open(io.BytesIO(_png(105))).convert("RGB")])
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model(pixel_values=pixels).image_embeds, dim=-1).numpy()
    np.testing.assert_allclose(rows["row-5"]["reference_image_embeds"], expected[0], atol=1e-5)
    np.testing.assert_allclose(rows["row-5"]["target_image_embeds"], expected[1], atol=1e-5)
    assert rows["row-5"]["modification_text"] == "edit 5" and rows["row-5"]["target_caption"] == "caption 5"
    report = validate_dataset(image_dataset, progress=False, check_images=False)
    assert any("1 only in images" in problem for problem in report.problems)  # the skipped row is visible

    # Resume: a finished shard is kept as is, a missing one (interrupted run) is redone.
    shards = shard_files(image_dataset, "embeddings", "train")
    kept = open(shards[0], "rb").read()
    os.remove(shards[2])
    again = precompute_embeddings(image_dataset, embedder, num_workers=0, progress=False)
    assert len(again.shards_skipped) == 3 and [os.path.basename(p) for p in again.shards_done] == [os.path.basename(shards[2])]
    assert open(shards[0], "rb").read() == kept and _read(image_dataset).keys() == rows.keys()
    assert not [n for n in os.listdir(os.path.join(image_dataset, "embeddings")) if n.startswith(".")]


def test_example_script_with_accelerate_and_streaming_the_result(image_dataset, tiny_clip_folder, monkeypatch, capsys):
    from diffusers_cir.data.streaming import build_triplet_dataloader, load_triplet_stream

    monkeypatch.setattr(sys, "argv", ["precompute_embeddings.py", "--dataset", image_dataset, "--model", tiny_clip_folder,
                                      "--num-workers", "2", "--batch-size", "4", "--no-progress"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(SCRIPT, run_name="__main__")
    assert exit_info.value.code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["rows"] == 7 and result["skipped_rows"] == 1 and result["images_per_second"] > 0
    card = open(os.path.join(image_dataset, "README.md")).read()
    assert f"embeddings_encoder: {tiny_clip_folder}" in card and "embeddings_normalized: true" in card
    stream = load_triplet_stream(image_dataset, "embeddings")
    batch = next(iter(build_triplet_dataloader(stream, batch_size=8, shuffle=False)))
    assert batch["target_image_embeds"].shape == (7, 16)
    torch.testing.assert_close(batch["target_image_embeds"].norm(dim=-1), torch.ones(7))


def test_open_clip_backend(image_dataset, tmp_path):
    import open_clip

    config = {"embed_dim": 12, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = tmp_path / "tiny-cir-test.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(str(path))
    embedder = open_clip_embedder("tiny-cir-test")
    assert embedder.embedding_dim == 12 and embedder.name == "open_clip:tiny-cir-test"
    summary = precompute_embeddings(image_dataset, embedder, output_folder=str(tmp_path / "out"), num_workers=0, progress=False)
    assert summary.num_rows == 7
    assert not os.path.exists(tmp_path / "out" / "README.md")  # only record_embeddings_card writes the card
    record_embeddings_card(str(tmp_path / "out"), embedder.name, embedder.embedding_dim)
    rows = _read(str(tmp_path / "out"))
    assert len(rows["row-0"]["reference_image_embeds"]) == 12


def test_missing_images_split_is_a_clear_error(tmp_path, tiny_clip_folder):
    with pytest.raises(FileNotFoundError, match="diffusers-cir data write"):
        precompute_embeddings(str(tmp_path), transformers_embedder(tiny_clip_folder), progress=False)


@pytest.mark.parametrize("flag, value, expected", [("--batch-size", "0", "--batch-size must be a positive integer, got 0"),
                                                   ("--num-workers", "-1", "--num-workers must be 0 or a positive integer, got -1")])
def test_example_script_refuses_bad_numbers_when_reading_the_command_line(flag, value, expected, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["precompute_embeddings.py", "--dataset", "d", "--model", "m", flag, value])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(SCRIPT, run_name="__main__")
    assert exit_info.value.code == 2 and expected in capsys.readouterr().err


def test_example_script_names_a_dataset_without_image_shards_before_loading_the_model(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["precompute_embeddings.py", "--dataset", str(tmp_path), "--model",
                                      str(tmp_path / "no-such-model"), "--split", "validation"])
    with pytest.raises(FileNotFoundError, match=r"--dataset .* --split 'validation': no .*images/validation-\*\.parquet"):
        runpy.run_path(SCRIPT, run_name="__main__")


class _ThreadAccelerator:
    """`accelerate.Accelerator` for one of several processes (threads here, synchronised by a barrier)."""

    def __init__(self, process_index, num_processes, barrier):
        self.process_index, self.num_processes, self.barrier = process_index, num_processes, barrier
        self.device = torch.device("cpu")
        self.is_main_process = self.is_local_main_process = process_index == 0

    def wait_for_everyone(self):
        self.barrier.wait(timeout=120)

    def end_training(self):
        pass


def test_example_script_summary_covers_every_process(image_dataset, tiny_clip_folder, monkeypatch, capsys):
    """Under `accelerate launch` the printed summary was rank 0's alone (here 4 of 7 rows, none of the skipped
    row, which rank 1 met): it is now gathered from every process, with each one's counts alongside."""
    import threading

    import accelerate
    import accelerate.utils
    from conftest import load_script

    script = load_script(SCRIPT, "precompute_embeddings_ranks")
    world_size, barrier, lock = 2, threading.Barrier(2), threading.Lock()
    ranks = iter(range(world_size))
    gathered, errors = [None] * world_size, []
    local = threading.local()

    def accelerator_factory(*args, **kwargs):
        with lock:
            local.rank = next(ranks)
        return _ThreadAccelerator(local.rank, world_size, barrier)

    def gather_object(items):  # what accelerate's does across processes: every rank's list, concatenated
        gathered[local.rank] = items
        barrier.wait(timeout=120)
        return [item for rank_items in gathered for item in rank_items]

    monkeypatch.setattr(accelerate, "Accelerator", accelerator_factory)
    monkeypatch.setattr(accelerate.utils, "gather_object", gather_object)
    argv = ["--dataset", image_dataset, "--model", tiny_clip_folder, "--num-workers", "0", "--batch-size", "4", "--no-progress"]

    def run():
        try:
            assert script.main(argv) == 0
        except BaseException as error:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=run) for _ in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # printed once, by the main process
    result = json.loads(lines[0])
    per_rank = result["per_rank"]
    assert result["processes"] == 2 and [entry["rank"] for entry in per_rank] == [0, 1]
    assert [entry["shards_encoded"] for entry in per_rank] == [2, 2]
    embedded = _read(image_dataset)
    assert result["rows"] == len(embedded) == sum(entry["rows"] for entry in per_rank)
    assert result["images"] == 2 * result["rows"] and result["shards_encoded"] == 4
    assert result["skipped_rows"] == sum(entry["skipped_rows"] for entry in per_rank) == 1
    assert 0 < min(entry["rows"] for entry in per_rank) < result["rows"] and result["images_per_second"] > 0
    assert read_card_infos(image_dataset)["embeddings"].splits["train"].num_examples == result["rows"]
