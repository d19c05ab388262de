"""Checking decoded arrays against what a model takes, before any of it reaches the model.

Checks run in numpy on the request handler's thread: on the small arrays of a
small batch, a numpy call costs a fraction of a torch op's dispatch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from gradstream.server.errors import InvalidArgument
from gradstream.server.spec import ModelSpec

Array = npt.NDArray[Any]
_NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
}


@dataclass(frozen=True, slots=True)
class Batch:
    """A validated (x, y[, weight]) on the CPU, in the model's dtype (labels int64)."""

    x: torch.Tensor
    y: torch.Tensor
    weight: torch.Tensor | None = None
    sequence: int = 0


class BatchChecker:
    """The input contract of one model: feature counts, label kind, dtype.

    It reads only the immutable parts of the spec, so request handlers can run it
    without waiting for the model's worker.
    """

    def __init__(self, spec: ModelSpec, max_rows: int = 0) -> None:
        self.in_features = spec.architecture.in_features
        self.out_features = spec.architecture.out_features
        self.classes = spec.loss.kind == "cross_entropy"
        self.dtype = _NUMPY_DTYPES[spec.dtype]
        self.max_rows = max_rows

    def inputs(self, x: Array, field: str = "x") -> torch.Tensor:
        """x as (N, in_features) with N >= 1, finite, in the model's dtype."""
        return _tensor(self._inputs(x, field), self.dtype)

    def targets(self, y: Array, rows: int, field: str = "y") -> torch.Tensor:
        """y for ``rows`` rows: class labels in range, or finite values shaped like the output."""
        if self.classes:
            return torch.from_numpy(self._labels(y, rows, field).astype(np.int64, copy=False))
        return _tensor(self._values(y, rows, field), self.dtype)

    def weights(self, w: Array, rows: int, field: str = "sample_weight") -> torch.Tensor:
        """One finite, non-negative weight per row, not all zero."""
        _floating(w, field)
        if w.shape != (rows,):
            raise InvalidArgument(field, f"has shape {list(w.shape)}, expected ({rows},)")
        _finite(w, field)
        if (w < 0).any():
            raise InvalidArgument(field, f"has a negative weight {float(w.min())}")
        if not (w > 0).any():
            raise InvalidArgument(field, "weights are all zero")
        return _tensor(w, self.dtype)

    def batch(
        self,
        x: Array,
        y: Array,
        weight: Array | None = None,
        sequence: int = 0,
        field: str = "batch",
    ) -> Batch:
        """A whole training batch, every part checked."""
        x = self._inputs(x, f"{field}.x")
        rows = x.shape[0]
        return Batch(
            x=_tensor(x, self.dtype),
            y=self.targets(y, rows, f"{field}.y"),
            weight=None if weight is None else self.weights(weight, rows, f"{field}.sample_weight"),
            sequence=sequence,
        )

    def _inputs(self, x: Array, field: str) -> Array:
        _floating(x, field)
        if x.ndim == 1 and self.in_features == 1:
            x = x.reshape(-1, 1)
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise InvalidArgument(
                field, f"has shape {list(x.shape)}, the model expects (rows, {self.in_features})"
            )
        if x.shape[0] == 0:
            raise InvalidArgument(field, "is an empty batch (0 rows)")
        if self.max_rows and x.shape[0] > self.max_rows:
            raise InvalidArgument(field, f"has {x.shape[0]} rows, the limit is {self.max_rows}")
        _finite(x, field)
        return x

    def _labels(self, y: Array, rows: int, field: str) -> Array:
        if y.dtype.kind != "i":
            raise InvalidArgument(
                field, f"has dtype {y.dtype.name}, cross_entropy takes int64 class labels"
            )
        if y.shape != (rows,):
            raise InvalidArgument(field, f"has shape {list(y.shape)}, expected ({rows},) labels")
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= self.out_features:
            bad = low if low < 0 else high
            raise InvalidArgument(field, f"label {bad} is out of range [0, {self.out_features})")
        return y

    def _values(self, y: Array, rows: int, field: str) -> Array:
        _floating(y, field)
        if y.ndim == 1 and self.out_features == 1:
            y = y.reshape(-1, 1)
        if y.shape != (rows, self.out_features):
            raise InvalidArgument(
                field, f"has shape {list(y.shape)}, expected ({rows}, {self.out_features})"
            )
        _finite(y, field)
        return y


def _tensor(array: Array, dtype: np.dtype[Any]) -> torch.Tensor:
    # Zero-copy when the wire dtype is the model's; one conversion otherwise.
    return torch.from_numpy(array.astype(dtype, copy=False))


def _floating(a: Array, field: str) -> None:
    if a.dtype.kind != "f":
        raise InvalidArgument(field, f"has dtype {a.dtype.name}, expected floating point")


def _finite(a: Array, field: str) -> None:
    if not np.isfinite(a).all():
        bad = a[~np.isfinite(a)].flat[0]
        raise InvalidArgument(field, f"contains a non-finite value ({bad})")
