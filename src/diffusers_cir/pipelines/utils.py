"""Helpers shared by the pipelines."""

from __future__ import annotations

import os


def resolve_pretrained_path(pretrained_model_name_or_path: str | os.PathLike, kwargs: dict) -> str:
    """A local folder for `from_pretrained`: the path itself, or a Hub snapshot downloaded first.

    diffusers 0.42's own download step rejects libraries it does not know (ours), so a repo id is resolved with
    `huggingface_hub.snapshot_download` and the pipeline is loaded from the local snapshot. Download-related keyword
    arguments are consumed here.
    """
    path = os.fspath(pretrained_model_name_or_path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"{path!r} is a file; `from_pretrained` needs a pipeline folder or a Hub repo id.")
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
