"""No code path of the project unpickles or evaluates data a user may receive (issue 20: "0 code executed from
data"). The sources a user runs (src, examples, scripts, hub, benchmarks) are parsed and every call that can run code
from a file is named with its line: ``pickle.load`` and its kin, ``torch.load`` without ``weights_only=True``,
``np.load(allow_pickle=True)``, ``yaml.load`` without a safe loader, ``eval`` / ``exec``, ``trust_remote_code=True``
and accelerate's ``register_for_checkpointing`` (whose states accelerate loads with ``weights_only=False``).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("src", "examples", "scripts", "hub", "benchmarks")
UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("cPickle", "load"),
              ("dill", "load"), ("dill", "loads"), ("cloudpickle", "load"), ("cloudpickle", "loads"),
              ("joblib", "load"), ("marshal", "load"), ("marshal", "loads"), ("shelve", "open"),
              ("yaml", "unsafe_load"), ("yaml", "full_load"), ("pd", "read_pickle"), ("pandas", "read_pickle")}


def _keyword(call: ast.Call, name: str):
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _dotted(node) -> tuple[str, str] | None:
    """``("torch", "load")`` for ``torch.load``; ``("", "eval")`` for a bare name."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return node.value.id, node.attr
    if isinstance(node, ast.Name):
        return "", node.id
    return None


def unsafe_calls(source: str) -> list[tuple[int, str]]:
    """``(line, what)`` of every call in ``source`` that can run code from data."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        if _is_true(_keyword(node, "trust_remote_code")):
            found.append((node.lineno, "trust_remote_code=True"))
        name = _dotted(node.func)
        if name is None:
            continue
        module, function = name
        if (module, function) in UNPICKLERS:
            found.append((node.lineno, f"{module}.{function}"))
        elif function == "load" and module == "torch" and not _is_true(_keyword(node, "weights_only")):
            found.append((node.lineno, "torch.load without weights_only=True"))
        elif function == "load" and module in ("np", "numpy") and _keyword(node, "allow_pickle") is not None \
                and not (isinstance(_keyword(node, "allow_pickle"), ast.Constant)
                         and _keyword(node, "allow_pickle").value is False):
            found.append((node.lineno, "np.load with allow_pickle"))
        elif function == "load" and module == "yaml":
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if not (isinstance(loader, ast.Attribute) and loader.attr in ("SafeLoader", "CSafeLoader")):
                found.append((node.lineno, "yaml.load without SafeLoader"))
        elif module == "" and function in ("eval", "exec"):
            found.append((node.lineno, f"{function}()"))
        elif function == "register_for_checkpointing":
            found.append((node.lineno, "accelerator.register_for_checkpointing (unpickled with weights_only=False)"))
    return found


SNIPPETS = {
    "import pickle\npickle.load(open('x', 'rb'))": "pickle.load",
    "import pickle\npickle.loads(data)": "pickle.loads",
    "torch.load('x.pt')": "torch.load without weights_only=True",
    "torch.load('x.pt', weights_only=False)": "torch.load without weights_only=True",
    "torch.load('x.pt', weights_only=flag)": "torch.load without weights_only=True",
    "np.load('x.npy', allow_pickle=True)": "np.load with allow_pickle",
    "yaml.load(text)": "yaml.load without SafeLoader",
    "yaml.load(text, Loader=yaml.Loader)": "yaml.load without SafeLoader",
    "eval(text)": "eval()",
    "exec(code)": "exec()",
    "AutoModel.from_pretrained(path, trust_remote_code=True)": "trust_remote_code=True",
    "accelerator.register_for_checkpointing(ema)": "accelerator.register_for_checkpointing",
    "joblib.load('x.joblib')": "joblib.load",
    "pd.read_pickle('x.pkl')": "pd.read_pickle",
}
SAFE = ["torch.load('x.pt', map_location='cpu', weights_only=True)", "np.load('x.npy', allow_pickle=False)",
        "np.load('x.npy', mmap_mode='r')", "yaml.load(text, Loader=yaml.SafeLoader)", "yaml.safe_load(text)",
        "model.eval()", "json.load(handle)", "'''pickle.load in a docstring'''", "# torch.load('x') in a comment"]


@pytest.mark.parametrize("snippet", list(SNIPPETS))
def test_the_scanner_finds_each_unsafe_call(snippet):
    found = unsafe_calls(snippet)
    assert len(found) == 1 and found[0] == (1 if "\n" not in snippet else 2, found[0][1]), found
    assert found[0][1].startswith(SNIPPETS[snippet]), found


@pytest.mark.parametrize("snippet", SAFE)
def test_the_scanner_passes_safe_calls(snippet):
    assert unsafe_calls(snippet) == []


def test_no_source_a_user_runs_can_execute_code_from_data():
    files = [path for folder in FOLDERS for path in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 100, "the scan must see the project's sources"
    found = [f"{path.relative_to(ROOT)}:{line}: {what}" for path in files
             for line, what in unsafe_calls(path.read_text(encoding="utf-8"))]
    assert not found, "\n".join(found)
