"""Ranking a gallery for a batch of queries: exact search, behind a tiny interface an index can implement.

A searcher has ``search(query_embeds, k) -> (scores [Q, k], indices [Q, k])`` over L2-normalised
embeddings (cosine similarity), best first. :class:`ExactSearcher` is brute force (chunked matmul + topk);
a faiss index from ``diffusers_cir.retrieval`` can be wrapped the same way for galleries too big for that.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

__all__ = ["Searcher", "ExactSearcher", "drop_excluded", "normalize"]


def normalize(embeds: torch.Tensor) -> torch.Tensor:
    """L2-normalise rows (cosine similarity = dot product), in float32."""
    return torch.nn.functional.normalize(embeds.float(), dim=-1)


class Searcher(Protocol):
    def search(self, query_embeds: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]: ...


class ExactSearcher:
    """Brute-force cosine search: ``query @ gallery.T`` in row chunks, then ``topk``.

    Example:

    ```py
    >>> gallery = normalize(torch.eye(4))
    >>> ExactSearcher(gallery).search(normalize(torch.tensor([[0.1, 0.0, 1.0, 0.2]])), k=2)[1].tolist()
    [[2, 3]]

    ```
    """

    def __init__(self, gallery_embeds: torch.Tensor, chunk_size: int = 1024, device: str | torch.device | None = None):
        if gallery_embeds.ndim != 2:
            raise ValueError(f"`gallery_embeds` must be [G, D], got {tuple(gallery_embeds.shape)}.")
        self.device = torch.device(device) if device is not None else gallery_embeds.device
        self.gallery = gallery_embeds.float().to(self.device)
        self.chunk_size = chunk_size

    def search(self, query_embeds: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if query_embeds.ndim != 2 or query_embeds.shape[1] != self.gallery.shape[1]:
            raise ValueError(f"Queries must be [Q, {self.gallery.shape[1]}], got {tuple(query_embeds.shape)}.")
        k = min(k, self.gallery.shape[0])
        scores, indices = [], []
        for start in range(0, query_embeds.shape[0], self.chunk_size):
            chunk = query_embeds[start : start + self.chunk_size].float().to(self.device)
            top = torch.topk(chunk @ self.gallery.T, k=k, dim=1)
            scores.append(top.values.cpu())
            indices.append(top.indices.cpu())
        if not scores:
            return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
        return torch.cat(scores), torch.cat(indices)


def drop_excluded(indices: torch.Tensor | np.ndarray, exclude: np.ndarray, k: int) -> np.ndarray:
    """Delete each row's excluded gallery position (CIRR's reference) and keep the first ``k`` of the rest.

    Search ``k + 1`` results so that ``k`` remain. ``exclude`` holds one position per row (-1: none).

    Example:

    ```py
    >>> drop_excluded(np.array([[4, 2, 7], [1, 3, 5]]), np.array([2, -1]), k=2).tolist()
    [[4, 7], [1, 3]]

    ```
    """
    indices = np.asarray(indices)
    keep = indices != np.asarray(exclude)[:, None]
    counts = keep.sum(axis=1)
    if (counts < k).any():
        row = int(np.flatnonzero(counts < k)[0])
        raise ValueError(f"Row {row} has {int(counts[row])} results after the deletion; search at least {k + 1}.")
    # Stable order of the kept columns: take each row's first k True positions.
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(indices, order, axis=1)
