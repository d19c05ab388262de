"""The wire format is the one module both sides share: the server never reaches into the SDK."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SERVER = sorted((ROOT / "server").rglob("*.py"))


def _imported(path: Path) -> set[str]:
    """Every module an import statement of the file names, lazy imports included."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_server_module_imports_the_sdk() -> None:
    assert len(SERVER) > 10
    reached = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in SERVER
        for name in _imported(path)
        if name == "gradstream.client" or name.startswith("gradstream.client.")
    }
    assert not reached


def test_no_server_module_loads_the_sdk_and_the_wire_format_loads_no_torch() -> None:
    code = (
        "import sys, gradstream.wire;"
        "print(' '.join(m for m in sys.modules if m == 'torch' or m.startswith('gradstream.')));"
        "import importlib, pkgutil, gradstream.server as s;"
        "[importlib.import_module(f'gradstream.server.{m.name}')"
        " for m in pkgutil.iter_modules(s.__path__) if not m.name.startswith('_')];"
        "print(' '.join(m for m in sys.modules if m.startswith('gradstream.client')) or '-')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    wire_only, sdk = out.stdout.splitlines()
    assert wire_only.split() and all(
        m.startswith(("gradstream.wire", "gradstream.v1")) for m in wire_only.split()
    )
    assert sdk == "-"
