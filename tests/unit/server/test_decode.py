"""``session.decode``: a wire batch becomes a checked batch, or a rejection naming its field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch

from gradstream.server.batches import Batch, BatchChecker
from gradstream.server.session import Rejected, decode, decode_message
from gradstream.server.shm import open_shared_memory
from gradstream.server.spec import parse_spec
from gradstream.server.wire import WireBatch, WireTensor, from_message
from gradstream.v1 import trainer_pb2 as pb
from gradstream.wire import to_proto

CHECKER = BatchChecker(
    parse_spec(
        {
            "architecture": {"kind": "mlp", "in_features": 2, "hidden": [3], "out_features": 3},
            "loss": {"kind": "cross_entropy"},
        }
    )
)
X = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
Y = np.array([0, 2], np.int64)
PEER = "ipv4:127.0.0.1:5555"


def _wire(x: Any, y: Any, weight: Any = None, sequence: int = 0) -> WireBatch:
    batch = pb.Batch(x=to_proto(x), y=to_proto(y), sequence=sequence)
    if weight is not None:
        batch.sample_weight.CopyFrom(to_proto(weight))
    [wire] = from_message(pb.TrainRequest(batches=[batch])).batches
    return wire


def test_a_good_batch_is_decoded_with_its_sequence_and_weights() -> None:
    weight = np.array([0.5, 2.0], np.float32)
    batch = decode(CHECKER, _wire(X, Y, weight, sequence=7), 0, None)
    assert isinstance(batch, Batch)
    assert torch.equal(batch.x, torch.from_numpy(X)) and torch.equal(batch.y, torch.from_numpy(Y))
    assert batch.weight is not None and torch.equal(batch.weight, torch.from_numpy(weight))
    assert batch.sequence == 7
    unweighted = decode(CHECKER, _wire(X, Y), 0, None)
    assert isinstance(unweighted, Batch) and unweighted.weight is None


def test_a_bad_part_is_rejected_naming_its_field_and_keeping_the_sequence() -> None:
    cases = [
        (_wire(X[:, :1], Y, sequence=4), "batches[3].x: has shape [2, 1]"),
        (_wire(X, np.array([0, 3]), sequence=4), "batches[3].y: label 3"),
        (
            _wire(X, Y, np.array([1.0, -1.0], np.float32), sequence=4),
            "batches[3].sample_weight:",
        ),
    ]
    for wire, reason in cases:
        rejected = decode(CHECKER, wire, 3, None)
        assert isinstance(rejected, Rejected)
        assert rejected.reason.startswith(reason), rejected.reason
        assert rejected.sequence == 4


def _malformed(part: str) -> WireBatch:
    """A batch whose ``part`` has a dtype code no client sends."""
    tensors = {"x": to_proto(X), "y": to_proto(Y), "sample_weight": to_proto(np.ones(2))}
    tensors[part].dtype = cast(pb.DataType, 99)
    batch = pb.Batch(x=tensors["x"], y=tensors["y"], sample_weight=tensors["sample_weight"])
    batch.sequence = 2
    [wire] = from_message(pb.TrainRequest(batches=[batch])).batches
    return wire


@pytest.mark.parametrize("part", ["x", "y", "sample_weight"])
def test_a_malformed_tensor_is_rejected_naming_its_field(part: str) -> None:
    rejected = decode(CHECKER, _malformed(part), 5, None)
    assert isinstance(rejected, Rejected)
    assert rejected.reason.startswith(f"batches[5].{part}.dtype: "), rejected.reason
    assert rejected.sequence == 2


def test_tensors_in_the_shared_segment_are_read_from_it_and_never_quoted(tmp_path: Path) -> None:
    weight = np.array([0.5, 2.0], np.float32)
    parts = [X.tobytes(), Y.tobytes(), weight.tobytes(), np.array([0, 7]).tobytes()]
    (tmp_path / "gradstream-s").write_bytes(b"".join(parts))
    segment = open_shared_memory("gradstream-s", PEER, str(tmp_path))
    offsets = np.cumsum([0] + [len(p) for p in parts]).tolist()

    def shared(array: Any, i: int) -> WireTensor:
        code = to_proto(array).dtype
        return WireTensor(code, array.shape, b"", (offsets[i], len(parts[i])))

    wire = WireBatch(shared(X, 0), shared(Y, 1), shared(weight, 2), 3)
    batch = decode(CHECKER, wire, 0, segment)
    assert isinstance(batch, Batch) and batch.sequence == 3
    assert torch.equal(batch.x, torch.from_numpy(X)) and torch.equal(batch.y, torch.from_numpy(Y))
    assert batch.weight is not None and torch.equal(batch.weight, torch.from_numpy(weight))
    bad = WireBatch(shared(X, 0), shared(np.array([0, 7]), 3), None, 4)
    rejected = decode(CHECKER, bad, 1, segment)
    assert rejected == Rejected("batches[1].y: a label is out of range [0, 3)", 4)


@pytest.mark.parametrize("n", [2, 5])  # below and at the size a message is checked as a block
def test_a_message_in_the_shared_segment_is_decoded_from_it_batch_by_batch(
    tmp_path: Path, n: int
) -> None:
    xs = [X + i for i in range(n)]
    (tmp_path / "gradstream-m").write_bytes(b"".join(x.tobytes() + Y.tobytes() for x in xs))
    segment = open_shared_memory("gradstream-m", PEER, str(tmp_path))
    size = X.nbytes + Y.nbytes
    x_code, y_code = to_proto(X).dtype, to_proto(Y).dtype
    wires = [
        WireBatch(
            WireTensor(x_code, X.shape, b"", (i * size, X.nbytes)),
            WireTensor(y_code, Y.shape, b"", (i * size + X.nbytes, Y.nbytes)),
            None,
            10 + i,
        )
        for i in range(n)
    ]
    items = decode_message(CHECKER, wires, segment)
    assert len(items) == n
    for i, item in enumerate(items):
        assert isinstance(item, Batch), item
        assert item.sequence == 10 + i
        assert torch.equal(item.x, torch.from_numpy(xs[i]))
        assert torch.equal(item.y, torch.from_numpy(Y))
