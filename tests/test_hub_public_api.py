"""The published metric Spaces (hub/metrics/*) use only public, documented names of a pinned diffusers-cir range."""

import ast
import importlib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import diffusers_cir

HUB = Path(__file__).resolve().parents[1] / "hub" / "metrics"
PUBLIC_MODULES = ("diffusers_cir.metrics", "diffusers_cir.metrics.checks", "diffusers_cir.metrics.evaluate_support")
SPACES = sorted(path for path in HUB.iterdir() if path.is_dir())


@pytest.mark.parametrize("space", SPACES, ids=lambda path: path.name)
def test_spaces_import_only_public_names(space):
    for source in space.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffusers_cir"):
                assert node.module in PUBLIC_MODULES, f"{source.name} imports the internal module {node.module}"
                public = set(importlib.import_module(node.module).__all__)
                for alias in node.names:
                    assert alias.name in public, f"{source.name}: {node.module}.{alias.name} is not in its __all__"
            elif isinstance(node, ast.Import):
                assert not any(alias.name.startswith("diffusers_cir.") for alias in node.names), source.name


@pytest.mark.parametrize("space", SPACES, ids=lambda path: path.name)
def test_spaces_pin_a_version_range_that_holds_this_release(space):
    requirements = [Requirement(line) for line in (space / "requirements.txt").read_text().split("\n") if line.strip()]
    pinned = [requirement for requirement in requirements if requirement.name == "diffusers-cir"]
    assert len(pinned) == 1
    specifier = pinned[0].specifier
    assert any(spec.operator == "<" for spec in specifier), "no upper bound: a breaking release would break the Space"
    assert specifier.contains(diffusers_cir.__version__, prereleases=True)
