# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""The methods ``examples/train_fusion.py`` trains, as a registry: each names its pipeline class, head, objective and
the defaults its papers give (and where they come from).

A method joins with :func:`register_fusion_method`. Its ``head`` names an entry of :data:`FUSION_HEADS` (a function
``(feature_dim, args) -> model``); a head that does not fuse pooled features (FashionBLIP-2's Q-Former with
multi-head matching) registers its own head builder and replaces the steps that assume pooled towers through the
``load``, ``prepare``, ``loss`` and ``pipeline`` hooks (see :mod:`.fashionblip2`); by default a batch's queries come
from one pooled feature per reference and per text (:mod:`diffusers_cir.pipelines.composition_encoders`).

Defaults and their source (``--help`` prints this table):

========= =============================================================================================================
clip4cir  Combiner (CLIP4Cir: projection 4x / hidden 8x the feature width, dropout 0.5), image targets, logit scale
          100 (temperature 0.01), Adam without weight decay, learning rate 2e-5, batch 4096: the paper's Combiner stage
          (ABaldrati/CLIP4Cir README and ``combiner_train.py``); images preprocessed with "target pad" (ratio 1.25,
          ``--transform targetpad``) when the run encodes pixels.
scot      Combiner, the modified caption's text feature as the target with the original caption as a negative (the
          paper); the optimizer values are CLIP4Cir's (SCOT's were not available to check: our choice).
mtst      Two-hop head (two Combiners), image targets, reverse-text prototype alignment of weight 0.4 and label
          smoothing 0.1 (the authors' code, ``blip_fine_tune_2.py`` and the ``blip2_tgir_ce_sim`` model); optimizer
          values are CLIP4Cir's Combiner stage (MTST's 1e-5 AdamW is for a BLIP-2 Q-Former: our choice).
========= =============================================================================================================

fashionblip2: BLIP-2's Q-Former reads the reference's patches with the modification text; peft LoRA on its query and
value projections and a multi-head matching head train against the target images (contrastive, like the others).
The paper's method section could not be read here, so every value is our choice: the head (4 heads of 64), LoRA
rank 8, temperature 0.07 (BLIP-2's initial ITC temperature), AdamW 1e-4 with weight decay 0.05 (BLIP-2's fine-tuning
decay), batch 64.

The number of steps, warm-up and LoRA settings are our choices for every method (the papers count epochs of their
own datasets and fine-tune whole towers, not LoRA).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FUSION_HEADS", "FUSION_METHODS", "FusionMethod", "build_head", "register_fusion_head",
           "register_fusion_method"]

OBJECTIVES = ("image", "text")


@dataclass(frozen=True)
class FusionMethod:
    """How one method trains (see the module docstring).

    Attributes:
        name: the ``--method`` value.
        pipeline_class: name of the registered pipeline class the run is saved as.
        head: the ``--head`` default (a :data:`FUSION_HEADS` key).
        objective: ``"image"`` (contrast with the target images' features) or ``"text"`` (with the modified captions'
            text features, SCOT).
        defaults: flag defaults (``dest`` -> value) the method sets.
        sources: ``dest`` -> where the default comes from, for ``--help``.
        compose: ``compose(run, reference_features, text_features) -> FusionHeadOutput``, or ``None`` for the head's
            own ``forward`` over pooled features.
        needs_pixels: the method reads reference and target images (an ``images`` configuration), never embeddings.
        image_preprocessing: the ``--image-preprocessing`` its authors use when a run encodes pixels (``None``: the
            encoders' own processor).
        load: ``load(args) -> fusion_components.Encoders`` instead of loading pooled towers.
        prepare: ``prepare(run)``: adapters, the module that trains (``run.head``), optimizer and LR scheduler.
        loss: ``loss(run, batch) -> (loss, {name: part})`` instead of the pooled-feature objective.
        pipeline: ``pipeline(run, for_saving) -> pipeline`` instead of a composition pipeline over the towers.
    """

    name: str
    pipeline_class: str
    head: str
    objective: str
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    compose: Callable | None = None
    needs_pixels: bool = False
    image_preprocessing: str | None = None
    load: Callable | None = None
    prepare: Callable | None = None
    loss: Callable | None = None
    pipeline: Callable | None = None


FUSION_METHODS: dict[str, FusionMethod] = {}
FUSION_HEADS: dict[str, Callable] = {}


def register_fusion_method(method: FusionMethod) -> FusionMethod:
    if method.objective not in OBJECTIVES:
        raise ValueError(f"A fusion method's objective is one of {OBJECTIVES}, got {method.objective!r}.")
    FUSION_METHODS[method.name] = method
    return method


def register_fusion_head(name: str):
    """Decorator registering ``builder(feature_dim, args) -> model`` as the head ``name``."""

    def decorate(builder: Callable):
        FUSION_HEADS[name] = builder
        return builder

    return decorate


def _widths(feature_dim: int, args) -> dict:
    # CLIP4Cir's RN50x4 sizes (2560 and 5120 for features of width 640) are 4x and 8x the feature width.
    return {"feature_dim": feature_dim, "projection_dim": args.projection_dim or 4 * feature_dim,
            "hidden_dim": args.hidden_dim or 8 * feature_dim, "dropout": args.head_dropout}


@register_fusion_head("combiner")
def _combiner(feature_dim: int, args):
    from ..models.clip4cir_combiner import Clip4CirCombiner

    return Clip4CirCombiner(**_widths(feature_dim, args))


@register_fusion_head("two-hop")
def _two_hop(feature_dim: int, args):
    from ..models.two_hop_fusion import TwoHopFusionHead

    return TwoHopFusionHead(**_widths(feature_dim, args))


@register_fusion_head("multi-head-matching")
def _multi_head_matching(feature_dim: int, args):
    from ..models.multi_head_matching import MultiHeadMatchingHead

    return MultiHeadMatchingHead(hidden_size=feature_dim, num_heads=args.num_matching_heads,
                                 head_dim=args.matching_head_dim)


def build_head(name: str, feature_dim: int, args):
    return FUSION_HEADS[name](feature_dim, args)


_CLIP4CIR = "CLIP4Cir's Combiner stage (paper / ABaldrati/CLIP4Cir)"
_CLIP4CIR_OPTIMIZER = {"learning_rate": 2e-5, "adam_weight_decay": 0.0, "train_batch_size": 4096, "temperature": 0.01,
                       "head_dropout": 0.5}

register_fusion_method(FusionMethod(
    name="clip4cir", pipeline_class="Clip4CirPipeline", head="combiner", objective="image",
    description="CLIP4Cir: a Combiner trained on triplets against the target images' features",
    defaults={**_CLIP4CIR_OPTIMIZER, "label_smoothing": 0.0, "caption_negatives": False, "reverse_text_weight": 0.0},
    sources={name: _CLIP4CIR for name in _CLIP4CIR_OPTIMIZER},
    image_preprocessing="targetpad",  # --transform targetpad --target-ratio 1.25 in every CLIP4Cir script
))
register_fusion_method(FusionMethod(
    name="scot", pipeline_class="SCOTPipeline", head="combiner", objective="text",
    description="SCOT: a Combiner trained on text triplets, the modified caption's text feature as the target",
    defaults={**_CLIP4CIR_OPTIMIZER, "label_smoothing": 0.0, "caption_negatives": True, "reverse_text_weight": 0.0},
    sources={**{name: "our choice (CLIP4Cir's value)" for name in _CLIP4CIR_OPTIMIZER},
             "caption_negatives": "SCOT (paper: the original caption is a negative)"},
))
register_fusion_method(FusionMethod(
    name="mtst", pipeline_class="MTSTPipeline", head="two-hop", objective="image",
    description="MTST: a two-hop head with reverse-text prototype alignment (PTHA)",
    defaults={**_CLIP4CIR_OPTIMIZER, "label_smoothing": 0.1, "caption_negatives": False, "reverse_text_weight": 0.4},
    sources={**{name: "our choice (CLIP4Cir's Combiner value)" for name in _CLIP4CIR_OPTIMIZER},
             "label_smoothing": "MTST (authors' code)", "reverse_text_weight": "MTST (authors' code, loss_p2p)"},
))


def _fashionblip2(name: str) -> Callable:
    """A hook of :mod:`.fashionblip2`, imported when first called (it imports torch and transformers)."""

    def hook(*args, **kwargs):
        from . import fashionblip2

        return getattr(fashionblip2, name)(*args, **kwargs)

    hook.__name__ = name
    return hook


_FASHIONBLIP2_UNREAD = "our choice (the FashionBLIP-2 paper's method section could not be read)"
register_fusion_method(FusionMethod(
    name="fashionblip2", pipeline_class="FashionBLIP2Pipeline", head="multi-head-matching", objective="image",
    description="FashionBLIP-2: BLIP-2's Q-Former with peft LoRA and a multi-head matching head, trained on "
    "reference and target images",
    defaults={"learning_rate": 1e-4, "adam_weight_decay": 0.05, "train_batch_size": 64, "temperature": 0.07,
              "head_dropout": 0.0, "label_smoothing": 0.0, "caption_negatives": False, "reverse_text_weight": 0.0},
    sources={"learning_rate": _FASHIONBLIP2_UNREAD, "train_batch_size": _FASHIONBLIP2_UNREAD,
             "adam_weight_decay": f"{_FASHIONBLIP2_UNREAD}; BLIP-2's fine-tuning value",
             "temperature": f"{_FASHIONBLIP2_UNREAD}; BLIP-2's initial ITC temperature"},
    needs_pixels=True, load=_fashionblip2("load_fashionblip2"), prepare=_fashionblip2("prepare_fashionblip2"),
    loss=_fashionblip2("fashionblip2_training_loss"), pipeline=_fashionblip2("fashionblip2_pipeline"),
))
