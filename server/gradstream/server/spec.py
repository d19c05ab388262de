"""Model specs: what a client asks for, validated with messages that name the field."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gradstream.server.errors import InvalidArgument, ResourceExhausted

BUILTIN_ARCHITECTURES = ("linear", "mlp")
Activation = Literal["relu", "tanh", "gelu", "sigmoid"]
LossKind = Literal["mse", "l1", "huber", "cross_entropy", "bce_with_logits"]
Reduction = Literal["mean", "sum"]
DType = Literal["float32", "float64"]
PositiveInt = Annotated[int, Field(gt=0)]

_BLAMED = re.compile(r"^([a-z_.]+): (.*)$", re.DOTALL)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class _Spec(BaseModel):
    # No NaN or Inf in any number of any spec: an infinite lr or momentum trains
    # parameters to Inf/NaN while every step reports APPLIED.
    model_config = ConfigDict(
        extra="forbid", frozen=True, arbitrary_types_allowed=True, allow_inf_nan=False
    )


class ArchitectureSpec(_Spec):
    """The network: ``linear``, ``mlp`` or a plug-in of ``gradstream.architectures``."""

    kind: str
    in_features: PositiveInt
    out_features: PositiveInt
    hidden: tuple[PositiveInt, ...] = ()
    activation: Activation = "relu"
    bias: bool = True
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _kind_fits(self) -> ArchitectureSpec:
        if self.kind == "linear" and self.hidden:
            raise ValueError(
                f"hidden: a linear architecture has no hidden layers, got {self.hidden}"
            )
        return self


class InitSpec(_Spec):
    """How parameters start: torch's default init under a seed, zeros, or given tensors."""

    kind: Literal["zeros", "seed", "tensors"] = "seed"
    seed: int = 0
    tensors: dict[str, npt.NDArray[Any]] = Field(default_factory=dict)

    @field_validator("tensors", mode="before")
    @classmethod
    def _as_arrays(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: np.asarray(v) for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _tensors_given(self) -> InitSpec:
        if self.kind == "tensors" and not self.tensors:
            raise ValueError("tensors: init kind 'tensors' needs at least one named tensor")
        if self.kind != "tensors" and self.tensors:
            raise ValueError(f"tensors: only init kind 'tensors' takes tensors, not {self.kind!r}")
        for name, value in self.tensors.items():
            # A NaN or Inf start is a diverged model from step 0.
            if value.dtype.kind not in "fiu" or not bool(np.isfinite(value).all()):
                raise ValueError(f"tensors[{name}]: must be finite numbers")
        return self


class LossSpec(_Spec):
    """The loss and its reduction; ``delta`` is huber's threshold."""

    kind: LossKind = "mse"
    reduction: Reduction = "mean"
    delta: float = Field(default=1.0, gt=0)


class OptimizerSpec(_Spec):
    """``torch.optim.SGD`` with every option it has, and torch's defaults."""

    kind: Literal["sgd"] = "sgd"
    lr: float = Field(default=1e-3, ge=0)
    momentum: float = Field(default=0.0, ge=0)
    dampening: float = 0.0
    weight_decay: float = Field(default=0.0, ge=0)
    nesterov: bool = False
    maximize: bool = False
    foreach: bool | None = None
    differentiable: bool = False
    fused: bool | None = None

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> OptimizerSpec:
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError(
                f"nesterov: needs momentum > 0 and dampening == 0, "
                f"got momentum={self.momentum}, dampening={self.dampening}"
            )
        if self.fused and self.foreach:
            raise ValueError("fused: fused and foreach cannot both be true")
        return self


class ModelSpec(_Spec):
    """Everything needed to build, train and restore a model."""

    architecture: ArchitectureSpec
    init: InitSpec = Field(default_factory=InitSpec)
    loss: LossSpec = Field(default_factory=LossSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    accumulate_steps: PositiveInt = 1
    dtype: DType = "float32"
    frozen: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _loss_fits_architecture(self) -> ModelSpec:
        if self.loss.kind == "cross_entropy" and self.architecture.out_features < 2:
            raise ValueError(
                "loss.kind: cross_entropy needs out_features >= 2 (one logit per class), "
                f"got {self.architecture.out_features}"
            )
        return self

    @model_validator(mode="after")
    def _init_finite_in_dtype(self) -> ModelSpec:
        # Checked in the model's dtype: 1e300 is a finite float64 and an infinite float32.
        dtype = np.dtype(self.dtype)
        for name, value in self.init.tensors.items():
            with np.errstate(over="ignore"):
                converted = value.astype(dtype)
            if not bool(np.isfinite(converted).all()):
                raise ValueError(
                    f"init.tensors: {name!r} must be finite numbers in the model's dtype "
                    f"{self.dtype}"
                )
        return self


def check_depth(spec: ModelSpec, max_layers: int) -> None:
    """Refuse a built-in network deeper than ``max_layers`` (setting ``max_model_layers``).

    Deep enough, building it, counting its parameters and walking its autograd graph
    take seconds, and tearing the graph down can overflow the C stack.
    """
    layers = len(spec.architecture.hidden) + 1
    if max_layers and layers > max_layers:
        raise ResourceExhausted(
            f"max_model_layers: spec.architecture.hidden makes {layers} layers, "
            f"the limit is {max_layers}"
        )


def parse_spec(data: dict[str, Any], field: str = "spec") -> ModelSpec:
    """Validate a spec given as a plain dict; the error names the first bad field and value."""
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as exc:
        raise InvalidArgument(*_describe(exc, field)) from None


def check_model_name(name: str, field: str = "name") -> str:
    """Model names are path- and label-safe: 1-128 of ``[A-Za-z0-9._-]``, alphanumeric first."""
    # fullmatch: "$" matches before a trailing newline, and "victim\n" is not "victim".
    if not _NAME.fullmatch(name):
        raise InvalidArgument(
            field,
            f"{name!r} is not a model name (1-128 of A-Z a-z 0-9 . _ -, starting alphanumeric)",
        )
    return name


def _describe(exc: ValidationError, root: str) -> tuple[str, str]:
    error = exc.errors(include_url=False)[0]
    path = ".".join(str(part) for part in (root, *error["loc"]))
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error":
        # Cross-field checks say which field they blame: "nesterov: needs momentum > 0".
        blamed = _BLAMED.match(message)
        if blamed:
            path, message = f"{path}.{blamed[1]}", blamed[2]
    elif error["type"] != "missing":
        message = f"{message} (got {error['input']!r})"
    return path, message
