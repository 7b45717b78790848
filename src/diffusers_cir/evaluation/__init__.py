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

from __future__ import annotations

from .._lazy import lazy_names

# Imported on first use, so that `diffusers-cir --help` (which builds the evaluate parser from
# `evaluation.command_line`) does not import torch.
_LAZY_NAMES = {
    "IdHashEncoder": ".encoders",
    "PROTOCOLS": ".protocols",
    "BenchmarkProtocol": ".protocols",
    "get_protocol": ".protocols",
    "register_protocol": ".protocols",
    "EvaluationResult": ".runner",
    "evaluate_split": ".runner",
    "exact_index": ".runner",
    "metrics_markdown": ".runner",
    "run_evaluation": ".runner",
    "circo_submission": ".submissions",
    "cirr_submissions": ".submissions",
}

__all__ = sorted(_LAZY_NAMES)


__getattr__, __dir__ = lazy_names(__name__, _LAZY_NAMES, globals())
