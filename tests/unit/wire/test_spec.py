"""Spec dicts <-> ModelSpec messages."""

from __future__ import annotations

import numpy as np
import pytest

from gradstream.client import SpecError
from gradstream.wire import spec_from_proto, spec_to_proto


def test_round_trip_keeps_every_set_field_and_tensor() -> None:
    spec = {
        "architecture": {
            "kind": "mlp",
            "in_features": 3,
            "out_features": 2,
            "hidden": [8, 8],
            "activation": "gelu",
            "bias": False,
            "options": {"depth": 2.0},
        },
        "init": {"kind": "tensors", "tensors": {"0.weight": np.arange(24.0).reshape(8, 3)}},
        "loss": {"kind": "huber", "delta": 0.5, "reduction": "sum"},
        "optimizer": {"kind": "sgd", "lr": 0.1, "momentum": 0.0, "nesterov": False},
        "accumulate_steps": 2,
        "dtype": "float64",
        "frozen": ["2.bias"],
    }
    back = spec_from_proto(spec_to_proto(spec))
    tensor = back["init"].pop("tensors")["0.weight"]
    np.testing.assert_array_equal(tensor, spec["init"]["tensors"]["0.weight"])  # type: ignore[index]
    spec["init"] = {"kind": "tensors"}
    assert back == spec  # explicit zeros and False survive: the fields have presence


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"architecture": {"kind": "linear", "width": 3}}, "spec.architecture.width"),
        ({"optimizer": {"lr": "fast"}}, "spec.optimizer.lr"),
        ({"loss": "mse"}, "spec.loss"),
        ({"frozen": [1]}, "spec.frozen"),
    ],
)
def test_malformed_spec_names_the_field(spec: dict[str, object], field: str) -> None:
    with pytest.raises(SpecError) as caught:
        spec_to_proto(spec)
    assert caught.value.field == field
