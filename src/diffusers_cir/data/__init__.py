"""Data for composed image retrieval: training triplets, benchmark loaders and a synthetic world.

* :mod:`~diffusers_cir.data.synthetic`: a seeded closed CIR world (tiny CLIP text encoder, aligned image
  embeddings, triplets with held-out compositions) for tests, the offline demo and training checks.
* :mod:`~diffusers_cir.data.schema`, :mod:`~diffusers_cir.data.streaming`: the SynthTriplets18M layout
  (images and embeddings configurations), column mappings for other layouts (the WebDataset release),
  and the streaming input pipeline (decoding, CLIP preprocessing, tokenisation, shuffling, sharding,
  exact resume).
* :mod:`~diffusers_cir.data.shards`, :mod:`~diffusers_cir.data.card`: writing, re-sharding and
  validating Parquet shards and their dataset card.
* :mod:`~diffusers_cir.data.benchmarks`: CIRR, FashionIQ, CIRCO and GeneCIS loaders.

Importing this package is cheap: every name is imported on first use, and ``datasets`` (an optional
dependency) is only needed by the streaming and shard tools.

Example:
    >>> from diffusers_cir.data import SyntheticCIRWorld, SyntheticWorldConfig
    >>> world = SyntheticCIRWorld(SyntheticWorldConfig.tiny())
    >>> len(world.items)
    96
"""

from __future__ import annotations

from .._lazy import lazy_names

# name -> submodule that defines it; resolved lazily by __getattr__ (PEP 562).
_LAZY_NAMES = {
    # synthetic world
    "ATTRIBUTES": "synthetic",
    "SyntheticCIRWorld": "synthetic",
    "SyntheticItem": "synthetic",
    "SyntheticTextEncoding": "synthetic",
    "SyntheticTriplets": "synthetic",
    "SyntheticWorldConfig": "synthetic",
    "build_synthetic_text_encoder": "synthetic",
    "load_synthetic_world": "synthetic",
    # layout
    "MissingColumnsError": "schema",
    "embeddings_features": "schema",
    "images_features": "schema",
    "resolve_column_mapping": "schema",
    # streaming
    "BlockShuffledStream": "streaming",
    "TripletCollator": "streaming",
    "TripletDataLoader": "streaming",
    "TripletStream": "streaming",
    "build_triplet_dataloader": "streaming",
    "load_triplet_stream": "streaming",
    # shard tooling
    "ParquetShardWriter": "shards",
    "ValidationReport": "shards",
    "reshard": "shards",
    "validate_dataset": "shards",
    "write_triplets": "shards",
    "update_dataset_card": "card",
    # embedding precomputation
    "ImageEmbedder": "precompute",
    "open_clip_embedder": "precompute",
    "precompute_embeddings": "precompute",
    "transformers_embedder": "precompute",
    # benchmark loaders (written separately; re-exported when present)
    "BENCHMARKS": "benchmarks",
    "BenchmarkLayoutError": "benchmarks",
    "CIRBenchmark": "benchmarks",
    "CIRQuery": "benchmarks",
    "ImageRef": "benchmarks",
    "load_benchmark": "benchmarks",
    "load_circo": "benchmarks",
    "load_cirr": "benchmarks",
    "load_fashioniq": "benchmarks",
    "load_genecis": "benchmarks",
}

__all__ = sorted(_LAZY_NAMES)


__getattr__, __dir__ = lazy_names(__name__, {name: f".{module}" for name, module in _LAZY_NAMES.items()}, globals())
