"""Names of the benchmarks' parts that the loaders (``diffusers_cir.data.benchmarks``) and the metrics
(``diffusers_cir.metrics``) both use. They live here so that neither package imports the other."""

FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")
"""The FashionIQ categories, each with its own captions, image split and gallery."""

GENECIS_TASKS = ("focus_attribute", "change_attribute", "focus_object", "change_object")
"""The GeneCIS tasks, each with its own templates and per-query candidates."""
