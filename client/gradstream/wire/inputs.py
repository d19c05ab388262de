"""A model's named inputs (``Batch.inputs``, ``PredictRequest.inputs``, ...) <-> arrays.

A model with one input takes it as ``x``; a model with several (``embedding_mlp``, an
exported program with several user inputs) takes a dict ``name -> array``, sent as
``NamedTensor`` entries in the dict's order. ``ModelInfo.inputs`` says which names, dtype
kinds and trailing shapes a model expects; the server checks every batch against it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy.typing as npt

from gradstream.v1 import trainer_pb2 as pb
from gradstream.wire.tensor import TensorFormatError, from_proto, to_proto, wire_array

if TYPE_CHECKING:  # protobuf's container type lives in an internal module
    from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

Part = tuple[npt.NDArray[Any], int]  # an array as it travels and its DataType code


def input_items(inputs: Mapping[Any, Any], field: str = "inputs") -> list[tuple[str, Any]]:
    """The (name, array-like) pairs of a dict of inputs, refusing a malformed one.

    Every key must be a non-empty string and no value None; ``field`` names the dict in
    the error (e.g. ``batch 3: inputs``).
    """
    if not isinstance(inputs, Mapping):
        raise TypeError(f"{field}: expected a dict of name -> array, got {type(inputs).__name__}")
    if not inputs:
        raise ValueError(f"{field}: is empty; give at least one named input")
    items: list[tuple[str, Any]] = []
    for name, value in inputs.items():
        if not isinstance(name, str):
            raise TypeError(
                f"{field}: key {name!r} ({type(name).__name__}) is not a string; "
                "inputs are named by strings (see the model's inputs in get_model)"
            )
        if not name:
            raise ValueError(f"{field}: has an empty name; every input needs its name")
        if value is None:
            raise ValueError(f"{field}[{name!r}]: is None; give an array")
        items.append((name, value))
    return items


def wire_inputs(inputs: Mapping[Any, Any], field: str = "inputs") -> list[tuple[str, Part]]:
    """Each named input as it travels (``wire_array``), in the dict's order."""
    out: list[tuple[str, Part]] = []
    for name, value in input_items(inputs, field):
        try:
            out.append((name, wire_array(value)))
        except TypeError as exc:
            raise TypeError(f"{field}[{name!r}]: {exc}") from None
    return out


def inputs_to_proto(
    inputs: Mapping[Any, Any],
    out: RepeatedCompositeFieldContainer[pb.NamedTensor],
    field: str = "inputs",
) -> None:
    """Append the named inputs to a repeated ``NamedTensor`` field (e.g. ``request.inputs``)."""
    for name, (array, code) in wire_inputs(inputs, field):
        entry = out.add(name=name)
        entry.tensor.dtype = code  # type: ignore[assignment]
        entry.tensor.shape[:] = array.shape
        entry.tensor.data = array.tobytes()


def inputs_from_proto(
    entries: RepeatedCompositeFieldContainer[pb.NamedTensor], field: str = "inputs"
) -> dict[str, npt.NDArray[Any]]:
    """The named inputs of a message as read-only arrays; a name given twice is refused."""
    out: dict[str, npt.NDArray[Any]] = {}
    for i, entry in enumerate(entries):
        where = f"{field}[{i}]"
        if not entry.name:
            raise TensorFormatError(f"{where}.name", "is empty; every input needs its name")
        if entry.name in out:
            raise TensorFormatError(f"{where}.name", f"{entry.name!r} is given twice")
        out[entry.name] = from_proto(entry.tensor, f"{field}[{entry.name}]")
    return out


def set_model_input(
    request: pb.PredictRequest | pb.ComputeGradientsRequest, x_or_inputs: Any
) -> None:
    """Put ``x_or_inputs`` in ``request``: a dict as its ``inputs``, anything else as ``x``."""
    if isinstance(x_or_inputs, Mapping):
        inputs_to_proto(x_or_inputs, request.inputs)
    else:
        if x_or_inputs is None:
            raise ValueError("x: is None; give an array, or a dict of named inputs")
        to_proto(x_or_inputs, request.x)
