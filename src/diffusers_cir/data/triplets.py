# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Columnar CIR triplets over a closed world's items, shared by the synthetic and the picture worlds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class IndexedTriplets:
    """Columnar triplets (numpy item-index arrays and texts), cheap to build for 100k+ rows.

    ``edited_attributes[i]`` names the attribute(s) the i-th edit changes (``"color"``, ``"color+style"``...).
    """

    split: str
    reference_indices: np.ndarray
    target_indices: np.ndarray
    modification_texts: list[str]
    edited_attributes: list[str]

    def __len__(self) -> int:
        return len(self.modification_texts)

    def __getitem__(self, index: int) -> dict:
        return {
            "reference_index": int(self.reference_indices[index]),
            "target_index": int(self.target_indices[index]),
            "modification_text": self.modification_texts[index],
            "edited_attributes": self.edited_attributes[index],
        }

    def subset(self, positions: Sequence[int]) -> IndexedTriplets:
        """The triplets at ``positions``, in that order."""
        positions = np.asarray(positions, dtype=np.int64)
        return IndexedTriplets(
            self.split, self.reference_indices[positions], self.target_indices[positions],
            [self.modification_texts[i] for i in positions], [self.edited_attributes[i] for i in positions],
        )
