"""The SDK's hand-written Train encoding: what protobuf would write, with aligned data."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from hypothesis import given, settings
from hypothesis import strategies as st

from gradstream.server.wire import _fields as read_fields
from gradstream.server.wire import _request as read_in_place
from gradstream.v1 import trainer_pb2 as pb
from gradstream.wire import ALIGN, inputs_from_proto, wire_array
from gradstream.wire.train import (
    ALIGN_MIN_BYTES,
    BatchParts,
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


def _encoded(batches: list[Any]) -> tuple[bytes, pb.TrainRequest]:
    """The SDK's bytes for ``batches`` (one message) and protobuf's message of them."""
    message = MessageBuilder()
    for parts, places, sequence in batches:
        entry = encode_batch(parts, places, sequence, start=message.size)
        # The SDK packs messages by this bound: it must not undercount.
        assert len(entry) <= entry_bound(parts)
        message.add(entry)
    data = message.to_bytes()
    assert message.count == len(batches) and message.size == len(data)
    return data, pb.TrainRequest(batches=[proto_batch(*b) for b in batches])


def _parsed_without_padding(data: bytes) -> pb.TrainRequest:
    """``data`` parsed by protobuf, every tensor's (ignored) padding dropped."""
    parsed = pb.TrainRequest.FromString(data)
    for batch in parsed.batches:
        for name in ("x", "y", "sample_weight"):
            if batch.HasField(name):
                getattr(batch, name).ClearField("padding")
        for named in batch.inputs:
            named.tensor.ClearField("padding")
    return parsed


@settings(max_examples=200, deadline=None)
@given(st.lists(_batches(), min_size=1, max_size=4))
def test_entries_parse_to_the_protobuf_message(batches: list[Any]) -> None:
    data, expected = _encoded(batches)
    # Equal to protobuf's own bytes once the ignored padding is dropped.
    parsed = _parsed_without_padding(data)
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


def _walk(buf: memoryview) -> list[tuple[int, int | memoryview]]:
    """(field number, value) of a protobuf message, read by the server's field reader."""
    return [(number, value) for number, _, value in read_fields(buf)]


def _named_data(message: memoryview) -> dict[str, memoryview]:
    """Every named input's data bytes, by '<batch>.<name>', as views into ``message``."""
    found: dict[str, memoryview] = {}
    for b, (number, batch) in enumerate(_walk(message)):
        assert number == 2 and isinstance(batch, memoryview)
        for field, named in _walk(batch):
            if field != 5:
                continue
            assert isinstance(named, memoryview)
            parts = dict(_walk(named))
            name, tensor = parts[1], parts[2]
            assert isinstance(name, memoryview) and isinstance(tensor, memoryview)
            data = dict(_walk(tensor)).get(3, memoryview(b""))
            assert isinstance(data, memoryview)
            found[f"{b}.{bytes(name).decode()}"] = data
    return found


_NAMES = st.text(st.characters(codec="utf-8"), min_size=1, max_size=9)


@st.composite
def _named_batches(draw: st.DrawFn) -> tuple[BatchParts, Any, int]:
    def part() -> tuple[npt.NDArray[Any], int]:
        shape = tuple(draw(st.lists(st.integers(0, 300), min_size=1, max_size=2)))
        dtype = np.dtype(draw(st.sampled_from(["<f4", "<f8", "<i8", "<i4"])))
        seed = draw(st.integers(0, 2**32 - 1))
        raw = np.random.default_rng(seed).integers(0, 256, int(np.prod(shape)) * dtype.itemsize)
        return wire_array(raw.astype(np.uint8).view(dtype).reshape(shape))

    names = draw(st.lists(_NAMES, min_size=1, max_size=4, unique=True))
    batch = BatchParts(
        y=part() if draw(st.booleans()) else None,
        sample_weight=part() if draw(st.booleans()) else None,
        inputs=tuple((name, part()) for name in names),
    )
    places: list[tuple[int, int]] | None = None
    if draw(st.booleans()):
        places = [
            (draw(st.integers(0, 2**40)), draw(st.integers(0, 2**40))) for _ in batch.arrays()
        ]
    return batch, places, draw(st.integers(0, 2**64 - 1))


@settings(max_examples=200, deadline=None)
@given(st.lists(_named_batches(), min_size=1, max_size=3))
def test_named_inputs_parse_to_the_protobuf_message_with_aligned_data(batches: list[Any]) -> None:
    data, expected = _encoded(batches)
    parsed = _parsed_without_padding(data)
    assert parsed == expected
    # Decoded with the generated classes: each name, in order, with its array's values.
    for (parts, places, _), batch in zip(batches, parsed.batches, strict=True):
        assert [n.name for n in batch.inputs] == [name for name, _ in parts.inputs]
        if places is None:
            decoded = inputs_from_proto(batch.inputs)
            for name, (array, _) in parts.inputs:
                assert decoded[name].tobytes() == array.tobytes()
                assert decoded[name].shape == array.shape
    base = np.frombuffer(memoryview(data), np.uint8).ctypes.data
    for where, view in _named_data(memoryview(data)).items():
        if len(view) >= ALIGN_MIN_BYTES:
            offset = np.frombuffer(view, np.uint8).ctypes.data - base
            assert offset % ALIGN == 0, where
    # The server's zero-copy reader sees the same names and bytes.
    for wire, ref in zip(read_in_place(memoryview(data)).batches, expected.batches, strict=True):
        assert [n for n, _ in wire.inputs] == [n.name for n in ref.inputs]
        for (_, got), want in zip(wire.inputs, ref.inputs, strict=True):
            assert got is not None and bytes(got.data) == want.tensor.data
            assert got.shape == tuple(want.tensor.shape)


def test_positional_parts_and_batch_parts_encode_alike() -> None:
    x = wire_array(np.arange(600, dtype=np.float32).reshape(300, 2))
    y = wire_array(np.ones((300, 1), np.float32))
    assert encode_batch([x, y], start=7) == encode_batch(BatchParts(y=y, x=x), start=7)
    assert entry_bound([x, y]) == entry_bound(BatchParts(y=y, x=x))
