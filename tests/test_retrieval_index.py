"""GalleryIndex: exact search vs numpy, exclusion, IVF-PQ recall, persistence and clear errors."""

import json
import time

import numpy as np
import pytest
import torch

from diffusers_cir.retrieval import (
    GalleryIndex,
    IndexFormatError,
    IndexMismatchError,
    normalize_embeddings,
    torch_exact_search,
)


@pytest.fixture(autouse=True, scope="module")
def _single_faiss_thread():
    # On 2 shared cores (and under pytest-xdist) faiss' OpenMP threads spin against other processes: training
    # was measured 10x slower with 2 threads than with 1 on a loaded machine.
    import faiss

    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(previous)


def brute_force_ranking(queries, gallery, k):
    """Cosine-similarity top-k in float64 numpy: the reference every index is held to."""
    q = queries.astype(np.float64)
    g = gallery.astype(np.float64)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    scores = q @ g.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


@pytest.fixture(scope="module")
def small_gallery():
    rng = np.random.default_rng(0)
    # Unnormalised on purpose, with very different norms: the index must normalise (cosine), not rank by norm.
    gallery = rng.normal(size=(3000, 48)).astype(np.float32) * rng.uniform(0.1, 10.0, size=(3000, 1)).astype(np.float32)
    queries = rng.normal(size=(40, 48)).astype(np.float32) * 7.0
    return gallery, queries


def _assert_well_separated(scores):
    # Precondition of an exact-equality test: no near-ties that float32 rounding could reorder.
    assert np.diff(-scores, axis=1).min() > 1e-5


def test_exact_search_equals_numpy_ranking(small_gallery):
    gallery, queries = small_gallery
    expected_order, expected_scores = brute_force_ranking(queries, gallery, k=15)
    _assert_well_separated(expected_scores)

    index = GalleryIndex(48, factory="Flat")
    index.add(gallery[:1000])
    index.add(gallery[1000:])  # incremental add keeps positions
    result = index.search(queries, k=15)

    np.testing.assert_array_equal(result.positions, expected_order)
    np.testing.assert_allclose(result.scores, expected_scores, atol=1e-5)
    assert result.ids == expected_order.tolist()  # default ids are positions


def test_torch_backend_and_chunked_search_equal_numpy_ranking(small_gallery):
    gallery, queries = small_gallery
    expected_order, expected_scores = brute_force_ranking(queries, gallery, k=12)
    index = GalleryIndex.from_embeddings(gallery).to("cpu", backend="torch")
    result = index.search(queries, k=12)
    np.testing.assert_array_equal(result.positions, expected_order)

    # The chunked merge must be exact whatever the chunking (chunk smaller than k, uneven last chunk, tiny
    # score blocks forcing several query batches).
    g = torch.from_numpy(normalize_embeddings(gallery))
    q = torch.from_numpy(normalize_embeddings(queries))
    for chunk in (5, 777, 3000):
        scores, positions = torch_exact_search(q, g, k=12, gallery_chunk_size=chunk, score_block_bytes=4 * 777 * 7)
        np.testing.assert_array_equal(positions.numpy(), expected_order)
        np.testing.assert_allclose(scores.numpy(), expected_scores, atol=1e-5)


def test_torch_search_pads_when_k_exceeds_gallery():
    gallery = torch.nn.functional.normalize(torch.randn(7, 8), dim=-1)
    scores, positions = torch_exact_search(gallery[:2], gallery, k=10, gallery_chunk_size=3)
    assert positions[:, :7].min() >= 0 and (positions[:, 7:] == -1).all()
    assert torch.isinf(scores[:, 7:]).all() and torch.isfinite(scores[:, :7]).all()
    assert sorted(positions[0, :7].tolist()) == list(range(7))


def test_exclude_ids_per_query(small_gallery):
    gallery, queries = small_gallery
    ids = [f"img{i:05d}" for i in range(len(gallery))]
    index = GalleryIndex.from_embeddings(gallery, ids=ids)
    expected_order, _ = brute_force_ranking(queries[:3], gallery, k=20)
    top = [[ids[p] for p in row] for row in expected_order]
    exclude = [top[0][0], [top[1][0], top[1][2], "not-in-gallery"], None]
    result = index.search(queries[:3], k=10, exclude_ids=exclude)

    assert result.ids[0] == top[0][1:11]
    assert result.ids[1] == [top[1][1]] + top[1][3:12]
    assert result.ids[2] == top[2][:10]
    assert all(len(row) == 10 for row in result.ids)
    with pytest.raises(ValueError, match="one entry per query"):
        index.search(queries[:3], k=10, exclude_ids=[["img00001"]])


def test_metadata_and_hits(small_gallery):
    gallery, _ = small_gallery
    metadata = [{"path": f"/images/{i}.jpg"} for i in range(100)]
    index = GalleryIndex.from_embeddings(gallery[:100], ids=[f"a{i}" for i in range(100)], metadata=metadata)
    hits = index.search(gallery[42:43], k=3).hits(0)
    assert hits[0].id == "a42" and hits[0].metadata == {"path": "/images/42.jpg"} and hits[0].rank == 1
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert [h.rank for h in hits] == [1, 2, 3] and hits[0].score >= hits[1].score >= hits[2].score


def test_duplicate_and_mixed_ids_are_rejected(small_gallery):
    gallery, _ = small_gallery
    index = GalleryIndex.from_embeddings(gallery[:10], ids=[f"x{i}" for i in range(10)])
    with pytest.raises(ValueError, match="already in the index"):
        index.add(gallery[10:12], ids=["x3", "new"])
    with pytest.raises(ValueError, match="duplicates"):
        index.add(gallery[10:12], ids=["y", "y"])
    with pytest.raises(ValueError, match="strings"):
        index.add(gallery[10:12], ids=[100, 101])
    assert index.ntotal == 10  # nothing was added by the failed calls


def _structured_gallery(num_items, dim=256, num_queries=1000, seed=0):
    """A synthetic gallery shaped like image embeddings: items near a 64-d subspace, grouped into concepts
    (8 images each) that are grouped into 1000 topics, plus isotropic noise. Queries are new draws around
    random concepts (not gallery items)."""
    rng = np.random.default_rng(seed)
    rank, per_concept = 64, 8
    num_concepts = num_items // per_concept
    basis = rng.normal(size=(rank, dim)).astype(np.float32) / np.sqrt(rank)
    topics = rng.normal(size=(1000, rank)).astype(np.float32)
    concepts = topics[rng.integers(0, 1000, num_concepts)] + rng.normal(size=(num_concepts, rank)).astype(np.float32)
    latent = np.repeat(concepts, per_concept, axis=0) + 0.5 * rng.normal(size=(num_items, rank)).astype(np.float32)
    noise = 0.125
    gallery = latent @ basis + noise * rng.normal(size=(num_items, dim)).astype(np.float32)
    query_latent = concepts[rng.integers(0, num_concepts, num_queries)]
    query_latent = query_latent + 0.5 * rng.normal(size=(num_queries, rank)).astype(np.float32)
    queries = query_latent @ basis + noise * rng.normal(size=(num_queries, dim)).astype(np.float32)
    return gallery, queries


def test_ivfpq_recall_at_10_on_100k_x_256():
    """IVF256,PQ32 (32 bytes per vector) at nprobe=16 against exact search on a 100k x 256 gallery.

    recall@10 as in CIR benchmarks: the fraction of queries whose target (here: the exact top-1) is among the
    10 IVF-PQ results. The overlap of the two top-10 lists is checked too, less strictly (PQ reorders close
    neighbours).
    """
    gallery, queries = _structured_gallery(100_000)
    start = time.perf_counter()
    exact = GalleryIndex.from_embeddings(gallery, factory="Flat")
    exact_top10 = exact.search(queries, k=10).positions
    ivfpq = GalleryIndex.from_embeddings(gallery, factory="IVF256,PQ32", train_size=16_384, nprobe=16)
    approx_top10 = ivfpq.search(queries, k=10).positions
    elapsed = time.perf_counter() - start

    recall_at_10 = np.mean([exact_top10[i, 0] in approx_top10[i] for i in range(len(queries))])
    overlap_at_10 = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact_top10, approx_top10)])
    print(f"IVF256,PQ32 nprobe=16: recall@10={recall_at_10:.3f} 10-overlap@10={overlap_at_10:.3f} ({elapsed:.1f}s)")
    assert ivfpq.search_parameters == {"nprobe": 16}
    assert recall_at_10 > 0.9
    assert overlap_at_10 > 0.75
    # nprobe is a real knob: one list only visibly hurts recall.
    ivfpq.set_search_parameters(nprobe=1)
    approx_nprobe1 = ivfpq.search(queries, k=10).positions
    assert np.mean([exact_top10[i, 0] in approx_nprobe1[i] for i in range(len(queries))]) < recall_at_10


def test_search_parameters_errors_and_hnsw(small_gallery):
    gallery, queries = small_gallery
    flat = GalleryIndex.from_embeddings(gallery[:500])
    with pytest.raises(ValueError, match="nprobe.*IVF"):
        flat.set_search_parameters(nprobe=4)
    hnsw = GalleryIndex.from_embeddings(gallery[:500], factory="HNSW16", efSearch=64)
    assert hnsw.search_parameters == {"efSearch": 64}
    expected, _ = brute_force_ranking(queries, gallery[:500], k=1)
    assert np.mean(hnsw.search(queries, k=1).positions[:, 0] == expected[:, 0]) > 0.9
    with pytest.raises(ValueError, match="factory"):
        GalleryIndex(48, factory="IVF-nonsense")
    untrained = GalleryIndex(48, factory="IVF64,Flat")
    with pytest.raises(ValueError, match="trained before adding"):
        untrained.add(gallery[:10])
    with pytest.raises(ValueError, match="at least nlist=64"):
        untrained.train(gallery[:10])
    with pytest.raises(ValueError, match="torch backend.*Flat"):
        hnsw.to("cpu", backend="torch")


def test_save_load_round_trip(tmp_path, small_gallery):
    gallery, queries = small_gallery
    ids = [f"img{i}" for i in range(2000)]
    metadata = [{"path": f"/data/{i}.png"} if i % 2 else None for i in range(2000)]
    index = GalleryIndex.from_embeddings(
        gallery[:2000], ids=ids, metadata=metadata, factory="IVF32,Flat", model="clip-test", model_fingerprint="abc",
        nprobe=5,
    )
    before = index.search(queries, k=8)
    index.save(tmp_path / "index")
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["embedding_dim"] == 48 and manifest["model"] == {"name": "clip-test", "fingerprint": "abc"}
    assert manifest["ntotal"] == 2000 and manifest["factory"] == "IVF32,Flat"

    loaded = GalleryIndex.load(tmp_path / "index")
    after = loaded.search(queries, k=8)
    assert loaded.search_parameters == {"nprobe": 5}
    np.testing.assert_array_equal(after.positions, before.positions)
    np.testing.assert_array_equal(after.scores, before.scores)
    assert after.ids == before.ids and after.metadata == before.metadata
    assert loaded.model == "clip-test" and loaded.model_fingerprint == "abc"

    # Incremental add after loading, then another round trip.
    loaded.add(gallery[2000:], ids=[f"img{i}" for i in range(2000, 3000)])
    loaded.save(tmp_path / "index")
    again = GalleryIndex.load(tmp_path / "index", mmap=True)
    assert again.ntotal == 3000 and again.metadata[2500] is None and again.metadata[1] == {"path": "/data/1.png"}
    assert again.search(gallery[2500:2501], k=1).ids == [["img2500"]]
    with pytest.raises(ValueError, match="mmap=True"):
        again.add(gallery[:1], ids=["new"])


def test_mismatched_width_and_model_are_refused(tmp_path, small_gallery):
    gallery, queries = small_gallery
    index = GalleryIndex.from_embeddings(gallery[:100], model="clip-L", model_fingerprint="f00d")
    index.save(tmp_path / "index")
    loaded = GalleryIndex.load(tmp_path / "index")
    with pytest.raises(IndexMismatchError, match=r"width 32 .* 48-wide"):
        loaded.search(np.ones((2, 32), dtype=np.float32))
    with pytest.raises(IndexMismatchError, match="width 64"):
        loaded.add(np.ones((2, 64), dtype=np.float32))
    with pytest.raises(IndexMismatchError, match="'clip-L'.*'clip-B'"):
        loaded.search(queries, model="clip-B", model_fingerprint="beef")
    with pytest.raises(IndexMismatchError, match="clip-B"):
        loaded.search(queries, model="clip-B")
    # The same weights under another name (a moved folder) are accepted.
    assert loaded.search(queries[:1], k=1, model="/elsewhere/clip-L", model_fingerprint="f00d").ids
    with pytest.raises(ValueError, match="all-zero rows \\[1\\]"):
        loaded.search(np.stack([queries[0], np.zeros(48, np.float32)]))


def test_corrupt_and_incomplete_indexes_are_reported(tmp_path, small_gallery):
    gallery, _ = small_gallery
    index = GalleryIndex.from_embeddings(gallery[:200], ids=[f"i{i}" for i in range(200)])
    folder = index.save(tmp_path / "index")
    faiss_file = folder / "index.faiss"
    original = faiss_file.read_bytes()

    faiss_file.write_bytes(original[: len(original) // 2])
    with pytest.raises(IndexFormatError, match="index.faiss has .* bytes, .* were written"):
        GalleryIndex.load(folder)
    with pytest.raises(IndexFormatError, match="truncated"):  # sizes are checked without the checksums too
        GalleryIndex.load(folder, verify_checksums=False)

    faiss_file.write_bytes(b"\x00garbage" * (len(original) // 8) + b"\x00" * (len(original) % 8))
    with pytest.raises(IndexFormatError, match="index.faiss does not match the .* checksum"):
        GalleryIndex.load(folder)
    with pytest.raises(IndexFormatError, match="corrupt"):  # what faiss makes of it, unverified
        GalleryIndex.load(folder, verify_checksums=False)

    faiss_file.write_bytes(original)
    np.save(folder / "ids.npy", np.array(["only-one"]))
    with pytest.raises(IndexFormatError, match="ids.npy"):
        GalleryIndex.load(folder)
    with pytest.raises(IndexFormatError, match="ids.npy"):
        GalleryIndex.load(folder, verify_checksums=False)

    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(IndexFormatError, match="not valid JSON"):
        GalleryIndex.load(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(IndexFormatError, match="no manifest.json"):
        GalleryIndex.load(folder)
    with pytest.raises(IndexFormatError, match="does not exist"):
        GalleryIndex.load(tmp_path / "missing")


def test_search_shows_progress_over_batches(small_gallery, capsys):
    gallery, queries = small_gallery
    index = GalleryIndex.from_embeddings(gallery)
    result = index.search(queries, k=3, batch_size=16)
    assert "Searching" in capsys.readouterr().err
    expected, _ = brute_force_ranking(queries, gallery, k=3)
    np.testing.assert_array_equal(result.positions, expected)


def test_ids_mixing_ints_and_strings_in_one_call_or_overflowing_int64_are_rejected(small_gallery):
    gallery, _ = small_gallery
    # Across calls a mix was already refused; within one call numpy silently turned 7 into "7".
    with pytest.raises(ValueError, match="all integers or all strings"):
        GalleryIndex.from_embeddings(gallery[:3], ids=["a", 7, "b"])
    with pytest.raises(ValueError, match="int64"):
        GalleryIndex.from_embeddings(gallery[:2], ids=np.array([2**63 + 1, 1], dtype=np.uint64))
    index = GalleryIndex.from_embeddings(gallery[:3], ids=np.array([5, 6, 7], dtype=np.uint64))
    assert index.ids.tolist() == [5, 6, 7]
    assert index.search(gallery[:1], k=1, exclude_ids=[5]).ids[0] != [5]


def test_unsaveable_metadata_fails_before_an_earlier_save_is_touched(tmp_path, small_gallery):
    gallery, _ = small_gallery
    index = GalleryIndex.from_embeddings(gallery[:4], ids=[f"x{i}" for i in range(4)], metadata=[{"n": i} for i in range(4)])
    index.save(tmp_path / "idx")
    index.add(gallery[4:5], ids=["x4"], metadata=[{"score": np.float32(0.5)}])
    with pytest.raises(ValueError, match=r"`metadata` of item 4 \(id 'x4'\) cannot be saved as JSON"):
        index.save(tmp_path / "idx")
    # The earlier save is intact (its index file used to be replaced before the metadata failed).
    reloaded = GalleryIndex.load(tmp_path / "idx")
    assert reloaded.ntotal == 4 and reloaded.metadata == [{"n": i} for i in range(4)]
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == [
        ".diffusers-cir.lock", "checksums.json", "ids.npy", "index.faiss", "manifest.json", "metadata.jsonl"]


def test_a_save_interrupted_over_an_earlier_one_is_not_vouched_for_by_the_old_manifest(tmp_path, small_gallery, monkeypatch):
    gallery, _ = small_gallery
    GalleryIndex.from_embeddings(gallery[:5], ids=[f"old{i}" for i in range(5)]).save(tmp_path / "idx")
    # Same count and id width: the new files have the sizes the old manifest lists.
    new = GalleryIndex.from_embeddings(gallery[5:10], ids=[f"new{i}" for i in range(5)])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", interrupted)  # dies after index.faiss is replaced, before ids.npy
    with pytest.raises(KeyboardInterrupt):
        new.save(tmp_path / "idx")
    monkeypatch.undo()
    # Before: the old manifest loaded the new vectors under the old ids, silently.
    with pytest.raises(IndexFormatError, match="interrupted save"):
        GalleryIndex.load(tmp_path / "idx")


def test_k_must_be_a_real_positive_integer_and_numpy_integers_are_accepted(small_gallery):
    """`k=True` is an int subclass: it failed inside faiss with a bare 'an integer is required' (and was taken as
    k=1 by the torch backend). numpy integers (from argsort, a config array...) are fine; k beyond the gallery pads."""
    gallery, queries = small_gallery
    index = GalleryIndex.from_embeddings(gallery[:6], ids=[f"g{i}" for i in range(6)])
    expected, _ = brute_force_ranking(queries[:2], gallery[:6], k=6)
    for backend in ("faiss", "torch"):
        index.to("cpu", backend=backend)
        for bad in (True, False, np.bool_(True), 2.0, "3", 0, -1, np.int64(0)):
            with pytest.raises(ValueError, match=r"`k` must be an integer >= 1, got .*\(" + type(bad).__name__):
                index.search(queries[:2], k=bad)
        for k in (np.int64(3), np.int32(3), np.uint8(3)):
            result = index.search(queries[:2], k=k)
            assert result.positions.shape == (2, 3) and result.positions.dtype == np.int64
            np.testing.assert_array_equal(result.positions, expected[:, :3])
        # k larger than the gallery (after exclusion): padded with -inf / -1, ids hold only what was found
        padded = index.search(queries[:2], k=np.int64(9), exclude_ids=["g0", None])
        assert padded.scores.shape == (2, 9)
        assert [len(ids) for ids in padded.ids] == [5, 6]
        assert (padded.positions[0, 5:] == -1).all() and np.isneginf(padded.scores[0, 5:]).all()
        assert (padded.positions[1, 6:] == -1).all() and np.isfinite(padded.scores[1, :6]).all()
        assert padded.ids[1] == [f"g{i}" for i in expected[1]]
        with pytest.raises(ValueError, match=r"`batch_size` must be an integer >= 1, got 0"):
            index.search(queries[:2], k=1, batch_size=0)
    with pytest.raises(ValueError, match=r"`k` must be an integer >= 1, got True \(bool\)"):
        torch_exact_search(torch.eye(2), torch.eye(2), k=True)
    with pytest.raises(ValueError, match=r"`nprobe` must be an integer >= 1, got True \(bool\)"):
        GalleryIndex.from_embeddings(gallery[:500], factory="IVF4,Flat").set_search_parameters(nprobe=True)
    with pytest.raises(ValueError, match=r"`embedding_dim` must be an integer >= 1, got True \(bool\)"):
        GalleryIndex(True)
    with pytest.raises(ValueError, match=r"`batch_size` must be an integer >= 1, got 0"):
        GalleryIndex(48).add(gallery[:2], batch_size=0)


@pytest.mark.parametrize("k", [0, True, 2.5])
def test_composed_search_refuses_a_bad_k_before_loading_or_running_the_pipeline(tmp_path, k):
    from diffusers_cir.retrieval import composed_search

    with pytest.raises(ValueError, match="`k` must be an integer >= 1"):
        composed_search(str(tmp_path / "no-such-pipeline"), str(tmp_path / "no-such-index"), text="red", k=k)


def test_search_device_and_backend_are_named_when_wrong(small_gallery):
    gallery, _ = small_gallery
    index = GalleryIndex.from_embeddings(gallery[:4])
    with pytest.raises(ValueError, match=r"`backend` must be one of \['auto', 'faiss', 'torch'\], got 'cuda' \(str\)"):
        index.to("cpu", backend="cuda")
    with pytest.raises(ValueError, match=r"`device` must be 'cpu', 'cuda' or 'cuda:N'; got 'gpu'"):
        index.to("gpu")
