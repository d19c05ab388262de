"""A static check of server/ and client/: no pickle, eval or exec, no ``torch.load`` without
``weights_only=True``, no ``allow_pickle=True``, and no code that fetches URLs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(
    p
    for root in ("server", "client")
    for p in (ROOT / root).rglob("*.py")
    if not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))
)
# Modules that deserialize code or objects, or fetch what they are pointed at.
FORBIDDEN_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "dill",
    "cloudpickle",
    "joblib",
    "marshal",
    "shelve",
    "urllib.request",
    "urllib3",
    "requests",
    "httpx",
    "aiohttp",
    "http.client",
    "ftplib",
}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
# torch.export.load unpickles and evals parts of its archive; exported.py calls it only
# after check_archive refused every such part (tests/unit/server/test_exported.py).
CHECKED_LOADS = {("server/gradstream/server/exported.py", "torch.export.load")}


def _problems(source: str, name: str) -> list[str]:
    tree = ast.parse(source, name)
    found: list[str] = []
    for node in ast.walk(tree):
        where = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [
                f"{where}: import {a.name}" for a in node.names if a.name in FORBIDDEN_MODULES
            ]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            found += [
                f"{where}: from {node.module} import" for n in names if n in FORBIDDEN_MODULES
            ]
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if isinstance(func, ast.Name) and called in FORBIDDEN_CALLS:
                found.append(f"{where}: {called}()")
            keywords = {k.arg: k.value for k in node.keywords}
            checked = (name, _dotted(func)) in CHECKED_LOADS
            if called == "load" and _dotted(func).startswith("torch.") and not checked:
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    found.append(f"{where}: torch.load without weights_only=True")
            pickled = keywords.get("allow_pickle")
            if pickled is not None and not (
                isinstance(pickled, ast.Constant) and pickled.value is False
            ):
                found.append(f"{where}: allow_pickle")
            if called in ("urlopen", "urlretrieve", "create_connection"):
                found.append(f"{where}: {called}()")
    return found


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def test_sources_were_found() -> None:
    assert len(SOURCES) > 10
    assert any(p.name == "servicer.py" for p in SOURCES)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_unsafe_deserialization_or_fetching(path: Path) -> None:
    assert _problems(path.read_text(), str(path.relative_to(ROOT))) == []


@pytest.mark.parametrize(
    "source",
    [
        "import pickle",
        "from pickle import loads",
        "import urllib.request",
        "from urllib import request",
        "eval('1')",
        "exec(code)",
        "torch.load(path)",
        "torch.load(path, weights_only=False)",
        "np.load(path, allow_pickle=True)",
        "import requests",
        "torch.export.load(f)",
    ],
)
def test_the_check_catches(source: str) -> None:
    assert _problems(source, "probe.py"), source
