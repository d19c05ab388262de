"""Producer streams against in-process servers: numbering, DUPLICATE, the bounded buffer, drain."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from gradstream.client import Client, ProducerStream, Unavailable
from gradstream.server.main import BackgroundServer
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
