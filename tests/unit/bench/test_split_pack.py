"""The split prototype's hand-off: checked batches copied into a slot and viewed back."""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from gradstream.bench.split import pack, unpack
from gradstream.server.batches import Batch
from gradstream.server.session import Rejected
from gradstream.server.slots import ALIGN

SLOT = 1 << 20


def _round_trip(items: Sequence[Batch | Rejected], slot_bytes: int = SLOT) -> tuple[Any, list[Any]]:
    buffer = mmap.mmap(-1, 2 * slot_bytes)
    ring = np.ndarray((2 * slot_bytes,), np.uint8, buffer=buffer)
    descriptor = pack(list(items), ring[slot_bytes:])  # the second slot
    return descriptor, unpack(buffer, slot_bytes, descriptor)


def _same(got: Sequence[Batch | Rejected], want: Sequence[Batch | Rejected]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        if isinstance(w, Rejected):
            assert g == w
            continue
        assert isinstance(g, Batch) and g.sequence == w.sequence
        for a, b in zip((g.x, g.y, g.weight, *g.more), (w.x, w.y, w.weight, *w.more), strict=True):
            if b is None:
                assert a is None
                continue
            assert a is not None and a.dtype == b.dtype and a.shape == b.shape
            assert a.numpy().tobytes() == b.numpy().tobytes()


def _blocks(n: int, weight: bool) -> list[Batch]:
    """``n`` batches that are ``unbind(0)`` views of one block per tensor, as the block decode
    makes them."""
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(n, 8, 3, generator=g, dtype=torch.float64).unbind(0)
    ids = torch.randint(0, 10, (n, 8), generator=g).unbind(0)
    ys = torch.randn(n, 8, 1, generator=g, dtype=torch.float64).unbind(0)
    ws = torch.rand(n, 8, generator=g, dtype=torch.float64).unbind(0) if weight else None
    return [
        Batch(xs[i], ys[i], None if ws is None else ws[i], 100 + i, (ids[i],)) for i in range(n)
    ]


def test_a_block_message_is_one_block_per_column_in_the_slot() -> None:
    for weight in (False, True):
        items = _blocks(5, weight)
        descriptor, got = _round_trip(items)
        assert descriptor[0] == "block"
        assert all(ref is None or ref[0] % ALIGN == 0 for ref in descriptor[2])
        _same(got, items)
        # Views of the slot, not copies.
        x = got[1].x
        assert x.untyped_storage().data_ptr() == got[0].x.untyped_storage().data_ptr()


def test_other_messages_go_batch_by_batch_with_rejections_in_place() -> None:
    blocks = _blocks(4, True)
    lone = Batch(torch.ones(2, 3, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64))
    unweighted = _blocks(1, False)[0]
    cases: list[list[Batch | Rejected]] = [
        [blocks[0], Rejected("batches[1].x: not finite", 7), blocks[2]],
        [blocks[0], unweighted, blocks[3]],  # a weight in some batches only
        [lone],
        [blocks[2], blocks[0]],  # the same block, out of order
    ]
    for items in cases:
        descriptor, got = _round_trip(items)
        assert descriptor[0] == "items"
        _same(got, items)


def test_a_message_too_large_for_a_slot_travels_inline() -> None:
    items = _blocks(5, False)
    descriptor, got = _round_trip(items, slot_bytes=256)
    assert descriptor[0] == "inline"
    _same(got, items)
