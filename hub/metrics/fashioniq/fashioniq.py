"""FashionIQ Recall@10/50 per category and averaged, as an `evaluate` metric (wrapper over diffusers_cir.metrics)."""

import datasets
import evaluate

from diffusers_cir.metrics import FASHIONIQ_CATEGORIES, FASHIONIQ_RECALL_KS, compute_fashioniq_metrics

_CITATION = """\
@inproceedings{wu2021fashioniq,
  title={Fashion IQ: A New Dataset Towards Retrieving Images by Natural Language Feedback},
  author={Wu, Hui and Gao, Yupeng and Guo, Xiaoxiao and Al-Halah, Ziad and Rennie, Steven and Grauman, Kristen and Feris, Rogerio},
  booktitle={CVPR},
  year={2021}
}
"""

_DESCRIPTION = """\
FashionIQ composed image retrieval metrics, matching the official validation code (CLIP4Cir / SEARLE / LinCIR):
Recall@10 and Recall@50 per category (dress, shirt, toptee), each over its own gallery (all ids of
split.<category>.val.json), with the reference ("candidate") NOT removed from the ranking; then unweighted
averages over the categories and average_recall = (average R@10 + average R@50) / 2. Values are percentages.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `str` or `int`): per query, ids of its category gallery ranked best
        first (at least max(K) ids).
    references (`list` of `str` or `int`): per query, the target id.
    categories (`list` of `str`): per query, its category ("dress", "shirt" or "toptee").
    ks (`tuple` of `int`, optional): cutoffs, default (10, 50).
    scale (`str`, optional): "percent" (default) or "fraction".
Returns:
    {category}_recall_at{K} for each category present, average_recall_at{K} and average_recall (`float`).
Examples:
    >>> fiq = evaluate.load("hub/metrics/fashioniq")
    >>> fiq.compute(predictions=[["a", "b"], ["c", "d"]], references=["b", "c"], categories=["dress", "shirt"], ks=(1, 2))
    {'dress_recall_at1': 0.0, 'dress_recall_at2': 100.0, 'shirt_recall_at1': 100.0, 'shirt_recall_at2': 100.0, 'average_recall_at1': 50.0, 'average_recall_at2': 100.0, 'average_recall': 75.0}
"""


def _features(id_type: str) -> datasets.Features:
    return datasets.Features(
        {
            "predictions": datasets.Sequence(datasets.Value(id_type)),
            "references": datasets.Value(id_type),
            "categories": datasets.Value("string"),
        }
    )


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class FashionIQ(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[_features("string"), _features("int64")],
            reference_urls=["https://github.com/XiaoxiaoGuo/fashion-iq", "https://github.com/ABaldrati/CLIP4Cir"],
        )

    def _compute(self, predictions, references, categories, ks=FASHIONIQ_RECALL_KS, scale="percent"):
        unknown = sorted(set(categories) - set(FASHIONIQ_CATEGORIES))
        if unknown:
            raise ValueError(f"Unknown FashionIQ categories {unknown}; expected {list(FASHIONIQ_CATEGORIES)}.")
        per_category = {}
        for category in FASHIONIQ_CATEGORIES:
            rows = [index for index, name in enumerate(categories) if name == category]
            if rows:
                per_category[category] = {
                    "target_ids": [references[index] for index in rows],
                    "ranked_ids": [predictions[index] for index in rows],
                }
        return compute_fashioniq_metrics(per_category, ks=ks, scale=scale)
