"""Evaluation of CIR pipelines on CIRR, FashionIQ, CIRCO and GeneCIS: a benchmark protocol (data: query texts,
reference exclusion, depth, metric, submission, subsets) -> the retrieval road (gallery cache, compose, exact search)
on the benchmark's official files -> the official metrics and the submission files. The
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
from .protocols import PROTOCOLS, BenchmarkProtocol, get_protocol, register_protocol
from .runner import EvaluationResult, evaluate_split, exact_index, metrics_markdown, run_evaluation
from .submissions import circo_submission, cirr_submissions

__all__ = [
    "PROTOCOLS",
    "BenchmarkProtocol",
    "EvaluationResult",
    "IdHashEncoder",
    "circo_submission",
    "cirr_submissions",
    "evaluate_split",
    "exact_index",
    "get_protocol",
    "metrics_markdown",
    "register_protocol",
    "run_evaluation",
]
