"""The client is light: importing it never loads torch or the server."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_client_loads_no_torch() -> None:
    code = (
        "import sys, gradstream.client, gradstream.client.cli;"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('gradstream.server')];"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_nothing_lands_as_a_bare_server_or_client_package() -> None:
    code = "import importlib.util as u; print(u.find_spec('server'), u.find_spec('client'))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/"
    )
    assert out.stdout.strip() == "None None"
