"""The outbox a producer re-sends from: the same bytes after a reconnect, every entry aligned."""

from __future__ import annotations

import re

import numpy as np
import pytest

from gradstream.client._outbox import Outbox
from gradstream.client._shm import SharedRing
from gradstream.server.wire import _request as read_in_place
from gradstream.v1 import trainer_pb2 as pb
from gradstream.wire import ALIGN, from_parts, inputs_from_proto

OPENER = pb.TrainRequest(open=pb.TrainOpen(model="m", producer_id="p"))


def _sequences_and_alignment(message: bytes) -> list[int]:
    view = memoryview(message)
    base = np.frombuffer(view, np.uint8).ctypes.data
    sequences = []
    for batch in read_in_place(view).batches:
        sequences.append(batch.sequence)
        for tensor in (batch.x, batch.y):
            assert tensor is not None
            assert (np.frombuffer(tensor.data, np.uint8).ctypes.data - base) % ALIGN == 0
    return sequences


def test_a_resumed_call_sends_the_held_messages_byte_for_byte() -> None:
    batches = [
        (np.full((300 + i, 2), i, np.float32), np.ones((300 + i, 1), np.float32)) for i in range(10)
    ]
    outbox = Outbox(
        batches,
        batches_per_message=3,
        message_bytes=10**9,
        max_message_bytes=10**8,
        numbered=True,
        release_on_ack=False,
        max_batches=100,
        max_bytes=10**9,
    )
    outbox.start(after=5)  # the server had applied this producer's 1-5 before
    try:
        first = outbox.sending(OPENER, window=100, window_bytes=10**9)
        assert first.resume(applied=5, answered=5) == []
        opener, *rest = first.requests()
        sent = [m for m in rest if isinstance(m, bytes)]
        assert opener is OPENER and sent == rest
        assert [_sequences_and_alignment(m) for m in sent] == [
            [6, 7, 8],
            [9, 10, 11],
            [12, 13, 14],
            [15],
        ]
        first.end()
        # The connection broke: the server applied up to 10, answered up to 8, saved 7.
        outbox.release(7)  # [6, 7, 8] still holds 8, which is not durable
        second = outbox.sending(OPENER, window=100, window_bytes=10**9)
        assert second.resume(applied=10, answered=8) == [9, 10]
        _, *again = second.requests()
        assert again == sent[1:]
        outbox.release(14)
        third = outbox.sending(OPENER, window=100, window_bytes=10**9)
        assert third.resume(applied=14, answered=14) == []
        assert list(third.requests())[1:] == sent[3:]
    finally:
        outbox.stop()


def _named_batches(count: int) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        (
            {
                "user": rng.integers(0, 100, (300, 2)),
                "item": rng.integers(0, 50, (300, 1)).astype(np.int32),
                "dense": rng.standard_normal((300, 4)).astype(np.float32),
            },
            rng.integers(0, 2, (300, 1)).astype(np.float32),
        )
        for _ in range(count)
    ]


def _sent(outbox: Outbox) -> list[bytes]:
    outbox.start()
    try:
        _, *rest = outbox.sending(OPENER, window=100, window_bytes=10**9).requests()
    finally:
        outbox.stop()
    outbox.raise_error()
    return [m for m in rest if isinstance(m, bytes)]


def test_named_inputs_travel_by_name_in_the_dicts_order() -> None:
    batches = _named_batches(5)
    outbox = Outbox(batches, batches_per_message=2, message_bytes=10**9, max_message_bytes=10**8)
    decoded = [b for m in _sent(outbox) for b in pb.TrainRequest.FromString(m).batches]
    assert len(decoded) == 5
    for (inputs, y), batch in zip(batches, decoded, strict=True):
        assert not batch.HasField("x")
        assert [n.name for n in batch.inputs] == ["user", "item", "dense"]
        got = inputs_from_proto(batch.inputs)
        for name, array in inputs.items():
            assert got[name].dtype == array.dtype and np.array_equal(got[name], array)
        assert np.array_equal(np.frombuffer(batch.y.data, np.float32).reshape(300, 1), y)


def test_named_inputs_go_through_the_shared_memory_ring() -> None:
    batches = [(*b, np.full((300,), 0.5)) for b in _named_batches(3)]
    ring = SharedRing(1 << 20)
    try:
        outbox = Outbox(
            batches, batches_per_message=8, message_bytes=10**9, max_message_bytes=10**8, ring=ring
        )
        decoded = [b for m in _sent(outbox) for b in pb.TrainRequest.FromString(m).batches]
        buf = ring.segment.buf
        assert buf is not None
        for (inputs, y, weight), batch in zip(batches, decoded, strict=True):
            tensors = [(name, t.tensor) for name, t in zip(inputs, batch.inputs, strict=True)]
            tensors += [("y", batch.y), ("sample_weight", batch.sample_weight)]
            expected = {**inputs, "y": y, "sample_weight": weight}
            for name, tensor in tensors:
                assert not tensor.data and tensor.shared.offset % ALIGN == 0
                start = tensor.shared.offset
                raw = bytes(buf[start : start + tensor.shared.length])
                got = from_parts(tensor.dtype, tuple(tensor.shape), raw, name)
                assert np.array_equal(got, expected[name]), name
    finally:
        ring.close()


@pytest.mark.parametrize(
    ("batch", "error", "words"),
    [
        (
            ({1: np.zeros((2, 1))}, np.zeros((2, 1))),
            TypeError,
            "batch 0: inputs: key 1 (int) is not a string",
        ),
        (({"": np.zeros((2, 1))}, np.zeros((2, 1))), ValueError, "batch 0: inputs: has an empty"),
        (({}, np.zeros((2, 1))), ValueError, "batch 0: inputs: is empty"),
        (({"a": None}, np.zeros((2, 1))), ValueError, "batch 0: inputs['a']: is None"),
        (({"a": np.zeros(2)}, None), ValueError, "batch 0: y is None"),
        (({"a": np.zeros(2)},), TypeError, "got a tuple of 1"),
        (({"a": np.array(["s"])}, np.zeros(1)), TypeError, "batch 0: inputs['a']: cannot send"),
        ((None, np.zeros(1)), ValueError, "batch 0: x is None"),
    ],
)
def test_a_malformed_batch_is_refused_naming_what(
    batch: tuple[object, ...], error: type[Exception], words: str
) -> None:
    outbox = Outbox([batch], batches_per_message=1, message_bytes=10**9, max_message_bytes=10**8)  # type: ignore[list-item]
    with pytest.raises(error, match=re.escape(words)):
        _sent(outbox)
