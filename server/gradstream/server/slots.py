"""The ingest front's hand-off of checked batches to the server process: shared-memory slots.

A Train stream of ``--ingest process`` has a ring of ``queue_depth + 1`` slots, each a
``SharedMemory`` segment the front creates when the slot is first used and replaces by
a larger one when a message does not fit (never shrunk or rewritten under a mapping
that may still read it: a replaced segment is unlinked, its mappings stay valid). The
front (``Ring.pack``) copies a message's checked tensors into a slot and describes
them in an ``ingest_pb2.TrainRequest``; the server process (``SlotViews.items``) views
them in place, read-only: no copy and no second check, because the only writer is its
own front. A message whose batches all have one layout is one block per column, which
the server splits with ``unbind(0)`` as ``session._block`` does.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import secrets
import threading
import warnings
from collections.abc import Sequence
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np
import torch

from gradstream.internal.v1 import ingest_pb2 as ipb
from gradstream.server.batches import Batch
from gradstream.server.errors import InvalidArgument, Unavailable
from gradstream.server.session import Rejected

ALIGN = 64  # every tensor in a slot starts on a cache line
MIN_SLOT_BYTES = 1 << 20  # a slot's first size, unless its first message needs more
PREFIX = "gradstream-ingest-"  # the segments' names in /dev/shm
_NAME = re.compile(rf"{PREFIX}[0-9a-f]{{8,64}}")
_DTYPES = {str(t).removeprefix("torch."): t for t in (torch.float32, torch.float64, torch.int64)}

# A batch's tensors in the order Columns has them: x, y, sample_weight, then more.
Columns = list[torch.Tensor | None]


def columns_of(batch: Batch) -> Columns:
    """A batch's tensors, in the order of ``Columns``."""
    return [batch.x, batch.y, batch.weight, *batch.more]


def block_of(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The one tensor that ``tensors`` are consecutive ``unbind(0)`` views of, if they are."""
    head = tensors[0]
    if not head.is_contiguous():
        return None
    storage, start, size = head.untyped_storage().data_ptr(), head.storage_offset(), head.numel()
    for i, t in enumerate(tensors):
        if (
            t.untyped_storage().data_ptr() != storage
            or t.storage_offset() != start + i * size
            or t.shape != head.shape
            or not t.is_contiguous()
        ):
            return None
    return head.as_strided((len(tensors), *head.shape), (size, *head.stride()))


def _blocks(items: Sequence[Batch | Rejected]) -> Columns | None:
    """Each column of the message as one block, when every batch is checked and of one layout."""
    if len(items) < 2 or not all(isinstance(i, Batch) for i in items):
        return None
    blocks: Columns = []
    for column in zip(*(columns_of(b) for b in items), strict=True):  # type: ignore[arg-type]
        present = [t for t in column if t is not None]
        if not present:
            blocks.append(None)
            continue
        block = block_of(present) if len(present) == len(column) else None
        if block is None:
            return None
        blocks.append(block)
    return blocks


class _Layout:
    """Where each tensor of a message goes in its slot, before any byte is copied."""

    def __init__(self) -> None:
        self.size = 0
        self.tensors: list[tuple[int, torch.Tensor]] = []

    def put(self, tensor: torch.Tensor | None, slice_: ipb.Slice) -> None:
        """Place ``tensor`` and describe it in ``slice_``."""
        assert tensor is not None
        offset = self.size
        self.tensors.append((offset, tensor))
        self.size = -(-(offset + tensor.nbytes) // ALIGN) * ALIGN
        slice_.offset = offset
        slice_.dtype = str(tensor.dtype).removeprefix("torch.")
        slice_.shape.extend(tensor.shape)

    def columns(self, tensors: Columns, into: ipb.Columns) -> None:
        """A batch's (or a block's) tensors into ``into``."""
        x, y, weight, *more = tensors
        self.put(x, into.x)
        self.put(y, into.y)
        if weight is not None:
            self.put(weight, into.sample_weight)
        for t in more:
            self.put(t, into.more.add())


def describe(items: Sequence[Batch | Rejected]) -> tuple[ipb.TrainRequest, _Layout]:
    """A message's descriptor (without slot and segment), and where its tensors go."""
    request = ipb.TrainRequest()
    layout = _Layout()
    blocks = _blocks(items)
    if blocks is not None:
        request.sequences.extend(i.sequence for i in items)
        layout.columns(blocks, request.block)
        return request, layout
    for item in items:
        described = request.items.add(sequence=item.sequence)
        if isinstance(item, Rejected):
            described.rejected = item.reason
        else:
            layout.columns(columns_of(item), described.columns)
    return request, layout


class Ring:
    """A stream's slots on the front: created on first use, grown, unlinked by ``close``.

    ``pack`` runs on the stream's decode thread, ``close`` on the event loop: a lock
    keeps a close from unmapping a slot under a copy.
    """

    def __init__(self, slots: int) -> None:
        self.segments: list[SharedMemory | None] = [None] * slots
        self._lock = threading.Lock()
        self._closed = False

    def _segment(self, slot: int, size: int) -> SharedMemory:
        segment = self.segments[slot]
        if segment is not None and segment.size >= size:
            return segment
        grown = max(size, MIN_SLOT_BYTES, 2 * segment.size if segment is not None else 0)
        # A new segment, not a resized one: the server may still map the old one.
        fresh = SharedMemory(f"{PREFIX}{secrets.token_hex(8)}", create=True, size=grown)
        self.segments[slot] = fresh
        if segment is not None:
            _release(segment)
        return fresh

    def pack(self, slot: int, items: Sequence[Batch | Rejected]) -> ipb.TrainRequest:
        """Copy a message's checked tensors into ``slot``; the descriptor that finds them."""
        request, layout = describe(items)
        request.slot = slot
        with self._lock:
            if self._closed:
                raise Unavailable("the Train stream ended")
            segment = self._segment(slot, layout.size)
            request.segment = segment.name
            if layout.tensors:
                target = torch.frombuffer(segment.buf, dtype=torch.uint8, count=layout.size)
                for offset, tensor in layout.tensors:
                    end = offset + tensor.nbytes
                    target[offset:end].view(tensor.dtype).view(tensor.shape).copy_(tensor)
                del target  # no view of the segment outlives the copy: close() unmaps it
        return request

    def close(self) -> None:
        """Unmap and unlink every slot (once); a ``pack`` after it fails."""
        with self._lock:
            self._closed = True
            segments, self.segments = self.segments, [None] * len(self.segments)
        for segment in segments:
            if segment is not None:
                _release(segment)


def _release(segment: SharedMemory) -> None:
    with contextlib.suppress(BufferError):  # a view still alive: unmapped when it goes
        segment.close()
    with contextlib.suppress(FileNotFoundError):
        segment.unlink()


class SlotViews:
    """A stream's slots on the server: mapped read-only once per segment, viewed in place."""

    def __init__(self) -> None:
        self._maps: dict[int, tuple[str, mmap.mmap]] = {}

    def _mapping(self, slot: int, name: str) -> mmap.mmap:
        known = self._maps.get(slot)
        if known is not None and known[0] == name:
            return known[1]
        if _NAME.fullmatch(name) is None:
            raise InvalidArgument("segment", f"{name!r} is not an ingest slot's name")
        fd = os.open(f"/dev/shm/{name}", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            mapping = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        # A replaced segment's mapping goes with the last view of it (a job still running).
        self._maps[slot] = (name, mapping)
        return mapping

    def items(self, request: ipb.TrainRequest) -> list[Batch | Rejected]:
        """The message's batches as views of its slot (no copy), rejections in their place."""
        if not request.sequences and not request.items:
            return []
        buffer = self._mapping(request.slot, request.segment)

        def view(s: ipb.Slice) -> torch.Tensor:
            shape = tuple(s.shape)
            count = int(np.prod(shape)) if shape else 1
            return torch.frombuffer(
                buffer, dtype=_DTYPES[s.dtype], count=count, offset=s.offset
            ).view(shape)

        def columns(c: ipb.Columns) -> list[Any]:
            weight = view(c.sample_weight) if c.HasField("sample_weight") else None
            return [view(c.x), view(c.y), weight, *(view(m) for m in c.more)]

        with warnings.catch_warnings():
            # Read-only on purpose: torch warns that it cannot mark the tensors so.
            warnings.simplefilter("ignore", UserWarning)
            if request.sequences:
                split = [None if t is None else t.unbind(0) for t in columns(request.block)]
                return [
                    _batch(s, [None if c is None else c[i] for c in split])
                    for i, s in enumerate(request.sequences)
                ]
            return [
                Rejected(i.rejected, i.sequence)
                if i.rejected
                else _batch(i.sequence, columns(i.columns))
                for i in request.items
            ]


def _batch(sequence: int, tensors: Sequence[torch.Tensor | None]) -> Batch:
    x, y, weight, *more = tensors
    assert x is not None and y is not None
    return Batch(x, y, weight, sequence, tuple(t for t in more if t is not None))
