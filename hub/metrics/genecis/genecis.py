"""GeneCIS Recall@1/2/3 as an `evaluate` metric (a thin wrapper over diffusers_cir.metrics)."""

import datasets
import evaluate
import numpy as np

from diffusers_cir.metrics import GENECIS_RECALL_KS, genecis_average_over_tasks, genecis_recall_at_k
from diffusers_cir.metrics.checks import check_ks, check_scale
from diffusers_cir.metrics.evaluate_support import StoredBatchesMixin

_CITATION = """\
@inproceedings{vaze2023genecis,
  title={GeneCIS: A Benchmark for General Conditional Image Similarity},
  author={Vaze, Sagar and Carion, Nicolas and Misra, Ishan},
  booktitle={CVPR},
  year={2023}
}
"""

_DESCRIPTION = """\
GeneCIS conditional retrieval metrics, matching the official code: each template has its own small gallery of
candidates [target] + distractors, scored by similarity to the query; Recall@K (K = 1, 2, 3) is the fraction of
templates whose target is in the top K. With per-template task names, results are given per task plus the
unweighted average over tasks (the paper's "Average"). Values are percentages by default (the official code
prints fractions: pass scale="fraction").
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): per template, the score of each candidate (finite numbers, at
        least one), ordered [target] + gallery as the official datasets do.
    references (`list` of `int`): per template, the index of the target among its candidates (0 officially).
        A batch that cannot be scored (a template without candidates, a non-finite score, a target index outside
        its template, different numbers of `predictions` and `references`) is refused by `add_batch` / `add`
        and not stored.
    tasks (`list` of `str`, optional): per template, its task ("focus_attribute", "change_attribute",
        "focus_object", "change_object"); pass it to `compute`, not to `add_batch`.
    ks (`tuple` of `int`, optional): cutoffs, default (1, 2, 3).
    scale (`str`, optional): "percent" (default) or "fraction".
Returns:
    recall_at{K}; with `tasks`: {task}_recall_at{K} and average_recall_at{K} (`float`).
Examples:
    >>> genecis = evaluate.load("hub/metrics/genecis")
    >>> genecis.compute(predictions=[[0.2, 0.9, 0.1], [0.8, 0.3, 0.1]], references=[0, 0], ks=(1, 2))
    {'recall_at1': 50.0, 'recall_at2': 100.0}
"""


def _check_batch(predictions, references) -> None:
    """Refuse a batch that compute() could never score, before evaluate stores it (a stored one would make every
    later compute() fail)."""
    for name, column in (("predictions", predictions), ("references", references)):
        if isinstance(column, (str, bytes)) or not hasattr(column, "__len__"):
            what = "one list of candidate scores" if name == "predictions" else "one target index"
            raise TypeError(f"`{name}` must hold {what} per template, got {type(column).__name__}.")
    if len(predictions) != len(references):
        raise ValueError(
            f"`predictions` has {len(predictions)} templates but `references` has {len(references)} target indices; "
            "pass one of each per template."
        )
    references = references.tolist() if hasattr(references, "tolist") else references
    for index, (scores, target) in enumerate(zip(predictions, references)):
        try:
            row = np.asarray(scores, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"`predictions[{index}]` must be a list of candidate scores (numbers), got {scores!r:.80}.") from None
        if row.ndim != 1:
            raise ValueError(
                f"`predictions[{index}]` must be a list of candidate scores, got {scores!r:.80}; `predictions` holds "
                "one list per template."
            )
        if row.size == 0:
            raise ValueError(f"`predictions[{index}]` is empty; every template needs its candidates ([target] + gallery).")
        if not np.isfinite(row).all():
            raise ValueError(f"`predictions[{index}]` has a non-finite score ({scores!r:.80}); scores must be finite.")
        if isinstance(target, (float, np.floating)) and float(target).is_integer():
            target = int(target)  # e.g. references=np.zeros(n); the int64 column stores it as that int
        if isinstance(target, (bool, np.bool_)) or not isinstance(target, (int, np.integer)):
            raise TypeError(f"`references[{index}]` must be an int (the target's candidate index), got {target!r}.")
        if not 0 <= target < row.size:
            raise ValueError(
                f"`references[{index}]` is {target} but template {index} has {row.size} candidates; the target index "
                f"must be in [0, {row.size})."
            )


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GeneCIS(StoredBatchesMixin, evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}
            ),
            reference_urls=["https://github.com/facebookresearch/genecis"],
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of templates; a batch that cannot be scored is refused with an error and not stored."""
        _check_batch(predictions, references)
        super().add_batch(predictions=predictions, references=references, **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one template (checked as a batch of one)."""
        self.add_batch(predictions=[prediction], references=[reference], **{key: [value] for key, value in kwargs.items()})

    def _check_options(self, tasks=None, ks=GENECIS_RECALL_KS, scale="percent"):
        if tasks is not None and (isinstance(tasks, str) or not hasattr(tasks, "__len__")):
            raise TypeError(f"`tasks` must hold one task name per template, got {tasks!r:.80}.")
        check_ks(ks, "ks")
        check_scale(scale)

    def _score(self, predictions, references, tasks=None, ks=GENECIS_RECALL_KS, scale="percent"):
        if not len(predictions):
            raise ValueError("There are no templates to score: `predictions` is empty (no batch was added, or only empty ones).")
        if tasks is None:
            return genecis_recall_at_k(predictions, target_indices=references, ks=ks, scale=scale)
        if len(tasks) != len(predictions):
            raise ValueError(f"`tasks` has {len(tasks)} entries but there are {len(predictions)} templates.")
        per_task = {}
        for task in dict.fromkeys(tasks):
            rows = [index for index, name in enumerate(tasks) if name == task]
            per_task[task] = genecis_recall_at_k(
                [predictions[index] for index in rows],
                target_indices=[references[index] for index in rows],
                ks=ks,
                scale=scale,
            )
        return genecis_average_over_tasks(per_task)
