"""Image embeddings cached on disk by image id: encode a gallery once, resume after an interruption.

Layout: ``<directory>/<encoder fingerprint>/shard-00000.safetensors, ...``. Each shard holds an ``embeds``
tensor and, in its metadata, the JSON list of the ids of its rows (ints stay ints). Shards are written
atomically (temporary file + rename), so an interrupted run loses at most the shard being filled.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..data.benchmarks.base import ImageRef
from .encoders import CIREncoder

__all__ = ["EmbeddingCache"]


def _folder_name(fingerprint: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", fingerprint)[:120] or "encoder"


class EmbeddingCache:
    """Embeddings of one encoder keyed by image id, persisted in ``directory`` (``None``: memory only).

    Example:

    ```py
    >>> import tempfile
    >>> from diffusers_cir.evaluation import IdHashEncoder
    >>> encoder, refs = IdHashEncoder(8), [ImageRef(i, Path(f"{i}.jpg")) for i in range(5)]
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     first = EmbeddingCache(folder, encoder.fingerprint).get_or_encode(refs, encoder, progress=False)
    ...     again = EmbeddingCache(folder, encoder.fingerprint)  # a new run finds them on disk
    ...     len(again), bool(torch.equal(again.get_or_encode(refs, encoder, progress=False), first))
    (5, True)

    ```
    """

    def __init__(self, directory: str | os.PathLike | None, fingerprint: str):
        self.fingerprint = fingerprint
        self.directory = None if directory is None else Path(directory) / _folder_name(fingerprint)
        self._rows: dict[Any, torch.Tensor] = {}
        self._num_shards = 0
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            info = self.directory / "cache_info.json"
            if info.is_file():
                recorded = json.loads(info.read_text()).get("fingerprint")
                if recorded != fingerprint:
                    raise ValueError(f"{self.directory} caches embeddings of {recorded!r}, not {fingerprint!r}.")
            else:
                info.write_text(json.dumps({"fingerprint": fingerprint}))
            for shard in sorted(self.directory.glob("shard-*.safetensors")):
                self._load_shard(shard)

    def _load_shard(self, path: Path) -> None:
        try:
            embeds = load_file(path)["embeds"]
            with safe_open(path, framework="pt") as handle:
                ids = json.loads(handle.metadata()["ids"])
        except Exception as error:  # a truncated or foreign file: say which, do not guess
            raise ValueError(f"Cannot read cached embeddings {path} ({error}); delete the file to re-encode it.") from None
        if len(ids) != embeds.shape[0]:
            raise ValueError(f"{path} lists {len(ids)} ids for {embeds.shape[0]} embeddings; delete it to re-encode.")
        for image_id, row in zip(ids, embeds):
            self._rows[image_id] = row
        self._num_shards += 1

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, image_id: Any) -> bool:
        return image_id in self._rows

    def _write_shard(self, ids: list, embeds: torch.Tensor) -> None:
        if self.directory is None or not ids:
            return
        path = self.directory / f"shard-{self._num_shards:05d}.safetensors"
        temporary = path.with_suffix(".tmp")
        save_file({"embeds": embeds.contiguous()}, str(temporary), metadata={"ids": json.dumps(ids)})
        os.replace(temporary, path)
        self._num_shards += 1

    def get_or_encode(
        self,
        images: Sequence[ImageRef],
        encoder: CIREncoder,
        *,
        batch_size: int = 256,
        shard_size: int = 8192,
        progress: bool = True,
        description: str = "Encoding images",
    ) -> torch.Tensor:
        """``[N, D]`` float32 embeddings of ``images`` in order, encoding (and saving) only the missing ones."""
        if encoder.fingerprint != self.fingerprint:
            raise ValueError(f"This cache holds {self.fingerprint!r} embeddings; the encoder is {encoder.fingerprint!r}.")
        missing, seen = [], set()
        for ref in images:
            if ref.image_id not in self._rows and ref.image_id not in seen:
                seen.add(ref.image_id)
                missing.append(ref)
        num_unique = len({ref.image_id for ref in images})
        bar = tqdm(total=num_unique, initial=num_unique - len(missing), desc=description, unit="img", disable=not progress)
        pending_ids: list = []
        pending: list[torch.Tensor] = []
        for start in range(0, len(missing), batch_size):
            batch = missing[start : start + batch_size]
            embeds = encoder.encode_images(batch).float().cpu()
            if embeds.ndim != 2 or embeds.shape[0] != len(batch):
                raise ValueError(f"encode_images returned shape {tuple(embeds.shape)} for {len(batch)} images; expected [N, D].")
            for ref, row in zip(batch, embeds):
                self._rows[ref.image_id] = row
            pending_ids += [ref.image_id for ref in batch]
            pending.append(embeds)
            if len(pending_ids) >= shard_size:
                self._write_shard(pending_ids, torch.cat(pending))
                pending_ids, pending = [], []
            bar.update(len(batch))
        self._write_shard(pending_ids, torch.cat(pending) if pending else torch.empty(0))
        bar.close()
        if not images:
            return torch.empty(0, 0)
        return torch.stack([self._rows[ref.image_id] for ref in images])
