"""Train requests written straight to protobuf wire bytes: one copy of each array.

Building ``pb.TrainRequest`` objects costs three copies of every array before gRPC
takes its own (``tobytes``, the assignment into the message, ``SerializeToString``).
Here each batch is encoded once, as the bytes of one ``batches`` entry of a TrainRequest,
and a message is the concatenation of its entries (a protobuf message's fields may simply
be concatenated). Each tensor's data of ``ALIGN_MIN_BYTES`` or more is placed at an offset
of the message that is a multiple of ``ALIGN``, by a ``padding`` field that readers ignore;
batches of only smaller tensors take protobuf's own (faster, for them) encoder.
``tests/unit/wire/test_train.py`` checks the bytes parse to what protobuf itself would
write, and that the data is aligned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from gradstream.v1 import trainer_pb2 as pb
from gradstream.wire.tensor import ALIGN

# Tags: (field number << 3) | wire type (0 varint, 2 length-delimited).
_BATCHES = b"\x12"  # TrainRequest.batches = 2
_BATCH_FIELDS = (b"\x0a", b"\x12", b"\x1a")  # Batch.x = 1, y = 2, sample_weight = 3
_SEQUENCE = 0x20  # Batch.sequence = 4
_DTYPE = 0x08  # Tensor.dtype = 1
_SHAPE = b"\x12"  # Tensor.shape = 2 (packed)
_DATA = b"\x1a"  # Tensor.data = 3

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


# Smaller data is not worth up to 65 bytes of padding (and messages of tiny batches go
# through protobuf's parser, which copies anyway).
ALIGN_MIN_BYTES = 1024
_PADDING = b"\x2a"  # Tensor.padding = 5: ignored by readers
MAX_PADDING = 2 * ALIGN + 1  # bytes a tensor's padding field may take


def _padding(size: int) -> bytes:
    """A padding field exactly ``size`` bytes long (0, or 2 to ``MAX_PADDING``)."""
    return _PADDING + varint(size - 2) + bytes(size - 2) if size else b""


def encode_batch(
    parts: Sequence[tuple[Array, int]],
    places: Sequence[tuple[int, int]] | None = None,
    sequence: int = 0,
    start: int = 0,
) -> bytes:
    """One ``batches`` entry: ``(array, dtype code)`` for x, y and, if given, sample_weight.

    The arrays must be C-contiguous and little-endian (``wire_array`` makes them so).
    With ``places`` the tensors carry (offset, length) in the shared-memory ring instead
    of their bytes. ``start`` is where the entry will sit in its message: each tensor's
    data (from ``ALIGN_MIN_BYTES``) is padded to a multiple of ``ALIGN`` from the message's
    start, because the server uses large messages in place and unaligned floats cost it a
    copy and a slower step (docs/performance.md).
    """
    if places is not None or all(a.nbytes < ALIGN_MIN_BYTES for a, _ in parts):
        return _via_protobuf(parts, places, sequence)
    heads: list[bytes] = []
    datas: list[bytes | memoryview] = []
    for array, code in parts:
        head = _field(_DTYPE, code)
        if array.ndim:
            shape = b"".join(varint(d) for d in array.shape)
            head += _SHAPE + varint(len(shape)) + shape
        data: bytes | memoryview = array.reshape(-1).view(np.uint8).data if array.nbytes else b""
        heads.append(head)
        datas.append(data)
    tail = _field(_SEQUENCE, sequence)
    pads = [0] * len(parts)

    def layout() -> tuple[list[int], int, list[int]]:
        """Each tensor's length, the batch's length, where each data starts in the message."""
        sizes = [
            len(h) + p + (len(_DATA) + len(varint(len(d))) if d else 0) + len(d)
            for h, p, d in zip(heads, pads, datas, strict=True)
        ]
        body = sum(1 + len(varint(t)) + t for t in sizes) + len(tail)
        pos = start + len(_BATCHES) + len(varint(body))
        starts = []
        for head, pad, data, size in zip(heads, pads, datas, sizes, strict=True):
            starts.append(
                pos + 1 + len(varint(size)) + len(head) + pad + 1 + len(varint(len(data)))
            )
            pos += 1 + len(varint(size)) + size
        return sizes, body, starts

    # Padding one tensor lengthens the prefixes before it and moves the tensors after it:
    # align them in order, redoing the layout each time. A longer prefix can undo an
    # alignment (at 128 bytes a length takes two), so after 8 rounds padding stops taking
    # its shortest form, which lets the prefixes settle. The rounds are bounded: an
    # unaligned message would still be correct, only slower to check on the server.
    for round_ in range(8 + 4 * len(parts)):
        _, _, starts = layout()
        off = next(
            (i for i, d in enumerate(datas) if len(d) >= ALIGN_MIN_BYTES and starts[i] % ALIGN),
            None,
        )
        if off is None:
            break
        want = pads[off] + ALIGN - starts[off] % ALIGN  # 1 to MAX_PADDING + 63
        if want > MAX_PADDING or (want > ALIGN + 1 and round_ < 8):
            want -= ALIGN
        pads[off] = want + ALIGN if want == 1 else want  # a field takes at least 2 bytes
    tensors, body, _ = layout()
    pieces: list[bytes | memoryview] = [_BATCHES, varint(body)]
    for i, (head, data, size) in enumerate(zip(heads, datas, tensors, strict=True)):
        pieces += (_BATCH_FIELDS[i], varint(size), head, _padding(pads[i]))
        if data:
            pieces += (_DATA, varint(len(data)), data)
    pieces.append(tail)
    # The one copy of the arrays: after this the caller may reuse its buffers.
    return b"".join(pieces)


def proto_batch(
    parts: Sequence[tuple[Array, int]],
    places: Sequence[tuple[int, int]] | None = None,
    sequence: int = 0,
) -> pb.Batch:
    """The same batch as a protobuf message (what ``encode_batch`` must be equivalent to)."""
    batch = pb.Batch(sequence=sequence)
    for i, (array, code) in enumerate(parts):
        tensor = (batch.x, batch.y, batch.sample_weight)[i]
        tensor.dtype = code  # type: ignore[assignment]
        tensor.shape[:] = array.shape
        if places is None:
            tensor.data = array.tobytes()
        else:
            tensor.shared.offset, tensor.shared.length = places[i]
    return batch


def _via_protobuf(
    parts: Sequence[tuple[Array, int]], places: Sequence[tuple[int, int]] | None, sequence: int
) -> bytes:
    # Nothing to align: protobuf's C encoder beats the Python one on tiny batches, and its
    # copies of a few bytes cost nothing.
    body = proto_batch(parts, places, sequence).SerializeToString()
    return _BATCHES + varint(len(body)) + body


class MessageBuilder:
    """The batches of one TrainRequest being filled; ``count`` batches, ``size`` bytes."""

    __slots__ = ("count", "entries", "size")

    def __init__(self) -> None:
        self.entries: list[bytes] = []
        self.count = 0
        self.size = 0

    def add(self, entry: bytes) -> None:
        """Append one ``encode_batch`` entry, encoded with ``start=self.size``."""
        self.entries.append(entry)
        self.count += 1
        self.size += len(entry)

    def to_bytes(self) -> bytes:
        """The serialized TrainRequest (no copy when it holds a single batch)."""
        return self.entries[0] if len(self.entries) == 1 else b"".join(self.entries)


# What a message may need beyond its batches' entries (its own framing).
MESSAGE_FRAMING = 1024


def entry_bound(parts: Sequence[tuple[Array, int]]) -> int:
    """An upper bound of ``len(encode_batch(parts, ...))``, cheap to compute before encoding.

    The arrays' bytes plus, per tensor, its framing and the most alignment padding it takes.
    """
    return 24 + sum(a.nbytes + 32 + 11 * a.ndim + MAX_PADDING for a, _ in parts)
