"""What the SDK returns: plain, frozen values built from the server's messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gradstream.v1 import trainer_pb2 as pb
from gradstream.wire import spec_from_proto

# Outcome names as StepResult.outcome carries them: APPLIED, ACCUMULATED, ...
OUTCOME_NAMES: dict[int, str] = {v: k.removeprefix("OUTCOME_") for k, v in pb.Outcome.items()}


@dataclass(frozen=True, slots=True)
class StepResult:
    """What happened to one batch: APPLIED, ACCUMULATED, SKIPPED_NONFINITE, DUPLICATE or REJECTED.

    ``loss`` is None on batches that were not reporting points (see ``report_every``).
    """

    sequence: int
    step: int
    loss: float | None
    outcome: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Prediction:
    """A model's output and the step of the parameters that computed it.

    ``step`` is at least the model's step in every Train answer received before the
    request was sent (docs/serving.md).
    """

    y: Any  # numpy array, (rows, out_features)
    step: int


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """A checkpoint the server wrote: its name, step and every producer's durable sequence."""

    checkpoint: str
    step: int
    producer_sequences: dict[str, int]


@dataclass(frozen=True, slots=True)
class ParameterInfo:
    """Shape and frozen state of one parameter."""

    shape: tuple[int, ...]
    frozen: bool


@dataclass(frozen=True, slots=True)
class InputInfo:
    """One input a model takes: every batch, prediction and gradient request carries it.

    ``kind`` is ``"float"`` (any floating dtype, converted to the model's) or
    ``"integer"`` (ids: int64, or int32 widened); ``shape`` is the sizes after the row
    dimension, -1 where any size is accepted (an id bag's length).
    """

    name: str
    kind: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model as the server describes it."""

    name: str
    spec: dict[str, Any]
    step: int
    pending_batches: int
    device: str
    parameters: dict[str, ParameterInfo]
    autograd_chain: list[str] = field(default_factory=list)
    nonfinite_streak: int = 0
    lr: float = 0.0  # what the next step uses: the schedule's current value
    # What every batch carries: a single input named "x" is sent as x, several as a dict.
    inputs: tuple[InputInfo, ...] = ()


def step_result(message: pb.StepResult) -> StepResult:
    """The SDK's view of one batch's result."""
    return StepResult(
        sequence=message.sequence,
        step=message.step,
        loss=message.loss if message.HasField("loss") else None,
        outcome=OUTCOME_NAMES[message.outcome],
        reason=message.reason,
    )


def model_info(message: pb.ModelInfo) -> ModelInfo:
    """The SDK's view of a model."""
    return ModelInfo(
        name=message.name,
        spec=spec_from_proto(message.spec),
        step=message.step,
        pending_batches=message.pending_batches,
        device=message.device,
        parameters={p.name: ParameterInfo(tuple(p.shape), p.frozen) for p in message.parameters},
        autograd_chain=list(message.autograd_chain),
        nonfinite_streak=message.nonfinite_streak,
        lr=message.lr,
        inputs=tuple(InputInfo(i.name, i.kind, tuple(i.shape)) for i in message.inputs),
    )
