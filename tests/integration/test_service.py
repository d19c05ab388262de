"""Every RPC of TrainerService through the SDK against a real server."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import torch

from gradstream.client import (
    AlreadyExists,
    Client,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from gradstream.server.main import BackgroundServer
from tests.conftest import server_settings

LINEAR = {
    "architecture": {"kind": "linear", "in_features": 1, "out_features": 1, "bias": False},
    "init": {"kind": "zeros"},
    "optimizer": {"kind": "sgd", "lr": 0.01},
}
MLP = {
    "architecture": {
        "kind": "mlp",
        "in_features": 3,
        "hidden": [4],
        "out_features": 2,
        "activation": "tanh",
    },
    "init": {"kind": "seed", "seed": 7},
    "optimizer": {"kind": "sgd", "lr": 0.05, "momentum": 0.9},
}


def test_compute_gradients_equals_the_notebooks_numpy_gradient_over_n(
    client: Client, name: str
) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 1)).astype(np.float32)
    y = (3 * x + rng.normal(size=(8, 1))).astype(np.float32)
    spec = {**LINEAR, "init": {"kind": "tensors", "tensors": {"weight": [[0.5]]}}}
    client.create_model(name, spec)
    grads = client.gradients(name, x, y)
    # The notebook's gradient: np.dot(2x, y_hat - y), a sum over samples; mean reduction / N.
    y_hat = 0.5 * x
    oracle = np.dot(2 * x.ravel(), (y_hat - y).ravel()) / len(x)
    np.testing.assert_allclose(grads["weight"].item(), oracle, rtol=1e-5)
    # Nothing stepped, nothing accumulated.
    params = client.parameters(name, gradients=True)
    assert params["weight"].item() == 0.5
    assert "weight.grad" not in params
    assert client.get_model(name).step == 0


def test_compute_gradients_with_grad_output_is_the_vector_jacobian_product(
    client: Client, name: str
) -> None:
    info = client.create_model(name, MLP)
    assert info.step == 0
    params = client.parameters(name)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 3)).astype(np.float32)
    v = rng.normal(size=(5, 2)).astype(np.float32)
    got = client.gradients(name, x, grad_output=v)

    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    module.load_state_dict({k: torch.from_numpy(a.copy()) for k, a in params.items()})
    expected = torch.autograd.grad(
        module(torch.from_numpy(x)), list(module.parameters()), grad_outputs=torch.from_numpy(v)
    )
    for (n, _), e in zip(module.named_parameters(), expected, strict=True):
        assert got[n].tobytes() == e.numpy().tobytes(), n


def test_compute_gradients_needs_exactly_one_of_y_and_grad_output(
    client: Client, name: str
) -> None:
    client.create_model(name, LINEAR)
    x = np.ones((2, 1), np.float32)
    with pytest.raises(InvalidArgument, match="exactly one of y"):
        client.gradients(name, x)
    with pytest.raises(InvalidArgument, match="grad_output"):
        client.gradients(name, x, grad_output=np.ones((3, 1), np.float32))


def test_get_model_shows_spec_step_device_shapes_frozen_and_grad_fn_chain(
    client: Client, name: str
) -> None:
    client.create_model(name, {**MLP, "frozen": ["0.bias"]})
    info = client.get_model(name)
    assert info.device == "cpu"
    assert info.spec["architecture"]["hidden"] == [4]
    assert info.spec["optimizer"]["momentum"] == pytest.approx(0.9)
    assert info.spec["accumulate_steps"] == 1  # defaults are filled in
    assert {n: p.shape for n, p in info.parameters.items()} == {
        "0.weight": (4, 3),
        "0.bias": (4,),
        "2.weight": (2, 4),
        "2.bias": (2,),
    }
    assert [n for n, p in info.parameters.items() if p.frozen] == ["0.bias"]
    assert info.autograd_chain[0] == "MseLossBackward0"
    assert "TanhBackward0" in info.autograd_chain
    assert info.autograd_chain.count("AccumulateGrad") == 3  # the frozen bias has none


def test_list_and_delete_models(client: Client, name: str) -> None:
    client.create_model(name, LINEAR)
    assert name in {m.name for m in client.list_models()}
    with pytest.raises(AlreadyExists, match=name):
        client.create_model(name, LINEAR)
    client.delete_model(name)
    assert name not in {m.name for m in client.list_models()}
    with pytest.raises(NotFound, match=name):
        client.get_model(name)


def test_predict_is_the_model_output(client: Client, name: str) -> None:
    client.create_model(name, MLP)
    params = client.parameters(name)
    x = np.random.default_rng(2).normal(size=(6, 3)).astype(np.float32)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    module.load_state_dict({k: torch.from_numpy(a.copy()) for k, a in params.items()})
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    got = client.predict(name, x)
    assert got.shape == (6, 2)
    assert got.tobytes() == expected.tobytes()
    # Torch tensors go in too (detached by the SDK), numpy comes out.
    tensor_input = torch.from_numpy(x).requires_grad_(True)
    assert client.predict(name, tensor_input).tobytes() == expected.tobytes()


def test_update_model_learning_rate_freeze_and_unfreeze(client: Client, name: str) -> None:
    spec = {
        "architecture": {"kind": "linear", "in_features": 2, "out_features": 1},
        "init": {"kind": "zeros"},
        "optimizer": {"kind": "sgd", "lr": 0.1},
    }
    client.create_model(name, spec)
    x, y = np.ones((4, 2), np.float32), np.ones((4, 1), np.float32)
    info = client.update_model(name, lr=0.5, freeze=["bias"])
    assert info.spec["optimizer"]["lr"] == 0.5
    assert info.parameters["bias"].frozen
    list(client.train(name, [(x, y)]))
    after = client.parameters(name)
    assert after["bias"].item() == 0.0  # requires_grad_(False): never moves
    # dL/dw = 2 (0 - 1) * 1 = -2 per weight; one step at lr 0.5 gives 1.0.
    np.testing.assert_array_equal(after["weight"], [[1.0, 1.0]])
    info = client.update_model(name, unfreeze=["bias"])
    assert not info.parameters["bias"].frozen
    list(client.train(name, [(x, y)]))
    assert client.parameters(name)["bias"].item() != 0.0
    with pytest.raises(InvalidArgument, match="freeze: no parameter named 'nope'"):
        client.update_model(name, freeze=["nope"])
    with pytest.raises(InvalidArgument, match="lr"):
        client.update_model(name, lr=float("nan"))


def test_freezing_mid_accumulation_drops_the_frozen_gradient(client: Client, name: str) -> None:
    spec = {
        "architecture": {"kind": "linear", "in_features": 1, "out_features": 1},
        "init": {"kind": "zeros"},
        "optimizer": {"kind": "sgd", "lr": 0.1},
        "accumulate_steps": 2,
    }
    client.create_model(name, spec)
    x, y = np.ones((1, 1), np.float32), np.ones((1, 1), np.float32)
    assert [r.outcome for r in client.train(name, [(x, y)])] == ["ACCUMULATED"]
    client.update_model(name, freeze=["bias"])
    assert [r.outcome for r in client.train(name, [(x, y)])] == ["APPLIED"]
    assert client.parameters(name)["bias"].item() == 0.0


def test_set_parameters_is_all_or_nothing(client: Client, name: str) -> None:
    client.create_model(name, MLP)
    before = client.parameters(name)
    with pytest.raises(InvalidArgument, match=r"parameters\[2.bias\].*shape \[3\]"):
        client.set_parameters(
            name, {"0.bias": np.ones(4, np.float32), "2.bias": np.ones(3, np.float32)}
        )
    assert all(client.parameters(name)[n].tobytes() == before[n].tobytes() for n in before)
    client.set_parameters(name, {"0.bias": np.arange(4, dtype=np.float32)})
    np.testing.assert_array_equal(client.parameters(name)["0.bias"], [0, 1, 2, 3])


def test_sample_weights_weight_the_mean(client: Client, name: str) -> None:
    client.create_model(name, LINEAR)
    x = np.array([[1.0], [2.0]], np.float32)
    y = np.array([[1.0], [5.0]], np.float32)
    w = np.array([3.0, 1.0], np.float32)
    (result,) = client.train(name, [(x, y, w)])
    # w = 0: per-row losses 1 and 25; (3 * 1 + 1 * 25) / 4 = 7.
    assert result.loss == 7.0


def test_report_every_reads_the_loss_back_only_at_reporting_batches(
    client: Client, name: str
) -> None:
    client.create_model(name, LINEAR)
    x, y = np.ones((2, 1), np.float32), np.ones((2, 1), np.float32)
    results = list(client.train(name, [(x, y)] * 7, report_every=3))
    assert [r.loss is not None for r in results] == [False, False, True, False, False, True, False]
    assert [r.step for r in results] == list(range(1, 8))
    assert [r.sequence for r in results] == list(range(1, 8))


def test_nonfinite_steps_are_skipped_and_the_model_untouched(client: Client, name: str) -> None:
    spec = {**LINEAR, "optimizer": {"kind": "sgd", "lr": 0.1, "momentum": 0.9}}
    client.create_model(name, spec)
    x, y = np.ones((1, 1), np.float32), np.ones((1, 1), np.float32)
    list(client.train(name, [(x, y)]))
    before = client.parameters(name)
    # Finite inputs whose loss overflows float32: (0.1 * 3e38 - 1) ** 2 is inf.
    huge = np.full((1, 1), 3e38, np.float32)
    (skipped,) = client.train(name, [(huge, y)], skip_rejected=True)
    assert skipped.outcome == "SKIPPED_NONFINITE"
    assert "not finite" in skipped.reason
    assert client.parameters(name)["weight"].tobytes() == before["weight"].tobytes()
    assert client.get_model(name).step == 1
    (applied,) = client.train(name, [(x, y)])
    assert applied.outcome == "APPLIED" and applied.step == 2


def test_divergence_guard_refuses_training_until_parameters_are_set(name: str) -> None:
    settings = server_settings(max_nonfinite_steps=2)
    with BackgroundServer(settings) as server, Client(server.target) as client:
        client.create_model(name, LINEAR)
        y = np.ones((1, 1), np.float32)
        client.set_parameters(name, {"weight": np.full((1, 1), 1e30, np.float32)})
        x = np.full((1, 1), 1e30, np.float32)
        outcomes = [r.outcome for r in client.train(name, [(x, y)] * 2)]
        assert outcomes == ["SKIPPED_NONFINITE"] * 2
        with pytest.raises(FailedPrecondition, match="diverged"):
            list(client.train(name, [(np.ones((1, 1), np.float32), y)]))
        client.set_parameters(name, {"weight": np.zeros((1, 1), np.float32)})
        assert [r.outcome for r in client.train(name, [(np.ones((1, 1), np.float32), y)])] == [
            "APPLIED"
        ]


def test_many_streams_on_one_model_apply_every_batch_once(client: Client, name: str) -> None:
    # Loss sum of (w x - y) with y far away: each batch adds exactly lr * x to w.
    spec = {
        "architecture": {"kind": "linear", "in_features": 1, "out_features": 1, "bias": False},
        "init": {"kind": "zeros"},
        "loss": {"kind": "l1", "reduction": "sum"},
        "optimizer": {"kind": "sgd", "lr": 1.0},
        "dtype": "float64",
    }
    client.create_model(name, spec)
    x, y = np.ones((1, 1)), np.full((1, 1), 1e9)
    streams, per_stream = 6, 50
    outcomes: list[list[str]] = []

    def produce() -> None:
        outcomes.append([r.outcome for r in client.train(name, [(x, y)] * per_stream)])

    threads = [threading.Thread(target=produce) for _ in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [len(o) for o in outcomes] == [per_stream] * streams
    assert client.get_model(name).step == streams * per_stream
    assert client.parameters(name)["weight"].item() == streams * per_stream


def test_producer_sequences_answer_duplicates(server: BackgroundServer, name: str) -> None:
    # The wire's exactly-once contract, spoken directly: a re-sent sequence is DUPLICATE.
    from gradstream.v1 import trainer_pb2 as pb
    from gradstream.wire import to_proto

    with Client(server.target) as client:
        client.create_model(name, LINEAR)
        x, y = np.ones((1, 1), np.float32), np.ones((1, 1), np.float32)

        def batch(sequence: int) -> pb.Batch:
            return pb.Batch(x=to_proto(x), y=to_proto(y), sequence=sequence)

        def stream(*sequences: int) -> list[Any]:
            requests = [
                pb.TrainRequest(open=pb.TrainOpen(model=name, producer_id="p1")),
                pb.TrainRequest(batches=[batch(s) for s in sequences]),
            ]
            return list(client._stub.Train(iter(requests)))

        first = stream(1, 2, 3)
        assert first[0].opened.last_applied_sequence == 0
        second = stream(2, 3, 4)
        assert second[0].opened.last_applied_sequence == 3
        outcomes = [pb.Outcome.Name(r.outcome) for r in second[1].results]
        assert outcomes == ["OUTCOME_DUPLICATE", "OUTCOME_DUPLICATE", "OUTCOME_APPLIED"]
        assert client.get_model(name).step == 4
