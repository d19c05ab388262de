"""Shared fixtures: a real server on 127.0.0.1:0 and clients connected to it."""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from gradstream.client import Client
from gradstream.server.config import Settings
from gradstream.server.main import BackgroundServer

ROOT = Path(__file__).resolve().parents[1]
_names = itertools.count()

# `make mutate` (tools/mutate.py) sets GRADSTREAM_MUTATE=1: every mutant reruns each
# property that reaches its function, so there a property tries a few examples, the same
# ones every time (a mutant's verdict must not depend on the draw). The suite keeps its counts.
MUTATE = os.environ.get("GRADSTREAM_MUTATE") == "1"
MUTATE_EXAMPLES = 25
settings.register_profile("mutate", max_examples=MUTATE_EXAMPLES, derandomize=True)
if MUTATE:
    settings.load_profile("mutate")
    # A first optimizer imports torch._dynamo (seconds). Imported here, in mutmut's fork
    # server, every mutant's process starts with it instead of importing it again.
    import torch._dynamo  # noqa: F401

    # pytest collects garbage at the end of every run (its unraisable-exception check):
    # objects made so far are frozen out of that, a mutant's run only scans its own.
    gc.freeze()


def examples(count: int) -> int:
    """A property's number of examples: ``count``, or at most MUTATE_EXAMPLES under mutmut."""
    return min(count, MUTATE_EXAMPLES) if MUTATE else count


def require_tool(name: str, *candidates: Path) -> str:
    """The path of a command-line tool; skip without it, unless CI says the tools must be there."""
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    if os.environ.get("GRADSTREAM_REQUIRE_TOOLS"):
        pytest.fail(f"{name} is required here (GRADSTREAM_REQUIRE_TOOLS is set) but not installed")
    pytest.skip(f"{name} is not installed")


# GRADSTREAM_TEST_INGEST=process runs every test server (this module's helpers and fixtures)
# behind a front process: tests/integration/test_ingest_process.py runs a slice so.
INGEST = os.environ.get("GRADSTREAM_TEST_INGEST", "inline")


def server_settings(**overrides: Any) -> Settings:
    """An in-process test server's settings: loopback, free gRPC port, CPU, no health or
    metrics port unless a test asks for one."""
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "health_port": -1,
        "metrics_port": -1,
        "device": "cpu",
        "ingest": INGEST,
    }
    return Settings(**(values | overrides))


@pytest.fixture(scope="session")
def server() -> Iterator[BackgroundServer]:
    """One in-process server for the session, on free loopback ports, CPU."""
    settings = server_settings(
        health_port=0, metrics_port=0, max_message_bytes=8 * 1024 * 1024, max_models=1000
    )
    with BackgroundServer(settings) as running:
        yield running


@pytest.fixture
def client(server: BackgroundServer) -> Iterator[Client]:
    """A client of the session server."""
    with Client(server.target, max_message_bytes=32 * 1024 * 1024) as c:
        yield c


@pytest.fixture
def name() -> str:
    """A model name no other test uses."""
    return f"m{next(_names)}"


SmallVolume = Callable[..., Path]


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[SmallVolume]:
    """Mounts tmpfs volumes of a given size (bytes), to fill a disk without filling the host's.

    Skips where mounting needs privileges this run lacks.
    """
    mounted: list[Path] = []

    def mount(size: int, options: str = "") -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        path = tmp_path / f"volume{len(mounted)}"
        path.mkdir()
        opts = f"size={size}" + (f",{options}" if options else "")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
            capture_output=True,
            check=False,
        )
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        with contextlib.suppress(OSError):
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
