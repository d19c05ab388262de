"""``gradstream train`` in a real terminal (tmux): the progress line, Ctrl-C, reconnecting,
and a server that dies mid-run."""

from __future__ import annotations

import json
import re
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from gradstream.client import Client
from gradstream.client._local import LocalServer
from gradstream.server.main import BackgroundServer
from tests.conftest import server_settings
from tests.e2e._cli import gradstream, terminal

SPEC = {
    "architecture": {"kind": "linear", "in_features": 2, "out_features": 1},
    "init": {"kind": "zeros"},
    "optimizer": {"kind": "sgd", "lr": 0.01},
}
EXIT = re.compile(r"^EXIT=(\d+)$", re.MULTILINE)


@pytest.fixture(scope="module")
def served() -> Iterator[BackgroundServer]:
    with BackgroundServer(server_settings()) as running:
        yield running


@pytest.fixture(scope="module")
def long_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rows enough that one-row batches run far longer than any test waits."""
    path = tmp_path_factory.mktemp("data") / "long.csv"
    rng = np.random.default_rng(0)
    np.savetxt(
        path,
        rng.uniform(-1, 1, (300_000, 3)),
        delimiter=",",
        fmt="%.4f",
        header="a,b,y",
        comments="",
    )
    return path


def exit_code(screen: str) -> int | None:
    found = EXIT.search(screen)
    return None if found is None else int(found.group(1))


def test_progress_line_and_a_short_run_on_a_terminal(
    served: BackgroundServer, tmp_path: Path
) -> None:
    gradstream("create", "tty", "--spec", json.dumps(SPEC), "--target", served.target)
    data = tmp_path / "d.csv"
    np.savetxt(data, np.ones((64, 3)), delimiter=",", fmt="%g")
    with terminal("train", "tty", str(data), "--batch-size", "8", "--target", served.target) as tty:
        screen = tty.wait_for(lambda s: exit_code(s) is not None)
    assert exit_code(screen) == 0, screen
    assert re.search(r"8/\? .*step 8 .*batches/s .*loss [0-9.]", screen), screen
    assert re.search(r"^trained 8 batches, step 8, loss [0-9.]+$", screen, re.MULTILINE), screen
    gradstream("delete", "tty", "--target", served.target)


def test_ctrl_c_prints_a_summary_that_matches_the_server(
    served: BackgroundServer, long_csv: Path
) -> None:
    gradstream("create", "stop", "--spec", json.dumps(SPEC), "--target", served.target)
    args = ("train", "stop", str(long_csv), "--batch-size", "1", "--target", served.target)
    with terminal(*args) as tty:
        tty.wait_for(lambda s: re.search(r"step [1-9]\d{2,}", s) is not None)  # 100+ steps
        tty.ctrl_c()
        screen = tty.wait_for(lambda s: exit_code(s) is not None, timeout=30)
    assert exit_code(screen) == 130, screen
    summary = re.search(
        r"^interrupted: trained (\d+) batches, sent (\d+), acknowledged (\d+), applied (\d+), "
        r"step (\d+), loss [0-9.]+",
        screen,
        re.MULTILINE,
    )
    assert summary is not None, screen
    trained, sent, acknowledged, applied, step = map(int, summary.groups())
    assert trained == sent == acknowledged == applied == step
    with Client(served.target) as client:
        assert client.get_model("stop").step == step  # what the server applied
    gradstream("delete", "stop", "--target", served.target)


def test_reconnecting_is_shown_at_once(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    data = tmp_path / "d.csv"
    np.savetxt(data, np.ones((4, 3)), delimiter=",", fmt="%g")
    args = ("train", "m", str(data), "--producer-id", "p", "--reconnect-timeout", "60")
    with terminal(*args, "--target", f"127.0.0.1:{free}") as tty:
        tty.wait_for(lambda s: f"waiting for the server at 127.0.0.1:{free}" in s, timeout=15)
        tty.wait_for(lambda s: f"reconnecting to 127.0.0.1:{free} (attempt" in s, timeout=30)
        tty.ctrl_c()
        screen = tty.wait_for(lambda s: exit_code(s) is not None, timeout=20)
    assert exit_code(screen) == 130, screen
    assert re.search(r"^interrupted: trained 0 batches", screen, re.MULTILINE), screen


def test_a_server_dying_mid_run_ends_with_the_error_on_its_own_line(long_csv: Path) -> None:
    server = LocalServer("--device", "cpu").start()
    try:
        gradstream("create", "dies", "--spec", json.dumps(SPEC), "--target", server.target)
        args = ("train", "dies", str(long_csv), "--batch-size", "1", "--target", server.target)
        with terminal(*args) as tty:
            tty.wait_for(lambda s: re.search(r"step [1-9]\d+", s) is not None)
            server.stop(signal.SIGKILL)
            screen = tty.wait_for(lambda s: exit_code(s) is not None, timeout=60)
    finally:
        server.stop(signal.SIGKILL)
    assert exit_code(screen) == 1, screen
    assert re.search(r"^gradstream: UNAVAILABLE: .*did the server stop\?", screen, re.MULTILINE), (
        screen
    )
