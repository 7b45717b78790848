# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Upload what the package writes to the Hugging Face Hub: pipelines (with their model card), triplet datasets (with
their dataset card) and the ``evaluate`` metric Spaces (``hub/metrics/<name>``).

Each ``push_*`` function checks the folder first (the card is there and says what the Hub needs; a dataset's card
names data files that exist; a Space has its app, module and requirements), so a mistake fails here with a message
rather than as a broken repo. The uploads go through ``huggingface_hub.HfApi`` (``create_repo``, then ``upload_folder``,
which uploads only the files the repo does not hold yet).

Example:
    >>> from diffusers_cir.utils.hub import push_dataset_to_hub, push_metric_to_hub
    >>> push_dataset_to_hub("synthtriplets-embeddings", "me/synthtriplets-embeddings")  # doctest: +SKIP
    >>> push_metric_to_hub("hub/metrics/cirr", "me/cirr")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

from .locks import LOCK_NAME

CARD_NAME = "README.md"
SPACE_FILES = ("README.md", "app.py", "requirements.txt")


def upload_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    repo_type: str = "model",
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    create_pr: bool = False,
    space_sdk: str | None = None,
) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` to it; returns the commit URL."""
    import huggingface_hub

    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ValueError(f"`repo_id` must be a Hub repo id such as 'me/my-model', got {repo_id!r}.")
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"Nothing to upload: {str(folder)!r} is not a folder.")
    create_kwargs = {"repo_type": repo_type, "private": private, "exist_ok": True}
    if space_sdk is not None:
        create_kwargs["space_sdk"] = space_sdk
    api = huggingface_hub.HfApi(token=token)
    repo_url = api.create_repo(repo_id, **create_kwargs)
    repo_id = getattr(repo_url, "repo_id", None) or repo_id
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), repo_type=repo_type, create_pr=create_pr,
        commit_message=commit_message or f"Upload with diffusers-cir ({folder.name})",
        ignore_patterns=[f"**/{LOCK_NAME}", LOCK_NAME],  # the writers' lock file (utils.locks), not data
    )
    return str(commit)


def check_dataset_folder(folder: str | os.PathLike) -> dict[str, dict]:
    """The configurations of a dataset folder written by the package, after checking that its card names them and
    that each names data files that exist; a ``ValueError`` saying what is missing otherwise."""
    from ..data.card import read_card_configs

    folder = Path(folder)
    if not (folder / CARD_NAME).is_file():
        raise ValueError(
            f"{folder} has no {CARD_NAME}: the Hub and `datasets` find the data files through the card's `configs:` "
            "section. Write the folder with `diffusers-cir data` (or update_dataset_card) first."
        )
    configs = read_card_configs(str(folder))
    if not configs:
        raise ValueError(f"The card {folder / CARD_NAME} names no configuration (`configs:`): nothing would load.")
    for name, config in configs.items():
        for entry in config.get("data_files", []):
            patterns = entry["path"] if isinstance(entry["path"], list) else [entry["path"]]
            if not any(any(folder.glob(pattern)) for pattern in patterns):
                raise ValueError(
                    f"The card of {folder} names {patterns} for configuration {name!r}, split {entry.get('split')!r}, "
                    "and no file matches: the uploaded dataset would not load."
                )
    return configs


def push_dataset_to_hub(folder: str | os.PathLike, repo_id: str, private: bool | None = None,
                        token: str | None = None) -> str:
    """Upload a triplet dataset folder (shards + card) as the dataset repo ``repo_id``."""
    check_dataset_folder(folder)
    return upload_folder_to_hub(folder, repo_id, repo_type="dataset", private=private, token=token)


def check_metric_folder(folder: str | os.PathLike) -> str:
    """The module name of a metric Space folder (``hub/metrics/cirr`` -> ``cirr``) after checking its files: the Space
    card with ``sdk: gradio`` and ``app_file``, the app, ``<name>.py`` and the requirements."""
    from huggingface_hub import RepoCard

    folder = Path(folder)
    name = folder.resolve().name
    missing = [item for item in (*SPACE_FILES, f"{name}.py") if not (folder / item).is_file()]
    if missing:
        raise ValueError(
            f"{folder} is not a metric Space folder: {', '.join(missing)} missing (a Space needs {', '.join(SPACE_FILES)} "
            f"and the module {name}.py; see hub/metrics/cirr)."
        )
    data = RepoCard.load(folder / CARD_NAME).data.to_dict()
    if data.get("sdk") != "gradio" or not (folder / str(data.get("app_file", "app.py"))).is_file():
        raise ValueError(
            f"The card {folder / CARD_NAME} must say `sdk: gradio` and name an existing `app_file` (got sdk="
            f"{data.get('sdk')!r}, app_file={data.get('app_file')!r})."
        )
    return name


def push_metric_to_hub(folder: str | os.PathLike, repo_id: str, private: bool | None = None,
                       token: str | None = None) -> str:
    """Upload an ``evaluate`` metric folder (``hub/metrics/<name>``) as the gradio Space ``repo_id``."""
    name = check_metric_folder(folder)
    return upload_folder_to_hub(folder, repo_id, repo_type="space", space_sdk="gradio", private=private, token=token,
                                commit_message=f"Upload the {name} metric with diffusers-cir")
