# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Validation of a CompoDiff prior: compose queries with the pipeline, rank a gallery, Recall@K.

Queries are composed by the one compose path (:func:`diffusers_cir.retrieval.compose_queries`); the metric itself is
:func:`diffusers_cir.metrics.recall_at_k` (the one implementation of the formula).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


@dataclass
class RetrievalSet:
    """Composed-retrieval queries and the gallery they are ranked against.

    Attributes:
        reference_image_embeds: ``[Q, D]`` (zeros for text-only queries).
        prompts: ``Q`` modification texts.
        target_ids: ``[Q]`` gallery id of each query's target.
        gallery_embeds: ``[G, D]``.
        gallery_ids: ``[G]`` ids (ints or strings).
        reference_ids: ``[Q]`` gallery id of each reference, deleted from its ranking (as CIRR does), or ``None``.
    """

    reference_image_embeds: torch.Tensor
    prompts: list[str]
    target_ids: np.ndarray
    gallery_embeds: torch.Tensor
    gallery_ids: np.ndarray
    reference_ids: np.ndarray | None = None

    def __post_init__(self):
        queries = len(self.prompts)
        if self.reference_image_embeds.ndim != 2 or self.reference_image_embeds.shape[0] != queries:
            raise ValueError(
                f"`reference_image_embeds` must have shape [{queries}, dim] (one per prompt), "
                f"got {tuple(self.reference_image_embeds.shape)}."
            )
        if len(self.target_ids) != queries:
            raise ValueError(f"`target_ids` has {len(self.target_ids)} entries for {queries} prompts.")
        if self.reference_ids is not None and len(self.reference_ids) != queries:
            raise ValueError(f"`reference_ids` has {len(self.reference_ids)} entries for {queries} prompts.")
        if self.gallery_embeds.ndim != 2 or self.gallery_embeds.shape[0] != len(self.gallery_ids):
            raise ValueError(
                f"`gallery_embeds` must have shape [{len(self.gallery_ids)}, dim] (one per gallery id), "
                f"got {tuple(self.gallery_embeds.shape)}."
            )
        if self.gallery_embeds.shape[1] != self.reference_image_embeds.shape[1]:
            raise ValueError(
                f"Gallery width {self.gallery_embeds.shape[1]} differs from the query width "
                f"{self.reference_image_embeds.shape[1]}."
            )

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, count: int | None) -> "RetrievalSet":
        """The first ``count`` queries (all when ``None``), same gallery."""
        if count is None or count >= len(self):
            return self
        return RetrievalSet(
            self.reference_image_embeds[:count],
            self.prompts[:count],
            self.target_ids[:count],
            self.gallery_embeds,
            self.gallery_ids,
            None if self.reference_ids is None else self.reference_ids[:count],
        )

    @classmethod
    def from_triplets(
        cls,
        reference_image_embeds: torch.Tensor,
        prompts: Sequence[str],
        target_image_embeds: torch.Tensor,
        gallery_embeds: torch.Tensor | None = None,
        gallery_ids: Sequence | None = None,
        exclude_reference: bool = True,
    ) -> "RetrievalSet":
        """Queries from triplet rows (embeddings only). Images are identified by their embedding bytes.

        Without a gallery, the gallery is every distinct reference and target embedding of the rows; with one, each
        target must be found in it (exactly, as stored). References found in the gallery are excluded from their
        query's ranking when ``exclude_reference``.
        """
        reference_image_embeds = torch.as_tensor(reference_image_embeds, dtype=torch.float32)
        target_image_embeds = torch.as_tensor(target_image_embeds, dtype=torch.float32)
        if gallery_embeds is None:
            vectors = torch.cat([target_image_embeds, reference_image_embeds])
            keys, first = {}, []
            for row, vector in enumerate(vectors):
                key = _embedding_key(vector)
                if key not in keys and bool(vector.abs().sum() > 0):
                    keys[key] = len(first)
                    first.append(row)
            gallery_embeds = vectors[first]
            gallery_ids = np.arange(len(first))
        else:
            gallery_embeds = torch.as_tensor(gallery_embeds, dtype=torch.float32)
            gallery_ids = np.asarray(list(gallery_ids) if gallery_ids is not None else range(len(gallery_embeds)))
            keys = {_embedding_key(vector): index for index, vector in enumerate(gallery_embeds)}
        target_positions = [keys.get(_embedding_key(vector)) for vector in target_image_embeds]
        missing = [row for row, position in enumerate(target_positions) if position is None]
        if missing:
            raise ValueError(
                f"{len(missing)} target embeddings (rows {missing[:5]}) are not in the gallery; the gallery must hold "
                "every target exactly as stored."
            )
        reference_ids = None
        if exclude_reference:
            positions = [keys.get(_embedding_key(vector)) for vector in reference_image_embeds]
            reference_ids = np.array(
                [gallery_ids[p] if p is not None else _absent_id(gallery_ids) for p in positions], dtype=object
            )
            if all(p is not None for p in positions):
                reference_ids = reference_ids.astype(np.asarray(gallery_ids).dtype)
        return cls(
            reference_image_embeds,
            list(prompts),
            np.asarray(gallery_ids)[target_positions],
            gallery_embeds,
            np.asarray(gallery_ids),
            reference_ids,
        )


def _embedding_key(vector: torch.Tensor) -> bytes:
    return hashlib.blake2b(vector.detach().float().cpu().numpy().tobytes(), digest_size=16).digest()


def _absent_id(gallery_ids):
    # An id that matches no gallery item: a reference outside the gallery deletes nothing.
    return -1 if np.issubdtype(np.asarray(gallery_ids).dtype, np.integer) else "<not-in-gallery>"


def recall_of_queries(query_embeds: torch.Tensor, retrieval_set: RetrievalSet, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@K (fractions) of query embeddings against the gallery by cosine similarity: an exact search of the
    gallery (each query's reference left out), ranked as deep as the largest K the gallery can rank."""
    from diffusers_cir.metrics import recall_at_k

    from ..retrieval.index import GalleryIndex

    if query_embeds.shape[0] != len(retrieval_set):
        raise ValueError(f"{query_embeds.shape[0]} query embeddings for {len(retrieval_set)} queries.")
    ks = tuple(k for k in ks if k <= len(retrieval_set.gallery_ids))
    if not ks:
        return {}
    index = GalleryIndex.from_embeddings(retrieval_set.gallery_embeds, ids=retrieval_set.gallery_ids)
    exclude = None if retrieval_set.reference_ids is None else [[item] for item in retrieval_set.reference_ids]
    ranked = index.to("cpu", backend="torch").search(query_embeds, k=max(ks), exclude_ids=exclude).ids
    return recall_at_k(target_ids=retrieval_set.target_ids, ranked_ids=ranked, ks=ks, scale="fraction")


def evaluate_composed_retrieval(
    pipeline,
    retrieval_set: RetrievalSet,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 256,
    num_inference_steps: int = 10,
    guidance_scale: float = 7.5,
    image_guidance_scale: float = 1.5,
    seed: int = 0,
    show_progress: bool = False,
    num_samples_per_query: int = 1,
) -> dict[str, float]:
    """Recall@K (fractions, keys ``recall_at{K}``) of the pipeline's composed queries on ``retrieval_set``.

    Queries are composed by :func:`diffusers_cir.retrieval.compose_queries` (one generator per batch, seeded
    ``seed + batch number``, so validation never touches the global random state and a resumed run draws the same
    noise); all-zero reference rows are text-only queries.
    """
    from ..retrieval.compose import compose_queries

    queries = compose_queries(
        pipeline,
        retrieval_set.prompts,
        reference_embeds=retrieval_set.reference_image_embeds,
        batch_size=batch_size,
        seed=seed,
        show_progress=show_progress,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        image_guidance_scale=image_guidance_scale,
        num_samples_per_query=num_samples_per_query,
    )
    return recall_of_queries(queries, retrieval_set, ks)
