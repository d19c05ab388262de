"""The metrics port of a real server: the grpc_server_* family, sampling, cardinality."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from gradstream.client import Client, NotFound
from gradstream.server.main import BackgroundServer
from gradstream.v1 import trainer_pb2 as pb
from gradstream.v1 import trainer_pb2_grpc as pb_grpc
from tests.conftest import server_settings

Series = tuple[str, frozenset[tuple[str, str]]]
TRAINER = "gradstream.v1.TrainerService"
SEED = {
    "architecture": {"kind": "linear", "in_features": 1, "out_features": 1, "bias": False},
    "init": {"kind": "zeros"},
    "loss": {"kind": "mse"},
    "optimizer": {"kind": "sgd", "lr": 0.01},
}


def scrape(server: BackgroundServer) -> dict[Series, float]:
    """Every sample on the server's metrics port."""
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def rpc(samples: dict[Series, float], name: str, method: str, **labels: str) -> float:
    """One grpc_server_* sample of a method."""
    service = labels.pop("service", TRAINER)
    key = frozenset({"grpc_service": service, "grpc_method": method, **labels}.items())
    matches = [v for (n, ls), v in samples.items() if n == name and key <= ls]
    assert len(matches) == 1, (name, method, labels, matches)
    return matches[0]


def delta(
    before: dict[Series, float], after: dict[Series, float], name: str, method: str, **labels: str
) -> float:
    return rpc(after, name, method, **labels) - rpc(before, name, method, **labels)


@pytest.fixture
def channel(server: BackgroundServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


def test_metrics_have_their_own_port(server: BackgroundServer) -> None:
    assert server.server.metrics_port not in (0, server.port, server.server.health_port)
    assert scrape(server)


def test_a_train_stream_counts_every_message_both_ways(
    server: BackgroundServer, client: Client, name: str
) -> None:
    client.create_model(name, SEED)
    x = np.array([[1.0], [2.0]], np.float32)
    before = scrape(server)
    results = list(client.train(name, [(x, 2 * x)] * 5, batches_per_message=1))
    after = scrape(server)
    assert len(results) == 5
    labels = {"grpc_type": "bidi_stream"}
    assert delta(before, after, "grpc_server_started_total", "Train", **labels) == 1
    assert delta(before, after, "grpc_server_handled_total", "Train", grpc_code="OK") == 1
    # the opener and five batch messages in; the opened reply and five result messages out
    assert delta(before, after, "grpc_server_msg_received_total", "Train") == 6
    assert delta(before, after, "grpc_server_msg_sent_total", "Train") == 6
    assert delta(before, after, "grpc_server_handling_seconds_count", "Train") == 1


def test_handled_counts_the_status_the_client_sees(
    server: BackgroundServer, client: Client, channel: grpc.Channel
) -> None:
    before = scrape(server)
    with pytest.raises(NotFound):  # GradstreamError, mapped by ErrorInterceptor
        client.get_model("no-such-model")
    stub = pb_grpc.TrainerServiceStub(channel)
    with pytest.raises(grpc.RpcError) as invalid:  # raised inside the Train generator
        list(stub.Train(iter([pb.TrainRequest()])))
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    health = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.RpcError) as unknown:  # grpc.health's own context.abort
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    after = scrape(server)
    assert delta(before, after, "grpc_server_handled_total", "GetModel", grpc_code="NOT_FOUND") == 1
    assert delta(before, after, "grpc_server_msg_sent_total", "GetModel") == 0
    assert (
        delta(before, after, "grpc_server_handled_total", "Train", grpc_code="INVALID_ARGUMENT")
        == 1
    )
    health_labels = {"service": "grpc.health.v1.Health", "grpc_code": "NOT_FOUND"}
    assert delta(before, after, "grpc_server_handled_total", "Check", **health_labels) == 1


def test_an_unknown_method_adds_no_series(server: BackgroundServer, channel: grpc.Channel) -> None:
    before = scrape(server)
    call = channel.unary_unary(f"/{TRAINER}/NoSuchMethod", None, None)
    with pytest.raises(grpc.RpcError) as error:
        call(b"")
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert scrape(server).keys() == before.keys()


def test_weights_on_the_metrics_port_are_the_models_after_a_sampling_step(
    server: BackgroundServer, client: Client, name: str
) -> None:
    client.create_model(name, SEED)
    x = np.array([[1.0], [2.0], [3.0], [4.0]], np.float32)
    for _ in range(2):  # steps 1..10 in one message, then 11..20: both pass a multiple of 10
        list(client.train(name, [(x, 2 * x)] * 10))
        samples = scrape(server)
        key = frozenset({"model": name, "parameter": "weight", "index": "0,0"}.items())
        weight = float(client.parameters(name)["weight"].item())
        assert samples[("gradstream_parameter_value", key)] == weight
    grads = client.parameters(name, gradients=True)["weight.grad"]
    norm_key = frozenset({"model": name, "parameter": "weight"}.items())
    assert samples[("gradstream_gradient_norm", norm_key)] == pytest.approx(
        float(np.linalg.norm(grads)), rel=1e-6
    )
    # five more steps pass no multiple of 10: the sample stays at step 20
    list(client.train(name, [(x, 2 * x)] * 5))
    assert scrape(server)[("gradstream_parameter_value", key)] == weight


def _bad_batches(count: int) -> Iterator[tuple[Any, Any] | tuple[Any, Any, Any]]:
    """Invalid batches, each different: non-finite values, wrong shapes, bad weights."""
    for i in range(count):
        match i % 4:
            case 0:
                yield np.array([[np.nan if i % 8 else np.inf]], np.float32), np.ones((1, 1), "f4")
            case 1:
                yield np.ones((1, 2 + i), np.float32), np.ones((1, 1), np.float32)
            case 2:
                yield np.ones((2, 1), np.float32), np.full((3 + i, 1), float(i), np.float32)
            case _:
                yield (
                    np.ones((1, 1), np.float32),
                    np.ones((1, 1), np.float32),
                    np.array([-float(i)], np.float32),
                )


def test_bad_batches_and_unknown_models_add_no_series(
    server: BackgroundServer, client: Client, name: str, channel: grpc.Channel
) -> None:
    client.create_model(name, SEED)
    x = np.ones((1, 1), np.float32)
    list(client.train(name, [(x, x)]))
    before = scrape(server)

    results = list(client.train(name, _bad_batches(1000), skip_rejected=True))
    assert [r.outcome for r in results] == ["REJECTED"] * 1000
    assert len({r.reason for r in results}) > 500  # the messages do differ
    stub = pb_grpc.TrainerServiceStub(channel)
    for i in range(1000):
        ghost = f"ghost-{i}"
        with pytest.raises(grpc.RpcError) as error:
            if i % 2:
                stub.GetModel(pb.GetModelRequest(name=ghost), timeout=10)
            else:
                opener = pb.TrainRequest(open=pb.TrainOpen(model=ghost))
                list(stub.Train(iter([opener]), timeout=10))
        assert error.value.code() == grpc.StatusCode.NOT_FOUND

    after = scrape(server)
    assert after.keys() == before.keys()
    rejected = sum(
        after[key] - before[key]
        for key in after
        if key[0] == "gradstream_train_batches_rejected_total" and ("model", name) in key[1]
    )
    assert rejected == 1000
    not_found = {"grpc_code": "NOT_FOUND"}
    assert delta(before, after, "grpc_server_handled_total", "GetModel", **not_found) == 500
    assert delta(before, after, "grpc_server_handled_total", "Train", **not_found) == 500


def test_without_a_metrics_port_nothing_is_recorded() -> None:
    settings = server_settings()
    with BackgroundServer(settings) as server, Client(server.target) as client:
        client.create_model("m", SEED)
        x = np.ones((1, 1), np.float32)
        assert len(list(client.train("m", [(x, x)] * 10))) == 10
        metrics = server.server.metrics
        assert server.server.metrics_port == 0
        assert (
            metrics.registry.get_sample_value("gradstream_train_steps_total", {"model": "m"}) == 0
        )
        assert (
            metrics.registry.get_sample_value(
                "grpc_server_started_total",
                {"grpc_type": "bidi_stream", "grpc_service": TRAINER, "grpc_method": "Train"},
            )
            is None
        )


def test_metrics_bind_to_loopback_even_when_grpc_listens_on_every_interface() -> None:
    """/metrics serves model names and weights without tokens: --host does not move it."""
    settings = server_settings(host="0.0.0.0", insecure=True, metrics_port=0)
    with BackgroundServer(settings) as server:
        assert server.server._metrics_http.server_address[0] == "127.0.0.1"
    moved = server_settings(metrics_host="::1", metrics_port=0)
    with BackgroundServer(moved) as server:
        assert server.server._metrics_http.server_address[0] == "::1"


def test_a_schedules_lr_and_the_pre_clip_norm_are_in_get_model_and_the_gauges(
    server: BackgroundServer, client: Client, name: str
) -> None:
    spec = SEED | {
        "optimizer": {"kind": "adam", "lr": 0.1},
        "schedule": {"kind": "step", "step_size": 2, "gamma": 0.5},
        "clip_grad": {"max_norm": 1e-3},
    }
    created = client.create_model(name, spec)
    model = frozenset({"model": name}.items())
    assert created.lr == scrape(server)[("gradstream_learning_rate", model)] == 0.1
    x, y = np.ones((2, 1), np.float32), np.full((2, 1), 3.0, np.float32)
    list(client.train(name, [(x, y)] * 3))
    w = float(client.parameters(name)["weight"].item())
    list(client.train(name, [(x, y)]))
    samples = scrape(server)
    assert client.get_model(name).lr == samples[("gradstream_learning_rate", model)] == 0.025
    # The last step's gradient before clipping: d/dw mean((w*1 - 3)^2) at the w it had.
    assert abs(samples[("gradstream_grad_norm", model)] - abs(2 * (w - 3))) < 1e-5
    updated = client.update_model(name, lr=0.3)
    assert updated.lr == scrape(server)[("gradstream_learning_rate", model)] == 0.3
    client.delete_model(name)
    assert ("gradstream_grad_norm", model) not in scrape(server)
