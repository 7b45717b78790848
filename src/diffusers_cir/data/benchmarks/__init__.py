"""Loaders of the official CIR benchmark layouts (CIRR, FashionIQ, CIRCO, GeneCIS)."""

from .fashioniq import FASHIONIQ_CAPTION_STYLES, join_fashioniq_captions

__all__ = ["FASHIONIQ_CAPTION_STYLES", "join_fashioniq_captions"]
