"""Evaluation of CIR models on CIRR, FashionIQ, CIRCO and GeneCIS: encoders adapter, gallery cache, ranking,
official metrics and submission files. The ``diffusers-cir evaluate`` command and ``examples/evaluate_cir.py``
are thin front-ends over :func:`run_evaluation`.

Example:

```py
>>> from diffusers_cir.evaluation import PipelineEncoder, run_evaluation
>>> encoder = PipelineEncoder.from_pretrained("path/to/compodiff-folder", call_kwargs={"num_inference_steps": 10})  # doctest: +SKIP
>>> result = run_evaluation(encoder, "circo", "/data/CIRCO", "val", output_dir="eval/circo")  # doctest: +SKIP
>>> result.metrics["map_at10"]  # doctest: +SKIP

```
"""

from .cache import EmbeddingCache
from .encoders import CIREncoder, IdHashEncoder, PipelineEncoder, pipeline_class_for_folder
from .runner import EvaluationResult, compose_queries, evaluate_split, metrics_markdown, run_evaluation
from .search import ExactSearcher, Searcher, drop_excluded, normalize
from .submissions import circo_submission, cirr_submissions

__all__ = [
    "CIREncoder",
    "EmbeddingCache",
    "EvaluationResult",
    "ExactSearcher",
    "IdHashEncoder",
    "PipelineEncoder",
    "Searcher",
    "circo_submission",
    "cirr_submissions",
    "compose_queries",
    "drop_excluded",
    "evaluate_split",
    "metrics_markdown",
    "normalize",
    "pipeline_class_for_folder",
    "run_evaluation",
]
