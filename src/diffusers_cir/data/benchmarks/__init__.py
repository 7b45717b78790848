"""Loaders of the official CIR benchmark layouts: CIRR, FashionIQ, CIRCO and GeneCIS, and the fine-grained
re-annotations Fine-CIRR and Fine-FashionIQ (FineCIR).

Each loader reads the benchmark's own annotation files (no conversion step) and returns a
:class:`CIRBenchmark`: queries (reference, text, target, ground truths, CIRR image sets, GeneCIS candidates),
the gallery ids the official code ranks, and where each image lives in the official layout.

Example:

```py
>>> from diffusers_cir.data.benchmarks import load_benchmark
>>> cirr = load_benchmark("cirr", "/data/CIRR", split="val")  # doctest: +SKIP
>>> cirr.queries[0].captions, len(cirr.gallery_ids)  # doctest: +SKIP
(['show three bottles of soft drink'], 2297)

```
"""

from __future__ import annotations

from pathlib import Path

from .base import BenchmarkLayoutError, CIRBenchmark, CIRQuery, ImageRef
from .circo import CIRCO_SPLITS, load_circo
from .cirr import CIRR_SPLITS, load_cirr
from .fashioniq import FASHIONIQ_CAPTION_STYLES, FASHIONIQ_SPLITS, join_fashioniq_captions, load_fashioniq
from .finecir import FINECIR_GALLERIES, FINECIR_SPLITS, load_fine_cirr, load_fine_fashioniq
from .genecis import GENECIS_TASKS, genecis_image_key, load_genecis

__all__ = [
    "BENCHMARKS",
    "BenchmarkLayoutError",
    "CIRBenchmark",
    "CIRQuery",
    "ImageRef",
    "CIRCO_SPLITS",
    "CIRR_SPLITS",
    "FASHIONIQ_CAPTION_STYLES",
    "FASHIONIQ_SPLITS",
    "FINECIR_GALLERIES",
    "FINECIR_SPLITS",
    "GENECIS_TASKS",
    "genecis_image_key",
    "join_fashioniq_captions",
    "load_benchmark",
    "load_circo",
    "load_cirr",
    "load_fashioniq",
    "load_fine_cirr",
    "load_fine_fashioniq",
    "load_genecis",
]

BENCHMARKS = ("cirr", "fashioniq", "circo", "genecis", "fine_cirr", "fine_fashioniq")


def load_benchmark(name: str, root: str | Path, split: str = "val", subset: str | None = None, **kwargs) -> CIRBenchmark:
    """Load ``name`` from ``root``; ``subset`` is the FashionIQ category or the GeneCIS task.

    Extra keyword arguments go to the benchmark's loader (``gallery_ids`` for CIRCO, ``image_root`` for
    GeneCIS, ``image_extension`` for FashionIQ, ``gallery`` for Fine-FashionIQ).

    Example:

    ```py
    >>> load_benchmark("fashioniq", "/data/fashionIQ_dataset", "val", subset="dress")  # doctest: +SKIP

    ```
    """
    if name == "cirr":
        return load_cirr(root, split, **kwargs)
    if name == "circo":
        return load_circo(root, split, **kwargs)
    if name == "fashioniq":
        if subset is None:
            raise ValueError(f"FashionIQ needs `subset`, one of the categories {('dress', 'shirt', 'toptee')}.")
        return load_fashioniq(root, subset, split, **kwargs)
    if name == "fine_cirr":
        return load_fine_cirr(root, split, **kwargs)
    if name == "fine_fashioniq":
        if subset is None:
            raise ValueError(f"Fine-FashionIQ needs `subset`, one of the categories {('dress', 'shirt', 'toptee')}.")
        return load_fine_fashioniq(root, subset, split, **kwargs)
    if name == "genecis":
        if subset is None:
            raise ValueError(f"GeneCIS needs `subset`, one of the tasks {GENECIS_TASKS}.")
        return load_genecis(root, subset, **kwargs)
    raise ValueError(f"Unknown benchmark {name!r}; choose one of {BENCHMARKS}.")
