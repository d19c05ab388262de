"""Optimizers, schedules and clipping from specs: torch's own classes, bitwise the textbook loop."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

from gradstream.server.errors import InvalidArgument
from gradstream.server.optim import (
    build_optimizer,
    build_schedule,
    current_lr,
    gradient_clip,
    set_lr,
)
from gradstream.server.spec import ModelSpec, SGDSpec, parse_spec
from gradstream.wire import spec_from_proto, spec_to_proto

LINEAR = {"kind": "linear", "in_features": 3, "out_features": 2}

# Every option of each class, set away from its default.
OPTIONS: dict[str, tuple[Any, dict[str, Any]]] = {
    "sgd": (
        torch.optim.SGD,
        {"lr": 0.05, "momentum": 0.9, "dampening": 0.0, "weight_decay": 0.01, "nesterov": True}
        | {"maximize": True, "foreach": False, "differentiable": False, "fused": None},
    ),
    "adam": (
        torch.optim.Adam,
        {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1, "amsgrad": True}
        | {"foreach": False, "maximize": True, "capturable": False, "differentiable": False}
        | {"fused": None, "decoupled_weight_decay": True},
    ),
    "adamw": (
        torch.optim.AdamW,
        {"lr": 0.02, "betas": (0.7, 0.9), "eps": 1e-7, "weight_decay": 0.2, "amsgrad": True}
        | {"maximize": False, "foreach": True, "capturable": False, "differentiable": False}
        | {"fused": None},
    ),
    "adagrad": (
        torch.optim.Adagrad,
        {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.05, "initial_accumulator_value": 0.1}
        | {"eps": 1e-9, "foreach": None, "maximize": True, "differentiable": False, "fused": None},
    ),
    "rmsprop": (
        torch.optim.RMSprop,
        {"lr": 0.01, "alpha": 0.9, "eps": 1e-7, "weight_decay": 0.01, "momentum": 0.5}
        | {"centered": True, "capturable": False, "foreach": False, "maximize": False}
        | {"differentiable": False},
    ),
}


def _spec(**fields: Any) -> ModelSpec:
    return parse_spec({"architecture": LINEAR, **fields})


def _module() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)) for _ in range(n)]


@pytest.mark.parametrize("kind", sorted(OPTIONS))
def test_every_constructor_option_reaches_the_torch_class(kind: str) -> None:
    cls, options = OPTIONS[kind]
    built = build_optimizer(_spec(optimizer={"kind": kind, **options}).optimizer, _module())
    expected = cls(_module().parameters(), **options)
    assert type(built) is cls
    assert built.defaults == expected.defaults


@pytest.mark.parametrize("kind", sorted(OPTIONS))
def test_defaults_are_torchs(kind: str) -> None:
    cls, _ = OPTIONS[kind]
    built = build_optimizer(_spec(optimizer={"kind": kind}).optimizer, _module())
    assert built.defaults == cls(_module().parameters()).defaults


def test_a_spec_without_optimizer_kind_is_sgd_as_before() -> None:
    assert _spec(optimizer={"lr": 0.1, "momentum": 0.5}).optimizer == SGDSpec(lr=0.1, momentum=0.5)
    assert _spec().optimizer == SGDSpec()
    # On the wire too: an old client's Optimizer message carries no kind.
    old = spec_to_proto({"architecture": LINEAR, "optimizer": {"lr": 0.1}})
    assert parse_spec(spec_from_proto(old)).optimizer == SGDSpec(lr=0.1)


def test_specs_survive_the_wire_and_a_checkpoints_json() -> None:
    spec = _spec(
        optimizer={"kind": "adam", "betas": [0.8, 0.9], "amsgrad": True},
        schedule={
            "kind": "sequential",
            "schedulers": [
                {"kind": "linear", "start_factor": 0.1, "total_iters": 3},
                {"kind": "cosine_annealing", "t_max": 10, "eta_min": 1e-4},
            ],
            "milestones": [3],
        },
        clip_grad={"value": 0.5},
    )
    assert parse_spec(spec_from_proto(spec_to_proto(spec.model_dump()))) == spec
    assert parse_spec(spec.model_dump(mode="json")) == spec


@pytest.mark.parametrize(
    ("fields", "field", "value"),
    [
        ({"optimizer": {"kind": "nadam"}}, "spec.optimizer.kind", "'nadam'"),
        ({"optimizer": {"kind": "adam", "lr": -1}}, "spec.optimizer.lr", "-1"),
        ({"optimizer": {"kind": "adam", "betas": [0.9, 1.5]}}, "spec.optimizer.betas.1", "1.5"),
        ({"optimizer": {"kind": "adam", "momentum": 0.9}}, "spec.optimizer.momentum", "0.9"),
        ({"optimizer": {"kind": "adagrad", "eps": -1e-3}}, "spec.optimizer.eps", "-0.001"),
        ({"optimizer": {"kind": "rmsprop", "fused": True}}, "spec.optimizer.fused", "True"),
        ({"optimizer": {"kind": "adamw", "fused": True, "foreach": True}}, "fused", "foreach"),
        ({"schedule": {"kind": "cosine"}}, "spec.schedule.kind", "'cosine'"),
        ({"schedule": {"kind": "step", "step_size": 0}}, "spec.schedule.step_size", "0"),
        ({"schedule": {"kind": "exponential"}}, "spec.schedule.gamma", "required"),
        ({"schedule": {"kind": "linear", "start_factor": 0}}, "schedule.start_factor", "0"),
        ({"schedule": {"kind": "constant", "factor": 2}}, "spec.schedule.factor", "2"),
        ({"schedule": {"kind": "multi_step", "milestones": [5, 2]}}, "milestones", "[5, 2]"),
        (
            {
                "schedule": {
                    "kind": "sequential",
                    "schedulers": [{"kind": "linear"}, {"kind": "exponential", "gamma": 0.9}],
                    "milestones": [],
                }
            },
            "spec.schedule.milestones",
            "[]",
        ),
        (
            {"schedule": {"kind": "sequential", "schedulers": [{"kind": "sequential"}]}},
            "spec.schedule.schedulers.0.kind",
            "'sequential'",
        ),
        ({"clip_grad": {}}, "spec.clip_grad.max_norm", "exactly one"),
        ({"clip_grad": {"max_norm": 1, "value": 1}}, "spec.clip_grad.max_norm", "value=1.0"),
        ({"clip_grad": {"max_norm": -1}}, "spec.clip_grad.max_norm", "-1"),
        ({"clip_grad": {"value": 0}}, "spec.clip_grad.value", "0"),
    ],
)
def test_bad_values_name_the_field_and_value(
    fields: dict[str, Any], field: str, value: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _spec(**fields)
    assert field in caught.value.field
    assert value in caught.value.message


SCHEDULES: list[tuple[dict[str, Any], Any]] = [
    ({"kind": "step", "step_size": 2, "gamma": 0.5}, lambda o: lr_scheduler.StepLR(o, 2, 0.5)),
    (
        {"kind": "multi_step", "milestones": [2, 4], "gamma": 0.3},
        lambda o: lr_scheduler.MultiStepLR(o, [2, 4], 0.3),
    ),
    ({"kind": "exponential", "gamma": 0.9}, lambda o: lr_scheduler.ExponentialLR(o, 0.9)),
    (
        {"kind": "cosine_annealing", "t_max": 4, "eta_min": 0.001},
        lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=4, eta_min=0.001),
    ),
    (
        {"kind": "linear", "start_factor": 0.25, "end_factor": 0.75, "total_iters": 3},
        lambda o: lr_scheduler.LinearLR(o, 0.25, 0.75, 3),
    ),
    (
        {"kind": "constant", "factor": 0.5, "total_iters": 2},
        lambda o: lr_scheduler.ConstantLR(o, 0.5, 2),
    ),
    (
        {
            "kind": "sequential",
            "schedulers": [
                {"kind": "linear", "start_factor": 0.1, "total_iters": 3},
                {"kind": "cosine_annealing", "t_max": 5},
            ],
            "milestones": [3],
        },
        lambda o: lr_scheduler.SequentialLR(
            o,
            [lr_scheduler.LinearLR(o, 0.1, total_iters=3), lr_scheduler.CosineAnnealingLR(o, 5)],
            milestones=[3],
        ),
    ),
]


@pytest.mark.parametrize(
    ("kind", "clip"), [("adam", {"max_norm": 0.5}), ("rmsprop", {"value": 0.1})]
)
@pytest.mark.parametrize(("schedule", "textbook_schedule"), SCHEDULES)
def test_clip_step_schedule_is_bitwise_the_textbook_loop(
    kind: str, clip: dict[str, float], schedule: dict[str, Any], textbook_schedule: Any
) -> None:
    cls, options = OPTIONS[kind]
    spec = _spec(optimizer={"kind": kind, **options}, schedule=schedule, clip_grad=clip)
    ours = _module()
    optimizer = build_optimizer(spec.optimizer, ours)
    scheduler = build_schedule(spec.schedule, optimizer)
    clip_fn = gradient_clip(spec.clip_grad)
    assert scheduler is not None and clip_fn is not None

    theirs = _module()
    t_optimizer = cls(theirs.parameters(), **options)
    t_scheduler = textbook_schedule(t_optimizer)
    lrs, t_lrs, norms = [], [], []
    for x, y in _batches(8):
        optimizer.zero_grad()
        nn.functional.mse_loss(ours(x), y).backward()
        norms.append(clip_fn(list(ours.parameters())))
        optimizer.step()
        scheduler.step()
        lrs.append(current_lr(optimizer))

        t_optimizer.zero_grad()
        nn.functional.mse_loss(theirs(x), y).backward()
        if "max_norm" in clip:
            nn.utils.clip_grad_norm_(theirs.parameters(), clip["max_norm"])
        else:
            nn.utils.clip_grad_value_(theirs.parameters(), clip["value"])
        t_optimizer.step()
        t_scheduler.step()
        t_lrs.append(t_optimizer.param_groups[0]["lr"])
    assert lrs == t_lrs
    assert len(set(lrs)) > 1  # the schedule did change lr
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)
    assert all(n.ndim == 0 and bool(torch.isfinite(n)) for n in norms)


def test_clip_by_norm_returns_the_norm_before_clipping() -> None:
    module = _module()
    x, y = _batches(1)[0]
    nn.functional.mse_loss(module(x), y).backward()
    grads = [p.grad.clone() for p in module.parameters() if p.grad is not None]
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]), 1.0)
    clip_fn = gradient_clip(_spec(clip_grad={"max_norm": 1e-3, "norm_type": 1.0}).clip_grad)
    assert clip_fn is not None
    norm = clip_fn(list(module.parameters()))
    torch.testing.assert_close(norm, expected)
    after = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])
    assert float(torch.linalg.vector_norm(after, 1.0)) < float(norm)


def test_set_lr_continues_the_schedule_from_the_new_lr_like_the_textbook_loop() -> None:
    schedule, textbook_schedule = SCHEDULES[-1]  # warmup then cosine: both kinds of rule
    spec = _spec(optimizer={"kind": "adamw", "lr": 0.1}, schedule=schedule)
    ours, theirs = _module(), _module()
    optimizer = build_optimizer(spec.optimizer, ours)
    scheduler = build_schedule(spec.schedule, optimizer)
    assert scheduler is not None
    t_optimizer = torch.optim.AdamW(theirs.parameters(), lr=0.1)
    t_scheduler = textbook_schedule(t_optimizer)
    for i, (x, y) in enumerate(_batches(9)):
        if i in (2, 5):  # during the warmup and during the decay
            set_lr(optimizer, scheduler, 0.01 * i)
            # The textbook loop's way: the groups and the base every scheduler refers to.
            for group in t_optimizer.param_groups:
                group["lr"] = group["initial_lr"] = 0.01 * i
            for s in [t_scheduler, *t_scheduler._schedulers]:
                s.base_lrs = [0.01 * i]
            assert current_lr(optimizer) == 0.01 * i
        for module, opt, sched in (
            (ours, optimizer, scheduler),
            (theirs, t_optimizer, t_scheduler),
        ):
            opt.zero_grad()
            nn.functional.mse_loss(module(x), y).backward()
            opt.step()
            sched.step()
    assert current_lr(optimizer) == t_optimizer.param_groups[0]["lr"]
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)


def test_schedule_state_round_trips_through_state_dict() -> None:
    schedule, _ = SCHEDULES[-1]
    spec = _spec(optimizer={"kind": "adam", "lr": 0.1}, schedule=schedule)
    module = _module()
    optimizer = build_optimizer(spec.optimizer, module)
    scheduler = build_schedule(spec.schedule, optimizer)
    assert scheduler is not None
    for x, y in _batches(4):
        optimizer.zero_grad()
        nn.functional.mse_loss(module(x), y).backward()
        optimizer.step()
        scheduler.step()
    saved_state = copy.deepcopy(scheduler.state_dict())
    saved_groups = copy.deepcopy(optimizer.state_dict())

    restored_module = _module()
    restored = build_optimizer(spec.optimizer, restored_module)
    restored_scheduler = build_schedule(spec.schedule, restored)
    assert restored_scheduler is not None
    restored.load_state_dict(saved_groups)
    restored_scheduler.load_state_dict(saved_state)
    restored_module.load_state_dict(module.state_dict())
    for x, y in _batches(3):
        for m, o, s in (
            (module, optimizer, scheduler),
            (restored_module, restored, restored_scheduler),
        ):
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            o.step()
            s.step()
    assert current_lr(optimizer) == current_lr(restored)
    for a, b in zip(module.parameters(), restored_module.parameters(), strict=True):
        assert torch.equal(a, b)
