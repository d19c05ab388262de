"""Producer streams against in-process servers: numbering, DUPLICATE, the bounded buffer, drain."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from gradstream.client import Client, ProducerStream, ResourceExhausted, Unavailable
from gradstream.server.main import BackgroundServer
from gradstream.server.wire import _request as read_in_place
from gradstream.v1 import trainer_pb2 as pb
from gradstream.wire import ALIGN
from gradstream.wire.train import ALIGN_MIN_BYTES
from tests.conftest import server_settings

SPEC = {
    "architecture": {"kind": "linear", "in_features": 2, "out_features": 1},
    "optimizer": {"kind": "sgd", "lr": 0.01},
}


def _batches(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        (rng.standard_normal((4, 2)).astype(np.float32), np.ones((4, 1), np.float32))
        for _ in range(n)
    ]


def test_automatic_numbering_continues_across_calls_of_one_producer(
    client: Client, name: str
) -> None:
    client.create_model(name, SPEC)
    first = [r.sequence for r in client.train(name, _batches(5), producer_id="etl")]
    second = client.train(name, _batches(3), producer_id="etl")
    assert first == [1, 2, 3, 4, 5]
    assert [(r.sequence, r.outcome) for r in second] == [
        (6, "APPLIED"),
        (7, "APPLIED"),
        (8, "APPLIED"),
    ]
    assert client.get_model(name).step == 8


def test_caller_sequences_already_applied_come_back_duplicate_and_change_nothing(
    client: Client, name: str
) -> None:
    client.create_model(name, SPEC)
    data = _batches(6)
    sequenced = [(x, y, None, 10 * (i + 1)) for i, (x, y) in enumerate(data)]
    assert {r.outcome for r in client.train(name, sequenced[:4], producer_id="p")} == {"APPLIED"}
    before = client.parameters(name)
    replay = list(client.train(name, sequenced, producer_id="p"))
    assert [(r.sequence, r.outcome) for r in replay] == [
        (10, "DUPLICATE"),
        (20, "DUPLICATE"),
        (30, "DUPLICATE"),
        (40, "DUPLICATE"),
        (50, "APPLIED"),
        (60, "APPLIED"),
    ]
    assert client.get_model(name).step == 6
    assert not np.array_equal(client.parameters(name)["weight"], before["weight"])


def test_caller_sequences_must_increase(client: Client, name: str) -> None:
    client.create_model(name, SPEC)
    ((x, y),) = _batches(1)
    with pytest.raises(ValueError, match="sequence 3 does not increase"):
        list(client.train(name, [(x, y, None, 5), (x, y, None, 3)], producer_id="p"))


def test_a_small_buffer_on_a_server_without_checkpoints_still_finishes(
    client: Client, name: str
) -> None:
    """The buffer fills; SaveCheckpoint answers FAILED_PRECONDITION; the SDK then keeps
    only batches without a result instead of waiting for durability forever."""
    client.create_model(name, SPEC)
    stream = client.train(name, iter(_batches(200)), producer_id="p", max_pending_batches=4)
    assert isinstance(stream, ProducerStream)
    assert len(list(stream)) == 200
    assert stream.durable_sequence == 0 and stream.applied_sequence == 200


def test_a_full_buffer_asks_the_server_for_a_checkpoint(tmp_path: Path) -> None:
    settings = server_settings(
        checkpoint_dir=tmp_path,
        checkpoint_every_steps=0,
        checkpoint_every_seconds=0,
    )
    with BackgroundServer(settings) as server, Client(server.target) as client:
        client.create_model("m", SPEC)
        stream = client.train(
            "m",
            iter(_batches(100)),
            producer_id="p",
            max_pending_batches=8,
            max_pending_bytes=10**9,
        )
        assert isinstance(stream, ProducerStream)
        assert len(list(stream)) == 100
        # Checkpoints were taken on the SDK's request (none are periodic here).
        assert stream.durable_sequence == 100
        # checkpoint_keep of the requested ones, beside the server's own first one.
        assert len(list((tmp_path / "m").glob("ckpt-*-requested"))) == 3


def test_drain_refuses_new_streams_and_ends_open_ones_with_unavailable(tmp_path: Path) -> None:
    settings = server_settings()
    server = BackgroundServer(settings).start()
    release = threading.Event()
    try:
        with Client(server.target) as client:
            client.create_model("m", SPEC)

            def slow() -> Iterator[tuple[np.ndarray, np.ndarray]]:
                yield from _batches(3)
                release.wait(30)  # the stream stays open, idle
                yield from _batches(3)

            stream = client.train("m", slow())
            got = [next(stream) for _ in range(3)]
            assert [r.outcome for r in got] == ["APPLIED"] * 3
            assert server._loop is not None
            server._loop.call_soon_threadsafe(server.server.servicer.drain)
            with pytest.raises(Unavailable, match="shutting down"):
                next(stream)
            with pytest.raises(Unavailable, match="shutting down"):
                list(client.train("m", _batches(1)))
            assert client.get_model("m").step == 3
    finally:
        release.set()
        server.stop()


class _Recorder(grpc.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    """Keeps the bytes of every Train message sent, and the most sent but unanswered."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.answered = 0
        self.most_in_flight = 0

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        def recorded() -> Iterator[Any]:
            for request in requests:
                if isinstance(request, bytes):  # the opener is a message, batches are bytes
                    self.sent.append(request)
                    self.most_in_flight = max(self.most_in_flight, len(self.sent) - self.answered)
                yield request

        return _Answers(continuation(details, recorded()), self)


class _Answers:
    """A Train call whose responses with results are counted as they arrive."""

    def __init__(self, call: Any, recorder: _Recorder) -> None:
        self._call = call
        self._recorder = recorder

    def __iter__(self) -> _Answers:
        return self

    def __next__(self) -> pb.TrainResponse:
        response: pb.TrainResponse = next(self._call)
        if response.results:
            self._recorder.answered += 1
        return response

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


def _recording_client(server: BackgroundServer, max_message_bytes: int) -> tuple[Client, _Recorder]:
    recorder = _Recorder()
    options = [("grpc.max_send_message_length", max_message_bytes)]
    channel = grpc.intercept_channel(grpc.insecure_channel(server.target, options), recorder)
    return Client(server.target, channel=channel, max_message_bytes=max_message_bytes), recorder


def test_the_producer_aligns_every_entry_of_a_message(server: BackgroundServer, name: str) -> None:
    client, recorder = _recording_client(server, 32 * 1024 * 1024)
    with client:
        client.create_model(name, SPEC)
        rng = np.random.default_rng(1)
        batches = [
            (rng.standard_normal((int(rows), 2)).astype(np.float32), np.ones((int(rows), 1)))
            for rows in rng.integers(130, 400, 24)
        ]
        results = list(client.train(name, batches, producer_id="p", batches_per_message=5))
    assert [r.outcome for r in results] == ["APPLIED"] * 24
    entries = 0
    for message in recorder.sent:
        view = memoryview(message)
        base = np.frombuffer(view, np.uint8).ctypes.data
        for batch in read_in_place(view).batches:
            entries += 1
            for tensor in (batch.x, batch.y):
                assert tensor is not None and len(tensor.data) >= ALIGN_MIN_BYTES
                assert (np.frombuffer(tensor.data, np.uint8).ctypes.data - base) % ALIGN == 0
    assert entries == 24 and len(recorder.sent) < 24  # several batches shared a message


def test_a_batch_over_the_message_limit_is_refused_client_side_by_both_streams_alike(
    server: BackgroundServer,
) -> None:
    limit = 1024 * 1024
    client, recorder = _recording_client(server, limit)
    ((x, y),) = _batches(1)
    big = np.zeros((limit // 8, 2), np.float32)
    errors = []
    with client:
        for producer_id in (None, "p"):
            name = f"oversized-{producer_id}"
            client.create_model(name, SPEC)
            seen = []
            with pytest.raises(ResourceExhausted) as failure:
                for result in client.train(
                    name, [(x, y), (big, big[:, :1]), (x, y)], producer_id=producer_id
                ):
                    seen.append(result)
            errors.append(str(failure.value))
            # The batch before it went out and was applied; the stream did not fail on the wire.
            assert [r.outcome for r in seen] == ["APPLIED"]
            assert client.get_model(name).step == 1
    assert errors[0] == errors[1]
    assert errors[0].startswith("RESOURCE_EXHAUSTED: batch 1: about ")
    assert f"more than max_message_bytes={limit} allows in one message" in errors[0]
    assert recorder.sent and all(len(m) < limit for m in recorder.sent)


@pytest.mark.parametrize("producer_id", [None, "p"])
def test_at_most_window_messages_are_unanswered(
    server: BackgroundServer, name: str, producer_id: str | None
) -> None:
    client, recorder = _recording_client(server, 32 * 1024 * 1024)
    with client:
        client.create_model(name, SPEC)
        results = list(
            client.train(
                name,
                iter(_batches(60)),
                producer_id=producer_id,
                batches_per_message=1,
                window=2,
            )
        )
    assert len(results) == 60 and len(recorder.sent) == 60
    assert recorder.most_in_flight == 2
