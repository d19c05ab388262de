"""Every limit: past it RESOURCE_EXHAUSTED naming it, and nothing else affected."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradstream.client import Client, ResourceExhausted
from gradstream.server.main import BackgroundServer
from gradstream.v1 import trainer_pb2 as pb
from gradstream.v1 import trainer_pb2_grpc as pb_grpc
from gradstream.wire.tensor import to_proto
from tests.conftest import server_settings

MAX_STREAMS = 4
MESSAGE_LIMIT = 1024 * 1024
SPEC = {
    "architecture": {"kind": "linear", "in_features": 4, "out_features": 1},
    "init": {"kind": "zeros"},
    "optimizer": {"kind": "sgd", "lr": 0.01},
}


@pytest.fixture(scope="module")
def limited() -> Iterator[BackgroundServer]:
    """A server with small limits, so each is cheap to reach."""
    settings = server_settings(
        health_port=0,
        max_streams=MAX_STREAMS,
        max_batch_rows=64,
        max_batch_bytes=1000,
        max_message_bytes=MESSAGE_LIMIT,
        max_models=6,
        max_model_parameters=10_000,
    )
    with BackgroundServer(settings) as running:
        yield running


def _rows(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(n)
    return rng.standard_normal((n, 4)).astype(np.float32), np.ones((n, 1), np.float32)


def test_twice_the_stream_limit_at_once_refuses_the_excess_and_health_answers(
    limited: BackgroundServer,
) -> None:
    with Client(limited.target, max_message_bytes=MESSAGE_LIMIT) as client:
        client.create_model("crowded", SPEC)
        client.create_model("bystander", SPEC)
    release = threading.Event()
    channel = grpc.insecure_channel(limited.target)
    stub = pb_grpc.TrainerServiceStub(channel)
    x, _ = _rows(2)

    def hold_open() -> Iterator[pb.TrainRequest]:
        yield pb.TrainRequest(open=pb.TrainOpen(model="crowded"))
        release.wait(60)

    def open_stream(_: int) -> tuple[str, float, grpc.Call]:
        start = time.perf_counter()
        call = stub.Train(hold_open(), timeout=60)
        try:
            first = next(iter(call))
            outcome = "opened" if first.HasField("opened") else "?"
        except grpc.RpcError as exc:
            outcome = f"{exc.code().name}: {exc.details()}"
        return outcome, time.perf_counter() - start, call

    health_latencies: list[float] = []
    stop_probing = threading.Event()

    def probe() -> None:
        # Health on the gRPC port and on the probe port, while the streams pile up.
        for target in (limited.target, f"127.0.0.1:{limited.server.health_port}"):
            with grpc.insecure_channel(target) as probe_channel:
                health = health_pb2_grpc.HealthStub(probe_channel)
                health.Check(health_pb2.HealthCheckRequest(), timeout=10)  # connect first
        main = grpc.insecure_channel(limited.target)
        side = grpc.insecure_channel(f"127.0.0.1:{limited.server.health_port}")
        stubs = [health_pb2_grpc.HealthStub(main), health_pb2_grpc.HealthStub(side)]
        while not stop_probing.is_set():
            for health in stubs:
                start = time.perf_counter()
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                health_latencies.append(time.perf_counter() - start)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            time.sleep(0.01)
        main.close()
        side.close()

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        with ThreadPoolExecutor(2 * MAX_STREAMS) as pool:
            opened = list(pool.map(open_stream, range(2 * MAX_STREAMS)))
        outcomes = [o for o, _, _ in opened]
        assert outcomes.count("opened") == MAX_STREAMS, outcomes
        refused = [(o, s) for o, s, _ in opened if o != "opened"]
        assert len(refused) == MAX_STREAMS
        for outcome, seconds in refused:
            assert outcome.startswith("RESOURCE_EXHAUSTED: max_streams: 4 Train streams")
            # Refused at once: not queued behind the open streams, which are still open.
            assert seconds < 5.0
        assert limited.server.streams.active == MAX_STREAMS
        # Keep the server saturated while health is probed a while longer.
        probed = len(health_latencies)
        deadline = time.monotonic() + 10
        while len(health_latencies) < probed + 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert limited.server.streams.active == MAX_STREAMS
        # Nothing else is affected: another model still trains and predicts.
        with Client(limited.target, max_message_bytes=MESSAGE_LIMIT) as client:
            assert client.predict("bystander", x).shape == (2, 1)
    finally:
        stop_probing.set()
        prober.join(30)
        release.set()
        for _, _, call in opened:
            call.cancel()
        channel.close()
    assert health_latencies, "health was never probed"
    print(
        f"health during overload: {len(health_latencies)} checks, max {max(health_latencies):.3f} s"
    )
    assert max(health_latencies) < 0.5
    deadline = time.monotonic() + 10
    while limited.server.streams.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert limited.server.streams.active == 0
    gauge = limited.server.metrics.registry.get_sample_value("gradstream_active_streams")
    assert gauge == 0


def test_batch_rows_and_bytes_limits_reject_that_batch_alone(limited: BackgroundServer) -> None:
    with Client(limited.target, max_message_bytes=MESSAGE_LIMIT) as client:
        client.create_model("rows", SPEC)
        small, too_many, too_big = _rows(8), _rows(65), _rows(60)
        results = list(
            client.train("rows", [small, too_many, small, too_big, small], skip_rejected=True)
        )
        assert [r.outcome for r in results] == [
            "APPLIED",
            "REJECTED",
            "APPLIED",
            "REJECTED",
            "APPLIED",
        ]
        assert "max_batch_rows: has 65 rows, the limit is 64" in results[1].reason
        assert "max_batch_bytes" in results[3].reason and "the limit is 1000" in results[3].reason
        assert client.get_model("rows").step == 3
        with pytest.raises(ResourceExhausted, match="max_batch_rows"):
            client.predict("rows", too_many[0])
        with pytest.raises(ResourceExhausted, match="max_batch_bytes"):
            client.gradients("rows", *_rows(64))
        assert client.predict("rows", small[0]).shape == (8, 1)


def test_model_count_and_size_limits(limited: BackgroundServer) -> None:
    with Client(limited.target, max_message_bytes=MESSAGE_LIMIT) as client:
        huge = {"architecture": {"kind": "linear", "in_features": 2**40, "out_features": 2**20}}
        start = time.perf_counter()
        with pytest.raises(ResourceExhausted, match="max_model_parameters") as failure:
            client.create_model("huge", huge)
        assert "the limit is 10000" in str(failure.value)
        assert time.perf_counter() - start < 10  # counted, never allocated
        mlp = {
            "architecture": {"kind": "mlp", "in_features": 4, "out_features": 1, "hidden": [5000]}
        }
        with pytest.raises(ResourceExhausted, match="max_model_parameters"):
            client.create_model("wide", mlp)
        existing = len(client.list_models())
        for i in range(6 - existing):
            client.create_model(f"filler{i}", SPEC)
        with pytest.raises(ResourceExhausted, match="max_models: the server holds 6 models"):
            client.create_model("one-too-many", SPEC)
        client.delete_model("filler0")
        client.create_model("one-too-many", SPEC)  # freed room is usable again
        for info in client.list_models():  # leave room for the other tests here
            if info.name.startswith(("filler", "one-too-many")):
                client.delete_model(info.name)


def test_message_size_limit_server_side(limited: BackgroundServer) -> None:
    with grpc.insecure_channel(limited.target) as channel:
        raw = channel.unary_unary("/gradstream.v1.TrainerService/Predict", None, None)
        with pytest.raises(grpc.RpcError) as failure:
            raw(b"\x0a\x01a" + b"\x12\x00" * (MESSAGE_LIMIT // 2 + 10), timeout=20)
        assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert str(MESSAGE_LIMIT) in (failure.value.details() or "")
    with Client(limited.target, max_message_bytes=MESSAGE_LIMIT) as client:
        assert client.list_models() is not None  # still serving


def test_sdk_refuses_a_batch_over_the_message_limit_and_packs_the_rest_below_it(
    limited: BackgroundServer,
) -> None:
    with Client(limited.target, max_message_bytes=MESSAGE_LIMIT) as client:
        client.create_model("packed", SPEC)
        x, y = _rows(60)
        # 4,000 batches of 320 tensor bytes: ~1.7 MB, more than one message may hold.
        batches = [(x[:16], y[:16])] * 4000
        results = list(
            client.train("packed", batches, batches_per_message=10**6, message_bytes=10**9)
        )
        assert len(results) == 4000 and {r.outcome for r in results} == {"APPLIED"}
        big = np.zeros((MESSAGE_LIMIT // 16, 4), np.float32)
        seen = []
        with pytest.raises(
            ResourceExhausted, match=f"max_message_bytes={MESSAGE_LIMIT}"
        ) as failure:
            for result in client.train(
                "packed", [(x[:8], y[:8]), (big, big[:, :1]), (x[:8], y[:8])]
            ):
                seen.append(result)
        assert "batch 1:" in str(failure.value)
        # The batch before the refused one was sent and applied; nothing after it.
        assert [r.outcome for r in seen] == ["APPLIED"]
        assert client.get_model("packed").step == 4001


def test_a_batch_whose_activations_would_exceed_the_limit_is_refused_before_it_runs() -> None:
    """mlp 1 -> [4096] -> 1: 2000 rows are 8 KB on the wire and about 130 MB of
    activations; the limit here is 100 MB (the default, 2 GiB, stops 1,000,000 rows)."""
    layers = {"kind": "mlp", "in_features": 1, "out_features": 1, "hidden": [4096]}
    wide = {"architecture": layers}
    settings = server_settings(max_activation_bytes=100_000_000)
    x, y = np.ones((2000, 1), np.float32), np.ones((2000, 1), np.float32)
    with BackgroundServer(settings) as server, Client(server.target) as client:
        client.create_model("wide", wide)
        before = client.parameters("wide")
        [result] = list(client.train("wide", [(x, y)], skip_rejected=True))
        assert result.outcome == "REJECTED"
        assert "max_activation_bytes" in result.reason
        with pytest.raises(ResourceExhausted, match="max_activation_bytes"):
            client.predict("wide", x)
        with pytest.raises(ResourceExhausted, match="max_activation_bytes"):
            client.gradients("wide", x, y)
        after = client.parameters("wide")
        assert all(before[k].tobytes() == after[k].tobytes() for k in before)
        assert client.predict("wide", x[:100]).shape == (100, 1)  # within it: served


def test_embedding_tables_count_toward_the_parameter_limit(limited: BackgroundServer) -> None:
    table = {"input": "user", "num_embeddings": 2**40, "dim": 64}
    spec = {"architecture": {"kind": "embedding_mlp", "embeddings": [table], "out_features": 1}}
    with Client(limited.target, max_message_bytes=MESSAGE_LIMIT) as client:
        start = time.perf_counter()
        with pytest.raises(ResourceExhausted, match="max_model_parameters"):
            client.create_model("big-table", spec)
        assert time.perf_counter() - start < 10  # counted, never allocated
        assert "big-table" not in [m.name for m in client.list_models()]
        table["num_embeddings"] = 10
        client.create_model("small-table", spec)  # within the limit


def test_evaluate_streams_count_toward_the_stream_limit(limited: BackgroundServer) -> None:
    """Each open Evaluate holds its scores: past max_streams the next is refused at once."""
    with Client(limited.target, max_message_bytes=MESSAGE_LIMIT) as client:
        client.create_model("judged", SPEC)
    release = threading.Event()
    x, y = _rows(2)

    def held() -> Iterator[pb.EvaluateRequest]:
        first = pb.EvaluateRequest(open=pb.EvaluateOpen(model="judged"))
        first.batches.add(x=to_proto(x), y=to_proto(y))
        yield first
        release.wait(30)

    channel = grpc.insecure_channel(limited.target)
    stub = pb_grpc.TrainerServiceStub(channel)
    try:
        futures = [stub.Evaluate.future(held()) for _ in range(MAX_STREAMS)]
        deadline = time.monotonic() + 10
        while limited.server.streams.active < MAX_STREAMS and time.monotonic() < deadline:
            time.sleep(0.01)
        assert limited.server.streams.active == MAX_STREAMS
        with pytest.raises(grpc.RpcError) as refused:
            stub.Evaluate(held(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_streams: 4" in str(refused.value.details())
        release.set()
        for future in futures:
            future.result(timeout=10)
        deadline = time.monotonic() + 10
        while limited.server.streams.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert limited.server.streams.active == 0
        # Under the limit again, an Evaluate with a batch answers.
        with Client(limited.target, max_message_bytes=MESSAGE_LIMIT) as client:
            assert client.evaluate("judged", [(x, y)])["rows"] == 2
    finally:
        release.set()
        channel.close()
