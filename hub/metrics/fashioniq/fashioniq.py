"""FashionIQ Recall@10/50 per category and averaged, as an `evaluate` metric (wrapper over diffusers_cir.metrics)."""

import datasets
import evaluate
import numpy as np

from diffusers_cir.metrics import FASHIONIQ_CATEGORIES, FASHIONIQ_RECALL_KS, compute_fashioniq_metrics
from diffusers_cir.metrics.checks import as_id_vector, check_id_lists, check_ks, check_scale, id_kinds
from diffusers_cir.metrics.evaluate_support import StoredBatchesMixin, check_columns_given, ids_for_storage

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
        A batch that cannot be scored (a column missing or of another length, a ranked list naming an id twice,
        a missing target, an unknown category) is refused by `add_batch` / `add` and not stored.
        Ids may be strings or ints, mixed within and across batches; they compare as strings ("0101" is not
        "101", an int is its decimal spelling) except where string columns meet int columns in a batch and spell
        ints. After int batches, a string id that is not an int's exact spelling is refused (store strings then).
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


def _check_categories(categories) -> None:
    if isinstance(categories, (str, bytes)) or not hasattr(categories, "__len__"):
        raise TypeError(f"`categories` must hold one category name per query, got {categories!r:.80}.")
    unknown = sorted({str(name) for name in categories} - set(FASHIONIQ_CATEGORIES))
    if unknown:
        raise ValueError(f"Unknown FashionIQ categories {unknown} in `categories`; expected {list(FASHIONIQ_CATEGORIES)}.")


def _check_batch(predictions, references, categories) -> dict[str, set[str]]:
    """Refuse a batch that compute() could never score, before evaluate stores it (a stored one would make every
    later compute() fail); return the kinds of ids ("int", "str") of each id column."""
    columns = {"predictions": predictions, "references": references, "categories": categories}
    check_columns_given(columns)
    prediction_kinds = check_id_lists(predictions, "predictions")
    _, target_mask = as_id_vector(references, "references")
    _check_categories(categories)
    counts = {"predictions": len(predictions), "references": len(target_mask), "categories": len(categories)}
    if len(set(counts.values())) > 1:
        raise ValueError(f"The columns of a batch must have one entry per query, got {counts}.")
    if not target_mask.all():
        raise ValueError(f"`references[{int(np.flatnonzero(~target_mask)[0])}]` is None; every query needs its target id.")
    return {"predictions": prediction_kinds, "references": id_kinds(references)}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class FashionIQ(StoredBatchesMixin, evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[_features("string"), _features("int64")],
            reference_urls=["https://github.com/XiaoxiaoGuo/fashion-iq", "https://github.com/ABaldrati/CLIP4Cir"],
        )

    def add_batch(self, *, predictions=None, references=None, categories=None, **kwargs):
        """Add a batch of queries; a batch that cannot be scored is refused with an error and not stored."""
        kinds = _check_batch(predictions, references, categories)
        stored_type = None if self.writer is None else self.selected_feature_format["references"].dtype
        stored = ids_for_storage(dict(predictions=predictions, references=references), ("predictions",), kinds, stored_type)
        if len(set().union(*kinds.values())) > 1:  # compared as ints, "07" and 7 are one id: checked again as stored
            _check_batch(stored["predictions"], stored["references"], categories)
        super().add_batch(**stored, categories=categories, **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one query (checked as a batch of one)."""
        self.add_batch(predictions=[prediction], references=[reference], **{key: [value] for key, value in kwargs.items()})

    def _check_options(self, ks=FASHIONIQ_RECALL_KS, scale="percent"):
        check_ks(ks, "ks")
        check_scale(scale)

    def _score(self, predictions, references, categories, ks=FASHIONIQ_RECALL_KS, scale="percent"):
        _check_categories(categories)
        per_category = {}
        for category in FASHIONIQ_CATEGORIES:
            rows = [index for index, name in enumerate(categories) if name == category]
            if rows:
                per_category[category] = {
                    "target_ids": [references[index] for index in rows],
                    "ranked_ids": [predictions[index] for index in rows],
                }
        return compute_fashioniq_metrics(per_category, ks=ks, scale=scale)
