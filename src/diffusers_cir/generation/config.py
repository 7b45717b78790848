# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Configuration of a generation run: one small dataclass per stage and one for the run, all plain data.

The defaults are the paper's where it gives a number (CompoDiff, arXiv 2303.11916: the CLIP band 0.5-0.7 of the
replacement keyword, the five CLIP thresholds, 64x64 masks) and the Prompt-to-Prompt / InstructPix2Pix defaults
otherwise (cross-attention shared for 80% of the steps; the share of self-attention steps drawn per sample in
[0.1, 0.9], as InstructPix2Pix samples it). ``GenerationConfig.to_dict`` is what a run records in its output folder and
its dataset card; a resumed run must have the same recipe.

Example:
    >>> from diffusers_cir.generation.config import FilterConfig
    >>> FilterConfig().image_image
    0.7
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..checks import check_choice, check_float, check_int, check_positive_int, check_seed, check_string

CAPTION_STRATEGIES = ("keyword", "llm")  # caption triplets, then image pairs drawn by Stable Diffusion
PAIR_STRATEGIES = ("mtst", "facap")  # given image pairs, texts written by a VLM (and an LLM)
STRATEGIES = CAPTION_STRATEGIES + PAIR_STRATEGIES
IMAGE_FORMATS = ("jpeg", "png", "webp")


def _check_band(band, name: str) -> tuple[float, float]:
    if not isinstance(band, (tuple, list)) or len(band) != 2:
        raise ValueError(f"`{name}` must be a (low, high) pair, got {band!r}.")
    low = check_float(band[0], f"{name}[0]", -1.0, 1.0)
    high = check_float(band[1], f"{name}[1]", -1.0, 1.0)
    if low > high:
        raise ValueError(f"`{name}` must have low <= high, got {band!r}.")
    return (low, high)


@dataclass
class KeywordConfig:
    """Stage 1: keyword caption triplets (object term -> a CLIP-similar term, instruction from a template)."""

    similarity_band: tuple[float, float] = (0.5, 0.7)  # CLIP text cosine similarity of a replacement (paper)
    min_term_count: int = 1  # object terms seen fewer times in the captions are left out (the paper's cut is unknown)
    max_candidates: int = 64  # replacements kept per term: the most similar ones inside the band
    tagger: str = "auto"  # "spacy", "builtin" (dependency-free) or "auto" (spaCy when its pipeline is installed)
    spacy_model: str = "en_core_web_sm"
    text_batch_size: int = 256  # terms per CLIP text-tower batch
    vocabulary: str | None = None  # a keyword_vocabulary.parquet of an earlier run: skips tagging every caption

    def check(self) -> None:
        if self.vocabulary is not None:
            check_string(self.vocabulary, "keyword.vocabulary", allow_empty=False)
        self.similarity_band = _check_band(self.similarity_band, "keyword.similarity_band")
        check_positive_int(self.min_term_count, "keyword.min_term_count")
        check_positive_int(self.max_candidates, "keyword.max_candidates")
        check_choice(self.tagger, "keyword.tagger", ("auto", "spacy", "builtin"))
        check_positive_int(self.text_batch_size, "keyword.text_batch_size")


@dataclass
class LLMConfig:
    """Stage 2: caption triplets sampled from a causal LM fine-tuned on (caption, instruction, edited caption)."""

    max_new_tokens: int = 96
    temperature: float = 1.0
    top_p: float = 0.9
    batch_size: int = 16  # captions per generate() call

    def check(self) -> None:
        check_positive_int(self.max_new_tokens, "llm.max_new_tokens")
        check_float(self.temperature, "llm.temperature", 0.0, exclusive_minimum=True)
        check_float(self.top_p, "llm.top_p", 0.0, 1.0, exclusive_minimum=True)
        check_positive_int(self.batch_size, "llm.batch_size")


@dataclass
class ImagePairConfig:
    """Stage 3: (reference, target) images of a caption pair with Prompt-to-Prompt, several seeds per pair."""

    num_seeds: int = 4  # image pairs drawn per caption triplet
    keep_per_triplet: int = 1  # surviving pairs kept per triplet, highest directional similarity first
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    height: int | None = None  # default: the pipeline's
    width: int | None = None
    cross_replace: float = 0.8  # share of the steps in which the target reuses the reference's cross-attention
    self_replace_range: tuple[float, float] = (0.1, 0.9)  # self-attention share, drawn per sample
    self_replace_max_tokens: int = 256  # self-attention is shared only in layers this small (16x16 at 512 px)
    batch_size: int = 4  # image pairs per denoising batch

    def check(self) -> None:
        check_positive_int(self.num_seeds, "image.num_seeds")
        check_int(self.keep_per_triplet, "image.keep_per_triplet", 1, self.num_seeds)
        check_positive_int(self.num_inference_steps, "image.num_inference_steps")
        check_float(self.guidance_scale, "image.guidance_scale", 0.0)
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (check_positive_int(value, f"image.{name}") % 8):
                raise ValueError(f"`image.{name}` must be a multiple of 8, got {value}.")
        check_float(self.cross_replace, "image.cross_replace", 0.0, 1.0)
        low, high = _check_band(self.self_replace_range, "image.self_replace_range")
        if low < 0:
            raise ValueError(f"`image.self_replace_range` must lie in [0, 1], got {self.self_replace_range!r}.")
        self.self_replace_range = (low, high)
        check_positive_int(self.self_replace_max_tokens, "image.self_replace_max_tokens")
        check_positive_int(self.batch_size, "image.batch_size")


@dataclass
class FilterConfig:
    """Stage 4: CLIP filters (a threshold of None turns one off) and the NSFW filter, in this order."""

    image_caption: float | None = 0.2  # each image against its own caption
    image_image: float | None = 0.70  # reference against target
    directional: float | None = 0.2  # (target - reference image) against (target - reference caption)
    keyword_image: float | None = 0.20  # keyword triplets: each image against its keyword
    instruction_image: float | None = 0.20  # LLM triplets: the target image against the instruction
    nsfw: bool = True  # diffusers' StableDiffusionSafetyChecker on both images
    filter_given_pairs: bool = False  # also apply the CLIP filters whose inputs exist to MTST / FACap pairs
    batch_size: int = 32

    def check(self) -> None:
        for name in ("image_caption", "image_image", "directional", "keyword_image", "instruction_image"):
            if getattr(self, name) is not None:
                setattr(self, name, check_float(getattr(self, name), f"filters.{name}", -1.0, 1.0))
        check_positive_int(self.batch_size, "filters.batch_size")


@dataclass
class MaskConfig:
    """Stage 5: ClipSeg mask of the changed term on the target image, stored as a size x size PNG."""

    enabled: bool = True
    threshold: float = 0.5  # on ClipSeg's sigmoid
    size: int = 64
    batch_size: int = 16

    def check(self) -> None:
        check_float(self.threshold, "masks.threshold", 0.0, 1.0)
        check_positive_int(self.size, "masks.size")
        check_positive_int(self.batch_size, "masks.batch_size")


MTST_PROMPT = (
    "The first image is the reference and the second image is the target. Write one short instruction that "
    "turns the reference into the target."
)
DESCRIBE_PROMPT = "Describe this image in one detailed sentence."
FACAP_PROMPT = (
    "Reference image: {reference}\nTarget image: {target}\nWrite one short, fine-grained instruction that "
    "changes the reference image into the target image. Instruction:"
)


@dataclass
class PairTextConfig:
    """Stage 6: texts of given image pairs (MTST: a VLM over both images; FACap: VLM descriptions + an LLM)."""

    mtst_prompt: str = MTST_PROMPT  # asked with (reference, target); the reverse text asks with (target, reference)
    reverse: bool = True  # MTST: also write the reverse text (target -> reference)
    describe_prompt: str = DESCRIBE_PROMPT  # FACap: asked of each image
    facap_prompt: str = FACAP_PROMPT  # FACap: given to the LLM with {reference} and {target} descriptions
    max_new_tokens: int = 48
    do_sample: bool = False  # greedy by default: a pair's text depends on the pair only
    batch_size: int = 8

    def check(self) -> None:
        for name in ("mtst_prompt", "describe_prompt", "facap_prompt"):
            check_string(getattr(self, name), f"pairs.{name}", allow_empty=False)
        for field_name in ("{reference}", "{target}"):
            if field_name not in self.facap_prompt:
                raise ValueError(f"`pairs.facap_prompt` must contain {field_name}, got {self.facap_prompt!r}.")
        check_positive_int(self.max_new_tokens, "pairs.max_new_tokens")
        check_positive_int(self.batch_size, "pairs.batch_size")


@dataclass
class GenerationConfig:
    """One generation run: what to generate from which sources, how it is sharded, and every stage's settings.

    ``captions`` and ``image_pairs`` name the inputs (a text/JSONL/CSV/Parquet file or folder, or a ``datasets`` path;
    see :mod:`diffusers_cir.generation.sources`). Items (captions or pairs) are cut into shards of
    ``items_per_shard``; everything random about an item is seeded from ``(seed, strategy, item index)``, so the
    dataset does not depend on how many processes write it, and a killed run resumes to the same bytes.
    """

    strategies: tuple[str, ...] = ("keyword", "llm")
    captions: str | None = None
    caption_column: str | None = None  # default: "caption", else "text", else the only string column
    image_pairs: str | None = None
    pair_columns: dict[str, str] = field(default_factory=dict)  # {"reference_image": col, "target_image": col}
    max_items: int | None = None  # per source
    items_per_shard: int = 1000
    chunk_size: int = 16  # items that go through every stage together (memory: chunk x seeds x 2 images)
    seed: int = 0
    split: str = "train"
    image_format: str = "jpeg"
    models: dict[str, Any] = field(default_factory=dict)  # names of the models used, recorded in the card
    keyword: KeywordConfig = field(default_factory=KeywordConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    image: ImagePairConfig = field(default_factory=ImagePairConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    pairs: PairTextConfig = field(default_factory=PairTextConfig)

    def check(self) -> "GenerationConfig":
        """Check every field (``ValueError`` naming it); returns ``self``."""
        if isinstance(self.strategies, str):
            self.strategies = (self.strategies,)
        if not self.strategies:
            raise ValueError(f"`strategies` must name at least one of {list(STRATEGIES)}.")
        for strategy in self.strategies:
            check_choice(strategy, "strategies", STRATEGIES)
        if len(set(self.strategies)) != len(self.strategies):
            raise ValueError(f"`strategies` names a strategy twice: {list(self.strategies)}.")
        self.strategies = tuple(self.strategies)
        if any(s in CAPTION_STRATEGIES for s in self.strategies) and not self.captions:
            raise ValueError(f"strategies {list(self.strategies)} need `captions` (a caption file, folder or dataset).")
        if any(s in PAIR_STRATEGIES for s in self.strategies) and not self.image_pairs:
            raise ValueError(f"strategies {list(self.strategies)} need `image_pairs` (a folder or dataset of pairs).")
        if self.max_items is not None:
            check_positive_int(self.max_items, "max_items")
        check_positive_int(self.items_per_shard, "items_per_shard")
        check_positive_int(self.chunk_size, "chunk_size")
        check_seed(self.seed)
        check_string(self.split, "split", allow_empty=False)
        check_choice(self.image_format, "image_format", IMAGE_FORMATS)
        for stage in (self.keyword, self.llm, self.image, self.filters, self.masks, self.pairs):
            stage.check()
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples as lists)."""
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GenerationConfig":
        stages = {"keyword": KeywordConfig, "llm": LLMConfig, "image": ImagePairConfig, "filters": FilterConfig,
                  "masks": MaskConfig, "pairs": PairTextConfig}
        values = dict(values)
        for name, stage_class in stages.items():
            if name in values:
                values[name] = _dataclass_from(stage_class, values[name])
        return _dataclass_from(cls, values)


def _dataclass_from(cls, values: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}; its fields are {sorted(names)}.")
    kwargs = {}
    for key, value in values.items():
        if isinstance(value, list) and (key == "strategies" or key.endswith(("_band", "_range"))):
            value = tuple(value)  # JSON has no tuples; the recorded recipe must compare equal to the given one
        kwargs[key] = value
    return cls(**kwargs)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value
