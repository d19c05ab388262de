"""Static guard: nothing in server/ or client/ unpickles, evaluates code, or fetches URLs.

Checkpoints and batches come from disks and peers we do not trust; loading them
must never run code. The checker reads the syntax tree, so a comment or a
docstring that mentions pickle does not trip it, and a call does.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(
    p for root in ("server", "client") for p in (ROOT / root).rglob("*.py") if "_pb2" not in p.name
)
# Unpickling (or pickle-based) loaders, and clients that fetch a URL.
FORBIDDEN_MODULES = {
    "pickle": "unpickles",
    "_pickle": "unpickles",
    "cPickle": "unpickles",
    "dill": "unpickles",
    "cloudpickle": "unpickles",
    "joblib": "unpickles",
    "shelve": "unpickles",
    "marshal": "loads code objects",
    "urllib.request": "fetches URLs",
    "urllib3": "fetches URLs",
    "requests": "fetches URLs",
    "httpx": "fetches URLs",
    "aiohttp": "fetches URLs",
    "http.client": "fetches URLs",
}
FORBIDDEN_CALLS = {"eval", "exec"}


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value
        for k in call.keywords
    )


def problems(source: str, filename: str) -> list[str]:
    """Every unsafe construct in a module's source, as 'file:line: what'."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            )
            for name in names:
                if name in FORBIDDEN_MODULES:
                    found.append(f"{where}: imports {name} ({FORBIDDEN_MODULES[name]})")
        elif isinstance(node, ast.Call):
            callee = _dotted(node.func)
            if callee in FORBIDDEN_CALLS or callee.removeprefix("builtins.") in FORBIDDEN_CALLS:
                found.append(f"{where}: calls {callee}")
            if callee in ("torch.load", "torch.serialization.load") and not _keyword_is(
                node, "weights_only", True
            ):
                found.append(f"{where}: torch.load without weights_only=True")
            if callee in ("np.load", "numpy.load") and _keyword_is(node, "allow_pickle", True):
                found.append(f"{where}: np.load with allow_pickle=True")
            if callee == "__import__":
                found.append(f"{where}: calls __import__")
    return found


def test_the_sources_are_found() -> None:
    names = {p.name for p in SOURCES}
    assert {"checkpoint.py", "servicer.py", "_client.py", "_producer.py"} <= names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pickle_eval_exec_unsafe_torch_load_or_url_fetching(path: Path) -> None:
    assert problems(path.read_text(), str(path.relative_to(ROOT))) == []


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "from pickle import loads",
        "import urllib.request",
        "from urllib import request\nfrom urllib.request import urlopen",
        "import requests",
        "eval('1')",
        "exec('x = 1')",
        "import torch\ntorch.load('f')",
        "import torch\ntorch.load('f', weights_only=False)",
        "import numpy as np\nnp.load('f', allow_pickle=True)",
        "__import__('pickle')",
    ],
)
def test_the_checker_catches_each_unsafe_construct(snippet: str) -> None:
    assert problems(snippet, "snippet.py") != []


def test_the_checker_allows_the_safe_forms() -> None:
    safe = "import torch\nimport numpy as np\ntorch.load('f', weights_only=True)\nnp.load('f')\n"
    assert problems(safe + '"""pickle eval exec"""\n', "ok.py") == []
