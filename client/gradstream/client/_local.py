"""A gradstream server in a child process on free loopback ports, for demos and tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType


class LocalServer:
    """Start ``gradstream serve`` on 127.0.0.1 with every port picked by the OS.

    >>> with LocalServer() as server:
    ...     Client(server.target)
    """

    def __init__(
        self,
        *args: str,
        startup_timeout: float = 60.0,
        env: dict[str, str] | None = None,
        log: Path | None = None,
    ) -> None:
        self.args = args
        self.startup_timeout = startup_timeout
        self.env = env
        self.log = log
        self.port = self.health_port = self.metrics_port = 0
        # With ``--ingest process``: the front process's pid (None otherwise).
        self.front_pid: int | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="gradstream-")

    @property
    def target(self) -> str:
        """host:port of the gRPC endpoint."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> LocalServer:
        """Spawn the server and wait until it serves (bounded by ``startup_timeout``)."""
        ready = Path(self._dir.name) / "ready.json"
        command = [
            sys.executable,
            "-m",
            "gradstream.client.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--health-port",
            "0",
            "--metrics-port",
            "0",
            "--ready-file",
            str(ready),
            *self.args,
        ]
        output = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            command, stdout=output, stderr=output, env={**os.environ, **(self.env or {})}
        )
        deadline = time.monotonic() + self.startup_timeout
        while not ready.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"gradstream serve exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"gradstream serve not ready after {self.startup_timeout} s")
            time.sleep(0.05)
        ports = json.loads(ready.read_text())
        self.port, self.health_port, self.metrics_port = (
            ports["port"],
            ports["health_port"],
            ports["metrics_port"],
        )
        self.front_pid = ports.get("front_pid")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Signal the server and wait for it to exit; returns its exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        self._dir.cleanup()
