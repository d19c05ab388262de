"""Named inputs in Predict and ComputeGradients requests, read back with protobuf's classes."""

from __future__ import annotations

import re

import numpy as np
import pytest

from gradstream.v1 import trainer_pb2 as pb
from gradstream.wire import (
    TensorFormatError,
    from_proto,
    inputs_from_proto,
    inputs_to_proto,
    set_model_input,
)


def test_a_dict_becomes_named_tensors_in_its_order_and_an_array_becomes_x() -> None:
    inputs = {
        "item": np.array([[1, 2], [3, 4]], np.int32),
        "user": np.array([[2**40], [5]]),
        "dense": np.array([[0.5], [-1.0]], np.float64),
    }
    request = pb.PredictRequest(name="m")
    set_model_input(request, inputs)
    parsed = pb.PredictRequest.FromString(request.SerializeToString())
    assert not parsed.HasField("x")
    assert [n.name for n in parsed.inputs] == ["item", "user", "dense"]
    assert [n.tensor.dtype for n in parsed.inputs] == [
        pb.DATA_TYPE_INT32,
        pb.DATA_TYPE_INT64,
        pb.DATA_TYPE_FLOAT64,
    ]
    decoded = inputs_from_proto(parsed.inputs)
    for name, array in inputs.items():
        assert decoded[name].dtype == array.dtype and np.array_equal(decoded[name], array)

    gradients = pb.ComputeGradientsRequest(name="m")
    set_model_input(gradients, np.ones((2, 3), np.float32))
    parsed_x = pb.ComputeGradientsRequest.FromString(gradients.SerializeToString())
    assert not parsed_x.inputs and from_proto(parsed_x.x, "x").tolist() == [[1.0] * 3] * 2


@pytest.mark.parametrize(
    ("value", "error", "words"),
    [
        ({("user",): np.zeros(1)}, TypeError, "inputs: key ('user',) (tuple) is not a string"),
        ({}, ValueError, "inputs: is empty"),
        ({"user": None}, ValueError, "inputs['user']: is None"),
        ({"user": np.array(["a"])}, TypeError, "inputs['user']: cannot send arrays of dtype <U1"),
        (None, ValueError, "x: is None"),
    ],
)
def test_a_malformed_input_is_refused_naming_it(
    value: object, error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=re.escape(words)):
        set_model_input(pb.PredictRequest(), value)


def test_reading_refuses_a_name_given_twice_or_empty() -> None:
    request = pb.PredictRequest()
    inputs_to_proto({"a": np.zeros(2)}, request.inputs)
    inputs_to_proto({"a": np.ones(2)}, request.inputs)
    with pytest.raises(TensorFormatError, match=re.escape("inputs[1].name: 'a' is given twice")):
        inputs_from_proto(request.inputs)
    request.inputs[1].name = ""
    with pytest.raises(TensorFormatError, match=re.escape("inputs[1].name: is empty")):
        inputs_from_proto(request.inputs)
