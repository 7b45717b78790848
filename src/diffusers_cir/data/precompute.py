"""Precompute CLIP image embeddings of an ``images`` configuration into the ``embeddings`` configuration.

Each input shard ``images/{split}-i-of-n.parquet`` becomes ``embeddings/{split}-i-of-n.parquet`` with the
same rows in the same order (rows whose image does not decode are left out and reported). Shards are the
unit of work and of resumption: process ``rank`` of ``world_size`` takes shards ``rank, rank + world_size,
...``; a shard is written under a temporary name and renamed when complete, so re-running the same command
after a crash skips finished shards and redoes the interrupted one.

Two encoder backends, behind one small interface (:class:`ImageEmbedder`):

* ``transformers``: ``CLIPVisionModelWithProjection`` + ``CLIPImageProcessor`` from a folder or Hub id
  (what CompoDiff and LinCIR were trained with: ``openai/clip-vit-large-patch14``, 768-wide);
* ``open_clip``: ``open_clip.create_model_and_transforms(model, pretrained=...)``.

Either backend prepares pixels with CLIP's preprocessing (``image_preprocessing="clip"``: shortest-side resize and
centre crop) or with CLIP4Cir's target pad first (``"targetpad"``, :class:`~diffusers_cir.TargetPadImageProcessor`,
ratio 1.25 by default: the features CLIP4Cir's authors train their Combiner on). :func:`record_embeddings_card`
records which one in the card (``embeddings_image_preprocessing``, ``embeddings_target_ratio``), and
``examples/train_fusion.py`` saves a pipeline that preprocesses queries and gallery the same way.

Example:
    >>> from diffusers_cir.data.precompute import precompute_embeddings, transformers_embedder
    >>> embedder = transformers_embedder("openai/clip-vit-large-patch14", device="cuda")  # doctest: +SKIP
    >>> summary = precompute_embeddings("my_dataset", embedder)  # doctest: +SKIP
    >>> print(summary.format())  # doctest: +SKIP
    encoded 1200 rows (2400 images) in 2 shard(s) at 850.3 images/s; 0 shard(s) already done; 0 row(s) skipped
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..retrieval.images import load_image, pixel_values
from . import schema
from .shards import check_shard_set, shard_files

logger = logging.getLogger(__name__)


@dataclass
class ImageEmbedder:
    """Turns PIL images into embeddings: ``preprocess(list of PIL) -> [N, 3, H, W]``, ``encode(pixels) -> [N, D]``."""

    name: str
    preprocess: Callable[[list], torch.Tensor]
    encode: Callable[[torch.Tensor], torch.Tensor]
    embedding_dim: int
    device: torch.device
    # How ``preprocess`` prepares pixels ("clip" or "targetpad" with its ratio; None: not known), for the card.
    image_preprocessing: str | None = None
    target_ratio: float | None = None


EMBEDDINGS_PREPROCESSING_KEY = "embeddings_image_preprocessing"
EMBEDDINGS_TARGET_RATIO_KEY = "embeddings_target_ratio"


def transformers_embedder(
    model_name_or_path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, image_processor=None,
    image_preprocessing: str | None = None, target_ratio: float | None = None,
) -> ImageEmbedder:
    """A ``CLIPVisionModelWithProjection`` (its ``image_embeds``) with its ``CLIPImageProcessor`` (or
    ``image_processor``), made to do ``image_preprocessing`` (``"clip"`` or ``"targetpad"`` towards ``target_ratio``,
    default 1.25; ``None``: the processor as it is) by
    :func:`~diffusers_cir.retrieval.image_processing_targetpad.image_processor_for`."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    device = torch.device(device)
    model = CLIPVisionModelWithProjection.from_pretrained(model_name_or_path, torch_dtype=dtype).to(device).eval()
    if image_processor is None:
        try:
            image_processor = CLIPImageProcessor.from_pretrained(model_name_or_path)
        except OSError:  # a bare model folder: OpenAI CLIP's preprocessing at the model's resolution
            size = model.config.image_size
            image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    if image_preprocessing is not None:
        from ..retrieval.image_processing_targetpad import image_processor_for

        image_processor = image_processor_for(image_processor, image_preprocessing, target_ratio)

    @torch.no_grad()
    def encode(pixel_values: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=pixel_values.to(device, dtype)).image_embeds.float()

    return ImageEmbedder(
        str(model_name_or_path), _ProcessorPreprocess(image_processor), encode, model.config.projection_dim, device,
        *preprocessing_of(image_processor),
    )


def preprocessing_of(image_processor) -> tuple[str | None, float | None]:
    """``(name, target ratio)`` of what ``image_processor`` does: ``("targetpad", ratio)``, ``("clip", None)``, or
    ``(None, None)`` for a processor that does not resize and crop like CLIP."""
    from ..retrieval.image_processing_targetpad import TargetPadImageProcessor, resizes_and_crops_like_clip

    if isinstance(image_processor, TargetPadImageProcessor) and image_processor.target_ratio is not None:
        return "targetpad", float(image_processor.target_ratio)
    return ("clip", None) if resizes_and_crops_like_clip(image_processor) else (None, None)


def open_clip_embedder(
    model_name: str, pretrained: str | None = None, device: str | torch.device = "cpu", precision: str = "fp32",
    image_preprocessing: str | None = None, target_ratio: float | None = None,
) -> ImageEmbedder:
    """An ``open_clip`` model's ``encode_image`` with its evaluation transform (``image_preprocessing`` ``None`` or
    ``"clip"``), or with target pad before the same resize, crop and normalisation (``"targetpad"``, towards
    ``target_ratio``, default 1.25)."""
    import open_clip

    device = torch.device(device)
    model, _, transform = open_clip.create_model_and_transforms(
        model_name, pretrained=pretrained, device=device, precision=precision
    )
    model.eval()

    @torch.no_grad()
    def encode(pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(model.parameters()).dtype
        return model.encode_image(pixel_values.to(device, dtype)).float()

    name = f"open_clip:{model_name}" + (f":{pretrained}" if pretrained else "")
    if image_preprocessing in (None, "clip"):
        return ImageEmbedder(name, _TransformPreprocess(transform), encode, model.visual.output_dim, device, "clip")
    from ..models._open_clip import open_clip_image_processor
    from ..retrieval.image_processing_targetpad import image_processor_for

    # The pipelines train_fusion saves over open_clip towers preprocess with this processor (open_clip's transform
    # as a transformers one), so the gallery it encodes matches these features.
    image_processor = image_processor_for(open_clip_image_processor(model), image_preprocessing, target_ratio)
    return ImageEmbedder(name, _ProcessorPreprocess(image_processor), encode, model.visual.output_dim, device,
                         *preprocessing_of(image_processor))


# Preprocessing runs in DataLoader workers, so it is a picklable object rather than a closure.
class _ProcessorPreprocess:
    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, images: list) -> torch.Tensor:
        return pixel_values(self.image_processor, images)


class _TransformPreprocess:
    def __init__(self, transform):
        self.transform = transform

    def __call__(self, images: list) -> torch.Tensor:
        return torch.stack([self.transform(image) for image in images])


def blank_masked_pixels(pixel_values: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``pixel_values`` (normalised, ``[B, 3, H, W]``) with the pixels of ``masks`` (``[B, S, S]``, 1 = blank) set to
    0, the masks resized to the pixel grid with nearest interpolation: how CompoDiff's pipeline blanks a masked
    reference before encoding it, and how its masked objective blanks a target."""
    pixel_mask = torch.nn.functional.interpolate(masks[:, None].float(), size=pixel_values.shape[-2:], mode="nearest")
    return pixel_values * (1 - pixel_mask.to(pixel_values.dtype))


class _ShardRows(torch.utils.data.Dataset):
    """Rows of one shard, decoded and preprocessed in DataLoader workers (with a mask: also the blanked target)."""

    def __init__(self, table, preprocess):
        self.ids = table.column(schema.ID).to_pylist()
        self.references = table.column(schema.REFERENCE_IMAGE).to_pylist()
        self.targets = table.column(schema.TARGET_IMAGE).to_pylist()
        has_masks = schema.MASK in table.column_names
        self.masks = table.column(schema.MASK).to_pylist() if has_masks else [None] * len(self.ids)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        from .streaming import decode_mask

        try:
            images = [
                load_image(self.references[index], name=schema.REFERENCE_IMAGE),
                load_image(self.targets[index], name=schema.TARGET_IMAGE),
            ]
            pixels = self.preprocess(images)
            masked = None
            if self.masks[index] is not None:
                mask = torch.from_numpy(decode_mask(self.masks[index], 64))[None]
                masked = blank_masked_pixels(pixels[1:], mask)[0]
            return index, pixels, masked, None
        except Exception as error:  # reported, never fatal
            return index, None, None, f"{type(error).__name__}: {error}"


def embeddings_features_of(images_schema, embedding_dim: int):
    """The ``embeddings`` features for an ``images`` shard: the SynthTriplets columns, plus the optional ones the
    shard has (the mask, with the masked target's embedding; the keyword pair)."""
    from datasets import Features, Image, List, Value

    features = dict(schema.embeddings_features(embedding_dim))
    names = set(images_schema.names)
    if schema.MASK in names:
        features[schema.MASK] = Image()
        features[schema.MASKED_TARGET_IMAGE_EMBEDS] = List(Value("float32"), length=embedding_dim)
    for name in (schema.SOURCE_KEYWORD, schema.TARGET_KEYWORD):
        if name in names:
            features[name] = Value("string")
    return Features(features)


def _collate(items):
    return items


@dataclass
class PrecomputeSummary:
    """What :func:`precompute_embeddings` did on this rank (:meth:`combine` sums the ranks of a run)."""

    shards_done: list[str] = field(default_factory=list)
    shards_skipped: list[str] = field(default_factory=list)  # already complete (resume)
    num_rows: int = 0
    num_images: int = 0
    seconds: float = 0.0
    skipped_rows: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)

    @property
    def images_per_second(self) -> float:
        return self.num_images / self.seconds if self.seconds else 0.0

    @classmethod
    def combine(cls, summaries: list["PrecomputeSummary"]) -> "PrecomputeSummary":
        """One summary of a run from every rank's: counts and lists are summed; ``seconds`` is the longest rank's
        encoding time, since the ranks encode at the same time (so ``images_per_second`` is the run's throughput)."""
        combined = cls()
        for summary in summaries:
            combined.shards_done += summary.shards_done
            combined.shards_skipped += summary.shards_skipped
            combined.num_rows += summary.num_rows
            combined.num_images += summary.num_images
            combined.skipped_rows += summary.skipped_rows
            combined.seconds = max(combined.seconds, summary.seconds)
        return combined

    def format(self) -> str:
        return (
            f"encoded {self.num_rows} rows ({self.num_images} images) in {len(self.shards_done)} shard(s) at "
            f"{self.images_per_second:.1f} images/s; {len(self.shards_skipped)} shard(s) already done; "
            f"{len(self.skipped_rows)} row(s) skipped"
        )


def precompute_embeddings(
    input_folder: str,
    embedder: ImageEmbedder,
    output_folder: str | None = None,
    split: str = "train",
    batch_size: int = 64,
    num_workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
    normalize: bool = True,
    progress: bool = True,
) -> PrecomputeSummary:
    """Encode this rank's ``images`` shards of ``split`` into ``embeddings`` shards (resumable).

    Args:
        input_folder: dataset folder with ``images/{split}-*.parquet``.
        embedder: :func:`transformers_embedder` or :func:`open_clip_embedder` (or your own).
        output_folder: where ``embeddings/`` goes (default: ``input_folder``).
        batch_size: rows per encoder call (``2 * batch_size`` images: reference and target).
        num_workers: DataLoader workers decoding and preprocessing images.
        rank, world_size: this process's share of the shards (``accelerator.process_index`` / ``num_processes``).
        normalize: L2-normalise the embeddings (what retrieval and CompoDiff use).

    The card is not touched here (several ranks run this at once): call :func:`record_embeddings_card`
    once, on the main process, after every rank has finished.
    """
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    from .shards import ParquetShardWriter

    output_folder = output_folder or input_folder
    inputs = check_shard_set(shard_files(input_folder, schema.IMAGES_CONFIG, split))
    if not inputs:
        raise FileNotFoundError(
            f"No images shards in {input_folder}/images/{split}-*.parquet; write some with `diffusers-cir data write`."
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}.")
    directory = os.path.join(output_folder, schema.EMBEDDINGS_CONFIG)
    os.makedirs(directory, exist_ok=True)
    features = embeddings_features_of(pq.read_schema(inputs[0]), embedder.embedding_dim)
    carried = [name for name in features if name not in schema.EMBEDDINGS_COLUMNS + (schema.MASKED_TARGET_IMAGE_EMBEDS,)]
    summary = PrecomputeSummary()
    mine = inputs[rank::world_size]
    total_rows = sum(pq.ParquetFile(path).metadata.num_rows for path in mine)
    bar = tqdm(total=total_rows, desc=f"embedding {split} (rank {rank})", unit="row", disable=not progress)
    for path in mine:
        name = os.path.basename(path)
        final = os.path.join(directory, name)
        if os.path.exists(final):
            summary.shards_skipped.append(final)
            bar.update(pq.ParquetFile(path).metadata.num_rows)
            continue
        # One shard is held in memory (its image bytes): keep shards at a few thousand rows (`data reshard`).
        table = pq.read_table(path)
        rows = _ShardRows(table, embedder.preprocess)
        loader = torch.utils.data.DataLoader(
            rows, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate
        )
        texts = {c: table.column(c).to_pylist() for c in (schema.MODIFICATION_TEXT, schema.REFERENCE_CAPTION, schema.TARGET_CAPTION)}
        texts.update({c: table.column(c).to_pylist() for c in carried})  # the mask and keyword pair, as stored
        partial = os.path.join(directory, f".{name}.partial")
        started = time.perf_counter()
        shard_rows = 0
        # ParquetShardWriter names its output `{split}-00000-of-00001`; we want the input's name, so write one
        # shard into a private staging folder and move it.
        staging = os.path.join(directory, f".staging-{name}")
        with ParquetShardWriter(staging, "shard", "rows", features, rows_per_shard=max(1, len(rows)), overwrite=True) as writer:
            for batch in loader:
                good = [(i, pixels, masked) for i, pixels, masked, error in batch if error is None]
                for i, _, _, error in batch:
                    if error is not None:
                        summary.skipped_rows.append((rows.ids[i], error))
                        logger.warning("skipped row %r of %s: %s", rows.ids[i], name, error)
                if good:
                    columns = _embed_rows(embedder, good, normalize)
                    indices = [i for i, _, _ in good]
                    if schema.MASKED_TARGET_IMAGE_EMBEDS in features:
                        summary.num_images += sum(masked is not None for _, _, masked in good)
                    else:
                        columns.pop(schema.MASKED_TARGET_IMAGE_EMBEDS)
                    writer.add_batch({
                        schema.ID: [rows.ids[i] for i in indices], **columns,
                        **{c: [texts[c][i] for i in indices] for c in texts},
                    })
                    shard_rows += len(good)
                bar.update(len(batch))
        elapsed = time.perf_counter() - started
        if writer.files:
            os.replace(writer.files[0], final)  # same file system: an atomic rename
        else:  # every row failed: still write an (empty) shard so the split is complete and resumable
            pq.write_table(features.arrow_schema.empty_table(), partial)
            os.replace(partial, final)
        _remove_tree(staging)
        summary.shards_done.append(final)
        summary.num_rows += shard_rows
        summary.num_images += 2 * shard_rows
        summary.seconds += elapsed
        rate = 2 * shard_rows / elapsed if elapsed else 0.0
        bar.set_postfix(images_per_s=f"{rate:.1f}")
        logger.info("%s: %d rows in %.1fs (%.1f images/s)", name, shard_rows, elapsed, rate)
    bar.close()
    return summary


def _embed_rows(embedder: ImageEmbedder, good: list, normalize: bool) -> dict[str, np.ndarray]:
    """Reference, target and masked-target embeddings ``[n, D]`` of decoded rows (zeros where a row has no mask)."""
    pixels = torch.cat([p for _, p, _ in good])  # [2n, 3, H, W]: reference, target, reference, ...
    embeds = embedder.encode(pixels)
    with_mask = [row for row, (_, _, masked) in enumerate(good) if masked is not None]
    masked = torch.zeros(len(good), embeds.shape[-1], dtype=embeds.dtype, device=embeds.device)
    if with_mask:
        masked[with_mask] = embedder.encode(torch.stack([good[row][2] for row in with_mask])).to(embeds.dtype)
    if normalize:
        embeds, masked = torch.nn.functional.normalize(embeds, dim=-1), torch.nn.functional.normalize(masked, dim=-1)
    embeds = embeds.cpu().numpy().astype(np.float32).reshape(len(good), 2, -1)
    return {schema.REFERENCE_IMAGE_EMBEDS: embeds[:, 0], schema.TARGET_IMAGE_EMBEDS: embeds[:, 1],
            schema.MASKED_TARGET_IMAGE_EMBEDS: masked.cpu().numpy().astype(np.float32)}


def _remove_tree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def record_embeddings_card(
    folder: str, embedder_name: str, embedding_dim: int, split: str = "train", normalize: bool = True, features=None,
    image_preprocessing: str | None = None, target_ratio: float | None = None,
) -> str:
    """Record the finished ``embeddings`` split (size, features, encoder and, when given, its image preprocessing:
    ``embedder.image_preprocessing`` and ``embedder.target_ratio``) in the dataset card; ``features`` default to
    those of the split's first shard (the optional columns it carries included)."""
    from .card import read_card_infos, update_dataset_card
    from .shards import count_rows

    infos = read_card_infos(folder)
    sizes = {}
    if schema.EMBEDDINGS_CONFIG in infos and infos[schema.EMBEDDINGS_CONFIG].splits:
        sizes = {n: i.num_examples for n, i in infos[schema.EMBEDDINGS_CONFIG].splits.items()}
    sizes[split] = count_rows(folder, schema.EMBEDDINGS_CONFIG, split)
    if features is None:
        import pyarrow.parquet as pq
        from datasets import Features

        from .shards import shard_files

        files = shard_files(folder, schema.EMBEDDINGS_CONFIG, split)
        features = Features.from_arrow_schema(pq.read_schema(files[0])) if files else schema.embeddings_features(
            embedding_dim)
    return update_dataset_card(
        folder,
        schema.EMBEDDINGS_CONFIG,
        features,
        sizes,
        extra_metadata=_card_metadata(embedder_name, normalize, image_preprocessing, target_ratio),
    )


def _card_metadata(embedder_name: str, normalize: bool, image_preprocessing, target_ratio) -> dict:
    metadata = {"embeddings_encoder": embedder_name, "embeddings_normalized": bool(normalize)}
    if image_preprocessing is not None:
        assert image_preprocessing in ("clip", "targetpad"), image_preprocessing
        # The ratio is written for clip too (as null), so that a ratio of an earlier run does not linger.
        metadata[EMBEDDINGS_PREPROCESSING_KEY] = image_preprocessing
        metadata[EMBEDDINGS_TARGET_RATIO_KEY] = float(target_ratio) if image_preprocessing == "targetpad" else None
    return metadata


def recorded_embeddings_preprocessing(folder: str) -> tuple[str, float | None] | None:
    """``(name, target ratio)`` of the image preprocessing the ``embeddings`` configuration of the dataset folder
    ``folder`` was made with, as :func:`record_embeddings_card` recorded it; ``None`` when the card records none."""
    from ..retrieval.image_processing_targetpad import IMAGE_PREPROCESSINGS, check_target_ratio
    from .card import CARD_NAME, _load_card

    if not os.path.isfile(os.path.join(folder, CARD_NAME)):
        return None
    data = _load_card(folder)[0]
    name, ratio = data.get(EMBEDDINGS_PREPROCESSING_KEY), data.get(EMBEDDINGS_TARGET_RATIO_KEY)
    if name is None:
        return None
    where = f"{os.path.join(folder, CARD_NAME)}: {EMBEDDINGS_PREPROCESSING_KEY}"
    if name not in IMAGE_PREPROCESSINGS:
        raise ValueError(f"{where} must be one of {list(IMAGE_PREPROCESSINGS)}, got {name!r}: fix the card, or "
                         "precompute the embeddings again (examples/precompute_embeddings.py).")
    if name == "clip":
        return name, None
    try:
        ratio = check_target_ratio(ratio, EMBEDDINGS_TARGET_RATIO_KEY)
    except ValueError as error:
        raise ValueError(f"{where} is targetpad, but: {error} Fix the card, or precompute the embeddings again.") from None
    if ratio is None:
        raise ValueError(f"{where} is targetpad, but {EMBEDDINGS_TARGET_RATIO_KEY} is missing: fix the card, or "
                         "precompute the embeddings again.")
    return name, ratio


def describe_preprocessing(name: str, target_ratio: float | None) -> str:
    return f"targetpad (target ratio {target_ratio})" if name == "targetpad" else name
