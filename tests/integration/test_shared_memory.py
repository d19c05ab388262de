"""The shared-memory path: same training as gRPC bytes, bytes never in the messages."""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from gradstream.client import Client
from gradstream.v1 import trainer_pb2 as pb
from gradstream.wire import to_proto

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
