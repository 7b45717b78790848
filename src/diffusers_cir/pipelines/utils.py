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


def is_image_path(item) -> bool:
    """A file path or an http(s) URL (`str` / `os.PathLike`) standing for an image."""
    return isinstance(item, (str, os.PathLike))


def _path_text(item) -> str:
    path = os.fspath(item)
    return os.fsdecode(path) if isinstance(path, bytes) else path


def check_image_paths(images, name: str, offset: int = 0) -> None:
    """Refuse a path to no file before any image is read (a gallery fails at once, not after hours of encoding).

    `images` is one item or a list/tuple of items; `offset` is the index of `images[0]` in the caller's list.
    """
    items = images if isinstance(images, (list, tuple)) else [images]
    for index, item in enumerate(items):
        if is_image_path(item):
            path = _path_text(item)
            if not path.startswith(("http://", "https://")) and not os.path.isfile(path):
                where = f"[{offset + index}]" if isinstance(images, (list, tuple)) else ""
                raise ValueError(f"`{name}`{where} is the path {path!r}, but there is no file there.")


def load_image_paths(images, name: str, offset: int = 0):
    """`images` with every path (or http(s) URL) replaced by the RGB PIL image it names; other items unchanged.

    `images` is one item or a list/tuple of items. Paths are read with `diffusers.utils.load_image` (EXIF rotation
    applied, converted to RGB), as transformers' image processors read them, so a path gives the same pixel values
    as the PIL image of the file. `offset` is the index of `images[0]` in the caller's list, for the messages.
    """
    from diffusers.utils import load_image

    check_image_paths(images, name, offset)

    def load(item, where: str):
        if not is_image_path(item):
            return item
        path = _path_text(item)
        try:
            return load_image(path)
        except Exception as error:
            raise ValueError(f"`{name}`{where}: {path!r} could not be read as an image ({error}).") from error

    if isinstance(images, (list, tuple)):
        return [load(item, f"[{offset + index}]") for index, item in enumerate(images)]
    return load(images, "")
