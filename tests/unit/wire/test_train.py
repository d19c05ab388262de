"""The SDK's hand-written Train encoding: what protobuf would write, with aligned data."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from hypothesis import given, settings
from hypothesis import strategies as st

from gradstream.server.wire import _request as read_in_place
from gradstream.v1 import trainer_pb2 as pb
from gradstream.wire import ALIGN, wire_array
from gradstream.wire.train import (
    ALIGN_MIN_BYTES,
    MessageBuilder,
    encode_batch,
    entry_bound,
    proto_batch,
    varint,
)

_DTYPES = ["<f4", "<f8", "<f2", "<i8", "<i4", "<u2"]


@st.composite
def _batches(draw: st.DrawFn) -> tuple[list[tuple[npt.NDArray[Any], int]], Any, int]:
    count = draw(st.integers(2, 3))
    parts: list[tuple[npt.NDArray[Any], int]] = []
    for _ in range(count):
        shape = tuple(draw(st.lists(st.integers(0, 40), max_size=3)))
        dtype = np.dtype(draw(st.sampled_from(_DTYPES)))
        seed = draw(st.integers(0, 2**32 - 1))
        raw = np.random.default_rng(seed).integers(0, 256, int(np.prod(shape)) * dtype.itemsize)
        array = raw.astype(np.uint8).view(dtype).reshape(shape)
        if dtype == np.dtype("<u2"):  # bfloat16's bit pattern: travels with its own code
            parts.append((array, pb.DATA_TYPE_BFLOAT16))
        else:
            parts.append(wire_array(array))
    places: list[tuple[int, int]] | None = None
    if draw(st.booleans()):
        places = [(draw(st.integers(0, 2**40)), draw(st.integers(0, 2**40))) for _ in parts]
    return parts, places, draw(st.integers(0, 2**64 - 1))


@settings(max_examples=200, deadline=None)
@given(st.lists(_batches(), min_size=1, max_size=4))
def test_entries_parse_to_the_protobuf_message(batches: list[Any]) -> None:
    message = MessageBuilder()
    for parts, places, sequence in batches:
        entry = encode_batch(parts, places, sequence, start=message.size)
        # The SDK packs messages by this bound: it must not undercount.
        assert len(entry) <= entry_bound(parts)
        message.add(entry)
    expected = pb.TrainRequest(batches=[proto_batch(*b) for b in batches])
    data = message.to_bytes()
    assert message.count == len(batches) and message.size == len(data)
    # Equal to protobuf's own bytes once the ignored padding is dropped.
    parsed = pb.TrainRequest.FromString(data)
    for batch in parsed.batches:
        for name in ("x", "y", "sample_weight"):
            if batch.HasField(name):
                getattr(batch, name).ClearField("padding")
    assert parsed == expected
    assert parsed.SerializeToString() == expected.SerializeToString()
    if all(a.nbytes < ALIGN_MIN_BYTES for parts, _, _ in batches for a, _ in parts):
        assert data == expected.SerializeToString()  # nothing padded: protobuf's own bytes
    # The server's zero-copy reader (what large messages take) sees the same tensors, each
    # data at an aligned offset of the message.
    view = memoryview(data)
    decoded = read_in_place(view)
    base = np.frombuffer(view, np.uint8).ctypes.data
    for wire, ref in zip(decoded.batches, expected.batches, strict=True):
        for got, want in ((wire.x, ref.x), (wire.y, ref.y)):
            assert got is not None
            assert bytes(got.data) == want.data and got.shape == tuple(want.shape)
            if len(got.data) >= ALIGN_MIN_BYTES:
                assert (np.frombuffer(got.data, np.uint8).ctypes.data - base) % ALIGN == 0


def test_the_array_is_copied_when_added() -> None:
    # A producer may refill its buffer as soon as the SDK took the batch.
    x = np.ones((4, 2), np.float32)
    y = np.zeros((4, 1), np.float32)
    message = MessageBuilder()
    message.add(encode_batch([wire_array(x), wire_array(y)]))
    x[:] = 7
    decoded = pb.TrainRequest.FromString(message.to_bytes()).batches[0]
    assert np.frombuffer(decoded.x.data, np.float32).tolist() == [1.0] * 8


def test_varint_matches_protobuf() -> None:
    assert varint(0) == b"\x00"
    for value in (1, 127, 128, 300, 2**31, 2**63 - 1, 2**64 - 1):
        # SharedSlice(offset=v) is the tag byte 0x08 followed by v's varint.
        assert varint(value) == pb.SharedSlice(offset=value).SerializeToString()[1:]
