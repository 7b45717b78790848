# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""CompoDiff's text condition: the hidden states of one text encoder, or of two read together.

The denoiser cross-attends to a sequence of text hidden states ``[batch, length, text_embedding_dim]`` through one
linear projection (``CompoDiffTransformer.text_proj``). Which encoder makes them:

* CLIP ViT-L/14 text (the paper's encoder in every stage): 77 x 768;
* CLIP ViT-bigG/14 text (the released models, per the authors' released code): 77 x 1280;
* a T5 encoder (``transformers.T5EncoderModel``; T5-XL: 2048 wide), cut to 77 tokens as the paper does for T5 ("we
  reduced the number of input tokens of the T5 models to 77, as in CLIP");
* CLIP and T5 together, the paper's best variant ("the combination of the CLIP textual encoder and T5-XL").

How two encoders are joined is not in the paper. Here (our design) the two sequences are **concatenated along the
tokens, each in its own block of features**: CLIP's ``L1 x H1`` states fill the first ``L1`` tokens in features
``[0, H1)`` and T5's ``L2 x H2`` the next ``L2`` tokens in features ``[H1, H1 + H2)``, zeros elsewhere, giving
``(L1 + L2) x (H1 + H2)`` (154 x 2816 for CLIP-L + T5-XL). Through the denoiser's linear ``text_proj`` this is exactly
a separate projection per encoder (the weight's column blocks) with one shared bias, so neither encoder's features are
mixed with the other's and no token of one is paired with an unrelated token of the other (the two tokenizers split a
text differently, so concatenating features token by token would pair unrelated pieces). The cost: the denoiser
attends to 154 text tokens instead of 77.

The padding mask of each tokenizer is applied inside its encoder; the denoiser sees every position (as the released
models do with CLIP). Training (``diffusers_cir.training``) and :class:`~diffusers_cir.CompoDiffPipeline` both encode
through :class:`CompoDiffTextConditioner`, so they always agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["MAX_TEXT_TOKENS", "CompoDiffTextConditioner", "is_t5_encoder", "join_text_hidden_states",
           "text_attention_mask"]

MAX_TEXT_TOKENS = 77  # CLIP's context; the paper cuts T5's input to the same 77 tokens


def is_t5_encoder(text_encoder) -> bool:
    """Whether ``text_encoder`` is a T5 encoder (T5, mT5, UMT5), not a CLIP text tower."""
    return getattr(text_encoder.config, "model_type", "") in ("t5", "mt5", "umt5")


def text_attention_mask(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """A tokenizer's padding mask recovered from its ids: 1 up to and including the first end-of-text token.

    CLIP pads with the end-of-text token (OpenAI) or with ``!`` (LAION bigG), T5 with ``<pad>`` after ``</s>``; in
    every case what follows the first end-of-text token is padding. (Training tokenises in data workers and keeps
    only the ids.)
    """
    is_eos = input_ids == eos_token_id
    last = input_ids.new_full((input_ids.shape[0], 1), input_ids.shape[1] - 1)
    first_eos = torch.where(is_eos.any(dim=1, keepdim=True), is_eos.int().argmax(dim=1, keepdim=True), last)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    return (positions <= first_eos).long()


def join_text_hidden_states(hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
    """One ``[B, sum L, sum H]`` sequence from ``[B, L_i, H_i]`` ones: concatenated along the tokens, each encoder's
    features in its own block (zeros elsewhere; see the module docstring). A single sequence is returned as it is."""
    if len(hidden_states) == 1:
        return hidden_states[0]
    batch = hidden_states[0].shape[0]
    assert all(states.ndim == 3 and states.shape[0] == batch for states in hidden_states), [
        tuple(states.shape) for states in hidden_states]
    length = sum(states.shape[1] for states in hidden_states)
    width = sum(states.shape[2] for states in hidden_states)
    joined = hidden_states[0].new_zeros(batch, length, width)
    token, feature = 0, 0
    for states in hidden_states:
        joined[:, token : token + states.shape[1], feature : feature + states.shape[2]] = states
        token, feature = token + states.shape[1], feature + states.shape[2]
    return joined


class CompoDiffTextConditioner:
    """Texts -> the denoiser's text condition, with one text encoder or two (see the module docstring).

    Args:
        text_encoder, tokenizer: the first encoder (CLIP or T5) and its tokenizer.
        text_encoder_2, tokenizer_2: optional second encoder (T5 next to CLIP: the paper's best variant).

    Example:
        >>> conditioner = CompoDiffTextConditioner(clip_text_model, clip_tokenizer, t5_encoder, t5_tokenizer)  # doctest: +SKIP
        >>> conditioner(["make it red"], device="cpu").shape  # doctest: +SKIP
        torch.Size([1, 154, 2816])
    """

    def __init__(self, text_encoder, tokenizer, text_encoder_2=None, tokenizer_2=None):
        if (text_encoder_2 is None) != (tokenizer_2 is None):
            raise ValueError("`text_encoder_2` and `tokenizer_2` go together: pass both or neither.")
        self.text_encoders = [text_encoder] + ([text_encoder_2] if text_encoder_2 is not None else [])
        self.tokenizers = [tokenizer] + ([tokenizer_2] if tokenizer_2 is not None else [])

    @staticmethod
    def max_length(tokenizer) -> int:
        """Tokens of a text for ``tokenizer``: its ``model_max_length``, at most :data:`MAX_TEXT_TOKENS`."""
        return min(int(tokenizer.model_max_length), MAX_TEXT_TOKENS)

    @property
    def lengths(self) -> list[int]:
        return [self.max_length(tokenizer) for tokenizer in self.tokenizers]

    @property
    def sequence_length(self) -> int:
        """Tokens of the joined condition (77, or 154 with two encoders)."""
        return sum(self.lengths)

    @property
    def hidden_size(self) -> int:
        """Width of the joined condition: the denoiser's ``text_embedding_dim``."""
        return sum(int(encoder.config.hidden_size) for encoder in self.text_encoders)  # T5: d_model

    @property
    def eos_token_ids(self) -> list[int]:
        return [tokenizer.eos_token_id for tokenizer in self.tokenizers]

    def tokenize(self, texts: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[list[int]]]:
        """``(input_ids, attention_masks, kept)`` per tokenizer, padded and cut to its length; ``kept`` counts each
        text's tokens (to warn about texts cut short)."""
        ids, masks, kept = [], [], []
        for tokenizer, length in zip(self.tokenizers, self.lengths):
            tokens = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
            ids.append(tokens.input_ids)
            masks.append(tokens.attention_mask)
            kept.append(tokens.attention_mask.sum(dim=1).tolist())
        return ids, masks, kept

    def encode_ids(
        self, input_ids: Sequence[torch.Tensor], attention_masks: Sequence[torch.Tensor] | None = None, device=None
    ) -> torch.Tensor:
        """The joined last hidden states of token ids (one tensor per encoder) on ``device`` (default: each
        encoder's), the padding masks recovered from the ids when not given."""
        if attention_masks is None:
            attention_masks = [text_attention_mask(ids, eos) for ids, eos in zip(input_ids, self.eos_token_ids)]
        states = []
        for encoder, ids, mask in zip(self.text_encoders, input_ids, attention_masks):
            where = encoder.device if device is None else device
            states.append(encoder(input_ids=ids.to(where), attention_mask=mask.to(where)).last_hidden_state)
        if len(states) > 1:
            states = [item.to(states[0].device, states[0].dtype) for item in states]
        return join_text_hidden_states(states)

    def __call__(self, texts: list[str], device=None) -> torch.Tensor:
        ids, masks, _ = self.tokenize(texts)
        return self.encode_ids(ids, masks, device)
