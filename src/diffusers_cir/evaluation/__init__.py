"""Evaluation of CIR pipelines on CIRR, FashionIQ, CIRCO and GeneCIS: the retrieval road (gallery cache, compose,
exact search) run on a benchmark's official files, the official metrics and the submission files. The
``diffusers-cir evaluate`` command and ``examples/evaluate_cir.py`` are thin front-ends over :func:`run_evaluation`.

Example:

```py
>>> from diffusers_cir import AutoCIRPipeline
>>> from diffusers_cir.evaluation import run_evaluation
>>> pipe = AutoCIRPipeline.from_pretrained("path/to/compodiff-folder")  # doctest: +SKIP
>>> result = run_evaluation(pipe, "circo", "/data/CIRCO", "val", output_dir="eval/circo",
...                         call_kwargs={"num_inference_steps": 10})  # doctest: +SKIP
>>> result.metrics["map_at10"]  # doctest: +SKIP

```
"""

from .encoders import IdHashEncoder
from .runner import EvaluationResult, evaluate_split, exact_index, metrics_markdown, run_evaluation
from .submissions import circo_submission, cirr_submissions

__all__ = [
    "EvaluationResult",
    "IdHashEncoder",
    "circo_submission",
    "cirr_submissions",
    "evaluate_split",
    "exact_index",
    "metrics_markdown",
    "run_evaluation",
]
