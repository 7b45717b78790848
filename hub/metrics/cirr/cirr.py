"""CIRR Recall@K, Recall_subset@K and both published Avgs as an `evaluate` metric (a thin wrapper over diffusers_cir.metrics)."""

import datasets
import evaluate
import numpy as np

from diffusers_cir.metrics import CIRR_AVG_DEFINITIONS, CIRR_RECALL_KS, CIRR_SUBSET_KS, compute_cirr_metrics
from diffusers_cir.metrics.checks import (
    as_id_rows,
    as_id_vector,
    check_id_lists,
    check_ks,
    check_scale,
    id_kinds,
    unify_id_dtypes,
)
from diffusers_cir.metrics.evaluate_support import StoredBatchesMixin, check_columns_given, ids_for_storage

_CITATION = """\
@inproceedings{liu2021cirr,
  title={Image Retrieval on Real-life Images with Pre-trained Vision-and-Language Models},
  author={Liu, Zheyuan and Rodriguez-Opazo, Cristian and Teney, Damien and Gould, Stephen},
  booktitle={ICCV},
  year={2021}
}
"""

_DESCRIPTION = (
    """\
CIRR composed image retrieval metrics, matching the official validation code (CLIP4Cir / SEARLE / LinCIR) to the
digit: each query's reference image is deleted from its ranking before Recall@K (K = 1, 5, 10, 50);
Recall_subset@K (K = 1, 2, 3) ranks the 5 other members of the query's image set. Papers publish two "Avg"
columns; both are returned, under names that keep them apart:
"""
    + "".join(f"- {name}: {text}\n" for name, text in CIRR_AVG_DEFINITIONS.items())
    + "Values are percentages. The gallery must be the whole split (all of split.rc2.<split>.json).\n"
)

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `str` or `int`): per query, gallery ids ranked best first: the whole
        ranking, or enough of it (at least K + 1 ids for Recall@K; the subset ranking is read from it too).
    references (`list` of `str` or `int`): per query, the target image id (`target_hard`).
    reference_ids (`list` of `str` or `int`): per query, the reference image id (deleted from its ranking).
    group_members (`list` of `list` of `str` or `int`): per query, `img_set.members` (6 ids, reference included).
        A batch that cannot be scored (a column missing or of another length, a ranked list naming an id twice,
        a missing target, a target equal to the reference or not among `group_members`) is refused by
        `add_batch` / `add` and not stored.
        Ids may be strings or ints, mixed within and across batches; they compare as strings ("0101" is not
        "101", an int is its decimal spelling) except where string columns meet int columns in a batch and spell
        ints. After int batches, a string id that is not an int's exact spelling is refused (store strings then).
    recall_ks (`tuple` of `int`, optional): Recall@K cutoffs, default (1, 5, 10, 50).
    subset_ks (`tuple` of `int`, optional): Recall_subset@K cutoffs, default (1, 2, 3).
    scale (`str`, optional): "percent" (default, as published) or "fraction".
Returns:
    recall_at{K}, recall_subset_at{K}, avg and avg_r1_rs1 (`float`; see the description for which Avg is which).
Examples:
    >>> cirr = evaluate.load("hub/metrics/cirr")
    >>> cirr.compute(predictions=[["r", "t", "a", "b", "c", "d"]], references=["t"], reference_ids=["r"],
    ...              group_members=[["r", "t", "a", "x", "y", "z"]], recall_ks=(1, 5), subset_ks=(1,))
    {'recall_at1': 100.0, 'recall_at5': 100.0, 'recall_subset_at1': 100.0, 'avg': 100.0, 'avg_r1_rs1': 100.0}
"""


def _features(id_type: str) -> datasets.Features:
    return datasets.Features(
        {
            "predictions": datasets.Sequence(datasets.Value(id_type)),
            "references": datasets.Value(id_type),
            "reference_ids": datasets.Value(id_type),
            "group_members": datasets.Sequence(datasets.Value(id_type)),
        }
    )


def _check_batch(predictions, references, reference_ids, group_members) -> dict[str, set[str]]:
    """Refuse a batch that compute() could never score, before evaluate stores it (a stored one would make every
    later compute() fail); return the kinds of ids ("int", "str") of each column."""
    columns = {"predictions": predictions, "references": references, "reference_ids": reference_ids,
               "group_members": group_members}
    check_columns_given(columns)
    prediction_kinds = check_id_lists(predictions, "predictions")
    members = as_id_rows(group_members, "group_members")
    target, target_mask = as_id_vector(references, "references")
    reference, reference_mask = as_id_vector(reference_ids, "reference_ids")
    counts = {"predictions": len(predictions), "references": len(target), "reference_ids": len(reference),
              "group_members": len(members)}
    if len(set(counts.values())) > 1:
        raise ValueError(f"The columns of a batch must have one entry per query, got {counts}.")
    if not target_mask.all():
        raise ValueError(f"`references[{int(np.flatnonzero(~target_mask)[0])}]` is None; every query needs its target id.")
    values, target, reference = unify_id_dtypes([members.values, target, reference], [members.mask, target_mask, reference_mask])
    same = (target == reference) & reference_mask
    if same.any():
        row = int(np.flatnonzero(same)[0])
        raise ValueError(
            f"Query {row} has its reference as target (`references[{row}]` = `reference_ids[{row}]` = "
            f"{target[row].item()!r}); CIRR deletes the reference from the ranking, so the target could never be retrieved."
        )
    in_group = ((values == target[:, None]) & members.mask).any(axis=1)
    if not in_group.all():
        row = int(np.flatnonzero(~in_group)[0])
        raise ValueError(
            f"The target {target[row].item()!r} of query {row} is not among its `group_members` "
            f"({values[row][members.mask[row]].tolist()}); CIRR's img_set.members always contains the target."
        )
    return {"predictions": prediction_kinds, "references": id_kinds(references), "reference_ids": id_kinds(reference_ids),
            "group_members": id_kinds(group_members)}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CIRR(StoredBatchesMixin, evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # CIRR names images with strings; int ids (e.g. positions in a gallery) work too.
            features=[_features("string"), _features("int64")],
            reference_urls=["https://github.com/Cuberick-Orion/CIRR", "https://github.com/ABaldrati/CLIP4Cir"],
        )

    def add_batch(self, *, predictions=None, references=None, reference_ids=None, group_members=None, **kwargs):
        """Add a batch of queries; a batch that cannot be scored is refused with an error and not stored."""
        columns = dict(predictions=predictions, references=references, reference_ids=reference_ids,
                       group_members=group_members)
        kinds = _check_batch(**columns)
        stored_type = None if self.writer is None else self.selected_feature_format["references"].dtype
        stored = ids_for_storage(columns, ("predictions", "group_members"), kinds, stored_type)
        if len(set().union(*kinds.values())) > 1:  # compared as ints, "07" and 7 are one id: checked again as stored
            _check_batch(**stored)
        super().add_batch(**stored, **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one query (checked as a batch of one)."""
        self.add_batch(predictions=[prediction], references=[reference], **{key: [value] for key, value in kwargs.items()})

    def _check_options(self, recall_ks=CIRR_RECALL_KS, subset_ks=CIRR_SUBSET_KS, scale="percent"):
        check_ks(recall_ks, "recall_ks")
        check_ks(subset_ks, "subset_ks")
        check_scale(scale)

    def _score(self, predictions, references, reference_ids, group_members, recall_ks=CIRR_RECALL_KS,
               subset_ks=CIRR_SUBSET_KS, scale="percent"):
        return compute_cirr_metrics(
            target_ids=references,
            reference_ids=reference_ids,
            ranked_ids=predictions,
            group_members=group_members,
            recall_ks=recall_ks,
            subset_ks=subset_ks,
            scale=scale,
        )
