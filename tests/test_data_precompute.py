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


# --------------------------------------------------------------------------------------------- target pad
def _elongated_png(seed, size):
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def elongated_dataset(tmp_path):
    """Landscape references (60 x 30) and portrait targets (30 x 60): ratio 2, padded to 60 x 48 and 48 x 60."""
    folder = str(tmp_path / "elongated")
    with ParquetShardWriter(folder, "images", "train", images_features(), rows_per_shard=4) as writer:
        for i in range(4):
            writer.add({"id": f"row-{i}", "reference_image": {"bytes": _elongated_png(i, (60, 30)), "path": None},
                        "target_image": {"bytes": _elongated_png(10 + i, (30, 60)), "path": None},
                        "modification_text": f"edit {i}", "reference_caption": None, "target_caption": None})
    record_split(folder, "images", images_features(), "train", 4, default=True)
    return folder


def _padded_by_hand(png: bytes) -> Image.Image:
    """CLIP4Cir's target pad at 1.25, stated for these sizes: the short side of a 2:1 image grows from 30 to 48 (9
    black pixels on each side)."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    landscape = image.width > image.height
    padded = Image.new("RGB", (60, 48) if landscape else (48, 60))
    padded.paste(image, (0, 9) if landscape else (9, 0))
    return padded


def _tiny_open_clip(tmp_path):
    import open_clip

    config = {"embed_dim": 12, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = tmp_path / "tiny-cir-targetpad.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(str(path))
    _, _, transform = open_clip.create_model_and_transforms("tiny-cir-targetpad")
    return transform


@pytest.mark.parametrize("backend", ["transformers", "open_clip"])
def test_target_pad_embeddings_are_the_towers_embeddings_of_the_padded_pixels(backend, elongated_dataset,
                                                                               tiny_clip_folder, tmp_path):
    from transformers import CLIPImageProcessorPil

    from diffusers_cir.data.precompute import recorded_embeddings_preprocessing

    if backend == "transformers":
        torch.manual_seed(0)
        padded_embedder = transformers_embedder(tiny_clip_folder, image_preprocessing="targetpad")
        plain_embedder = transformers_embedder(tiny_clip_folder)
        clip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})

        def plain_pixels(images):
            return clip(images, return_tensors="pt").pixel_values
    else:
        transform = _tiny_open_clip(tmp_path)
        torch.manual_seed(0)
        padded_embedder = open_clip_embedder("tiny-cir-targetpad", image_preprocessing="targetpad")
        torch.manual_seed(0)
        plain_embedder = open_clip_embedder("tiny-cir-targetpad")

        def plain_pixels(images):
            return torch.stack([transform(image) for image in images])
    assert (padded_embedder.image_preprocessing, padded_embedder.target_ratio) == ("targetpad", 1.25)
    assert (plain_embedder.image_preprocessing, plain_embedder.target_ratio) == ("clip", None)
    padded_out, plain_out = str(tmp_path / "padded"), str(tmp_path / "plain")
    for embedder, output in ((padded_embedder, padded_out), (plain_embedder, plain_out)):
        precompute_embeddings(elongated_dataset, embedder, output_folder=output, num_workers=0, progress=False)
        record_embeddings_card(output, embedder.name, embedder.embedding_dim,
                               image_preprocessing=embedder.image_preprocessing, target_ratio=embedder.target_ratio)
    pngs = [_elongated_png(1, (60, 30)), _elongated_png(11, (30, 60))]
    padded = [_padded_by_hand(png) for png in pngs]
    plain = [Image.open(io.BytesIO(png)).convert("RGB") for png in pngs]
    expected = torch.nn.functional.normalize(padded_embedder.encode(plain_pixels(padded)), dim=-1).numpy()
    plain_embeds = torch.nn.functional.normalize(padded_embedder.encode(plain_pixels(plain)), dim=-1).numpy()
    row, plain_row = _read(padded_out)["row-1"], _read(plain_out)["row-1"]
    for column, index in (("reference_image_embeds", 0), ("target_image_embeds", 1)):
        np.testing.assert_allclose(row[column], expected[index], atol=1e-5)
        assert np.abs(expected[index] - plain_embeds[index]).max() > 1e-2  # padding changes the embedding
        np.testing.assert_allclose(plain_row[column], plain_embeds[index], atol=1e-3)  # the plain run: CLIP's
        # (1e-3: a plain PIL processor resizes through diffusers_cir.retrieval.images.resize, some 1e-5 apart)
    assert recorded_embeddings_preprocessing(padded_out) == ("targetpad", 1.25)
    assert recorded_embeddings_preprocessing(plain_out) == ("clip", None)
    card = open(os.path.join(padded_out, "README.md")).read()
    assert "embeddings_image_preprocessing: targetpad" in card and "embeddings_target_ratio: 1.25" in card


def test_example_script_records_target_pad_and_refuses_to_mix_preprocessings(elongated_dataset, tiny_clip_folder,
                                                                             monkeypatch, capsys):
    from diffusers_cir.data.precompute import recorded_embeddings_preprocessing

    def run(*flags):
        monkeypatch.setattr(sys, "argv", ["precompute_embeddings.py", "--dataset", elongated_dataset, "--model",
                                          tiny_clip_folder, "--num-workers", "0", "--no-progress", *flags])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(SCRIPT, run_name="__main__")
        return exit_info.value.code, capsys.readouterr().err

    assert run("--target-ratio", "1.5")[0] == 0  # implies targetpad
    assert recorded_embeddings_preprocessing(elongated_dataset) == ("targetpad", 1.5)
    first = open(shard_files(elongated_dataset, "embeddings", "train")[0], "rb").read()
    code, err = run("--image-preprocessing", "targetpad")  # 1.25: not what the kept shards were made with
    assert code == 2 and "--image-preprocessing targetpad (target ratio 1.25), but the embeddings" in err
    assert "were made with targetpad (target ratio 1.5)" in err
    assert open(shard_files(elongated_dataset, "embeddings", "train")[0], "rb").read() == first
    assert recorded_embeddings_preprocessing(elongated_dataset) == ("targetpad", 1.5)


@pytest.mark.parametrize("flags, expected", [
    (["--image-preprocessing", "clip", "--target-ratio", "1.5"], "--target-ratio 1.5 is target pad's ratio"),
    (["--target-ratio", "0.9"], "argument --target-ratio"),
    (["--image-preprocessing", "squarepad"], "argument --image-preprocessing: invalid choice"),
])
def test_example_script_refuses_bad_preprocessing_flags(flags, expected, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["precompute_embeddings.py", "--dataset", "d", "--model", "m", *flags])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(SCRIPT, run_name="__main__")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and expected in err and "Traceback" not in err
