"""ingest=process: the front forwards every call as the backend answers it; the backend's
private socket answers only the front; both processes live and die together."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from gradstream.client import Client, GradstreamError, Unavailable
from gradstream.server.config import Settings
from gradstream.server.front import FRONT_NICE, BackendLink, Front, forward
from gradstream.server.listening import FORWARDED_PEER, INTERNAL_SECRET, StartupRefused
from gradstream.server.main import BackgroundServer, run
from gradstream.v1 import trainer_pb2 as pb
from tests.conftest import INGEST, server_settings
from tests.integration._security import ADMIN, READER, make_pki

SPEC = {
    "architecture": {"kind": "linear", "in_features": 2, "out_features": 1},
    "optimizer": {"kind": "sgd", "lr": 0.01},
}
X = np.ones((4, 2), dtype=np.float32)
Y = np.ones((4, 1), dtype=np.float32)
GET_MODEL = "/gradstream.v1.TrainerService/GetModel"
TRAIN = "/gradstream.v1.TrainerService/Train"
LIST_MODELS = "/gradstream.v1.TrainerService/ListModels"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, BackgroundServer]]:
    """An inline and a process-mode server with the same tokens, to compare their answers."""
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    servers = {
        mode: BackgroundServer(server_settings(ingest=mode, tokens_file=pki.tokens)).start()
        for mode in ("inline", "process")
    }
    for running in servers.values():
        with Client(running.target, token=ADMIN) as admin:
            admin.create_model("alpha", SPEC)
    yield servers
    for running in servers.values():
        running.stop()


def _answer(call: Callable[[], Any]) -> tuple[str, str]:
    try:
        call()
    except GradstreamError as exc:
        return exc.code.name, exc.details
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""
    return "OK", ""


def _stalled() -> Iterator[bytes]:
    """A Train stream that opens, then sends nothing for longer than its deadline."""
    yield pb.TrainRequest(open=pb.TrainOpen(model="alpha")).SerializeToString()
    time.sleep(2)


def _answers(target: str) -> dict[str, tuple[str, str]]:
    with Client(target, token=ADMIN, timeout=20) as admin, Client(target, token=READER) as reader:
        channel = grpc.insecure_channel(target)
        token = (("authorization", f"Bearer {ADMIN}"),)
        return {
            "unknown model": _answer(lambda: admin.get_model("nope")),
            "bad spec": _answer(lambda: admin.create_model("beta", {"architecture": {}})),
            "bad batch": _answer(lambda: admin.predict("alpha", np.ones((3, 5), np.float32))),
            "train unknown": _answer(lambda: list(admin.train("nope", [(X, Y)]))),
            "no token": _answer(lambda: Client(target).get_model("alpha")),
            "bad token": _answer(lambda: Client(target, token="x" * 24).get_model("alpha")),
            "denied": _answer(lambda: reader.delete_model("alpha")),
            "denied train": _answer(lambda: list(reader.train("alpha", [(X, Y)]))),
            "deadline": _answer(
                lambda: list(
                    channel.stream_stream(TRAIN, None, None)(
                        _stalled(), metadata=token, timeout=0.5
                    )
                )
            ),
            "unknown method": _answer(
                lambda: channel.unary_unary("/gradstream.v1.TrainerService/Nope", None, None)(
                    b"", timeout=5
                )
            ),
            "internal method": _answer(
                lambda: list(
                    channel.stream_stream("/gradstream.internal.v1.Ingest/Train", None, None)(
                        iter([b""]), timeout=5
                    )
                )
            ),
            "malformed": _answer(
                lambda: channel.unary_unary(GET_MODEL, None, None)(
                    b"\xff\xff", metadata=token, timeout=5
                )
            ),
        }


def test_the_front_returns_every_status_as_the_inline_server_does(
    pair: dict[str, BackgroundServer],
) -> None:
    inline, process = (_answers(pair[mode].target) for mode in ("inline", "process"))
    # A deadline's details are the client library's, worded by which side noticed first.
    for answers in (inline, process):
        answers["deadline"] = (answers["deadline"][0], "")
    assert process == inline
    assert inline["unknown model"][0] == "NOT_FOUND"
    assert inline["bad spec"][0] == "INVALID_ARGUMENT"
    assert inline["denied"][0] == inline["denied train"][0] == "PERMISSION_DENIED"
    assert inline["bad token"][0] == "UNAUTHENTICATED"
    assert inline["deadline"][0] == "DEADLINE_EXCEEDED"
    assert inline["unknown method"][0] == inline["internal method"][0] == "UNIMPLEMENTED"


def test_a_train_refused_at_once_keeps_its_status_every_time(
    pair: dict[str, BackgroundServer],
) -> None:
    # The backend ends the stream while the front may still be sending it the request:
    # grpc.aio's own writer then reports INTERNAL instead of the backend's status.
    target = pair["process"].target
    with Client(target, token="y" * 24, timeout=20) as stranger:
        answers = {_answer(lambda: list(stranger.train("alpha", [(X, Y)]))) for _ in range(40)}
    assert answers == {("UNAUTHENTICATED", "unknown token")}


def _private_socket(running: BackgroundServer) -> Path:
    directory = running.server._private
    assert directory is not None
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    return directory / "backend.sock"


def test_the_backend_answers_only_calls_with_the_front_secret(
    pair: dict[str, BackgroundServer],
) -> None:
    running = pair["process"]
    channel = grpc.insecure_channel(f"unix:{_private_socket(running)}")
    request = pb.GetModelRequest(name="alpha").SerializeToString()
    token = ("authorization", f"Bearer {ADMIN}")
    for metadata in ((token,), (token, (INTERNAL_SECRET, "0" * 64))):
        with pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary(GET_MODEL, None, None)(request, metadata=metadata, timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as refused:
            list(
                channel.stream_stream(TRAIN, None, None)(iter([b""]), metadata=metadata, timeout=5)
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    secret = (INTERNAL_SECRET, running.server._secret)
    answer = channel.unary_unary(GET_MODEL, None, None)(
        request, metadata=(token, secret), timeout=5
    )
    assert answer  # the front's secret opens it


def test_shared_memory_is_refused_to_a_client_the_front_saw_elsewhere(
    pair: dict[str, BackgroundServer],
) -> None:
    # The backend's own connection is the front's unix socket, a local peer: only the
    # forwarded address may decide.
    running = pair["process"]
    channel = grpc.insecure_channel(f"unix:{_private_socket(running)}")
    metadata = (
        ("authorization", f"Bearer {ADMIN}"),
        (INTERNAL_SECRET, running.server._secret),
        (FORWARDED_PEER, "ipv4:203.0.113.7:40000"),
    )
    opening = pb.TrainRequest(open=pb.TrainOpen(model="alpha", shared_memory="gradstream-x"))
    with pytest.raises(grpc.RpcError) as refused:
        list(
            channel.stream_stream(TRAIN, None, None)(
                iter([opening.SerializeToString()]), metadata=metadata, timeout=5
            )
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "server's host" in (refused.value.details() or "")


def test_a_client_cannot_claim_another_peer_through_the_front(
    pair: dict[str, BackgroundServer],
) -> None:
    # Sent by a client, both internal keys are dropped: the segment is then looked up (and
    # missing), where a forged remote peer would have been refused first.
    channel = grpc.insecure_channel(pair["process"].target)
    metadata = (
        ("authorization", f"Bearer {ADMIN}"),
        (FORWARDED_PEER, "ipv4:203.0.113.7:40000"),
        (INTERNAL_SECRET, "forged"),
    )
    opening = pb.TrainRequest(open=pb.TrainOpen(model="alpha", shared_memory="gradstream-x"))
    with pytest.raises(grpc.RpcError) as refused:
        list(
            channel.stream_stream(TRAIN, None, None)(
                iter([opening.SerializeToString()]), metadata=metadata, timeout=5
            )
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()


def test_the_test_server_runs_in_the_mode_asked(server: BackgroundServer) -> None:
    # GRADSTREAM_TEST_INGEST=process (test_ingest_parity.py) must not pass by running inline.
    assert (server.server.front is not None) == (INGEST == "process")
    assert server.server.settings.ingest == INGEST


def test_a_method_of_the_fronts_own_replaces_the_raw_forward(
    pair: dict[str, BackgroundServer],
) -> None:
    # The seam for Train's ingest path: a handler made from the link to the backend.
    running = pair["process"]
    served: list[str] = []

    def counted(link: BackendLink, settings: Settings) -> Any:
        raw: Any = forward(link, LIST_MODELS).unary_unary

        async def handle(request: bytes, context: Any) -> bytes:
            served.append(settings.ingest)
            answer: bytes = await raw(request, context)
            return answer

        return grpc.unary_unary_rpc_method_handler(handle)

    async def scenario() -> bytes:
        socket_path, secret = _private_socket(running), running.server._secret
        front = Front(running.server.settings, socket_path, secret, {LIST_MODELS: counted})
        port = await front.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                listing: bytes = await channel.unary_unary(LIST_MODELS, None, None)(
                    b"", metadata=(("authorization", f"Bearer {ADMIN}"),), timeout=10
                )
                return listing
        finally:
            await front.stop(0)

    listing = pb.ListModelsResponse.FromString(asyncio.run(scenario()))
    assert served == ["process"]
    assert "alpha" in [model.name for model in listing.models]


def test_process_mode_is_refused_with_data_parallel() -> None:
    with pytest.raises(StartupRefused, match="ingest: 'process' cannot run data-parallel"):
        run(Settings(ingest="process", distributed="on", port=0))


# -- the two processes ---------------------------------------------------------------------


SERVE = (
    *(sys.executable, "-m", "gradstream.client.cli", "serve", "--ingest", "process"),
    *("--health-port", "-1", "--metrics-port", "-1", "--device", "cpu"),
)


class Served:
    """``gradstream serve --ingest process`` in a subprocess, found through its ready file."""

    def __init__(self, tmp_path: Path) -> None:
        ready = tmp_path / "ready.json"
        self.process = subprocess.Popen(
            [*SERVE, "--port", "0", "--drain-timeout", "10", "--ready-file", str(ready)],
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert self.process.poll() is None, self.stderr()
            assert time.monotonic() < deadline, "gradstream serve did not start"
            time.sleep(0.05)
        announced = json.loads(ready.read_text())
        self.port, self.front_pid = announced["port"], announced["front_pid"]
        self.socket_dirs = _socket_dirs(self.process.pid)

    def stderr(self) -> str:
        assert self.process.stderr is not None
        return self.process.stderr.read().decode(errors="replace")

    def wait(self, timeout: float = 30) -> int:
        return self.process.wait(timeout)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """A ``Served``; killed with its front if a failing test left them running."""
    server = Served(tmp_path)
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.front_pid, signal.SIGKILL)


def _socket_dirs(pid: int) -> list[Path]:
    """The unix sockets a process listens on (from /proc/net/unix), as their directories."""
    inodes = {
        os.readlink(f"/proc/{pid}/fd/{fd}").removeprefix("socket:[").rstrip("]")
        for fd in os.listdir(f"/proc/{pid}/fd")
        if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    }
    paths = []
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[6] in inodes and fields[7].endswith("backend.sock"):
            paths.append(Path(fields[7]).parent)
    return paths


def _gone(pid: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A child of ours stays a zombie until reaped: that counts as gone.
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def _trains(port: int) -> None:
    with Client(f"127.0.0.1:{port}", timeout=20) as client:
        client.create_model("m", SPEC)
        assert [r.outcome for r in client.train("m", [(X, Y)] * 3)] == ["APPLIED"] * 3


def test_serve_announces_the_front_and_sigterm_stops_both(served: Served) -> None:
    assert served.socket_dirs, "the backend listens on no private socket"
    _trains(served.port)
    # The front stands back for the backend's steps: every thread of it, none of the backend's.
    backend = _nices(served.process.pid)
    assert backend and set(backend) == {os.nice(0)}
    assert set(_nices(served.front_pid)) == {min(19, os.nice(0) + FRONT_NICE)}
    served.process.send_signal(signal.SIGTERM)
    assert served.wait() == 0, served.stderr()
    assert _gone(served.front_pid)
    assert not any(d.exists() for d in served.socket_dirs)


def _nices(pid: int) -> list[int]:
    """The nice value of each thread of ``pid`` (field 19 of its stat)."""
    nices = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        nices.append(int(stat[stat.rindex(")") + 2 :].split()[16]))
    return nices


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_the_backend_exits_non_zero_when_the_front_dies(
    served: Served, how: signal.Signals
) -> None:
    os.kill(served.front_pid, how)
    assert served.wait() == 1
    assert "the front process exited" in served.stderr()
    assert not any(d.exists() for d in served.socket_dirs)


def test_a_public_port_in_use_is_named_and_leaves_nothing_behind(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        serve = subprocess.Popen([*SERVE, "--port", str(port)], stderr=subprocess.PIPE, text=True)
        _, stderr = serve.communicate(timeout=60)
    assert serve.returncode == 1
    assert f"--port {port}" in stderr and "already in use" in stderr
    assert not list(Path(tempfile.gettempdir()).glob(f"gradstream-{serve.pid}-*"))


def test_sigterm_answers_the_stream_in_flight_then_ends_it_unavailable(
    served: Served,
) -> None:
    release = threading.Event()

    def slow() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        yield from [(X, Y)] * 3
        release.wait(30)  # the stream stays open, idle

    try:
        with Client(f"127.0.0.1:{served.port}", timeout=30) as client:
            client.create_model("m", SPEC)
            stream = client.train("m", slow())
            assert [next(stream).outcome for _ in range(3)] == ["APPLIED"] * 3
            served.process.send_signal(signal.SIGTERM)
            with pytest.raises(Unavailable, match="shutting down"):
                next(stream)
    finally:
        release.set()
    assert served.wait() == 0
    assert _gone(served.front_pid)


def _shared_memory_of(pid: int) -> set[str]:
    """The /dev/shm files a process has mapped or open."""
    found = {
        line.split(maxsplit=5)[5].removesuffix(" (deleted)")
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
        if "/dev/shm/" in line
    }
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("/dev/shm/"):
                found.add(target.removesuffix(" (deleted)"))
    return found


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
@pytest.mark.parametrize("victim", ["front", "backend"])
def test_a_killed_process_takes_its_peer_and_shared_memory_along(
    served: Served, victim: str, signum: signal.Signals
) -> None:
    release = threading.Event()

    def idle() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        yield from [(X, Y)] * 3
        release.wait(30)

    try:
        with Client(f"127.0.0.1:{served.port}", timeout=30) as client:
            client.create_model("m", SPEC)
            stream = client.train("m", idle())
            assert [next(stream).outcome for _ in range(3)] == ["APPLIED"] * 3
            pids = (served.process.pid, served.front_pid)
            segments = set().union(*(_shared_memory_of(pid) for pid in pids))
            os.kill(served.front_pid if victim == "front" else served.process.pid, signum)
            with contextlib.suppress(GradstreamError):
                list(stream)
    finally:
        release.set()
    served.wait()
    assert _gone(served.front_pid)
    # A front that ends its streams unlinks their slots itself; one killed (by the test, or
    # by the backend when it does not exit within the drain) leaves them to multiprocessing's
    # resource tracker, which unlinks them once it sees the front gone: soon, not at once.
    deadline = time.monotonic() + 20
    while [s for s in segments if Path(s).exists()] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [s for s in segments if Path(s).exists()]
    assert not any(d.exists() for d in served.socket_dirs)
    with pytest.raises(GradstreamError) as closed:
        Client(f"127.0.0.1:{served.port}", timeout=2).list_models()
    assert closed.value.code == grpc.StatusCode.UNAVAILABLE
