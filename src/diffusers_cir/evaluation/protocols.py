"""How each benchmark is evaluated, as data: :class:`BenchmarkProtocol` presets, one or more per benchmark.

A protocol says how the query texts are built, whether each query's reference is left out of its ranking, how deep
rankings go, which metric function scores them (and with which of the ranked split's columns and fixed options),
which submission files a hidden-label split gets, which subsets a benchmark has and how their metrics are averaged,
and which pipeline-call arguments it fixes. The runner (:mod:`.runner`) does the same for every benchmark: embed
(gallery cache) -> compose -> rank -> score with the protocol's metric -> write files.

The first protocol registered for a benchmark is its default (the official one). A variant is a small data change;
for example a protocol with other query texts, the reference kept and the text truncated at 75 tokens::

    >>> from dataclasses import replace
    >>> def authors_texts(query, template):
    ...     return [template.format(f"{query.captions[0]}, and {query.captions[1]}")]
    >>> variant = register_protocol(replace(get_protocol("fashioniq"), name="authors-example",
    ...                                     query_texts=authors_texts, call_kwargs={"max_sequence_length": 75},
    ...                                     settings={}))
    >>> get_protocol("fashioniq", "authors-example").exclude_reference, "authors-example" in PROTOCOLS["fashioniq"]
    (False, True)
    >>> _ = PROTOCOLS["fashioniq"].pop("authors-example")

Columns a protocol's metric and submission read (one entry per query, in file order): ``query_ids``,
``target_ids``, ``reference_ids``, ``ground_truth_ids``, ``ranked_ids`` (best first; for per-query candidates,
the candidates in ranked order), ``group_rankings`` (with ``rank_group_members``: the query's image-set members other
than its reference, ranked), ``candidate_scores`` (per-query candidates, target first: GeneCIS) and
``extra:<key>`` (a loader field kept in ``CIRQuery.extra``, ``[]`` when absent).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

from ..data.benchmarks import CIRQuery, join_fashioniq_captions
from ..metrics import (
    CIRCO_MAP_KS,
    CIRR_RECALL_KS,
    CIRR_SUBSET_KS,
    FASHIONIQ_CATEGORIES,
    FASHIONIQ_RECALL_KS,
    GENECIS_RECALL_KS,
    GENECIS_TASKS,
    compute_circo_metrics,
    compute_cirr_metrics,
    fashioniq_average_recall,
    fashioniq_recall_at_k,
    genecis_average_over_tasks,
    genecis_recall_at_k,
)
from .submissions import CIRCO_DEPTH, CIRR_RECALL_DEPTH, circo_submission_files, cirr_submission_files

__all__ = ["BenchmarkProtocol", "PROTOCOLS", "get_protocol", "register_protocol"]

QueryTexts = Callable[[CIRQuery, str], list]


@dataclass(frozen=True)
class BenchmarkProtocol:
    """How one benchmark is evaluated (see the module docstring for the columns).

    Attributes:
        benchmark: the loader's name (``diffusers_cir.data.benchmarks.load_benchmark``).
        name: the preset's name; the first registered for a benchmark is its default.
        query_texts: ``query_texts(query, prompt_template) -> [text, ...]``; several texts are averaged.
        metric: the metric function; ``None`` when the benchmark has no public labels.
        metric_inputs: metric argument -> the column it reads.
        metric_options: fixed metric arguments (cutoffs).
        exclude_reference: leave each query's reference out of its ranking (CIRR).
        depth: ids kept per ranking of a shared gallery (what the metrics and the submission read).
        rank_group_members: also rank each query's image-set members, reference left out (CIRR Recall_subset).
        submission: ``submission(columns, split) -> {role: (file name, JSON)}``, for hidden-label splits.
        subsets: the benchmark's subsets (FashionIQ categories, GeneCIS tasks), each loaded and ranked alone.
        average: subset metrics ``{subset: metrics}`` -> the reported metrics (``None``: the one split's metrics).
        call_kwargs: pipeline-call arguments the protocol fixes (a text truncation, ...); the caller's win.
        settings: what the report records about the protocol beside its name.
    """

    benchmark: str
    name: str
    query_texts: QueryTexts
    metric: Callable[..., dict] | None
    metric_inputs: Mapping[str, str]
    metric_options: Mapping[str, Any] = field(default_factory=dict)
    exclude_reference: bool = False
    depth: int = 50
    rank_group_members: bool = False
    submission: Callable[[Mapping[str, list], str], dict] | None = None
    subsets: tuple[str, ...] = ()
    average: Callable[[Mapping[str, Mapping[str, float]]], dict] | None = None
    call_kwargs: Mapping[str, Any] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)

    def score(self, columns: Mapping[str, list]) -> dict[str, float]:
        """The protocol's metrics of a ranked split."""
        arguments = {argument: columns[column] for argument, column in self.metric_inputs.items()}
        return self.metric(**arguments, **self.metric_options)


PROTOCOLS: dict[str, dict[str, BenchmarkProtocol]] = {}
"""Protocols by benchmark, then by name (the first of each benchmark is its default)."""


def register_protocol(protocol: BenchmarkProtocol) -> BenchmarkProtocol:
    """Add ``protocol`` to :data:`PROTOCOLS` (a later one of the same benchmark and name replaces it)."""
    PROTOCOLS.setdefault(protocol.benchmark, {})[protocol.name] = protocol
    return protocol


def get_protocol(benchmark: str, name: str | None = None, *, argument: str = "protocol") -> BenchmarkProtocol:
    """The protocol ``name`` of ``benchmark`` (``None``: its default); a ``ValueError`` naming ``argument`` and the
    choices otherwise."""
    if benchmark not in PROTOCOLS:
        raise ValueError(f"Unknown benchmark {benchmark!r}; choose one of {tuple(PROTOCOLS)}.")
    presets = PROTOCOLS[benchmark]
    if name is None:
        return next(iter(presets.values()))
    if name not in presets:
        raise ValueError(f"`{argument}` must be one of {tuple(presets)} for {benchmark}, got {name!r}.")
    return presets[name]


# --------------------------------------------------------------------------------------------------- query texts


def caption_text(query: CIRQuery, template: str) -> list[str]:
    """The query's one caption in the template (CIRR, CIRCO, GeneCIS's condition)."""
    return [template.format(query.captions[0])]


def clip4cir_texts(query: CIRQuery, template: str) -> list[str]:
    """FashionIQ's two captions joined as CLIP4Cir does (one text)."""
    return join_fashioniq_captions(query.captions, "clip4cir", template)


def searle_texts(query: CIRQuery, template: str) -> list[str]:
    """FashionIQ's two captions joined in both orders, as SEARLE and LinCIR do (two texts, averaged)."""
    return join_fashioniq_captions(query.captions, "searle", template)


# --------------------------------------------------------------------------------------------------- presets

register_protocol(BenchmarkProtocol(
    benchmark="cirr",
    name="standard",
    query_texts=caption_text,
    metric=compute_cirr_metrics,
    metric_inputs={"target_ids": "target_ids", "reference_ids": "reference_ids", "ranked_ids": "ranked_ids",
                   "ranked_subset_ids": "group_rankings"},
    metric_options={"recall_ks": CIRR_RECALL_KS, "subset_ks": CIRR_SUBSET_KS},
    exclude_reference=True,
    depth=max(max(CIRR_RECALL_KS), CIRR_RECALL_DEPTH),
    rank_group_members=True,
    submission=cirr_submission_files,
))

_FASHIONIQ = register_protocol(BenchmarkProtocol(
    benchmark="fashioniq",
    name="clip4cir",
    query_texts=clip4cir_texts,
    metric=fashioniq_recall_at_k,
    metric_inputs={"target_ids": "target_ids", "ranked_ids": "ranked_ids"},
    depth=max(FASHIONIQ_RECALL_KS),
    subsets=FASHIONIQ_CATEGORIES,
    average=fashioniq_average_recall,
    settings={"caption_style": "clip4cir"},
))
register_protocol(replace(_FASHIONIQ, name="searle", query_texts=searle_texts, settings={"caption_style": "searle"}))

register_protocol(BenchmarkProtocol(
    benchmark="circo",
    name="standard",
    query_texts=caption_text,
    metric=compute_circo_metrics,
    metric_inputs={"ground_truth_ids": "ground_truth_ids", "ranked_ids": "ranked_ids",
                   "semantic_aspects": "extra:semantic_aspects", "query_ids": "query_ids"},
    depth=max(max(CIRCO_MAP_KS), CIRCO_DEPTH),  # the reference stays: CIRCO does not remove it
    submission=circo_submission_files,
))

register_protocol(BenchmarkProtocol(
    benchmark="genecis",
    name="standard",
    query_texts=caption_text,
    metric=genecis_recall_at_k,
    metric_inputs={"candidate_scores": "candidate_scores"},
    metric_options={"ks": GENECIS_RECALL_KS},
    subsets=GENECIS_TASKS,
    average=genecis_average_over_tasks,
))


# --------------------------------------------------------------------------------------------------- authors' protocols
# How the authors of a published model ran their own evaluation, where it differs from the official protocol: a
# variant of the official preset, chosen by name (``--protocol bgevl``). The official protocol stays the default.

BGEVL_MAX_SEQUENCE_LENGTH = 75
_BGEVL_SOURCE = "VectorSpaceLab/MegaPairs eval/ at ad99aca (eval_Circo.py, eval_fashioniq.py, flag_mmret.py, data/*.jsonl)"


def _shared_concept(query: CIRQuery, protocol: str) -> str:
    shared = query.extra.get("shared_concept")
    if not isinstance(shared, str):
        raise ValueError(
            f"CIRCO query {query.query_id!r} has no `shared_concept`, which the {protocol} protocol's query text needs "
            "(the official CIRCO annotation files have one per query)."
        )
    return shared


def bgevl_circo_texts(query: CIRQuery, template: str) -> list[str]:
    """BGE-VL's CIRCO query: ``Find a picture that also {shared concept}, but {relative caption}.`` (the text of all
    800 test queries in the authors' ``circo_query.jsonl``)."""
    shared = _shared_concept(query, "bgevl")
    return [template.format(f"Find a picture that also {shared}, but {query.captions[0]}.")]


def bgevl_fashioniq_texts(query: CIRQuery, template: str) -> list[str]:
    """BGE-VL's FashionIQ query: the two captions verbatim (case, periods and spaces kept), in the annotation's order,
    joined with ``", and "`` (one text)."""
    first, second = query.captions
    return [template.format(f"{first}, and {second}")]


def _bgevl(benchmark: str, query_texts: QueryTexts, query_text: str, **changes) -> BenchmarkProtocol:
    official = get_protocol(benchmark)
    settings = {
        "description": "the BGE-VL authors' protocol (MegaPairs); the official protocol is the default",
        "query_text": query_text,
        "max_sequence_length": BGEVL_MAX_SEQUENCE_LENGTH,
        "reference_excluded": changes.get("exclude_reference", official.exclude_reference),
        "source": _BGEVL_SOURCE,
    }
    settings.update(changes.pop("settings", {}))
    return register_protocol(replace(
        official, name="bgevl", query_texts=query_texts, settings=settings,
        call_kwargs={**official.call_kwargs, "max_sequence_length": BGEVL_MAX_SEQUENCE_LENGTH}, **changes,
    ))


# The reference stays in both of the authors' scripts, as in the official CIRCO and FashionIQ protocols.
_bgevl("circo", bgevl_circo_texts, "Find a picture that also {shared_concept}, but {relative_caption}.")
_bgevl("fashioniq", bgevl_fashioniq_texts, "{caption 0}, and {caption 1}")
# The authors published no CIRR evaluation (MegaPairs issue 34 asks for it): the caption is used as it is and the
# official reference exclusion is kept; only the truncation comes from their code.
_bgevl("cirr", caption_text, "{caption}", settings={
    "note": "the authors published no CIRR evaluation code: caption and reference exclusion are the official ones"})



_MAGICLENS_SOURCE = "google-deepmind/magiclens at 5135f58 (data_utils.py: build_circo_dataset, build_fiq_dataset)"


def magiclens_circo_texts(query: CIRQuery, template: str) -> list[str]:
    """MagicLens's CIRCO query: ``find {shared concept} but {relative caption}``."""
    return [template.format(f"find {_shared_concept(query, 'magiclens')} but {query.captions[0]}")]


def magiclens_fashioniq_texts(query: CIRQuery, template: str) -> list[str]:
    """MagicLens's FashionIQ query: the two captions as they are (not stripped), joined with ``" and "``."""
    return [template.format(" and ".join(query.captions))]


def _magiclens(benchmark: str, query_texts: QueryTexts, query_text: str) -> BenchmarkProtocol:
    official = get_protocol(benchmark)
    return register_protocol(replace(official, name="magiclens", query_texts=query_texts, settings={
        "description": "the MagicLens authors' protocol; the official protocol is the default",
        "query_text": query_text,
        "reference_excluded": official.exclude_reference,
        "source": _MAGICLENS_SOURCE,
    }))


# The authors' code keeps the reference (as the official CIRCO and FashionIQ protocols do) and has no CIRR evaluation.
_magiclens("circo", magiclens_circo_texts, "find {shared_concept} but {relative_caption}")
_magiclens("fashioniq", magiclens_fashioniq_texts, "{caption 0} and {caption 1}")


# --------------------------------------------------------------------------------------------------- FineCIR
# Fine-CIRR and Fine-FashionIQ (FineCIR, Li et al.): the benchmarks' images with fine-grained modification texts. How
# the authors evaluate them (SDU-L/FineCIR at 9b2f836, code/test.py): Fine-CIRR as CIRR (reference excluded, Recall@K
# and Recall_subset@K); Fine-FashionIQ per category on the images of its queries (the loader's default gallery), the
# reference excluded, Recall@1/10/50, averaged over the categories.
_FINECIR_SOURCE = "SDU-L/FineCIR at 9b2f836 (code/test.py)"
FINE_FASHIONIQ_RECALL_KS = (1, 10, 50)

register_protocol(replace(get_protocol("cirr"), benchmark="fine_cirr", name="standard", submission=None,
                          settings={"source": _FINECIR_SOURCE}))
register_protocol(BenchmarkProtocol(
    benchmark="fine_fashioniq",
    name="finecir",
    query_texts=caption_text,
    metric=fashioniq_recall_at_k,
    metric_inputs={"target_ids": "target_ids", "ranked_ids": "ranked_ids"},
    metric_options={"ks": FINE_FASHIONIQ_RECALL_KS},
    exclude_reference=True,
    depth=max(FINE_FASHIONIQ_RECALL_KS),
    subsets=FASHIONIQ_CATEGORIES,
    average=fashioniq_average_recall,
    settings={"description": "the FineCIR authors' evaluation: the queries' images as gallery, reference excluded",
              "source": _FINECIR_SOURCE},
))
