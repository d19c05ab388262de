"""The ingest hand-off: checked batches copied into a shared-memory slot, viewed back in place."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from gradstream.internal.v1 import ingest_pb2 as ipb
from gradstream.server.batches import Batch
from gradstream.server.errors import InvalidArgument, Unavailable
from gradstream.server.session import Rejected
from gradstream.server.slots import ALIGN, MIN_SLOT_BYTES, PREFIX, Ring, SlotViews


@pytest.fixture
def ring() -> Iterator[Ring]:
    made = Ring(2)
    try:
        yield made
    finally:
        made.close()


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


def _offsets(columns: ipb.Columns) -> list[int]:
    slices = [columns.x, columns.y, *columns.more]
    if columns.HasField("sample_weight"):
        slices.append(columns.sample_weight)
    return [s.offset for s in slices]


def test_a_message_of_one_layout_is_one_block_per_column(ring: Ring) -> None:
    for weight in (False, True):
        items = _blocks(5, weight)
        request = ring.pack(1, items)
        assert list(request.sequences) == [100, 101, 102, 103, 104] and not request.items
        assert request.block.HasField("sample_weight") == weight
        assert all(offset % ALIGN == 0 for offset in _offsets(request.block))
        got = SlotViews().items(request)
        _same(got, items)
        # Views of one block in the slot, not copies.
        assert isinstance(got[0], Batch) and isinstance(got[1], Batch)
        assert got[1].x.untyped_storage().data_ptr() == got[0].x.untyped_storage().data_ptr()


def test_other_messages_go_batch_by_batch_with_rejections_in_place(ring: Ring) -> None:
    blocks = _blocks(4, True)
    lone = Batch(torch.ones(2, 3, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64))
    unweighted = _blocks(1, False)[0]
    cases: list[list[Batch | Rejected]] = [
        [blocks[0], Rejected("batches[1].x: not finite", 7), blocks[2]],
        [blocks[0], unweighted, blocks[3]],  # a weight in some batches only
        [lone],
        [blocks[2], blocks[0]],  # the same block, out of order
        [Rejected("batches[0].y: label 9 is out of range [0, 2)", 3)],
    ]
    views = SlotViews()
    for slot, items in enumerate(cases):
        request = ring.pack(slot % 2, items)
        assert not request.sequences and len(request.items) == len(items)
        _same(views.items(request), items)


def test_a_message_larger_than_its_slot_gets_a_larger_segment(ring: Ring) -> None:
    small = _blocks(2, False)
    first = ring.pack(0, small)
    assert ring.segments[0] is not None and ring.segments[0].size == MIN_SLOT_BYTES
    big = torch.randn(MIN_SLOT_BYTES // 8 + 5, dtype=torch.float64).reshape(-1, 1)
    items: list[Batch | Rejected] = [Batch(big, big, None, 1)]
    views = SlotViews()
    before = views.items(first)
    grown = ring.pack(0, items)
    assert grown.segment != first.segment and grown.slot == first.slot == 0
    assert not Path(f"/dev/shm/{first.segment}").exists()  # the old one is unlinked
    _same(views.items(grown), items)
    _same(before, small)  # a view of the old segment still reads what it read


def test_close_unlinks_every_slot_and_refuses_more(ring: Ring) -> None:
    names = [ring.pack(slot, _blocks(3, False)).segment for slot in (0, 1)]
    assert all(Path(f"/dev/shm/{n}").exists() and n.startswith(PREFIX) for n in names)
    ring.close()
    assert not any(Path(f"/dev/shm/{n}").exists() for n in names)
    with pytest.raises(Unavailable):
        ring.pack(0, _blocks(3, False))


def test_the_server_maps_nothing_but_an_ingest_slot() -> None:
    request = ipb.TrainRequest(segment="../etc/passwd", sequences=[1])
    with pytest.raises(InvalidArgument, match="not an ingest slot"):
        SlotViews().items(request)
