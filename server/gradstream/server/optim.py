"""The optimizer, learning-rate schedule and gradient clipping a spec describes.

Each is the torch class or function of the same name, called with the spec's options:
a trainer built from a spec updates its parameters exactly as the textbook loop
``clip -> optimizer.step() -> scheduler.step()`` over the same objects does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import lr_scheduler

from gradstream.server.spec import (
    ClipGradSpec,
    ConstantScheduleSpec,
    CosineAnnealingScheduleSpec,
    ExponentialScheduleSpec,
    LinearScheduleSpec,
    MultiStepScheduleSpec,
    OptimizerSpec,
    ScheduleSpec,
    SequentialScheduleSpec,
    StepScheduleSpec,
)

_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adagrad": torch.optim.Adagrad,
    "rmsprop": torch.optim.RMSprop,
}


def build_optimizer(spec: OptimizerSpec, module: nn.Module) -> torch.optim.Optimizer:
    """The spec's optimizer over every parameter; frozen ones get no gradient, so no update.

    The spec's fields are the class's constructor options under the same names.
    """
    options: dict[str, Any] = spec.model_dump(exclude={"kind"})
    return _OPTIMIZERS[spec.kind](module.parameters(), **options)


def build_schedule(
    spec: ScheduleSpec | None, optimizer: torch.optim.Optimizer
) -> lr_scheduler.LRScheduler | None:
    """The spec's ``torch.optim.lr_scheduler`` over ``optimizer``, or None for a constant lr.

    Like any torch scheduler, building it sets the lr of step 1 (a warmup's first factor).
    """
    if spec is None:
        return None
    return _scheduler(spec, optimizer)


def _scheduler(spec: ScheduleSpec, optimizer: torch.optim.Optimizer) -> lr_scheduler.LRScheduler:
    match spec:
        case StepScheduleSpec():
            return lr_scheduler.StepLR(optimizer, spec.step_size, spec.gamma)
        case MultiStepScheduleSpec():
            return lr_scheduler.MultiStepLR(optimizer, list(spec.milestones), spec.gamma)
        case ExponentialScheduleSpec():
            return lr_scheduler.ExponentialLR(optimizer, spec.gamma)
        case CosineAnnealingScheduleSpec():
            return lr_scheduler.CosineAnnealingLR(optimizer, spec.t_max, spec.eta_min)
        case LinearScheduleSpec():
            return lr_scheduler.LinearLR(
                optimizer, spec.start_factor, spec.end_factor, spec.total_iters
            )
        case ConstantScheduleSpec():
            return lr_scheduler.ConstantLR(optimizer, spec.factor, spec.total_iters)
        case SequentialScheduleSpec():
            children = [_scheduler(child, optimizer) for child in spec.schedulers]
            return lr_scheduler.SequentialLR(optimizer, children, list(spec.milestones))
    raise AssertionError(f"unhandled schedule {spec!r}")


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The lr the next step uses (every parameter is in the one group)."""
    return float(optimizer.param_groups[0]["lr"])


def set_lr(
    optimizer: torch.optim.Optimizer, schedule: lr_scheduler.LRScheduler | None, lr: float
) -> None:
    """UpdateModel's lr: the next step uses ``lr`` and the schedule goes on from there.

    What a user of the plain loop writes to change lr mid-run: set every group's ``lr``
    and make ``lr`` the base the schedule refers back to (``initial_lr``, ``base_lrs``);
    torch's schedulers compute each step's lr from the current one, so a decay continues
    from ``lr`` by its own rule.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
        if "initial_lr" in group:
            group["initial_lr"] = lr
    if schedule is not None:
        for scheduler in _nested(schedule):
            scheduler.base_lrs = [lr for _ in optimizer.param_groups]


# What a scheduler changes as it steps; the rest of its state_dict comes from the spec.
_SCHEDULE_PROGRESS = (
    "last_epoch",
    "_step_count",
    "_is_initial",
    "_get_lr_called_within_step",
    "_last_lr",
    "base_lrs",
)


def schedule_state(schedule: lr_scheduler.LRScheduler) -> list[dict[str, Any]]:
    """The schedule's progress, each nested scheduler's in turn: plain JSON values."""
    return [
        {key: value for key, value in s.state_dict().items() if key in _SCHEDULE_PROGRESS}
        for s in _nested(schedule)
    ]


def load_schedule_state(schedule: lr_scheduler.LRScheduler, state: list[dict[str, Any]]) -> None:
    """Put a schedule built from its spec where ``schedule_state`` found it."""
    schedulers = list(_nested(schedule))
    if len(state) != len(schedulers):
        raise ValueError(f"{len(state)} saved schedulers, the spec builds {len(schedulers)}")
    for scheduler, saved in zip(schedulers, state, strict=True):
        unknown = set(saved) - set(_SCHEDULE_PROGRESS)
        if unknown:
            raise ValueError(f"unknown schedule state {sorted(unknown)}")
        scheduler.__dict__.update(saved)  # what LRScheduler.load_state_dict does


def _nested(schedule: lr_scheduler.LRScheduler) -> Iterable[lr_scheduler.LRScheduler]:
    yield schedule
    for child in getattr(schedule, "_schedulers", ()):
        yield from _nested(child)


GradientClip = Callable[[Sequence[torch.Tensor]], torch.Tensor]


def gradient_clip(spec: ClipGradSpec | None) -> GradientClip | None:
    """A function that clips the gradients of the given parameters in place.

    It returns their total norm before clipping (the ``norm_type`` norm when clipping by
    norm, the 2-norm when clipping by value), a tensor on their device: reading it is left
    to whoever reports it, so clipping adds no device sync.
    """
    if spec is None:
        return None
    if spec.max_norm is not None:
        max_norm, norm_type = spec.max_norm, spec.norm_type

        def by_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
            return nn.utils.clip_grad_norm_(params, max_norm, norm_type)

        return by_norm
    value = spec.value
    assert value is not None

    def by_value(params: Sequence[torch.Tensor]) -> torch.Tensor:
        grads = [p.grad for p in params if p.grad is not None]
        norm = nn.utils.get_total_norm(grads, 2.0)
        nn.utils.clip_grad_value_(params, value)
        return norm

    return by_value
