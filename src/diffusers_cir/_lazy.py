# Copyright 2026 The diffusers-cir authors. Apache-2.0.
"""Lazy public names for the package and its subpackages (PEP 562).

``import diffusers_cir`` and ``diffusers-cir --help`` must not import torch, transformers or diffusers, so each
package lists its public names with the module that defines them and imports that module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_names(
    package: str, names: dict[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``.

    Args:
        package: the package's ``__name__``.
        names: public name -> defining module, relative to ``package`` with a leading dot (``".retrieval.images"``)
            or absolute (``"diffusers"``).
        namespace: the package's ``globals()``; a resolved name is stored there, so later look-ups skip
            ``__getattr__``.
    """

    def __getattr__(name: str) -> Any:
        module_name = names.get(name)
        if module_name is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module_name, package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__
