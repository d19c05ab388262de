"""DESIGN.md's status-code table, row by row, for every RPC that can reach the row."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from gradstream.client import Client, FailedPrecondition, GradstreamError
from gradstream.server.engine import Trainer
from gradstream.server.main import BackgroundServer
from gradstream.server.snapshot import Snapshots
from gradstream.v1 import trainer_pb2 as pb
from gradstream.v1 import trainer_pb2_grpc as pb_grpc
from tests.conftest import server_settings

SPEC = {
    "architecture": {"kind": "linear", "in_features": 2, "out_features": 1},
    "optimizer": {"kind": "sgd", "lr": 0.01},
}
X = np.ones((3, 2), np.float32)
Y = np.ones((3, 1), np.float32)
METHODS = [
    m.name for m in pb.DESCRIPTOR.services_by_name["TrainerService"].methods
]  # every RPC the proto has, including ones added after this test was written


def _raw(channel: grpc.Channel, method: str, payload: bytes) -> grpc.StatusCode:
    path = f"/gradstream.v1.TrainerService/{method}"
    try:
        if method == "Train":
            list(channel.stream_stream(path, None, None)(iter([payload]), timeout=30))
        else:
            channel.unary_unary(path, None, None)(payload, timeout=30)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _code(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        call()
    except GradstreamError as exc:
        return exc.code
    return grpc.StatusCode.OK


@pytest.mark.parametrize("method", METHODS)
def test_unparsable_request_is_invalid_argument_for_every_rpc(
    server: BackgroundServer, method: str
) -> None:
    with grpc.insecure_channel(server.target) as channel:
        assert _raw(channel, method, b"\xff\xff\xff\xff") == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("method", METHODS)
def test_message_too_large_is_resource_exhausted_for_every_rpc(
    server: BackgroundServer, method: str
) -> None:
    limit = server.server.settings.max_message_bytes
    options = [("grpc.max_send_message_length", 2 * limit)]
    with grpc.insecure_channel(server.target, options=options) as channel:
        # An unknown field of limit + 1 bytes: well-formed, only too big.
        payload = b"\xfa\x3f" + _varint(limit + 1) + bytes(limit + 1)
        assert _raw(channel, method, payload) == grpc.StatusCode.RESOURCE_EXHAUSTED


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def test_unknown_model_is_not_found_for_every_rpc_that_names_one(client: Client) -> None:
    missing = "no-such-model"
    calls: dict[str, Callable[[], Any]] = {
        "GetModel": lambda: client.get_model(missing),
        "DeleteModel": lambda: client.delete_model(missing),
        "UpdateModel": lambda: client.update_model(missing, lr=0.1),
        "SetParameters": lambda: client.set_parameters(missing, {"bias": np.zeros(1)}),
        "GetParameters": lambda: client.parameters(missing),
        "Predict": lambda: client.predict(missing, X),
        "ComputeGradients": lambda: client.gradients(missing, X, Y),
        "Train": lambda: list(client.train(missing, [(X, Y)])),
    }
    for rpc, call in calls.items():
        assert _code(call) == grpc.StatusCode.NOT_FOUND, rpc


def test_bad_input_is_invalid_argument_for_every_rpc_that_takes_some(
    client: Client, name: str
) -> None:
    client.create_model(name, SPEC)
    nan = np.full((3, 2), np.nan, np.float32)
    calls: dict[str, Callable[[], Any]] = {
        "CreateModel": lambda: client.create_model(
            "bad-spec", {"architecture": {"kind": "linear", "in_features": -1, "out_features": 1}}
        ),
        "CreateModel name": lambda: client.create_model("../etc/passwd", SPEC),
        "UpdateModel": lambda: client.update_model(name, lr=float("nan")),
        "SetParameters": lambda: client.set_parameters(name, {"bias": np.zeros(7, np.float32)}),
        "Predict": lambda: client.predict(name, np.ones((3, 5), np.float32)),
        "Predict NaN": lambda: client.predict(name, nan),
        "ComputeGradients": lambda: client.gradients(name, X, np.ones((2, 1), np.float32)),
        "Predict empty": lambda: client.predict(name, np.ones((0, 2), np.float32)),
    }
    for rpc, call in calls.items():
        assert _code(call) == grpc.StatusCode.INVALID_ARGUMENT, rpc
    # Train: a stream whose first message does not open it.
    with grpc.insecure_channel(client.target) as channel:
        stub = pb_grpc.TrainerServiceStub(channel)
        with pytest.raises(grpc.RpcError) as failure:
            list(stub.Train(iter([pb.TrainRequest()]), timeout=30))
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_existing_model_is_already_exists(client: Client, name: str) -> None:
    client.create_model(name, SPEC)
    assert _code(lambda: client.create_model(name, SPEC)) == grpc.StatusCode.ALREADY_EXISTS


def test_divergence_guard_refuses_training_until_parameters_are_set(
    client: Client, name: str, server: BackgroundServer
) -> None:
    limit = server.server.settings.max_nonfinite_steps
    assert limit > 0
    spec = {
        "architecture": {"kind": "linear", "in_features": 1, "out_features": 1, "bias": False},
        "init": {"kind": "tensors", "tensors": {"weight": [[3e38]]}},
    }
    client.create_model(name, spec)
    x, y = np.full((2, 1), 3e38, np.float32), np.zeros((2, 1), np.float32)
    seen: list[str] = []
    with pytest.raises(FailedPrecondition, match="diverged") as failure:
        for result in client.train(name, [(x, y)] * (limit + 5)):
            seen.append(result.outcome)
    assert seen == ["SKIPPED_NONFINITE"] * limit
    assert f"{limit} non-finite steps in a row" in str(failure.value)
    assert client.get_model(name).nonfinite_streak == limit
    # Still refused on a new stream, even with a finite batch: the model needs attention.
    ok = (np.ones((2, 1), np.float32), np.ones((2, 1), np.float32))
    with pytest.raises(FailedPrecondition):
        list(client.train(name, [ok]))
    before = client.parameters(name)["weight"]
    assert before.item() == np.float32(3e38)  # the skipped steps never touched it
    client.set_parameters(name, {"weight": np.array([[0.5]], np.float32)})
    (result,) = client.train(name, [ok])
    assert result.outcome == "APPLIED"
    assert client.get_model(name).nonfinite_streak == 0


def test_all_frozen_model_cannot_give_gradients(client: Client, name: str) -> None:
    client.create_model(name, {**SPEC, "frozen": ["weight", "bias"]})
    code = _code(lambda: client.gradients(name, X, Y))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


def test_draining_server_answers_unavailable() -> None:
    settings = server_settings(drain_timeout=10)
    running = BackgroundServer(settings).start()
    release = threading.Event()
    with Client(running.target, timeout=10) as client:
        client.create_model("busy", SPEC)
        channel = grpc.insecure_channel(running.target)
        stub = pb_grpc.TrainerServiceStub(channel)

        def hold() -> Iterator[pb.TrainRequest]:
            yield pb.TrainRequest(open=pb.TrainOpen(model="busy"))
            release.wait(30)

        stream = stub.Train(hold(), timeout=30)
        assert next(iter(stream)).HasField("opened")
        stopper = threading.Thread(target=running.stop)
        stopper.start()  # drains: waits for the open stream
        try:
            codes = set()
            for _ in range(200):
                codes.add(_code(lambda: client.get_model("busy")))
                if grpc.StatusCode.UNAVAILABLE in codes:
                    break
                release.wait(0.02)
            assert grpc.StatusCode.UNAVAILABLE in codes, codes
            # A call that races the start of shutdown is cancelled by gRPC core itself.
            assert codes <= {
                grpc.StatusCode.OK,
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.CANCELLED,
            }
        finally:
            release.set()
            stream.cancel()
            stopper.join(30)
            channel.close()


def test_internal_errors_are_sanitized_and_logged(
    client: Client, name: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    client.create_model(name, SPEC)

    def broken(self: Trainer) -> Any:
        raise RuntimeError("cannot open /srv/secret/weights.bin for writing")

    monkeypatch.setattr(Trainer, "info", broken)
    with (
        caplog.at_level(logging.ERROR, logger="gradstream.server"),
        pytest.raises(GradstreamError) as failure,
    ):
        client.get_model(name)
    assert failure.value.code == grpc.StatusCode.INTERNAL
    details = failure.value.details
    assert details.startswith("internal error (incident ")
    for leak in ("/srv", "secret", "Traceback", "RuntimeError", ".py"):
        assert leak not in details
    incident = details.removeprefix("internal error (incident ").rstrip(")")
    logged = "\n".join(
        r.getMessage() + (str(r.exc_info[1]) if r.exc_info else "") for r in caplog.records
    )
    assert incident in logged and "/srv/secret/weights.bin" in logged


@pytest.mark.parametrize(
    "error",
    [
        "cuda",
        "cpu",
    ],
)
def test_out_of_memory_is_resource_exhausted(
    client: Client, name: str, monkeypatch: pytest.MonkeyPatch, error: str
) -> None:
    import torch

    client.create_model(name, SPEC)

    def exhausted(self: object, *inputs: Any, **snapshot: Any) -> Any:
        if error == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"
        )

    # Predict runs on a snapshot (Snapshots.predict), or on the worker with snapshots off.
    monkeypatch.setattr(Trainer, "predict", exhausted)
    monkeypatch.setattr(Snapshots, "predict", exhausted)
    with pytest.raises(GradstreamError) as failure:
        client.predict(name, X)
    assert failure.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "out of memory" in failure.value.details
    assert "alloc_cpu" not in failure.value.details
    monkeypatch.undo()
    assert client.predict(name, X).shape == (3, 1)  # the model is fine afterwards


@pytest.mark.parametrize(
    "path",
    [
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ],
)
def test_unparsable_request_to_health_and_reflection_is_invalid_argument(
    server: BackgroundServer, path: str
) -> None:
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as failure:
            if path.endswith("Check"):
                channel.unary_unary(path, None, None)(b"\xff\xff", timeout=10)
            elif path.endswith("Watch"):
                list(channel.unary_stream(path, None, None)(b"\xff\xff", timeout=10))
            else:
                list(channel.stream_stream(path, None, None)(iter([b"\xff\xff"]), timeout=10))
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_health_watch_still_streams(server: BackgroundServer) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        first = next(iter(watch))
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_drain_while_a_stream_is_opening_ends_it_with_unavailable() -> None:
    """drain() lands after the stream is registered but before its reader task first runs.

    A task cancelled before it starts never runs its body, so the stream's end-of-requests
    marker must not depend on the reader's own except/finally (seen: the stream hung, and
    shutdown waited out half the drain time).
    """
    running = BackgroundServer(server_settings(drain_timeout=20)).start()
    loop = running._loop
    assert loop is not None
    worker_free = threading.Event()
    try:
        with Client(running.target, timeout=10) as client:
            client.create_model("opening", SPEC)
            worker = running.server.registry.get("opening")
            # Hold the model's worker so the stream waits in opening, already registered.
            asyncio.run_coroutine_threadsafe(
                worker.submit(lambda _: worker_free.wait(30)), loop
            ).result(10)
            with grpc.insecure_channel(running.target) as channel:
                stub = pb_grpc.TrainerServiceStub(channel)
                requests_done = threading.Event()

                def requests() -> Iterator[pb.TrainRequest]:
                    yield pb.TrainRequest(open=pb.TrainOpen(model="opening"))
                    requests_done.wait(30)

                responses = iter(stub.Train(requests(), timeout=10))
                servicer = running.server.servicer
                deadline = time.monotonic() + 10
                while servicer.open_streams == 0 and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert servicer.open_streams == 1
                loop.call_soon_threadsafe(servicer.drain)
                worker_free.set()
                try:
                    assert next(responses).HasField("opened")
                    with pytest.raises(grpc.RpcError) as ended:
                        next(responses)
                    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
                finally:
                    requests_done.set()
    finally:
        worker_free.set()
        running.stop()
