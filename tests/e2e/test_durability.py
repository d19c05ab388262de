"""Durability end to end: real ``gradstream serve`` processes killed, drained and restarted.

Every test here runs servers in subprocesses (LocalServer) on a checkpoint
directory, and reads what they left on disk with the server's own reader.
"""

from __future__ import annotations

import random
import re
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradstream.client import Client, DataLoss, ProducerStream, StepResult
from gradstream.client._local import LocalServer
from gradstream.server import checkpoint as ck
from gradstream.server.batches import Batch
from gradstream.server.engine import Outcome, Trainer, TrainOptions
from gradstream.server.spec import parse_spec

SPEC = {
    "architecture": {"kind": "mlp", "in_features": 3, "out_features": 2, "hidden": [8]},
    "init": {"kind": "seed", "seed": 7},
    "optimizer": {"kind": "sgd", "lr": 0.02, "momentum": 0.9},
}
# Adam mid-way through warmup then cosine decay, clipped: every piece of state at once.
ADAM_SPEC = SPEC | {
    "optimizer": {"kind": "adam", "lr": 0.01, "amsgrad": True},
    "schedule": {
        "kind": "sequential",
        "schedulers": [
            {"kind": "linear", "start_factor": 0.1, "total_iters": 20},
            {"kind": "cosine_annealing", "t_max": 180, "eta_min": 1e-4},
        ],
        "milestones": [20],
    },
    "clip_grad": {"max_norm": 0.5},
}
BATCHES = 200
LOST = "applied before a reconnect"


def _serve(directory: Path, log: Path, *extra: str, port: int = 0) -> LocalServer:
    args = ["--device", "cpu", "--threads", "1", "--checkpoint-dir", str(directory)]
    args += ["--checkpoint-every-steps", "7", "--checkpoint-every-seconds", "0", *extra]
    if port:
        args += ["--port", str(port)]
    return LocalServer(*args, log=log).start()


def _data(n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        (
            rng.standard_normal((16, 3)).astype(np.float32),
            rng.standard_normal((16, 2)).astype(np.float32),
        )
        for _ in range(n)
    ]


def _saved_state(directory: Path, model: str) -> ck.Snapshot:
    """The newest checkpoint a stopped server left: parameters, momentum, step, producers."""
    return ck.newest(directory / model)[1]


def _trained_state(snapshot: ck.Snapshot) -> dict[str, torch.Tensor]:
    return {k: v for k, v in snapshot.tensors.items() if k.startswith(("param/", "optim/"))}


class _Restarter:
    """Kills a server with a signal and starts its successor on the same port, in a thread."""

    def __init__(self, server: LocalServer, directory: Path, log: Path, *extra: str) -> None:
        self.server = server
        self.directory, self.log, self.extra = directory, log, extra
        self.fired = threading.Event()
        self.restarted = threading.Event()
        self.error: BaseException | None = None

    def fire(self, sig: int = signal.SIGKILL) -> None:
        if self.fired.is_set():
            return
        self.fired.set()
        port = self.server.port
        self.server.stop(sig)
        threading.Thread(target=self._restart, args=(port,), daemon=True).start()

    def _restart(self, port: int) -> None:
        try:
            self.server = _serve(self.directory, self.log, *self.extra, port=port)
        except BaseException as exc:
            self.error = exc
        finally:
            self.restarted.set()


def _consume(stream: ProducerStream, on_result: Any = None) -> list[StepResult]:
    results = []
    for result in stream:
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def _assert_each_once(results: list[StepResult], n: int) -> None:
    assert [r.sequence for r in results] == list(range(1, n + 1))
    for r in results:  # applied now, or applied before the connection broke
        assert r.outcome == "APPLIED" or (r.outcome == "DUPLICATE" and LOST in r.reason), r


@pytest.fixture(scope="module")
def uninterrupted() -> ck.Snapshot:
    """The reference: the same 200 batches through the server's own Trainer, never stopped."""
    return _uninterrupted(SPEC)


@pytest.fixture(scope="module")
def uninterrupted_adam() -> ck.Snapshot:
    return _uninterrupted(ADAM_SPEC)


def _uninterrupted(spec: dict[str, Any]) -> ck.Snapshot:
    """One torch thread, like the servers under test (``--threads 1``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer("m", parse_spec(spec), torch.device("cpu"))
        options = TrainOptions(producer_id="p")
        for i, (x, y) in enumerate(_data(BATCHES, 1)):
            batch = Batch(torch.from_numpy(x), torch.from_numpy(y), sequence=i + 1)
            assert trainer.train(batch, options).outcome == Outcome.APPLIED
        return ck.take(trainer)
    finally:
        torch.set_num_threads(threads)


def _kill_and_resume(tmp_path: Path, seed: int, reference: ck.Snapshot) -> None:
    """Three producer streams at once: "p" alone on model "m" (compared bitwise with the
    uninterrupted run), "a" and "b" together on model "shared" (counts and order: the
    interleaving of two producers is free). One SIGKILL mid-stream, one restart.

    No DUPLICATE and step == total also proves each producer's order: the server
    answers DUPLICATE to any sequence at or below the producer's last applied one.
    """
    rng = random.Random(seed)
    shared_n = 120
    log = tmp_path / "server.log"
    restarter = _Restarter(_serve(tmp_path, log), tmp_path, log)
    target = restarter.server.target
    streams: dict[str, ProducerStream] = {}
    results: dict[str, list[StepResult]] = {}
    errors: list[BaseException] = []
    arrived: list[str] = []
    lock = threading.Lock()

    def gated(producer: str, data: list[Any]) -> Iterator[Any]:
        """Each producer stops at a random batch; the last to get there kills the server,
        with the batches before still in flight. Then all go on."""
        stop_at = rng.randrange(5, len(data) - 5)
        for i, batch in enumerate(data):
            if i == stop_at:
                with lock:
                    arrived.append(producer)
                    last = len(arrived) == 3
                if last:
                    restarter.fire(signal.SIGKILL)
                assert restarter.fired.wait(120)
            yield batch

    def produce(model: str, producer: str, data: list[Any]) -> None:
        try:
            with Client(target) as client:
                stream = client.train(model, gated(producer, data), producer_id=producer)
                assert isinstance(stream, ProducerStream)
                streams[producer] = stream
                results[producer] = _consume(stream)
        except BaseException as exc:
            errors.append(exc)

    jobs = [
        ("m", "p", _data(BATCHES, 1)),
        ("shared", "a", _data(shared_n, 2)),
        ("shared", "b", _data(shared_n, 3)),
    ]
    try:
        with Client(target) as client:
            client.create_model("m", SPEC)
            client.create_model("shared", SPEC)
        threads = [threading.Thread(target=produce, args=job) for job in jobs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(240)
        assert not errors, errors
        assert restarter.restarted.wait(60) and restarter.error is None
        assert all(s.reconnects >= 1 for s in streams.values()), f"seed {seed}: no reconnect"
        _assert_each_once(results["p"], BATCHES)
        assert streams["p"].durable_sequence == BATCHES
        for producer in ("a", "b"):
            _assert_each_once(results[producer], shared_n)
        with Client(target) as client:
            assert client.get_model("m").step == BATCHES
            assert client.get_model("shared").step == 2 * shared_n
    finally:
        assert restarter.server.stop() == 0
    shared = _saved_state(tmp_path, "shared")
    assert shared.step == 2 * shared_n and shared.producers == {"a": shared_n, "b": shared_n}
    got = _saved_state(tmp_path, "m")
    assert got.step == BATCHES and got.producers == {"p": BATCHES}, f"seed {seed}"
    want = _trained_state(reference)
    have = _trained_state(got)
    assert have.keys() == want.keys() and any(k.startswith("optim/") for k in want)
    for key, value in want.items():
        assert torch.equal(have[key], value), f"seed {seed}: {key} differs"


def test_sigkill_mid_schedule_with_adam_resumes_bitwise_with_its_lr(
    tmp_path: Path, uninterrupted_adam: ck.Snapshot
) -> None:
    """Killed once a checkpoint past the warmup is on disk, the producer re-sends what
    that checkpoint lacks; the end state is the uninterrupted run's, lr included."""
    log = tmp_path / "server.log"
    restarter = _Restarter(_serve(tmp_path, log), tmp_path, log)

    def kill_mid_schedule(result: StepResult) -> None:
        due = not restarter.fired.is_set() and result.sequence > 30
        if due and ck.newest(tmp_path / "m")[1].step > 20:
            restarter.fire(signal.SIGKILL)

    def paced(data: list[Any]) -> Iterator[Any]:
        """Periodic checkpoints queue behind training on the worker: give them room."""
        for i, batch in enumerate(data):
            if i > 30 and not restarter.fired.is_set():
                time.sleep(0.01)
            yield batch

    try:
        with Client(restarter.server.target) as client:
            client.create_model("m", ADAM_SPEC)
            stream = client.train("m", paced(_data(BATCHES, 1)), producer_id="p")
            assert isinstance(stream, ProducerStream)
            results = _consume(stream, kill_mid_schedule)
        assert restarter.fired.is_set(), "no checkpoint past the warmup before the end"
        assert restarter.restarted.wait(60) and restarter.error is None
        assert stream.reconnects >= 1
        _assert_each_once(results, BATCHES)
        with Client(restarter.server.target) as client:
            model = client.get_model("m")
            assert model.step == BATCHES
            assert model.lr == uninterrupted_adam.param_groups[0]["lr"]
    finally:
        assert restarter.server.stop() == 0
    found = re.findall(r"model restored name=m checkpoint=\S+ step=(\d+)", log.read_text())
    assert found and int(found[-1]) > 20, found  # past the warmup, mid-cosine
    got = _saved_state(tmp_path, "m")
    assert got.step == BATCHES and got.producers == {"p": BATCHES}
    want, have = _trained_state(uninterrupted_adam), _trained_state(got)
    assert have.keys() == want.keys() and any(k.endswith("/exp_avg_sq") for k in want)
    for key, value in want.items():
        assert torch.equal(have[key], value), key
    assert got.param_groups == uninterrupted_adam.param_groups  # lr to the bit
    assert got.schedule == uninterrupted_adam.schedule


def test_sigkill_mid_stream_then_restart_resumes_every_producer_exactly_once(
    tmp_path: Path, uninterrupted: ck.Snapshot
) -> None:
    _kill_and_resume(tmp_path, 1, uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(5))
def test_sigkill_at_random_steps_five_trials(
    tmp_path: Path, uninterrupted: ck.Snapshot, trial: int
) -> None:
    _kill_and_resume(tmp_path, 100 + trial, uninterrupted)


def _health(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        status: int = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5).status
        return status


def test_sigterm_with_four_streams_drains_checkpoints_and_loses_nothing(tmp_path: Path) -> None:
    n, models = 300, ("m0", "m1", "m2", "m3")
    log = tmp_path / "server.log"
    drain = 10.0
    extra = ("--drain-timeout", str(drain), "--checkpoint-every-steps", "1000")
    restarter = _Restarter(_serve(tmp_path, log, *extra), tmp_path, log, *extra)
    first = restarter.server
    streams: dict[str, ProducerStream] = {}
    results: dict[str, list[StepResult]] = {}
    errors: list[BaseException] = []
    going = threading.Barrier(len(models) + 1)
    applied_at_stop: dict[str, int] = {}

    def paced(seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i, batch in enumerate(_data(n, seed)):
            if i >= 20 and not restarter.fired.is_set():
                time.sleep(0.01)  # keep the stream open until the signal
            yield batch

    def at_twenty(result: StepResult) -> None:
        if result.sequence == 20:
            going.wait(60)

    def produce(model: str) -> None:
        try:
            with Client(first.target) as client:
                stream = client.train(model, paced(models.index(model)), producer_id="p")
                assert isinstance(stream, ProducerStream)
                streams[model] = stream
                results[model] = _consume(stream, at_twenty)
        except BaseException as exc:
            errors.append(exc)

    try:
        with Client(first.target) as client:
            for model in models:
                client.create_model(model, SPEC)
        threads = [threading.Thread(target=produce, args=(m,)) for m in models]
        for thread in threads:
            thread.start()
        going.wait(60)
        assert _health(first.health_port) == health_pb2.HealthCheckResponse.SERVING
        assert first.process is not None
        first.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        while _health(first.health_port) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() - signalled < 1.0, "health still SERVING 1 s after SIGTERM"
        first.process.wait(drain)
        assert first.process.returncode == 0
        deadline = time.monotonic() + 30
        while any(streams[m].reconnects == 0 for m in models):  # each saw its UNAVAILABLE
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # What the streams had applied when the server went is exactly what it saved.
        for model in models:
            applied_at_stop[model] = streams[model].applied_sequence
            saved = _saved_state(tmp_path, model)
            assert saved.producers == {"p": applied_at_stop[model]} and saved.step >= 20
        restarter.fire()  # the same port again; the streams resume by themselves
        for thread in threads:
            thread.join(180)
        assert not errors, errors
        for model in models:
            # No batch the old server applied was lost, so no result had to be made up.
            assert [r.sequence for r in results[model]] == list(range(1, n + 1))
            assert {r.outcome for r in results[model]} == {"APPLIED"}
            assert streams[model].reconnects >= 1
        with Client(restarter.server.target) as client:
            assert [client.get_model(m).step for m in models] == [n] * len(models)
    finally:
        assert restarter.server.stop() == 0
    assert "final checkpoints written" in log.read_text()


def _metric(port: int, line_start: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric line starts with {line_start}")


def test_damaged_checkpoints_fall_back_or_answer_data_loss_and_other_models_go_on(
    tmp_path: Path,
) -> None:
    """Newest truncated / one byte flipped: the previous one is restored and reported.
    Every checkpoint a pickle: that model answers DATA_LOSS, the others serve."""
    log = tmp_path / "server.log"
    server = _serve(tmp_path, log, "--checkpoint-every-steps", "0")
    damaged = ("truncated", "flipped")
    previous: dict[str, tuple[int, dict[str, np.ndarray]]] = {}
    newest: dict[str, str] = {}
    with Client(server.target) as client:
        for model in (*damaged, "pickled", "good"):
            client.create_model(model, SPEC)
            list(client.train(model, _data(10, 1)))
            previous[model] = (client.save_checkpoint(model).step, client.parameters(model))
            list(client.train(model, _data(5, 2)))
            newest[model] = client.save_checkpoint(model).checkpoint
    server.stop(signal.SIGKILL)
    for model in damaged:
        tensors = tmp_path / model / newest[model] / ck.TENSORS
        data = bytearray(tensors.read_bytes())
        if model == "truncated":
            del data[len(data) // 2 :]
        else:
            data[len(data) - 5] ^= 0x10
        tensors.write_bytes(bytes(data))
    for path in (tmp_path / "pickled").iterdir():  # every checkpoint of it: a pickle now
        (path / ck.TENSORS).write_bytes(b"\x80\x04\x95" + b"\x00" * 64)

    server = _serve(tmp_path, log)
    try:
        with Client(server.target) as client:
            for model in damaged:
                step, params = previous[model]
                assert (step, client.get_model(model).step) == (10, 10)
                restored = client.parameters(model)
                assert restored.keys() == params.keys()
                for key, value in params.items():
                    np.testing.assert_array_equal(restored[key], value)
                fallbacks = f'gradstream_checkpoint_restore_fallbacks_total{{model="{model}"}}'
                assert _metric(server.metrics_port, fallbacks) == 1
            assert client.get_model("good").step == 15
            assert [r.outcome for r in client.train("good", _data(2, 1))] == ["APPLIED"] * 2
            with pytest.raises(DataLoss, match="pickle"):
                client.get_model("pickled")
            with pytest.raises(DataLoss):
                list(client.train("pickled", _data(1, 1)))
            client.delete_model("pickled")  # an operator's way out: the name is free again
            client.create_model("pickled", SPEC)
        success = 'gradstream_checkpoint_last_success_timestamp_seconds{model="good"}'
        assert _metric(server.metrics_port, success) > 0
    finally:
        server.stop()
    text = log.read_text()
    for model in damaged:
        assert f"skipping checkpoint {newest[model]} of model {model!r}" in text
    assert "model 'pickled' not restored" in text
