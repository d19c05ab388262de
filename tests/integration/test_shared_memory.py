"""The shared-memory path: same training as gRPC bytes, bytes never in the messages."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from gradstream.client import Client, ProducerStream
from gradstream.server.main import BackgroundServer
from gradstream.v1 import trainer_pb2 as pb
from gradstream.wire import to_proto
from tests.conftest import server_settings

SPEC = {
    "architecture": {"kind": "linear", "in_features": 8, "out_features": 1},
    "init": {"kind": "zeros"},
    "optimizer": {"kind": "sgd", "lr": 0.05, "momentum": 0.5},
}


def _data(count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(4)
    out = []
    for _ in range(count):
        x = rng.normal(size=(int(rng.integers(1, 300)), 8)).astype(np.float32)
        out.append((x, x.sum(axis=1, keepdims=True).astype(np.float32)))
    return out


@pytest.mark.parametrize("lazy", [False, True])
def test_shared_memory_trains_exactly_like_bytes_in_messages(
    client: Client, name: str, lazy: bool
) -> None:
    data = _data(200)
    client.create_model(name + "-a", SPEC)
    client.create_model(name + "-b", SPEC)
    plain = list(client.train(name + "-a", data, batches_per_message=7))
    source = (b for b in data) if lazy else data
    # A ring far smaller than the data: space must be reused as acknowledgements come back.
    shared = list(
        client.train(
            name + "-b", source, batches_per_message=7, shared_memory=True, window_bytes=64 * 1024
        )
    )
    assert [r.outcome for r in shared] == ["APPLIED"] * 200
    assert [r.loss for r in shared] == [r.loss for r in plain]
    a, b = client.parameters(name + "-a"), client.parameters(name + "-b")
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("gradstream-")]


@pytest.mark.parametrize("checkpoints", [False, True])
def test_a_producer_streams_through_shared_memory_exactly_like_bytes(
    tmp_path: Path, checkpoints: bool
) -> None:
    """The ring's space comes back once batches are durable (or answered, without
    checkpoints): far more data than the ring holds still goes through."""
    data = _data(200)
    settings = server_settings(
        checkpoint_dir=tmp_path if checkpoints else None,
        checkpoint_every_steps=0,
        checkpoint_every_seconds=0,
    )
    with BackgroundServer(settings) as server, Client(server.target) as client:
        client.create_model("a", SPEC)
        client.create_model("b", SPEC)
        plain = list(client.train("a", data, batches_per_message=7))
        shared = client.train(
            "b",
            iter(data),
            producer_id="p",
            batches_per_message=7,
            shared_memory=True,
            window_bytes=64 * 1024,
        )
        assert isinstance(shared, ProducerStream)
        results = list(shared)
        assert [(r.sequence, r.outcome) for r in results] == [(i, "APPLIED") for i in range(1, 201)]
        assert [r.loss for r in results] == [r.loss for r in plain]
        assert shared.durable_sequence == (200 if checkpoints else 0)
        a, b = client.parameters("a"), client.parameters("b")
        assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("gradstream-")]


def test_a_batch_larger_than_the_ring_is_refused_client_side(client: Client, name: str) -> None:
    client.create_model(name, SPEC)
    big = (np.zeros((5000, 8), np.float32), np.zeros((5000, 1), np.float32))
    with pytest.raises(ValueError, match="does not fit the 65536-byte shared-memory ring"):
        list(client.train(name, [big], shared_memory=True, window_bytes=65536))


def _stream(client: Client, opener: pb.TrainOpen, batch: pb.Batch) -> Iterator[pb.TrainResponse]:
    requests = [pb.TrainRequest(open=opener), pb.TrainRequest(batches=[batch])]
    return iter(client._stub.Train(iter(requests)))


def test_references_outside_the_segment_or_without_one_are_rejected(
    client: Client, name: str
) -> None:
    client.create_model(name, SPEC)
    x = to_proto(np.zeros((1, 8), np.float32))
    x.data = b""
    x.shared.offset, x.shared.length = 0, 32
    batch = pb.Batch(x=x, y=to_proto(np.zeros((1, 1), np.float32)))
    responses = list(_stream(client, pb.TrainOpen(model=name), batch))
    assert responses[1].results[0].reason == (
        "batches[0].x.shared: the stream opened no shared_memory segment"
    )
    with pytest.raises(grpc.RpcError) as caught:
        list(_stream(client, pb.TrainOpen(model=name, shared_memory="../etc/passwd"), batch))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == (
        "open.shared_memory: '../etc/passwd' is not a gradstream segment name (gradstream-*)"
    )
