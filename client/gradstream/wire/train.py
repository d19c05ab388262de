"""Train requests written straight to protobuf wire bytes: one copy of each array.

Building ``pb.TrainRequest`` objects costs three copies of every array before gRPC
takes its own (``tobytes``, the assignment into the message, ``SerializeToString``).
Here each batch is encoded once, as the bytes of one ``batches`` entry of a TrainRequest,
and a message is the concatenation of its entries (a protobuf message's fields may simply
be concatenated). A batch's tensors are ``x`` or the model's named ``inputs``
(``NamedTensor`` entries), ``y`` and ``sample_weight``. Each tensor's data of
``ALIGN_MIN_BYTES`` or more is placed at an offset of the message that is a multiple of
``ALIGN``, by a ``padding`` field that readers ignore;
batches of only smaller tensors take protobuf's own (faster, for them) encoder.
``tests/unit/wire/test_train.py`` checks the bytes parse to what protobuf itself would
write, and that the data is aligned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from gradstream.v1 import trainer_pb2 as pb
from gradstream.wire.tensor import ALIGN

# Tags: (field number << 3) | wire type (0 varint, 2 length-delimited).
_BATCHES = b"\x12"  # TrainRequest.batches = 2
_INPUTS = 5  # Batch.inputs = 5 (x = 1, y = 2, sample_weight = 3)
_NAMED = b"\x2a"  # its tag
_NAME = b"\x0a"  # NamedTensor.name = 1
_NAMED_TENSOR = b"\x12"  # NamedTensor.tensor = 2
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


Part = tuple[Array, int]  # an array as it travels (``wire_array``) and its DataType code


@dataclass(frozen=True, slots=True)
class BatchParts:
    """One batch's tensors as they travel: ``x`` or named ``inputs``, ``y``, ``sample_weight``.

    The arrays must be C-contiguous and little-endian (``wire_array`` makes them so).
    """

    y: Part | None = None
    x: Part | None = None
    sample_weight: Part | None = None
    inputs: tuple[tuple[str, Part], ...] = ()

    @classmethod
    def of(cls, parts: BatchParts | Sequence[Part]) -> BatchParts:
        """``parts`` itself, or the positional form ``[x, y]`` / ``[x, y, sample_weight]``."""
        if isinstance(parts, BatchParts):
            return parts
        x, y, weight = (*parts, None, None, None)[:3]
        return cls(y=y, x=x, sample_weight=weight)

    def tensors(self) -> list[tuple[int, str, Part]]:
        """(Batch field number, input name or "", part) of each tensor, in wire order.

        Shared-memory places are given in this order.
        """
        fields = [(1, self.x), (2, self.y), (3, self.sample_weight)]
        out = [(number, "", part) for number, part in fields if part is not None]
        out += [(_INPUTS, name, part) for name, part in self.inputs]
        return out

    def arrays(self) -> list[Array]:
        """The arrays in wire order (what a shared-memory ring holds)."""
        return [array for _, _, (array, _) in self.tensors()]


def encode_batch(
    parts: BatchParts | Sequence[Part],
    places: Sequence[tuple[int, int]] | None = None,
    sequence: int = 0,
    start: int = 0,
) -> bytes:
    """One ``batches`` entry of a TrainRequest (or an EvaluateRequest: the same field).

    ``parts`` is a ``BatchParts`` or, positionally, ``(array, dtype code)`` for x, y and,
    if given, sample_weight. With ``places`` the tensors carry (offset, length) in the
    shared-memory ring instead of their bytes, in ``BatchParts.tensors`` order.
    ``start`` is where the entry will sit in its message: each tensor's data (from
    ``ALIGN_MIN_BYTES``) is padded to a multiple of ``ALIGN`` from the message's start,
    named inputs included, because the server uses large messages in place and unaligned
    numbers cost it a copy and a slower step (docs/performance.md).
    """
    batch = BatchParts.of(parts)
    tensors = batch.tensors()
    if places is not None or all(a.nbytes < ALIGN_MIN_BYTES for _, _, (a, _) in tensors):
        return _via_protobuf(batch, places, sequence)
    tags: list[bytes] = []
    names: list[bytes] = []  # a NamedTensor's name field, b"" for x, y, sample_weight
    heads: list[bytes] = []
    datas: list[bytes | memoryview] = []
    for number, name, (array, code) in tensors:
        head = _field(_DTYPE, code)
        if array.ndim:
            shape = b"".join(varint(d) for d in array.shape)
            head += _SHAPE + varint(len(shape)) + shape
        data: bytes | memoryview = array.reshape(-1).view(np.uint8).data if array.nbytes else b""
        tags.append(bytes(((number << 3) | 2,)))
        encoded = name.encode()
        names.append(_NAME + varint(len(encoded)) + encoded if encoded else b"")
        heads.append(head)
        datas.append(data)
    tail = _field(_SEQUENCE, sequence)
    pads = [0] * len(tensors)

    def layout() -> tuple[list[int], list[int], int, list[int]]:
        """Each Tensor's length, each field's length, the batch's, where each data starts."""
        sizes = [
            len(h) + p + (len(_DATA) + len(varint(len(d))) if d else 0) + len(d)
            for h, p, d in zip(heads, pads, datas, strict=True)
        ]
        # A named input wraps its Tensor in a NamedTensor: name, then the tensor field.
        outers = [
            len(n) + len(_NAMED_TENSOR) + len(varint(t)) + t if tag == _NAMED else t
            for n, t, tag in zip(names, sizes, tags, strict=True)
        ]
        body = sum(1 + len(varint(o)) + o for o in outers) + len(tail)
        pos = start + len(_BATCHES) + len(varint(body))
        starts = []
        for i, (head, pad, data) in enumerate(zip(heads, pads, datas, strict=True)):
            inner = pos + 1 + len(varint(outers[i]))
            if tags[i] == _NAMED:
                inner += len(names[i]) + len(_NAMED_TENSOR) + len(varint(sizes[i]))
            starts.append(inner + len(head) + pad + 1 + len(varint(len(data))))
            pos += 1 + len(varint(outers[i])) + outers[i]
        return sizes, outers, body, starts

    # Padding one tensor lengthens the prefixes before it and moves the tensors after it:
    # align them in order, redoing the layout each time. A longer prefix can undo an
    # alignment (at 128 bytes a length takes two), so after 8 rounds padding stops taking
    # its shortest form, which lets the prefixes settle. The rounds are bounded: an
    # unaligned message would still be correct, only slower to check on the server.
    for round_ in range(8 + 4 * len(tensors)):
        *_, starts = layout()
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
    sizes, outers, body, _ = layout()
    pieces: list[bytes | memoryview] = [_BATCHES, varint(body)]
    for i, (head, data) in enumerate(zip(heads, datas, strict=True)):
        pieces += (tags[i], varint(outers[i]))
        if tags[i] == _NAMED:
            pieces += (names[i], _NAMED_TENSOR, varint(sizes[i]))
        pieces += (head, _padding(pads[i]))
        if data:
            pieces += (_DATA, varint(len(data)), data)
    pieces.append(tail)
    # The one copy of the arrays: after this the caller may reuse its buffers.
    return b"".join(pieces)


def proto_batch(
    parts: BatchParts | Sequence[Part],
    places: Sequence[tuple[int, int]] | None = None,
    sequence: int = 0,
) -> pb.Batch:
    """The same batch as a protobuf message (what ``encode_batch`` must be equivalent to)."""
    message = pb.Batch(sequence=sequence)
    for i, (number, name, (array, code)) in enumerate(BatchParts.of(parts).tensors()):
        if number == _INPUTS:
            tensor = message.inputs.add(name=name).tensor
        else:
            tensor = (message.x, message.y, message.sample_weight)[number - 1]
        tensor.dtype = code  # type: ignore[assignment]
        tensor.shape[:] = array.shape
        if places is None:
            tensor.data = array.tobytes()
        else:
            tensor.shared.offset, tensor.shared.length = places[i]
    return message


def _via_protobuf(
    parts: BatchParts, places: Sequence[tuple[int, int]] | None, sequence: int
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


def entry_bound(parts: BatchParts | Sequence[Part]) -> int:
    """An upper bound of ``len(encode_batch(parts, ...))``, cheap to compute before encoding.

    The arrays' bytes plus, per tensor, its framing, its name and the most alignment
    padding it takes.
    """
    return 24 + sum(
        a.nbytes + 32 + 11 * a.ndim + MAX_PADDING + (24 + len(name.encode()) if name else 0)
        for _, name, (a, _) in BatchParts.of(parts).tensors()
    )
