"""Bad input: the right code or outcome, a message naming the field, the model bitwise unchanged."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

from gradstream.client import BatchRejected, Client, GradstreamError, SpecError
from gradstream.server.main import BackgroundServer
from gradstream.v1 import trainer_pb2 as pb
from gradstream.wire import to_proto

SPEC = {
    "architecture": {"kind": "mlp", "in_features": 2, "hidden": [3], "out_features": 3},
    "loss": {"kind": "cross_entropy"},
    "optimizer": {"kind": "sgd", "lr": 0.1, "momentum": 0.9},
}
GOOD_X = np.ones((4, 2), np.float32)
GOOD_Y = np.array([0, 1, 2, 1], np.int64)


def _tensor(array: Any, **override: Any) -> pb.Tensor:
    tensor = to_proto(array)
    for key, value in override.items():
        if key == "shape":
            tensor.shape[:] = value
        else:
            setattr(tensor, key, value)
    return tensor


# (case, x, y, field named in the message)
BAD_BATCHES: list[tuple[str, pb.Tensor, pb.Tensor, str]] = [
    ("wrong shape", _tensor(np.ones((4, 3), np.float32)), _tensor(GOOD_Y), "x"),
    ("wrong dtype", _tensor(np.ones((4, 2), np.int64)), _tensor(GOOD_Y), "x"),
    ("unknown dtype code", _tensor(GOOD_X, dtype=99), _tensor(GOOD_Y), "x.dtype"),
    ("byte length", _tensor(GOOD_X, data=b"\0" * 7), _tensor(GOOD_Y), "x.data"),
    ("negative dim", _tensor(GOOD_X, shape=[-4, -2]), _tensor(GOOD_Y), "x.shape"),
    ("nan in x", _tensor(np.array([[np.nan, 1]] * 4, np.float32)), _tensor(GOOD_Y), "x"),
    ("inf in x", _tensor(np.array([[np.inf, 1]] * 4, np.float32)), _tensor(GOOD_Y), "x"),
    # Finite as float64, infinite in the float32 model.
    ("inf as float32", _tensor(np.array([[1e300, 1]] * 4)), _tensor(GOOD_Y), "x"),
    ("empty batch", _tensor(np.ones((0, 2), np.float32)), _tensor(np.ones(0, np.int64)), "x"),
    ("label out of range", _tensor(GOOD_X), _tensor(np.array([0, 1, 3, 1])), "y"),
    ("negative label", _tensor(GOOD_X), _tensor(np.array([0, -1, 2, 1])), "y"),
    ("float labels", _tensor(GOOD_X), _tensor(GOOD_Y.astype(np.float32)), "y"),
    ("rows differ", _tensor(GOOD_X), _tensor(GOOD_Y[:3]), "y"),
]


def snapshot(server: BackgroundServer, client: Client, name: str) -> tuple[dict[str, bytes], Any]:
    """Parameter bytes through the API, optimizer state bytes from the live trainer."""
    params = {n: a.tobytes() for n, a in client.parameters(name, gradients=True).items()}
    optimizer = server.server.registry.get(name).trainer.optimizer
    state = {
        id_: {k: v.numpy().tobytes() for k, v in s.items()}
        for id_, s in enumerate(
            optimizer.state[p] for group in optimizer.param_groups for p in group["params"]
        )
    }
    return params, state


@pytest.fixture
def trained(client: Client, name: str) -> str:
    client.create_model(name, SPEC)
    list(client.train(name, [(GOOD_X, GOOD_Y)] * 2))  # momentum buffers exist
    return name


@pytest.mark.parametrize(("case", "x", "y", "field"), BAD_BATCHES, ids=[b[0] for b in BAD_BATCHES])
def test_bad_batch_in_train_is_rejected_alone(
    server: BackgroundServer,
    client: Client,
    trained: str,
    case: str,
    x: pb.Tensor,
    y: pb.Tensor,
    field: str,
) -> None:
    before = snapshot(server, client, trained)
    requests = [
        pb.TrainRequest(open=pb.TrainOpen(model=trained)),
        pb.TrainRequest(batches=[pb.Batch(x=x, y=y)]),
    ]
    responses = list(client._stub.Train(iter(requests)))
    (result,) = responses[1].results
    assert pb.Outcome.Name(result.outcome) == "OUTCOME_REJECTED"
    assert result.reason.startswith(f"batches[0].{field}"), result.reason
    assert snapshot(server, client, trained) == before
    # The stream and the server go on: a good batch after a bad one is applied.
    outcomes = [r.outcome for r in client.train(trained, [(GOOD_X, GOOD_Y)])]
    assert outcomes == ["APPLIED"]


@pytest.mark.parametrize(("case", "x", "y", "field"), BAD_BATCHES, ids=[b[0] for b in BAD_BATCHES])
def test_bad_input_to_compute_gradients_is_invalid_argument(
    server: BackgroundServer,
    client: Client,
    trained: str,
    case: str,
    x: pb.Tensor,
    y: pb.Tensor,
    field: str,
) -> None:
    before = snapshot(server, client, trained)
    with pytest.raises(grpc.RpcError) as caught:
        client._stub.ComputeGradients(pb.ComputeGradientsRequest(name=trained, x=x, y=y))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details() or ""
    assert details.startswith(field), details
    assert snapshot(server, client, trained) == before


def test_sdk_raises_batch_rejected_naming_the_field(client: Client, trained: str) -> None:
    with pytest.raises(
        BatchRejected, match=r"batches\[0\]\.x: has shape \[4, 3\], the model expects"
    ):
        list(client.train(trained, [(np.ones((4, 3), np.float32), GOOD_Y)]))
    results = list(
        client.train(
            trained,
            [(GOOD_X, GOOD_Y), (np.ones((4, 3), np.float32), GOOD_Y), (GOOD_X, GOOD_Y)],
            skip_rejected=True,
        )
    )
    assert [r.outcome for r in results] == ["APPLIED", "REJECTED", "APPLIED"]


UNKNOWN_MODEL_CALLS: list[tuple[str, Callable[[Client], Any]]] = [
    ("get", lambda c: c.get_model("no-such-model")),
    ("delete", lambda c: c.delete_model("no-such-model")),
    ("update", lambda c: c.update_model("no-such-model", lr=0.1)),
    ("predict", lambda c: c.predict("no-such-model", GOOD_X)),
    ("gradients", lambda c: c.gradients("no-such-model", GOOD_X, GOOD_Y)),
    ("parameters", lambda c: c.parameters("no-such-model")),
    ("set", lambda c: c.set_parameters("no-such-model", {})),
    ("train", lambda c: list(c.train("no-such-model", [(GOOD_X, GOOD_Y)]))),
]


@pytest.mark.parametrize(
    ("case", "call"), UNKNOWN_MODEL_CALLS, ids=[c[0] for c in UNKNOWN_MODEL_CALLS]
)
def test_unknown_model_is_not_found(
    client: Client, case: str, call: Callable[[Client], Any]
) -> None:
    with pytest.raises(GradstreamError) as caught:
        call(client)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in caught.value.details


def test_message_over_the_size_limit_is_resource_exhausted(
    server: BackgroundServer, client: Client, trained: str
) -> None:
    before = snapshot(server, client, trained)
    limit = server.server.settings.max_message_bytes
    big = np.ones((limit // 8 + 1, 2), np.float32)  # just over the limit in bytes
    with pytest.raises(GradstreamError) as caught:
        client.predict(trained, big)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(limit) in caught.value.details
    with pytest.raises(GradstreamError) as caught:
        list(client.train(trained, [(big, np.zeros(len(big), np.int64))]))
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert snapshot(server, client, trained) == before
    assert client.predict(trained, GOOD_X).shape == (4, 3)  # still serving


# Optimizer, schedule and clipping fields, each on a linear model.
_BAD_TRAINING_SPECS: list[tuple[dict[str, Any], str]] = [
    ({"optimizer": {"kind": "nadam"}}, "spec.optimizer.kind: unknown optimizer"),
    (
        {"optimizer": {"kind": "adam", "betas": [0.9, 1.0]}},
        "spec.optimizer.betas.1: Input should be less than 1 (got 1.0)",
    ),
    ({"optimizer": {"kind": "adam", "nesterov": True}}, "spec.optimizer.nesterov"),
    (
        {"optimizer": {"kind": "rmsprop", "alpha": -0.5}},
        "spec.optimizer.alpha: Input should be greater than or equal to 0 (got -0.5)",
    ),
    (
        {"schedule": {"kind": "cosine", "t_max": 5}},
        "spec.schedule.kind: unknown schedule",
    ),
    (
        {"schedule": {"kind": "step", "step_size": -2}},
        "spec.schedule.step_size: Input should be greater than 0 (got -2)",
    ),
    (
        {
            "schedule": {
                "kind": "sequential",
                "schedulers": [{"kind": "linear"}, {"kind": "exponential", "gamma": 2}],
                "milestones": [4, 8],
            }
        },
        "spec.schedule.milestones: 2 schedulers need 1 milestones, got [4, 8]",
    ),
    ({"clip_grad": {"max_norm": 0}}, "spec.clip_grad.max_norm"),
    ({"clip_grad": {"max_norm": 1, "value": 1}}, "spec.clip_grad.max_norm: give"),
]


BAD_SPECS: list[tuple[dict[str, Any], str]] = [
    (
        {"architecture": {"kind": "linear", "in_features": 0, "out_features": 1}},
        "spec.architecture.in_features",
    ),
    (
        {"architecture": {"kind": "resnet", "in_features": 1, "out_features": 1}},
        "spec.architecture.kind: unknown architecture 'resnet'",
    ),
    (
        {
            "architecture": {"kind": "linear", "in_features": 1, "out_features": 1},
            "loss": {"kind": "hinge"},
        },
        "spec.loss.kind",
    ),
    (
        {
            "architecture": {"kind": "linear", "in_features": 1, "out_features": 1},
            "optimizer": {"lr": -1.0},
        },
        "spec.optimizer.lr",
    ),
    (
        {
            "architecture": {"kind": "linear", "in_features": 1, "out_features": 1},
            "optimizer": {"nesterov": True},
        },
        "spec.optimizer.nesterov",
    ),
    (
        {
            "architecture": {"kind": "linear", "in_features": 1, "out_features": 1},
            "frozen": ["nope"],
        },
        "spec.frozen: no parameter named 'nope'",
    ),
    (
        {"architecture": {"kind": "linear", "in_features": 1, "out_features": 1}, "dtype": "int8"},
        "spec.dtype",
    ),
    (
        {
            "architecture": {"kind": "linear", "in_features": 1, "out_features": 1},
            "accumulate_steps": 0,
        },
        "spec.accumulate_steps",
    ),
    (
        {
            "architecture": {"kind": "linear", "in_features": 1, "out_features": 1},
            "loss": {"kind": "cross_entropy"},
        },
        "spec.loss.kind: cross_entropy needs out_features >= 2",
    ),
    (
        {
            "architecture": {"kind": "linear", "in_features": 2, "out_features": 1},
            "init": {"kind": "tensors", "tensors": {"weight": [[1.0]]}},
        },
        "spec.init.tensors[weight]: has shape [1, 1]",
    ),
    ({}, "spec.architecture: Field required"),
    *(
        (
            {
                "architecture": {"kind": "linear", "in_features": 1, "out_features": 1},
                "optimizer": {option: value},
            },
            f"spec.optimizer.{option}: Input should be a finite number",
        )
        for option, value in (
            ("lr", float("inf")),
            ("momentum", float("inf")),
            ("dampening", float("nan")),
            ("weight_decay", float("inf")),
        )
    ),
    (
        {
            "architecture": {"kind": "linear", "in_features": 1, "out_features": 1},
            "init": {"kind": "tensors", "tensors": {"weight": np.array([[1e300]])}},
        },
        "spec.init.tensors: 'weight' must be finite numbers in the model's dtype float32",
    ),
    *(
        ({"architecture": {"kind": "linear", "in_features": 1, "out_features": 1}, **bad}, message)
        for bad, message in _BAD_TRAINING_SPECS
    ),
]


@pytest.mark.parametrize(("spec", "message"), BAD_SPECS)
def test_bad_spec_is_invalid_argument_naming_the_field(
    client: Client, name: str, spec: dict[str, Any], message: str
) -> None:
    with pytest.raises(GradstreamError) as caught:
        client.create_model(name, spec)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details.startswith(message), caught.value.details
    assert name not in {m.name for m in client.list_models()}


def test_bad_model_name_is_invalid_argument(client: Client) -> None:
    with pytest.raises(GradstreamError) as caught:
        client.create_model(
            "../etc", {"architecture": {"kind": "linear", "in_features": 1, "out_features": 1}}
        )
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "name" in caught.value.details and "../etc" in caught.value.details


@pytest.mark.parametrize(
    "bad",
    [
        "victim\n",
        "victim\r",
        "victim\x00",
        "vic\ttim",
        "vict\u0456m",  # a Cyrillic i
        "\uff56ictim",  # a fullwidth v
        "victim\u200b",  # a zero-width space
    ],
)
def test_names_with_control_characters_or_look_alikes_are_refused(client: Client, bad: str) -> None:
    spec = {"architecture": {"kind": "linear", "in_features": 1, "out_features": 1}}
    with pytest.raises(GradstreamError) as caught:
        client.create_model(bad, spec)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert repr(bad) in caught.value.details
    assert bad not in {m.name for m in client.list_models()}


def test_values_finite_only_before_conversion_leave_the_model_as_it_was(
    server: BackgroundServer, client: Client, trained: str
) -> None:
    """1e300 is a finite float64 and an infinite float32: checked in the model's dtype."""
    before = snapshot(server, client, trained)
    huge_x = np.array([[1e300, 1.0]] * 4)
    with pytest.raises(GradstreamError) as caught:
        client.predict(trained, huge_x)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details.startswith("x: contains a non-finite value")
    params = client.parameters(trained)
    poisoned = {k: v.astype(np.float64) for k, v in params.items()}
    next(iter(poisoned.values())).flat[0] = 1e300
    with pytest.raises(GradstreamError) as caught:
        client.set_parameters(trained, poisoned)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "non-finite" in caught.value.details
    vector = np.full((4, 3), 1e300)
    with pytest.raises(GradstreamError) as caught:
        client.gradients(trained, GOOD_X, grad_output=vector)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details.startswith("grad_output: contains a non-finite value")
    assert snapshot(server, client, trained) == before


def test_unknown_spec_key_is_refused_by_the_sdk(client: Client, name: str) -> None:
    with pytest.raises(SpecError, match=r"spec\.optimizer\.lrate: unknown field"):
        client.create_model(
            name,
            {
                "architecture": {"kind": "linear", "in_features": 1, "out_features": 1},
                "optimizer": {"lrate": 0.1},
            },
        )
