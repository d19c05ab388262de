"""Model specs: what a client asks for, validated with messages that name the field."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from torch import nn

from gradstream.server.errors import InvalidArgument, ResourceExhausted

BUILTIN_ARCHITECTURES = ("linear", "mlp")
Activation = Literal["relu", "tanh", "gelu", "sigmoid"]
LossKind = Literal["mse", "l1", "huber", "cross_entropy", "bce_with_logits"]
Reduction = Literal["mean", "sum"]
DType = Literal["float32", "float64"]
PositiveInt = Annotated[int, Field(gt=0)]

_BLAMED = re.compile(r"^([a-z_.]+): (.*)$", re.DOTALL)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


InputKind = Literal["float", "integer"]


@dataclass(frozen=True, slots=True)
class InputSpec:
    """One input a model declares (``ModelInfo.inputs``); every batch is checked against it.

    The module takes its inputs positionally, in declaration order.
    """

    name: str
    kind: InputKind  # float: any floating dtype, converted to the model's; integer: int64 ids
    shape: tuple[int, ...]  # the sizes after the row dimension; -1 where any size is accepted
    ids_below: int = 0  # integer inputs: every id lies in [0, ids_below); 0: not bounded


class _Spec(BaseModel):
    # No NaN or Inf in any number of any spec: an infinite lr or momentum trains
    # parameters to Inf/NaN while every step reports APPLIED.
    model_config = ConfigDict(
        extra="forbid", frozen=True, arbitrary_types_allowed=True, allow_inf_nan=False
    )


class EmbeddingSpec(_Spec):
    """One ``torch.nn.EmbeddingBag`` of ``embedding_mlp``, fed by the int64 input ``input``."""

    input: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
    num_embeddings: PositiveInt
    dim: PositiveInt
    mode: Literal["sum", "mean", "max"] = "mean"

    @field_validator("input")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value == "dense":
            raise ValueError("'dense' is the float input of the dense features")
        # The tables live in an nn.ModuleDict, which refuses keys that are its attributes.
        if hasattr(nn.ModuleDict(), value):
            raise ValueError(f"{value!r} is a name torch modules use themselves")
        return value


class ArchitectureSpec(_Spec):
    """The network: ``linear``, ``mlp``, ``embedding_mlp``, ``exported`` (a torch.export
    archive's module) or a plug-in of ``gradstream.architectures``.

    ``embedding_mlp`` takes ``embeddings`` and ``dense_features`` instead of
    ``in_features``, which is derived: the width of the features its mlp reads.
    """

    kind: str
    in_features: PositiveInt
    out_features: PositiveInt
    hidden: tuple[PositiveInt, ...] = ()
    activation: Activation = "relu"
    bias: bool = True
    options: dict[str, Any] = Field(default_factory=dict)
    embeddings: tuple[EmbeddingSpec, ...] = ()
    dense_features: int = Field(default=0, ge=0)
    # ``exported``: the torch.export archive (CreateModel's ``program``). Not part of the
    # spec's JSON form: checkpoints keep it as a file of its own, GetModel never echoes it.
    program: bytes = Field(default=b"", exclude=True, repr=False)

    @model_validator(mode="before")
    @classmethod
    def _derive_in_features(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kind") == "exported" and not data.get("program"):
            # Said before in_features is missed: CreateModel derives it from the program.
            raise ValueError("program: 'exported' needs CreateModel's program (torch.export bytes)")
        if not isinstance(data, dict) or data.get("kind") != "embedding_mlp":
            return data
        try:
            width = sum(int(e["dim"]) for e in data.get("embeddings") or ())
            width += int(data.get("dense_features") or 0)
        except (KeyError, TypeError, ValueError):
            return data  # the field validators say what is wrong
        given = data.get("in_features")
        if given is not None and given != width:
            raise ValueError(
                f"in_features: embedding_mlp derives it (the embedding dims plus "
                f"dense_features, {width}); got {given}"
            )
        return {**data, "in_features": width}

    @model_validator(mode="after")
    def _kind_fits(self) -> ArchitectureSpec:
        if self.kind == "linear" and self.hidden:
            raise ValueError(
                f"hidden: a linear architecture has no hidden layers, got {self.hidden}"
            )
        if self.kind != "embedding_mlp" and (self.embeddings or self.dense_features):
            field = "embeddings" if self.embeddings else "dense_features"
            raise ValueError(f"{field}: only embedding_mlp takes it, not {self.kind!r}")
        if (self.kind == "exported") != bool(self.program):
            raise ValueError(
                "kind: 'exported' needs CreateModel's program (a torch.export archive)"
                if self.kind == "exported"
                else f"kind: a program is only read by 'exported', not {self.kind!r}"
            )
        if self.kind == "embedding_mlp":
            if not self.embeddings:
                raise ValueError("embeddings: embedding_mlp needs at least one table")
            names = [e.input for e in self.embeddings]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"embeddings: input names must differ, {twice} repeat")
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


class _Implementation(_Spec):
    """The choice of kernel the classes with a fused one offer; the math is the same."""

    foreach: bool | None = None
    fused: bool | None = None

    @model_validator(mode="after")
    def _one_implementation(self) -> _Implementation:
        if self.fused and self.foreach:
            raise ValueError("fused: fused and foreach cannot both be true")
        return self


class SGDSpec(_Implementation):
    """``torch.optim.SGD`` with every option it has, and torch's defaults."""

    kind: Literal["sgd"] = "sgd"
    lr: float = Field(default=1e-3, ge=0)
    momentum: float = Field(default=0.0, ge=0)
    dampening: float = 0.0
    weight_decay: float = Field(default=0.0, ge=0)
    nesterov: bool = False
    maximize: bool = False
    differentiable: bool = False

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> SGDSpec:
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError(
                f"nesterov: needs momentum > 0 and dampening == 0, "
                f"got momentum={self.momentum}, dampening={self.dampening}"
            )
        return self


Beta = Annotated[float, Field(ge=0, lt=1)]


class _AdamOptions(_Implementation):
    """What ``torch.optim.Adam`` and ``AdamW`` share, with torch's defaults."""

    lr: float = Field(default=1e-3, ge=0)
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    eps: float = Field(default=1e-8, ge=0)
    amsgrad: bool = False
    maximize: bool = False
    capturable: bool = False
    differentiable: bool = False


class AdamSpec(_AdamOptions):
    """``torch.optim.Adam`` with every option it has, and torch's defaults."""

    kind: Literal["adam"]
    weight_decay: float = Field(default=0.0, ge=0)
    decoupled_weight_decay: bool = False


class AdamWSpec(_AdamOptions):
    """``torch.optim.AdamW`` with every option it has, and torch's defaults."""

    kind: Literal["adamw"]
    weight_decay: float = Field(default=1e-2, ge=0)


class AdagradSpec(_Implementation):
    """``torch.optim.Adagrad`` with every option it has, and torch's defaults."""

    kind: Literal["adagrad"]
    lr: float = Field(default=1e-2, ge=0)
    lr_decay: float = Field(default=0.0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    initial_accumulator_value: float = Field(default=0.0, ge=0)
    eps: float = Field(default=1e-10, ge=0)
    maximize: bool = False
    differentiable: bool = False


class RMSpropSpec(_Spec):
    """``torch.optim.RMSprop`` with every option it has, and torch's defaults."""

    kind: Literal["rmsprop"]
    lr: float = Field(default=1e-2, ge=0)
    alpha: float = Field(default=0.99, ge=0)
    eps: float = Field(default=1e-8, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    momentum: float = Field(default=0.0, ge=0)
    centered: bool = False
    capturable: bool = False
    foreach: bool | None = None
    maximize: bool = False
    differentiable: bool = False


def _kind_or(default: str) -> Callable[[Any], str]:
    """The ``kind`` a discriminated union dispatches on; ``default`` where it is left out."""

    def kind(value: Any) -> str:
        found = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
        return str(found) if found else default

    return kind


# A spec without ``optimizer.kind`` is SGD, as it was before the other optimizers came.
OptimizerSpec = Annotated[
    Annotated[SGDSpec, Tag("sgd")]
    | Annotated[AdamSpec, Tag("adam")]
    | Annotated[AdamWSpec, Tag("adamw")]
    | Annotated[AdagradSpec, Tag("adagrad")]
    | Annotated[RMSpropSpec, Tag("rmsprop")],
    Discriminator(
        _kind_or("sgd"),
        custom_error_type="unknown_kind",
        custom_error_message="unknown optimizer; known: sgd, adam, adamw, adagrad, rmsprop",
    ),
]

Factor = Annotated[float, Field(ge=0, le=1)]


class StepScheduleSpec(_Spec):
    """``lr_scheduler.StepLR``: lr times ``gamma`` every ``step_size`` steps."""

    kind: Literal["step"]
    step_size: PositiveInt
    gamma: float = Field(default=0.1, ge=0)


class MultiStepScheduleSpec(_Spec):
    """``lr_scheduler.MultiStepLR``: lr times ``gamma`` at each milestone step."""

    kind: Literal["multi_step"]
    milestones: tuple[PositiveInt, ...] = Field(min_length=1)
    gamma: float = Field(default=0.1, ge=0)

    @model_validator(mode="after")
    def _increasing(self) -> MultiStepScheduleSpec:
        _check_increasing(self.milestones)
        return self


class ExponentialScheduleSpec(_Spec):
    """``lr_scheduler.ExponentialLR``: lr times ``gamma`` every step."""

    kind: Literal["exponential"]
    gamma: float = Field(ge=0)


class CosineAnnealingScheduleSpec(_Spec):
    """``lr_scheduler.CosineAnnealingLR`` (``T_max`` is ``t_max`` here)."""

    kind: Literal["cosine_annealing"]
    t_max: PositiveInt
    eta_min: float = Field(default=0.0, ge=0)


class LinearScheduleSpec(_Spec):
    """``lr_scheduler.LinearLR``: the lr factor goes linearly from start to end."""

    kind: Literal["linear"]
    start_factor: float = Field(default=1.0 / 3, gt=0, le=1)
    end_factor: Factor = 1.0
    total_iters: PositiveInt = 5


class ConstantScheduleSpec(_Spec):
    """``lr_scheduler.ConstantLR``: lr times ``factor`` for the first ``total_iters`` steps."""

    kind: Literal["constant"]
    factor: Factor = 1.0 / 3
    total_iters: PositiveInt = 5


_SCHEDULE_KINDS = "step, multi_step, exponential, cosine_annealing, linear, constant"
LeafScheduleSpec = Annotated[
    Annotated[StepScheduleSpec, Tag("step")]
    | Annotated[MultiStepScheduleSpec, Tag("multi_step")]
    | Annotated[ExponentialScheduleSpec, Tag("exponential")]
    | Annotated[CosineAnnealingScheduleSpec, Tag("cosine_annealing")]
    | Annotated[LinearScheduleSpec, Tag("linear")]
    | Annotated[ConstantScheduleSpec, Tag("constant")],
    Discriminator(
        _kind_or(""),
        custom_error_type="unknown_kind",
        custom_error_message=f"unknown schedule inside sequential; known: {_SCHEDULE_KINDS}",
    ),
]


class SequentialScheduleSpec(_Spec):
    """``lr_scheduler.SequentialLR``: ``schedulers[i]`` from ``milestones[i-1]`` on.

    Warmup then decay: ``[linear, cosine_annealing]`` with one milestone.
    """

    kind: Literal["sequential"]
    schedulers: tuple[LeafScheduleSpec, ...] = Field(min_length=1)
    milestones: tuple[PositiveInt, ...] = ()

    @model_validator(mode="after")
    def _one_milestone_between(self) -> SequentialScheduleSpec:
        if len(self.milestones) != len(self.schedulers) - 1:
            raise ValueError(
                f"milestones: {len(self.schedulers)} schedulers need "
                f"{len(self.schedulers) - 1} milestones, got {list(self.milestones)}"
            )
        _check_increasing(self.milestones)
        return self


ScheduleSpec = Annotated[
    Annotated[StepScheduleSpec, Tag("step")]
    | Annotated[MultiStepScheduleSpec, Tag("multi_step")]
    | Annotated[ExponentialScheduleSpec, Tag("exponential")]
    | Annotated[CosineAnnealingScheduleSpec, Tag("cosine_annealing")]
    | Annotated[LinearScheduleSpec, Tag("linear")]
    | Annotated[ConstantScheduleSpec, Tag("constant")]
    | Annotated[SequentialScheduleSpec, Tag("sequential")],
    Discriminator(
        _kind_or(""),
        custom_error_type="unknown_kind",
        custom_error_message=f"unknown schedule; known: {_SCHEDULE_KINDS}, sequential",
    ),
]


def _check_increasing(milestones: tuple[int, ...]) -> None:
    if list(milestones) != sorted(set(milestones)):
        raise ValueError(f"milestones: must be strictly increasing, got {list(milestones)}")


class ClipGradSpec(_Spec):
    """Gradient clipping before each step: by total norm or by value, one of the two."""

    max_norm: float | None = Field(default=None, gt=0)
    norm_type: float = Field(default=2.0, gt=0)
    value: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _norm_or_value(self) -> ClipGradSpec:
        if (self.max_norm is None) == (self.value is None):
            raise ValueError(
                "max_norm: give max_norm (clip_grad_norm_) or value (clip_grad_value_), "
                f"exactly one; got max_norm={self.max_norm}, value={self.value}"
            )
        return self


class ModelSpec(_Spec):
    """Everything needed to build, train and restore a model."""

    architecture: ArchitectureSpec
    init: InitSpec = Field(default_factory=InitSpec)
    loss: LossSpec = Field(default_factory=LossSpec)
    optimizer: OptimizerSpec = Field(default_factory=SGDSpec)
    schedule: ScheduleSpec | None = None
    clip_grad: ClipGradSpec | None = None
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
    loc = _without_tags(error["loc"])
    if error["type"] == "unknown_kind":
        given = error["input"]
        kind = given.get("kind") if isinstance(given, dict) else given
        return ".".join(
            str(part) for part in (root, *loc, "kind")
        ), f"{error['msg']} (got {kind!r})"
    path = ".".join(str(part) for part in (root, *loc))
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error":
        # Cross-field checks say which field they blame: "nesterov: needs momentum > 0".
        blamed = _BLAMED.match(message)
        if blamed:
            path, message = f"{path}.{blamed[1]}", blamed[2]
    elif error["type"] != "missing":
        message = f"{message} (got {error['input']!r})"
    return path, message


_UNION_FIELDS = ("optimizer", "schedule")
_TAGS = frozenset(
    ("sgd", "adam", "adamw", "adagrad", "rmsprop", "step", "multi_step", "exponential")
) | frozenset(("cosine_annealing", "linear", "constant", "sequential"))


def _without_tags(loc: tuple[int | str, ...]) -> list[int | str]:
    """The error's location without the union tags pydantic puts in it (``optimizer.adam.eps``)."""
    out: list[int | str] = []
    for part in loc:
        after_union = bool(out) and (out[-1] in _UNION_FIELDS or isinstance(out[-1], int))
        if not (after_union and part in _TAGS):
            out.append(part)
    return out
