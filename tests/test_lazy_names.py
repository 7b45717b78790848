"""The lazy public names of the package and its subpackages (diffusers_cir._lazy)."""

import importlib
import subprocess
import sys

import pytest

PACKAGES = ["diffusers_cir", "diffusers_cir.data", "diffusers_cir.evaluation", "diffusers_cir.generation",
            "diffusers_cir.retrieval"]


def defining_module(package_name, module_name):
    # The top-level table names modules relative (".pipelines.auto") or absolute ("diffusers"); the data and
    # generation tables name bare submodules ("benchmarks").
    if module_name.startswith(".") or package_name == "diffusers_cir":
        return importlib.import_module(module_name, package_name)
    return importlib.import_module(f"{package_name}.{module_name}")


@pytest.mark.parametrize("package_name", PACKAGES)
def test_every_listed_name_resolves_to_its_defining_module(package_name):
    package = importlib.import_module(package_name)
    for name, module_name in package._LAZY_NAMES.items():
        value = getattr(package, name)
        module = defining_module(package_name, module_name)
        assert getattr(module, name) is value, (package_name, name)
        assert package.__dict__[name] is value  # cached: the next look-up skips __getattr__
    assert set(package._LAZY_NAMES) <= set(dir(package))


@pytest.mark.parametrize("package_name", PACKAGES)
def test_an_unknown_name_is_an_attribute_error_naming_the_package(package_name):
    package = importlib.import_module(package_name)
    with pytest.raises(AttributeError, match=f"module '{package_name}' has no attribute 'no_such_name'"):
        package.no_such_name
    assert not hasattr(package, "no_such_name")


def test_importing_every_package_imports_no_heavy_library():
    code = (f"import {', '.join(PACKAGES)}, sys; "
            "print(sorted(m for m in ('torch', 'transformers', 'diffusers', 'datasets', 'numpy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
