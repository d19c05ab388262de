"""Cancel and deadline mid-stream: nothing is committed after the client has gone.

The model's worker is held busy by a job that waits on a gate, so every batch the
stream sent is still queued when the client cancels (or its deadline passes). Once
the gate opens, none of them may be applied: the model stays at step 0. The
active-stream count returns to zero every time and the model trains normally after.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from gradstream.client import Client
from gradstream.server.engine import Trainer
from gradstream.server.main import BackgroundServer
from gradstream.v1 import trainer_pb2 as pb
from gradstream.v1 import trainer_pb2_grpc as pb_grpc
from gradstream.wire import to_proto

MESSAGES = 8
REPEATS = 20
SPEC = {
    "architecture": {"kind": "linear", "in_features": 4, "out_features": 1},
    "optimizer": {"kind": "sgd", "lr": 0.01},
}
_names = itertools.count()


def _hold_worker(server: BackgroundServer, model: str, gate: threading.Event) -> None:
    """Queue a job on the model's worker that blocks it until ``gate`` opens."""
    started = threading.Event()

    def block(trainer: Trainer) -> None:
        started.set()
        gate.wait(30)

    worker = server.server.registry.get(model)
    loop = server._loop
    assert loop is not None
    asyncio.run_coroutine_threadsafe(worker.submit(block), loop).result(10)
    assert started.wait(10)


def _wait_for(condition: object, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.mark.parametrize("how", ["cancel", "deadline"])
@pytest.mark.parametrize("after", [0, 1, MESSAGES // 2, MESSAGES - 1])
def test_nothing_is_committed_after_a_cancel(
    server: BackgroundServer, client: Client, how: str, after: int
) -> None:
    rng = np.random.default_rng(after)
    batch = pb.Batch(
        x=to_proto(rng.standard_normal((16, 4)).astype(np.float32)),
        y=to_proto(rng.standard_normal((16, 1)).astype(np.float32)),
    )
    streams = server.server.streams
    registry = server.server.metrics.registry
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.TrainerServiceStub(channel)
        # A deadline costs its wait each time; the cancel is the one repeated 20 times.
        for _ in range(REPEATS if how == "cancel" else 5):
            model = f"cancel{next(_names)}"
            client.create_model(model, SPEC)
            gate, sent, stop = threading.Event(), threading.Event(), threading.Event()
            _hold_worker(server, model, gate)

            def requests(
                model: str = model, sent: threading.Event = sent, stop: threading.Event = stop
            ) -> Iterator[pb.TrainRequest]:
                yield pb.TrainRequest(open=pb.TrainOpen(model=model))
                for _ in range(after):
                    yield pb.TrainRequest(batches=[batch])
                sent.set()  # gRPC has taken every message before this point
                stop.wait(30)

            call = stub.Train(requests(), timeout=0.3 if how == "deadline" else 30)
            try:
                assert sent.wait(10)
                if how == "cancel":
                    call.cancel()
                received: list[pb.TrainResponse] = []
                with pytest.raises(grpc.RpcError) as failure:
                    received.extend(call)
                expected = grpc.StatusCode.CANCELLED
                if how == "deadline":
                    expected = grpc.StatusCode.DEADLINE_EXCEEDED
                assert failure.value.code() == expected
                assert received == []  # the worker was held: nothing could have been applied
                _wait_for(lambda: streams.active == 0, "the stream to end on the server")
            finally:
                stop.set()
                gate.set()
            # Every batch the stream sent is still queued behind the gate: none may apply.
            info = client.get_model(model)  # runs on the worker after whatever was queued
            assert info.step == 0, f"{info.step} steps committed after the {how}"
            assert info.pending_batches == 0
            assert registry.get_sample_value("gradstream_active_streams") == 0
            # The model is not wedged: a new stream trains it.
            x, y = np.ones((2, 4), np.float32), np.ones((2, 1), np.float32)
            assert [r.outcome for r in client.train(model, [(x, y)])] == ["APPLIED"]
            client.delete_model(model)
    assert streams.active == 0


def test_cancel_while_training_freely_keeps_results_and_steps_consistent(
    server: BackgroundServer, client: Client, name: str
) -> None:
    """Without a held worker: steps seen by the client <= steps committed <= batches sent."""
    client.create_model(name, SPEC)
    x, y = np.ones((64, 4), np.float32), np.ones((64, 1), np.float32)
    previous = 0
    for sent_batches in (1, 4, 16, 64):
        results = []
        stream = client.train(name, [(x, y)] * sent_batches, batches_per_message=1)
        for result in stream:
            results.append(result)
            if len(results) == sent_batches // 2 or sent_batches == 1:
                break
        stream.close()  # type: ignore[attr-defined]  # a generator: closing cancels the call
        _wait_for(lambda: server.server.streams.active == 0, "the stream to end")
        committed = client.get_model(name).step - previous
        assert len(results) <= committed <= sent_batches
        assert client.get_model(name).step - previous == committed  # nothing trickles in later
        previous += committed
