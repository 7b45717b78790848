"""Gallery encoding (folder / list file / datasets, resumable, accelerate) and streaming index builds."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_components import tiny_image_encoder, tiny_image_processor

from diffusers_cir.retrieval import (
    CLIPVisionEncoder,
    GalleryEmbeddings,
    GalleryIndex,
    build_index_from_embedding_files,
    encode_gallery,
)
from diffusers_cir.retrieval.gallery import parts_for_process


def _make_images(folder, count, size=32, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        path = folder / ("sub" if i % 3 == 0 else ".") / f"img{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


class CountingEmbedder:
    """A deterministic gallery encoder (mean colour + a fixed random projection) that counts and can fail on demand."""

    fingerprint = "counting"

    def __init__(self, fail_after_calls=None, dim=6):
        self.calls = 0
        self.images_seen = 0
        self.fail_after_calls = fail_after_calls
        self.embedding_dim = dim
        self.projection = np.random.default_rng(1).normal(size=(3 * 4, dim)).astype(np.float32)

    def to(self, device):
        return self

    def encode_image(self, images, batch_size=64, device=None, show_progress=False):
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.images_seen += len(images)
        features = [np.asarray(image.resize((2, 2)), dtype=np.float32).reshape(-1) / 255.0 for image in images]
        return torch.from_numpy(np.stack(features) @ self.projection)


class LookupEncoder(CountingEmbedder):
    """Embeds 1x1 images whose (r, g) encode a row number as that row of a table."""

    def __init__(self, table):
        super().__init__(dim=table.shape[1])
        self.table = table

    def encode_image(self, images, batch_size=64, device=None, show_progress=False):
        rows = [image.getpixel((0, 0))[0] * 256 + image.getpixel((0, 0))[1] for image in images]
        return torch.from_numpy(self.table[rows])


def test_encode_folder_with_clip_vision_model_matches_direct_encoding(tmp_path):
    paths = _make_images(tmp_path / "images", 10)
    model, processor = tiny_image_encoder(), tiny_image_processor()
    encoder = CLIPVisionEncoder(model, processor)
    gallery = encode_gallery(
        encoder, tmp_path / "images", tmp_path / "emb", model_name="tiny", batch_size=4, part_size=6,
        show_progress=False,
    )
    assert gallery.num_items == 10 and gallery.num_parts == 2 and gallery.embedding_dim == 16
    assert gallery.model == "tiny" and gallery.model_fingerprint == encoder.fingerprint

    parts = list(gallery.iter_parts())
    embeddings = np.concatenate([p[0] for p in parts])
    ids = [i for p in parts for i in p[1]]
    metadata = [m for p in parts for m in p[2]]
    # Ids are relative paths (sorted), metadata holds the absolute path.
    assert ids == sorted(ids) and "sub/img000.png" in ids and len(set(ids)) == 10
    by_id = dict(zip(ids, metadata))
    assert by_id["sub/img000.png"]["path"] == str(paths[0].resolve())
    # The stored embeddings are exactly what the model computes on those images (projected, not normalised).
    images = [Image.open(m["path"]).convert("RGB") for m in metadata]
    with torch.no_grad():
        direct = model(pixel_values=processor(images=images, return_tensors="pt").pixel_values).image_embeds
    np.testing.assert_allclose(embeddings, direct.numpy(), rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.linalg.norm(embeddings, axis=1), 1.0)


def test_encode_is_resumable(tmp_path):
    _make_images(tmp_path / "images", 11)
    interrupted = CountingEmbedder(fail_after_calls=2)
    with pytest.raises(KeyboardInterrupt):
        encode_gallery(interrupted, tmp_path / "images", tmp_path / "emb", batch_size=2, part_size=4, show_progress=False)
    # Part 0 (4 images = 2 calls) was finished before the interruption; nothing of part 1 was written.
    assert (tmp_path / "emb" / "parts" / "embeddings-00000.npy").exists()
    assert not (tmp_path / "emb" / "parts" / "embeddings-00001.npy").exists()
    with pytest.raises(ValueError, match="not completely embedded"):
        GalleryEmbeddings(tmp_path / "emb")

    resumed = CountingEmbedder()
    gallery = encode_gallery(resumed, tmp_path / "images", tmp_path / "emb", batch_size=2, part_size=4, show_progress=False)
    assert resumed.images_seen == 7  # only parts 1 and 2

    fresh = encode_gallery(CountingEmbedder(), tmp_path / "images", tmp_path / "fresh", batch_size=2, part_size=4,
                           show_progress=False)
    for (a, ids_a, _), (b, ids_b, _) in zip(gallery.iter_parts(), fresh.iter_parts()):
        np.testing.assert_allclose(a, b)
        assert ids_a == ids_b

    # Another gallery into the same folder is refused unless starting over.
    _make_images(tmp_path / "other", 3, seed=5)
    with pytest.raises(ValueError, match="different gallery"):
        encode_gallery(CountingEmbedder(), tmp_path / "other", tmp_path / "emb", part_size=4, show_progress=False)
    restarted = encode_gallery(CountingEmbedder(), tmp_path / "other", tmp_path / "emb", part_size=4, resume=False,
                               show_progress=False)
    assert restarted.num_items == 3 and restarted.num_parts == 1


def test_list_file_and_unreadable_images(tmp_path):
    paths = _make_images(tmp_path / "images", 4)
    broken = tmp_path / "images" / "broken.png"
    broken.write_bytes(b"not a png")
    list_file = tmp_path / "gallery.txt"
    list_file.write_text(
        "# id<TAB>path or path\n"
        f"first\t{paths[0]}\n"
        "images/img001.png\n"
        f"bad\t{broken}\n\n"
        f"last\t{paths[3]}\n"
    )
    with pytest.raises(ValueError, match=r"broken.png \(id 'bad'\).*--skip-unreadable"):
        encode_gallery(CountingEmbedder(), list_file, tmp_path / "emb", show_progress=False)
    with pytest.warns(UserWarning, match="1 unreadable"):
        gallery = encode_gallery(CountingEmbedder(), list_file, tmp_path / "emb", skip_unreadable=True,
                                 resume=False, show_progress=False)
    embeddings, ids, metadata = gallery.part(0)
    assert ids == ["first", "images/img001.png", "last"] and embeddings.shape == (3, 6)
    assert metadata[1]["path"] == str(paths[1].resolve())
    skipped = gallery.skipped()
    assert [s["id"] for s in skipped] == ["bad"] and "could not be read as an image" in skipped[0]["error"]


def test_datasets_source_with_id_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)) for _ in range(5)]
    dataset = datasets.Dataset.from_dict(
        {"image": images, "key": [f"k{i}" for i in range(5)]},
        features=datasets.Features({"image": datasets.Image(), "key": datasets.Value("string")}),
    )
    embedder = CountingEmbedder()
    gallery = encode_gallery(embedder, dataset, tmp_path / "emb", id_column="key", batch_size=2, show_progress=False)
    embeddings, ids, metadata = gallery.part(0)
    assert ids == [f"k{i}" for i in range(5)] and metadata[2] == {"row": 2}
    np.testing.assert_allclose(embeddings, CountingEmbedder().encode_image(images), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="`id_column` 'nope'"):
        encode_gallery(embedder, dataset, tmp_path / "x", id_column="nope", show_progress=False)


def test_parts_are_split_across_processes_without_overlap():
    shares = [parts_for_process(10, rank, 3) for rank in range(3)]
    assert sorted(p for share in shares for p in share) == list(range(10))
    assert [len(s) for s in shares] == [4, 3, 3]


def test_encode_with_accelerator_single_process(tmp_path):
    from accelerate import Accelerator

    _make_images(tmp_path / "images", 5)
    accelerator = Accelerator(cpu=True)
    gallery = encode_gallery(CountingEmbedder(), tmp_path / "images", tmp_path / "emb", part_size=2,
                             accelerator=accelerator, show_progress=False)
    assert gallery.num_items == 5 and gallery.num_parts == 3


def _embedding_folder(tmp_path, count=3000, dim=24, part_size=700):
    """An encode_gallery folder over `count` tiny dataset images whose embeddings come from a lookup table."""
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(7)
    table = rng.normal(size=(count, dim)).astype(np.float32)
    codes = [Image.new("RGB", (1, 1), (i // 256, i % 256, 0)) for i in range(count)]
    dataset = datasets.Dataset.from_dict({"image": codes}, features=datasets.Features({"image": datasets.Image()}))
    encode_gallery(LookupEncoder(table), dataset, tmp_path / "emb", part_size=part_size, batch_size=256,
                   show_progress=False)
    return tmp_path / "emb", table


def test_sharded_and_ondisk_builds_match_in_memory_indexes(tmp_path):
    folder, table = _embedding_folder(tmp_path)
    queries = np.random.default_rng(8).normal(size=(25, 24)).astype(np.float32)

    in_memory_exact = GalleryIndex.from_embeddings(table)
    sharded = build_index_from_embedding_files(folder, tmp_path / "sharded", shard_size=1000, show_progress=False)
    assert sharded.num_parts == 3 and sharded.ntotal == 3000
    expected = in_memory_exact.search(queries, k=11)
    got = sharded.search(queries, k=10, exclude_ids=[[int(expected.positions[0, 0])]] + [None] * 24)
    np.testing.assert_array_equal(got.positions[1:], expected.positions[1:, :10])
    np.testing.assert_allclose(got.scores[1:], expected.scores[1:, :10], atol=1e-6)
    assert got.ids[0] == expected.ids[0][1:11]  # the excluded top-1 is replaced by the 11th
    reloaded = GalleryIndex.load(tmp_path / "sharded", mmap=True)
    np.testing.assert_array_equal(reloaded.search(queries, k=10).positions, expected.positions[:, :10])

    in_memory_ivf = build_index_from_embedding_files(folder, tmp_path / "ivf", factory="IVF16,Flat", nprobe=4,
                                                     show_progress=False)
    ondisk = build_index_from_embedding_files(folder, tmp_path / "ondisk", factory="IVF16,Flat", nprobe=4,
                                              ondisk=True, show_progress=False)
    assert (tmp_path / "ondisk" / "index.ivfdata").exists()
    assert json.loads((tmp_path / "ondisk" / "manifest.json").read_text())["ondisk_inverted_lists"] is True
    a, b = in_memory_ivf.search(queries, k=10), ondisk.search(queries, k=10)
    np.testing.assert_array_equal(a.positions, b.positions)
    assert a.ids == b.ids and b.ids[0] == [int(p) for p in b.positions[0]]
    with pytest.raises(ValueError, match="on disk"):
        ondisk.add(table[:1], ids=[99999])
    # A saved copy elsewhere carries its lists file along.
    copy = GalleryIndex.load(tmp_path / "ondisk")
    copy.set_search_parameters(nprobe=16)
    copy.save(tmp_path / "ondisk-copy")
    np.testing.assert_array_equal(
        GalleryIndex.load(tmp_path / "ondisk-copy").search(queries, k=10).positions,
        in_memory_exact.search(queries, k=10).positions,  # nprobe = nlist: exact
    )
    with pytest.raises(ValueError, match="needs an IVF factory"):
        build_index_from_embedding_files(folder, tmp_path / "bad", factory="Flat", ondisk=True, show_progress=False)


class _ThreadAccelerator:
    """Stands in for `accelerate.Accelerator` in one of several processes (threads here, synchronised by a
    barrier), so the part split and the hand-over to the main process run as they do under `accelerate launch`."""

    def __init__(self, process_index, num_processes, barrier):
        self.process_index, self.num_processes, self.barrier = process_index, num_processes, barrier
        self.device = torch.device("cpu")
        self.is_main_process = process_index == 0

    def wait_for_everyone(self):
        self.barrier.wait(timeout=60)


def test_encode_split_across_processes(tmp_path):
    import threading

    _make_images(tmp_path / "images", 11)
    barrier = threading.Barrier(3)
    embedders = [CountingEmbedder() for _ in range(3)]
    results, errors = {}, []

    def run(rank):
        try:
            results[rank] = encode_gallery(embedders[rank], tmp_path / "images", tmp_path / "emb", part_size=2,
                                           accelerator=_ThreadAccelerator(rank, 3, barrier), show_progress=False)
        except Exception as error:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    # 6 parts of 2 (the last of 1): ranks 0, 1, 2 embed parts {0, 3}, {1, 4}, {2, 5}, each image exactly once.
    assert [e.images_seen for e in embedders] == [4, 4, 3]
    single = encode_gallery(CountingEmbedder(), tmp_path / "images", tmp_path / "single", part_size=2,
                            show_progress=False)
    for (a, ids_a, _), (b, ids_b, _) in zip(results[0].iter_parts(), single.iter_parts()):
        np.testing.assert_allclose(a, b, rtol=1e-6)
        assert ids_a == ids_b


def test_a_list_file_starting_with_a_byte_order_mark_keeps_its_first_id_and_path(tmp_path):
    """Windows editors start a saved list file with a BOM: it became part of the first id (or path), so the first
    image was not found, or was indexed under an id that searching and exclusion by that id never matched."""
    from diffusers_cir.retrieval.gallery import read_image_list

    paths = _make_images(tmp_path / "images", 2)
    for first, expected_id in ((f"first\t{paths[0]}", "first"), (str(paths[0]), str(paths[0]))):
        list_file = tmp_path / "gallery.txt"
        list_file.write_text("\ufeff" + first + f"\nsecond\t{paths[1]}\n", encoding="utf-8")
        items = read_image_list(list_file)
        assert [item.id for item in items] == [expected_id, "second"]
        assert items[0].path == str(paths[0].resolve())
