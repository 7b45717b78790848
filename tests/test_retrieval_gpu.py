"""GPU search paths: torch exact search (float16) and faiss-gpu. Skipped without CUDA / faiss-gpu."""

import numpy as np
import pytest
import torch

from diffusers_cir.retrieval import GalleryIndex, faiss_gpu_count, normalize_embeddings, torch_exact_search

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
requires_faiss_gpu = pytest.mark.skipif(faiss_gpu_count() == 0, reason="needs faiss-gpu with a visible GPU")


def _gallery(num_items=20_000, dim=128, num_queries=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(num_items, dim)).astype(np.float32), rng.normal(size=(num_queries, dim)).astype(np.float32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without CUDA")
def test_cuda_request_without_gpu_is_a_clear_error():
    gallery, _ = _gallery(100, 8)
    index = GalleryIndex.from_embeddings(gallery)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        index.to("cuda", backend="torch")
    if faiss_gpu_count() == 0:
        with pytest.raises(RuntimeError, match="faiss-gpu is not installed"):
            index.to("cuda", backend="faiss")


@pytest.mark.gpu
@requires_cuda
def test_torch_cuda_exact_search_matches_cpu_exact_search():
    gallery, queries = _gallery()
    cpu = GalleryIndex.from_embeddings(gallery, ids=[f"g{i}" for i in range(len(gallery))])
    expected = cpu.search(queries, k=10)
    gpu = GalleryIndex.from_embeddings(gallery, ids=[f"g{i}" for i in range(len(gallery))]).to("cuda", backend="torch")
    got = gpu.search(queries, k=10, exclude_ids=[[expected.ids[0][0]]] + [None] * (len(queries) - 1))
    # float16 products: scores agree to ~1e-3 and the rankings agree except between near-ties.
    np.testing.assert_allclose(got.scores[1:], expected.scores[1:], atol=2e-3)
    agreement = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.positions[1:], expected.positions[1:])])
    assert agreement > 0.97
    assert expected.ids[0][0] not in got.ids[0]
    # Incremental add reaches the device mirror.
    gpu.add(queries[:1] * 3.0, ids=["new"])
    assert gpu.search(queries[:1], k=1).ids == [["new"]]


@pytest.mark.gpu
@requires_cuda
def test_chunked_cuda_search_equals_unchunked():
    gallery, queries = _gallery(50_000, 256, 300)
    g = torch.from_numpy(normalize_embeddings(gallery)).cuda().half()
    q = torch.from_numpy(normalize_embeddings(queries)).cuda().half()
    exact = q.float() @ g.float().T  # float32 products of the same float16 inputs
    exact_scores = torch.topk(exact, 16, dim=1).values
    for chunk, block in ((None, 1 << 30), (4096, 1 << 30), (12_345, 1 << 22), (50_000, 1 << 20)):
        scores, positions = torch_exact_search(q, g, k=16, gallery_chunk_size=chunk, score_block_bytes=block)
        # The returned items really have the returned scores, and those are the true top-16 scores (to float16
        # output rounding): the chunk-and-merge loses nothing.
        torch.testing.assert_close(exact.gather(1, positions), scores, atol=1e-3, rtol=0)
        torch.testing.assert_close(scores, exact_scores, atol=1e-3, rtol=0)
        assert (positions[:, :-1] != positions[:, 1:]).all()


@pytest.mark.gpu
@requires_faiss_gpu
@pytest.mark.parametrize("shard_across_gpus", [False, True])
def test_faiss_gpu_matches_cpu(shard_across_gpus):
    gallery, queries = _gallery()
    cpu = GalleryIndex.from_embeddings(gallery, factory="IVF64,Flat", nprobe=64)
    expected = cpu.search(queries, k=10)
    gpu = GalleryIndex.from_embeddings(gallery, factory="IVF64,Flat", nprobe=64).to(
        "cuda", backend="faiss", shard_across_gpus=shard_across_gpus
    )
    got = gpu.search(queries, k=10)
    agreement = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.positions, expected.positions)])
    assert agreement > 0.97
