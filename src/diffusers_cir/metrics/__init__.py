"""Composed Image Retrieval metrics: the one implementation of the CIRR, FashionIQ, CIRCO and GeneCIS formulas.

Everything here takes plain arrays (numpy, torch or lists): a ``[Q, G]`` score matrix with the gallery ids,
or ranked top-k id lists (what a retrieval index or a test-server submission holds). Ids may be ints or
strings. Aggregates are returned in percent by default (as published); pass ``scale="fraction"`` for the
fractions some official code prints. The evaluate modules under ``hub/metrics/``, the evaluation runner and
the CLI all call these functions.

Example:

```py
>>> from diffusers_cir.metrics import compute_cirr_metrics
>>> compute_cirr_metrics(target_ids=["t"], reference_ids=["r"], ranked_ids=[["r", "t", "x", "y", "z", "w"]],
...                      group_members=[["r", "t", "x"]], recall_ks=(1, 5), subset_ks=(1,))
{'recall_at1': 100.0, 'recall_at5': 100.0, 'recall_subset_at1': 100.0, 'avg': 100.0, 'avg_r1_rs1': 100.0}

```
"""

from .circo import CIRCO_MAP_KS, CIRCO_SEMANTIC_ASPECTS, circo_per_query, circo_semantic_map, compute_circo_metrics
from .cirr import (
    CIRPLANT_RECALL_KS,
    CIRR_AVG_DEFINITIONS,
    CIRR_RECALL_KS,
    CIRR_SUBSET_KS,
    cirplant_soft_recall,
    cirr_avg,
    cirr_avg_r1_rs1,
    cirr_per_query,
    compute_cirr_metrics,
)
from .fashioniq import (
    FASHIONIQ_CATEGORIES,
    FASHIONIQ_RECALL_KS,
    compute_fashioniq_metrics,
    fashioniq_average_recall,
    fashioniq_per_query,
    fashioniq_recall_at_k,
)
from .genecis import (
    GENECIS_RECALL_KS,
    GENECIS_TASKS,
    genecis_average_over_tasks,
    genecis_per_query,
    genecis_recall_at_k,
)
from .ranking import (
    NOT_RETRIEVED,
    DuplicateIdError,
    PositiveRanks,
    average_precision_at_k,
    hits_at_k,
    ranks_from_ranked_lists,
    ranks_from_scores,
)
from .recall import recall_at_k, recall_per_query

__all__ = [
    "CIRCO_MAP_KS",
    "CIRCO_SEMANTIC_ASPECTS",
    "CIRPLANT_RECALL_KS",
    "CIRR_AVG_DEFINITIONS",
    "CIRR_RECALL_KS",
    "CIRR_SUBSET_KS",
    "FASHIONIQ_CATEGORIES",
    "FASHIONIQ_RECALL_KS",
    "GENECIS_RECALL_KS",
    "GENECIS_TASKS",
    "NOT_RETRIEVED",
    "DuplicateIdError",
    "PositiveRanks",
    "average_precision_at_k",
    "circo_per_query",
    "circo_semantic_map",
    "cirplant_soft_recall",
    "cirr_avg",
    "cirr_avg_r1_rs1",
    "cirr_per_query",
    "compute_circo_metrics",
    "compute_cirr_metrics",
    "compute_fashioniq_metrics",
    "fashioniq_average_recall",
    "fashioniq_per_query",
    "fashioniq_recall_at_k",
    "genecis_average_over_tasks",
    "genecis_per_query",
    "genecis_recall_at_k",
    "hits_at_k",
    "ranks_from_ranked_lists",
    "ranks_from_scores",
    "recall_at_k",
    "recall_per_query",
]
