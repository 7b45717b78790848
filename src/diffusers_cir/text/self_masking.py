"""LinCIR's self-masking projection (SMP): the language-only training signal of phi.

For a caption ``c`` with keyword phrases ``k_1 .. k_n`` (see :mod:`diffusers_cir.text.keywords`):

1. ``masked(c)`` is ``c`` with every keyword phrase replaced by the placeholder ``$`` (when no phrase is found,
   one random word is replaced; when nothing is left to mask, the prompt is ``"a photo of $"``);
2. ``t = T(c)`` is the frozen CLIP text tower's projected embedding of the caption;
3. the input of phi is ``t`` plus noise ``u * n`` with ``u ~ U[0, 1)`` per caption and ``n ~ N(0, I)``
   (LinCIR's noise, which makes text embeddings cover the region where image embeddings of the same content lie);
4. the loss is ``MSE(T(masked(c) with phi(t + u n) at every $), t)``.

At inference the image embedding takes the place of the noisy text embedding.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from ..models.textual_inversion_projection import encode_text_with_pseudo_tokens
from .keywords import RuleBasedKeywordExtractor

_WHITESPACE = re.compile(r"\s+")
_PADDINGS = ("longest", "max_length")


@dataclass(frozen=True)
class MaskedCaption:
    """A cleaned caption and its self-masked version.

    ``strategy`` says how the mask was made: ``"keywords"`` (every keyword phrase masked), ``"random_word"``
    (no keyword found: one random word masked) or ``"template"`` (nothing to mask: ``"a photo of $"``).
    """

    caption: str
    masked_caption: str
    strategy: str


def clean_caption(caption: str | None, placeholder: str = "$") -> str:
    """Lower-case, drop placeholder characters already in the text, and collapse whitespace (as LinCIR does)."""
    if caption is None:
        return ""
    if not isinstance(caption, str):
        raise TypeError(f"A caption must be a string, got {type(caption).__name__}: {caption!r}.")
    return _WHITESPACE.sub(" ", caption.lower().replace(placeholder, " ")).strip()


def mask_caption(
    caption: str,
    keyword_extractor: Callable | None = None,
    placeholder: str = "$",
    rng: random.Random | None = None,
) -> MaskedCaption:
    """Replace the keyword phrases of ``caption`` by ``placeholder``.

    Each phrase is replaced as a whole by one placeholder, surrounded by spaces: CLIP's tokenizer would merge
    ``$`` with adjacent punctuation (``"$."``) into a different token.

    Example:
        >>> from diffusers_cir.text.self_masking import mask_caption
        >>> mask_caption("A man riding a brown horse.").masked_caption
        '$ riding $ .'
    """
    keyword_extractor = keyword_extractor or RuleBasedKeywordExtractor()
    rng = rng or random.Random()
    caption = clean_caption(caption, placeholder)
    if not caption:
        return MaskedCaption(caption, f"a photo of {placeholder}", "template")
    spans = keyword_extractor.spans(caption)
    strategy = "keywords"
    if not spans:
        words = list(re.finditer(r"\S+", caption))
        chosen = words[rng.randrange(len(words))]
        spans, strategy = [(chosen.start(), chosen.end())], "random_word"
    pieces, cursor = [], 0
    for start, end in sorted(spans):
        pieces.extend([caption[cursor:start], f" {placeholder} "])
        cursor = end
    pieces.append(caption[cursor:])
    return MaskedCaption(caption, _WHITESPACE.sub(" ", "".join(pieces)).strip(), strategy)


def placeholder_token_id(tokenizer, placeholder: str = "$") -> int:
    """The vocabulary id of ``placeholder`` (259 for ``$`` in CLIP); it must be a single token."""
    ids = tokenizer(placeholder, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"The placeholder {placeholder!r} must be one token of the tokenizer, it is {ids}.")
    return int(ids[0])


class SelfMaskingCollator:
    """Turn a batch of captions into ``input_ids`` / ``masked_input_ids`` for the self-masking loss.

    Args:
        tokenizer: the CLIP tokenizer of the text tower.
        keyword_extractor: a callable with ``.spans(caption)`` (defaults to the built-in rule).
        placeholder: the placeholder token (``"$"``).
        caption_column: key of the caption when the batch holds dicts (rows of a ``datasets`` dataset).
        seed: seeds the random-word fallback (the collator is deterministic for a seed).
        padding: ``"longest"`` (default) pads each tensor to its longest row in the batch, ``"max_length"`` to the
            tokenizer's ``model_max_length`` (77 for CLIP). Both truncate at ``model_max_length``. CLIP text towers
            attend causally and pool at the first end-of-text token, so the padding after it changes no embedding
            (up to float rounding) and ``"longest"`` spares the frozen tower most of its work on short captions.

    Returns a dict with ``input_ids`` (``LongTensor [B, L]``) and ``masked_input_ids`` (``LongTensor [B, L_masked]``),
    where ``L`` and ``L_masked`` are the longest tokenised caption and masked caption of the batch (both are
    ``model_max_length`` with ``padding="max_length"``, and they generally differ with ``"longest"``), and
    ``masked_by_keywords`` (``BoolTensor [B]``, the share of captions whose keywords could be found is worth logging).

    Example:
        >>> from diffusers_cir.text.self_masking import SelfMaskingCollator
        >>> from diffusers_cir.utils import build_offline_clip_tokenizer
        >>> batch = SelfMaskingCollator(build_offline_clip_tokenizer(), seed=0)(["a red car on a road"])
        >>> batch["masked_input_ids"][0, :5].tolist()  # <start> $ on $ <end>
        [49406, 259, 525, 259, 49407]
    """

    def __init__(
        self,
        tokenizer,
        keyword_extractor=None,
        placeholder: str = "$",
        caption_column: str = "text",
        seed: int | None = None,
        padding: str = "longest",
    ):
        if padding not in _PADDINGS:
            raise ValueError(f"`padding` must be one of {list(_PADDINGS)}, got {padding!r}.")
        self.padding = padding
        self.tokenizer = tokenizer
        self.keyword_extractor = keyword_extractor or RuleBasedKeywordExtractor()
        self.placeholder = placeholder
        self.placeholder_token_id = placeholder_token_id(tokenizer, placeholder)
        self.caption_column = caption_column
        self.rng = random.Random(seed)

    def _tokenize(self, texts: list[str], width: int | None = None) -> torch.Tensor:
        """Token ids truncated at ``model_max_length``, padded per ``self.padding`` or, given ``width``, to it."""
        max_length = self.tokenizer.model_max_length if width is None else width
        return self.tokenizer(
            texts,
            padding="max_length" if width is not None else self.padding,
            max_length=max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def __call__(self, batch: Sequence) -> dict[str, torch.Tensor]:
        captions = []
        for index, row in enumerate(batch):
            caption = row[self.caption_column] if isinstance(row, dict) else row
            if caption is not None and not isinstance(caption, str):
                raise TypeError(
                    f"Caption {index} of the batch must be a string (column {self.caption_column!r} for dict rows), "
                    f"got {type(caption).__name__}."
                )
            captions.append(caption)
        masked = [mask_caption(c, self.keyword_extractor, self.placeholder, self.rng) for c in captions]
        input_ids = self._tokenize([m.caption for m in masked])
        masked_input_ids = self._tokenize([m.masked_caption for m in masked])
        # A placeholder cut off by truncation (a mask after the 75th token) falls back to the template.
        lost = ~(masked_input_ids == self.placeholder_token_id).any(dim=-1)
        if lost.any():
            # Padded to the batch's current width of masked ids, whatever the padding (not assumed to be 77).
            template = self._tokenize([f"a photo of {self.placeholder}"], width=masked_input_ids.shape[1])
            masked_input_ids[lost] = template
        by_keywords = torch.tensor([m.strategy == "keywords" for m in masked], dtype=torch.bool) & ~lost
        return {"input_ids": input_ids, "masked_input_ids": masked_input_ids, "masked_by_keywords": by_keywords}


def self_masking_projection_loss(
    phi: torch.nn.Module,
    text_encoder: torch.nn.Module,
    input_ids: torch.Tensor,
    masked_input_ids: torch.Tensor,
    placeholder_token_id: int = 259,
    noise_scale: float = 1.0,
    l2_normalize: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """LinCIR's self-masking projection loss for one batch (gradients reach only ``phi``'s parameters).

    Args:
        phi: the projection (a :class:`~diffusers_cir.models.TextualInversionProjection`, possibly wrapped by
            accelerate/DDP).
        text_encoder: the frozen ``CLIPTextModelWithProjection``.
        input_ids, masked_input_ids: ``[B, L]`` token ids of the captions and of their masked versions.
        placeholder_token_id: id of the placeholder in ``masked_input_ids``.
        noise_scale: multiplies LinCIR's noise ``u * n`` (``u ~ U[0, 1)`` per caption, ``n ~ N(0, I)``); 1.0 is
            the reference.
        l2_normalize: normalise phi's (noisy) input, LinCIR's ``--l2_normalize`` option.
        generator: for the noise draws.
    """
    with torch.no_grad():
        target_embeds = text_encoder(input_ids=input_ids).text_embeds
    batch_size = target_embeds.shape[0]
    device, dtype = target_embeds.device, target_embeds.dtype
    scale = torch.rand((batch_size, 1), generator=generator, device=generator.device if generator else device)
    noise = randn_tensor(target_embeds.shape, generator=generator, device=device, dtype=torch.float32)
    phi_input = target_embeds.float() + noise_scale * scale.to(device) * noise
    if l2_normalize:
        phi_input = F.normalize(phi_input, dim=-1)
    phi_module = getattr(phi, "module", phi)
    phi_dtype = phi_module.output_layer.weight.dtype if hasattr(phi_module, "output_layer") else dtype
    pseudo_tokens = phi(phi_input.to(phi_dtype))
    pseudo_tokens = getattr(pseudo_tokens, "pseudo_tokens", pseudo_tokens)
    if isinstance(pseudo_tokens, tuple):
        pseudo_tokens = pseudo_tokens[0]
    predicted_embeds = encode_text_with_pseudo_tokens(text_encoder, masked_input_ids, pseudo_tokens, placeholder_token_id)
    return F.mse_loss(predicted_embeds.float(), target_embeds.float())
