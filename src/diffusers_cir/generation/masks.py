# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Stage 5: masks of the changed term for CompoDiff's masked objective, from ClipSeg (transformers
``CLIPSegForImageSegmentation``), stored as 64x64 PNGs (white = the term's region).

CompoDiff segments object terms with ClipSeg and resizes the map to 64x64. Here the term is what the triplet changes:
the target keyword of a keyword triplet, otherwise the words the target caption has and the reference caption has not
(``difflib`` over words); a triplet that only removes words has no term and no mask. The mask is of the target image:
the masked objective predicts the full target from the target with that region blanked.

Example:
    >>> from diffusers_cir.generation.masks import changed_words
    >>> changed_words("a red cup on a table", "a blue cup on a wooden table")
    'blue wooden'
"""

from __future__ import annotations

import difflib
import io
from typing import Sequence

from .records import Candidate


def changed_words(reference_caption: str, target_caption: str) -> str | None:
    """The words of ``target_caption`` that replace or add to ``reference_caption``'s (compared without case and
    punctuation), or None if there are none."""
    def words(text: str) -> list[str]:
        return [w for w in (w.strip(".,;:!?\"'()").lower() for w in text.split()) if w]

    source, target = words(reference_caption), words(target_caption)
    matcher = difflib.SequenceMatcher(a=source, b=target, autojunk=False)
    changed = [w for tag, _, _, j1, j2 in matcher.get_opcodes() if tag in ("replace", "insert") for w in target[j1:j2]]
    return " ".join(changed) or None


def mask_term(candidate: Candidate) -> str | None:
    """What to segment for ``candidate``: its target keyword, else its changed words, else None."""
    if candidate.target_keyword:
        return candidate.target_keyword
    if candidate.reference_caption and candidate.target_caption:
        return changed_words(candidate.reference_caption, candidate.target_caption)
    return None


def clipseg_masks(model, processor, images: Sequence, terms: Sequence[str], size: int = 64, threshold: float = 0.5,
                  batch_size: int = 16) -> list:
    """``size`` x ``size`` PIL ``"L"`` masks (0 / 255) of each term in its image: ClipSeg's probabilities, resized
    (bilinear) and thresholded."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    parameter = next(model.parameters())
    masks = []
    for start in range(0, len(images), batch_size):
        batch_images = list(images[start : start + batch_size])
        batch_terms = list(terms[start : start + batch_size])
        inputs = processor(text=batch_terms, images=batch_images, padding=True, return_tensors="pt")
        inputs = {k: (v.to(parameter.device, parameter.dtype) if v.is_floating_point() else v.to(parameter.device))
                  for k, v in inputs.items()}
        with torch.inference_mode():
            logits = model(**inputs).logits
        if logits.ndim == 2:  # ClipSeg squeezes a batch of one
            logits = logits[None]
        probabilities = F.interpolate(torch.sigmoid(logits.float())[:, None], size=(size, size), mode="bilinear",
                                      align_corners=False)[:, 0]
        binary = (probabilities > threshold).cpu().numpy().astype(np.uint8) * 255
        masks.extend(Image.fromarray(mask, mode="L") for mask in binary)
    return masks


def add_masks(model, processor, candidates: Sequence[Candidate], size: int = 64, threshold: float = 0.5,
              batch_size: int = 16) -> None:
    """Set ``mask`` and ``mask_term`` of every candidate that has a term to segment."""
    todo = [(c, mask_term(c)) for c in candidates]
    todo = [(c, term) for c, term in todo if term]
    if not todo:
        return
    masks = clipseg_masks(model, processor, [c.target_image for c, _ in todo], [t for _, t in todo], size, threshold,
                          batch_size)
    for (candidate, term), mask in zip(todo, masks):
        candidate.mask, candidate.mask_term = mask, term


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
