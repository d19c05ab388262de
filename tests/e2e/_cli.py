"""Run the real ``gradstream`` command: through a pipe (subprocess) or a terminal (tmux)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import ROOT, require_tool

GRADSTREAM = [sys.executable, "-m", "gradstream.client.cli"]


def gradstream(
    *args: str,
    check: bool = True,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """``gradstream ARGS`` through pipes; its output, exit code and stderr."""
    return subprocess.run(
        [*GRADSTREAM, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The single stderr line of a failed command; fails unless it exited ``code`` cleanly."""
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


class Terminal:
    """A command in a real terminal (a tmux pane of 160 x 20)."""

    def __init__(self, session: str, tmux: list[str]) -> None:
        self.session, self.tmux = session, tmux

    def screen(self) -> str:
        """What the pane shows now."""
        return subprocess.run(
            [*self.tmux, "capture-pane", "-p", "-J", "-t", self.session],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 60.0) -> str:
        """The screen once ``predicate`` holds for it (bounded by ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if predicate(screen):
                return screen
            assert time.monotonic() < deadline, f"timed out; the screen:\n{screen}"
            time.sleep(0.2)

    def ctrl_c(self) -> None:
        """Press Ctrl-C in the pane."""
        subprocess.run([*self.tmux, "send-keys", "-t", self.session, "C-c"], check=True)


@contextmanager
def terminal(*args: str, env: dict[str, str] | None = None) -> Iterator[Terminal]:
    """Run ``gradstream ARGS`` in a tmux pane; the pane prints ``EXIT=<code>`` when it ends."""
    session = f"gradstream-test-{uuid.uuid4().hex[:8]}"
    tmux = [require_tool("tmux"), "-L", session]  # a tmux server of its own
    command = " ".join(shlex.quote(a) for a in [*GRADSTREAM, *args])
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    script = f"cd {shlex.quote(str(ROOT))}; {exports} {command}; echo EXIT=$?; sleep 600"
    subprocess.run(
        [*tmux, "new-session", "-d", "-s", session, "-x", "160", "-y", "20", "bash", "-c", script],
        check=True,
        env={**os.environ, "TERM": "xterm-256color"},
    )
    try:
        yield Terminal(session, tmux)
    finally:
        subprocess.run([*tmux, "kill-server"], check=False)
