"""Search backends: where the inner products of a search are computed.

``GalleryIndex`` keeps its vectors in CPU faiss indexes (the copy that is saved) and searches through one of
these backends:

- ``FaissSearchBackend``: the CPU faiss index itself, or a faiss-gpu clone of it (one GPU, or sharded across
  all visible GPUs) when faiss-gpu is installed;
- ``TorchExactSearchBackend``: the vectors of an exact (``Flat``) index mirrored into one torch tensor
  (float16 on CUDA, float32 on CPU) and searched with a matrix product and ``topk``, chunked over the gallery.
  This is the GPU path for machines where faiss-gpu cannot be installed.

Both return ``(scores [Q, k] float32, positions [Q, k] int64)``, best first, padded with ``-inf`` / ``-1`` when
fewer than ``k`` items can be returned, the same convention as faiss.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..checks import check_positive_int

# One score matrix block of the torch backend is kept under this many bytes, so that a 1M gallery and thousands
# of queries never need the full [Q, N] score matrix at once.
DEFAULT_SCORE_BLOCK_BYTES = 1 << 30


def _import_faiss():
    try:
        import faiss
    except ImportError as error:  # pragma: no cover - faiss is a test dependency
        raise ImportError(
            "diffusers_cir.retrieval needs faiss: `pip install faiss-cpu` (or `faiss-gpu-cu12` on a CUDA machine)."
        ) from error
    return faiss


def faiss_gpu_count() -> int:
    """Number of GPUs faiss can use (0 with faiss-cpu, or without faiss)."""
    try:
        import faiss
    except ImportError:
        return 0
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return int(get_num_gpus()) if get_num_gpus is not None else 0


def torch_exact_search(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    gallery_chunk_size: int | None = None,
    query_batch_size: int | None = None,
    score_block_bytes: int = DEFAULT_SCORE_BLOCK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact maximum-inner-product search: ``topk(queries @ gallery.T)``, chunked over the gallery and merged.

    Each gallery chunk yields its own top-``k`` (scores and global positions); the candidates of all chunks
    (``k`` per chunk) are merged with a second ``topk``. Because every true top-``k`` item is in the top-``k``
    of its own chunk, the merge is exact. Queries are processed in batches so one ``[batch, chunk]`` score
    block stays under ``score_block_bytes``.

    Args:
        queries: ``[Q, D]`` tensor, on the gallery's device (cast to the gallery's dtype).
        gallery: ``[N, D]`` tensor (float16 on CUDA for speed; float32 on CPU).
        k: number of results per query; with ``k > N`` the tail is padded with ``-inf`` / ``-1``.
        gallery_chunk_size: gallery rows per matrix product (default: all of them, memory permitting).
        query_batch_size: queries per batch (default: as many as ``score_block_bytes`` allows).

    Returns:
        ``(scores, positions)``: ``[Q, k]`` float32 scores (best first) and int64 gallery positions.

    Example:
        >>> import torch
        >>> gallery = torch.nn.functional.normalize(torch.randn(1000, 64), dim=-1)
        >>> scores, positions = torch_exact_search(gallery[:3], gallery, k=5, gallery_chunk_size=256)
        >>> positions[:, 0].tolist()
        [0, 1, 2]
    """
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"`queries` must be [Q, D] and `gallery` [N, D] with the same D; got {tuple(queries.shape)} "
            f"and {tuple(gallery.shape)}."
        )
    k = check_positive_int(k, "k")
    num_queries, num_gallery = queries.shape[0], gallery.shape[0]
    device = gallery.device
    out_scores = torch.full((num_queries, k), -math.inf, dtype=torch.float32, device=device)
    out_positions = torch.full((num_queries, k), -1, dtype=torch.int64, device=device)
    if num_queries == 0 or num_gallery == 0:
        return out_scores, out_positions

    chunk = num_gallery if gallery_chunk_size is None else max(1, min(int(gallery_chunk_size), num_gallery))
    element_bytes = gallery.element_size()
    if query_batch_size is None:
        query_batch_size = max(1, score_block_bytes // (chunk * element_bytes))
    queries = queries.to(device=device, dtype=gallery.dtype)
    k_chunk = min(k, chunk)
    for q_start in range(0, num_queries, query_batch_size):
        query_block = queries[q_start : q_start + query_batch_size]
        candidate_scores, candidate_positions = [], []
        for g_start in range(0, num_gallery, chunk):
            gallery_block = gallery[g_start : g_start + chunk]
            scores = query_block @ gallery_block.T
            top_scores, top_positions = torch.topk(scores, min(k_chunk, gallery_block.shape[0]), dim=1)
            candidate_scores.append(top_scores)
            candidate_positions.append(top_positions + g_start)
        if len(candidate_scores) == 1:
            best_scores, best_positions = candidate_scores[0], candidate_positions[0]
        else:
            merged_scores = torch.cat(candidate_scores, dim=1)
            merged_positions = torch.cat(candidate_positions, dim=1)
            best_scores, order = torch.topk(merged_scores, min(k, merged_scores.shape[1]), dim=1)
            best_positions = torch.gather(merged_positions, 1, order)
        found = best_scores.shape[1]
        out_scores[q_start : q_start + query_block.shape[0], :found] = best_scores.float()
        out_positions[q_start : q_start + query_block.shape[0], :found] = best_positions
    return out_scores, out_positions


class TorchExactSearchBackend:
    """Exact search over a torch mirror of the gallery vectors (the GPU path without faiss-gpu).

    The vectors are L2-normalised float32 on input and stored as float16 on CUDA (tensor-core matrix products,
    half the memory traffic) or float32 on CPU (where float16 matrix products are slow).

    Example:
        >>> import numpy as np
        >>> backend = TorchExactSearchBackend(embedding_dim=2, device="cpu")
        >>> backend.add(np.array([[0.0, 1.0], [0.6, 0.8], [1.0, 0.0]], dtype="float32"))
        >>> backend.search(np.array([[1.0, 0.0]], dtype="float32"), k=2)[1].tolist()
        [[2, 1]]
    """

    name = "torch"

    def __init__(
        self,
        embedding_dim: int,
        device: str | torch.device = "cuda",
        dtype: torch.dtype | None = None,
        gallery_chunk_size: int | None = 1 << 18,
        score_block_bytes: int = DEFAULT_SCORE_BLOCK_BYTES,
    ):
        self.embedding_dim = int(embedding_dim)
        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.gallery_chunk_size = gallery_chunk_size
        self.score_block_bytes = score_block_bytes
        self._gallery = torch.empty((0, self.embedding_dim), dtype=self.dtype, device=self.device)

    @property
    def ntotal(self) -> int:
        return int(self._gallery.shape[0])

    def add(self, vectors: np.ndarray) -> None:
        block = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(self.device, self.dtype)
        self._gallery = torch.cat([self._gallery, block]) if self.ntotal else block

    @classmethod
    def from_faiss_flat(cls, flat_indexes: Sequence, embedding_dim: int, device="cuda", **kwargs):
        """Mirror the vectors of faiss ``IndexFlat`` parts (in order) into one preallocated device tensor."""
        backend = cls(embedding_dim, device=device, **kwargs)
        total = sum(int(part.ntotal) for part in flat_indexes)
        gallery = torch.empty((total, backend.embedding_dim), dtype=backend.dtype, device=backend.device)
        offset, step = 0, 1 << 17  # copy in blocks: bounded host memory even for mmapped parts
        for part in flat_indexes:
            for start in range(0, int(part.ntotal), step):
                count = min(step, int(part.ntotal) - start)
                gallery[offset : offset + count] = torch.from_numpy(part.reconstruct_n(start, count)).to(
                    backend.device, backend.dtype
                )
                offset += count
        backend._gallery = gallery
        return backend

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        query_tensor = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)
        scores, positions = torch_exact_search(
            query_tensor,
            self._gallery,
            k,
            gallery_chunk_size=self.gallery_chunk_size,
            score_block_bytes=self.score_block_bytes,
        )
        return scores.cpu().numpy(), positions.cpu().numpy()


class FaissSearchBackend:
    """Search through a faiss index: the CPU index itself, or a faiss-gpu clone of it.

    Args:
        cpu_index: the CPU faiss index (``IndexShards`` for multi-part galleries).
        gpu: ``None`` for CPU; an int for one GPU; ``"all"`` to shard the index across every visible GPU.
    """

    name = "faiss"

    def __init__(self, cpu_index, gpu: int | str | None = None):
        faiss = _import_faiss()
        self.gpu = gpu
        if gpu is None:
            self.index = cpu_index
            return
        num_gpus = faiss_gpu_count()
        if num_gpus == 0:
            raise RuntimeError(
                "faiss-gpu is not installed (faiss.get_num_gpus() == 0): install faiss-gpu, or search on the GPU "
                "with backend='torch' (exact indexes), or on the CPU with device='cpu'."
            )
        try:
            if gpu == "all":
                options = faiss.GpuMultipleClonerOptions()
                options.shard = True  # each GPU holds 1/n of the gallery; results are merged by faiss
                options.useFloat16 = True
                self.index = faiss.index_cpu_to_all_gpus(cpu_index, co=options)
            else:
                if not 0 <= int(gpu) < num_gpus:
                    raise ValueError(f"`gpu` must be in [0, {num_gpus}); got {gpu}.")
                options = faiss.GpuClonerOptions()
                options.useFloat16 = True
                resources = faiss.StandardGpuResources()
                self.index = faiss.index_cpu_to_gpu(resources, int(gpu), cpu_index, options)
                self._resources = resources  # keep alive as long as the GPU index
        except RuntimeError as error:
            raise ValueError(
                f"faiss cannot move this index ({type(cpu_index).__name__}) to the GPU: {error}. HNSW and some "
                "other index types are CPU-only in faiss; search them with device='cpu'."
            ) from error

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def set_parameter(self, name: str, value) -> None:
        faiss = _import_faiss()
        space = faiss.GpuParameterSpace() if self.gpu is not None else faiss.ParameterSpace()
        space.set_index_parameter(self.index, name, value)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, positions = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, positions
