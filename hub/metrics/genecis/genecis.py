"""GeneCIS Recall@1/2/3 as an `evaluate` metric (a thin wrapper over diffusers_cir.metrics)."""

import datasets
import evaluate

from diffusers_cir.metrics import GENECIS_RECALL_KS, genecis_average_over_tasks, genecis_recall_at_k

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
    predictions (`list` of `list` of `float`): per template, the score of each candidate, ordered
        [target] + gallery as the official datasets do.
    references (`list` of `int`): per template, the index of the target among its candidates (0 officially).
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


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GeneCIS(evaluate.Metric):
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

    def _compute(self, predictions, references, tasks=None, ks=GENECIS_RECALL_KS, scale="percent"):
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
