# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Conditions of a CompoDiff training batch: the three objectives, classifier-free condition dropout, text encoding.

CompoDiff is trained on three objectives (the paper's stage 2 alternates them; stage 1 is the first alone):

* ``text_to_image``: target image embedding from its caption; no reference image (a zero embedding), empty mask;
* ``triplet``: target image embedding from the reference image embedding, the modification text and a mask (empty
  unless the data provides one);
* ``masked``: target image embedding from the embedding of the *masked* target image, its caption and the mask, so
  the model learns what the mask token means (needs images: the masked pixels are encoded on the fly).

The data pipeline (:class:`diffusers_cir.data.streaming.TripletCollator`) turns a deterministic share of the triplet
rows into caption rows (target caption, zero reference); the training loop then trains a share of those caption rows
with the masked objective. :class:`ObjectiveRatios` converts the three ratios into those two probabilities.

Classifier-free guidance at inference (:class:`~diffusers_cir.CompoDiffPipeline`) evaluates three branches,
``[text + image, negative text + image, negative text + zero image]``, with the negative text defaulting to the
encoding of ``""`` (the paper's null text; its null image is an all-zero vector). Training therefore drops the text to
the ``""`` encoding (not to zeros), the image to a zero embedding, or both, so that each branch is a condition the
model has seen; the mask is never dropped (the paper keeps it in all three branches).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

from ..models.compodiff_text import CompoDiffTextConditioner, text_attention_mask

OBJECTIVES = ("triplet", "text_to_image", "masked")


def _check_probability(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"`{name}` must be a probability in [0, 1], got {value!r}.")
    return float(value)


@dataclass(frozen=True)
class ConditionDropout:
    """Classifier-free condition dropout of the text and the reference image (the mask is never dropped).

    Two ways to draw, both per sample:

    * ``independent=True``, the paper's ("we randomly drop each condition in stage 1 and stage 2 with 10% probability,
      except mask conditions"): the text is dropped with probability ``text`` and, independently, the image with
      probability ``image``; both are dropped with probability ``text * image``. ``both`` must be 0.
    * ``independent=False`` (this package's original default): three disjoint events from one uniform draw, text only
      with ``text``, image only with ``image``, both with ``both``; so ``text + image + both <= 1`` and the text alone
      is dropped in ``text + both`` of the rows.

    Args:
        text: probability of replacing the text by the unconditional (``""``) encoding (see above).
        image: probability of replacing the reference image embedding by zeros.
        both: disjoint mode only: probability of dropping both (the unconditional branch).
        independent: draw the two conditions independently (the paper's recipe).
    """

    text: float = 0.1
    image: float = 0.1
    both: float = 0.1
    independent: bool = False

    def __post_init__(self):
        for name in ("text", "image", "both"):
            _check_probability(f"ConditionDropout.{name}", getattr(self, name))
        if self.independent and self.both:
            raise ValueError(
                f"ConditionDropout.both must be 0 with independent=True (both conditions are then dropped together "
                f"with probability text * image = {self.text * self.image:g}), got both={self.both}."
            )
        if not self.independent and self.text + self.image + self.both > 1.0 + 1e-9:
            raise ValueError(
                f"ConditionDropout probabilities must sum to at most 1 (they are disjoint events), got "
                f"text={self.text} + image={self.image} + both={self.both} = {self.text + self.image + self.both}."
            )

    @property
    def probabilities(self) -> dict[str, float]:
        """Probability of each outcome: ``text_only``, ``image_only``, ``both`` and ``neither`` dropped."""
        if self.independent:
            both = self.text * self.image
            text_only, image_only = self.text - both, self.image - both
        else:
            text_only, image_only, both = self.text, self.image, self.both
        return {"text_only": text_only, "image_only": image_only, "both": both,
                "neither": 1.0 - text_only - image_only - both}

    def sample(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean ``[batch_size]`` masks ``(drop_text, drop_image)``."""
        if self.independent:
            draws = torch.rand(2, batch_size, device=device, generator=generator)
            return draws[0] < self.text, draws[1] < self.image
        draw = torch.rand(batch_size, device=device, generator=generator)
        text_only = draw < self.text
        image_only = (draw >= self.text) & (draw < self.text + self.image)
        both = (draw >= self.text + self.image) & (draw < self.text + self.image + self.both)
        return text_only | both, image_only | both

    def apply(
        self,
        image_embeds: torch.Tensor,
        text_hidden_states: torch.Tensor,
        null_text_hidden_states: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Drop conditions of a batch.

        Args:
            image_embeds: ``[B, D]`` reference image embeddings.
            text_hidden_states: ``[B, L, H]`` text hidden states.
            null_text_hidden_states: ``[1, L, H]`` (or ``[L, H]``) hidden states of the empty prompt ``""``.

        Returns:
            ``(image_embeds, text_hidden_states, drop_text, drop_image)``: new tensors (the inputs are not modified).
        """
        if image_embeds.ndim != 2:
            raise ValueError(f"`image_embeds` must have shape [batch, dim], got {tuple(image_embeds.shape)}.")
        if text_hidden_states.ndim != 3 or text_hidden_states.shape[0] != image_embeds.shape[0]:
            raise ValueError(
                f"`text_hidden_states` must have shape [{image_embeds.shape[0]}, length, width], "
                f"got {tuple(text_hidden_states.shape)}."
            )
        if null_text_hidden_states.ndim == 2:
            null_text_hidden_states = null_text_hidden_states[None]
        if null_text_hidden_states.shape[0] != 1 or null_text_hidden_states.shape[1:] != text_hidden_states.shape[1:]:
            raise ValueError(
                f"`null_text_hidden_states` must have shape [1, {text_hidden_states.shape[1]}, "
                f"{text_hidden_states.shape[2]}] (the encoding of \"\"), got {tuple(null_text_hidden_states.shape)}."
            )
        drop_text, drop_image = self.sample(image_embeds.shape[0], image_embeds.device, generator)
        text_hidden_states = torch.where(
            drop_text[:, None, None], null_text_hidden_states.to(text_hidden_states.dtype), text_hidden_states
        )
        image_embeds = torch.where(drop_image[:, None], torch.zeros_like(image_embeds), image_embeds)
        return image_embeds, text_hidden_states, drop_text, drop_image


@dataclass(frozen=True)
class ObjectiveRatios:
    """Shares of the training rows that use each objective (non-negative weights, normalised here).

    Args:
        triplet, text_to_image, masked: relative weights. ``masked`` rows are caption rows (like ``text_to_image``)
            whose reference is the embedding of the masked target image, so they need images.

    Example:
        >>> ratios = ObjectiveRatios.parse("triplet=0.5,text_to_image=0.3,masked=0.2")
        >>> round(ratios.caption_row_probability, 3), round(ratios.masked_share_of_caption_rows, 3)
        (0.5, 0.4)
    """

    triplet: float = 1.0
    text_to_image: float = 0.0
    masked: float = 0.0

    def __post_init__(self):
        for name in OBJECTIVES:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"Objective ratio `{name}` must be a non-negative number, got {value!r}.")
        if self.triplet + self.text_to_image + self.masked <= 0:
            raise ValueError("At least one objective ratio must be positive, got all zeros.")

    @property
    def probabilities(self) -> dict[str, float]:
        total = self.triplet + self.text_to_image + self.masked
        return {name: getattr(self, name) / total for name in OBJECTIVES}

    @property
    def caption_row_probability(self) -> float:
        """Share of triplet rows the data pipeline turns into caption rows (text-to-image + masked)."""
        probabilities = self.probabilities
        return probabilities["text_to_image"] + probabilities["masked"]

    @property
    def masked_share_of_caption_rows(self) -> float:
        """Share of the caption rows trained with the masked objective."""
        caption = self.caption_row_probability
        return self.probabilities["masked"] / caption if caption > 0 else 0.0

    @classmethod
    def parse(cls, text: str) -> "ObjectiveRatios":
        """From ``"triplet=0.5,text_to_image=0.3,masked=0.2"`` (objectives not named are 0)."""
        values: dict[str, float] = {}
        for part in filter(None, (piece.strip() for piece in str(text).split(","))):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or name not in OBJECTIVES:
                raise ValueError(
                    f"Objective ratios look like 'triplet=0.5,text_to_image=0.3,masked=0.2' with names from "
                    f"{OBJECTIVES}; could not read {part!r} in {text!r}."
                )
            if name in values:
                raise ValueError(f"Objective {name!r} is given twice in {text!r}.")
            try:
                values[name] = float(value)
            except ValueError:
                raise ValueError(f"Objective ratio {name}={value!r} is not a number (in {text!r}).") from None
        return cls(**{name: values.get(name, 0.0) for name in OBJECTIVES})

    def __str__(self) -> str:
        return ",".join(f"{name}={getattr(self, name):g}" for name in OBJECTIVES)


@torch.no_grad()
def encode_text_hidden_states(
    text_encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, eos_token_id: int | None = None
) -> torch.Tensor:
    """CLIP text last hidden states ``[B, L, H]``, encoded as :meth:`CompoDiffPipeline.encode_prompt` does.

    Args:
        text_encoder: a frozen ``CLIPTextModel`` / ``CLIPTextModelWithProjection``.
        input_ids: ``[B, L]`` token ids, padded to the tokenizer's ``model_max_length``.
        attention_mask: ``[B, L]`` padding mask; recovered from ``input_ids`` when omitted.
        eos_token_id: the tokenizer's end-of-text id (``tokenizer.eos_token_id``), used to recover the mask. Not read
            from the encoder config: OpenAI's CLIP configs carry a legacy ``eos_token_id`` of 2.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"`input_ids` must have shape [batch, length], got {tuple(input_ids.shape)}.")
    if attention_mask is None:
        if eos_token_id is None:
            raise ValueError("Pass `attention_mask` or `eos_token_id` (tokenizer.eos_token_id) to recover it.")
        attention_mask = text_attention_mask(input_ids, eos_token_id)
    return text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class CachedTextEncoder:
    """Text conditions with an LRU cache keyed by token ids (for data with few distinct texts).

    Real caption data has millions of distinct texts and gains nothing; edit instructions ("make it red") and
    small or synthetic datasets repeat a lot, and then the frozen text encoder mostly disappears from the step
    time. Rows are encoded in one batched call per miss set. A cached row and a freshly encoded one can differ in the
    last bit (matrix products depend on the batch shape), so a run with the cache on is reproducible given its
    seed but not bit-identical to a run with it off.

    Args:
        encoder: a :class:`~diffusers_cir.models.compodiff_text.CompoDiffTextConditioner` (one or two text encoders),
            or a frozen CLIP text model (then pass ``eos_token_id``).
        eos_token_id: with a bare text model, the tokenizer's end-of-text id (see :func:`encode_text_hidden_states`).
        max_entries: rows kept; ``0`` disables the cache.

    Called with the token ids of each encoder (a tensor, or one tensor per encoder of the conditioner).
    """

    def __init__(self, encoder, eos_token_id: int | None = None, max_entries: int = 0):
        if max_entries < 0:
            raise ValueError(f"`max_entries` must be >= 0, got {max_entries}.")
        if not isinstance(encoder, CompoDiffTextConditioner):
            if eos_token_id is None:
                raise ValueError("With a bare text model, pass `eos_token_id` (tokenizer.eos_token_id).")
            encoder = _SingleEncoder(encoder, eos_token_id)
        self.encoder = encoder
        self.max_entries = max_entries
        self._cache: "OrderedDict[bytes, torch.Tensor]" = OrderedDict()
        self.hits = 0
        self.misses = 0

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        input_ids = [input_ids] if isinstance(input_ids, torch.Tensor) else list(input_ids)
        if self.max_entries == 0:
            self.misses += input_ids[0].shape[0]
            return self.encoder.encode_ids(input_ids)
        rows = [b"".join(parts) for parts in zip(*([row.tobytes() for row in ids.detach().cpu().numpy()]
                                                    for ids in input_ids))]
        missing = list(dict.fromkeys(key for key in rows if key not in self._cache))
        if missing:
            positions = [rows.index(key) for key in missing]
            encoded = self.encoder.encode_ids([ids[positions] for ids in input_ids])
            for key, hidden in zip(missing, encoded):
                self._cache[key] = hidden
        result = []
        for key in rows:
            self._cache.move_to_end(key)
            result.append(self._cache[key])
        self.misses += len(missing)
        self.hits += len(rows) - len(missing)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return torch.stack(result)


class _SingleEncoder:
    """One bare CLIP text model with the conditioner's ``encode_ids``."""

    def __init__(self, text_encoder, eos_token_id: int):
        self.text_encoder, self.eos_token_id = text_encoder, eos_token_id

    def encode_ids(self, input_ids: Sequence[torch.Tensor]) -> torch.Tensor:
        return encode_text_hidden_states(self.text_encoder, input_ids[0], eos_token_id=self.eos_token_id)
