"""Streaming triplets: decoding, collation, rank/worker sharding, exact resume, corrupt rows, column mappings."""

import io
import json
import logging
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

datasets = pytest.importorskip("datasets")
pytest.importorskip("torchdata")

from diffusers_cir.data.schema import MissingColumnsError, embeddings_features, images_features  # noqa: E402
from diffusers_cir.data.shards import ParquetShardWriter, record_split  # noqa: E402
from diffusers_cir.data.streaming import (  # noqa: E402
    BlockShuffledStream,
    TripletCollator,
    build_triplet_dataloader,
    decode_mask,
    load_triplet_stream,
)
from diffusers_cir.utils import build_offline_clip_tokenizer  # noqa: E402

NUM_ROWS = 24
CORRUPT_IMAGE_IDS = {"row-05", "row-17"}  # garbage bytes / truncated JPEG
BAD_EMBEDDING_IDS = {"row-11"}  # NaN
DIM = 8


def _image_bytes(seed: int, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


def _row_ids():
    return [f"row-{i:02d}" for i in range(NUM_ROWS)]


@pytest.fixture(scope="module")
def dataset_folder(tmp_path_factory):
    """8 shards x 3 rows in both configurations; two undecodable images and one NaN embedding."""
    folder = str(tmp_path_factory.mktemp("triplets"))
    rng = np.random.default_rng(0)
    ids = _row_ids()
    references, targets = rng.standard_normal((NUM_ROWS, DIM)), rng.standard_normal((NUM_ROWS, DIM))
    for i, row_id in enumerate(ids):
        if row_id in BAD_EMBEDDING_IDS:
            references[i, 3] = np.nan
    with ParquetShardWriter(folder, "images", "train", images_features(), rows_per_shard=3, row_group_size=2) as writer:
        for i, row_id in enumerate(ids):
            reference = _image_bytes(2 * i)
            if row_id == "row-05":
                reference = b"this is not an image"
            target = _image_bytes(2 * i + 1, "JPEG")
            if row_id == "row-17":
                target = target[: len(target) // 2]  # truncated: the header parses, decoding fails
            writer.add(
                {
                    "id": row_id,
                    "reference_image": {"bytes": reference, "path": None},
                    "target_image": {"bytes": target, "path": None},
                    "modification_text": f"make it color {i}",
                    "reference_caption": f"a photo of thing {i}",
                    "target_caption": f"a photo of colored thing {i}",
                }
            )
    record_split(folder, "images", images_features(), "train", NUM_ROWS, default=True)
    with ParquetShardWriter(folder, "embeddings", "train", embeddings_features(DIM), rows_per_shard=3, row_group_size=2) as writer:
        writer.add_batch(
            {
                "id": ids,
                "reference_image_embeds": references.astype(np.float32),
                "target_image_embeds": targets.astype(np.float32),
                "modification_text": [f"make it color {i}" for i in range(NUM_ROWS)],
                "reference_caption": [f"a photo of thing {i}" for i in range(NUM_ROWS)],
                "target_caption": [f"a photo of colored thing {i}" for i in range(NUM_ROWS)],
            }
        )
    record_split(folder, "embeddings", embeddings_features(DIM), "train", NUM_ROWS)
    return {"folder": folder, "references": references.astype(np.float32), "targets": targets.astype(np.float32)}


def _ids(batches):
    return [row_id for batch in batches for row_id in batch["ids"]]


def test_images_are_decoded_clip_preprocessed_and_tokenized(dataset_folder):
    from transformers import CLIPImageProcessor

    stream = load_triplet_stream(dataset_folder["folder"], "images", split="train")
    assert stream.source == "images" and stream.num_shards == 8
    loader = build_triplet_dataloader(stream, batch_size=5, shuffle=False)
    batches = list(loader)
    ids = _ids(batches)
    assert sorted(ids) == sorted(set(_row_ids()) - CORRUPT_IMAGE_IDS) and len(ids) == len(set(ids))
    assert loader.num_skipped == 2 and loader.num_rows == NUM_ROWS - 2
    skipped = {row_id: reason for batch in batches for row_id, reason in batch["skipped"]}
    assert set(skipped) == CORRUPT_IMAGE_IDS
    assert sum(batch["num_skipped"] for batch in batches) == 2
    assert "cannot identify image file" in skipped["row-05"] and "truncated" in skipped["row-17"]

    batch = batches[0]
    assert batch["target_pixel_values"].shape == (len(batch["ids"]), 3, 224, 224)
    assert batch["reference_pixel_values"].shape == batch["target_pixel_values"].shape
    assert batch["input_ids"].shape == (len(batch["ids"]), 77)
    first = int(batch["ids"][0].split("-")[1])
    expected_pixels = CLIPImageProcessor()(images=[Image.open(io.BytesIO(_image_bytes(2 * first)))], return_tensors="pt")
    torch.testing.assert_close(batch["reference_pixel_values"][0], expected_pixels["pixel_values"][0])
    tokenizer = build_offline_clip_tokenizer()
    expected_ids = tokenizer(batch["texts"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(batch["input_ids"], expected_ids)
    assert batch["texts"][0] == f"make it color {first}"
    assert not batch["is_text_to_image"].any()


def test_embeddings_are_collated_per_id_and_bad_rows_reported(dataset_folder, caplog):
    stream = load_triplet_stream(dataset_folder["folder"], "embeddings", split="train")
    assert stream.source == "embeddings"
    loader = build_triplet_dataloader(stream, batch_size=4, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="diffusers_cir.data.streaming"):
        batches = list(loader)
    assert "row-11" in caplog.text and "non-finite" in caplog.text
    assert loader.num_skipped == 1 and loader.skip_reasons == {"ValueError": 1}
    for batch in batches:
        for position, row_id in enumerate(batch["ids"]):
            index = int(row_id.split("-")[1])
            np.testing.assert_array_equal(batch["reference_image_embeds"][position].numpy(), dataset_folder["references"][index])
            np.testing.assert_array_equal(batch["target_image_embeds"][position].numpy(), dataset_folder["targets"][index])
    assert sorted(_ids(batches)) == sorted(set(_row_ids()) - BAD_EMBEDDING_IDS)
    assert "1 skipped" in loader.summary()


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_and_workers_partition_the_rows(dataset_folder, world_size):
    """2 ranks x 2 workers read disjoint shards; 3 ranks (8 shards do not divide) still lose and repeat nothing."""
    stream = load_triplet_stream(dataset_folder["folder"], "embeddings", split="train")
    per_rank = []
    for rank in range(world_size):
        loader = build_triplet_dataloader(
            stream, batch_size=4, num_workers=2, rank=rank, world_size=world_size, shuffle_buffer_size=5, seed=3
        )
        loader.set_epoch(1)
        per_rank.append(_ids(loader))
    everything = [row_id for ids in per_rank for row_id in ids]
    assert len(everything) == len(set(everything))
    assert set(everything) == set(_row_ids()) - BAD_EMBEDDING_IDS
    assert all(per_rank)


@pytest.mark.parametrize("config,num_workers,buffer", [("images", 0, 0), ("images", 2, 5), ("embeddings", 2, 4)])
def test_resume_from_a_saved_state_is_exact(dataset_folder, config, num_workers, buffer):
    stream = load_triplet_stream(dataset_folder["folder"], config, split="train")

    def make():
        loader = build_triplet_dataloader(stream, batch_size=3, num_workers=num_workers, shuffle_buffer_size=buffer, seed=7)
        loader.set_epoch(2)
        return loader

    uninterrupted = [batch["ids"] for batch in make()]
    loader = make()
    iterator = iter(loader)
    before = [next(iterator)["ids"] for _ in range(3)]
    state = loader.state_dict()
    skipped_before = loader.num_skipped
    del iterator

    resumed_loader = make()
    resumed_loader.load_state_dict(json.loads(json.dumps(state)))  # a checkpoint survives serialisation
    after = [batch["ids"] for batch in resumed_loader]
    assert before + after == uninterrupted
    bad_rows = CORRUPT_IMAGE_IDS if config == "images" else BAD_EMBEDDING_IDS
    assert resumed_loader.num_skipped == len(bad_rows) and resumed_loader.num_skipped >= skipped_before
    # The next epoch is complete again and in a new order.
    resumed_loader.set_epoch(3)
    next_epoch = [batch["ids"] for batch in resumed_loader]
    assert sorted(_ids({"ids": ids} for ids in next_epoch)) == sorted(_ids({"ids": ids} for ids in uninterrupted))
    if buffer:
        assert next_epoch != uninterrupted


def test_epochs_reshuffle_shards_and_rows(dataset_folder):
    stream = load_triplet_stream(dataset_folder["folder"], "embeddings", split="train")
    loader = build_triplet_dataloader(stream, batch_size=4, shuffle_buffer_size=6, seed=0)
    orders = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        orders.append(_ids(loader))
    assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1])
    unshuffled = _ids(build_triplet_dataloader(stream, batch_size=4, shuffle=False))
    assert unshuffled == sorted(unshuffled)  # shards and rows in written order
    assert orders[0] != unshuffled


def test_missing_column_fails_fast_with_expected_names(dataset_folder):
    with pytest.raises(MissingColumnsError) as error:
        load_triplet_stream(dataset_folder["folder"], "images", column_mapping={"modification_text": "instruction"})
    message = str(error.value)
    assert "'modification_text' (mapped to 'instruction')" in message
    assert "reference_image" in message and "target_caption" in message  # needed and found names
    with pytest.raises(ValueError, match="canonical column names"):
        load_triplet_stream(dataset_folder["folder"], "images", column_mapping={"instruction": "modification_text"})


def test_text_to_image_stage_and_deterministic_mixing(dataset_folder):
    stream = load_triplet_stream(dataset_folder["folder"], "embeddings", stage="text_to_image")
    batch = next(iter(build_triplet_dataloader(stream, batch_size=6, shuffle=False)))
    assert batch["is_text_to_image"].all()
    assert torch.count_nonzero(batch["reference_image_embeds"]) == 0
    assert batch["texts"] == [f"a photo of colored thing {int(i.split('-')[1])}" for i in batch["ids"]]

    stream = load_triplet_stream(dataset_folder["folder"], "embeddings")
    flags = []
    for _ in range(2):
        loader = build_triplet_dataloader(stream, batch_size=24, shuffle=False, text_to_image_probability=0.5, seed=1)
        batch = next(iter(loader))
        flags.append(dict(zip(batch["ids"], batch["is_text_to_image"].tolist())))
        mixed = batch["is_text_to_image"]
        assert torch.count_nonzero(batch["reference_image_embeds"][mixed]) == 0
        assert torch.count_nonzero(batch["reference_image_embeds"][~mixed]) > 0
    assert flags[0] == flags[1] and 0 < sum(flags[0].values()) < len(flags[0])


def test_fast_tokenization_matches_the_tokenizer():
    tokenizer = build_offline_clip_tokenizer()
    collate = TripletCollator("embeddings", tokenizer=tokenizer)
    assert collate._backend is not None  # the fast path is in use for the CLIP tokenizer
    texts = ["make it red", "Make IT   red!", "naïve café", "$ that is $", " ".join(["very long text"] * 40), "x"]
    expected = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(collate._tokenize(texts), expected)
    assert collate._tokenize([]).shape == (0, 77)


def test_mask_condition():
    collate = TripletCollator("embeddings", return_mask=True)
    row = {"id": "a", "reference_image_embeds": [1.0, 0.0], "target_image_embeds": [0.0, 1.0], "modification_text": "x"}
    assert torch.equal(collate([row])["mask"], torch.zeros(1, 64, 64))
    image = np.zeros((128, 128), np.uint8)
    image[:64, :] = 255  # top half selected
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    batch = collate([{**row, "mask": {"bytes": buffer.getvalue(), "path": None}}])
    assert batch["mask"][0, :32].sum() == 32 * 64 and batch["mask"][0, 32:].sum() == 0
    assert decode_mask(np.eye(4), 8).shape == (8, 8)


def test_webdataset_tars_read_through_a_column_mapping(tmp_path):
    for shard in range(2):
        with tarfile.open(tmp_path / f"part-{shard:05d}.tar", "w") as archive:
            for i in range(3):
                key = f"{shard}{i:04d}"
                sidecar = json.dumps({"edit": f"edit {shard}-{i}", "tgt_caption": f"caption {shard}-{i}"}).encode()
                for name, data in (
                    (f"{key}.src.jpg", _image_bytes(10 * shard + i, "JPEG")),
                    (f"{key}.tgt.jpg", _image_bytes(100 + 10 * shard + i, "JPEG")),
                    (f"{key}.json", sidecar),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    files = {"train": str(tmp_path / "*.tar")}
    with pytest.raises(MissingColumnsError, match="src.jpg"):  # the error lists the columns that exist
        load_triplet_stream("webdataset", data_files=files)
    mapping = {
        "reference_image": "src.jpg",
        "target_image": "tgt.jpg",
        "modification_text": "json.edit",
        "target_caption": "json.tgt_caption",
        "id": "__key__",
    }
    stream = load_triplet_stream("webdataset", data_files=files, column_mapping=mapping)
    assert stream.source == "images"
    batches = list(build_triplet_dataloader(stream, batch_size=4, num_workers=2, shuffle=False))
    assert sorted(_ids(batches)) == sorted(f"{s}{i:04d}" for s in range(2) for i in range(3))
    texts = {row_id: text for batch in batches for row_id, text in zip(batch["ids"], batch["texts"])}
    assert texts["10002"] == "edit 1-2"
    assert batches[0]["target_pixel_values"].shape[1:] == (3, 224, 224)


def test_synthetic_world_is_read_like_real_data(tmp_path):
    from diffusers_cir.data.shards import validate_dataset
    from diffusers_cir.data.synthetic import SyntheticCIRWorld, SyntheticWorldConfig, load_synthetic_world

    world = SyntheticCIRWorld(SyntheticWorldConfig.tiny(seed=4))
    written = world.write_embeddings_dataset(str(tmp_path), {"train": 300, "test": None}, rows_per_shard=100, progress=False)
    assert written == {"train": 300, "test": len(world.triplets("test"))}
    assert validate_dataset(str(tmp_path), progress=False).ok
    train = world.triplets("train", num_triplets=300)
    stream = load_triplet_stream(str(tmp_path), "embeddings", split="train")
    batch = next(iter(build_triplet_dataloader(stream, batch_size=300, shuffle=False)))
    assert batch["num_skipped"] == 0 and len(batch["ids"]) == 300
    torch.testing.assert_close(batch["reference_image_embeds"], world.image_embeds[train.reference_indices])
    torch.testing.assert_close(batch["target_image_embeds"], world.image_embeds[train.target_indices])
    assert batch["texts"] == train.modification_texts
    gallery = datasets.load_dataset(str(tmp_path), "gallery", split="test")
    assert gallery["id"] == world.gallery_ids
    np.testing.assert_allclose(np.array(gallery["image_embeds"]), world.image_embeds.numpy())
    assert torch.equal(load_synthetic_world(str(tmp_path)).image_embeds, world.image_embeds)


@pytest.mark.parametrize(
    "arguments, message",
    [({"batch_size": True}, r"`batch_size` must be an integer >= 1, got True \(bool\)"),
     ({"batch_size": 4, "rank": 2, "world_size": 2}, r"`rank` must be an integer in \[0, 1\], got 2"),
     ({"batch_size": 4, "shuffle_buffer_size": -1}, r"`shuffle_buffer_size` must be an integer >= 0, got -1")],
)
def test_dataloader_sizes_are_checked_before_the_stream_is_read(arguments, message):
    with pytest.raises(ValueError, match=message):
        build_triplet_dataloader(None, **arguments)
    with pytest.raises(ValueError, match=r"`block_size` must be an integer >= 1, got 0"):
        BlockShuffledStream(None, block_size=0)
