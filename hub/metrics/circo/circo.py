"""CIRCO mAP@K, Recall@K and semantic mAP@10 as an `evaluate` metric (a thin wrapper over diffusers_cir.metrics)."""

import datasets
import evaluate
import numpy as np

from diffusers_cir.metrics import CIRCO_MAP_KS, compute_circo_metrics
from diffusers_cir.metrics.checks import IdRows, as_id_rows, check_ks, check_on_empty_ground_truth, check_scale
from diffusers_cir.metrics.evaluate_support import StoredBatchesMixin

_CITATION = """\
@inproceedings{baldrati2023zero,
  title={Zero-Shot Composed Image Retrieval with Textual Inversion},
  author={Baldrati, Alberto and Agnolucci, Lorenzo and Bertini, Marco and Del Bimbo, Alberto},
  booktitle={ICCV},
  year={2023}
}
"""

_DESCRIPTION = """\
CIRCO composed image retrieval metrics, matching the CIRCO evaluation-server code: per query,
AP@K = sum of precision@i at the relevant ranks i <= K, divided by min(#ground truths, K); mAP@K (K = 5, 10, 25, 50)
is the mean over queries. Recall@K counts the target (gt_img_ids[0]) only. The reference is not removed.
Short submissions are scored as they are; duplicate ids in a query's list are rejected. Values are percentages
by default (the server prints fractions: pass scale="fraction"). Image ids may be ints (COCO ids) or any strings;
a string that spells an integer is that integer ("0101" is 101), as the server's int cast reads it.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `int` or `str`): per query, the submitted ranked gallery ids (the top-50),
        each id once.
    references (`list` of `list` of `int` or `str`): per query, `gt_img_ids` (the target first), each id once.
        Ids may be ints or any strings (e.g. "img_12"); ints and strings can be mixed, also across batches.
        A batch that cannot be scored (not one list per query, an id that is not an int or str, a repeated id,
        a different number of `predictions` and `references`) is refused by `add_batch` / `add` and not stored.
    semantic_aspects (`list` of `list` of `str`, optional): per query, its `semantic_aspects`; adds
        semantic_map_at10_{aspect} for the 9 CIRCO aspects. Pass it to `compute`, not to `add_batch`.
    ks (`tuple` of `int`, optional): cutoffs, default (5, 10, 25, 50).
    scale (`str`, optional): "percent" (default) or "fraction".
    on_empty_ground_truth (`str`, optional): "raise" (default) or "nan" (the official NaN AP).
Returns:
    map_at{K}, recall_at{K} and optionally semantic_map_at10_{aspect} (`float`).
Examples:
    >>> circo = evaluate.load("hub/metrics/circo")
    >>> circo.compute(predictions=[[5000, 101, 5001]], references=[[101, 102]], ks=(5,), scale="fraction")
    {'map_at5': 0.25, 'recall_at5': 1.0}
"""


# Ids are stored as strings so that int ids, digit strings and other string ids can share one column (evaluate fixes
# the column type with the first batch); _compute turns them back into ints where they all are.
_FEATURES = datasets.Features(
    {
        "predictions": datasets.Sequence(datasets.Value("string")),
        "references": datasets.Sequence(datasets.Value("string")),
    }
)


def _as_stored_id(image_id: str) -> str:
    """A string spelling an integer is written as that integer ("0101" -> "101", as the server's int cast reads it)."""
    try:
        value = int(image_id)
    except ValueError:
        return image_id
    return str(value) if -(2**63) <= value < 2**63 else image_id


def _stored_id_lists(rows, name: str) -> list[list[str]]:
    """Per-query id lists as the module stores them (checked: one list per query, int or str ids, each id once)."""
    rows = as_id_rows(rows, name)
    ids = rows.values[rows.mask]
    if ids.dtype.kind == "U" and ids.size:
        try:  # all ids integers: one vectorised cast
            ids = ids.astype(np.int64)
        except (ValueError, OverflowError):
            ids = np.vectorize(_as_stored_id, otypes=[str])(ids)
    ids = ids.astype(str).tolist()
    ends = np.cumsum(rows.lengths).tolist()
    lists = [ids[start:end] for start, end in zip([0] + ends[:-1], ends)]
    for index, ids in enumerate(lists):
        if len(set(ids)) != len(ids):
            repeated = next(image_id for position, image_id in enumerate(ids) if image_id in ids[:position])
            raise ValueError(
                f"`{name}[{index}]` lists id {repeated!r} more than once ({ids}); each id may appear once per query"
                + (" (the CIRCO server rejects duplicate predictions)." if name == "predictions" else ".")
            )
    return lists


def _server_ids(rows: list[list[str]]) -> IdRows:
    """Stored id lists as ints where every id is one (the server's int ids), otherwise as strings."""
    rows = as_id_rows(rows, "ids")
    if rows.values.dtype.kind == "U":
        try:
            return IdRows(np.where(rows.mask, rows.values, "0").astype(np.int64), rows.mask)
        except (ValueError, OverflowError):
            pass
    return rows


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CIRCO(StoredBatchesMixin, evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=_FEATURES,
            reference_urls=["https://github.com/miccunifi/CIRCO"],
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of queries; a batch that cannot be scored is refused with an error and not stored."""
        # Checked before evaluate stores the batch: a stored bad batch would make every later compute() fail.
        predictions = _stored_id_lists(predictions, "predictions")
        references = _stored_id_lists(references, "references")
        if len(predictions) != len(references):
            raise ValueError(
                f"`predictions` has {len(predictions)} ranked lists but `references` has {len(references)} "
                "ground-truth lists; pass one of each per query."
            )
        super().add_batch(predictions=predictions, references=references, **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one query (checked as a batch of one)."""
        self.add_batch(predictions=[prediction], references=[reference], **{key: [value] for key, value in kwargs.items()})

    def _check_options(self, semantic_aspects=None, ks=CIRCO_MAP_KS, scale="percent", on_empty_ground_truth="raise"):
        check_ks(ks, "ks")
        check_scale(scale)
        check_on_empty_ground_truth(on_empty_ground_truth)

    def _score(self, predictions, references, semantic_aspects=None, ks=CIRCO_MAP_KS, scale="percent",
               on_empty_ground_truth="raise"):
        return compute_circo_metrics(
            ground_truth_ids=_server_ids(references),
            ranked_ids=_server_ids(predictions),
            semantic_aspects=semantic_aspects,
            ks=ks,
            scale=scale,
            on_empty_ground_truth=on_empty_ground_truth,
        )
