"""Checking decoded arrays against what a model takes, before any of it reaches the model.

Checks run in numpy on the request handler's thread: on the small arrays of a
small batch, a numpy call costs a fraction of a torch op's dispatch.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import torch

from gradstream.server.errors import InvalidArgument, ResourceExhausted
from gradstream.server.models import activation_row_bytes, model_inputs
from gradstream.server.spec import InputSpec, ModelSpec

Array = npt.NDArray[Any]
T = TypeVar("T")
_NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
}
_IDS = (np.dtype(np.int64), np.dtype(np.int32))  # int32 is widened to int64


@dataclass(frozen=True, slots=True)
class Batch:
    """A validated (inputs, y[, weight]) on the CPU, floats in the model's dtype, ids int64.

    ``x`` is the model's first declared input (its only one for ``linear`` and ``mlp``),
    ``more`` the others in declaration order: the module is called ``module(x, *more)``.
    """

    x: torch.Tensor
    y: torch.Tensor
    weight: torch.Tensor | None = None
    sequence: int = 0
    more: tuple[torch.Tensor, ...] = ()

    @property
    def inputs(self) -> tuple[torch.Tensor, ...]:
        """Every input, in declaration order."""
        return (self.x, *self.more)


class BatchChecker:
    """The input contract of one model: feature counts, label kind, dtype.

    It reads only the immutable parts of the spec, so request handlers can run it
    without waiting for the model's worker.
    """

    def __init__(
        self,
        spec: ModelSpec,
        max_rows: int = 0,
        max_bytes: int = 0,
        max_activation_bytes: int = 0,
    ) -> None:
        self.declared = model_inputs(spec)  # what every batch must carry, in this order
        first = self.declared[0]
        # One float input of fixed width: the path of every linear and mlp batch, kept lean.
        self.single = len(self.declared) == 1 and first.kind == "float" and len(first.shape) == 1
        self.in_features = first.shape[0] if self.single else spec.architecture.in_features
        self.out_features = spec.architecture.out_features
        self.classes = spec.loss.kind == "cross_entropy"
        self.dtype = _NUMPY_DTYPES[spec.dtype]
        self.max_rows = max_rows
        self.max_bytes = max_bytes  # tensor bytes of one batch; 0: no limit
        # The memory one row costs the forward and backward passes; 0: not known.
        self.row_bytes = activation_row_bytes(spec)
        self.max_activation_bytes = max_activation_bytes  # 0: no limit

    def contract(self) -> str:
        """Everything this checker checks against, as JSON (``from_contract`` reads it).

        The ingest front (``ingest.py``) checks a model's batches in another process with
        the checker this rebuilds: the same contract, so the same batches and rejections.
        """
        return json.dumps(
            {
                "declared": [dataclasses.astuple(i) for i in self.declared],
                "in_features": self.in_features,
                "out_features": self.out_features,
                "classes": self.classes,
                "dtype": self.dtype.name,
                "max_rows": self.max_rows,
                "max_bytes": self.max_bytes,
                "row_bytes": self.row_bytes,
                "max_activation_bytes": self.max_activation_bytes,
            }
        )

    @classmethod
    def from_contract(cls, text: str) -> BatchChecker:
        """The checker whose ``contract()`` is ``text``."""
        data = json.loads(text)
        checker = cls.__new__(cls)
        checker.declared = tuple(
            InputSpec(name, kind, tuple(shape), ids_below)
            for name, kind, shape, ids_below in data["declared"]
        )
        first = checker.declared[0]
        checker.single = (
            len(checker.declared) == 1 and first.kind == "float" and len(first.shape) == 1
        )
        checker.in_features = data["in_features"]
        checker.out_features = data["out_features"]
        checker.classes = data["classes"]
        checker.dtype = _NUMPY_DTYPES[data["dtype"]]
        checker.max_rows = data["max_rows"]
        checker.max_bytes = data["max_bytes"]
        checker.row_bytes = data["row_bytes"]
        checker.max_activation_bytes = data["max_activation_bytes"]
        return checker

    def inputs(self, x: Array, field: str = "x", quote: bool = True) -> torch.Tensor:
        """x as (N, in_features) with N >= 1, finite, in the model's dtype."""
        return torch.from_numpy(self._inputs(x, field, quote))

    def arrange(
        self, x: T | None, named: Sequence[tuple[str, T]], field: str = ""
    ) -> list[tuple[str, T]]:
        """The given inputs in declaration order, each with the field that names it.

        ``x`` is the model's input when it has exactly one (whatever its name), ``named``
        are ``(name, value)`` pairs: each declared input exactly once, nothing else.
        """
        prefix = f"{field}." if field else ""
        if x is not None and named:
            raise InvalidArgument(f"{prefix}inputs", "set x or inputs, not both")
        if x is not None or not named:
            if len(self.declared) != 1:
                raise InvalidArgument(
                    f"{prefix}x" if x is not None else f"{prefix}inputs",
                    f"the model takes {len(self.declared)} inputs ({self._listed()}); "
                    "send them by name in inputs",
                )
            if x is None:
                raise InvalidArgument(f"{prefix}x", "is missing")
            return [(f"{prefix}x", x)]
        given: dict[str, T] = {}
        known = {i.name for i in self.declared}
        for index, (name, value) in enumerate(named):
            where = f"{prefix}inputs[{index}].name"
            if name in given:
                raise InvalidArgument(where, f"{name!r} is given twice; each input once")
            if name not in known:
                raise InvalidArgument(
                    where, f"{name!r} is not an input of this model; it takes {self._listed()}"
                )
            given[name] = value
        missing = [i for i in self.declared if i.name not in given]
        if missing:
            raise InvalidArgument(
                f"{prefix}inputs",
                f"misses {', '.join(_describe(i) for i in missing)}; "
                f"the model takes {self._listed()}",
            )
        return [(f"{prefix}inputs[{i.name}]", given[i.name]) for i in self.declared]

    def features(
        self, arrays: Sequence[Array], fields: Sequence[str], quote: bool = True
    ) -> tuple[torch.Tensor, ...]:
        """Every input checked against its declaration (``arrange``'s order), as tensors.

        Same rows in each, at least one; floats finite in the model's dtype; ids int64
        (int32 widened) within their table; the batch limits count every input.
        """
        if self.single:
            return (torch.from_numpy(self._inputs(arrays[0], fields[0], quote)),)
        rows = 0
        out: list[Array] = []
        for declared, array, field in zip(self.declared, arrays, fields, strict=True):
            if declared.kind == "float":
                _floating(array, field)
            elif array.dtype not in _IDS:
                raise InvalidArgument(
                    field,
                    f"has dtype {array.dtype.name}; {declared.name!r} takes integer ids "
                    "(int64, or int32 widened)",
                )
            trailing = array.shape[1:]
            if array.ndim != 1 + len(declared.shape) or any(
                want >= 0 and got != want
                for got, want in zip(trailing, declared.shape, strict=True)
            ):
                raise InvalidArgument(
                    field, f"has shape {list(array.shape)}, the model expects {_shape(declared)}"
                )
            if array.shape[0] == 0:
                raise InvalidArgument(field, "is an empty batch (0 rows)")
            if out and array.shape[0] != rows:
                raise InvalidArgument(
                    field,
                    f"has {array.shape[0]} rows, {fields[0]} has {rows}; inputs have equal rows",
                )
            rows = array.shape[0]
            if array.size == 0:
                raise InvalidArgument(field, f"has shape {list(array.shape)}, an empty row")
            if self.max_rows and rows > self.max_rows:
                raise ResourceExhausted(
                    f"{field}: max_batch_rows: has {rows} rows, the limit is {self.max_rows}"
                )
            if declared.kind == "float":
                out.append(_converted(array, self.dtype, field, quote))
            else:
                out.append(_ids(array, declared.ids_below, field, quote))
        self._check_bytes(sum(a.nbytes for a in arrays), fields[0])
        self._check_activations(rows, fields[0])
        return tuple(torch.from_numpy(a) for a in out)

    def _listed(self) -> str:
        return ", ".join(_describe(i) for i in self.declared)

    def targets(self, y: Array, rows: int, field: str = "y", quote: bool = True) -> torch.Tensor:
        """y for ``rows`` rows: class labels in range, or finite values shaped like the output."""
        if self.classes:
            return torch.from_numpy(self._labels(y, rows, field, quote))
        return torch.from_numpy(self._values(y, rows, field, quote))

    def weights(
        self, w: Array, rows: int, field: str = "sample_weight", quote: bool = True
    ) -> torch.Tensor:
        """One finite, non-negative weight per row, not all zero."""
        _floating(w, field)
        if w.shape != (rows,):
            raise InvalidArgument(field, f"has shape {list(w.shape)}, expected ({rows},)")
        w = _converted(w, self.dtype, field, quote)
        if (w < 0).any():
            shown = f" {float(w.min())}" if quote else ""
            raise InvalidArgument(field, f"has a negative weight{shown}")
        if not (w > 0).any():
            raise InvalidArgument(field, "weights are all zero")
        return torch.from_numpy(w)

    def grad_output(self, v: Array, field: str = "grad_output") -> torch.Tensor:
        """A vector for a vector-Jacobian product: floating, finite in the model's dtype."""
        _floating(v, field)
        return torch.from_numpy(_converted(v, self.dtype, field, quote=True))

    def batch(
        self,
        x: Array,
        y: Array,
        weight: Array | None = None,
        sequence: int = 0,
        field: str = "batch",
        *,
        quote: bool = True,
        more: Sequence[Array] = (),
        fields: Sequence[str] = (),
    ) -> Batch:
        """A whole training batch, every part checked.

        ``x`` and ``more`` are the inputs in declaration order (``arrange``), named by
        ``fields`` (default: ``<field>.x``). ``quote=False`` keeps the values themselves
        out of error messages (for bytes read from a segment, which must not be echoed back).
        """
        if self.single and not more:  # one x: the lean path of every linear and mlp batch
            checked = self._inputs(x, fields[0] if fields else f"{field}.x", quote)
            self._check_bytes(x.nbytes + y.nbytes + (0 if weight is None else weight.nbytes), field)
            inputs: tuple[torch.Tensor, ...] = (torch.from_numpy(checked),)
        else:
            named = fields or [f"{field}.inputs[{i.name}]" for i in self.declared]
            inputs = self.features((x, *more), named, quote)
            size = sum(a.nbytes for a in (x, *more)) + y.nbytes
            self._check_bytes(size + (0 if weight is None else weight.nbytes), field)
        rows = inputs[0].shape[0]
        return Batch(
            x=inputs[0],
            y=self.targets(y, rows, f"{field}.y", quote),
            weight=None
            if weight is None
            else self.weights(weight, rows, f"{field}.sample_weight", quote),
            sequence=sequence,
            more=inputs[1:],
        )

    def block(
        self, inputs: Sequence[Array], y: Array, weight: Array | None, like: Batch
    ) -> list[torch.Tensor] | None:
        """The value checks of ``batch`` over n batches stacked along a new first axis.

        Every one of the n batches has the layout (dtypes, shapes) of ``like``, a batch
        that passed ``batch``, so only the values are left to check: finite floats, labels
        and ids in range, weights non-negative and not all zero in each batch. Returns
        the inputs, y and the weight (when given) in ``like``'s shapes with the leading
        n, or None when any value fails: the caller then checks each batch alone, so
        the failing one is named as ``batch`` would name it.
        """
        n = inputs[0].shape[0]
        try:
            out: list[Array] = []
            for declared, array in zip(self.declared, inputs, strict=True):
                if self.single or declared.kind == "float":
                    out.append(_converted(array, self.dtype, "", quote=False))
                else:
                    out.append(_ids(array, declared.ids_below, "", quote=False))
            if self.classes:
                if int(y.min()) < 0 or int(y.max()) >= self.out_features:
                    return None
                out.append(y.astype(np.int64, copy=False))
            else:
                out.append(_converted(y, self.dtype, "", quote=False))
            if weight is not None:
                w = _converted(weight, self.dtype, "", quote=False)
                if (w < 0).any() or not (w > 0).reshape(n, -1).any(axis=1).all():
                    return None
                out.append(w)
        except InvalidArgument:
            return None
        shapes = [*like.inputs, like.y] + ([] if like.weight is None else [like.weight])
        return [torch.from_numpy(a.reshape(n, *t.shape)) for a, t in zip(out, shapes, strict=True)]

    def _check_bytes(self, size: int, field: str) -> None:
        if self.max_bytes and size > self.max_bytes:
            raise ResourceExhausted(
                f"{field}: max_batch_bytes: has {size} bytes of tensors, the limit is "
                f"{self.max_bytes}"
            )

    def _inputs(self, x: Array, field: str, quote: bool) -> Array:
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
            raise ResourceExhausted(
                f"{field}: max_batch_rows: has {x.shape[0]} rows, the limit is {self.max_rows}"
            )
        self._check_bytes(x.nbytes, field)
        self._check_activations(x.shape[0], field)
        return _converted(x, self.dtype, field, quote)

    def _check_activations(self, rows: int, field: str) -> None:
        # Before any of the batch reaches torch: one legal-sized batch through a wide
        # layer can ask for more memory than the host has, and the OOM killer ends
        # every model, not just the request.
        need = rows * self.row_bytes
        if self.max_activation_bytes and need > self.max_activation_bytes:
            raise ResourceExhausted(
                f"{field}: max_activation_bytes: {rows} rows need about {need} bytes of "
                f"activations and gradients in this model, the limit is "
                f"{self.max_activation_bytes}"
            )

    def _labels(self, y: Array, rows: int, field: str, quote: bool) -> Array:
        if y.dtype.kind != "i":
            raise InvalidArgument(
                field, f"has dtype {y.dtype.name}, cross_entropy takes int64 class labels"
            )
        if y.shape != (rows,):
            raise InvalidArgument(field, f"has shape {list(y.shape)}, expected ({rows},) labels")
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= self.out_features:
            bad = f"label {low if low < 0 else high}" if quote else "a label"
            raise InvalidArgument(field, f"{bad} is out of range [0, {self.out_features})")
        return y.astype(np.int64, copy=False)

    def _values(self, y: Array, rows: int, field: str, quote: bool) -> Array:
        _floating(y, field)
        if y.ndim == 1 and self.out_features == 1:
            y = y.reshape(-1, 1)
        if y.shape != (rows, self.out_features):
            raise InvalidArgument(
                field, f"has shape {list(y.shape)}, expected ({rows}, {self.out_features})"
            )
        return _converted(y, self.dtype, field, quote)


def _converted(array: Array, dtype: np.dtype[Any], field: str, quote: bool) -> Array:
    """``array`` in the model's dtype, checked finite after the conversion.

    Zero-copy when the wire dtype is the model's. Checked after, not before: a
    float64 1e300 is finite, and infinite once in a float32 model.
    """
    if array.dtype == dtype:  # nothing to convert; errstate alone costs a small batch's check
        converted = array
    else:
        with np.errstate(over="ignore"):
            converted = array.astype(dtype, copy=False)
    _finite(converted, field, quote, "" if converted is array else f" as {dtype.name}")
    return converted


def _ids(ids: Array, bound: int, field: str, quote: bool) -> Array:
    """Ids as int64, each in [0, bound) when the input has a bound (an embedding table)."""
    ids = ids.astype(np.int64, copy=False)
    if bound:
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= bound:
            bad = f"id {low if low < 0 else high}" if quote else "an id"
            raise InvalidArgument(field, f"{bad} is out of range [0, {bound})")
    return ids


def _shape(declared: InputSpec) -> str:
    sizes = ", ".join("any" if d < 0 else str(d) for d in declared.shape)
    return f"(rows, {sizes})"


def _describe(declared: InputSpec) -> str:
    return f"{declared.name} ({declared.kind} {_shape(declared)})"


def _floating(a: Array, field: str) -> None:
    if a.dtype.kind != "f":
        raise InvalidArgument(field, f"has dtype {a.dtype.name}, expected floating point")


def _finite(a: Array, field: str, quote: bool = True, converted: str = "") -> None:
    if not np.isfinite(a).all():
        bad = a[~np.isfinite(a)].flat[0]
        shown = f" ({bad})" if quote else ""
        raise InvalidArgument(field, f"contains a non-finite value{shown}{converted}")
