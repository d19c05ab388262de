"""A benchmark's server in a process of its own, found through a ready file.

The server writes ``{"port": ...}`` to the ready file once it listens (``announce``); the
bench starts it, waits for that file and stops it afterwards (``started``).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STOP_TIMEOUT_S = 15.0


def announce(ready_file: Path, port: int, **extra: Any) -> None:
    """Say where the server listens: written whole, then renamed, since the bench polls for
    the file and reads it at once."""
    partial = ready_file.with_suffix(".partial")
    partial.write_text(json.dumps({"port": port, **extra}))
    partial.rename(ready_file)


@contextlib.contextmanager
def started(
    module: str, *args: str, timeout: float = 60.0
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """``python -m module --ready-file F *args`` until the block ends: its port and process.

    Raises if the process exits or does not announce itself within ``timeout`` seconds;
    stopped with SIGTERM, killed if it has not exited after ``STOP_TIMEOUT_S``.
    """
    with tempfile.TemporaryDirectory(prefix="gradstream-bench-") as tmp:
        ready = Path(tmp) / "ready.json"
        command = [sys.executable, "-m", module, *args, "--ready-file", str(ready)]
        process = subprocess.Popen(command)
        try:
            deadline = time.monotonic() + timeout
            while not ready.exists():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{module} did not start (exit code {process.returncode})")
                time.sleep(0.02)
            yield int(json.loads(ready.read_text())["port"]), process
        finally:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
