"""``gradstream.v1.Tensor`` <-> torch, zero-copy on the way in."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from gradstream.server.errors import InvalidArgument
from gradstream.server.shm import SharedSegment
from gradstream.server.wire import WireTensor
from gradstream.v1 import trainer_pb2 as pb
from gradstream.wire import TensorFormatError, from_parts, to_proto

# Decoded tensors are read-only views of the request's bytes; nothing writes to
# them in place, so torch's warning about that would only be noise on every batch.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def decode_array(tensor: pb.Tensor, field: str) -> npt.NDArray[Any]:
    """A read-only numpy view of the message's bytes (bfloat16 widened to float32).

    A malformed message raises InvalidArgument naming the field.
    """
    return decode_wire(WireTensor(tensor.dtype, tuple(tensor.shape), tensor.data), field)


def decode_wire(
    tensor: WireTensor | None, field: str, segment: SharedSegment | None = None
) -> npt.NDArray[Any]:
    """``decode_array`` for a tensor of a decoded Train request (a view of its bytes).

    A tensor may point into the stream's shared-memory ``segment`` instead of carrying
    data: those bytes are copied out, and the array is a view of the copy.
    """
    if tensor is None:
        raise InvalidArgument(field, "is missing")
    data = tensor.data
    if tensor.shared is not None:
        offset, length = tensor.shared
        if segment is None:
            raise InvalidArgument(f"{field}.shared", "the stream opened no shared_memory segment")
        if len(data):
            raise InvalidArgument(f"{field}.data", "give data or shared, not both")
        if offset + length > len(segment):
            raise InvalidArgument(
                f"{field}.shared",
                f"bytes [{offset}, {offset + length}) lie outside the {len(segment)}-byte segment",
            )
        data = segment[offset : offset + length]
    try:
        array = from_parts(tensor.dtype, tensor.shape, data, field)
    except TensorFormatError as exc:
        raise InvalidArgument(exc.field, str(exc).removeprefix(f"{exc.field}: ")) from None
    if tensor.dtype == pb.DATA_TYPE_BFLOAT16:  # numpy has no bfloat16; float32 holds it exactly
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16).float().numpy()
    return array


def decode(tensor: pb.Tensor, field: str) -> torch.Tensor:
    """A CPU tensor over the message's bytes; a malformed message raises InvalidArgument."""
    return torch.from_numpy(decode_array(tensor, field))


def encode(value: torch.Tensor, out: pb.Tensor | None = None) -> pb.Tensor:
    """Copy a tensor (from any device) into a Tensor message."""
    value = value.detach().cpu().contiguous()
    if value.dtype != torch.bfloat16:
        return to_proto(value.numpy(), out)
    tensor = pb.Tensor() if out is None else out
    tensor.dtype = pb.DATA_TYPE_BFLOAT16
    tensor.shape[:] = value.shape
    tensor.data = value.view(torch.int16).numpy().astype("<i2", copy=False).tobytes()
    return tensor
