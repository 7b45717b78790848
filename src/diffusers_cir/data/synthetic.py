"""A seeded, closed synthetic world for composed image retrieval (CIR).

Real CIR training data (SynthTriplets18M, 4.1 TB) and real CLIP weights cannot be used in tests or in
an offline demo. This module builds a small world that has the same *shape* as the real thing and in
which composed retrieval is both necessary and learnable:

* **Items** are every combination of four attributes (``object``, ``color``, ``material``, ``style``),
  each with a fixed-length caption such as ``"a watercolor of a red wooden cup"``.
* **Text encoder**: a tiny ``transformers.CLIPTextModelWithProjection`` whose weights are drawn from
  the seed (no download), used with the real CLIP tokenizer (77 tokens). Encoding gives the last
  hidden states ``[N, 77, H]`` (what CompoDiff cross-attends to) and projected embeddings ``[N, P]``.
* **Image embeddings** live in the encoder's projected space: the (unit) caption embedding plus
  Gaussian noise, renormalised. Text and "image" spaces are therefore aligned as in CLIP, which is
  what LinCIR's text-only training relies on.
* **Triplets** ``(reference item, modification text, target item)``: the target differs from the
  reference by the attribute edit(s) the text states ("make it red", "replace the cup with a vase",
  "turn it into a sketch"; one or two edits, several phrasings each).
* **Splits** hold out *compositions*: a balanced set of (object, color) pairs never occurs in the
  ``train`` or ``validation`` triplets (neither as reference nor as target). ``test`` triplets start
  from a seen item and land on a held-out pair, so a model must compose an edit into an
  object-color combination it never saw. ``validation`` holds unseen (reference, edit) pairs whose
  items are all seen. The gallery is every item.

Why the baselines fail and a composing model succeeds: the encoder is a random transformer, so the
embedding of an edit text ("make it red", encoded on its own) is not the direction that turning an
item red moves its caption embedding; adding the two (the image+text-sum baseline) mostly lands
nowhere. Item embeddings, however, are close to additive in their attributes (the attributes are
single tokens at fixed positions), so a model that reads the reference's attributes and the edit can
predict the target embedding of an unseen combination. See ``README.md`` in this folder for numbers.

Language-only textual inversion (LinCIR) asks more of the text tower: a pseudo word trained in masked
captions ("$ of $") must carry an item into another prompt ("a photo of $ that make it red") and compose with
the edit. A random tower cannot do that (its end-of-text state is dominated by the position embeddings, and it
listens to "that", "make" and "it" as much as to "red"); :meth:`SyntheticWorldConfig.clip_like` gives a world
whose tower behaves like CLIP's in those respects (``text_position_scale``, ``text_content_salience``) and
whose items have several captions (``caption_templates``). The default worlds keep the plain random tower.

Example:
    >>> from diffusers_cir.data.synthetic import SyntheticCIRWorld, SyntheticWorldConfig
    >>> world = SyntheticCIRWorld(SyntheticWorldConfig.tiny(seed=0))
    >>> world.image_embeds.shape
    torch.Size([96, 64])
    >>> test = world.triplets("test")
    >>> world.items[test.reference_indices[0]].caption, test.modification_texts[0]  # doctest: +SKIP
    ('a photo of a blue wooden cup', 'make it red')
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import string
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from .triplets import IndexedTriplets

if TYPE_CHECKING:  # pragma: no cover
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

ATTRIBUTES = ("object", "color", "material", "style")

# Every word is a single CLIP BPE token, so all captions have the same length and the attributes sit
# at fixed positions: this is what keeps item embeddings close to additive in their attributes.
DEFAULT_OBJECTS = ("cup", "vase", "chair", "lamp", "bag", "shoe", "hat", "clock", "bottle", "bowl")
DEFAULT_COLORS = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple")
DEFAULT_MATERIALS = ("wooden", "metal", "glass", "plastic", "paper", "stone")
DEFAULT_STYLES = ("photo", "sketch", "painting", "cartoon", "watercolor")

CAPTION_TEMPLATE = "a {style} of a {color} {material} {object}"

# Other ways to caption the same item (for language-only training: LinCIR masks a caption's noun phrases, so
# each template puts the pseudo word in another context: "$ of $", "$", "there is $ in $", ...).
CAPTION_PARAPHRASES = (
    "a {color} {material} {object}",
    "there is a {color} {material} {object} in this {style}",
    "a {style} showing a {color} {material} {object}",
    "a {material} {object} that is {color}, as a {style}",
    "this {style} shows a {material} {object} in {color}",
)

# Several phrasings per edit, some naming the reference's current value ({old}), so a model cannot
# key on one template. "{new}" is the target's value.
EDIT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "object": ("replace the {old} with a {new}", "make it a {new}", "turn the {old} into a {new}"),
    "color": ("make it {new}", "change the color to {new}", "paint it {new}"),
    "material": ("make it {new}", "change the material to {new}", "{new} instead of {old}"),
    "style": ("turn it into a {new}", "as a {new}", "change the style to a {new}"),
}

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class SyntheticWorldConfig:
    """Everything that defines a world; two worlds with equal configs are identical.

    Args:
        seed: seeds the text encoder weights, the image noise, the held-out pairs and the triplets.
        objects, colors, materials, styles: attribute vocabularies (single CLIP tokens each).
        text_hidden_size, text_intermediate_size, text_num_layers, text_num_heads, projection_dim:
            shape of the tiny CLIP text encoder (``projection_dim`` is the image-embedding width).
        text_init_scale: gain of the random linear weights (std = gain / sqrt(fan_in)). Around 1 the
            encoder is close to additive in its input tokens yet not linear; much larger values make
            captions that differ in one word collapse onto each other.
        text_position_scale: std of the position embeddings (the token embeddings have std 1). At 1 the
            end-of-text state is dominated by its position, so two prompts of different lengths encode far
            apart whatever their words; CLIP's text tower encodes "a red cup" and "a photo of a red cup"
            close together. Small values (``0.1``) make it so.
        text_content_salience: how much more attention the world's attribute words (and any token
            resembling them, a pseudo word included) get than other words, as an attention-logit bonus (see
            :func:`build_synthetic_text_encoder`). A random tower listens to "that", "make" and "it" as much
            as to "red" and "cup"; a trained CLIP's end-of-text token attends to the content words. ``0``
            (the default) leaves the random tower unchanged.
        caption_mean_cosine: target mean pairwise cosine of the caption embeddings, reached by setting
            the final layer norm's bias (see :func:`calibrate_text_encoder`). A random transformer puts
            every caption of one template in a narrow cone (mean cosine ~0.97); CLIP image embeddings
            sit around 0.5. ``None`` keeps the raw encoder.
        caption_templates: how items are captioned. The first template gives each item's caption
            (:attr:`SyntheticItem.caption`: the caption the image embedding is made from, and the one every
            other use of the world sees) and must name all four attributes; every template gives one caption
            per item in :meth:`SyntheticCIRWorld.all_captions`, the text corpus of language-only training
            (like COCO's five captions per image).
        image_noise: norm of the noise added to each unit caption embedding to make its "image"
            embedding, as a fraction of the median distance between two items that differ in one
            attribute (so it means the same thing for any encoder).
        heldout_pairs_per_object: how many colors of each object are held out (test compositions).
        validation_fraction: fraction of the seen (reference, edit) pairs kept for ``validation``.
        compound_edit_probability: when sampling triplets, probability of a two-attribute edit.
    """

    seed: int = 0
    objects: tuple[str, ...] = DEFAULT_OBJECTS
    colors: tuple[str, ...] = DEFAULT_COLORS
    materials: tuple[str, ...] = DEFAULT_MATERIALS
    styles: tuple[str, ...] = DEFAULT_STYLES
    text_hidden_size: int = 64
    text_intermediate_size: int = 256
    text_num_layers: int = 2
    text_num_heads: int = 4
    projection_dim: int = 64
    text_init_scale: float = 1.0
    text_position_scale: float = 1.0
    text_content_salience: float = 0.0
    caption_mean_cosine: float | None = 0.5
    caption_templates: tuple[str, ...] = (CAPTION_TEMPLATE,)
    image_noise: float = 0.25
    heldout_pairs_per_object: int = 2
    validation_fraction: float = 0.05
    compound_edit_probability: float = 0.25

    @classmethod
    def tiny(cls, seed: int = 0, **overrides) -> "SyntheticWorldConfig":
        """A 96-item world (4 objects x 4 colors x 3 materials x 2 styles) for unit tests."""
        values = dict(
            seed=seed,
            objects=DEFAULT_OBJECTS[:4],
            colors=DEFAULT_COLORS[:4],
            materials=DEFAULT_MATERIALS[:3],
            styles=DEFAULT_STYLES[:2],
            heldout_pairs_per_object=1,
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def clip_like(cls, seed: int = 0, **overrides) -> "SyntheticWorldConfig":
        """A 432-item world (6 objects x 6 colors x 4 materials x 3 styles) whose text tower behaves like CLIP's
        where language-only textual inversion (LinCIR) needs it to.

        Position embeddings are small (:attr:`text_position_scale` ``0.1``), attention goes to content words
        (:attr:`text_content_salience` ``5``), and each item has six captions (:data:`CAPTION_PARAPHRASES`). No
        style is ``photo``, the word of LinCIR's prompt ``"a photo of $ that {text}"``. With the default tower
        (:meth:`tiny` or the default config), a pseudo word trained on captions does not compose with a
        modification text; see ``README.md`` in this folder for the measurements.
        """
        values = dict(
            seed=seed,
            objects=DEFAULT_OBJECTS[:6],
            colors=DEFAULT_COLORS[:6],
            materials=DEFAULT_MATERIALS[:4],
            styles=("sketch", "painting", "cartoon"),
            text_position_scale=0.1,
            text_content_salience=5.0,
            caption_templates=(CAPTION_TEMPLATE, *CAPTION_PARAPHRASES),
        )
        values.update(overrides)
        return cls(**values)

    @property
    def attribute_values(self) -> dict[str, tuple[str, ...]]:
        return {"object": self.objects, "color": self.colors, "material": self.materials, "style": self.styles}

    def validate(self) -> None:
        for name, values in self.attribute_values.items():
            if len(values) < 2:
                raise ValueError(f"SyntheticWorldConfig.{name}s needs at least 2 values, got {list(values)}.")
            if len(set(values)) != len(values):
                raise ValueError(f"SyntheticWorldConfig.{name}s has duplicates: {list(values)}.")
        if not 0 < self.heldout_pairs_per_object < len(self.colors):
            raise ValueError(
                f"heldout_pairs_per_object must be in [1, {len(self.colors) - 1}] (number of colors - 1) so "
                f"every object keeps a seen color, got {self.heldout_pairs_per_object}."
            )
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}.")
        if not 0 <= self.compound_edit_probability <= 1:
            raise ValueError(f"compound_edit_probability must be in [0, 1], got {self.compound_edit_probability}.")
        if self.caption_mean_cosine is not None and not 0 < self.caption_mean_cosine < 1:
            raise ValueError(f"caption_mean_cosine must be in (0, 1) or None, got {self.caption_mean_cosine}.")
        if self.image_noise < 0:
            raise ValueError(f"image_noise must be >= 0, got {self.image_noise}.")
        if self.text_position_scale < 0 or self.text_content_salience < 0:
            raise ValueError(
                f"text_position_scale and text_content_salience must be >= 0, got {self.text_position_scale} and "
                f"{self.text_content_salience}."
            )
        if not self.caption_templates:
            raise ValueError("caption_templates needs at least one template.")
        for index, template in enumerate(self.caption_templates):
            fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
            if not fields <= set(ATTRIBUTES) or (index == 0 and fields != set(ATTRIBUTES)):
                raise ValueError(
                    f"caption_templates[{index}] {template!r} may only use the fields {list(ATTRIBUTES)}"
                    + (", and the first template must use all of them." if index == 0 else ".")
                )
        if self.text_hidden_size % self.text_num_heads:
            raise ValueError(
                f"text_hidden_size ({self.text_hidden_size}) must be divisible by text_num_heads "
                f"({self.text_num_heads})."
            )


@dataclass(frozen=True)
class SyntheticItem:
    """One gallery item: its index, attribute values and caption."""

    index: int
    object: str
    color: str
    material: str
    style: str
    caption: str
    heldout: bool  # its (object, color) pair is held out of train/validation

    @property
    def attributes(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in ATTRIBUTES}


SyntheticTriplets = IndexedTriplets
"""The synthetic world's triplets (:class:`~diffusers_cir.data.triplets.IndexedTriplets`)."""


@dataclass
class SyntheticTextEncoding:
    """Output of :meth:`SyntheticCIRWorld.encode_text`."""

    last_hidden_state: torch.Tensor  # [N, 77, H]: what CompoDiff cross-attends to
    text_embeds: torch.Tensor  # [N, P]: projected (CLIP space), not normalised
    input_ids: torch.Tensor = field(repr=False, default=None)  # [N, 77]


def build_synthetic_text_encoder(
    config: SyntheticWorldConfig, tokenizer: "CLIPTokenizer | None" = None
) -> "CLIPTextModelWithProjection":
    """The world's tiny CLIP text encoder with weights drawn from ``config.seed``.

    Weights are drawn with numpy's PCG64 generator in sorted parameter-name order rather than with
    transformers' initialisers, so they do not change when a transformers release changes its init.
    ``tokenizer`` (the real CLIP tokenizer, built when not given) is only needed with
    ``config.text_content_salience``, to find the attribute words.
    """
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    text_config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=config.text_hidden_size,
        intermediate_size=config.text_intermediate_size,
        projection_dim=config.projection_dim,
        num_hidden_layers=config.text_num_layers,
        num_attention_heads=config.text_num_heads,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    model = CLIPTextModelWithProjection(text_config)
    rng = np.random.default_rng([config.seed, 0x7E47])
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if "layer_norm" in name:
                value = np.ones(parameter.shape) if name.endswith("weight") else np.zeros(parameter.shape)
            elif name.endswith("bias"):
                value = np.zeros(parameter.shape)
            elif "embedding" in name:
                value = rng.standard_normal(parameter.shape)
                if "position_embedding" in name:
                    value = value * config.text_position_scale
            else:  # nn.Linear weight [out, in]
                value = rng.standard_normal(parameter.shape) * (config.text_init_scale / math.sqrt(parameter.shape[1]))
            parameter.copy_(torch.from_numpy(value.astype(np.float32)))
    if config.text_content_salience:
        if tokenizer is None:
            from diffusers_cir.utils import build_offline_clip_tokenizer

            tokenizer = build_offline_clip_tokenizer()
        word_ids = []
        for value in (v for values in config.attribute_values.values() for v in values):
            ids = tokenizer(value)["input_ids"][1:-1]
            if len(ids) != 1:
                raise ValueError(
                    f"text_content_salience needs single-token attribute values; {value!r} is {len(ids)} tokens."
                )
            word_ids.append(ids[0])
        rng = np.random.default_rng([config.seed, 0x5A11])  # its own stream: the weights above are unchanged
        _add_content_salience(model, word_ids, config.text_content_salience, rng)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def _add_content_salience(model, content_token_ids: Sequence[int], salience: float, rng: np.random.Generator) -> None:
    """Make every attention query prefer the content words, as a trained CLIP's do.

    The content words' token embeddings share a direction ``c`` (a mean-zero unit vector, added with norm
    ``sqrt(H)``, the norm of a token embedding, so that about half of a content token is ``c``), and each
    layer's query bias is set so that, in every head, a key whose layer-normed input is ``sqrt(H) * c``
    gets ``salience`` more attention logit than an orthogonal one. Any token, a pseudo word included, is as
    salient as its share of ``c``.
    """
    hidden = model.config.hidden_size
    direction = rng.standard_normal(hidden)
    direction -= direction.mean()  # layer norm removes the mean
    direction = torch.from_numpy(direction / np.linalg.norm(direction)).float()
    model.text_model.embeddings.token_embedding.weight[list(content_token_ids)] += direction * math.sqrt(hidden)
    for layer in model.text_model.encoder.layers:
        attention = layer.self_attn
        head_dim = attention.head_dim
        key = (attention.k_proj.weight @ direction).view(-1, head_dim)  # [heads, head_dim]: W_k c per head
        # logit bonus = scale * bias_h . (W_k sqrt(H) c)_h = salience
        bias = salience * key / (attention.scale * math.sqrt(hidden) * key.square().sum(-1, keepdim=True))
        attention.q_proj.bias.copy_(bias.flatten())


@torch.no_grad()
def calibrate_text_encoder(
    text_encoder: "CLIPTextModelWithProjection", caption_ids: torch.Tensor, mean_cosine: float, batch_size: int = 1024
) -> float:
    """Shift the encoder's final layer-norm bias so that the captions' mean pairwise cosine is ``mean_cosine``.

    The bias moves every pooled state by ``-alpha * mean`` (so every projected embedding, captions and
    edit texts alike, by ``-alpha * W mean``); ``alpha`` is found by bisection. Returns ``alpha``.
    """
    norm = text_encoder.text_model.final_layer_norm
    norm.bias.zero_()
    pooled = torch.cat(
        [
            text_encoder.text_model(input_ids=caption_ids[start : start + batch_size]).pooler_output
            for start in range(0, len(caption_ids), batch_size)
        ]
    )
    mean = pooled.mean(0)
    projection = text_encoder.text_projection.weight

    def mean_pairwise_cosine(alpha: float) -> float:
        units = torch.nn.functional.normalize((pooled - alpha * mean) @ projection.T, dim=-1)
        count = len(units)
        return float((units.sum(0).square().sum() - count) / (count * (count - 1)))

    low, high = 0.0, 1.0
    if mean_pairwise_cosine(low) <= mean_cosine:
        return 0.0  # already spread enough
    for _ in range(40):
        middle = (low + high) / 2
        if mean_pairwise_cosine(middle) > mean_cosine:
            low = middle
        else:
            high = middle
    alpha = (low + high) / 2
    norm.bias.copy_(-alpha * mean)
    return alpha


class SyntheticCIRWorld:
    """A closed CIR world: items, a tiny CLIP text encoder, aligned image embeddings and triplets.

    Args:
        config: a :class:`SyntheticWorldConfig` (defaults to the 2,400-item world).

    Attributes:
        items: every item (the gallery), in a fixed order.
        text_encoder, tokenizer: the frozen tiny ``CLIPTextModelWithProjection`` and the real CLIP tokenizer.
        caption_embeds: ``[N, P]`` unit-norm projected embeddings of the item captions.
        image_embeds: ``[N, P]`` unit-norm "image" embeddings (caption embedding + noise).

    Example:
        >>> world = SyntheticCIRWorld(SyntheticWorldConfig.tiny())
        >>> encoded = world.encode_text(["make it red"])
        >>> tuple(encoded.last_hidden_state.shape), tuple(encoded.text_embeds.shape)
        ((1, 77, 64), (1, 64))
    """

    def __init__(self, config: SyntheticWorldConfig | None = None):
        from diffusers_cir.utils import build_offline_clip_tokenizer

        self.config = config = config or SyntheticWorldConfig()
        config.validate()
        self.tokenizer: CLIPTokenizer = build_offline_clip_tokenizer()
        self._check_single_tokens()
        self.text_encoder = build_synthetic_text_encoder(config, self.tokenizer)
        self.heldout_pairs = self._choose_heldout_pairs()
        self.items = self._build_items()
        self._index_of = {tuple(item.attributes[a] for a in ATTRIBUTES): item.index for item in self.items}
        self._codes = self._attribute_codes()
        caption_ids = self.tokenize(self.captions, padding="longest")
        if config.caption_mean_cosine is not None:
            calibrate_text_encoder(self.text_encoder, caption_ids, config.caption_mean_cosine)
        with torch.no_grad():
            pooled = [self.text_encoder(input_ids=caption_ids[i : i + 1024]).text_embeds for i in range(0, len(caption_ids), 1024)]
        self.caption_embeds = torch.nn.functional.normalize(torch.cat(pooled), dim=-1)
        self.image_embeds = self._build_image_embeds()
        self._triplet_cache: dict[str, SyntheticTriplets] = {}

    # ----------------------------------------------------------------------------------- building
    def _check_single_tokens(self) -> None:
        for name, values in self.config.attribute_values.items():
            for value in values:
                ids = self.tokenizer(value)["input_ids"][1:-1]
                if len(ids) != 1:
                    raise ValueError(
                        f"Attribute value {value!r} ({name}) is {len(ids)} CLIP tokens; the synthetic world needs "
                        "single-token values so every caption has the same length."
                    )

    def _choose_heldout_pairs(self) -> frozenset[tuple[str, str]]:
        # A cyclic design over shuffled objects and colors: every object loses exactly
        # `heldout_pairs_per_object` colors and every color is held out about equally often, so each
        # object and each color is still seen in training (composition stays learnable).
        rng = np.random.default_rng([self.config.seed, 0x4E1D])
        objects = [self.config.objects[i] for i in rng.permutation(len(self.config.objects))]
        colors = [self.config.colors[i] for i in rng.permutation(len(self.config.colors))]
        count = self.config.heldout_pairs_per_object
        pairs = set()
        for row, obj in enumerate(objects):
            for offset in range(count):
                pairs.add((obj, colors[(row * count + offset) % len(colors)]))
        return frozenset(pairs)

    def _build_items(self) -> list[SyntheticItem]:
        values = self.config.attribute_values
        items = []
        for index, (obj, color, material, style) in enumerate(itertools.product(*(values[a] for a in ATTRIBUTES))):
            caption = self.config.caption_templates[0].format(object=obj, color=color, material=material, style=style)
            items.append(
                SyntheticItem(index, obj, color, material, style, caption, heldout=(obj, color) in self.heldout_pairs)
            )
        return items

    def _build_image_embeds(self) -> torch.Tensor:
        captions = self.caption_embeds
        scale = self.config.image_noise * self.one_attribute_distance()
        rng = np.random.default_rng([self.config.seed, 0x1A6E])
        noise = torch.from_numpy(rng.standard_normal(tuple(captions.shape)).astype(np.float32))
        # Per-coordinate std scale/sqrt(P) gives a noise vector of norm ~scale.
        return torch.nn.functional.normalize(captions + noise * (scale / math.sqrt(captions.shape[1])), dim=-1)

    def one_attribute_distance(self) -> float:
        """Median L2 distance between unit caption embeddings of items differing in exactly one attribute."""
        references, targets, _, _ = self._single_edits(np.arange(len(self.items)))
        distances = (self.caption_embeds[references] - self.caption_embeds[targets]).norm(dim=-1)
        return float(distances.median())

    # ----------------------------------------------------------------------------------- lookup
    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def captions(self) -> list[str]:
        """Each item's caption (the first of ``config.caption_templates``), in item order."""
        return [item.caption for item in self.items]

    def all_captions(self) -> list[str]:
        """Every caption of every item: item by item, one per ``config.caption_templates`` entry.

        The world's text corpus for language-only training (LinCIR). With the default single template it
        equals :attr:`captions`.
        """
        templates = self.config.caption_templates
        return [template.format(**item.attributes) for item in self.items for template in templates]

    @property
    def gallery_ids(self) -> list[str]:
        """Stable string ids of the gallery items (``item-00042``), as written to disk."""
        return [f"item-{item.index:05d}" for item in self.items]

    def index_of(self, **attributes: str) -> int:
        """Index of the item with the given ``object``, ``color``, ``material`` and ``style``."""
        missing = [a for a in ATTRIBUTES if a not in attributes]
        if missing or len(attributes) != len(ATTRIBUTES):
            raise ValueError(f"index_of needs exactly the keywords {list(ATTRIBUTES)}, got {sorted(attributes)}.")
        key = tuple(attributes[a] for a in ATTRIBUTES)
        if key not in self._index_of:
            raise KeyError(f"No item with attributes {attributes}; values are {self.config.attribute_values}.")
        return self._index_of[key]

    # ----------------------------------------------------------------------------------- text
    def tokenize(self, texts: Sequence[str], padding: str = "max_length") -> torch.Tensor:
        """``[N, 77]`` CLIP token ids, padded with the end-of-text token as OpenAI CLIP does.

        ``padding="longest"`` pads only to the longest text: the encoder is causal, so the pooled
        (end-of-text) embedding does not depend on what follows it, and short inputs are much faster.
        """
        if isinstance(texts, str):
            raise TypeError("tokenize expects a list of strings, got a single str; wrap it in a list.")
        return self.tokenizer(list(texts), padding=padding, max_length=77, truncation=True, return_tensors="pt").input_ids

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 512) -> SyntheticTextEncoding:
        """Encode texts with the world's text encoder (duplicates are encoded once).

        Returns last hidden states ``[N, 77, H]`` and projected embeddings ``[N, P]`` (not normalised).
        """
        if isinstance(texts, str):
            raise TypeError("encode_text expects a list of strings, got a single str; wrap it in a list.")
        texts = list(texts)
        unique = list(dict.fromkeys(texts))
        input_ids = self.tokenize(unique) if unique else torch.zeros(0, 77, dtype=torch.long)
        hidden, embeds = [], []
        for start in range(0, len(unique), batch_size):
            output = self.text_encoder(input_ids=input_ids[start : start + batch_size])
            hidden.append(output.last_hidden_state)
            embeds.append(output.text_embeds)
        if not unique:
            width = self.config.text_hidden_size
            return SyntheticTextEncoding(
                torch.zeros(0, 77, width), torch.zeros(0, self.config.projection_dim), input_ids
            )
        position = {text: i for i, text in enumerate(unique)}
        order = torch.tensor([position[text] for text in texts])
        return SyntheticTextEncoding(torch.cat(hidden)[order], torch.cat(embeds)[order], input_ids[order])

    # ----------------------------------------------------------------------------------- triplets
    def _attribute_codes(self) -> np.ndarray:
        """``[N, 4]`` integer code of each item's value per attribute."""
        values = self.config.attribute_values
        return np.array([[values[a].index(item.attributes[a]) for a in ATTRIBUTES] for item in self.items])

    def _edit(self, reference: SyntheticItem, changes: dict[str, str], rng: np.random.Generator) -> str:
        parts = []
        for attribute, new in changes.items():
            templates = EDIT_TEMPLATES[attribute]
            template = templates[rng.integers(len(templates))]
            parts.append(template.format(old=getattr(reference, attribute), new=new))
        return " and ".join(parts)

    def _single_edits(self, references: np.ndarray):
        """All one-attribute edits of the given reference items, ordered by (reference, attribute, new value).

        Returns reference indices, target indices, edited attribute names and new values.
        """
        values = self.config.attribute_values
        sizes = np.array([len(values[a]) for a in ATTRIBUTES])
        strides = np.array([int(np.prod(sizes[i + 1 :])) for i in range(len(ATTRIBUTES))])
        codes = self._codes[references]
        refs, targets, attribute_ids, new_codes = [], [], [], []
        for a, size in enumerate(sizes):
            for new in range(size):
                keep = codes[:, a] != new
                target_codes = codes[keep].copy()
                target_codes[:, a] = new
                refs.append(references[keep])
                targets.append(target_codes @ strides)
                attribute_ids.append(np.full(keep.sum(), a))
                new_codes.append(np.full(keep.sum(), new))
        refs, targets = np.concatenate(refs).astype(np.int64), np.concatenate(targets).astype(np.int64)
        attribute_ids, new_codes = np.concatenate(attribute_ids), np.concatenate(new_codes)
        position = {int(r): i for i, r in enumerate(references)}
        order = np.lexsort((new_codes, attribute_ids, np.array([position[int(r)] for r in refs])))
        attributes = [ATTRIBUTES[a] for a in attribute_ids[order]]
        news = [values[name][code] for name, code in zip(attributes, new_codes[order])]
        return refs[order], targets[order], attributes, news

    def _split_of_pairs(self, references: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Split name per (reference, target) pair; '' for pairs that belong to no split."""
        heldout = np.array([item.heldout for item in self.items])
        split = np.full(len(references), "", dtype=object)
        seen = ~heldout[references] & ~heldout[targets]
        split[seen] = "train"
        # Validation: a hash of the pair, so the choice does not depend on how many triplets are drawn.
        if self.config.validation_fraction > 0:
            key = (references * 1_000_003 + targets * 7919 + self.config.seed * 104_729) % 10_007
            split[seen & (key < self.config.validation_fraction * 10_007)] = "validation"
        split[~heldout[references] & heldout[targets]] = "test"
        return split

    def triplets(self, split: str = "train", num_triplets: int | None = None, seed: int | None = None) -> SyntheticTriplets:
        """Triplets of one split.

        With ``num_triplets=None``: every one-attribute edit of the split, in a fixed order, one
        phrasing each. With ``num_triplets=n``: ``n`` triplets drawn with replacement (a
        ``compound_edit_probability`` share of them change two attributes), which is how large
        training sets (100k+) are made. Deterministic under ``config.seed`` and ``seed``.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
        if num_triplets is not None and num_triplets < 0:
            raise ValueError(f"num_triplets must be >= 0 or None, got {num_triplets}.")
        cache_key = f"{split}/{num_triplets}/{seed}"
        if cache_key in self._triplet_cache:
            return self._triplet_cache[cache_key]
        split_code = SPLITS.index(split)
        rng = np.random.default_rng([self.config.seed, 0x791, split_code, 0 if seed is None else seed + 1])
        if num_triplets is None:
            references, targets, attributes, news = self._single_edits(np.arange(len(self.items)))
            keep = self._split_of_pairs(references, targets) == split
            references, targets = references[keep], targets[keep]
            attributes = [a for a, k in zip(attributes, keep) if k]
            news = [n for n, k in zip(news, keep) if k]
            texts = [self._edit(self.items[r], {a: n}, rng) for r, a, n in zip(references, attributes, news)]
            result = SyntheticTriplets(split, references, targets, texts, attributes)
        else:
            result = self._sample_triplets(split, num_triplets, rng)
        self._triplet_cache[cache_key] = result
        return result

    def _sample_triplets(self, split: str, count: int, rng: np.random.Generator) -> SyntheticTriplets:
        values = self.config.attribute_values
        sizes = np.array([len(values[a]) for a in ATTRIBUTES])
        codes = self._codes
        strides = np.array([int(np.prod(sizes[i + 1 :])) for i in range(len(ATTRIBUTES))])
        references, targets, texts, edited = [], [], [], []
        attempts = 0
        # Rejection sampling in vectorised rounds: draw (reference, edit) pairs and keep those whose
        # (reference, target) pair belongs to the requested split.
        while len(references) < count:
            attempts += 1
            if attempts > 1000:
                raise RuntimeError(f"Could not draw {count} triplets for split {split!r}; is the split empty?")
            batch = max(1024, 2 * (count - len(references)))
            reference = rng.integers(len(self.items), size=batch)
            two = rng.random(batch) < self.config.compound_edit_probability
            first = rng.integers(len(ATTRIBUTES), size=batch)
            second = (first + 1 + rng.integers(len(ATTRIBUTES) - 1, size=batch)) % len(ATTRIBUTES)
            target_codes = codes[reference].copy()
            for which, mask in ((first, np.ones(batch, bool)), (second, two)):
                current = target_codes[np.arange(batch), which]
                shift = 1 + rng.integers(sizes[which] - 1)  # a different value
                target_codes[np.arange(batch), which] = np.where(mask, (current + shift) % sizes[which], current)
            target = (target_codes * strides).sum(1)
            keep = np.flatnonzero(self._split_of_pairs(reference, target) == split)[: count - len(references)]
            for i in keep:
                ref_item = self.items[reference[i]]
                order = [first[i], second[i]] if two[i] else [first[i]]
                changes = {ATTRIBUTES[a]: values[ATTRIBUTES[a]][target_codes[i, a]] for a in order}
                references.append(reference[i])
                targets.append(target[i])
                texts.append(self._edit(ref_item, changes, rng))
                edited.append("+".join(changes))
        return SyntheticTriplets(
            split, np.array(references, dtype=np.int64), np.array(targets, dtype=np.int64), texts, edited
        )

    # ----------------------------------------------------------------------------------- baselines
    def baseline_queries(self, triplets: SyntheticTriplets) -> dict[str, torch.Tensor]:
        """Unit-norm query embeddings of the three standard non-learned baselines.

        ``image_only``: the reference image embedding; ``text_only``: the modification text embedding;
        ``image_text_sum``: the sum of the two unit vectors.
        """
        image = self.image_embeds[torch.from_numpy(triplets.reference_indices)]
        text = torch.nn.functional.normalize(self.encode_text(triplets.modification_texts).text_embeds, dim=-1)
        return {
            "image_only": image,
            "text_only": text,
            "image_text_sum": torch.nn.functional.normalize(image + text, dim=-1),
        }

    def recall_at_k(
        self, query_embeds: torch.Tensor, triplets: SyntheticTriplets, ks: Sequence[int] = (1, 5, 10)
    ) -> dict[str, float]:
        """Recall@K (fractions) of composed queries against the whole gallery, the reference excluded (as in CIRR).

        ``query_embeds`` is ``[len(triplets), P]``; scores are cosine similarities with :attr:`image_embeds`.
        The formula is :func:`diffusers_cir.metrics.recall_at_k`.
        """
        from diffusers_cir.metrics import recall_at_k

        query_embeds = torch.as_tensor(query_embeds, dtype=torch.float32)
        if query_embeds.shape != (len(triplets), self.config.projection_dim):
            raise ValueError(
                f"query_embeds must have shape [{len(triplets)}, {self.config.projection_dim}] (one per triplet), "
                f"got {tuple(query_embeds.shape)}."
            )
        scores = torch.nn.functional.normalize(query_embeds, dim=-1) @ self.image_embeds.T
        return recall_at_k(
            target_ids=triplets.target_indices,
            exclude_ids=triplets.reference_indices,
            scores=scores,
            gallery_ids=np.arange(self.num_items),
            ks=ks,
            scale="fraction",
        )

    # ----------------------------------------------------------------------------------- on disk
    def text_to_image_pairs(self, include_heldout: bool = True) -> tuple[np.ndarray, list[str]]:
        """Stage-1 (caption -> image) data: item indices and their captions.

        By default every item is included, held-out compositions too: like LAION for the real
        CompoDiff, stage-1 data covers every concept, and what the splits hold out is the *composition*
        (no triplet of ``train`` reaches a held-out pair). Pass ``include_heldout=False`` for the strict
        variant.
        """
        indices = np.array([item.index for item in self.items if include_heldout or not item.heldout], dtype=np.int64)
        return indices, [self.items[i].caption for i in indices]

    def triplet_rows(self, triplets: SyntheticTriplets) -> dict[str, list]:
        """Columns of the ``embeddings`` configuration (plus ``reference_id``/``target_id``) for triplets."""
        ids = self.gallery_ids
        references, targets = triplets.reference_indices, triplets.target_indices
        prefix = f"synthetic-{self.config.seed}-{triplets.split}"
        return {
            "id": [f"{prefix}-{i:08d}" for i in range(len(triplets))],
            "reference_image_embeds": self.image_embeds[torch.from_numpy(references)].numpy(),
            "target_image_embeds": self.image_embeds[torch.from_numpy(targets)].numpy(),
            "modification_text": list(triplets.modification_texts),
            "reference_caption": [self.items[i].caption for i in references],
            "target_caption": [self.items[i].caption for i in targets],
            "reverse_modification_text": self.reverse_modification_texts(triplets),
            "reference_id": [ids[i] for i in references],
            "target_id": [ids[i] for i in targets],
        }

    def reverse_modification_texts(self, triplets: SyntheticTriplets) -> list[str]:
        """For each triplet, a text that turns its target back into its reference (MTST's reverse modification text):
        the same attributes edited, from the target's values to the reference's, phrased with the edit templates. Drawn
        from a stream of its own, so the triplets themselves do not change."""
        rng = np.random.default_rng([self.config.seed, 0x7E5E, SPLITS.index(triplets.split), len(triplets)])
        texts = []
        for reference, target, edited in zip(triplets.reference_indices, triplets.target_indices,
                                             triplets.edited_attributes):
            back = {name: getattr(self.items[reference], name) for name in edited.split("+")}
            texts.append(self._edit(self.items[target], back, rng))
        return texts

    def write_embeddings_dataset(
        self,
        folder: str,
        num_triplets: dict[str, int | None] | None = None,
        rows_per_shard: int = 10_000,
        seed: int | None = None,
        overwrite: bool = False,
        progress: bool = True,
    ) -> dict[str, int]:
        """Write the world in the SynthTriplets ``embeddings`` layout, plus a ``gallery`` configuration.

        ``folder/embeddings/{split}-*.parquet`` hold the triplets (the real data's columns, plus
        ``reference_id``/``target_id`` naming gallery items), ``folder/gallery/test-*.parquet`` every item
        (``id``, ``caption``, ``image_embeds``, attributes, ``heldout``), ``folder/synthetic_world.json``
        the config (so :func:`load_synthetic_world` rebuilds the same world and text encoder), and
        ``README.md`` the card. ``num_triplets`` maps split -> count (``None`` = every one-attribute edit
        of that split); default: all three splits, enumerated. Returns rows written per split.

        Read it back like real data: ``load_triplet_stream(folder, "embeddings", split="train")``.
        """
        import json
        import os

        from .card import update_dataset_card
        from .schema import EMBEDDINGS_CONFIG, embeddings_features
        from .shards import ParquetShardWriter

        datasets_features = _synthetic_features(self.config.projection_dim)
        num_triplets = {split: None for split in SPLITS} if num_triplets is None else dict(num_triplets)
        written = {}
        for split, count in num_triplets.items():
            triplets = self.triplets(split, num_triplets=count, seed=seed)
            columns = self.triplet_rows(triplets)
            with ParquetShardWriter(
                folder, EMBEDDINGS_CONFIG, split, datasets_features["embeddings"], rows_per_shard, overwrite=overwrite
            ) as writer:
                _write_columns(writer, columns, progress, f"writing synthetic {split}")
            written[split] = len(triplets)
        gallery = {
            "id": self.gallery_ids,
            "caption": self.captions,
            "image_embeds": self.image_embeds.numpy(),
            **{name: [item.attributes[name] for item in self.items] for name in ATTRIBUTES},
            "heldout": [item.heldout for item in self.items],
        }
        with ParquetShardWriter(folder, "gallery", "test", datasets_features["gallery"], rows_per_shard, overwrite=overwrite) as writer:
            _write_columns(writer, gallery, progress, "writing synthetic gallery")
        with open(os.path.join(folder, "synthetic_world.json"), "w", encoding="utf-8") as handle:
            json.dump(config_to_dict(self.config), handle, indent=2)
        body = _synthetic_card_body(self, written)
        update_dataset_card(folder, "gallery", datasets_features["gallery"], {"test": self.num_items}, body=body)
        update_dataset_card(folder, EMBEDDINGS_CONFIG, datasets_features["embeddings"], written, default=True, body=body)
        # The triplet columns are the real layout's columns: check rather than assume.
        assert set(embeddings_features(self.config.projection_dim)) <= set(datasets_features["embeddings"])
        return written

    def __repr__(self) -> str:
        counts = {a: len(v) for a, v in self.config.attribute_values.items()}
        return (
            f"SyntheticCIRWorld(items={self.num_items}, attributes={counts}, heldout_pairs={len(self.heldout_pairs)}, "
            f"text_hidden={self.config.text_hidden_size}, projection_dim={self.config.projection_dim}, seed={self.config.seed})"
        )


def config_to_dict(config: SyntheticWorldConfig) -> dict:
    """JSON-friendly dict of a config (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def config_from_dict(values: dict) -> SyntheticWorldConfig:
    """Inverse of :func:`config_to_dict`."""
    fields = {f.name for f in dataclasses.fields(SyntheticWorldConfig)}
    unknown = set(values) - fields
    if unknown:
        raise ValueError(f"Unknown SyntheticWorldConfig fields {sorted(unknown)}; expected some of {sorted(fields)}.")
    return SyntheticWorldConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _synthetic_features(projection_dim: int) -> dict:
    from datasets import Features, List, Value

    from .schema import embeddings_features

    embeddings = dict(embeddings_features(projection_dim))
    embeddings.update({"reverse_modification_text": Value("string"), "reference_id": Value("string"),
                       "target_id": Value("string")})
    gallery = {"id": Value("string"), "caption": Value("string"), "image_embeds": List(Value("float32"), length=projection_dim)}
    gallery.update({name: Value("string") for name in ATTRIBUTES})
    gallery["heldout"] = Value("bool")
    return {"embeddings": Features(embeddings), "gallery": Features(gallery)}


def _write_columns(writer, columns: dict, progress: bool, description: str) -> None:
    from tqdm.auto import tqdm

    count = len(next(iter(columns.values())))
    chunk = 4096
    for start in tqdm(range(0, count, chunk), desc=description, unit="chunk", disable=not progress or count <= chunk):
        writer.add_batch({name: values[start : start + chunk] for name, values in columns.items()})


def _synthetic_card_body(world: "SyntheticCIRWorld", written: dict[str, int]) -> str:
    counts = ", ".join(f"{split}: {count}" for split, count in written.items())
    values = "; ".join(f"{name}: {', '.join(v)}" for name, v in world.config.attribute_values.items())
    return f"""# Synthetic CIR world (seed {world.config.seed})

Generated by `diffusers_cir.data.synthetic` (see `src/diffusers_cir/data/README.md` in diffusers-cir). Same
`embeddings` layout as SynthTriplets18M, so training and evaluation code read it unchanged.

- {world.num_items} items ({values}); image embeddings of width {world.config.projection_dim}, unit norm.
- Triplets per split: {counts}. `test` targets are held-out (object, color) pairs never reached by a `train`
  or `validation` triplet; the `gallery` configuration holds every item (retrieve from it, excluding the
  reference).
- The tiny CLIP text encoder is rebuilt from `synthetic_world.json` with
  `diffusers_cir.data.synthetic.load_synthetic_world(folder)`.
"""


def load_synthetic_world(folder: str) -> SyntheticCIRWorld:
    """Rebuild the world (and its text encoder) whose dataset was written to ``folder``."""
    import json
    import os

    path = os.path.join(folder, "synthetic_world.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {folder} was not written by SyntheticCIRWorld.write_embeddings_dataset.")
    with open(path, encoding="utf-8") as handle:
        return SyntheticCIRWorld(config_from_dict(json.load(handle)))
