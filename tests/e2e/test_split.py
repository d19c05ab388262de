"""The split prototype (``gradstream.bench.split``): ingest in a front process, training in a
process per model through a shared-memory ring, against the real server on the same batches."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradstream.bench.scenarios import SCENARIOS
from gradstream.bench.split import SplitServer, running, trainer_pids
from gradstream.client import Client, Unavailable
from gradstream.client._local import LocalServer

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def split() -> Iterator[SplitServer]:
    with running() as server:
        yield server


@pytest.fixture(scope="module")
def real() -> Iterator[LocalServer]:
    with LocalServer() as server:
        yield server


def _train(target: str, name: str, spec: dict[str, Any], batches: list[Any]) -> tuple[Any, ...]:
    """A fresh model trained on ``batches``: its results and its parameters."""
    with Client(target) as client:
        client.create_model(name, spec)
        try:
            results = list(client.train(name, batches, skip_rejected=True))
            return results, client.parameters(name)
        finally:
            client.delete_model(name)


def _same_parameters(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert value.dtype == b[key].dtype and value.tobytes() == b[key].tobytes(), key


@pytest.mark.parametrize("scenario", ["small", "medium", "large"])
def test_split_trains_bitwise_like_the_server(
    split: SplitServer, real: LocalServer, scenario: str
) -> None:
    chosen = SCENARIOS[scenario]
    # Many more messages than the ring has slots (queue_depth + 1), so every slot is reused.
    count = 4 * 6 if scenario == "large" else 64 * 12
    batches = [chosen.batches()[i % chosen.distinct_batches] for i in range(count)]
    got, params = _train(split.target, f"split-{scenario}", chosen.spec, batches)
    want, expected = _train(real.target, f"split-{scenario}", chosen.spec, batches)
    assert [(r.sequence, r.step, r.outcome) for r in got] == [
        (r.sequence, r.step, r.outcome) for r in want
    ]
    assert len(got) == count and all(r.outcome == "APPLIED" for r in got)
    assert [r.loss for r in got] == [r.loss for r in want]
    _same_parameters(params, expected)


def test_bad_batches_are_rejected_as_the_server_does(split: SplitServer, real: LocalServer) -> None:
    chosen = SCENARIOS["small"]
    good = chosen.batches()
    nan = good[0][0].copy()
    nan[1, 0] = np.nan
    wide = np.ones((4, 2), np.float32)
    mixed = [good[0], (nan, good[0][1]), good[1], (wide, good[1][1]), *good[2:8]]
    for batches in (mixed, [(nan, good[0][1]), (wide, good[1][1])]):
        got, params = _train(split.target, "split-bad", chosen.spec, batches)
        want, expected = _train(real.target, "split-bad", chosen.spec, batches)
        assert [(r.sequence, r.step, r.outcome, r.reason) for r in got] == [
            (r.sequence, r.step, r.outcome, r.reason) for r in want
        ]
        reasons = [r.reason for r in got if r.outcome == "REJECTED"]
        assert len(reasons) == 2 and "finite" in reasons[0] and "shape" in reasons[1], reasons
        _same_parameters(params, expected)
    # Only bad batches: the parameters are the initial ones.
    with Client(real.target) as client:
        client.create_model("split-init", chosen.spec)
        _same_parameters(params, client.parameters("split-init"))
        client.delete_model("split-init")


def _segments(pids: list[int]) -> set[str]:
    """The /dev/shm files the processes ``pids`` have mapped."""
    names = set()
    for pid in pids:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            if " /dev/shm/" in line:
                names.add(line.split()[-1])
    return names


def _gone(pids: list[int], files: set[str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{p}").exists() for p in pids) or any(Path(f).exists() for f in files):
        assert time.monotonic() < deadline, (pids, files)
        time.sleep(0.05)


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_nothing_is_left_after_the_front_exits(how: signal.Signals) -> None:
    chosen = SCENARIOS["small"]
    with running() as server:
        with Client(server.target) as client:
            for name in ("a", "b"):
                client.create_model(name, chosen.spec)
                list(client.train(name, chosen.batches()))
        pids = trainer_pids(server.process.pid)
        files = _segments(pids)
        assert len(pids) == 2 and len(files) == 2, (pids, files)
        os.kill(server.process.pid, how)
        server.process.wait(20)
        _gone(pids, files)


def test_a_trainer_that_dies_fails_its_streams_and_frees_its_ring() -> None:
    chosen = SCENARIOS["small"]
    with running() as server, Client(server.target) as client:
        client.create_model("dies", chosen.spec)
        (pid,) = trainer_pids(server.process.pid)
        files = _segments([pid])
        os.kill(pid, signal.SIGKILL)
        _gone([pid], files)
        with pytest.raises(Unavailable, match="exited"):
            list(client.train("dies", chosen.batches()))
        # Mid-stream: the stream in flight ends UNAVAILABLE.
        client.create_model("dies-streaming", chosen.spec)
        (pid,) = trainer_pids(server.process.pid)
        files = _segments([pid])
        endless = (chosen.batches()[i % 16] for i in range(10**7))
        with pytest.raises(Unavailable, match="exited"):
            for i, _ in enumerate(client.train("dies-streaming", endless)):
                if i == 2000:
                    os.kill(pid, signal.SIGKILL)
        _gone([pid], files)
        client.delete_model("dies-streaming")
        client.delete_model("dies")  # bounded: the process is gone already
        assert client.list_models() == []
