# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Recipes of the training-free caption -> LLM rewrite -> CLIP pipeline (CIReVL, LDRE) as data.

A :class:`RewriteRecipe` says how the reference image is captioned, how the chat LLM is asked to rewrite a caption
with the modification text, how its answer is read and how many captions and rewrites make one query.

Facts taken from the authors' repositories (read for this module; the prompt prose is ours unless marked quoted):

CIReVL (Karthik et al., ICLR 2024, "Vision-by-Language for Training-Free Compositional Image Retrieval";
github.com/ExplainableML/Vision_by_Language ``src/main.py``, ``src/utils.py``, ``src/prompts.py``,
``src/openai_api.py``, ``example_benchmark_runs/example_benchmark_runs.sh``):

* captioner: BLIP-2 FlanT5-XXL (LAVIS ``pretrain_flant5xxl``) with the prompt quoted below (``prompts.blip_prompt``),
  one caption with LAVIS's default generation (beam search, 5 beams, at most 30 tokens);
* LLM (gpt-3.5-turbo, temperature 0, stop at a blank line) reads ONE user message: the instruction prompt, a newline,
  ``Image Content: {caption}``, a newline, ``Instruction: {modification}``; the answer's first line starting with
  ``Edited Description:`` gives the rewrite, and the modification text itself is used when there is none;
* instruction prompt per benchmark: ``contextual_modifier_prompt`` for CIRR, ``structural_modifier_prompt`` for CIRCO,
  ``structural_modifier_prompt_fashion`` for FashionIQ. Their text is long prose with worked examples; the presets
  below say the same things in our words with our own examples (pass the authors' text as ``rewrite_template`` to
  reproduce their runs exactly);
* FashionIQ's two captions are joined as ``"{a} and {b}"``, each stripped of ``.?, ``;
* retrieval: normalised CLIP text features of the rewrite against normalised CLIP image features (OpenCLIP
  ViT-bigG/14 for the CLIP-G numbers). Their gallery preprocessing defaults to "targetpad" (pad towards a square
  before resizing): give the pipeline a ``TargetPadImageProcessor`` as its ``image_processor`` to do the same
  (:mod:`~diffusers_cir.retrieval.image_processing_targetpad`); the gallery goes through whichever processor it has.

LDRE (Yang et al., SIGIR 2024, "LDRE: LLM-based Divergent Reasoning and Ensemble for Zero-Shot Composed Image
Retrieval"; github.com/yzy-bupt/LDRE ``src/dense_caption_generator.py``, ``src/reasoning_and_editing.py``,
``src/divergent_caption_ensemble.py``, ``src/args.py``):

* captioner: BLIP-2 OPT-6.7b COCO (LAVIS ``caption_coco_opt6.7b``), 15 captions per image with nucleus sampling;
* LLM (gpt-3.5-turbo, default sampling, so rewrites diverge) once per caption, with a system message (quoted below)
  and a user message giving the format, one worked example and ``Image Content: {caption}\\nInstruction:
  {modification}\\nEdited Description:`` (the user message's prose is ours, with our own example);
* ensemble: the CLIP text features of the 15 rewrites are averaged, then normalised (their CIRR path; what this
  pipeline's ``image_embeds`` are). Their CIRCO path weights each caption slot by a score computed from the whole
  query set against the whole gallery (the "semantic relevance" weights, ``--use_adaptive_ensemble``); that needs
  every query and the gallery at once, so it is a function on the pipeline's outputs:
  :func:`diffusers_cir.retrieval.ldre_ensemble` of ``rewrite_embeds`` and ``caption_embeds``
  (``output_caption_embeds=True``).

Not verified here: LAVIS's nucleus-sampling settings for BLIP-2 OPT (top-p 0.9, 30 tokens, one beam are used) and
whether LAVIS's COCO OPT captioner adds a text prompt (none is used). The rewrites use open chat LLMs from
transformers instead of the hosted GPT models the papers called, so scores will differ from the published ones.

Published zero-shot numbers with CLIP ViT-G/14 (CIRCO test mAP@5 / CIRR test R@1 / FashionIQ val R@10 average):
CIReVL 26.8 / 34.7 / 32.2; LDRE 31.1 / 36.2 / 32.5.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from ..checks import check_choice, check_float, check_positive_int

__all__ = ["REWRITE_RECIPES", "RewriteRecipe", "fill_rewrite_template", "parse_rewrite"]

# Quoted from CIReVL's src/prompts.py (blip_prompt): the captioner's prompt is part of the method's definition.
CIREVL_CAPTION_PROMPT = "Describe the image in complete detail. You must especially focus on all the objects in the image"
# Quoted from LDRE's src/reasoning_and_editing.py (the system message; the same sentence opens CIReVL's prompts).
LDRE_SYSTEM_PROMPT = (
    "I have an image. Given an instruction to edit the image, carefully generate a description of the edited image."
)
# The query layout both methods use (data: the markers are how the answer is found).
_QUERY = "Image Content: {caption}\nInstruction: {instruction}"
ANSWER_PREFIX = "Edited Description:"

_FORMAT = (
    "You will get the description of an image and an instruction that edits that image. Write a description of the "
    'image after the edit. The image description follows "Image Content:", the edit follows "Instruction:", and your '
    'answer starts with "Edited Description:".'
)
_ASPECTS = (
    "The edit may change the number of things, add or remove something, negate something, address an object "
    "directly, change or compare attributes, combine several changes, move things or change the background, or "
    "change the viewpoint."
)

_CIRR_INSTRUCTION = f"""{_FORMAT} Describe only the edited image, never the original one. Keep it short and do not \
invent anything. For example:

Image Content: two children playing with a ball on a beach
Instruction: Only one child, holding a kite instead.
Edited Description: a child holding a kite on a beach

Image Content: a white kitchen with wooden cabinets
Instruction: make the cabinets dark and add a cat on the counter
Edited Description: a white kitchen with dark cabinets and a cat on the counter
"""

_CIRCO_INSTRUCTION = f"""{_FORMAT} {_ASPECTS} The description should cover the whole edited image yet stay as simple \
and short as possible; do not invent anything, and write one edited description only. For example:

Image Content: a bowl of oranges on a table
Instruction: has three bananas instead of the oranges
Edited Description: a bowl of three bananas on a table

Image Content: a red bus on a city street
Instruction: seen from above at night
Edited Description: a red bus on a city street at night seen from above

Image Content: a man riding a horse in a field
Instruction: without the horse, the man is sitting on the grass
Edited Description: a man sitting on the grass in a field
"""

_FASHION_INSTRUCTION = f"""{_FORMAT} The image shows a garment; the instruction says how the wanted garment differs. \
{_ASPECTS} Describe the wanted garment as simply and briefly as possible, without inventing anything, in one edited \
description only. For example:

Image Content: a long blue dress with short sleeves
Instruction: is red and sleeveless
Edited Description: a long red sleeveless dress

Image Content: a white t-shirt with a small logo
Instruction: has a large graphic print and is darker
Edited Description: a dark t-shirt with a large graphic print
"""

_LDRE_USER = f"""The image content follows "Image Content:" and the instruction follows "Instruction:". Answer with \
one edited description only, starting with "Edited Description:". Keep it as simple as possible and describe only \
what the image shows, on one line.
For example:
Image Content: a brown dog lying on a couch.
Instruction: two cats are sitting there instead.
Edited Description: two cats sitting on a couch.

{_QUERY}
{ANSWER_PREFIX}"""


@dataclass(frozen=True)
class RewriteRecipe:
    """How one query becomes CLIP text features (a preset of :data:`REWRITE_RECIPES` or these fields, as data)."""

    name: str  # a label (the preset's name, or "custom")
    caption_prompt: str | None  # what the captioner reads with the image (None: plain captioning)
    num_captions: int = 1  # captions per image
    caption_do_sample: bool = False  # nucleus sampling (True) or beam search / greedy (False)
    caption_num_beams: int = 5  # beams when not sampling
    caption_top_p: float = 0.9  # nucleus mass when sampling
    caption_max_new_tokens: int = 30  # longest caption
    rewrite_system: str | None = None  # the chat's system message (None: no system turn)
    rewrite_template: str = _QUERY  # the user message: "{caption}" and "{instruction}" are filled in
    rewrite_fallback: str = "instruction"  # no "Edited Description:" line: use the "instruction" or the "first_line"
    rewrites_per_caption: int = 1  # LLM answers per caption
    rewrite_do_sample: bool = False  # sample the LLM (True) or decode greedily (False, temperature 0)
    rewrite_temperature: float = 1.0  # when sampling
    rewrite_top_p: float = 1.0  # when sampling
    rewrite_max_new_tokens: int = 80  # longest answer (the answer is cut at the first blank line)
    pair_separator: str = " and "  # joins FashionIQ's two captions (each stripped of ".?, ")
    seed: int = 0  # seeds sampling (captions and rewrites), so a call is reproducible

    def check(self) -> RewriteRecipe:
        if self.caption_prompt is not None and not isinstance(self.caption_prompt, str):
            raise ValueError(f"`recipe.caption_prompt` must be a string or None, got {type(self.caption_prompt).__name__}.")
        for name in ("num_captions", "caption_num_beams", "caption_max_new_tokens", "rewrites_per_caption", "rewrite_max_new_tokens"):
            check_positive_int(getattr(self, name), f"recipe.{name}")
        check_float(self.caption_top_p, "recipe.caption_top_p", 0.0, 1.0, exclusive_minimum=True)
        check_float(self.rewrite_top_p, "recipe.rewrite_top_p", 0.0, 1.0, exclusive_minimum=True)
        check_float(self.rewrite_temperature, "recipe.rewrite_temperature", 0.0, exclusive_minimum=True)
        check_choice(self.rewrite_fallback, "recipe.rewrite_fallback", ["instruction", "first_line"])
        if not isinstance(self.rewrite_template, str) or "{instruction}" not in self.rewrite_template or "{caption}" not in self.rewrite_template:
            raise ValueError(f"`recipe.rewrite_template` must hold '{{caption}}' and '{{instruction}}', got {self.rewrite_template!r}.")
        if not self.caption_do_sample and self.num_captions > self.caption_num_beams:
            raise ValueError(
                f"`recipe.num_captions` ({self.num_captions}) without sampling needs at least as many beams "
                f"(`recipe.caption_num_beams` = {self.caption_num_beams}): the beams are the captions."
            )
        return self

    @classmethod
    def resolve(cls, recipe: str | dict | RewriteRecipe) -> RewriteRecipe:
        """A preset name, a dict of the fields (missing ones take the defaults above) or an instance."""
        if isinstance(recipe, RewriteRecipe):
            return recipe.check()
        if isinstance(recipe, str):
            return REWRITE_RECIPES[check_choice(recipe, "recipe", sorted(REWRITE_RECIPES))]
        if isinstance(recipe, dict):
            fields = {field.name for field in dataclasses.fields(cls)}
            unknown = sorted(set(recipe) - fields)
            if unknown:
                raise ValueError(f"`recipe` has unknown fields {unknown}; the fields are {sorted(fields)}.")
            return cls(**{"name": "custom", "caption_prompt": None, **recipe}).check()
        raise ValueError(
            f"`recipe` must be a preset name ({sorted(REWRITE_RECIPES)}), a dict or a RewriteRecipe, got "
            f"{type(recipe).__name__}."
        )

    def caption_settings(self) -> dict:
        """The fields that decide the captions (they key the caption cache)."""
        names = ("caption_prompt", "num_captions", "caption_do_sample", "caption_num_beams", "caption_top_p", "caption_max_new_tokens", "seed")
        return {name: getattr(self, name) for name in names}


def _cirevl(name: str, instruction: str) -> RewriteRecipe:
    return RewriteRecipe(
        name=name, caption_prompt=CIREVL_CAPTION_PROMPT, num_captions=1, caption_num_beams=5,
        rewrite_template=f"{instruction}\n{_QUERY}", rewrite_fallback="instruction",
    )


REWRITE_RECIPES: dict[str, RewriteRecipe] = {
    "cirevl-cirr": _cirevl("cirevl-cirr", _CIRR_INSTRUCTION),
    "cirevl-circo": _cirevl("cirevl-circo", _CIRCO_INSTRUCTION),
    "cirevl-fashioniq": _cirevl("cirevl-fashioniq", _FASHION_INSTRUCTION),
    "ldre": RewriteRecipe(
        name="ldre", caption_prompt=None, num_captions=15, caption_do_sample=True, caption_num_beams=1,
        caption_top_p=0.9, rewrite_system=LDRE_SYSTEM_PROMPT, rewrite_template=_LDRE_USER,
        rewrite_fallback="first_line", rewrite_do_sample=True, rewrite_temperature=1.0, rewrite_top_p=1.0,
        rewrite_max_new_tokens=60,
    ),
}
"""Named recipes: ``cirevl-cirr``, ``cirevl-circo``, ``cirevl-fashioniq`` and ``ldre`` (see the module docstring)."""


def fill_rewrite_template(template: str, caption: str, instruction: str) -> str:
    """The user message: ``{caption}`` and ``{instruction}`` replaced in one pass (a caption holding the text
    "{instruction}" stays as it is)."""
    values = {"caption": caption, "instruction": instruction}
    return re.sub(r"\{(caption|instruction)\}", lambda match: values[match.group(1)], template)


def parse_rewrite(answer: str, instruction: str, fallback: str) -> str:
    """The rewrite in an LLM answer: the text after ``Edited Description:`` on the first line that starts with it
    (the answer is cut at its first blank line, as CIReVL's stop sequence does). Without such a line: the
    modification text itself (``fallback="instruction"``, CIReVL) or the answer's first non-empty line
    (``"first_line"``, LDRE, whose prompt ends with the prefix so the model answers directly)."""
    answer = answer.split("\n\n", 1)[0]
    lines = [line.strip() for line in answer.splitlines() if line.strip()]
    for line in lines:
        if line.startswith(ANSWER_PREFIX):
            text = line[len(ANSWER_PREFIX):].strip()
            return text or instruction
    if fallback == "first_line" and lines:
        return lines[0]
    return instruction
