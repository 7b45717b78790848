"""Text helpers for language-only training: keyword phrases and LinCIR's self-masking projection."""

from .keywords import (
    KEYWORD_POS,
    RuleBasedKeywordExtractor,
    SpacyKeywordExtractor,
    TaggedToken,
    keyword_spans,
    load_keyword_extractor,
)
from .self_masking import (
    MaskedCaption,
    SelfMaskingCollator,
    clean_caption,
    mask_caption,
    placeholder_token_id,
    self_masking_projection_loss,
)

__all__ = [
    "KEYWORD_POS",
    "MaskedCaption",
    "RuleBasedKeywordExtractor",
    "SelfMaskingCollator",
    "SpacyKeywordExtractor",
    "TaggedToken",
    "clean_caption",
    "keyword_spans",
    "load_keyword_extractor",
    "mask_caption",
    "placeholder_token_id",
    "self_masking_projection_loss",
]
