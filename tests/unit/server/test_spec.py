"""Spec validation in process: every bad spec of the service test, without a server.

tests/integration/test_bad_input.py sends each through CreateModel; here the same table
goes through what CreateModel runs (the wire's spec conversion, ``parse_spec``, building
the trainer), so the mutation run (docs/testing.md) checks spec.py in seconds.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from gradstream.server.engine import TrainerFactory
from gradstream.server.errors import InvalidArgument
from gradstream.server.spec import check_model_name, parse_spec
from gradstream.wire import spec_from_proto, spec_to_proto
from tests.integration.test_bad_input import BAD_SPECS

FACTORY = TrainerFactory(torch.device("cpu"))


def _create(spec: dict[str, Any]) -> None:
    data = spec_from_proto(spec_to_proto(spec))
    FACTORY.build("m", parse_spec(data))


@pytest.mark.parametrize(("spec", "message"), BAD_SPECS)
def test_bad_spec_is_invalid_argument_naming_the_field(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _create(spec)
    assert str(caught.value).startswith(message), str(caught.value)


@pytest.mark.parametrize(
    "bad",
    ["", "../etc", "-lead", ".hidden", "victim\n", "vic\ttim", "vict\u0456m", "a" * 129],
)
def test_a_bad_model_name_is_refused_quoting_it(bad: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_model_name(bad, "req.name")
    assert str(caught.value) == (
        f"req.name: {bad!r} is not a model name (1-128 of A-Z a-z 0-9 . _ -, starting alphanumeric)"
    )
    with pytest.raises(InvalidArgument, match=r"^name: "):
        check_model_name(bad)


@pytest.mark.parametrize("good", ["m", "A.b_c-1", "9" + "x" * 127])
def test_a_good_model_name_is_returned(good: str) -> None:
    assert check_model_name(good) == good


def test_a_spec_error_names_the_field_under_the_given_root() -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_spec({"architecture": {"kind": "linear", "in_features": 0}}, "req.spec")
    assert str(caught.value) == (
        "req.spec.architecture.in_features: Input should be greater than 0 (got 0)"
    )


def test_an_unknown_kind_is_named_with_what_was_given() -> None:
    linear = {"kind": "linear", "in_features": 1, "out_features": 1}
    with pytest.raises(InvalidArgument) as caught:
        parse_spec({"architecture": linear, "optimizer": {"kind": "nadam"}})
    assert str(caught.value) == (
        "spec.optimizer.kind: unknown optimizer; known: sgd, adam, adamw, adagrad, rmsprop "
        "(got 'nadam')"
    )


def test_a_missing_field_is_named_without_a_value() -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_spec({})
    assert str(caught.value) == "spec.architecture: Field required"
