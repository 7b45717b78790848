"""Retrieval at any scale: gallery encoding, faiss / torch indexes, and composed search.

Example:
    >>> import numpy as np
    >>> from diffusers_cir.retrieval import GalleryIndex
    >>> gallery = np.random.default_rng(0).normal(size=(500, 16)).astype("float32")
    >>> index = GalleryIndex.from_embeddings(gallery, ids=[f"img{i}" for i in range(500)], model="toy")
    >>> index.search(gallery[7:8], k=1).ids
    [['img7']]
"""

from .backends import FaissSearchBackend, TorchExactSearchBackend, faiss_gpu_count, torch_exact_search
from .build import build_index_from_embedding_files, check_index_options
from .encoders import (
    ClipVisionEmbedder,
    PipelineEmbedder,
    as_image_embedder,
    image_encoder_fingerprint,
    load_cir_pipeline,
    load_image_encoder,
)
from .errors import IndexFormatError, IndexMismatchError
from .gallery import (
    GalleryEmbeddings,
    GalleryItem,
    encode_gallery,
    list_image_folder,
    read_image_list,
    resolve_source,
)
from .index import GalleryIndex, SearchHit, SearchResult, normalize_embeddings, read_manifest
from .search import ComposedSearchResult, composed_search

__all__ = [
    "ClipVisionEmbedder",
    "ComposedSearchResult",
    "FaissSearchBackend",
    "GalleryEmbeddings",
    "GalleryIndex",
    "GalleryItem",
    "IndexFormatError",
    "IndexMismatchError",
    "PipelineEmbedder",
    "SearchHit",
    "SearchResult",
    "TorchExactSearchBackend",
    "as_image_embedder",
    "build_index_from_embedding_files",
    "check_index_options",
    "composed_search",
    "encode_gallery",
    "faiss_gpu_count",
    "image_encoder_fingerprint",
    "list_image_folder",
    "load_cir_pipeline",
    "load_image_encoder",
    "normalize_embeddings",
    "read_image_list",
    "read_manifest",
    "resolve_source",
    "torch_exact_search",
]
