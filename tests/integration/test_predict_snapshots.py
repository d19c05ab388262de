"""Predict on published snapshots, beside training, on a real server."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from gradstream.client import Client, Prediction
from gradstream.client._errors import InvalidArgument, NotFound, ResourceExhausted
from gradstream.server.main import BackgroundServer
from gradstream.v1 import trainer_pb2 as pb
from gradstream.v1 import trainer_pb2_grpc as pb_grpc
from gradstream.wire import from_proto, to_proto
from tests.conftest import server_settings

# l1 on one row with x = 1 and a target far above the output: d loss / dw = d loss / db = -1
# on every step, so with lr 1 both grow by exactly 1 a step, from zero: after step s the
# output on x is s * x + s. Two parameters: a prediction mixing two steps shows too.
COUNTER = {
    "architecture": {"kind": "linear", "in_features": 1, "out_features": 1},
    "init": {"kind": "zeros"},
    "loss": {"kind": "l1"},
    "optimizer": {"kind": "sgd", "lr": 1.0},
}
ONE_ROW = (np.ones((1, 1), np.float32), np.full((1, 1), 1e6, np.float32))
X = np.array([[1.0], [2.0], [-3.0]], np.float32)


def _expected(step: int) -> np.ndarray:
    return (X * step + step).astype(np.float32)


@pytest.fixture(params=[(2, 1 << 18), (2, 0), (0, 0)], ids=["inline", "threads", "worker"])
def served(request: pytest.FixtureRequest) -> Iterator[BackgroundServer]:
    """Predict on snapshots, small ones on the event loop; on snapshots, always on the 2
    Predict threads; snapshots off."""
    threads, inline = request.param
    settings = server_settings(
        predict_threads=threads,
        predict_inline_work=inline,
        max_batch_rows=100,
        max_activation_bytes=600,
    )
    with BackgroundServer(settings) as running:
        yield running


def _predict(stub: pb_grpc.TrainerServiceStub, name: str) -> tuple[np.ndarray, int]:
    response = stub.Predict(pb.PredictRequest(name=name, x=to_proto(X)))
    return from_proto(response.y, "y"), response.step


def test_each_prediction_under_training_equals_the_output_of_the_step_it_reports(
    served: BackgroundServer,
) -> None:
    steps = 600
    with Client(served.target) as client, grpc.insecure_channel(served.target) as channel:
        client.create_model("counter", COUNTER)
        stub = pb_grpc.TrainerServiceStub(channel)
        done = threading.Event()
        errors: list[BaseException] = []

        def train() -> None:
            try:
                with Client(served.target) as trainer_client:
                    # Several messages, so the model's worker has a queue to wait in.
                    for _ in range(steps // 50):
                        list(trainer_client.train("counter", [ONE_ROW] * 50))
            except BaseException as exc:
                errors.append(exc)
            finally:
                done.set()

        thread = threading.Thread(target=train)
        thread.start()
        seen: list[int] = []
        try:
            while not done.is_set() and len(seen) < 5000:
                y, step = _predict(stub, "counter")
                np.testing.assert_array_equal(y, _expected(step), err_msg=f"step {step}")
                seen.append(step)
        finally:
            thread.join(60)
        assert not errors, errors
        assert seen == sorted(seen), "a prediction reported an older step than the one before"
        # Read-your-writes: after the last step's answer, Predict is at that step.
        y, step = _predict(stub, "counter")
        assert step == steps
        np.testing.assert_array_equal(y, _expected(steps))
        assert client.get_model("counter").step == steps
    # The predictions saw training move, so they did run beside it.
    assert len(set(seen)) >= 3, seen


def test_predictions_on_snapshots_keep_the_input_checks(served: BackgroundServer) -> None:
    with Client(served.target) as client:
        client.create_model("checked", COUNTER)
        with pytest.raises(InvalidArgument, match=r"x.*non-finite"):
            client.predict("checked", np.array([[np.inf]], np.float32))
        # Finite as float64, infinite once converted to the model's float32.
        with pytest.raises(InvalidArgument, match=r"x.*non-finite.*float32"):
            client.predict("checked", np.array([[1e300]], np.float64))
        with pytest.raises(ResourceExhausted, match="max_batch_rows"):
            client.predict("checked", np.ones((101, 1), np.float32))
        # 12 activation bytes a row in this model: 60 rows need 720, the limit is 600.
        with pytest.raises(ResourceExhausted, match="max_activation_bytes"):
            client.predict("checked", np.ones((60, 1), np.float32))
        with pytest.raises(InvalidArgument, match=r"x: has shape \[2, 2\]"):
            client.predict("checked", np.ones((2, 2), np.float32))
        assert client.get_model("checked").step == 0


def test_a_prediction_after_set_parameters_sees_them(served: BackgroundServer) -> None:
    with Client(served.target) as client:
        client.create_model("set", COUNTER)
        list(client.train("set", [ONE_ROW] * 3))
        np.testing.assert_array_equal(client.predict("set", X), _expected(3))
        client.set_parameters("set", {"weight": np.full((1, 1), 5.0, np.float32)})
        np.testing.assert_array_equal(client.predict("set", X), X * 5 + 3)


def test_the_sdk_returns_the_step_of_a_prediction_when_asked(served: BackgroundServer) -> None:
    with Client(served.target) as client:
        client.create_model("stepped", COUNTER)
        list(client.train("stepped", [ONE_ROW] * 4))
        prediction = client.predict("stepped", X, with_step=True)
        assert isinstance(prediction, Prediction)
        assert prediction.step == 4
        np.testing.assert_array_equal(prediction.y, _expected(4))
        # Without it: the array alone, as before.
        plain = client.predict("stepped", X)
        assert isinstance(plain, np.ndarray)
        np.testing.assert_array_equal(plain, _expected(4))


def test_a_prediction_waiting_for_a_deleted_models_copy_ends_with_not_found() -> None:
    settings = server_settings(predict_threads=2)
    with BackgroundServer(settings) as served, Client(served.target) as client:
        client.create_model("gone", COUNTER)
        list(client.train("gone", [ONE_ROW]))  # step 1, not copied: nobody predicted
        worker = served.server.registry.get("gone")
        running, release = threading.Event(), threading.Event()
        # A job without a step boundary holds the worker: a prediction waits for it.
        assert served._loop is not None

        def hold(_: object) -> bool:
            running.set()
            return release.wait(60)

        blocked = asyncio.run_coroutine_threadsafe(worker.run(hold), served._loop)
        assert running.wait(30)
        outcome: list[BaseException | np.ndarray] = []
        predicting = threading.Thread(
            target=lambda: outcome.append(_call(client.predict, "gone", X))
        )
        deleting = threading.Thread(target=lambda: _call(client.delete_model, "gone"))
        try:
            predicting.start()
            deadline = time.monotonic() + 30
            while not worker.trainer.snapshots.wanted and time.monotonic() < deadline:
                time.sleep(0.001)
            assert worker.trainer.snapshots.wanted, "the prediction did not wait"
            deleting.start()  # waits for the blocked job to end, like any deletion
            predicting.join(10)
            # Answered while the job still runs: it does not wait for a deleted model.
            assert not predicting.is_alive()
            assert not release.is_set()
            (error,) = outcome
            assert isinstance(error, NotFound), error
            assert "gone" in str(error) and "deleted" in str(error)
        finally:
            release.set()
            blocked.result(30)
            for thread in (predicting, deleting):
                if thread.ident is not None:  # started
                    thread.join(30)
        with pytest.raises(NotFound):
            client.predict("gone", X)


def _call(function: Any, *args: Any) -> Any:
    """The result, or the exception it raised."""
    try:
        return function(*args)
    except Exception as exc:
        return exc
