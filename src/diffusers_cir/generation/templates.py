# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""The 47 keyword-converting templates of SynthTriplets18M (CompoDiff, arXiv 2303.11916, appendix "The Full Keyword
Converting Templates"), in the paper's order and wording.

The paper's table lists two templates twice: "replace ${source} with ${target}" (entries 1 and 12) and
"substitute ${target} for ${source}" (entries 2 and 18). The list keeps both copies, as published, so that drawing a
template uniformly draws those two twice as often as the others, exactly as a faithful reimplementation of the
recipe would; :data:`REPEATED_TEMPLATES` names the repeats.

The keyword pair of every keyword triplet is stored with it (``source_keyword``, ``target_keyword``), so training can
draw a fresh instruction each time it reads the row, as CompoDiff does ("the text as a condition can vary each time in
training according to the 47 templates"), and can swap reference and target for keyword triplets.

Example:
    >>> from diffusers_cir.generation.templates import KEYWORD_TEMPLATES, fill_template
    >>> len(KEYWORD_TEMPLATES)
    47
    >>> fill_template(KEYWORD_TEMPLATES[2], "cup", "vase")
    'change cup to vase'
"""

from __future__ import annotations

from string import Template
from typing import Sequence

import numpy as np

KEYWORD_TEMPLATES: tuple[str, ...] = (
    "replace ${source} with ${target}",
    "substitute ${target} for ${source}",
    "change ${source} to ${target}",
    "${target}",
    "apply ${target}",
    "add ${target}",
    "exchange ${source} with ${target}",
    "alter ${source} to ${target}",
    "convert ${source} to ${target}",
    "transform ${source} into ${target}",
    "swap ${source} for ${target}",
    "replace ${source} with ${target}",
    "remodel ${source} into ${target}",
    "redesign ${source} as ${target}",
    "update ${source} to ${target}",
    "revamp ${source} into ${target}",
    "if it is ${target}",
    "substitute ${target} for ${source}",
    "modify ${source} to become ${target}",
    "turn ${source} into ${target}",
    "alter ${source} to match ${target}",
    "customize ${source} to become ${target}",
    "adapt ${source} to fit ${target}",
    "upgrade ${source} to ${target}",
    "change ${source} to match ${target}",
    "tweak ${source} to become ${target}",
    "amend ${source} to fit ${target}",
    "${target} is the new option",
    "choose ${target} instead",
    "${target} is the updated version",
    "use ${target} from now on",
    "${target} is the new choice",
    "opt for ${target}",
    "${target} is the updated option",
    "${target} is the new selection",
    "${target} is the new option available",
    "${target} is the updated choice",
    "${source} is replaced with ${target}",
    "${source} is removed and ${target} is added",
    "${target} is introduced after ${source} is removed",
    "${source} is removed and ${target} takes its place",
    "${target} is added after ${source} is removed",
    "${source} is removed and ${target} is introduced",
    "${target} is added in place of ${source}",
    "${target} is introduced after ${source} is retired",
    "${target} is added as a replacement for ${source}",
    "${target} is introduced as the new option after ${source} is removed",
)

# (template, 0-based positions) of the paper's repeated entries, kept as published.
REPEATED_TEMPLATES: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("replace ${source} with ${target}", (0, 11)),
    ("substitute ${target} for ${source}", (1, 17)),
)


def fill_template(template: str, source: str, target: str) -> str:
    """``template`` with ``${source}`` and ``${target}`` replaced (``string.Template``: no other field is read)."""
    return Template(template).substitute(source=source, target=target)


def draw_instruction(
    source: str, target: str, rng: np.random.Generator, templates: Sequence[str] = KEYWORD_TEMPLATES
) -> tuple[str, int]:
    """A uniformly drawn template filled with the keyword pair, and the template's index in ``templates``."""
    index = int(rng.integers(len(templates)))
    return fill_template(templates[index], source, target), index
