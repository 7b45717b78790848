"""The one resumable gallery cache: image folder / list file / ``datasets`` dataset / benchmark images -> embedding
parts on disk. ``diffusers-cir index build`` and ``diffusers-cir evaluate`` both embed their galleries here.

``encode_gallery`` embeds a gallery with any gallery encoder (the gallery side of the pipeline contract: a CIR
pipeline, :class:`~diffusers_cir.retrieval.encoders.CLIPVisionEncoder`, the model-free ``IdHashEncoder``) in parts
of ``part_size`` images. Each finished part is written atomically
(``parts/embeddings-00007.npy`` + ``parts/items-00007.jsonl``), so an interrupted run resumes where it stopped,
and parts are split across processes when launched with ``accelerate launch`` (one GPU per process). The
folder is then turned into an index by ``build_index_from_embedding_files``, which streams the parts and so
works for galleries larger than memory.

Layout of an embeddings folder::

    gallery.json                  model, width, item count, part size, a digest of the item list, status
    parts/embeddings-00000.npy    float32 [n, D], the encoder's raw (unnormalised) embeddings
    parts/items-00000.jsonl       one {"id": ..., "path": ...} per embedded row (+ "crop_box" for a cropped image)
    parts/skipped-00000.jsonl     images that could not be read (only with skip_unreadable=True)
    parts/checksums-00000.json    size and content digest of the part's files (``diffusers_cir.utils.checksums``)

A part is done when its checksums are written (after its files). Finished parts are verified against them when a run
resumes and when they are read, so a part that changed on disk is refused by name instead of being indexed.
Folders written before checksums existed keep working (their parts are read unverified, with a warning). One
process at a time writes a folder (``diffusers_cir.utils.locks``).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checks import check_positive_int
from ..utils.checksums import ChecksumError, verify_manifest, write_manifest
from ..utils.locks import folder_lock
from .encoders import query_fingerprint
from .images import load_image

GALLERY_FORMAT = "diffusers-cir-gallery-embeddings"
GALLERY_FORMAT_VERSION = 1
GALLERY_MANIFEST = "gallery.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class GalleryItem:
    """One gallery image: its id, either a file path or a row of a ``datasets`` dataset, and an optional crop
    ``(x, y, width, height)`` in pixels (a GeneCIS attribute task embeds one object of a Visual Genome image)."""

    id: Any
    path: str | None = None
    row: int | None = None
    crop_box: tuple[int, int, int, int] | None = None

    def metadata(self) -> dict:
        where = {"path": self.path} if self.path is not None else {"row": self.row}
        return where if self.crop_box is None else {**where, "crop_box": list(self.crop_box)}


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
    if isinstance(source, Sequence) and all(isinstance(item, GalleryItem) for item in source):
        return list(source)
    raise ValueError(
        "`source` must be an image folder, a list file, a list of image paths or of GalleryItem, or a "
        f"datasets.Dataset; got {type(source).__name__}."
    )


def items_digest(items: Sequence[GalleryItem]) -> str:
    digest = hashlib.sha256()
    for item in items:
        crop = "" if item.crop_box is None else "\t" + ",".join(map(str, item.crop_box))
        digest.update(f"{item.id}\t{item.path}\t{item.row}{crop}\n".encode())
    return digest.hexdigest()


def read_item(item: GalleryItem, dataset=None, image_column: str = "image"):
    """The image of ``item`` read by :func:`~diffusers_cir.load_image` (upright, 8-bit RGB), cropped to its box."""
    image = load_image(item.path if item.path is not None else dataset[item.row][image_column])
    if item.crop_box is not None:
        x, y, width, height = item.crop_box
        image = image.crop((x, y, x + width, y + height))
    return image


class _ImageLoadingDataset(torch.utils.data.Dataset):
    """Reads images in DataLoader workers (their ids, for an encoder that reads no pixels); a failure is returned
    (not raised) so the caller decides."""

    def __init__(self, items: Sequence[GalleryItem], dataset=None, image_column: str = "image", pixels: bool = True):
        self.items, self.dataset, self.image_column, self.pixels = items, dataset, image_column, pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int):
        item = self.items[position]
        if not self.pixels:
            return position, item.id, None
        try:
            return position, read_item(item, self.dataset, self.image_column), None
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


def _checksums_name(part: int) -> str:
    return f"checksums-{part:05d}.json"


def _part_done(directory: Path, part: int, checksums: bool) -> bool:
    """The part's embeddings are written (and, in a folder with part checksums, their checksums after them)."""
    embedding_path = _part_paths(directory, part)[0]
    return embedding_path.exists() and (not checksums or (embedding_path.parent / _checksums_name(part)).exists())


def _verify_part(directory: Path, part: int) -> None:
    """Check a part against its checksums (a part of an earlier diffusers-cir, which has none, is not checked)."""
    embedding_path = _part_paths(directory, part)[0]
    if not (embedding_path.parent / _checksums_name(part)).exists():
        return
    try:
        verify_manifest(embedding_path.parent, _checksums_name(part))
    except ChecksumError as error:
        raise ChecksumError(
            f"{error} Embed part {part} again: delete {embedding_path} and run the same command (or start over with "
            "resume=False / --no-resume).",
            error.path,
        ) from None


def _read_gallery_manifest(directory: Path) -> dict:
    path = directory / GALLERY_MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} cannot be read as a gallery manifest ({error}): delete {directory} to start over.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != GALLERY_FORMAT:
        raise ValueError(f"{path} is not a {GALLERY_FORMAT} manifest.")
    return manifest


def _write_atomically(path: Path, write) -> None:
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    os.replace(temporary, path)


def _unique_ids(items: Sequence[GalleryItem]) -> None:
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        seen, duplicates = set(), []
        for item_id in ids:
            if item_id in seen:
                duplicates.append(item_id)
            seen.add(item_id)
        raise ValueError(f"Gallery ids must be unique; duplicated: {duplicates[:5]}.")


def encode_gallery(
    encoder: Any,
    source: Any,
    output_dir: str | os.PathLike,
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
    description: str = "Embedding gallery",
    verify_checksums: bool = True,
) -> "GalleryEmbeddings":
    """Embed every image of a gallery into ``output_dir`` (resumable; parts split across accelerate processes).

    Args:
        encoder: a gallery encoder (``encode_image``, ``fingerprint``, ``embedding_dim``): a CIR pipeline, a
            :class:`~diffusers_cir.retrieval.encoders.CLIPVisionEncoder`, ... (see :mod:`.encoders`).
        source: an image folder, a list file (``PATH`` or ``ID<TAB>PATH`` per line), a list of paths or of
            :class:`GalleryItem`, or a map-style ``datasets.Dataset`` (images in ``image_column``, ids in
            ``id_column`` or row numbers).
        output_dir: the embeddings folder (see the module docstring).
        model_name: recorded in the manifest and later in the index (e.g. the model folder or Hub id).
        batch_size: images per encoder call.
        part_size: images per resumable part.
        num_workers: DataLoader workers decoding images.
        resume: keep finished parts of an earlier run of the same gallery and model (``False`` starts over).
        skip_unreadable: record unreadable images in ``parts/skipped-*.jsonl`` and go on, instead of failing.
        accelerator: an ``accelerate.Accelerator``; each process embeds its share of the parts on its device.
        description: the progress bar's label.
        verify_checksums: check the parts an earlier run finished against their checksums before keeping them.

    Another run writing into ``output_dir`` at the same time is refused
    (:class:`~diffusers_cir.utils.locks.FolderLockedError`).

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> from diffusers_cir.evaluation import IdHashEncoder
        >>> folder = tempfile.mkdtemp()
        >>> for i in range(3):
        ...     Image.new("RGB", (8, 8), (80 * i, 0, 0)).save(f"{folder}/{i}.png")
        >>> gallery = encode_gallery(IdHashEncoder(4), folder, tempfile.mkdtemp(), show_progress=False)
        >>> gallery.num_items, gallery.embedding_dim
        (3, 4)
    """
    batch_size = check_positive_int(batch_size, "batch_size")
    part_size = check_positive_int(part_size, "part_size")
    output_dir = Path(output_dir)
    dataset = source if hasattr(source, "column_names") else None
    if dataset is not None and image_column not in dataset.column_names:
        raise ValueError(f"`image_column` {image_column!r} is not a column of the dataset ({dataset.column_names}).")
    if dataset is not None:
        dataset = _undecoded(dataset, image_column)
    items = resolve_source(source, id_column=id_column)
    _unique_ids(items)

    process_index = accelerator.process_index if accelerator is not None else 0
    num_processes = accelerator.num_processes if accelerator is not None else 1
    is_main = process_index == 0
    if accelerator is not None:
        encoder = encoder.to(accelerator.device)
    ranges = part_ranges(len(items), part_size)
    manifest = {
        "format": GALLERY_FORMAT,
        "format_version": GALLERY_FORMAT_VERSION,
        "model": {"name": model_name, "fingerprint": encoder.fingerprint},
        "num_items": len(items),
        "part_size": part_size,
        "num_parts": len(ranges),
        "items_digest": items_digest(items),
        "source": str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__,
        "status": "in_progress",
        "checksums": True,
    }
    hint = "wait for it to finish, or write the embeddings to another folder"
    with folder_lock(output_dir, hint=hint) if is_main else nullcontext():
        if is_main:
            _prepare_output(output_dir, manifest, resume, encoder)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        _encode_parts(encoder, dataset, items, ranges, output_dir, image_column, batch_size, num_workers, skip_unreadable,
                      show_progress, description, verify_checksums, process_index, num_processes)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        if is_main:
            _finish(output_dir, _read_gallery_manifest(output_dir), len(ranges))
        if accelerator is not None:
            accelerator.wait_for_everyone()
    return GalleryEmbeddings(output_dir, verify_checksums=verify_checksums)


def _encode_parts(encoder, dataset, items, ranges, output_dir, image_column, batch_size, num_workers, skip_unreadable,
                  show_progress, description, verify_checksums, process_index, num_processes) -> None:
    """Embed this process' parts that are not done; verify the done ones (resume)."""
    checksums = bool(_read_gallery_manifest(output_dir).get("checksums"))
    is_main = process_index == 0
    my_parts = parts_for_process(len(ranges), process_index, num_processes)
    pending = [part for part in my_parts if not _part_done(output_dir, part, checksums)]
    if verify_checksums:
        for part in my_parts:
            if part not in pending:
                _verify_part(output_dir, part)
    progress = tqdm(
        total=sum(ranges[p][1] - ranges[p][0] for p in my_parts),
        initial=sum(ranges[p][1] - ranges[p][0] for p in my_parts if p not in pending),
        desc=description + (f" [process {process_index}]" if num_processes > 1 else ""),
        unit="img",
        disable=not show_progress or not is_main,
    )
    pixels = getattr(encoder, "reads_pixels", True)
    loader_dataset = _ImageLoadingDataset(items, dataset=dataset, image_column=image_column, pixels=pixels)
    for part in pending:
        _encode_part(encoder, loader_dataset, items, part, ranges[part], output_dir, batch_size, num_workers,
                     skip_unreadable, progress)
    progress.close()


def _finish(output_dir: Path, manifest: dict, num_parts: int) -> None:
    """Mark the folder complete once every part is there."""
    checksums = bool(manifest.get("checksums"))
    missing = [part for part in range(num_parts) if not _part_done(output_dir, part, checksums)]
    if missing:
        raise RuntimeError(f"Parts {missing[:10]} of {output_dir} were not written; run again to resume.")
    widths = {_part_shape(output_dir, p)[1] for p in range(num_parts)} - {0}
    skipped = sum(_count_lines(_part_paths(output_dir, p)[2]) for p in range(num_parts))
    manifest.update(status="complete", num_skipped=skipped, embedding_dim=widths.pop() if widths else 0)
    if skipped:
        warnings.warn(f"{skipped} unreadable images were skipped; see {output_dir}/parts/skipped-*.jsonl.")
    _write_atomically(output_dir / GALLERY_MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=2)))


def _prepare_output(output_dir: Path, manifest: dict, resume: bool, encoder) -> None:
    manifest_path = output_dir / GALLERY_MANIFEST
    if manifest_path.exists():
        previous = _read_gallery_manifest(output_dir) if resume else {}
        recorded = previous.get("model", {}).get("fingerprint")
        same = all(previous.get(key) == manifest[key] for key in ("items_digest", "part_size")) and (
            query_fingerprint(encoder, recorded) == recorded
        )
        if resume and not same:
            raise ValueError(
                f"{output_dir} holds embeddings of a different gallery, part size or model. Use another "
                "`output_dir`, or pass resume=False (--no-resume) to delete them and start over."
            )
        if not resume:
            for path in (output_dir / "parts").glob("*"):
                path.unlink()
        elif not previous.get("checksums") and any((output_dir / "parts").glob("embeddings-*.npy")):
            # Parts of an earlier diffusers-cir have no checksums: kept unchecked (parts embedded now get checksums).
            manifest["checksums"] = False
            warnings.warn(
                f"{output_dir} holds parts embedded by an earlier diffusers-cir, without checksums: they are kept "
                "unverified. Start over with resume=False (--no-resume) to have every part checked."
            )
    (output_dir / "parts").mkdir(parents=True, exist_ok=True)
    for leftover in (output_dir / "parts").glob("*.tmp"):
        leftover.unlink()  # a part interrupted mid-write is redone
    _write_atomically(manifest_path, lambda p: p.write_text(json.dumps(manifest, indent=2)))


@torch.no_grad()
def _encode_part(encoder, loader_dataset, items, part, bounds, output_dir, batch_size, num_workers, skip, progress):
    start, end = bounds
    embedding_path, items_path, skipped_path = _part_paths(output_dir, part)
    # Checksums left by an interrupted earlier attempt would vouch for the files this one is about to replace.
    (embedding_path.parent / _checksums_name(part)).unlink(missing_ok=True)
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
                        "Fix or remove it, or skip unreadable images (skip_unreadable=True; index build: "
                        "--skip-unreadable) to record them and go on."
                    )
                skipped.append({"id": item.id, **item.metadata(), "error": error})
                continue
            images.append(image)
            kept.append(items[position])
        if images:
            embeds = encoder.encode_image(images, batch_size=len(images))
            embeddings.append(np.asarray(embeds.detach().float().cpu(), dtype=np.float32))
        progress.update(len(batch))
    skipped_path.unlink(missing_ok=True)
    if skipped:
        _write_atomically(skipped_path, lambda p: p.write_text("".join(json.dumps(s) + "\n" for s in skipped)))
    _write_atomically(
        items_path,
        lambda p: p.write_text("".join(json.dumps({"id": item.id, **item.metadata()}) + "\n" for item in kept)),
    )
    array = np.concatenate(embeddings) if embeddings else np.zeros((0, encoder.embedding_dim), dtype=np.float32)
    assert array.ndim == 2 and array.shape[0] == len(kept), f"{array.shape} embeddings for {len(kept)} images"

    def write_embeddings(path: Path) -> None:
        with open(path, "wb") as handle:
            np.save(handle, array, allow_pickle=False)

    _write_atomically(embedding_path, write_embeddings)
    # Written last: their presence marks the part as done (also in a folder of an earlier version, resumed).
    names = [path.name for path in (embedding_path, items_path, skipped_path) if path.exists()]
    write_manifest(embedding_path.parent, files=names, name=_checksums_name(part))


def _part_shape(directory: Path, part: int) -> tuple[int, ...]:
    """Shape of a part's embeddings from its ``.npy`` header (a truncated or foreign file is named)."""
    path = _part_paths(directory, part)[0]
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(
            f"Embeddings part {path} cannot be read ({error}): delete it and run again to re-embed it."
        ) from None
    if array.ndim != 2 or array.dtype != np.float32:
        raise ValueError(
            f"Embeddings part {path} holds {array.dtype} {array.shape}, not float32 [n, D]: delete it and run again."
        )
    return array.shape


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, encoding="utf-8") as handle:
        return sum(1 for _ in handle)


class GalleryEmbeddings:
    """Read an embeddings folder written by ``encode_gallery`` (parts are memory-mapped; only ``embeddings_of`` reads
    them all).

    Opening checks that the parts agree with the manifest (count, width); each part is verified against its checksums
    the first time it is read (``verify_checksums=False`` skips the hashing, not the other checks).

    Example:
        >>> gallery = GalleryEmbeddings("out/embeddings")  # doctest: +SKIP
        >>> for embeddings, ids, metadata in gallery.iter_parts():  # doctest: +SKIP
        ...     print(embeddings.shape, ids[:2])
    """

    def __init__(self, directory: str | os.PathLike, verify_checksums: bool = True):
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"{self.directory} is a file, not a gallery embeddings folder (written by encode_gallery).")
        if not (self.directory / GALLERY_MANIFEST).exists():
            raise ValueError(f"{self.directory} is not a gallery embeddings folder (no {GALLERY_MANIFEST}).")
        self.manifest = _read_gallery_manifest(self.directory)
        if self.manifest.get("status") != "complete":
            raise ValueError(f"The gallery in {self.directory} is not completely embedded yet: run encode_gallery again.")
        self.verify_checksums = verify_checksums
        self._verified: set[int] = set()
        self._check_counts()

    def _check_counts(self) -> None:
        """The parts hold the rows and width the manifest records (a header read per part, no data)."""
        path = self.directory / GALLERY_MANIFEST
        try:
            num_parts, num_items = int(self.manifest["num_parts"]), int(self.manifest["num_items"])
            num_skipped, width = int(self.manifest.get("num_skipped", 0)), int(self.manifest["embedding_dim"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path} is invalid ({type(error).__name__}: {error}): embed the gallery again.") from None
        checksums = bool(self.manifest.get("checksums"))
        missing = [part for part in range(num_parts) if not _part_done(self.directory, part, checksums)]
        if missing:
            names = [str(_part_paths(self.directory, part)[0]) for part in missing[:3]]
            raise ValueError(
                f"{path} lists {num_parts} parts but part(s) {missing[:10]} are missing or have no checksums "
                f"({', '.join(names)}): run encode_gallery (index build) again to embed them."
            )
        if not checksums and num_parts:
            warnings.warn(f"{self.directory} was embedded by an earlier diffusers-cir: its parts have no checksums.")
        shapes = [_part_shape(self.directory, part) for part in range(num_parts)]
        rows = sum(shape[0] for shape in shapes)
        if rows != num_items - num_skipped:
            raise ValueError(
                f"{path} records {num_items} images ({num_skipped} skipped) but its parts hold {rows} embeddings: "
                "the folder is damaged. Embed the gallery again (resume=False / --no-resume)."
            )
        wrong = next((part for part, shape in enumerate(shapes) if shape[0] and shape[1] != width), None)
        if wrong is not None:
            raise ValueError(
                f"{_part_paths(self.directory, wrong)[0]} holds {shapes[wrong][1]}-wide embeddings; {path} records "
                f"{width}. Embed the gallery again (resume=False / --no-resume)."
            )

    def _checked(self, part: int) -> None:
        if self.verify_checksums and part not in self._verified:
            _verify_part(self.directory, part)
        self._verified.add(part)

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
        self._checked(part)
        embedding_path, items_path, _ = _part_paths(self.directory, part)
        embeddings = np.load(embedding_path, mmap_mode="r", allow_pickle=False)
        try:
            records = [json.loads(line) for line in items_path.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{items_path} cannot be read ({error}): delete {embedding_path} and run again.") from None
        if len(records) != embeddings.shape[0]:
            raise ValueError(
                f"{items_path} lists {len(records)} items for {embeddings.shape[0]} embeddings: delete {embedding_path} "
                "and run again to re-embed the part."
            )
        if not all(isinstance(record, dict) and "id" in record for record in records):
            raise ValueError(
                f"{items_path} has a line that is not an {{'id': ...}} record: delete {embedding_path} and run again."
            )
        ids = [record.pop("id") for record in records]
        return embeddings, ids, records

    def embeddings_of(self, ids: Sequence) -> np.ndarray:
        """``[len(ids), D]`` float32 embeddings of the given ids, in their order (every part is read)."""
        rows, arrays = {}, []
        for embeddings, part_ids, _ in self.iter_parts():
            rows.update((item_id, (len(arrays), row)) for row, item_id in enumerate(part_ids))
            arrays.append(embeddings)
        missing = [item_id for item_id in ids if item_id not in rows]
        if missing:
            raise ValueError(f"{self.directory} holds no embedding of {missing[:5]} (skipped as unreadable?).")
        out = np.empty((len(ids), self.embedding_dim), dtype=np.float32)
        for position, item_id in enumerate(ids):
            part, row = rows[item_id]
            out[position] = arrays[part][row]
        return out

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
        sizes = [_part_shape(self.directory, p)[0] for p in range(self.num_parts)]
        total = sum(sizes)
        count = min(count, total)
        chosen = np.sort(np.random.default_rng(seed).choice(total, count, replace=False))
        rows, offset = [], 0
        for part, size in enumerate(sizes):
            local = chosen[(chosen >= offset) & (chosen < offset + size)] - offset
            if len(local):
                self._checked(part)
                embeddings = np.load(_part_paths(self.directory, part)[0], mmap_mode="r", allow_pickle=False)
                rows.append(np.asarray(embeddings[local]))
            offset += size
        return np.concatenate(rows) if rows else np.zeros((0, self.embedding_dim), dtype=np.float32)
