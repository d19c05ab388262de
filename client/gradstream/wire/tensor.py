"""numpy arrays <-> ``gradstream.v1.Tensor``: raw little-endian row-major bytes, no pickle.

The one definition of the tensor format both sides use: which numpy dtype each DataType
code is, how many dimensions a tensor may have, how many bytes its shape needs, and the
alignment large data is given in a message or a shared-memory ring.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from gradstream.v1 import trainer_pb2 as pb

# bfloat16 has no numpy dtype: it travels as its raw 16-bit pattern.
NUMPY_DTYPES: dict[int, np.dtype[Any]] = {
    pb.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    pb.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    pb.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    pb.DATA_TYPE_BFLOAT16: np.dtype("<u2"),
    pb.DATA_TYPE_INT64: np.dtype("<i8"),
    pb.DATA_TYPE_INT32: np.dtype("<i4"),
}
_CODES: dict[str, int] = {
    "f4": pb.DATA_TYPE_FLOAT32,
    "f8": pb.DATA_TYPE_FLOAT64,
    "f2": pb.DATA_TYPE_FLOAT16,
    "i8": pb.DATA_TYPE_INT64,
    "i4": pb.DATA_TYPE_INT32,
}
MAX_DIMS = 8
# Where the server uses bytes in place (large Train messages, the shared-memory ring) data
# starts at a multiple of this: unaligned numbers cost numpy a copy to check them.
ALIGN = 64


class TensorFormatError(ValueError):
    """A Tensor message whose dtype, shape and bytes do not agree; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def as_array(value: Any) -> npt.NDArray[Any]:
    """numpy, a torch tensor (detached, moved to the CPU) or a nested list, as an ndarray.

    torch is duck-typed so the client never imports it.
    """
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def wire_array(value: Any) -> tuple[npt.NDArray[Any], int]:
    """The array as it travels (contiguous, little-endian) and its DataType code."""
    array = as_array(value)
    if array.dtype == np.bool_ or array.dtype.kind == "u":
        array = array.astype(np.int64)
    code = _CODES.get(f"{array.dtype.kind}{array.dtype.itemsize}")
    if code is None:
        raise TypeError(f"cannot send arrays of dtype {array.dtype}; use float32/64, int32/64")
    return np.ascontiguousarray(array, dtype=NUMPY_DTYPES[code]), code


def to_proto(value: Any, out: pb.Tensor | None = None) -> pb.Tensor:
    """Encode an array-like; float64 stays float64 and ints stay ints (the server converts)."""
    array, code = wire_array(value)
    tensor = pb.Tensor() if out is None else out
    tensor.dtype = code  # type: ignore[assignment]
    tensor.shape[:] = array.shape
    tensor.data = array.tobytes()
    return tensor


def from_proto(tensor: pb.Tensor, field: str) -> npt.NDArray[Any]:
    """Decode without copying: a read-only view of the message's bytes."""
    return from_parts(tensor.dtype, tuple(tensor.shape), tensor.data, field)


def from_parts(
    code: int, shape: tuple[int, ...], data: bytes | memoryview, field: str
) -> npt.NDArray[Any]:
    """A read-only array over ``data`` after checking dtype, shape and byte length agree."""
    dtype = NUMPY_DTYPES.get(code)
    if dtype is None:
        raise TensorFormatError(f"{field}.dtype", f"unknown data type code {code}")
    if len(shape) > MAX_DIMS:
        raise TensorFormatError(
            f"{field}.shape", f"has {len(shape)} dimensions, at most {MAX_DIMS}"
        )
    if any(d < 0 for d in shape):
        raise TensorFormatError(f"{field}.shape", f"{list(shape)} has a negative dimension")
    expected = math.prod(shape) * dtype.itemsize
    if expected != len(data):
        name = pb.DataType.Name(code).removeprefix("DATA_TYPE_").lower()
        raise TensorFormatError(
            f"{field}.data",
            f"has {len(data)} bytes, shape {list(shape)} of {name} needs {expected}",
        )
    try:
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    except ValueError:  # e.g. [0, 2**62]: no bytes, but numpy cannot index that many
        raise TensorFormatError(f"{field}.shape", f"{list(shape)} is too large") from None
