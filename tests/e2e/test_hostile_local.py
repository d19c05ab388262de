"""A hostile local client against a real ``gradstream serve`` process: it must neither
crash nor hang it. Each test ends by checking that the same process still runs and
that its health port answers within a second.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradstream.client import Client, ResourceExhausted
from gradstream.client._local import LocalServer
from gradstream.v1 import trainer_pb2 as pb
from gradstream.v1 import trainer_pb2_grpc as pb_grpc
from gradstream.wire import to_proto

CLASSES = {
    "architecture": {"kind": "linear", "in_features": 8, "out_features": 3},
    "loss": {"kind": "cross_entropy"},
    "init": {"kind": "zeros"},
}


@pytest.fixture(scope="module")
def local() -> Iterator[LocalServer]:
    server = LocalServer("--device", "cpu", "--threads", "1").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(local: LocalServer) -> Iterator[Client]:
    with Client(local.target) as c:
        yield c


@pytest.fixture
def stub(local: LocalServer) -> Iterator[pb_grpc.TrainerServiceStub]:
    with grpc.insecure_channel(local.target) as channel:
        yield pb_grpc.TrainerServiceStub(channel)


@pytest.fixture
def segment() -> Iterator[Path]:
    path = Path("/dev/shm") / f"gradstream-test-{uuid.uuid4().hex[:12]}"
    try:
        yield path
    finally:
        if path.is_fifo():  # a server stuck opening it is let go before it is removed
            with contextlib.suppress(OSError):
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        path.unlink(missing_ok=True)


def _healthy(local: LocalServer, pid: int) -> None:
    """The same process runs, and its health port answers within 1 s."""
    assert local.process is not None
    assert local.process.poll() is None, f"the server died: {local.process.returncode}"
    assert local.process.pid == pid
    with grpc.insecure_channel(f"127.0.0.1:{local.health_port}") as channel:
        start = time.monotonic()
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=1
        )
        assert time.monotonic() - start < 1
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def _pid(local: LocalServer) -> int:
    assert local.process is not None
    return local.process.pid


def _shared(array: np.ndarray, offset: int) -> pb.Tensor:
    tensor = to_proto(array)
    tensor.data = b""
    tensor.shared.offset, tensor.shared.length = offset, array.nbytes
    return tensor


def _x_then_labels(rows: int, labels: np.ndarray) -> bytes:
    return np.ones((rows, 8), np.float32).tobytes() + labels.astype(np.int64).tobytes()


def _labels_batch(rows: int, sequence: int = 0) -> pb.Batch:
    return pb.Batch(
        x=_shared(np.ones((rows, 8), np.float32), 0),
        y=_shared(np.zeros(rows, np.int64), rows * 8 * 4),
        sequence=sequence,
    )


def test_a_segment_truncated_under_a_stream_rejects_the_batch_without_a_crash(
    local: LocalServer, client: Client, stub: pb_grpc.TrainerServiceStub, segment: Path
) -> None:
    pid = _pid(local)
    client.create_model("shrunk", CLASSES)
    segment.write_bytes(_x_then_labels(4, np.zeros(4)) + bytes(8192))
    truncated = threading.Event()

    def requests() -> Iterator[pb.TrainRequest]:
        yield pb.TrainRequest(open=pb.TrainOpen(model="shrunk", shared_memory=segment.name))
        truncated.wait(10)
        yield pb.TrainRequest(batches=[_labels_batch(4)])

    responses = iter(stub.Train(requests(), timeout=30))
    assert next(responses).HasField("opened")
    os.truncate(segment, 0)  # offsets inside the size the server saw at open
    truncated.set()
    result = next(responses).results[0]
    assert result.outcome == pb.OUTCOME_REJECTED
    assert "shrank" in result.reason
    _healthy(local, pid)


def test_a_symlink_named_like_a_segment_is_refused_and_never_read(
    local: LocalServer,
    client: Client,
    stub: pb_grpc.TrainerServiceStub,
    segment: Path,
    tmp_path: Path,
) -> None:
    pid = _pid(local)
    client.create_model("linked", CLASSES)
    secret = tmp_path / "tokens"
    secret.write_bytes(b"s3cret-token-value-" * 8)
    segment.symlink_to(secret)
    requests = [
        pb.TrainRequest(open=pb.TrainOpen(model="linked", shared_memory=segment.name)),
        pb.TrainRequest(batches=[_labels_batch(1)]),
    ]
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Train(iter(requests), timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "s3cret" not in (caught.value.details() or "")
    _healthy(local, pid)


def test_a_fifo_named_like_a_segment_neither_blocks_nor_is_accepted(
    local: LocalServer, client: Client, stub: pb_grpc.TrainerServiceStub, segment: Path
) -> None:
    pid = _pid(local)
    client.create_model("fifo", CLASSES)
    os.mkfifo(segment)
    requests = [pb.TrainRequest(open=pb.TrainOpen(model="fifo", shared_memory=segment.name))]
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Train(iter(requests), timeout=5))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a regular file" in (caught.value.details() or "")
    _healthy(local, pid)


def test_labels_rewritten_after_the_check_are_not_what_is_trained(
    local: LocalServer, client: Client, stub: pb_grpc.TrainerServiceStub, segment: Path
) -> None:
    """The batch is checked, then queued behind a slow job; the producer rewrites its
    labels out of range meanwhile. What trains is what was checked."""
    pid = _pid(local)
    slow = {
        "architecture": {
            "kind": "mlp",
            "in_features": 8,
            "out_features": 3,
            "hidden": [1024, 1024],
        },
        "loss": {"kind": "cross_entropy"},
    }
    client.create_model("rewritten", slow)
    rows = 4
    segment.write_bytes(_x_then_labels(rows, np.zeros(rows)))
    busy_started, sent = threading.Event(), threading.Event()

    def requests() -> Iterator[pb.TrainRequest]:
        yield pb.TrainRequest(open=pb.TrainOpen(model="rewritten", shared_memory=segment.name))
        busy_started.wait(10)
        yield pb.TrainRequest(batches=[_labels_batch(rows, sequence=1)])
        sent.set()

    responses = iter(stub.Train(requests(), timeout=60))
    assert next(responses).HasField("opened")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # Keeps the model's worker busy (a second or so) while the batch waits behind it.
        busy = pool.submit(client.predict, "rewritten", np.ones((20_000, 8), np.float32))
        time.sleep(0.2)
        busy_started.set()
        assert sent.wait(10)
        time.sleep(0.2)  # the reader has checked the batch and queued it
        assert not busy.done(), "the slow job ended too soon for this test to mean anything"
        with open(segment, "r+b") as f:
            f.seek(rows * 8 * 4)
            f.write(np.full(rows, 10**6, np.int64).tobytes())
        busy.result(timeout=60)
    result = next(responses).results[0]
    assert result.outcome == pb.OUTCOME_APPLIED, result.reason
    _healthy(local, pid)


def test_a_very_deep_network_is_refused_quickly_and_health_stays_prompt(
    local: LocalServer, client: Client, stub: pb_grpc.TrainerServiceStub
) -> None:
    pid = _pid(local)
    hidden = [1] * 20_000
    deep = {"architecture": {"kind": "mlp", "in_features": 1, "out_features": 1, "hidden": hidden}}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        created = pool.submit(client.create_model, "deep", deep)
        _healthy(local, pid)
        with pytest.raises(ResourceExhausted, match="max_model_layers"):
            created.result(timeout=30)
    assert "deep" not in [m.name for m in client.list_models()]
    _healthy(local, pid)
