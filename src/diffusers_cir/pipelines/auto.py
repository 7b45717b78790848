# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""One entry point for every CIR system: :class:`AutoCIRPipeline`, the pipeline registry and released layouts.

Every CIR pipeline class derives from :class:`CIRPipelineMixin` and so joins :data:`PIPELINES` when its module is
imported (``diffusers_cir.pipelines`` imports them all): nothing anywhere lists the classes by name.
``AutoCIRPipeline.from_pretrained`` reads ``_class_name`` from a saved folder's ``model_index.json`` and loads that
class.

A folder (or file) in an authors' released format is recognised by a :class:`ReleasedLayout` that a conversion
module registers with :func:`register_layout`. It is converted once into a cache folder (under
``$DIFFUSERS_CIR_CACHE``, by default ``$HF_HOME/diffusers_cir/converted``; ``cache_dir=`` overrides it), with the same
numbers as the converter's command, and the converted pipeline is loaded from there. Keyword arguments a layout
needs (``text_encoder_path=`` for CompoDiff, ``clip_model_name_or_path=`` for LinCIR, ...) go to its converter; the
others go to ``from_pretrained``.

Why not ``diffusers.DiffusionPipeline.from_pretrained``: diffusers 0.42 looks a ``_class_name`` up only in the
``diffusers`` module itself, and its custom-pipeline mechanism runs a ``.py`` file from the model folder, which needs
``trust_remote_code=True``; our folders load through ``AutoCIRPipeline`` or the class's own ``from_pretrained``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

__all__ = [
    "AutoCIRPipeline",
    "CIRPipelineMixin",
    "LAYOUTS",
    "PIPELINES",
    "ReleasedLayout",
    "conversion_cache_dir",
    "pipeline_class_for_folder",
    "register_layout",
    "resolve_pretrained_path",
]

PIPELINES: dict[str, type] = {}
"""Every CIR pipeline class by name, filled as their modules are imported."""


def _import_all_systems() -> None:
    """Import every pipeline and converter module, so that :data:`PIPELINES` and :data:`LAYOUTS` are complete."""
    import diffusers_cir.conversion  # noqa: F401  (converters register their layouts)
    import diffusers_cir.pipelines  # noqa: F401  (pipeline modules register their classes)


# --------------------------------------------------------------------------------------------------- folders


def resolve_pretrained_path(pretrained_model_name_or_path: str | os.PathLike, kwargs: dict) -> str:
    """A local folder for ``from_pretrained``: the path itself, or a Hub snapshot downloaded first.

    diffusers 0.42's own download step rejects libraries it does not know (ours), so a repo id is resolved with
    ``huggingface_hub.snapshot_download`` and the pipeline is loaded from the local snapshot. Download-related keyword
    arguments are consumed here. A local file is returned as it is (a released checkpoint file, for a layout).
    """
    path = os.fspath(pretrained_model_name_or_path)
    if os.path.exists(path):
        return path
    from huggingface_hub import snapshot_download

    download_kwargs = {}
    for key in ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies"):
        if key in kwargs:
            download_kwargs[key] = kwargs.pop(key)
    if "use_auth_token" in kwargs:
        download_kwargs["token"] = kwargs.pop("use_auth_token")
    try:
        return snapshot_download(path, **download_kwargs)
    except Exception as error:
        raise OSError(
            f"{path!r} is not a local folder and could not be fetched from the Hugging Face Hub ({error}). "
            "Pass the path of a saved pipeline folder, or check the repo id and your connection."
        ) from error


def read_model_index(folder: str | os.PathLike) -> dict:
    """The JSON object of ``<folder>/model_index.json``; a ``ValueError`` naming the file when it is not one."""
    path = Path(folder) / "model_index.json"
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} could not be read as JSON ({error}).") from error
    if not isinstance(index, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(index).__name__}.")
    return index


def pipeline_class_for_folder(folder: str | os.PathLike) -> type:
    """The registered class named by ``<folder>/model_index.json`` (``_class_name``)."""
    index = read_model_index(folder)
    name = index.get("_class_name")
    if isinstance(name, (list, tuple)) and len(name) == 2:  # the ["library", "Class"] form
        name = name[1]
    _import_all_systems()
    if name not in PIPELINES:
        raise ValueError(
            f"{Path(folder) / 'model_index.json'} names the pipeline class {name!r}, which is not a CIR pipeline of "
            f"this installation of diffusers_cir (registered: {sorted(PIPELINES)}). Upgrade diffusers-cir, or load a "
            "folder saved by one of these classes."
        )
    return PIPELINES[name]


def _files_summary(folder: Path, limit: int = 12) -> str:
    if folder.is_file():
        return f"the file {folder.name!r}"
    names = sorted(
        str(path.relative_to(folder)) + ("/" if path.is_dir() else "") for path in folder.iterdir()
    )
    if not names:
        return "nothing (the folder is empty)"
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")
    return shown


# --------------------------------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class ReleasedLayout:
    """A released format that :class:`AutoCIRPipeline` converts on load.

    Attributes:
        name: short identifier (``"compodiff-released"``), also the cache folder's prefix.
        description: what the layout holds, shown when nothing matches (``"config.json + pytorch_model.bin ..."``).
        matches: ``matches(path) -> bool`` on the local folder or file; cheap (file names, a JSON config).
        convert: ``convert(path, output_dir, **options)`` writes a pipeline folder (``model_index.json``) into
            ``output_dir``, which does not exist yet.
        options: the ``from_pretrained`` keyword arguments that belong to the converter.
        path_options: those of ``options`` that name local folders or files (they key the conversion cache by their
            content, like the source).
    """

    name: str
    description: str
    matches: Callable[[Path], bool]
    convert: Callable[..., Any]
    options: tuple[str, ...] = ()
    path_options: tuple[str, ...] = ()


LAYOUTS: dict[str, ReleasedLayout] = {}
"""Every released layout by name, filled as the conversion modules are imported."""


def register_layout(layout: ReleasedLayout) -> ReleasedLayout:
    """Add ``layout`` to :data:`LAYOUTS` (a later registration of the same name replaces the earlier one)."""
    LAYOUTS[layout.name] = layout
    return layout


def conversion_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted released checkpoints are kept: ``cache_dir``, ``$DIFFUSERS_CIR_CACHE``, or
    ``$HF_HOME/diffusers_cir/converted``."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("DIFFUSERS_CIR_CACHE"):
        return Path(os.environ["DIFFUSERS_CIR_CACHE"])
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "diffusers_cir" / "converted"


def _path_digest(digest, path: Path) -> None:
    """Names, sizes and modification times of everything under ``path``, and the bytes of its small text files."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        if file.suffix in (".json", ".txt") and stat.st_size < 1 << 20:
            digest.update(file.read_bytes())


def _conversion_key(layout: ReleasedLayout, source: Path, options: dict) -> str:
    from .. import __version__

    digest = hashlib.sha256(f"{layout.name}\t{__version__}\n".encode())
    _path_digest(digest, source.resolve())
    for name in sorted(options):
        value = options[name]
        digest.update(f"{name}={value!r}\n".encode())
        if name in layout.path_options and value is not None and Path(value).exists():
            _path_digest(digest, Path(value).resolve())
    return f"{layout.name}-{digest.hexdigest()[:20]}"


def convert_released(layout: ReleasedLayout, source: Path, options: dict, cache_dir=None) -> Path:
    """The cached pipeline folder converted from ``source`` (converted now if it is not there yet).

    A lock (``filelock``) makes concurrent processes convert once; a conversion is written to a staging folder and
    renamed into place, so an interrupted one leaves nothing that looks finished.
    """
    from filelock import FileLock

    root = conversion_cache_dir(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    target = root / _conversion_key(layout, source, options)
    with FileLock(str(target) + ".lock"):
        if (target / "model_index.json").is_file():
            return target
        staging = root / (target.name + ".partial")
        if staging.exists():
            import shutil

            shutil.rmtree(staging)
        layout.convert(source, staging, **options)
        if not (staging / "model_index.json").is_file():
            raise RuntimeError(f"The {layout.name} converter wrote no model_index.json into {staging}.")
        os.replace(staging, target)
    return target


# --------------------------------------------------------------------------------------------------- the contract


class CIRPipelineMixin:
    """What every CIR pipeline is (mix it in before ``DiffusionPipeline``): the contract the retrieval, evaluation,
    command line and demo rely on.

    * ``pipe(image=..., prompt=..., ...)`` returns an output whose ``image_embeds`` ``[B, D]`` are composed queries
      in the gallery's space;
    * ``pipe.encode_image(images)`` returns gallery embeddings ``[N, D]`` (not normalised);
    * ``pipe.embedding_dim`` is ``D``;
    * ``pipe.fingerprint`` changes whenever the gallery embeddings would (the weights and preprocessing of the
      components named in ``_gallery_components``).

    A subclass joins :data:`PIPELINES` unless it sets ``_cir_abstract = True`` in its own body (shared bases).
    """

    _cir_abstract: ClassVar[bool] = True
    _gallery_components: ClassVar[tuple[str, ...]] = ("image_encoder", "image_processor")
    # What every saved folder's model card says about the class (merged along the MRO: subclasses add tags and
    # set "description", "paper", "pipeline_tag"); see diffusers_cir.utils.model_card.
    _model_card_fields: ClassVar[dict] = {"pipeline_tag": "image-feature-extraction", "tags": ["diffusers-cir"]}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("_cir_abstract", False):
            PIPELINES[cls.__name__] = cls

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load a pipeline folder, or a Hub repo id (downloaded with ``huggingface_hub.snapshot_download`` first,
        because diffusers' own download step rejects libraries it does not know)."""
        local = resolve_pretrained_path(pretrained_model_name_or_path, kwargs)
        if not os.path.isdir(local):
            raise ValueError(
                f"{local!r} is a file; `{cls.__name__}.from_pretrained` needs a pipeline folder (model_index.json). "
                "For a released checkpoint file use `AutoCIRPipeline.from_pretrained`, which converts it."
            )
        pipeline = super().from_pretrained(local, **kwargs)
        from ..utils.model_card import read_card_info

        # A later save_pretrained keeps the provenance (and, while the weights match, the results) of this card.
        pipeline._loaded_model_card = read_card_info(local)
        return pipeline

    def save_pretrained(self, save_directory: str | os.PathLike, *args, model_card=None, push_to_hub: bool = False,
                        **kwargs):
        """diffusers' ``save_pretrained``, plus a model card (``README.md``, see :mod:`diffusers_cir.utils.model_card`).

        Args:
            model_card: a :class:`~diffusers_cir.utils.model_card.ModelCardInfo` (or a dict of its fields): base
                models, datasets, license, the command that made the weights, measured results. Merged over the card
                of the folder the pipeline was loaded from. A ``README.md`` already in ``save_directory`` that
                diffusers-cir did not write is left untouched.
            push_to_hub: also upload the folder (with its card) to the Hub repo ``repo_id`` (default: the folder's
                name); ``commit_message``, ``private``, ``token`` and ``create_pr`` go to the upload.
        """
        from ..utils.model_card import ModelCardInfo, write_model_card

        model_card = ModelCardInfo.coerce(model_card)  # a mistake in it fails before anything is written
        hub_options = {name: kwargs.pop(name) for name in ("repo_id", "commit_message", "private", "token", "create_pr")
                       if name in kwargs}
        super().save_pretrained(save_directory, *args, push_to_hub=False, **kwargs)
        repo_id = hub_options.pop("repo_id", None) or Path(save_directory).resolve().name
        write_model_card(self, save_directory, model_card, repo_id=repo_id if push_to_hub else None)
        if push_to_hub:
            from ..utils.hub import upload_folder_to_hub

            return upload_folder_to_hub(save_directory, repo_id, repo_type="model", **hub_options)
        return None

    def push_to_hub(self, repo_id: str, commit_message: str | None = None, private: bool | None = None,
                    token: str | None = None, create_pr: bool = False, safe_serialization: bool = True,
                    variant: str | None = None, model_card=None) -> str:
        """Upload the pipeline (weights, configurations and its model card) to the Hub repo ``repo_id``.

        diffusers' own ``push_to_hub`` replaces the saved ``README.md`` with a generic card fetched from the Hub;
        this one uploads the folder ``save_pretrained`` writes, card included. Returns the commit URL.
        """
        import tempfile

        with tempfile.TemporaryDirectory(prefix="diffusers-cir-push-") as folder:
            return self.save_pretrained(
                folder, safe_serialization=safe_serialization, variant=variant, model_card=model_card, push_to_hub=True,
                repo_id=repo_id, commit_message=commit_message or f"Upload {type(self).__name__}", private=private,
                token=token, create_pr=create_pr,
            )

    @property
    def embedding_dim(self) -> int:  # pragma: no cover - every registered pipeline overrides it
        raise NotImplementedError

    def encode_image(self, images, batch_size: int = 64, device=None, show_progress: bool = False):  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def call_parameters(cls) -> frozenset[str]:
        """The names ``__call__`` accepts (what a query may carry: ``negative_prompt``, ``mask_image``, ...)."""
        return frozenset(inspect.signature(cls.__call__).parameters) - {"self"}

    @property
    def fingerprint(self) -> str:
        """A digest of the gallery side: class names, configuration, weights (rounded to float16, so float32 and
        float16 loads of one checkpoint agree) and preprocessing of ``_gallery_components``. Recomputed only when a
        parameter changes (in place or replaced)."""
        from ..utils.fingerprint import gallery_fingerprint

        return gallery_fingerprint(self, self._gallery_components)


class AutoCIRPipeline:
    """Load any CIR pipeline: a saved folder (``model_index.json``), a Hub repo id, or a released checkpoint in a
    registered layout (converted once into a cache folder).

    Example:
        >>> from diffusers_cir import AutoCIRPipeline
        >>> pipe = AutoCIRPipeline.from_pretrained("compodiff-aesthetic-diffusers")  # doctest: +SKIP
        >>> pipe = AutoCIRPipeline.from_pretrained(  # the authors' release, converted on first use  # doctest: +SKIP
        ...     "CompoDiff-Aesthetic", text_encoder_path="CLIP-ViT-bigG-14-text", image_encoder_path="clip-vit-large-patch14")
    """

    def __init__(self, *args, **kwargs):
        raise OSError("AutoCIRPipeline is not instantiated: use `AutoCIRPipeline.from_pretrained(path_or_repo_id)`.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        local = Path(resolve_pretrained_path(pretrained_model_name_or_path, kwargs))
        cache_dir = kwargs.pop("conversion_cache_dir", None)
        if local.is_dir() and (local / "model_index.json").is_file():
            return pipeline_class_for_folder(local).from_pretrained(local, **kwargs)
        _import_all_systems()
        for layout in LAYOUTS.values():
            if layout.matches(local):
                options = {name: kwargs.pop(name) for name in layout.options if name in kwargs}
                folder = convert_released(layout, local, options, cache_dir)
                return pipeline_class_for_folder(folder).from_pretrained(folder, **kwargs)
        known = "\n".join(f"  - {layout.name}: {layout.description}" for layout in LAYOUTS.values())
        raise ValueError(
            f"{str(local)!r} is not a CIR pipeline folder (no model_index.json) and matches no released layout. It "
            f"holds {_files_summary(local)}. Known layouts:\n  - a saved pipeline: model_index.json (classes "
            f"{', '.join(sorted(PIPELINES))})\n{known}"
        )
