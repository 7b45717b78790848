"""Dataset cards for triplet shard folders: YAML ``configs:`` + ``dataset_info`` that ``datasets`` reads.

``datasets`` (>= 4) no longer runs loading scripts: a dataset is a folder whose ``README.md`` front
matter names each configuration's data files and features. This module writes and updates that front
matter with ``huggingface_hub.DatasetCard`` and ``datasets``' own YAML (de)serialisers, so the card is
exactly what ``load_dataset(folder, config, streaming=True)`` and the Hub viewer expect.

Example:
    >>> import tempfile
    >>> from diffusers_cir.data.card import read_card_configs, update_dataset_card
    >>> from diffusers_cir.data.schema import images_features
    >>> folder = tempfile.mkdtemp()
    >>> _ = update_dataset_card(folder, "images", images_features(), {"train": 10}, default=True)
    >>> read_card_configs(folder)["images"]["data_files"]
    [{'split': 'train', 'path': 'images/train-*.parquet'}]
"""

from __future__ import annotations

import os
from typing import Mapping

CARD_NAME = "README.md"


def default_body(config_name: str, split: str) -> str:
    """Prose of a new card, true of the folder it is written in: its first configuration is ``config_name``.

    The card is created by whichever tool writes a folder first (``data write`` writes ``images``; the embedding
    precomputation may write ``embeddings`` alone into another folder), so the prose must not claim an ``images``
    configuration or a ``data write`` origin, and its example loads the configuration that exists.
    """
    return f"""# Composed image retrieval triplets

Triplets (reference image, modification text, target image) in the SynthTriplets layout of `diffusers-cir`:
an `images` configuration holds the image bytes, an `embeddings` configuration CLIP image embeddings of the
same rows. The configurations and splits this folder holds are listed in the YAML header above.

```python
from datasets import load_dataset

triplets = load_dataset("path/to/this/folder", "{config_name}", split="{split}", streaming=True)
```
"""


def data_files_pattern(config_name: str, split: str) -> str:
    """Glob of one configuration's split, relative to the dataset folder (``images/train-*.parquet``)."""
    return f"{config_name}/{split}-*.parquet"


def _load_card(folder: str):
    """``(card data, markdown body)`` of the card in ``folder``; an empty card and ``None`` if there is none."""
    from huggingface_hub import DatasetCard, DatasetCardData

    path = os.path.join(folder, CARD_NAME)
    if os.path.isfile(path):
        card = DatasetCard.load(path)
        return card.data, card.text
    return DatasetCardData(), None


def read_card_configs(folder: str) -> dict[str, dict]:
    """``{config_name: {"data_files": [...], ...}}`` from the card in ``folder`` (empty if none).

    Every data-files pattern must stay inside ``folder``: a card is data a user may receive, and ``datasets`` would
    otherwise stream ``../other/*.parquet``, an absolute path or a URL it names as if they were this dataset's.
    """
    from datasets.utils.metadata import MetadataConfigs

    if not os.path.isfile(os.path.join(folder, CARD_NAME)):
        return {}
    configs = dict(MetadataConfigs.from_dataset_card_data(_load_card(folder)[0]))
    for name, entry in configs.items():
        for pattern in _data_file_patterns(entry.get("data_files")):
            problem = _outside_folder(pattern)
            if problem:
                raise ValueError(
                    f"{os.path.join(folder, CARD_NAME)}: configuration {name!r} names the data files {pattern!r}, "
                    f"{problem}. A dataset card may only name files inside its folder (relative paths without "
                    "'..'): fix the `configs:` section of the card, or copy the files into the folder."
                )
    return configs


def _data_file_patterns(data_files) -> list[str]:
    """Every path pattern of a configuration's ``data_files`` (a string, a list, ``{split, path}`` entries or a
    ``{split: paths}`` mapping)."""
    if data_files is None:
        return []
    if isinstance(data_files, (str, os.PathLike)):
        return [os.fspath(data_files)]
    if isinstance(data_files, Mapping):
        values = [data_files["path"]] if "path" in data_files else list(data_files.values())
        return [pattern for value in values for pattern in _data_file_patterns(value)]
    return [pattern for item in data_files for pattern in _data_file_patterns(item)]


def _outside_folder(pattern: str) -> str | None:
    """Why ``pattern`` can reach outside the dataset folder, or ``None``."""
    from pathlib import PurePosixPath

    if "://" in pattern or "::" in pattern:
        return "a URL"
    normalised = pattern.replace("\\", "/")
    if normalised.startswith(("/", "~")) or os.path.isabs(pattern) or (len(normalised) > 1 and normalised[1] == ":"):
        return "an absolute path"
    if ".." in PurePosixPath(normalised).parts:
        return "which leads out of the folder ('..')"
    return None


def read_card_infos(folder: str) -> dict:
    """``{config_name: datasets.DatasetInfo}`` (features, split sizes) from the card in ``folder``."""
    from datasets.info import DatasetInfosDict

    if not os.path.isfile(os.path.join(folder, CARD_NAME)):
        return {}
    return dict(DatasetInfosDict.from_dataset_card_data(_load_card(folder)[0]))


def update_dataset_card(
    folder: str,
    config_name: str,
    features,
    split_sizes: Mapping[str, int],
    default: bool = False,
    body: str | None = None,
    pretty_name: str | None = None,
    extra_metadata: Mapping[str, object] | None = None,
) -> str:
    """Add or replace one configuration (data files, features, split sizes) in ``folder/README.md``.

    Other configurations and the card's prose are kept, so the ``images`` writer and the embedding
    precomputation can each record their own configuration. ``extra_metadata`` adds top-level YAML keys
    (the embedding encoder, say). Returns the card path.
    """
    from datasets.info import DatasetInfo, DatasetInfosDict
    from datasets.splits import SplitDict, SplitInfo
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard

    if not split_sizes:
        raise ValueError(f"split_sizes must name at least one split for config {config_name!r}, got {dict(split_sizes)}.")
    os.makedirs(folder, exist_ok=True)
    data, text = _load_card(folder)
    configs = dict(MetadataConfigs.from_dataset_card_data(data))
    infos = dict(DatasetInfosDict.from_dataset_card_data(data))
    entry = {"data_files": [{"split": split, "path": data_files_pattern(config_name, split)} for split in split_sizes]}
    if default:
        for other in configs.values():
            other.pop("default", None)
        entry["default"] = True
    elif configs.get(config_name, {}).get("default"):
        entry["default"] = True
    configs[config_name] = entry
    splits = SplitDict()
    for split, count in split_sizes.items():
        splits.add(SplitInfo(name=split, num_examples=int(count)))
    infos[config_name] = DatasetInfo(features=features, splits=splits, config_name=config_name)
    # Rewrite both sections from scratch: a stale single-config `dataset_info` would otherwise linger.
    data.pop("configs", None)
    data.pop("dataset_info", None)
    DatasetInfosDict(infos).to_dataset_card_data(data)
    MetadataConfigs(configs).to_dataset_card_data(data)
    if pretty_name is not None:
        data.pretty_name = pretty_name
    for key, value in (extra_metadata or {}).items():
        data[key] = value
    if body is not None:
        text = body
    elif text is None:  # a new card
        text = default_body(config_name, next(iter(split_sizes)))
    new_card = DatasetCard(f"---\n{data.to_yaml()}\n---\n{text.lstrip()}")
    path = os.path.join(folder, CARD_NAME)
    new_card.save(path)
    return path
