# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""The built-in picture world: small rendered pictures, their captions and composed-retrieval triplets.

Each item is one combination of five attributes, drawn with PIL (:mod:`~diffusers_cir.data.picture_drawing`): an
``object`` (circle, square, star, ...), a ``color``, a ``material`` (wooden, metal, glass, stone), a ``style`` (photo,
cartoon, sketch, painting) and a ``position`` (left, center, right, ...). Its caption names them all ("a sketch of a
red wooden star on the left"). Everything is deterministic given the seed.

Triplets ``(reference picture, modification text, target picture)`` change one attribute ("make it blue", "move it to
the right", "turn it into a cartoon"), sometimes two. As in :mod:`diffusers_cir.data.synthetic`, the splits hold out
*compositions*: a set of (object, color) pairs never occurs in a ``train`` or ``validation`` triplet, and every
``test`` triplet goes from a seen item to a held-out pair, so a model must compose an edit into an object-colour
combination it never saw as a target. The gallery is every item.

Example:
    >>> from diffusers_cir.data.pictures import PictureWorld, PictureWorldConfig
    >>> world = PictureWorld(PictureWorldConfig.tiny())
    >>> world.num_items, world.picture(0).size
    (72, (64, 64))
    >>> world.items[0].caption
    'a photo of a red wooden circle on the left'
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .picture_drawing import (
    COLOR_VALUES,
    MATERIAL_NAMES,
    OBJECT_NAMES,
    POSITION_CENTERS,
    POSITION_PHRASES,
    STYLE_NAMES,
    draw_picture,
)
from .triplets import IndexedTriplets

ATTRIBUTES = ("object", "color", "material", "style", "position")
SPLITS = ("train", "validation", "test")
CAPTION_TEMPLATE = "a {style} of {article} {color} {material} {object} {where}"

# Several phrasings per edit; "{old}" is the reference's value, "{new}" the target's ("{where}": a position phrase).
EDIT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "object": ("replace the {old} with a {new}", "make it a {new}", "a {new} instead of the {old}"),
    "color": ("make it {new}", "change the color to {new}", "paint it {new}"),
    "material": ("make it {new}", "change the material to {new}", "{new} instead of {old}"),
    "style": ("turn it into a {new}", "as a {new}", "change the style to a {new}"),
    "position": ("move it {to}", "put it {where}", "shift it {to}"),
}
MOVE_PHRASES = {"left": "to the left", "right": "to the right", "top": "to the top", "bottom": "to the bottom",
                "center": "to the middle"}
# Words a user of the demo is likely to type besides the world's own (kept whole by the demo's tokenizer).
COMMON_WORDS = ("a an the it its this that with without and or not no but of in on at to into from same instead "
                "make turn change replace move put shift place paint color colour style material shape object "
                "picture image photo drawing more less very dark light bright big small")


@dataclass(frozen=True)
class PictureWorldConfig:
    """Everything that defines a picture world; two worlds with equal configs draw the same pictures.

    Args:
        seed: seeds the held-out pairs, the triplets and the textures of every picture.
        objects, colors, materials, styles, positions: the attribute values (see ``picture_drawing`` for the ones it
            can draw).
        image_size: side of the pictures in pixels.
        heldout_pairs_per_object: colours held out per object (the ``test`` compositions).
        validation_fraction: share of the seen (reference, target) pairs kept for ``validation``.
        compound_edit_probability: share of sampled triplets that change two attributes.
    """

    seed: int = 0
    objects: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross")
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
    materials: tuple[str, ...] = MATERIAL_NAMES
    styles: tuple[str, ...] = STYLE_NAMES
    positions: tuple[str, ...] = ("left", "center", "right")
    image_size: int = 64
    heldout_pairs_per_object: int = 1
    validation_fraction: float = 0.05
    compound_edit_probability: float = 0.25

    @classmethod
    def tiny(cls, seed: int = 0, **overrides) -> PictureWorldConfig:
        """A 72-item world (3 objects x 3 colors x 2 materials x 2 styles x 2 positions) for tests and quick runs."""
        values = dict(seed=seed, objects=("circle", "square", "star"), colors=("red", "green", "blue"),
                      materials=("wooden", "metal"), styles=("photo", "cartoon"), positions=("left", "right"))
        values.update(overrides)
        return cls(**values)

    @property
    def attribute_values(self) -> dict[str, tuple[str, ...]]:
        return {name: getattr(self, name + "s") for name in ATTRIBUTES}

    def validate(self) -> None:
        drawable = {"object": OBJECT_NAMES, "color": tuple(COLOR_VALUES), "material": MATERIAL_NAMES,
                    "style": STYLE_NAMES, "position": tuple(POSITION_CENTERS)}
        for name, values in self.attribute_values.items():
            unknown = [value for value in values if value not in drawable[name]]
            if unknown or len(values) < 2 or len(set(values)) != len(values):
                raise ValueError(
                    f"PictureWorldConfig.{name}s must be at least 2 distinct values of {list(drawable[name])}, got "
                    f"{list(values)}."
                )
        if not 0 < self.heldout_pairs_per_object < len(self.colors):
            raise ValueError(
                f"heldout_pairs_per_object must be in [1, {len(self.colors) - 1}] so every object keeps a seen color, "
                f"got {self.heldout_pairs_per_object}."
            )
        if not 16 <= self.image_size <= 512:
            raise ValueError(f"image_size must be in [16, 512], got {self.image_size}.")
        if not 0 <= self.validation_fraction < 1 or not 0 <= self.compound_edit_probability <= 1:
            raise ValueError("validation_fraction must be in [0, 1) and compound_edit_probability in [0, 1].")

    def to_dict(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> PictureWorldConfig:
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()})


@dataclass(frozen=True)
class PictureItem:
    """One gallery item: its index, attribute values and caption."""

    index: int
    attributes: dict
    caption: str
    heldout: bool  # its (object, color) pair is held out of train/validation

    @property
    def id(self) -> str:
        return f"picture-{self.index:05d}"


PictureTriplets = IndexedTriplets
"""The picture world's triplets (:class:`~diffusers_cir.data.triplets.IndexedTriplets`)."""


def caption_of(attributes: dict) -> str:
    article = "an" if attributes["color"][0] in "aeiou" else "a"
    return CAPTION_TEMPLATE.format(where=POSITION_PHRASES[attributes["position"]], article=article, **attributes)


class PictureWorld:
    """A closed picture world: items, their pictures and captions, and triplets per split.

    Args:
        config: a :class:`PictureWorldConfig` (default: the 1,728-item world of ``diffusers-cir demo``).
    """

    def __init__(self, config: PictureWorldConfig | None = None):
        self.config = config = config or PictureWorldConfig()
        config.validate()
        values = config.attribute_values
        self.heldout_pairs = self._choose_heldout_pairs()
        self.items = []
        for index, combination in enumerate(itertools.product(*(values[name] for name in ATTRIBUTES))):
            attributes = dict(zip(ATTRIBUTES, combination))
            heldout = (attributes["object"], attributes["color"]) in self.heldout_pairs
            self.items.append(PictureItem(index, attributes, caption_of(attributes), heldout))
        self._codes = np.array([[values[a].index(item.attributes[a]) for a in ATTRIBUTES] for item in self.items])
        sizes = np.array([len(values[a]) for a in ATTRIBUTES])
        self._sizes = sizes
        self._strides = np.array([int(np.prod(sizes[i + 1:])) for i in range(len(ATTRIBUTES))])

    def __repr__(self) -> str:
        counts = {name: len(values) for name, values in self.config.attribute_values.items()}
        return f"PictureWorld(items={self.num_items}, attributes={counts}, seed={self.config.seed})"

    # ------------------------------------------------------------------------------------------------ items
    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def captions(self) -> list[str]:
        return [item.caption for item in self.items]

    @property
    def gallery_ids(self) -> list[str]:
        return [item.id for item in self.items]

    @property
    def fingerprint(self) -> str:
        """A digest of the config (names cache folders of rendered galleries)."""
        return hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def index_of(self, **attributes: str) -> int:
        """Index of the item with the given values of all five attributes."""
        values = self.config.attribute_values
        if sorted(attributes) != sorted(ATTRIBUTES) or any(attributes[a] not in values[a] for a in ATTRIBUTES):
            raise ValueError(f"index_of needs one value of each of {list(ATTRIBUTES)} from {values}; got {attributes}.")
        return int(sum(values[a].index(attributes[a]) * stride for a, stride in zip(ATTRIBUTES, self._strides)))

    @staticmethod
    def vocabulary() -> list[str]:
        """Every word a caption or edit of any picture world can use (every drawable value), and common words."""
        import re

        texts = [CAPTION_TEMPLATE, *itertools.chain.from_iterable(EDIT_TEMPLATES.values()), COMMON_WORDS,
                 *OBJECT_NAMES, *COLOR_VALUES, *MATERIAL_NAMES, *STYLE_NAMES, *POSITION_PHRASES.values(),
                 *MOVE_PHRASES.values()]
        words = re.findall(r"[a-z]+", " ".join(re.sub(r"\{[a-z]+\}", " ", text) for text in texts))
        return sorted(set(words))

    def picture(self, index: int, variant: int = 0) -> Image.Image:
        """The picture of item ``index``: variant 0 is its gallery picture, others are jittered training variants."""
        rng = np.random.default_rng([self.config.seed, 0x91C7, int(index), int(variant)])
        return draw_picture(self.items[index].attributes, self.config.image_size, rng, jitter=variant > 0)

    def render_gallery(self, folder: str | os.PathLike, progress: bool = True, workers: int | None = None) -> list[str]:
        """Draw every item's gallery picture into ``folder/<id>.png`` (in ``workers`` processes, see
        :func:`render_pool`; pictures already there are kept); returns the paths in item order."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / f"{item.id}.png" for item in self.items]
        missing = [index for index, path in enumerate(paths) if not path.is_file()]
        if missing:
            pictures = render_pool(self, 1, workers=workers, progress=progress)[:, 0].numpy()
            for index in missing:
                partial = paths[index].with_suffix(".partial.png")
                Image.fromarray(pictures[index]).save(partial)
                os.replace(partial, paths[index])  # a drawing interrupted half-way never looks finished
        return [str(path) for path in paths]

    # ------------------------------------------------------------------------------------------------ splits
    def _choose_heldout_pairs(self) -> frozenset[tuple[str, str]]:
        # Cyclic over shuffled objects and colours: each object loses the same number of colours and each colour is
        # held out about equally often, so every object and every colour is still seen in training.
        config = self.config
        rng = np.random.default_rng([config.seed, 0x4E1D])
        objects = [config.objects[i] for i in rng.permutation(len(config.objects))]
        colors = [config.colors[i] for i in rng.permutation(len(config.colors))]
        count = config.heldout_pairs_per_object
        return frozenset(
            (obj, colors[(row * count + offset) % len(colors)]) for row, obj in enumerate(objects) for offset in range(count)
        )

    def _split_of_pairs(self, references: np.ndarray, targets: np.ndarray) -> np.ndarray:
        heldout = np.array([item.heldout for item in self.items])
        split = np.full(len(references), "", dtype=object)
        seen = ~heldout[references] & ~heldout[targets]
        split[seen] = "train"
        if self.config.validation_fraction > 0:  # a hash of the pair: independent of how many triplets are drawn
            key = (references * 1_000_003 + targets * 7919 + self.config.seed * 104_729) % 10_007
            split[seen & (key < self.config.validation_fraction * 10_007)] = "validation"
        split[~heldout[references] & heldout[targets]] = "test"
        return split

    def _edit_text(self, reference: int, changes: dict[str, str], rng: np.random.Generator) -> str:
        parts = []
        for attribute, new in changes.items():
            templates = EDIT_TEMPLATES[attribute]
            template = templates[rng.integers(len(templates))]
            old = self.items[reference].attributes[attribute]
            parts.append(template.format(old=old, new=new, where=POSITION_PHRASES.get(new, ""), to=MOVE_PHRASES.get(new, "")))
        return " and ".join(parts)

    def triplets(self, split: str = "test", num_triplets: int | None = None, seed: int = 0) -> PictureTriplets:
        """Triplets of one split: with ``num_triplets=None`` every one-attribute edit of the split (one phrasing
        each, in a fixed order); with a number, that many drawn with replacement, a ``compound_edit_probability``
        share of them changing two attributes. Deterministic under the world's and this ``seed``."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
        rng = np.random.default_rng([self.config.seed, 0x791, SPLITS.index(split), seed])
        if num_triplets is None:
            return self._single_edits(split, rng)
        if num_triplets < 1:
            raise ValueError(f"num_triplets must be positive or None, got {num_triplets}.")
        return self._sample(split, num_triplets, rng)

    def _single_edits(self, split: str, rng: np.random.Generator) -> PictureTriplets:
        references, targets, attributes = [], [], []
        everything = np.arange(self.num_items)
        for a, size in enumerate(self._sizes):
            for new in range(size):
                keep = self._codes[:, a] != new
                codes = self._codes[keep].copy()
                codes[:, a] = new
                references.append(everything[keep])
                targets.append(codes @ self._strides)
                attributes.append(np.full(int(keep.sum()), a))
        references, targets = np.concatenate(references), np.concatenate(targets)
        attributes = np.concatenate(attributes)
        order = np.lexsort((targets, attributes, references))
        references, targets, attributes = references[order], targets[order], attributes[order]
        keep = self._split_of_pairs(references, targets) == split
        references, targets, attributes = references[keep], targets[keep], attributes[keep]
        names = [ATTRIBUTES[a] for a in attributes]
        texts = [
            self._edit_text(int(r), {name: self.items[int(t)].attributes[name]}, rng)
            for r, t, name in zip(references, targets, names)
        ]
        return PictureTriplets(split, references.astype(np.int64), targets.astype(np.int64), texts, names)

    def _sample(self, split: str, count: int, rng: np.random.Generator) -> PictureTriplets:
        references, targets, texts, edited = [], [], [], []
        for _ in range(1000):  # vectorised rejection rounds: keep the pairs that belong to the split
            batch = max(1024, 2 * (count - len(references)))
            reference = rng.integers(self.num_items, size=batch)
            two = rng.random(batch) < self.config.compound_edit_probability
            first = rng.integers(len(ATTRIBUTES), size=batch)
            second = (first + 1 + rng.integers(len(ATTRIBUTES) - 1, size=batch)) % len(ATTRIBUTES)
            codes = self._codes[reference].copy()
            rows = np.arange(batch)
            for which, active in ((first, np.ones(batch, bool)), (second, two)):
                shift = 1 + rng.integers(self._sizes[which] - 1)  # always another value
                codes[rows, which] = np.where(active, (codes[rows, which] + shift) % self._sizes[which], codes[rows, which])
            target = codes @ self._strides
            for i in np.flatnonzero(self._split_of_pairs(reference, target) == split)[: count - len(references)]:
                changed = [ATTRIBUTES[a] for a in ((first[i], second[i]) if two[i] else (first[i],))]
                changes = {name: self.items[int(target[i])].attributes[name] for name in changed}
                references.append(int(reference[i]))
                targets.append(int(target[i]))
                texts.append(self._edit_text(int(reference[i]), changes, rng))
                edited.append("+".join(changed))
            if len(references) >= count:
                return PictureTriplets(split, np.array(references), np.array(targets), texts, edited)
        raise RuntimeError(f"Could not draw {count} triplets of split {split!r}: is it empty in this world?")


def _draw_variants(args) -> np.ndarray:
    config, indices, variants = args
    world = PictureWorld(config)
    return np.stack([np.stack([np.asarray(world.picture(i, v)) for v in range(variants)]) for i in indices])


def render_pool(world: PictureWorld, variants: int, workers: int | None = None, progress: bool = True):
    """``uint8 torch.Tensor [items, variants, H, W, 3]``: every item drawn ``variants`` times (variant 0: its gallery
    picture), in ``workers`` processes (default: the CPU count, at most 4)."""
    from concurrent.futures import ProcessPoolExecutor

    import torch
    from tqdm.auto import tqdm

    workers = workers or min(4, os.cpu_count() or 1)
    chunks = [list(range(start, min(start + 64, world.num_items))) for start in range(0, world.num_items, 64)]
    jobs = [(world.config, chunk, variants) for chunk in chunks]
    bar = tqdm(total=world.num_items * variants, desc="drawing pictures", unit="picture", disable=not progress)
    parts = []
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for part in pool.map(_draw_variants, jobs):
                parts.append(part)
                bar.update(part.shape[0] * variants)
    else:
        for job in jobs:
            parts.append(_draw_variants(job))
            bar.update(parts[-1].shape[0] * variants)
    bar.close()
    return torch.from_numpy(np.concatenate(parts))


# ---------------------------------------------------------------------------------------------------- on disk
def png_bytes(picture: np.ndarray | Image.Image) -> bytes:
    image = picture if isinstance(picture, Image.Image) else Image.fromarray(np.asarray(picture))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _features(embedding_dim: int | None):
    from datasets import Features, List, Value
    from datasets import Image as ImageFeature

    from .schema import embeddings_features, images_features

    ids = {"reference_id": Value("string"), "target_id": Value("string")}
    gallery = {"id": Value("string"), "image": ImageFeature(), "caption": Value("string")}
    if embedding_dim is not None:
        gallery["image_embeds"] = List(Value("float32"), length=embedding_dim)
    gallery.update({name: Value("string") for name in ATTRIBUTES})
    gallery["heldout"] = Value("bool")
    features = {"images": Features({**images_features(), **ids}), "gallery": Features(gallery)}
    if embedding_dim is not None:
        features["embeddings"] = Features({**embeddings_features(embedding_dim), **ids})
    return features


def write_triplet_dataset(
    world: PictureWorld,
    folder: str | os.PathLike,
    pool: np.ndarray,
    num_train_triplets: int,
    gallery_embeds: np.ndarray | None = None,
    seed: int = 0,
    rows_per_shard: int = 5000,
    progress: bool = True,
) -> dict[str, int]:
    """Write the world in the SynthTriplets layout, ready for ``examples/train_compodiff.py``.

    * ``images``: ``train`` triplets (``num_train_triplets`` drawn, one or two edits each) with the pictures as PNG
      bytes, each a random variant of ``pool`` (``uint8 [items, variants, H, W, 3]``, see
      :func:`render_pool`), and the ``validation`` and ``test`` edits on the gallery
      pictures (variant 0);
    * ``gallery``: every item (``id``, ``image``, ``caption``, attributes, ``heldout``; with ``gallery_embeds``
      ``[items, D]`` also ``image_embeds``), for the text-to-image objective and validation;
    * ``embeddings`` (with ``gallery_embeds``): the ``validation`` and ``test`` edits with the gallery embeddings of
      their pictures, what the training script validates on.

    Returns the rows written per configuration and split.
    """
    from .card import update_dataset_card

    folder = str(folder)
    embedding_dim = None if gallery_embeds is None else int(gallery_embeds.shape[1])
    features = _features(embedding_dim)
    encoded = [[png_bytes(picture) for picture in variants] for variants in pool]
    rng = np.random.default_rng([world.config.seed, 0xDA7A, seed])
    written = {}
    for split in SPLITS:
        triplets = world.triplets(split, num_train_triplets if split == "train" else None, seed=seed)
        variants = (rng.integers(pool.shape[1], size=(len(triplets), 2)) if split == "train"
                    else np.zeros((len(triplets), 2), dtype=np.int64))
        columns = _triplet_columns(world, triplets)
        columns["reference_image"] = [{"bytes": encoded[r][v], "path": None}
                                      for r, v in zip(triplets.reference_indices, variants[:, 0])]
        columns["target_image"] = [{"bytes": encoded[t][v], "path": None}
                                   for t, v in zip(triplets.target_indices, variants[:, 1])]
        _write(folder, "images", split, features["images"], columns, rows_per_shard, progress)
        written[f"images/{split}"] = len(triplets)
        if embedding_dim is not None and split != "train":
            columns = _triplet_columns(world, triplets)
            columns["reference_image_embeds"] = gallery_embeds[triplets.reference_indices]
            columns["target_image_embeds"] = gallery_embeds[triplets.target_indices]
            _write(folder, "embeddings", split, features["embeddings"], columns, rows_per_shard, progress)
            written[f"embeddings/{split}"] = len(triplets)
    gallery = {
        "id": world.gallery_ids,
        "image": [{"bytes": encoded[i][0], "path": None} for i in range(world.num_items)],
        "caption": world.captions,
        **{name: [item.attributes[name] for item in world.items] for name in ATTRIBUTES},
        "heldout": [item.heldout for item in world.items],
    }
    if embedding_dim is not None:
        gallery["image_embeds"] = gallery_embeds
    _write(folder, "gallery", "test", features["gallery"], gallery, rows_per_shard, progress)
    written["gallery/test"] = world.num_items
    body = _card_body(world, written)
    for name in ("gallery", "embeddings", "images"):  # images last: it is the default configuration
        sizes = {key.split("/")[1]: count for key, count in written.items() if key.startswith(name + "/")}
        if sizes:
            update_dataset_card(folder, name, features[name], sizes, default=name == "images", body=body)
    with open(os.path.join(folder, "picture_world.json"), "w", encoding="utf-8") as handle:
        json.dump(world.config.to_dict(), handle, indent=2)
    return written


def _triplet_columns(world: PictureWorld, triplets: PictureTriplets) -> dict:
    prefix = f"pictures-{world.config.seed}-{triplets.split}"
    ids = world.gallery_ids
    return {
        "id": [f"{prefix}-{i:08d}" for i in range(len(triplets))],
        "modification_text": list(triplets.modification_texts),
        "reference_caption": [world.items[i].caption for i in triplets.reference_indices],
        "target_caption": [world.items[i].caption for i in triplets.target_indices],
        "reference_id": [ids[i] for i in triplets.reference_indices],
        "target_id": [ids[i] for i in triplets.target_indices],
    }


def _write(folder, config_name, split, features, columns, rows_per_shard, progress) -> None:
    from tqdm.auto import tqdm

    from .shards import ParquetShardWriter

    count = len(columns["id"])
    with ParquetShardWriter(folder, config_name, split, features, rows_per_shard, overwrite=True) as writer:
        for start in tqdm(range(0, count, 2048), desc=f"writing {config_name}/{split}", disable=not progress or count <= 2048):
            writer.add_batch({name: values[start:start + 2048] for name, values in columns.items()})


def _card_body(world: PictureWorld, written: dict[str, int]) -> str:
    values = "; ".join(f"{name}: {', '.join(v)}" for name, v in world.config.attribute_values.items())
    counts = ", ".join(f"{key}: {count}" for key, count in written.items())
    return f"""# The diffusers-cir picture world (seed {world.config.seed})

Drawn by `diffusers_cir.data.pictures` ({world.num_items} items of {values}; pictures of
{world.config.image_size} px). Rows: {counts}. `test` triplets go to (object, color) pairs that no `train` or
`validation` triplet reaches; the `gallery` configuration holds every item (retrieve from it, the reference excluded).
`picture_world.json` is the configuration: `PictureWorld(PictureWorldConfig.from_dict(...))` draws the same pictures.
"""
