"""How a CaptionRewritePipeline's several rewrites per query become the one query an evaluation ranks with.

LDRE (github.com/yzy-bupt/LDRE at 65d050e, ``src/divergent_caption_ensemble.py`` and ``src/args.py``, read for this
module) ranks its two benchmarks differently: CIRR with the mean of the rewrites' CLIP text features (what the
pipeline's ``image_embeds`` are), CIRCO with its adaptive ensemble (``--use_adaptive_ensemble``, on by default), whose
weighted sum of the rewrites *replaces* the mean as the query (the similarity is recomputed from it alone). Its
ensemble script has no FashionIQ path. So ``rewrite_ensemble=None`` (the default) ranks an LDRE-recipe pipeline on
CIRCO with :func:`~diffusers_cir.retrieval.compose_ldre_queries` and every other case with the mean; ``"ldre"`` or
``"mean"`` chooses explicitly (any benchmark with a shared gallery and one text per query, for ``"ldre"``).
"""

from __future__ import annotations

from typing import Any, Sequence

from ..checks import check_choice

__all__ = ["REWRITE_ENSEMBLES", "check_rewrite_ensemble", "resolve_rewrite_ensemble", "rewrite_ensemble_settings"]

REWRITE_ENSEMBLES = ("ldre", "mean")
# The authors' defaults (src/args.py: --adaptive_topk, --adaptive_temperature).
LDRE_TOP_K = 5
LDRE_TEMPERATURE = 0.04
_LDRE_SOURCE = "yzy-bupt/LDRE at 65d050e (src/divergent_caption_ensemble.py: circo_generate_test_dict; src/args.py)"
# Where the authors use the adaptive ensemble; elsewhere (CIRR) they rank with the mean.
LDRE_ENSEMBLE_BENCHMARKS = ("circo",)


def check_rewrite_ensemble(rewrite_ensemble: str | None, benchmarks: Sequence, protocol, prompt_template: str) -> None:
    """Refuse, before any model loads, an ensemble the loaded splits cannot take: ``"ldre"`` needs one shared gallery
    (its weights come from the whole gallery) and one text per query."""
    if rewrite_ensemble is None:
        return
    check_choice(rewrite_ensemble, "rewrite_ensemble", REWRITE_ENSEMBLES)
    if rewrite_ensemble != "ldre":
        return
    for benchmark in benchmarks:
        if benchmark.gallery_ids is None:
            raise ValueError(
                f"`rewrite_ensemble` 'ldre' weighs the rewrites against one gallery shared by every query; "
                f"{benchmark.description} ranks each query's own candidates. Leave it out for this benchmark."
            )
        several = next((q for q in benchmark.queries if len(protocol.query_texts(q, prompt_template)) > 1), None)
        if several is not None:
            raise ValueError(
                f"`rewrite_ensemble` 'ldre' weighs the rewrites of one text per query, but the {protocol.name!r} "
                f"protocol gives query {several.query_id!r} several texts: choose a protocol with one text per query."
            )


def _rewrite_recipe(pipeline: Any):
    """The recipe of a CaptionRewritePipeline, ``None`` for a pipeline composing one embedding per query."""
    if getattr(pipeline, "recipe", None) is None:  # no pipeline import for the stand-ins and other pipelines
        return None
    from ..pipelines.pipeline_caption_rewrite import CaptionRewritePipeline

    return pipeline.recipe if isinstance(pipeline, CaptionRewritePipeline) else None


def resolve_rewrite_ensemble(pipeline: Any, benchmark: str, rewrite_ensemble: str | None) -> str | None:
    """``"ldre"`` or ``"mean"`` for a CaptionRewritePipeline (by default: as the LDRE authors rank ``benchmark``
    with an LDRE recipe, the mean otherwise), ``None`` for another pipeline; a ``ValueError`` when one is asked of a
    pipeline without rewrites."""
    recipe = _rewrite_recipe(pipeline)
    if recipe is None:
        if rewrite_ensemble is not None:
            raise ValueError(
                f"`rewrite_ensemble` {rewrite_ensemble!r} combines the rewrites of a CaptionRewritePipeline; "
                f"{type(pipeline).__name__} composes one embedding per query. Leave it out for this pipeline."
            )
        return None
    if rewrite_ensemble is None:
        return "ldre" if recipe.name == "ldre" and benchmark in LDRE_ENSEMBLE_BENCHMARKS else "mean"
    return rewrite_ensemble


def rewrite_ensemble_settings(rewrite_ensemble: str) -> dict:
    """What a report records about the ensemble that ran."""
    if rewrite_ensemble == "mean":
        return {"name": "mean", "description": "the mean of each query's rewrites (the pipeline's image_embeds; the "
                "LDRE authors' CIRR ranking)"}
    return {
        "name": "ldre",
        "description": "LDRE's adaptive ensemble: each rewrite slot weighted by how far its rewrites lower the "
        "gallery scores of its captions, over the whole query set; the weighted sum replaces the mean (the authors' "
        "CIRCO ranking)",
        "top_k": LDRE_TOP_K,
        "temperature": LDRE_TEMPERATURE,
        "source": _LDRE_SOURCE,
    }
