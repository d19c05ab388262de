"""The zero-copy Train decoder reads exactly what protobuf reads."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from gradstream.server import wire
from gradstream.server.wire import TrainMessage, from_message, parse_train_request
from gradstream.v1 import trainer_pb2 as pb
from tests.conftest import examples

int64s = st.integers(-(2**63), 2**63 - 1)
tensors = st.builds(
    pb.Tensor,
    dtype=st.integers(-(2**31), 2**31 - 1),
    shape=st.lists(int64s, max_size=4),
    data=st.binary(max_size=64),
)


@st.composite
def batches(draw: st.DrawFn) -> pb.Batch:
    batch = pb.Batch(sequence=draw(st.integers(0, 2**64 - 1)))
    for name in ("x", "y", "sample_weight"):
        if draw(st.booleans()):
            getattr(batch, name).CopyFrom(draw(tensors))
    for _ in range(draw(st.integers(0, 3))):
        named = batch.inputs.add(name=draw(st.text(max_size=6)))
        if draw(st.booleans()):  # a NamedTensor may leave its tensor out
            named.tensor.CopyFrom(draw(tensors))
    return batch


requests = st.builds(
    pb.TrainRequest,
    open=st.one_of(
        st.none(),
        st.builds(
            pb.TrainOpen,
            model=st.text(max_size=8),
            producer_id=st.text(max_size=8),
            report_every=st.integers(0, 2**32 - 1),
        ),
    ),
    batches=st.lists(batches(), max_size=5),
)


def plain(message: TrainMessage) -> Any:
    def tensor(t: wire.WireTensor | None) -> Any:
        return None if t is None else (t.dtype, t.shape, bytes(t.data))

    return (
        None if message.open is None else message.open.SerializeToString(),
        [
            (
                tensor(b.x),
                tensor(b.y),
                tensor(b.sample_weight),
                b.sequence,
                [(name, tensor(t)) for name, t in b.inputs],
            )
            for b in message.batches
        ],
    )


@settings(max_examples=examples(300))
@given(request=requests, unknown=st.binary(max_size=0) | st.just(b"\xa8\x06\x07"))
def test_wire_reader_equals_protobuf(request: pb.TrainRequest, unknown: bytes) -> None:
    data = request.SerializeToString() + unknown  # field 101, a varint: unknown, skipped
    expected = from_message(pb.TrainRequest.FromString(data))
    assert plain(wire._request(memoryview(data))) == plain(expected)


def test_large_messages_are_views_of_the_received_bytes() -> None:
    request = pb.TrainRequest()
    batch = request.batches.add()
    batch.x.dtype, batch.x.data = pb.DATA_TYPE_FLOAT32, b"\x01" * wire.ZERO_COPY_BYTES
    batch.x.shape[:] = [wire.ZERO_COPY_BYTES // 4]
    data = request.SerializeToString()
    message = parse_train_request(data)
    assert message.batches[0].x is not None
    view = message.batches[0].x.data
    assert isinstance(view, memoryview) and view.obj is data


def test_named_inputs_of_large_messages_are_views_of_the_received_bytes() -> None:
    request = pb.TrainRequest()
    batch = request.batches.add()
    for name in ("user", "dense"):
        tensor = batch.inputs.add(name=name).tensor
        tensor.dtype, tensor.data = pb.DATA_TYPE_INT64, b"\x02" * wire.ZERO_COPY_BYTES
        tensor.shape[:] = [wire.ZERO_COPY_BYTES // 8]
    data = request.SerializeToString()
    message = parse_train_request(data)
    [(first, a), (second, b)] = message.batches[0].inputs
    assert (first, second) == ("user", "dense")
    for t in (a, b):
        assert t is not None and isinstance(t.data, memoryview) and t.data.obj is data
    # A name that is not UTF-8 is left to protobuf, which refuses it.
    bad = data.replace(b"user", b"\xff\xfeer")
    with pytest.raises(wire._Fallback):
        wire._request(memoryview(bad))
    with pytest.raises(DecodeError):
        parse_train_request(bad)


def test_unpacked_shape_and_repeated_open_are_read_like_protobuf() -> None:
    # shape as two unpacked varints, then a second `open` that protobuf merges.
    tensor = b"\x08\x01" + b"\x10\x02\x10\x03" + b"\x1a\x00"
    batch = b"\x0a" + bytes([len(tensor)]) + tensor
    data = b"\x12" + bytes([len(batch)]) + batch + b"\x0a\x03\x0a\x01a" + b"\x0a\x02\x18\x05"
    ours = parse_train_request(data)
    theirs = from_message(pb.TrainRequest.FromString(data))
    assert plain(ours) == plain(theirs)
    assert ours.open is not None and ours.open.model == "a" and ours.open.report_every == 5
    with pytest.raises(wire._Fallback):
        wire._request(memoryview(data))
    assert wire._request(memoryview(data[: 2 + len(batch)])).batches[0].x.shape == (2, 3)  # type: ignore[union-attr]


def test_truncated_messages_fail_as_protobuf_fails() -> None:
    data = pb.TrainRequest(
        batches=[pb.Batch(x=pb.Tensor(data=b"abc" * 100_000))]
    ).SerializeToString()
    with pytest.raises(DecodeError):
        parse_train_request(data[:-10])
