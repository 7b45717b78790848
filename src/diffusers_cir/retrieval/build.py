"""Build a saved ``GalleryIndex`` from an embeddings folder, streaming it part by part.

Two layouts keep galleries larger than memory searchable:

- **on-disk inverted lists** (IVF factories, ``ondisk=True``): each embeddings part is added to a copy of the
  trained index and written as a block; faiss merges the blocks' inverted lists into one ``index.ivfdata``
  file (``OnDiskInvertedLists``) that searches map instead of load;
- **parts** (any factory, ``shard_size=N``): the gallery is split into indexes of ``N`` vectors each, searched
  one after the other and merged by ``faiss.IndexShards``; loaded with ``mmap=True``, exact parts are paged in
  by the OS instead of read into memory.

Only one embeddings part (``part_size`` rows of ``encode_gallery``) is ever held in memory while building.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..checks import check_positive_int
from ..utils.locks import folder_lock
from .backends import _import_faiss
from .gallery import GalleryEmbeddings
from .index import IVFDATA_NAME, GalleryIndex, normalize_embeddings


def check_index_options(
    embedding_dim: int,
    factory: str = "Flat",
    *,
    train_size: int | None = None,
    shard_size: int | None = None,
    ondisk: bool = False,
    nprobe: int | None = None,
    efSearch: int | None = None,
    names: dict[str, str] | None = None,
) -> None:
    """Refuse index options that cannot work together, before anything is embedded or trained.

    A size that is not a positive integer, a factory string faiss cannot build for ``embedding_dim``-wide vectors,
    ``ondisk`` without IVF, ``shard_size`` with a factory that needs training, ``train_size`` with one that needs none
    (it would be ignored), ``nprobe`` without IVF and ``efSearch`` without HNSW. ``names`` maps the argument names to what the caller calls them in
    the messages (``diffusers-cir index build`` passes its flags).
    """
    faiss = _import_faiss()

    def name(key: str) -> str:
        return (names or {}).get(key, f"`{key}`")

    for key, value in (("train_size", train_size), ("shard_size", shard_size), ("nprobe", nprobe), ("efSearch", efSearch)):
        if value is not None:
            check_positive_int(value, name(key).strip("`"))

    try:
        index = faiss.index_factory(int(embedding_dim), str(factory), faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise ValueError(
            f"{name('factory')} {factory!r} is not a valid faiss index-factory string for {embedding_dim}-wide "
            f"vectors: {str(error).strip().splitlines()[-1]}"
        ) from error
    if ondisk and not _is_ivf(faiss, index):
        raise ValueError(f"{name('ondisk')} needs an IVF factory (on-disk inverted lists); got {factory!r}.")
    if shard_size is not None and (ondisk or not index.is_trained):
        raise ValueError(
            f"{name('shard_size')} applies to factories that need no training (Flat, HNSW...); {factory!r} is better "
            f"served by one trained index with on-disk inverted lists ({name('ondisk')})."
        )
    if train_size is not None and index.is_trained:
        raise ValueError(
            f"{name('train_size')} is the training sample of factories that need training (IVF, PQ...); {factory!r} "
            "needs none, so it would be ignored."
        )
    space = faiss.ParameterSpace()
    for key, value, kind in (("nprobe", nprobe, "IVF"), ("efSearch", efSearch, "HNSW")):
        if value is not None:
            try:
                space.set_index_parameter(index, key, int(value))
            except RuntimeError as error:
                raise ValueError(f"{name(key)} applies to {kind} indexes; {factory!r} is not one.") from error


def build_index_from_embedding_files(
    gallery: GalleryEmbeddings | str | os.PathLike,
    output_dir: str | os.PathLike,
    factory: str = "Flat",
    train_size: int | None = None,
    shard_size: int | None = None,
    ondisk: bool = False,
    nprobe: int | None = None,
    efSearch: int | None = None,
    seed: int = 0,
    show_progress: bool = True,
    verify_checksums: bool = True,
) -> GalleryIndex:
    """Build and save an index of every embedding in ``gallery`` (an ``encode_gallery`` folder).

    Args:
        factory: faiss index-factory string (``"Flat"``, ``"IVF4096,PQ64"``, ``"HNSW32"``, ...).
        train_size: vectors sampled (uniformly, across parts) to train IVF / PQ; default ``64 * nlist``, >= 16k.
            Refused for a factory that needs no training (see :func:`check_index_options`).
        shard_size: split the index into parts of this many vectors (for factories that need no training).
        ondisk: keep the inverted lists of an IVF index in ``index.ivfdata`` (merged with faiss'
            ``OnDiskInvertedLists``) instead of memory.
        nprobe, efSearch: search parameters stored with the index.
        verify_checksums: check each embeddings part against the digests written with it before indexing it.

    Another process building into ``output_dir`` at the same time is refused
    (:class:`~diffusers_cir.utils.locks.FolderLockedError`).

    Returns:
        The saved index, loaded back from ``output_dir`` (memory-mapped for ``ondisk`` / ``shard_size``).

    Example:
        >>> index = build_index_from_embedding_files("out/embeddings", "out/index", factory="IVF1024,PQ64",
        ...                                          ondisk=True, nprobe=32)  # doctest: +SKIP
    """
    if not isinstance(gallery, GalleryEmbeddings):
        gallery = GalleryEmbeddings(gallery, verify_checksums=verify_checksums)
    if gallery.num_items == 0:
        raise ValueError(
            f"The gallery in {gallery.directory} holds no embeddings ({gallery.manifest.get('num_skipped', 0)} images "
            "skipped as unreadable, see its parts/skipped-*.jsonl): there is nothing to index."
        )
    check_index_options(
        gallery.embedding_dim, factory, train_size=train_size, shard_size=shard_size, ondisk=ondisk, nprobe=nprobe,
        efSearch=efSearch,
    )
    with folder_lock(output_dir, hint="wait for it to finish, or build into another folder (--output)"):
        index = _build(gallery, Path(output_dir), factory, train_size, shard_size, ondisk, seed, show_progress)
        if nprobe is not None or efSearch is not None:
            index.set_search_parameters(nprobe=nprobe, efSearch=efSearch)
        index.save(output_dir)
    # The checksums were just computed from these very files: hashing them again would only double the cost.
    return GalleryIndex.load(output_dir, mmap=ondisk or shard_size is not None, verify_checksums=False)


def _build(gallery, output_dir, factory, train_size, shard_size, ondisk, seed, show_progress) -> GalleryIndex:
    faiss = _import_faiss()
    template = GalleryIndex(
        gallery.embedding_dim, factory=factory, model=gallery.model, model_fingerprint=gallery.model_fingerprint
    )
    if not template.is_trained:
        sample_size = train_size or template.default_train_size()
        sample = gallery.sample(sample_size, seed=seed)
        if show_progress:
            print(f"Training {factory!r} on {sample.shape[0]} of {gallery.num_items} embeddings...")
        template.train(sample)

    parts = tqdm(gallery.iter_parts(), total=gallery.num_parts, desc="Indexing", unit="part", disable=not show_progress)
    if ondisk:
        index = _build_ondisk(faiss, template, parts, output_dir)
    elif shard_size is not None:
        index = _build_sharded(faiss, template, parts, shard_size)
    else:
        index = template
        for embeddings, ids, metadata in parts:
            index.add(embeddings, ids=ids, metadata=metadata)
    return index


def _is_ivf(faiss, index) -> bool:
    try:
        faiss.extract_index_ivf(index)
        return True
    except RuntimeError:
        return False


def _build_sharded(faiss, template: GalleryIndex, parts, shard_size: int) -> GalleryIndex:
    assert shard_size >= 1, shard_size  # checked by check_index_options
    index = template
    for embeddings, ids, metadata in parts:
        start = 0
        while start < embeddings.shape[0]:
            if index._parts[-1].ntotal >= shard_size:
                index._parts.append(faiss.index_factory(index.embedding_dim, index.factory, faiss.METRIC_INNER_PRODUCT))
            stop = min(embeddings.shape[0], start + shard_size - index._parts[-1].ntotal)
            index.add(embeddings[start:stop], ids=ids[start:stop], metadata=metadata[start:stop])
            start = stop
    return index


def _build_ondisk(faiss, template: GalleryIndex, parts, output_dir: Path) -> GalleryIndex:
    from faiss.contrib.ondisk import merge_ondisk

    trained = template._parts[0]
    all_ids, all_metadata, offset = [], [], 0
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".blocks-") as block_dir:
        block_files = []
        for number, (embeddings, ids, metadata) in enumerate(parts):
            block = faiss.clone_index(trained)
            vectors = normalize_embeddings(np.asarray(embeddings), "embeddings", template.embedding_dim)
            # Positions in the merged index are global: block rows get ids offset..offset+n-1.
            block.add_with_ids(vectors, np.arange(offset, offset + len(vectors), dtype=np.int64))
            block_file = os.path.join(block_dir, f"block-{number:05d}.faiss")
            faiss.write_index(block, block_file)
            block_files.append(block_file)
            all_ids.extend(ids)
            all_metadata.extend(metadata)
            offset += len(vectors)
            del block
        ivfdata = output_dir / IVFDATA_NAME
        if ivfdata.exists():
            ivfdata.unlink()  # OnDiskInvertedLists appends to an existing file
        merged = faiss.clone_index(trained)
        merge_ondisk(merged, block_files, str(ivfdata))
    index = GalleryIndex(
        template.embedding_dim, factory=template.factory, model=template.model, model_fingerprint=template.model_fingerprint
    )
    index._parts = [merged]
    index._ondisk = True
    index._source_directory = output_dir
    index._check_new_ids(np.asarray(all_ids))
    index._id_chunks = [np.asarray(all_ids) if len(all_ids) else np.empty(0, dtype=np.int64)]
    index._metadata = all_metadata
    return index
