"""``gradstream.v1.Tensor`` <-> torch, zero-copy on the way in."""

from __future__ import annotations

import warnings

import torch
from gradstream.client._tensor import TensorFormatError, from_proto, to_proto
from gradstream.server.errors import InvalidArgument
from gradstream.v1 import trainer_pb2 as pb

# Decoded tensors are read-only views of the request's bytes; nothing writes to
# them in place, so torch's warning about that would only be noise on every batch.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def decode(tensor: pb.Tensor, field: str) -> torch.Tensor:
    """A CPU tensor over the message's bytes; a malformed message raises InvalidArgument."""
    try:
        array = from_proto(tensor, field)
    except TensorFormatError as exc:
        raise InvalidArgument(exc.field, str(exc).removeprefix(f"{exc.field}: ")) from None
    decoded = torch.from_numpy(array)
    if tensor.dtype == pb.DATA_TYPE_BFLOAT16:
        decoded = decoded.view(torch.bfloat16)
    return decoded


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
