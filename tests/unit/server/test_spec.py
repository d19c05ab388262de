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
from gradstream.server.spec import parse_spec
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
