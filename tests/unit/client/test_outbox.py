"""The outbox a producer re-sends from: the same bytes after a reconnect, every entry aligned."""

from __future__ import annotations

import numpy as np

from gradstream.client._outbox import Outbox
from gradstream.server.wire import _request as read_in_place
from gradstream.v1 import trainer_pb2 as pb
from gradstream.wire import ALIGN

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
