"""FashionIQ caption joining (the loader joins these into queries)."""

from __future__ import annotations

from typing import Sequence

__all__ = ["FASHIONIQ_CAPTION_STYLES", "join_fashioniq_captions"]

FASHIONIQ_CAPTION_STYLES = ("clip4cir", "searle")
# Characters stripped from both ends of each caption by CLIP4Cir and SEARLE/LinCIR (``str.strip('.?, ')``).
_STRIP = ".?, "


def join_fashioniq_captions(captions: Sequence[str], style: str = "clip4cir", template: str = "{}") -> list[str]:
    """The text prompt(s) of a FashionIQ triplet from its two relative captions, as the official code builds them.

    Styles (``DEFINITIONS.md`` §2.2):

    * ``"clip4cir"`` (CLIP4Cir validation): one prompt ``f"{c0.strip('.?, ').capitalize()} and {c1.strip('.?, ')}"``;
      ``str.capitalize`` also lowercases the rest of the first caption.
    * ``"searle"`` (SEARLE / LinCIR): two prompts, ``"{c0} and {c1}"`` and the reversed ``"{c1} and {c0}"``
      (each caption stripped, case kept); their normalised features are averaged into the query.

    ``template`` wraps each joined caption; SEARLE/LinCIR use ``"a photo of $ that {}"``.

    Example:

    ```py
    >>> join_fashioniq_captions(["Is RED.", "has a V-neck?"])
    ['Is red and has a V-neck']
    >>> join_fashioniq_captions(["Is RED.", "has a V-neck?"], style="searle", template="a photo of $ that {}")
    ['a photo of $ that Is RED and has a V-neck', 'a photo of $ that has a V-neck and Is RED']

    ```
    """
    if isinstance(captions, str) or len(captions) != 2 or not all(isinstance(caption, str) for caption in captions):
        raise ValueError(f"A FashionIQ triplet has exactly two caption strings, got {captions!r}.")
    if "{}" not in template:
        raise ValueError(f"`template` must contain '{{}}' where the joined caption goes, got {template!r}.")
    first, second = (caption.strip(_STRIP) for caption in captions)
    if style == "clip4cir":
        return [template.format(f"{first.capitalize()} and {second}")]
    if style == "searle":
        return [template.format(f"{first} and {second}"), template.format(f"{second} and {first}")]
    raise ValueError(f"Unknown FashionIQ caption style {style!r}; choose one of {FASHIONIQ_CAPTION_STYLES}.")
