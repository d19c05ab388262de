"""Decoding Train requests, zero-copy for large ones.

A protobuf parse copies a bytes field into the parser's arena, and reading it
copies it again into a Python ``bytes``: two passes over every megabyte a
producer sends. Large messages are therefore decoded here by a small reader of
the protobuf wire format that hands out ``memoryview`` slices of the received
message, which the batch arrays then view directly. Small messages, where
per-field Python work would cost more than the copies, take the ordinary parser.
Anything this reader does not expect (merged singular fields, groups, a
truncated message) falls back to the ordinary parser too, so what is accepted,
and what is rejected with which error, is protobuf's own behaviour.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gradstream.v1 import trainer_pb2 as pb

ZERO_COPY_BYTES = 256 * 1024  # smaller messages take the C parser


@dataclass(slots=True)
class WireTensor:
    """A Tensor's fields; ``data`` may be a view into the received message."""

    dtype: int = 0
    shape: tuple[int, ...] = ()
    data: bytes | memoryview = b""
    shared: tuple[int, int] | None = None  # (offset, length) in the stream's segment


@dataclass(slots=True)
class WireBatch:
    """A Batch's fields; absent tensors are None, as HasField would say."""

    x: WireTensor | None = None
    y: WireTensor | None = None
    sample_weight: WireTensor | None = None
    sequence: int = 0
    # Batch.inputs: (name, tensor) in the order sent; a NamedTensor without a tensor is None.
    inputs: list[tuple[str, WireTensor | None]] = field(default_factory=list)


@dataclass(slots=True)
class TrainMessage:
    """One decoded TrainRequest."""

    open: pb.TrainOpen | None = None
    batches: list[WireBatch] = field(default_factory=list)


class _Fallback(Exception):
    """Leave this message to the protobuf parser."""


def parse_train_request(data: bytes) -> TrainMessage:
    """The request deserializer of the Train method."""
    if len(data) >= ZERO_COPY_BYTES:
        try:
            return _request(memoryview(data))
        except _Fallback:
            pass
    return from_message(pb.TrainRequest.FromString(data))


def from_message(message: pb.TrainRequest) -> TrainMessage:
    """The same structure from a parsed protobuf message."""
    return TrainMessage(
        open=message.open if message.HasField("open") else None,
        batches=[batch_of(b) for b in message.batches],
    )


def batch_of(batch: pb.Batch) -> WireBatch:
    """A parsed Batch message's fields (its tensors' data are the message's ``bytes``)."""
    return WireBatch(
        x=tensor_of(batch, "x"),
        y=tensor_of(batch, "y"),
        sample_weight=tensor_of(batch, "sample_weight"),
        sequence=batch.sequence,
        inputs=named_of(batch.inputs),
    )


def named_of(inputs: Iterable[pb.NamedTensor]) -> list[tuple[str, WireTensor | None]]:
    """Parsed NamedTensor messages as ``(name, tensor)``, in order."""
    return [(n.name, tensor_of(n, "tensor")) for n in inputs]


def tensor_of(message: Any, name: str) -> WireTensor | None:
    """The Tensor field ``name`` of a parsed message; None when it is not set."""
    if not message.HasField(name):
        return None
    t: pb.Tensor = getattr(message, name)
    shared = (t.shared.offset, t.shared.length) if t.HasField("shared") else None
    return WireTensor(t.dtype, tuple(t.shape), t.data, shared)


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _Fallback
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _fields(buf: memoryview) -> list[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of every field; varints as ints, bytes as views."""
    out: list[tuple[int, int, int | memoryview]] = []
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _varint(buf, pos)
            out.append((number, 0, value))
        elif wire_type == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise _Fallback
            out.append((number, 2, buf[pos : pos + length]))
            pos += length
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4  # an unknown fixed-width field: skip it
            if pos > end:
                raise _Fallback
        else:
            raise _Fallback  # groups are not proto3
    return out


def _request(buf: memoryview) -> TrainMessage:
    message = TrainMessage()
    for number, wire_type, value in _fields(buf):
        if number == 1:
            if wire_type != 2 or message.open is not None:
                raise _Fallback
            assert isinstance(value, memoryview)
            message.open = pb.TrainOpen.FromString(bytes(value))
        elif number == 2:
            if wire_type != 2:
                raise _Fallback
            assert isinstance(value, memoryview)
            message.batches.append(_batch(value))
    return message


def _batch(buf: memoryview) -> WireBatch:
    batch = WireBatch()
    names = {1: "x", 2: "y", 3: "sample_weight"}
    for number, wire_type, value in _fields(buf):
        if number in names:
            if wire_type != 2 or getattr(batch, names[number]) is not None:
                raise _Fallback  # a repeated singular message would merge: protobuf's job
            assert isinstance(value, memoryview)
            setattr(batch, names[number], _tensor(value))
        elif number == 4:
            if wire_type != 0:
                raise _Fallback
            assert isinstance(value, int)
            batch.sequence = value
        elif number == 5:
            if wire_type != 2:
                raise _Fallback
            assert isinstance(value, memoryview)
            batch.inputs.append(_named(value))
    return batch


def _named(buf: memoryview) -> tuple[str, WireTensor | None]:
    name: str | None = None
    tensor: WireTensor | None = None
    for number, wire_type, value in _fields(buf):
        if number in (1, 2) and wire_type != 2:
            raise _Fallback
        if number == 1:
            assert isinstance(value, memoryview)
            try:
                name = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise _Fallback from None  # protobuf refuses a string that is not UTF-8
        elif number == 2:
            if tensor is not None:
                raise _Fallback  # a repeated singular message would merge: protobuf's job
            assert isinstance(value, memoryview)
            tensor = _tensor(value)
    return name or "", tensor


def _tensor(buf: memoryview) -> WireTensor:
    tensor = WireTensor()
    shape: list[int] = []
    for number, wire_type, value in _fields(buf):
        if number == 1:
            if wire_type != 0:
                raise _Fallback
            assert isinstance(value, int)
            code = value & 0xFFFFFFFF  # an enum is an int32: protobuf keeps the low 32 bits
            tensor.dtype = code - (1 << 32) if code >= 1 << 31 else code
        elif number == 2:
            if wire_type == 0:
                assert isinstance(value, int)
                shape.append(_signed64(value))
            else:  # packed
                assert isinstance(value, memoryview)
                pos = 0
                while pos < len(value):
                    dim, pos = _varint(value, pos)
                    shape.append(_signed64(dim))
        elif number == 3:
            if wire_type != 2:
                raise _Fallback
            assert isinstance(value, memoryview)
            tensor.data = value
        elif number == 4:
            if wire_type != 2 or tensor.shared is not None:
                raise _Fallback
            assert isinstance(value, memoryview)
            offset = length = 0
            for slice_number, slice_type, slice_value in _fields(value):
                if slice_number in (1, 2):
                    if slice_type != 0:
                        raise _Fallback
                    assert isinstance(slice_value, int)
                    offset, length = (
                        (slice_value, length) if slice_number == 1 else (offset, slice_value)
                    )
            tensor.shared = (offset, length)
    tensor.shape = tuple(shape)
    return tensor
