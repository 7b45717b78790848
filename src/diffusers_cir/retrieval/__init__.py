"""The road from pixels to ranks: reading images, gallery encoders and their resumable cache, composing queries,
faiss / torch indexes, and composed search.

Names are imported on first use, so that ``diffusers_cir.retrieval.images`` (the one image loader, used by the data
tools) does not import torch or faiss.

Example:
    >>> import numpy as np
    >>> from diffusers_cir.retrieval import GalleryIndex
    >>> gallery = np.random.default_rng(0).normal(size=(500, 16)).astype("float32")
    >>> index = GalleryIndex.from_embeddings(gallery, ids=[f"img{i}" for i in range(500)], model="toy")
    >>> index.search(gallery[7:8], k=1).ids
    [['img7']]
"""

from __future__ import annotations

from .._lazy import lazy_names

# public name -> module that defines it (relative to this package)
_LAZY_NAMES = {
    "FaissSearchBackend": ".backends",
    "TorchExactSearchBackend": ".backends",
    "faiss_gpu_count": ".backends",
    "torch_exact_search": ".backends",
    "build_index_from_embedding_files": ".build",
    "check_index_options": ".build",
    "compose_queries": ".compose",
    "composed_batches": ".compose",
    "compose_ldre_queries": ".ensemble",
    "ldre_ensemble": ".ensemble",
    "CLIPVisionEncoder": ".encoders",
    "GalleryEncoder": ".encoders",
    "check_pipeline_options": ".encoders",
    "load_gallery_encoder": ".encoders",
    "load_pipeline": ".encoders",
    "IndexFormatError": ".errors",
    "IndexMismatchError": ".errors",
    "GalleryEmbeddings": ".gallery",
    "GalleryItem": ".gallery",
    "encode_gallery": ".gallery",
    "read_item": ".gallery",
    "list_image_folder": ".gallery",
    "read_image_list": ".gallery",
    "resolve_source": ".gallery",
    "ImageSource": ".images",
    "load_image": ".images",
    "GalleryIndex": ".index",
    "SearchHit": ".index",
    "SearchResult": ".index",
    "normalize_embeddings": ".index",
    "read_manifest": ".index",
    "ComposedSearchResult": ".search",
    "composed_search": ".search",
}

__all__ = sorted(_LAZY_NAMES)


__getattr__, __dir__ = lazy_names(__name__, _LAZY_NAMES, globals())
