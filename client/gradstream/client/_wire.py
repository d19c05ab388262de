"""Train requests written straight to protobuf wire bytes: one copy of each array.

Building ``pb.TrainRequest`` objects costs three copies of every array before gRPC
takes its own (``tobytes``, the assignment into the message, ``SerializeToString``);
for 4 MB batches that was most of the SDK's CPU time. Here each batch is encoded once,
when it is added, as the bytes of one ``batches`` entry of a TrainRequest, and a
message is the concatenation of its entries (a protobuf message's fields may simply be
concatenated). ``tests/unit/client/test_wire.py`` checks the bytes parse to, and equal,
what protobuf itself would write.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

# Tags: (field number << 3) | wire type (0 varint, 2 length-delimited).
_BATCHES = b"\x12"  # TrainRequest.batches = 2
_BATCH_FIELDS = (b"\x0a", b"\x12", b"\x1a")  # Batch.x = 1, y = 2, sample_weight = 3
_SEQUENCE = 0x20  # Batch.sequence = 4
_DTYPE = 0x08  # Tensor.dtype = 1
_SHAPE = b"\x12"  # Tensor.shape = 2 (packed)
_DATA = b"\x1a"  # Tensor.data = 3
_SHARED = b"\x22"  # Tensor.shared = 4
_OFFSET, _LENGTH = 0x08, 0x10  # SharedSlice.offset = 1, length = 2

Array = npt.NDArray[Any]


def varint(value: int) -> bytes:
    """``value`` (>= 0) as a protobuf base-128 varint."""
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: int, value: int) -> bytes:
    # proto3 leaves out a scalar equal to its default.
    return bytes((tag,)) + varint(value) if value else b""


def encode_batch(
    parts: Sequence[tuple[Array, int]],
    places: Sequence[tuple[int, int]] | None = None,
    sequence: int = 0,
) -> bytes:
    """One ``batches`` entry: ``(array, dtype code)`` for x, y and, if given, sample_weight.

    The arrays must be C-contiguous and little-endian (``wire_array`` makes them so).
    With ``places`` the tensors carry (offset, length) in the shared-memory ring instead
    of their bytes.
    """
    pieces: list[bytes | memoryview] = []
    for i, (array, code) in enumerate(parts):
        head = _field(_DTYPE, code)
        if array.ndim:
            shape = b"".join(varint(d) for d in array.shape)
            head += _SHAPE + varint(len(shape)) + shape
        data: bytes | memoryview = b""
        if places is not None:
            offset, length = places[i]
            where = _field(_OFFSET, offset) + _field(_LENGTH, length)
            head += _SHARED + varint(len(where)) + where
        elif array.nbytes:
            data = array.reshape(-1).view(np.uint8).data
            head += _DATA + varint(len(data))
        pieces += (_BATCH_FIELDS[i], varint(len(head) + len(data)), head, data)
    pieces.append(_field(_SEQUENCE, sequence))
    body = sum(len(p) for p in pieces)
    # The one copy of the arrays: after this the caller may reuse its buffers.
    return b"".join([_BATCHES, varint(body), *pieces])


class MessageBuilder:
    """The batches of one TrainRequest being filled; ``count`` batches, ``size`` bytes."""

    __slots__ = ("count", "entries", "size")

    def __init__(self) -> None:
        self.entries: list[bytes] = []
        self.count = 0
        self.size = 0

    def add(self, entry: bytes) -> None:
        """Append one ``encode_batch`` entry."""
        self.entries.append(entry)
        self.count += 1
        self.size += len(entry)

    def to_bytes(self) -> bytes:
        """The serialized TrainRequest (no copy when it holds a single batch)."""
        return self.entries[0] if len(self.entries) == 1 else b"".join(self.entries)
