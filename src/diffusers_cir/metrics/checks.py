"""Public argument checks and id helpers of the metrics, for code built on them (the `evaluate` modules in
``hub/metrics/``, other evaluation front-ends). Everything importable from here is a documented, stable name: the
published metric Spaces import only this module, :mod:`diffusers_cir.metrics` and
:mod:`diffusers_cir.metrics.evaluate_support`.

Example:

```py
>>> from diffusers_cir.metrics.checks import check_ks, check_scale
>>> check_ks(10, "recall_ks"), check_scale("percent")
((10,), 100.0)

```
"""

from __future__ import annotations

from .circo import check_on_empty_ground_truth
from .ids import IdRows, as_id_rows, as_id_vector, check_id_lists, id_kinds, unify_id_dtypes
from .ranking import check_ks, check_scale

__all__ = [
    "IdRows",
    "as_id_rows",
    "as_id_vector",
    "check_id_lists",
    "check_ks",
    "check_on_empty_ground_truth",
    "check_scale",
    "id_kinds",
    "unify_id_dtypes",
]
