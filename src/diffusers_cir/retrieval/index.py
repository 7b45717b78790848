"""``GalleryIndex``: a faiss index over gallery embeddings, with ids, metadata and a manifest.

Composed image retrieval ranks gallery images by cosine similarity to a composed query embedding. Neither the
gallery embeddings (projected CLIP image embeddings) nor the composed queries are normalised by the models, so
the index L2-normalises everything it is given and searches by inner product: on unit vectors the inner
product *is* the cosine similarity, and every faiss index type supports it.

A saved index is a folder::

    manifest.json      format version, embedding model (name + weight fingerprint), width, factory string,
                       search parameters, item count and the size of every file below
    index.faiss        the faiss index (or part-00000.faiss, part-00001.faiss, ... for galleries built in parts)
    index.ivfdata      the inverted lists of an on-disk IVF index (see ``build_index_from_embedding_files``)
    ids.npy            the external id of every item, in index order (int64 or strings)
    metadata.jsonl     one JSON object per item (e.g. {"path": ...}), when metadata was given
    checksums.json     size and content digest (XXH3-128) of every file above, manifest.json included; written last

Loading verifies the digests (``verify_checksums=False`` / ``--no-verify-checksums`` skips it for huge on-disk
indexes: about 1 s per 3 GB on one core once the files are cached, ``benchmarks/bench_index_checksums.py``), so flipped
bytes, a reordered ``ids.npy`` or a file from another index are refused by name instead of returning wrong results. An
index saved before checksums existed loads with a warning (sizes only) until it is saved again. Every file name in
the manifest is a plain name inside the folder.

Positions inside faiss are the order of insertion (0..N-1); ``ids.npy`` maps them to your ids, so ids can be
any unique strings or integers (image file names, dataset keys).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..checks import check_choice, check_positive_int
from ..utils.checksums import write_manifest
from ..utils.locks import folder_lock
from .backends import FaissSearchBackend, TorchExactSearchBackend, _import_faiss, faiss_gpu_count
from .errors import IndexFormatError, IndexMismatchError
from .index_files import (  # noqa: F401 - INDEX_FORMAT and read_manifest are public here too
    CHECKSUMS_NAME,
    IDS_NAME,
    INDEX_FORMAT,
    INDEX_FORMAT_VERSION,
    IVFDATA_NAME,
    MANIFEST_NAME,
    METADATA_NAME,
    SINGLE_PART_NAME,
    check_files,
    read_manifest,
    read_metadata,
)

SEARCH_PARAMETER_NAMES = ("nprobe", "efSearch")


def part_file_name(part_index: int) -> str:
    return f"part-{part_index:05d}.faiss"


def normalize_embeddings(embeddings: Any, name: str = "embeddings", embedding_dim: int | None = None) -> np.ndarray:
    """L2-normalise a ``[N, D]`` array (numpy, torch or nested lists) to contiguous float32.

    Raises ``IndexMismatchError`` when ``D != embedding_dim`` and ``ValueError`` for non-2D, non-finite or
    all-zero rows (a zero vector has no direction, so it cannot be ranked by cosine similarity).

    Example:
        >>> normalize_embeddings([[3.0, 4.0]]).tolist()
        [[0.6000000238418579, 0.800000011920929]]
    """
    if hasattr(embeddings, "detach"):  # torch.Tensor, without importing torch here
        if getattr(embeddings, "is_meta", False):
            raise ValueError(f"`{name}` is a tensor on the meta device (shape {tuple(embeddings.shape)}): it has no "
                             "values. Pass embeddings computed on the CPU or an accelerator.")
        embeddings = embeddings.detach().float().cpu().numpy()
    try:
        array = np.asarray(embeddings, dtype=np.float32)
    except (TypeError, ValueError) as error:
        reason = str(error).rstrip(".")
        raise ValueError(f"`{name}` must be numbers [N, D] (an array, a tensor or nested lists): {reason}.") from None
    if array.ndim == 1 and embedding_dim is not None and array.shape[0] == embedding_dim:
        array = array[None]
    if array.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D array [N, D]; got shape {array.shape}.")
    if embedding_dim is not None and array.shape[1] != embedding_dim:
        raise IndexMismatchError(
            f"`{name}` have width {array.shape[1]} but the index holds {embedding_dim}-wide embeddings: they come "
            "from a different model (or a different projection) than the gallery."
        )
    if not np.isfinite(array).all():
        bad_rows = np.flatnonzero(~np.isfinite(array).all(axis=1))
        raise ValueError(f"`{name}` contain NaN or inf in rows {bad_rows[:10].tolist()}.")
    with np.errstate(over="ignore", under="ignore"):
        norms = np.linalg.norm(array, axis=1, keepdims=True)
    # Squares overflow float32 past about 1e19 (the norm becomes inf and the row all zeros, ranked as if it were
    # anything) and underflow below about 1e-23: such rows are scaled by their largest value first.
    extreme = ~np.isfinite(norms[:, 0]) | ((norms[:, 0] < 1e-18) & (np.abs(array).max(axis=1, initial=0) > 0))
    if extreme.any():
        scaled = array[extreme] / np.abs(array[extreme]).max(axis=1, keepdims=True)
        array = array.copy()
        array[extreme] = scaled
        norms[extreme] = np.linalg.norm(scaled, axis=1, keepdims=True)
    if array.shape[0] and (norms == 0).any():
        zero_rows = np.flatnonzero(norms[:, 0] == 0)
        raise ValueError(f"`{name}` contain all-zero rows {zero_rows[:10].tolist()}: they cannot be normalised.")
    return np.ascontiguousarray(array / norms, dtype=np.float32)


@dataclass
class SearchHit:
    """One ranked result of one query."""

    rank: int
    id: Any
    score: float
    position: int
    metadata: dict | None = None


@dataclass
class SearchResult:
    """Results of a batched search.

    Attributes:
        scores: ``[Q, k]`` float32 cosine similarities, best first; ``-inf`` where fewer than ``k`` were found.
        positions: ``[Q, k]`` int64 positions in the index; ``-1`` where fewer than ``k`` were found.
        ids: per query, the external ids of the found items (only the valid ones), best first.
        metadata: per query, the metadata of the found items (``None`` entries for items without metadata),
            or ``None`` when the index has no metadata.
    """

    scores: np.ndarray
    positions: np.ndarray
    ids: list[list]
    metadata: list[list] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def hits(self, query_index: int = 0) -> list[SearchHit]:
        """The ranked hits of one query."""
        hits = []
        for rank, item_id in enumerate(self.ids[query_index]):
            hits.append(
                SearchHit(
                    rank=rank + 1,
                    id=item_id,
                    score=float(self.scores[query_index, rank]),
                    position=int(self.positions[query_index, rank]),
                    metadata=None if self.metadata is None else self.metadata[query_index][rank],
                )
            )
        return hits


def _as_id_array(ids: Any, count: int) -> np.ndarray:
    if hasattr(ids, "detach"):  # torch.Tensor
        ids = ids.detach().cpu().numpy()
    if not isinstance(ids, np.ndarray) and not isinstance(ids, (str, bytes)):
        ids = list(ids)
        kinds = {type(value) for value in ids}
        if any(issubclass(kind, (str, np.str_)) for kind in kinds) and any(
            issubclass(kind, (int, np.integer)) for kind in kinds
        ):
            # numpy would turn the ints into strings ([7, "a"] -> ["7", "a"]): search results would then return
            # "7" for the item added as 7, and excluding 7 would not exclude it.
            raise ValueError("`ids` must be all integers or all strings; got a mix of both.")
    array = np.asarray(ids)
    if array.shape == (0,) and count == 0:
        return np.empty(0, dtype=np.int64)  # `[]` is float64 to numpy; no ids of either kind
    if array.ndim != 1 or array.shape[0] != count:
        raise ValueError(f"`ids` must be a 1-D sequence of {count} ids (one per embedding); got shape {array.shape}.")
    if array.dtype.kind == "u" and array.size and array.max() > np.iinfo(np.int64).max:
        raise ValueError(f"`ids` must fit in int64; got {int(array.max())}.")
    if array.dtype.kind in "iu":
        return array.astype(np.int64)
    if array.dtype.kind == "U":
        return array
    if array.dtype.kind == "O" and all(isinstance(value, str) for value in array.tolist()):
        return array.astype(str)
    raise ValueError(f"`ids` must be integers or strings; got dtype {array.dtype}.")


def _ivf_nlist(faiss, index) -> int | None:
    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except (RuntimeError, AttributeError):
        return None


class GalleryIndex:
    """An index of L2-normalised gallery embeddings searched by inner product (= cosine similarity).

    Args:
        embedding_dim: width of the embeddings.
        factory: a faiss index-factory string: ``"Flat"`` (exact), ``"IVF4096,PQ64"``, ``"HNSW32"``,
            ``"OPQ64,IVF1024,PQ64"``, ... The metric is always inner product.
        model: name of the model that produced the embeddings (stored in the manifest, checked at search time).
        model_fingerprint: a hash of that model's image-encoder weights (see
            ``pipe.fingerprint``); compared in preference to ``model``.

    Example:
        >>> import numpy as np
        >>> gallery = np.random.default_rng(0).normal(size=(1000, 32)).astype("float32")
        >>> index = GalleryIndex(32, factory="Flat", model="toy")
        >>> index.add(gallery, ids=[f"img{i}" for i in range(1000)], metadata=[{"path": f"{i}.png"} for i in range(1000)])
        >>> result = index.search(gallery[:2], k=3, exclude_ids=[["img0"], None])
        >>> result.ids[0][0] != "img0", result.ids[1][0]
        (True, 'img1')
    """

    def __init__(
        self,
        embedding_dim: int,
        factory: str = "Flat",
        model: str | None = None,
        model_fingerprint: str | None = None,
    ):
        faiss = _import_faiss()
        self.embedding_dim = check_positive_int(embedding_dim, "embedding_dim")
        self.factory = str(factory)
        self.model = model
        self.model_fingerprint = model_fingerprint
        try:
            first_part = faiss.index_factory(self.embedding_dim, self.factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as error:
            raise ValueError(
                f"`factory` {self.factory!r} is not a valid faiss index-factory string for {self.embedding_dim}-wide "
                f"vectors: {str(error).strip().splitlines()[-1]}"
            ) from error
        self._parts: list = [first_part]
        self._ondisk = False  # inverted lists live in index.ivfdata next to the saved index
        self._read_only_reason: str | None = None
        self._source_directory: Path | None = None
        self._id_chunks: list[np.ndarray] = []
        self._ids_cache: np.ndarray | None = None
        self._id_to_position: dict | None = None
        self._metadata: list | None = None
        self._search_parameters: dict[str, int] = {}
        self._device = "cpu"
        self._backend_name = "faiss"
        self._shard_across_gpus = False
        self._backend = None

    # ------------------------------------------------------------------ properties
    @property
    def ntotal(self) -> int:
        return int(sum(part.ntotal for part in self._parts))

    def __len__(self) -> int:
        return self.ntotal

    @property
    def is_trained(self) -> bool:
        return bool(self._parts[0].is_trained)

    @property
    def is_exact(self) -> bool:
        """True for a ``Flat`` index (exact search), the only kind the torch backend can mirror."""
        faiss = _import_faiss()
        return all(isinstance(faiss.downcast_index(part), faiss.IndexFlat) for part in self._parts)

    @property
    def num_parts(self) -> int:
        return len(self._parts)

    @property
    def ids(self) -> np.ndarray:
        """External ids in index order (int64 or strings)."""
        if self._ids_cache is None:
            self._ids_cache = (
                np.concatenate(self._id_chunks) if self._id_chunks else np.empty(0, dtype=np.int64)
            )
            self._id_chunks = [self._ids_cache] if len(self._ids_cache) else []
        return self._ids_cache

    @property
    def metadata(self) -> list | None:
        """Per-item metadata dicts (``None`` for items added without), or ``None`` if no item has any."""
        return self._metadata

    @property
    def search_parameters(self) -> dict[str, int]:
        return dict(self._search_parameters)

    @property
    def device(self) -> str:
        return self._device

    @property
    def backend(self) -> str:
        return self._backend_name

    def __repr__(self) -> str:
        return (
            f"GalleryIndex(factory={self.factory!r}, embedding_dim={self.embedding_dim}, ntotal={self.ntotal}, "
            f"parts={self.num_parts}, model={self.model!r}, backend={self._backend_name!r}, device={self._device!r})"
        )

    # ------------------------------------------------------------------ building
    def train(self, embeddings: Any) -> None:
        """Train the quantizers of an IVF / PQ index on a sample of the gallery (normalised here).

        A sample of ``64 * nlist`` vectors (and at least 10k for 8-bit PQ) is plenty; training on the whole
        gallery only costs time.
        """
        faiss = _import_faiss()
        if self.is_trained:
            raise ValueError(f"This {self.factory!r} index is already trained (or needs no training).")
        sample = normalize_embeddings(embeddings, "training embeddings", self.embedding_dim)
        nlist = _ivf_nlist(faiss, self._parts[0])
        if nlist is not None and sample.shape[0] < nlist:
            raise ValueError(
                f"Training {self.factory!r} needs at least nlist={nlist} vectors (ideally {39 * nlist}+); got "
                f"{sample.shape[0]}. Use a smaller IVF or a larger training sample."
            )
        if nlist is not None:
            ivf = faiss.downcast_index(faiss.extract_index_ivf(self._parts[0]))
            if hasattr(ivf, "do_polysemous_training"):
                # Polysemous codes only serve Hamming pre-filtering, which inner-product search never uses, and
                # their simulated annealing takes 20-50x longer than the whole PQ training (measured: 246 s vs 6 s
                # for IVF256,PQ32 on 16k vectors).
                ivf.do_polysemous_training = False
        self._parts[0].train(sample)

    def add(
        self,
        embeddings: Any,
        ids: Sequence | None = None,
        metadata: Sequence[dict | None] | None = None,
        batch_size: int = 1 << 16,
        show_progress: bool | None = None,
    ) -> None:
        """Add embeddings (normalised here) with optional unique ids (default: their positions) and metadata.

        Can be called any number of times; ids must stay unique across calls.
        """
        if self._read_only_reason:
            raise ValueError(f"Cannot add to this index: {self._read_only_reason}")
        if not self.is_trained:
            raise ValueError(
                f"The {self.factory!r} index must be trained before adding: call `index.train(sample)` with a sample "
                "of the gallery, or build it with `GalleryIndex.from_embeddings`."
            )
        batch_size = check_positive_int(batch_size, "batch_size")
        vectors = normalize_embeddings(embeddings, "embeddings", self.embedding_dim)
        count, start = vectors.shape[0], self.ntotal
        new_ids = np.arange(start, start + count, dtype=np.int64) if ids is None else _as_id_array(ids, count)
        self._check_new_ids(new_ids)
        if metadata is not None:
            metadata = list(metadata)
            if len(metadata) != count:
                raise ValueError(f"`metadata` must have one entry per embedding ({count}); got {len(metadata)}.")
            for position, item in enumerate(metadata):
                if item is not None and not isinstance(item, dict):
                    raise ValueError(
                        f"`metadata` entries must be dicts or None; entry {position} is {type(item).__name__}."
                    )
        batches = range(0, count, batch_size)
        if show_progress is None:
            show_progress = len(batches) > 1
        target = self._parts[-1]
        for batch_start in tqdm(batches, desc="Adding to index", unit="batch", disable=not show_progress):
            target.add(vectors[batch_start : batch_start + batch_size])
        if self._metadata is not None or metadata is not None:
            if self._metadata is None:
                self._metadata = [None] * start
            self._metadata.extend(metadata if metadata is not None else [None] * count)
        if self._id_to_position is not None and len(self._id_to_position) == start:
            self._id_to_position.update(zip(new_ids.tolist(), range(start, start + count)))
        self._id_chunks.append(new_ids)
        self._ids_cache = None
        self._backend = None  # device mirrors are rebuilt at the next search

    def _id_lookup(self) -> dict:
        if self._id_to_position is None or len(self._id_to_position) != self.ntotal:
            self._id_to_position = {item_id: position for position, item_id in enumerate(self.ids.tolist())}
        return self._id_to_position

    def _check_new_ids(self, new_ids: np.ndarray) -> None:
        existing_kind = next((chunk.dtype.kind for chunk in self._id_chunks if len(chunk)), None)
        if existing_kind is not None and len(new_ids) and existing_kind != new_ids.dtype.kind:
            kinds = {"i": "integers", "U": "strings"}
            raise ValueError(
                f"`ids` must be {kinds.get(existing_kind, existing_kind)} like the ids already in the index; "
                f"got {kinds.get(new_ids.dtype.kind, new_ids.dtype)}."
            )
        if not len(new_ids):
            return
        new_list = new_ids.tolist()
        if len(set(new_list)) != len(new_list):
            unique, counts = np.unique(new_ids, return_counts=True)
            raise ValueError(f"`ids` contain duplicates: {unique[counts > 1][:5].tolist()}.")
        if existing_kind is not None:
            lookup = self._id_lookup()
            clash = [item_id for item_id in new_list if item_id in lookup]
            if clash:
                raise ValueError(f"`ids` already in the index: {clash[:5]}.")

    @classmethod
    def from_embeddings(
        cls,
        embeddings: Any,
        ids: Sequence | None = None,
        metadata: Sequence[dict | None] | None = None,
        factory: str = "Flat",
        model: str | None = None,
        model_fingerprint: str | None = None,
        train_size: int | None = None,
        seed: int = 0,
        **search_parameters,
    ) -> "GalleryIndex":
        """Build an index in one call: train on a random sample (for IVF / PQ), then add everything.

        Example:
            >>> import numpy as np
            >>> gallery = np.random.default_rng(0).normal(size=(5000, 16)).astype("float32")
            >>> index = GalleryIndex.from_embeddings(gallery, factory="IVF16,Flat", nprobe=16)
            >>> index.search(gallery[:1], k=1).ids
            [[0]]
        """
        vectors = normalize_embeddings(embeddings, "embeddings")
        if vectors.shape[0] == 0:
            raise ValueError(
                f"`embeddings` is empty (shape {vectors.shape}): there is nothing to index. Check the gallery it "
                "comes from (an empty folder or list, or every image skipped as unreadable)."
            )
        index = cls(vectors.shape[1], factory=factory, model=model, model_fingerprint=model_fingerprint)
        if not index.is_trained:
            sample_size = min(vectors.shape[0], train_size or index.default_train_size())
            rng = np.random.default_rng(seed)
            sample = vectors[np.sort(rng.choice(vectors.shape[0], sample_size, replace=False))]
            index.train(sample)
        index.add(vectors, ids=ids, metadata=metadata)
        if search_parameters:
            index.set_search_parameters(**search_parameters)
        return index

    def default_train_size(self) -> int:
        """A training-sample size that is enough for this factory: 64 vectors per IVF list, at least 16k."""
        nlist = _ivf_nlist(_import_faiss(), self._parts[0]) or 0
        return max(64 * nlist, 1 << 14)

    # ------------------------------------------------------------------ searching
    def set_search_parameters(self, nprobe: int | None = None, efSearch: int | None = None) -> None:
        """Set ``nprobe`` (IVF: lists visited per query) and/or ``efSearch`` (HNSW: candidate-list size).

        Higher values give better recall and slower search. They are saved with the index.
        """
        faiss = _import_faiss()
        space = faiss.ParameterSpace()
        for name, value in (("nprobe", nprobe), ("efSearch", efSearch)):
            if value is None:
                continue
            value = check_positive_int(value, name)
            for part in self._parts:
                try:
                    space.set_index_parameter(part, name, int(value))
                except RuntimeError as error:
                    kind = "IVF" if name == "nprobe" else "HNSW"
                    raise ValueError(
                        f"`{name}` applies to {kind} indexes; this index is {self.factory!r}."
                    ) from error
            self._search_parameters[name] = int(value)
            if isinstance(self._backend, FaissSearchBackend) and self._backend.gpu is not None:
                self._backend.set_parameter(name, int(value))

    def to(self, device: str = "cpu", backend: str = "auto", shard_across_gpus: bool = False) -> "GalleryIndex":
        """Choose where searches run.

        - ``device="cpu"``: CPU faiss (default), or ``backend="torch"`` for exact torch search on the CPU.
        - ``device="cuda"`` / ``"cuda:1"``: faiss-gpu when installed, else (``backend="auto"``) the torch exact
          backend (float16 matrix product + top-k, exact indexes only).
        - ``shard_across_gpus=True`` (faiss-gpu): the gallery is split over every visible GPU.
        """
        backend = check_choice(backend, "backend", ("auto", "faiss", "torch"))
        device = str(device)
        if not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
            raise ValueError(f"`device` must be 'cpu', 'cuda' or 'cuda:N'; got {device!r}.")
        if backend == "auto":
            backend = "faiss" if device == "cpu" or faiss_gpu_count() > 0 else "torch"
        if backend == "torch":
            if device != "cpu":
                import torch

                if not torch.cuda.is_available():
                    raise ValueError(f"`device` {device!r} was requested but torch sees no CUDA GPU.")
            if shard_across_gpus:
                raise ValueError("`shard_across_gpus` needs the faiss backend (faiss-gpu).")
            if not self.is_exact:
                raise ValueError(
                    f"The torch backend searches exactly and needs a 'Flat' index; this one is {self.factory!r}. "
                    "Install faiss-gpu to search it on the GPU, or search it on the CPU."
                )
        self._device, self._backend_name, self._shard_across_gpus = device, backend, shard_across_gpus
        self._backend = None
        self._get_backend()  # fail now (e.g. no faiss-gpu, no CUDA) rather than at the first search
        return self

    def _cpu_search_index(self):
        if len(self._parts) == 1:
            return self._parts[0]
        faiss = _import_faiss()
        shards = faiss.IndexShards(self.embedding_dim, False, True)  # sequential shards, successive ids
        for part in self._parts:
            shards.add_shard(part)  # faiss' wrapper keeps a Python reference to each part
        return shards

    def _get_backend(self):
        if self._backend is not None:
            return self._backend
        if self._backend_name == "torch":
            self._backend = TorchExactSearchBackend.from_faiss_flat(
                [_import_faiss().downcast_index(part) for part in self._parts], self.embedding_dim, device=self._device
            )
        else:
            gpu = None
            if self._device != "cpu":
                gpu = "all" if self._shard_across_gpus else (int(self._device.split(":")[1]) if ":" in self._device else 0)
            self._backend = FaissSearchBackend(self._cpu_search_index(), gpu=gpu)
            if gpu is not None:
                for name, value in self._search_parameters.items():
                    self._backend.set_parameter(name, value)
        return self._backend

    def check_query_model(self, model: str | None = None, model_fingerprint: str | None = None) -> None:
        """Raise ``IndexMismatchError`` if the query model differs from the model the gallery was embedded with.

        The weight fingerprint decides when both sides have one (the same weights under another path are fine);
        otherwise the names are compared. Nothing is checked for a side that gives neither.
        """
        if model_fingerprint is not None and self.model_fingerprint is not None:
            if model_fingerprint == self.model_fingerprint:
                return
        elif model is None or self.model is None or model == self.model:
            return
        raise IndexMismatchError(
            f"This index holds embeddings of model {self.model!r} (fingerprint {self.model_fingerprint}), but the "
            f"queries come from model {model!r} (fingerprint {model_fingerprint}). Embeddings of different models "
            "are not comparable: search with the gallery's model, or rebuild the index with this one."
        )

    def positions_of(self, ids: Iterable) -> np.ndarray:
        """Positions of the given external ids (ids not in the index are ignored)."""
        lookup = self._id_lookup()
        found = [lookup.get(item_id) for item_id in ids]
        return np.asarray([position for position in found if position is not None], dtype=np.int64)

    def _exclusions(self, exclude_ids: Sequence | None, num_queries: int) -> list[np.ndarray] | None:
        if exclude_ids is None:
            return None
        if len(exclude_ids) != num_queries:
            raise ValueError(
                f"`exclude_ids` must have one entry per query ({num_queries}); got {len(exclude_ids)}. Each entry is "
                "an id, a list of ids, or None."
            )
        exclusions = []
        for entry in exclude_ids:
            if entry is None:
                entry = []
            elif isinstance(entry, (str, int, np.integer, np.str_)):
                entry = [entry]
            exclusions.append(self.positions_of(entry.tolist() if isinstance(entry, np.ndarray) else entry))
        return exclusions

    def search(
        self,
        queries: Any,
        k: int = 10,
        exclude_ids: Sequence | None = None,
        model: str | None = None,
        model_fingerprint: str | None = None,
        batch_size: int = 4096,
        show_progress: bool | None = None,
    ) -> SearchResult:
        """Batched search of ``[Q, D]`` query embeddings (normalised here) for their ``k`` best items each.

        Args:
            queries: query embeddings, e.g. composed CIR queries (numpy or torch).
            k: results per query: a positive ``int`` (numpy integers too; ``bool`` is refused). When fewer than ``k``
                items can be returned (a small gallery, exclusions, an IVF list visited short), the row is padded
                with ``-inf`` scores and ``-1`` positions and ``ids`` lists only the items found.
            exclude_ids: per query, ids never to return (typically the reference image): an id, a list of ids,
                or None. The search fetches extra candidates so that ``k`` results remain after exclusion.
            model, model_fingerprint: the model the queries come from; checked against the index's model.
            batch_size: queries per backend call (a progress bar is shown when there are several batches).
        """
        k = check_positive_int(k, "k")
        batch_size = check_positive_int(batch_size, "batch_size")
        self.check_query_model(model, model_fingerprint)
        query_vectors = normalize_embeddings(queries, "queries", self.embedding_dim)
        num_queries = query_vectors.shape[0]
        exclusions = self._exclusions(exclude_ids, num_queries)
        extra = max((len(positions) for positions in exclusions), default=0) if exclusions else 0
        backend = self._get_backend()
        fetch = k + extra
        scores = np.full((num_queries, k), -math.inf, dtype=np.float32)
        positions = np.full((num_queries, k), -1, dtype=np.int64)
        batches = range(0, num_queries, batch_size)
        if show_progress is None:
            show_progress = len(batches) > 1
        for start in tqdm(batches, desc="Searching", unit="batch", disable=not show_progress):
            batch_scores, batch_positions = backend.search(query_vectors[start : start + batch_size], fetch)
            batch_scores = np.where(batch_positions < 0, -np.inf, batch_scores).astype(np.float32)
            for row in range(batch_scores.shape[0]):
                keep = batch_positions[row] >= 0
                if exclusions is not None and len(exclusions[start + row]):
                    keep &= ~np.isin(batch_positions[row], exclusions[start + row])
                kept_positions = batch_positions[row][keep][:k]
                positions[start + row, : len(kept_positions)] = kept_positions
                scores[start + row, : len(kept_positions)] = batch_scores[row][keep][:k]
        all_ids = self.ids
        ids = [all_ids[row[row >= 0]].tolist() for row in positions]
        metadata = None
        if self._metadata is not None:
            metadata = [[self._metadata[p] for p in row[row >= 0]] for row in positions]
        return SearchResult(scores=scores, positions=positions, ids=ids, metadata=metadata)

    # ------------------------------------------------------------------ persistence
    def manifest(self) -> dict:
        return {
            "format": INDEX_FORMAT,
            "format_version": INDEX_FORMAT_VERSION,
            "model": {"name": self.model, "fingerprint": self.model_fingerprint},
            "embedding_dim": self.embedding_dim,
            "factory": self.factory,
            "metric": "inner_product",
            "normalized": True,
            "ntotal": self.ntotal,
            "id_dtype": "str" if self.ids.dtype.kind == "U" else "int64",
            "search_parameters": self.search_parameters,
            "ondisk_inverted_lists": self._ondisk,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the index folder (see the module docstring). The checksums are written last, so a folder whose
        manifest and checksums agree with its files is complete. Another process saving into the same folder at the
        same time is refused (:class:`~diffusers_cir.utils.locks.FolderLockedError`)."""
        with folder_lock(directory, hint="wait for it to finish, or save this index to another folder"):
            return self._save(Path(directory))

    def _save(self, directory: Path) -> Path:
        faiss = _import_faiss()
        manifest = self.manifest()
        files: dict[str, int] = {}

        def commit(temporary: Path, final_name: str) -> None:
            os.replace(temporary, directory / final_name)
            files[final_name] = (directory / final_name).stat().st_size

        metadata_temporary = directory / (METADATA_NAME + ".tmp")
        if self._metadata is not None:
            # Written before anything is replaced: metadata that JSON cannot hold (numpy scalars, paths, ...)
            # must fail here, not halfway, which left an earlier save in this folder with mismatched files.
            try:
                with open(metadata_temporary, "w", encoding="utf-8") as handle:
                    for position, item in enumerate(self._metadata):
                        handle.write(json.dumps(item, ensure_ascii=False) + "\n")
            except (TypeError, ValueError) as error:
                metadata_temporary.unlink()
                raise ValueError(
                    f"`metadata` of item {position} (id {self.ids[position].item()!r}) cannot be saved as JSON: "
                    f"{error}. Use plain Python values (str, int, float, bool, None, lists and dicts of them)."
                ) from error

        # An earlier save's manifest goes first: were this save interrupted, it would otherwise vouch for a
        # mix of old and new files (same sizes pass its checks: new vectors under the old ids).
        (directory / CHECKSUMS_NAME).unlink(missing_ok=True)
        (directory / MANIFEST_NAME).unlink(missing_ok=True)
        if self._ondisk:
            # The inverted lists stay in their .ivfdata file; the index file only refers to it by name.
            ivfdata = self._source_directory / IVFDATA_NAME
            if directory.resolve() != self._source_directory.resolve():
                shutil.copyfile(ivfdata, directory / (IVFDATA_NAME + ".tmp"))
                os.replace(directory / (IVFDATA_NAME + ".tmp"), directory / IVFDATA_NAME)
            files[IVFDATA_NAME] = (directory / IVFDATA_NAME).stat().st_size
        part_names = [SINGLE_PART_NAME] if len(self._parts) == 1 else [part_file_name(i) for i in range(len(self._parts))]
        for part, name in zip(self._parts, part_names):
            temporary = directory / (name + ".tmp")
            faiss.write_index(part, str(temporary))
            commit(temporary, name)
        with open(directory / (IDS_NAME + ".tmp"), "wb") as handle:
            np.save(handle, self.ids, allow_pickle=False)
        commit(directory / (IDS_NAME + ".tmp"), IDS_NAME)
        if self._metadata is not None:
            commit(metadata_temporary, METADATA_NAME)
        elif (directory / METADATA_NAME).exists():
            (directory / METADATA_NAME).unlink()
        manifest["parts"] = [{"file": name, "ntotal": int(part.ntotal)} for part, name in zip(self._parts, part_names)]
        manifest["files"] = files
        manifest["has_metadata"] = self._metadata is not None
        manifest["checksums"] = CHECKSUMS_NAME
        with open(directory / (MANIFEST_NAME + ".tmp"), "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2)
        os.replace(directory / (MANIFEST_NAME + ".tmp"), directory / MANIFEST_NAME)
        write_manifest(directory, files=[*files, MANIFEST_NAME], name=CHECKSUMS_NAME)
        return directory

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        mmap: bool = False,
        device: str = "cpu",
        backend: str = "auto",
        shard_across_gpus: bool = False,
        verify_checksums: bool = True,
    ) -> "GalleryIndex":
        """Load a saved index, checking that its files are complete, unchanged and agree with each other.

        Args:
            mmap: map the index files instead of reading them (exact indexes and on-disk inverted lists are then
                paged in by the OS: galleries larger than memory). A mapped index is read-only.
            device, backend, shard_across_gpus: see ``GalleryIndex.to``.
            verify_checksums: compare every file with the content digest written with it (default). ``False`` checks
                sizes only: for a huge on-disk index, where hashing means reading every byte from disk once
                (``--no-verify-checksums`` on the command line).

        Raises:
            IndexFormatError: a file is missing, truncated, changed or unreadable, a file name leads outside the
                folder, or the files disagree.
        """
        faiss = _import_faiss()
        directory = Path(directory)
        manifest = read_manifest(directory)
        check_files(directory, manifest, verify_checksums)
        model = manifest.get("model") or {}
        index = cls.__new__(cls)
        try:
            GalleryIndex.__init__(
                index,
                int(manifest["embedding_dim"]),
                manifest["factory"],
                model=model.get("name"),
                model_fingerprint=model.get("fingerprint"),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise IndexFormatError(f"{directory / MANIFEST_NAME} is invalid: {error}") from error
        ondisk = bool(manifest.get("ondisk_inverted_lists", False))
        if ondisk:
            # The lists file is mapped by OnDiskInvertedLists itself; faiss finds it next to the index file
            # (a moved folder keeps working), which it only supports for plain file reads.
            flags = faiss.IO_FLAG_ONDISK_SAME_DIR
        elif mmap:
            # Exact codes are used in place from the mapped file: the OS pages them in, nothing is copied.
            flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
        else:
            flags = 0
        parts = []
        for part_info in manifest["parts"]:
            path = directory / part_info["file"]
            try:
                part = faiss.read_index(str(path), flags)
            except RuntimeError as error:
                raise IndexFormatError(
                    f"Could not read faiss index {path}: the file is corrupt or not a faiss index "
                    f"({str(error).strip().splitlines()[-1]}). Rebuild the index."
                ) from error
            if part.d != index.embedding_dim or part.ntotal != part_info["ntotal"]:
                raise IndexFormatError(
                    f"{path} holds {part.ntotal} vectors of width {part.d}; the manifest says {part_info['ntotal']} "
                    f"of width {index.embedding_dim}."
                )
            parts.append(part)
        if not parts:
            raise IndexFormatError(f"{directory / MANIFEST_NAME} lists no index parts.")
        index._parts = parts
        index._ondisk = ondisk
        index._source_directory = directory
        if index._ondisk:
            index._read_only_reason = (
                "its inverted lists are on disk (index.ivfdata); rebuild it with build_index_from_embedding_files."
            )
        elif mmap:
            index._read_only_reason = "it was loaded with mmap=True; load it with mmap=False to add items."
        try:
            ids = np.load(directory / IDS_NAME, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            raise IndexFormatError(f"Could not read {directory / IDS_NAME}: {error}. Rebuild the index.") from error
        if ids.dtype.kind not in "iU":
            raise IndexFormatError(
                f"{directory / IDS_NAME} holds {ids.dtype} values; ids are int64 or strings. Rebuild the index."
            )
        if ids.ndim != 1 or ids.shape[0] != index.ntotal or ids.shape[0] != manifest.get("ntotal"):
            raise IndexFormatError(
                f"{directory / IDS_NAME} holds {ids.shape} ids for {index.ntotal} indexed vectors "
                f"(manifest: {manifest.get('ntotal')})."
            )
        index._id_chunks = [ids] if len(ids) else []
        if manifest.get("has_metadata"):
            index._metadata = read_metadata(directory / METADATA_NAME, index.ntotal)
        for name, value in manifest.get("search_parameters", {}).items():
            if name in SEARCH_PARAMETER_NAMES:
                index.set_search_parameters(**{name: value})
        if device != "cpu" or backend != "auto" or shard_across_gpus:
            index.to(device, backend=backend, shard_across_gpus=shard_across_gpus)
        return index
