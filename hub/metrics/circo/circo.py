"""CIRCO mAP@K, Recall@K and semantic mAP@10 as an `evaluate` metric (a thin wrapper over diffusers_cir.metrics)."""

import datasets
import evaluate

from diffusers_cir.metrics import CIRCO_MAP_KS, compute_circo_metrics

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
by default (the server prints fractions: pass scale="fraction").
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `int` or `str`): per query, the submitted ranked gallery ids (the top-50).
    references (`list` of `list` of `int` or `str`): per query, `gt_img_ids` (the target first).
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


def _features(id_type: str) -> datasets.Features:
    return datasets.Features(
        {
            "predictions": datasets.Sequence(datasets.Value(id_type)),
            "references": datasets.Sequence(datasets.Value(id_type)),
        }
    )


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CIRCO(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # COCO ids are ints; digit strings are cast to int as the server does (np.array(..., dtype=int)).
            features=[_features("int64"), _features("string")],
            reference_urls=["https://github.com/miccunifi/CIRCO"],
        )

    def _compute(self, predictions, references, semantic_aspects=None, ks=CIRCO_MAP_KS, scale="percent",
                 on_empty_ground_truth="raise"):
        return compute_circo_metrics(
            ground_truth_ids=references,
            ranked_ids=predictions,
            semantic_aspects=semantic_aspects,
            ks=ks,
            scale=scale,
            on_empty_ground_truth=on_empty_ground_truth,
        )
