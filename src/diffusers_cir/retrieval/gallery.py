"""Gallery encoding: image folder / list file / ``datasets`` dataset -> embedding parts on disk.

``encode_gallery`` embeds a gallery in parts of ``part_size`` images. Each finished part is written atomically
(``parts/embeddings-00007.npy`` + ``parts/items-00007.jsonl``), so an interrupted run resumes where it stopped,
and parts are split across processes when launched with ``accelerate launch`` (one GPU per process). The
folder is then turned into an index by ``build_index_from_embedding_files``, which streams the parts and so
works for galleries larger than memory.

Layout of an embeddings folder::

    gallery.json                  model, width, item count, part size, a digest of the item list, status
    parts/embeddings-00000.npy    float32 [n, D], the encoder's raw (unnormalised) embeddings
    parts/items-00000.jsonl       one {"id": ..., "path": ...} per embedded row
    parts/skipped-00000.jsonl     images that could not be read (only with skip_unreadable=True)
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .encoders import as_image_embedder, embeddings_to_numpy, image_encoder_fingerprint
from .images import load_image

GALLERY_FORMAT = "diffusers-cir-gallery-embeddings"
GALLERY_FORMAT_VERSION = 1
GALLERY_MANIFEST = "gallery.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class GalleryItem:
    """One gallery image: its id, and either a file path or a row of a ``datasets`` dataset."""

    id: Any
    path: str | None = None
    row: int | None = None

    def metadata(self) -> dict:
        return {"path": self.path} if self.path is not None else {"row": self.row}


def list_image_folder(folder: str | os.PathLike, recursive: bool = True) -> list[GalleryItem]:
    """Images under ``folder`` (sorted); the id of each is its path relative to ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"Image folder {folder} does not exist.")
    pattern = "**/*" if recursive else "*"
    paths = sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ValueError(f"Image folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    return [GalleryItem(id=p.relative_to(folder).as_posix(), path=str(p.resolve())) for p in paths]


def read_image_list(list_file: str | os.PathLike) -> list[GalleryItem]:
    """Read a list file: one image per line, ``PATH`` or ``ID<TAB>PATH``; relative paths are relative to the
    list file's folder. Blank lines and lines starting with ``#`` are ignored."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise ValueError(f"Image list file {list_file} does not exist.")
    items = []
    # utf-8-sig: a byte-order mark (Windows editors) would otherwise start the first id or path.
    for line_number, line in enumerate(list_file.read_text(encoding="utf-8-sig").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        item_id, _, path = line.partition("\t") if "\t" in line else (line, "", line)
        if not path:
            raise ValueError(f"{list_file}:{line_number}: expected 'PATH' or 'ID<TAB>PATH', got {line!r}.")
        resolved = Path(path) if Path(path).is_absolute() else list_file.parent / path
        items.append(GalleryItem(id=item_id, path=str(resolved.resolve())))
    if not items:
        raise ValueError(f"Image list file {list_file} lists no images.")
    return items


def dataset_items(dataset, id_column: str | None = None) -> list[GalleryItem]:
    """Items of a map-style ``datasets.Dataset``; ids from ``id_column`` (default: the row number)."""
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "column_names"):
        raise ValueError(
            "`source` must be a map-style datasets.Dataset (a streaming IterableDataset cannot be resumed by row); "
            f"got {type(dataset).__name__}."
        )
    if id_column is not None:
        if id_column not in dataset.column_names:
            raise ValueError(f"`id_column` {id_column!r} is not a column of the dataset ({dataset.column_names}).")
        ids = dataset[id_column]
    else:
        ids = range(len(dataset))
    return [GalleryItem(id=item_id, row=row) for row, item_id in enumerate(ids)]


def resolve_source(source: Any, id_column: str | None = None) -> list[GalleryItem]:
    """Turn a folder, a list file, a sequence of paths or a ``datasets.Dataset`` into gallery items."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            return list_image_folder(path)
        if path.is_file():
            return read_image_list(path)
        raise ValueError(f"`source` {str(source)!r} is neither an image folder nor a list file.")
    if hasattr(source, "column_names"):
        return dataset_items(source, id_column=id_column)
    if isinstance(source, Sequence) and all(isinstance(p, (str, os.PathLike)) for p in source):
        return [GalleryItem(id=str(p), path=str(Path(p).resolve())) for p in source]
    raise ValueError(
        "`source` must be an image folder, a list file, a list of image paths or a datasets.Dataset; got "
        f"{type(source).__name__}."
    )


def items_digest(items: Sequence[GalleryItem]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item.id}\t{item.path}\t{item.row}\n".encode())
    return digest.hexdigest()


class _ImageLoadingDataset(torch.utils.data.Dataset):
    """Reads images with :func:`~diffusers_cir.load_image` in DataLoader workers; a failure is returned (not raised)
    so the caller decides."""

    def __init__(self, items: Sequence[GalleryItem], dataset=None, image_column: str = "image"):
        self.items, self.dataset, self.image_column = items, dataset, image_column

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int):
        item = self.items[position]
        try:
            source = item.path if item.path is not None else self.dataset[item.row][self.image_column]
            return position, load_image(source), None
        except Exception as error:  # noqa: BLE001 - reported with the item by the caller
            return position, None, f"{type(error).__name__}: {error}"


def _undecoded(dataset, image_column: str):
    """``dataset`` with its image column left encoded (``{"bytes", "path"}``), so that the workers decode each image
    once, through :func:`~diffusers_cir.load_image`, instead of ``datasets`` decoding it first."""
    import datasets

    feature = dataset.features.get(image_column)
    if isinstance(feature, datasets.Image) and feature.decode:
        return dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


def _collate(batch):
    return batch


def part_ranges(num_items: int, part_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + part_size, num_items)) for start in range(0, num_items, part_size)]


def parts_for_process(num_parts: int, process_index: int, num_processes: int) -> list[int]:
    """Parts handled by one process: round-robin, so every process gets a similar share of the gallery."""
    return list(range(process_index, num_parts, num_processes))


def _part_paths(directory: Path, part: int) -> tuple[Path, Path, Path]:
    parts = directory / "parts"
    return (
        parts / f"embeddings-{part:05d}.npy",
        parts / f"items-{part:05d}.jsonl",
        parts / f"skipped-{part:05d}.jsonl",
    )


def _write_atomically(path: Path, write) -> None:
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    os.replace(temporary, path)


def encode_gallery(
    encoder: Any,
    source: Any,
    output_dir: str | os.PathLike,
    image_processor=None,
    model_name: str | None = None,
    batch_size: int = 64,
    part_size: int = 4096,
    num_workers: int = 0,
    resume: bool = True,
    skip_unreadable: bool = False,
    image_column: str = "image",
    id_column: str | None = None,
    accelerator=None,
    show_progress: bool = True,
) -> "GalleryEmbeddings":
    """Embed every image of a gallery into ``output_dir`` (resumable; parts split across accelerate processes).

    Args:
        encoder: a CIR pipeline (``encode_image``), a ``CLIPVisionModelWithProjection`` (with
            ``image_processor``), or a callable ``list[PIL.Image] -> [B, D]``.
        source: an image folder, a list file (``PATH`` or ``ID<TAB>PATH`` per line), a list of paths, or a
            map-style ``datasets.Dataset`` (images in ``image_column``, ids in ``id_column`` or row numbers).
        output_dir: the embeddings folder (see the module docstring).
        model_name: recorded in the manifest and later in the index (e.g. the model folder or Hub id).
        batch_size: images per encoder call.
        part_size: images per resumable part.
        num_workers: DataLoader workers decoding images.
        resume: keep finished parts of an earlier run of the same gallery and model (``False`` starts over).
        skip_unreadable: record unreadable images in ``parts/skipped-*.jsonl`` and go on, instead of failing.
        accelerator: an ``accelerate.Accelerator``; each process embeds its share of the parts on its device.

    Example:
        >>> import numpy as np, tempfile
        >>> from PIL import Image
        >>> folder = tempfile.mkdtemp()
        >>> for i in range(3):
        ...     Image.new("RGB", (8, 8), (80 * i, 0, 0)).save(f"{folder}/{i}.png")
        >>> embed = lambda images: np.array([np.asarray(im, dtype="float32").mean((0, 1)) + 1 for im in images])
        >>> gallery = encode_gallery(embed, folder, tempfile.mkdtemp(), show_progress=False)
        >>> gallery.num_items, gallery.embedding_dim
        (3, 3)
    """
    output_dir = Path(output_dir)
    if batch_size < 1 or part_size < 1:
        raise ValueError(f"`batch_size` and `part_size` must be positive; got {batch_size} and {part_size}.")
    dataset = source if hasattr(source, "column_names") else None
    if dataset is not None and image_column not in dataset.column_names:
        raise ValueError(f"`image_column` {image_column!r} is not a column of the dataset ({dataset.column_names}).")
    if dataset is not None:
        dataset = _undecoded(dataset, image_column)
    items = resolve_source(source, id_column=id_column)
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        seen, duplicates = set(), []
        for item_id in ids:
            if item_id in seen:
                duplicates.append(item_id)
            seen.add(item_id)
        raise ValueError(f"Gallery ids must be unique; duplicated: {duplicates[:5]}.")

    process_index = accelerator.process_index if accelerator is not None else 0
    num_processes = accelerator.num_processes if accelerator is not None else 1
    is_main = process_index == 0
    device = accelerator.device if accelerator is not None else None
    embed = as_image_embedder(encoder, image_processor=image_processor, device=device)
    fingerprint = image_encoder_fingerprint(encoder)
    manifest = {
        "format": GALLERY_FORMAT,
        "format_version": GALLERY_FORMAT_VERSION,
        "model": {"name": model_name, "fingerprint": fingerprint},
        "num_items": len(items),
        "part_size": part_size,
        "num_parts": len(part_ranges(len(items), part_size)),
        "items_digest": items_digest(items),
        "source": str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__,
        "status": "in_progress",
    }
    manifest_path = output_dir / GALLERY_MANIFEST
    if is_main:
        _prepare_output(output_dir, manifest, resume)
    if accelerator is not None:
        accelerator.wait_for_everyone()

    ranges = part_ranges(len(items), part_size)
    my_parts = parts_for_process(len(ranges), process_index, num_processes)
    pending = [part for part in my_parts if not _part_paths(output_dir, part)[0].exists()]
    done_items = sum(ranges[p][1] - ranges[p][0] for p in my_parts if p not in pending)
    total_items = sum(ranges[p][1] - ranges[p][0] for p in my_parts)
    progress = tqdm(
        total=total_items,
        initial=done_items,
        desc="Embedding gallery" + (f" [process {process_index}]" if num_processes > 1 else ""),
        unit="img",
        disable=not show_progress or not is_main,
    )
    loader_dataset = _ImageLoadingDataset(items, dataset=dataset, image_column=image_column)
    for part in pending:
        start, end = ranges[part]
        _encode_part(
            embed, loader_dataset, items, part, start, end, output_dir, batch_size, num_workers, skip_unreadable, progress
        )
    progress.close()

    if accelerator is not None:
        accelerator.wait_for_everyone()
    if is_main:
        missing = [part for part in range(len(ranges)) if not _part_paths(output_dir, part)[0].exists()]
        if missing:
            raise RuntimeError(f"Parts {missing[:10]} of {output_dir} were not written; run again to resume.")
        embedding_dims = {np.load(_part_paths(output_dir, p)[0], mmap_mode="r").shape[1] for p in range(len(ranges))}
        skipped = sum(_count_lines(_part_paths(output_dir, p)[2]) for p in range(len(ranges)))
        manifest.update(status="complete", num_skipped=skipped, embedding_dim=embedding_dims.pop())
        if skipped:
            warnings.warn(f"{skipped} unreadable images were skipped; see {output_dir}/parts/skipped-*.jsonl.")
        _write_atomically(manifest_path, lambda p: p.write_text(json.dumps(manifest, indent=2)))
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return GalleryEmbeddings(output_dir)


def _prepare_output(output_dir: Path, manifest: dict, resume: bool) -> None:
    manifest_path = output_dir / GALLERY_MANIFEST
    if manifest_path.exists():
        previous = json.loads(manifest_path.read_text())
        same = all(previous.get(key) == manifest[key] for key in ("items_digest", "part_size")) and (
            previous.get("model", {}).get("fingerprint") == manifest["model"]["fingerprint"]
        )
        if resume and not same:
            raise ValueError(
                f"{output_dir} holds embeddings of a different gallery, part size or model. Use another "
                "`output_dir`, or pass resume=False (--no-resume) to delete them and start over."
            )
        if not resume:
            for path in (output_dir / "parts").glob("*"):
                path.unlink()
    (output_dir / "parts").mkdir(parents=True, exist_ok=True)
    for leftover in (output_dir / "parts").glob("*.tmp"):
        leftover.unlink()  # a part interrupted mid-write is redone
    _write_atomically(manifest_path, lambda p: p.write_text(json.dumps(manifest, indent=2)))


def _encode_part(embed, loader_dataset, items, part, start, end, output_dir, batch_size, num_workers, skip, progress):
    subset = torch.utils.data.Subset(loader_dataset, range(start, end))
    loader = torch.utils.data.DataLoader(
        subset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate, shuffle=False
    )
    embeddings, kept, skipped = [], [], []
    for batch in loader:
        images = []
        for position, image, error in batch:
            if error is not None:
                item = items[position]
                if not skip:
                    raise ValueError(
                        f"Could not read gallery image {item.path or f'row {item.row}'} (id {item.id!r}): {error}. "
                        "Fix or remove it, or pass skip_unreadable=True (--skip-unreadable) to record and skip it."
                    )
                skipped.append({"id": item.id, **item.metadata(), "error": error})
                continue
            images.append(image)
            kept.append(items[position])
        if images:
            embeddings.append(embeddings_to_numpy(embed(images)))
        progress.update(len(batch))
    embedding_path, items_path, skipped_path = _part_paths(output_dir, part)
    if skipped:
        _write_atomically(skipped_path, lambda p: p.write_text("".join(json.dumps(s) + "\n" for s in skipped)))
    _write_atomically(
        items_path,
        lambda p: p.write_text("".join(json.dumps({"id": item.id, **item.metadata()}) + "\n" for item in kept)),
    )
    array = np.concatenate(embeddings) if embeddings else np.zeros((0, 0), dtype=np.float32)
    if array.ndim != 2 or array.shape[0] != len(kept):
        raise RuntimeError(f"The encoder returned {array.shape} embeddings for {len(kept)} images.")

    def write_embeddings(path: Path) -> None:
        with open(path, "wb") as handle:
            np.save(handle, array.astype(np.float32), allow_pickle=False)

    _write_atomically(embedding_path, write_embeddings)  # written last: its presence marks the part as done


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, encoding="utf-8") as handle:
        return sum(1 for _ in handle)


class GalleryEmbeddings:
    """Read an embeddings folder written by ``encode_gallery`` (parts are memory-mapped, never all loaded).

    Example:
        >>> gallery = GalleryEmbeddings("out/embeddings")  # doctest: +SKIP
        >>> for embeddings, ids, metadata in gallery.iter_parts():  # doctest: +SKIP
        ...     print(embeddings.shape, ids[:2])
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        path = self.directory / GALLERY_MANIFEST
        if not path.exists():
            raise ValueError(f"{self.directory} is not a gallery embeddings folder (no {GALLERY_MANIFEST}).")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != GALLERY_FORMAT:
            raise ValueError(f"{path} is not a {GALLERY_FORMAT} manifest.")
        if self.manifest.get("status") != "complete":
            raise ValueError(f"The gallery in {self.directory} is not completely embedded yet: run encode_gallery again.")

    @property
    def num_items(self) -> int:
        """Embedded images (items skipped as unreadable are not counted)."""
        return self.manifest["num_items"] - self.manifest.get("num_skipped", 0)

    @property
    def embedding_dim(self) -> int:
        return int(self.manifest["embedding_dim"])

    @property
    def num_parts(self) -> int:
        return int(self.manifest["num_parts"])

    @property
    def model(self) -> str | None:
        return self.manifest["model"].get("name")

    @property
    def model_fingerprint(self) -> str | None:
        return self.manifest["model"].get("fingerprint")

    def part(self, part: int) -> tuple[np.ndarray, list, list[dict]]:
        embedding_path, items_path, _ = _part_paths(self.directory, part)
        embeddings = np.load(embedding_path, mmap_mode="r")
        records = [json.loads(line) for line in items_path.read_text(encoding="utf-8").splitlines()]
        if len(records) != embeddings.shape[0]:
            raise ValueError(f"{items_path} lists {len(records)} items for {embeddings.shape[0]} embeddings.")
        ids = [record.pop("id") for record in records]
        return embeddings, ids, records

    def iter_parts(self) -> Iterator[tuple[np.ndarray, list, list[dict]]]:
        for part in range(self.num_parts):
            yield self.part(part)

    def skipped(self) -> list[dict]:
        records = []
        for part in range(self.num_parts):
            path = _part_paths(self.directory, part)[2]
            if path.exists():
                records.extend(json.loads(line) for line in path.read_text(encoding="utf-8").splitlines())
        return records

    def sample(self, count: int, seed: int = 0) -> np.ndarray:
        """A uniform random sample of ``count`` embeddings (for training IVF / PQ), read part by part."""
        sizes = [np.load(_part_paths(self.directory, p)[0], mmap_mode="r").shape[0] for p in range(self.num_parts)]
        total = sum(sizes)
        count = min(count, total)
        chosen = np.sort(np.random.default_rng(seed).choice(total, count, replace=False))
        rows, offset = [], 0
        for part, size in enumerate(sizes):
            local = chosen[(chosen >= offset) & (chosen < offset + size)] - offset
            if len(local):
                rows.append(np.asarray(np.load(_part_paths(self.directory, part)[0], mmap_mode="r")[local]))
            offset += size
        return np.concatenate(rows) if rows else np.zeros((0, self.embedding_dim), dtype=np.float32)
