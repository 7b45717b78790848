import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED = Path(__file__).resolve().parents[2] / "shared"


def fixture_folders(marker: str) -> list[Path]:
    """`tests/fixtures/*` plus the folders of `DIFFUSERS_CIR_EXTRA_FIXTURES` (colon-separated) that have `marker`.

    A listed folder may be a fixture itself or contain fixtures one level down. Folders of other layouts (other
    fixture families share the variable) are ignored.
    """
    candidates = sorted(path for path in FIXTURES.iterdir() if path.is_dir())
    for entry in os.environ.get("DIFFUSERS_CIR_EXTRA_FIXTURES", "").split(":"):
        if entry.strip():
            root = Path(entry.strip())
            candidates.append(root)
            if root.is_dir():
                candidates.extend(sorted(path for path in root.iterdir() if path.is_dir()))
    seen, found = set(), []
    for folder in candidates:
        if (folder / marker).exists() and folder.resolve() not in seen:
            seen.add(folder.resolve())
            found.append(folder)
    return found


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Caches the library writes by default (converted checkpoints, captions) go to a temporary folder, not the
    user's $HF_HOME."""
    if os.environ.get("DIFFUSERS_CIR_CACHE"):
        yield
        return
    os.environ["DIFFUSERS_CIR_CACHE"] = str(tmp_path_factory.mktemp("diffusers_cir_cache"))
    yield
    del os.environ["DIFFUSERS_CIR_CACHE"]


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def single_thread():
    """Run the test with one intra-op thread, then restore the previous count.

    Tiny towers and small matmuls gain nothing from intra-op threads, and on a shared CPU the threads contend
    (~10x slower on two contended threads than on one). Request it by name, or for a whole module with
    `pytestmark = pytest.mark.usefixtures("single_thread")`.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_script(path: Path, module_name: str):
    """Import an example or benchmark script (not a package module) from its file."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # as an import would: dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# Issue 20 asks for the number of hostile cases tried and how they ended: the modules whose file name says
# "robustness" are counted and the count is printed at the end of the run.
_ROBUSTNESS_OUTCOMES = {"passed": 0, "failed": 0, "skipped": 0}


def pytest_runtest_logreport(report):
    if "robustness" not in report.nodeid.split("::")[0]:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _ROBUSTNESS_OUTCOMES[report.outcome] += 1


def pytest_terminal_summary(terminalreporter):
    outcomes = _ROBUSTNESS_OUTCOMES
    if sum(outcomes.values()):
        terminalreporter.write_line(
            f"robustness cases: {sum(outcomes.values())} tried; {outcomes['passed']} ended in the clear error or the "
            f"correct result, {outcomes['failed']} did not, {outcomes['skipped']} skipped (not applicable here)"
        )
