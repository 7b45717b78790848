# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Model cards for saved CIR pipelines: ``README.md`` with the Hub's YAML metadata and what the weights reproduce.

Every ``save_pretrained`` of a CIR pipeline writes one (:meth:`CIRPipelineMixin.save_pretrained
<diffusers_cir.pipelines.auto.CIRPipelineMixin.save_pretrained>`), built from three sources, later ones winning:

1. the pipeline class (``_model_card_fields``: tags, pipeline tag, a description, the paper), merged along the MRO so
   a class extends its bases;
2. the card of the folder the pipeline was loaded from, when it has one (so a load and a save keep the provenance;
   its measured results are kept only while the weights are the ones they were measured on, see below);
3. a :class:`ModelCardInfo` given by whoever made the weights: a conversion (base model, license, the command), a
   training run (datasets, the command, validation metrics), or the user (``save_pretrained(..., model_card=...)``).

Results (:class:`ModelResult`) go to the card's ``model-index`` (the Hub shows them as evaluation results) and to a
table with the protocol and the command that measures them. The card records a digest of every weight of the
pipeline (``diffusers_cir.weights``); results carried over from a loaded card are dropped, with a note, when the
weights no longer match it (a fine-tuned pipeline does not inherit its base's numbers).

A ``README.md`` this module wrote ends with :data:`GENERATED_MARKER` and is rewritten on every save. A ``README.md``
without the marker was written by someone else and is never overwritten: the save leaves it as it is and logs a
warning (delete it, or add the marker line, to get a generated card).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
LIBRARY_NAME = "diffusers-cir"
GENERATED_MARKER = "<!-- model card written by diffusers-cir: it is rewritten on save (remove this line to keep edits) -->"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
METRIC_NAMES = {"recall_at": "Recall@{}", "map_at": "mAP@{}", "recall_subset_at": "Recall_subset@{}"}


@dataclass
class ModelResult:
    """A measured result of the weights: what was measured, on what, how, and the command that measures it again.

    Attributes:
        dataset: the benchmark or data set, as people name it ("CIRR", "picture world (seed 0)").
        metrics: ``{metric id: value}``, e.g. ``{"recall_at1": 0.412}`` (fractions or percentages, as ``protocol``
            says).
        split: the split measured ("validation", "test1").
        dataset_id: the Hub dataset id or short type ("cirr"), for the card's ``model-index``.
        protocol: how it is measured (gallery, exclusions, guidance, steps, scale of the numbers).
        command: the command line that measures it again.
    """

    dataset: str
    metrics: dict[str, float]
    split: str | None = None
    dataset_id: str | None = None
    protocol: str | None = None
    command: str | None = None


@dataclass
class ModelCardInfo:
    """What the maker of the weights knows about them (every field optional).

    Attributes:
        model_name: the title of the card (default: the folder's name).
        description: a paragraph on what these weights are.
        base_model: the models these weights come from: Hub ids go to the YAML ``base_model`` field, anything else
            (a local path) is named in the prose only.
        datasets: the data they were trained on (Hub ids to YAML ``datasets``, anything else in the prose).
        license: an SPDX-like Hub license id ("apache-2.0", "cc-by-nc-4.0").
        tags: extra Hub tags.
        made_with: the command that made the weights (a conversion or training command line).
        results: what the weights reproduce (:class:`ModelResult`).
        notes: further lines for the card ("trained for 2,500 steps at batch 256").
    """

    model_name: str | None = None
    description: str | None = None
    base_model: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    license: str | None = None
    tags: list[str] = field(default_factory=list)
    made_with: str | None = None
    results: list[ModelResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def coerce(cls, value: ModelCardInfo | Mapping[str, Any] | None) -> ModelCardInfo:
        """A :class:`ModelCardInfo` from itself, a mapping of its fields (results as mappings too), or ``None``."""
        if value is None:
            return cls()
        if isinstance(value, ModelCardInfo):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"`model_card` must be a ModelCardInfo or a dict of its fields, got {type(value).__name__}.")
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"`model_card` has unknown fields {unknown}; the fields are {sorted(known)}.")
        values = dict(value)
        values["results"] = [
            result if isinstance(result, ModelResult) else ModelResult(**result) for result in values.get("results", [])
        ]
        for name in ("base_model", "datasets", "tags", "notes"):
            if isinstance(values.get(name), str):
                values[name] = [values[name]]
        return cls(**values)

    def merged_over(self, base: ModelCardInfo) -> ModelCardInfo:
        """This info where it says something, ``base`` elsewhere; lists are joined (duplicates once)."""
        merged = {}
        for item in fields(self):
            mine, theirs = getattr(self, item.name), getattr(base, item.name)
            if isinstance(mine, list):
                if item.name == "results":
                    merged[item.name] = list(mine) if mine else list(theirs)
                else:
                    merged[item.name] = list(dict.fromkeys([*theirs, *mine]))
            else:
                merged[item.name] = mine if mine is not None else theirs
        return ModelCardInfo(**merged)


def class_card_fields(pipeline_class: type) -> dict:
    """``_model_card_fields`` of a pipeline class merged along its MRO (subclasses extend tags, override the rest)."""
    merged: dict = {"tags": []}
    for klass in reversed(pipeline_class.__mro__):
        own = klass.__dict__.get("_model_card_fields")
        if not own:
            continue
        for key, value in own.items():
            if key == "tags":
                merged["tags"] = list(dict.fromkeys([*merged["tags"], *value]))
            else:
                merged[key] = value
    return merged


def weights_digest(pipeline) -> str:
    """A digest of every component of ``pipeline``: weights and configurations, preprocessing settings, tokenizer
    vocabularies (a tokenizer's other attributes, such as the folder it was loaded from, change on every load)."""
    import hashlib
    import json

    from .fingerprint import gallery_fingerprint

    digest = hashlib.blake2b(digest_size=16)
    for name, component in pipeline.components.items():
        if component is None:
            continue
        if hasattr(component, "get_vocab"):
            vocabulary = json.dumps(sorted(component.get_vocab().items()))
            part = hashlib.blake2b(f"{vocabulary}{component.model_max_length}".encode(), digest_size=16).hexdigest()
        else:
            part = gallery_fingerprint(pipeline, [name])
        digest.update(f"{name}:{part}\n".encode())
    return digest.hexdigest()


def conversion_card(kind: str, flags: Mapping[str, Any], sources: list, license: str | None = None,
                    note: str | None = None) -> ModelCardInfo:
    """The card info of a conversion: what it was made from, and the ``diffusers-cir convert <kind>`` command line
    that makes it again (``flags``: ``{flag: value}``; ``None`` and ``False`` are left out, ``True`` is a bare flag)."""
    import shlex

    argv = ["diffusers-cir", "convert", kind]
    for flag, value in flags.items():
        if value is None or value is False:
            continue
        argv += [flag] if value is True else [flag, str(value)]
    return ModelCardInfo(
        base_model=[str(source) for source in sources if source is not None],
        license=license,
        made_with=shlex.join(argv),
        notes=[note] if note else [],
    )


def training_card(args, parser, script: str, results: list[ModelResult] | None = None,
                  base_model: list | None = None, datasets: list | None = None) -> ModelCardInfo:
    """The card info of a training run: ``accelerate launch <script>`` with the flags of ``args`` that differ from
    ``parser``'s defaults (the command that trains the same weights again), what it started from and trained on, and
    its validation ``results``."""
    import json
    import shlex

    argv = ["accelerate", "launch", script]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default or value is None:
            continue
        flag = next((option for option in action.option_strings if option.startswith("--")), action.option_strings[0])
        if action.nargs == 0:  # store_true / store_false
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *(str(item) for item in value)]
        else:
            argv += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return ModelCardInfo(
        base_model=[str(item) for item in (base_model or []) if item],
        datasets=[str(item) for item in (datasets or []) if item],
        made_with=shlex.join(argv),
        results=list(results or []),
    )


# ------------------------------------------------------------------------------------------------ reading cards


def is_generated_card(path: str | os.PathLike) -> bool:
    """Whether the ``README.md`` at ``path`` was written by this module (it carries :data:`GENERATED_MARKER`)."""
    try:
        return GENERATED_MARKER in Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def read_card_info(folder: str | os.PathLike) -> tuple[ModelCardInfo, str | None] | None:
    """The :class:`ModelCardInfo` stored in a folder's generated card and the weights digest it was written for;
    ``None`` when the folder has no card this module wrote (a hand-written card is not parsed)."""
    from huggingface_hub import ModelCard

    path = Path(folder) / CARD_NAME
    if not path.is_file() or not is_generated_card(path):
        return None
    try:
        data = ModelCard.load(path).data.to_dict()
    except Exception as error:  # a damaged card is not a reason to refuse loading the weights
        logger.warning(f"The model card {path} could not be read ({error}); it is ignored.")
        return None
    stored = data.get("diffusers_cir") or {}
    try:
        info = ModelCardInfo.coerce(stored.get("card", {}))
    except (TypeError, ValueError) as error:
        logger.warning(f"The model card {path} holds an unreadable diffusers_cir section ({error}); it is ignored.")
        return None
    return info, stored.get("weights")


# ------------------------------------------------------------------------------------------------ writing cards


def _hub_ids(values: list[str]) -> list[str]:
    return [value for value in values if _HUB_ID.match(value) and not os.path.exists(value)]


def _metric_label(metric: str) -> str:
    for prefix, label in METRIC_NAMES.items():
        rest = metric[len(prefix):]
        if metric.startswith(prefix) and rest.isdigit():
            return label.format(rest)
    return metric


def _eval_results(info: ModelCardInfo, task_type: str) -> list:
    from huggingface_hub import EvalResult

    results = []
    for result in info.results:
        for metric, value in result.metrics.items():
            results.append(
                EvalResult(
                    task_type=task_type,
                    task_name="Composed image retrieval",
                    dataset_type=result.dataset_id or result.dataset,
                    dataset_name=result.dataset,
                    dataset_split=result.split,
                    metric_type=metric,
                    metric_name=_metric_label(metric),
                    metric_value=float(value),
                )
            )
    return results


def _components_table(pipeline) -> str:
    rows = ["| component | class | parameters |", "|---|---|---|"]
    for name, component in pipeline.components.items():
        if component is None:
            continue
        parameters = getattr(component, "parameters", None)
        count = f"{sum(p.numel() for p in parameters()):,}" if callable(parameters) else "-"
        rows.append(f"| `{name}` | `{type(component).__name__}` | {count} |")
    return "\n".join(rows)


def _results_section(info: ModelCardInfo) -> str:
    if not info.results:
        return (
            "No measured results are recorded for these weights. Measure them with `diffusers-cir evaluate` (see "
            "the diffusers-cir README) and pass them as `model_card=ModelCardInfo(results=[...])` when saving."
        )
    parts = []
    for result in info.results:
        split = f" ({result.split})" if result.split else ""
        header = "| " + " | ".join(_metric_label(name) for name in result.metrics) + " |"
        rule = "|" + "---|" * len(result.metrics)
        values = "| " + " | ".join(f"{value:.4g}" for value in result.metrics.values()) + " |"
        parts.append(f"**{result.dataset}{split}**\n\n{header}\n{rule}\n{values}")
        if result.protocol:
            parts.append(f"Protocol: {result.protocol}")
        if result.command:
            parts.append(f"Measured with:\n\n```bash\n{result.command}\n```")
    return "\n\n".join(parts)


def _usage(class_name: str, repo_or_path: str) -> str:
    return f"""```python
from diffusers_cir import AutoCIRPipeline, composed_search

pipe = AutoCIRPipeline.from_pretrained("{repo_or_path}")  # a {class_name}
query = pipe(image="reference.jpg", prompt="as a pencil sketch").image_embeds   # [1, {{D}}] composed query
gallery = pipe.encode_image(["a.jpg", "b.jpg"])                                # [2, {{D}}] gallery embeddings
# or, over an index built with `diffusers-cir index build`:
hits = composed_search(pipe, "gallery-index", image="reference.jpg", text="as a pencil sketch", k=10).hits
```"""


def build_model_card(pipeline, info: ModelCardInfo, folder: str | os.PathLike, repo_id: str | None = None):
    """The ``huggingface_hub.ModelCard`` of ``pipeline`` saved in ``folder`` (``repo_id``: where it is pushed)."""
    from huggingface_hub import ModelCard, ModelCardData

    defaults = class_card_fields(type(pipeline))
    name = info.model_name or (repo_id.split("/")[-1] if repo_id else Path(folder).resolve().name)
    pipeline_tag = defaults.get("pipeline_tag", "image-feature-extraction")
    tags = list(dict.fromkeys(["diffusers", "composed-image-retrieval", *defaults["tags"], *info.tags]))
    stored = {"card": _jsonable(info), "weights": weights_digest(pipeline), "class": type(pipeline).__name__}
    data = ModelCardData(
        library_name=LIBRARY_NAME,
        pipeline_tag=pipeline_tag,
        base_model=_hub_ids(info.base_model) or None,
        datasets=_hub_ids(info.datasets) or None,
        license=info.license,
        tags=tags,
        model_name=name,
        eval_results=_eval_results(info, pipeline_tag) or None,
        diffusers_cir=stored,
    )
    body = [f"# {name}", ""]
    if info.description:
        body += [info.description, ""]
    if defaults.get("description"):
        body += [defaults["description"], ""]
    if defaults.get("paper"):
        body += [f"Paper: {defaults['paper']}", ""]
    body += ["## Use", "", _usage(type(pipeline).__name__, repo_id or str(folder)), ""]
    body += ["## Components", "", f"A `{type(pipeline).__name__}` made of:", "", _components_table(pipeline), ""]
    provenance = []
    if info.base_model:
        provenance.append("Made from: " + ", ".join(f"`{item}`" for item in info.base_model))
    if info.datasets:
        provenance.append("Data: " + ", ".join(f"`{item}`" for item in info.datasets))
    if info.made_with:
        provenance.append(f"Made with:\n\n```bash\n{info.made_with}\n```")
    provenance += info.notes
    provenance.append(f"License: {info.license}" if info.license else "License: not stated by the maker of these weights.")
    body += ["## Provenance", "", "\n\n".join(provenance), ""]
    body += ["## Results", "", _results_section(info), "", GENERATED_MARKER, ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def _jsonable(info: ModelCardInfo) -> dict:
    values = asdict(info)
    return {key: value for key, value in values.items() if value not in (None, [], {})}


def write_model_card(
    pipeline, folder: str | os.PathLike, info: ModelCardInfo | Mapping | None = None, repo_id: str | None = None
) -> Path | None:
    """Write ``folder/README.md`` for ``pipeline`` (see the module docstring for what goes in and the overwrite rule).

    ``info`` is merged over what the pipeline remembers from the card of the folder it was loaded from. Returns the
    card's path, or ``None`` when a hand-written ``README.md`` was left in place.
    """
    path = Path(folder) / CARD_NAME
    if path.exists() and not is_generated_card(path):
        logger.warning(
            f"{path} was not written by diffusers-cir: it is kept as it is and no model card is generated. Delete it "
            "(or add the line '" + GENERATED_MARKER + "') to have one written on save."
        )
        return None
    info = ModelCardInfo.coerce(info).merged_over(_loaded_info(pipeline))
    build_model_card(pipeline, info, folder, repo_id=repo_id).save(path)
    return path


def _loaded_info(pipeline) -> ModelCardInfo:
    """What the card of the folder ``pipeline`` was loaded from says, its results only while the weights match."""
    loaded = getattr(pipeline, "_loaded_model_card", None)
    if loaded is None:
        return ModelCardInfo()
    info, digest = loaded
    if (info.results or info.made_with) and digest != weights_digest(pipeline):
        dropped = ", ".join(result.dataset for result in info.results) or "none"
        note = (f"The weights changed since they were loaded from a folder whose card recorded how they were made and "
                f"their results ({dropped}); those describe the earlier weights and are not repeated here.")
        info = ModelCardInfo(model_name=info.model_name, description=info.description, base_model=info.base_model,
                             datasets=info.datasets, license=info.license, tags=info.tags, notes=[*info.notes, note])
    return info
