"""The Trainer's two paths: exact (CPU) and deferred (one device read per message, as on CUDA)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from gradstream.server import engine
from gradstream.server.batches import Batch
from gradstream.server.engine import Outcome, StepKind, Trainer, TrainOptions
from gradstream.server.session import decode
from gradstream.server.spec import parse_spec
from gradstream.server.wire import from_message
from gradstream.v1 import trainer_pb2 as pb
from gradstream.wire import to_proto
from tests.integration.test_named_inputs import SPEC, inputs, target

CPU = torch.device("cpu")


def spec(**overrides: Any) -> Any:
    base: dict[str, Any] = {
        "architecture": {"kind": "mlp", "in_features": 3, "hidden": [5], "out_features": 2},
        "init": {"kind": "seed", "seed": 3},
        "optimizer": {"kind": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.01},
    }
    base.update(overrides)
    return parse_spec(base)


def batches(count: int, seed: int = 0) -> list[Batch]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        rows = int(rng.integers(1, 6))
        out.append(
            Batch(
                torch.from_numpy(rng.normal(size=(rows, 3)).astype(np.float32)),
                torch.from_numpy(rng.normal(size=(rows, 2)).astype(np.float32)),
            )
        )
    return out


def state(trainer: Trainer) -> dict[str, bytes]:
    values = {n: p.detach().numpy().tobytes() for n, p in trainer.module.named_parameters()}
    for i, s in enumerate(trainer.optimizer.state.values()):
        values[f"momentum{i}"] = s["momentum_buffer"].numpy().tobytes()
    return values


def poisoned(batch: Batch) -> Batch:
    """Finite inputs whose loss overflows: the model sees them, validation does not mind."""
    return Batch(batch.x * 3e38, batch.y)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_deferred_path_agrees_with_the_exact_path(accumulate: int) -> None:
    data = batches(12)
    exact = Trainer("e", spec(accumulate_steps=accumulate), CPU, deferred=False)
    deferred = Trainer("d", spec(accumulate_steps=accumulate), CPU, deferred=True)
    assert deferred.optimizer.defaults["fused"] is True
    r1, e1 = exact.train_batches(list(data), TrainOptions(report_every=2))
    r2, e2 = deferred.train_batches(list(data), TrainOptions(report_every=2))
    assert e1 is None and e2 is None
    assert [(r.outcome, r.step, r.sequence) for r in r1] == [
        (r.outcome, r.step, r.sequence) for r in r2
    ]
    assert [r.loss is None for r in r1] == [r.loss is None for r in r2]
    for (n, a), b in zip(
        exact.module.named_parameters(), deferred.module.parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)


def test_deferred_skips_a_nonfinite_step_leaving_parameters_and_momentum_untouched() -> None:
    trainer = Trainer("d", spec(), CPU, deferred=True)
    good = batches(3)
    trainer.train_batches(good[:1], TrainOptions())
    before = state(trainer)
    results, _ = trainer.train_batches([poisoned(good[1])], TrainOptions())
    assert [r.outcome for r in results] == [Outcome.SKIPPED_NONFINITE]
    assert results[0].reason == "loss is not finite"
    assert state(trainer) == before
    assert trainer.step == 1 and trainer.nonfinite_streak == 1
    results, _ = trainer.train_batches(good[2:], TrainOptions())
    assert [r.outcome for r in results] == [Outcome.APPLIED]
    assert trainer.step == 2 and trainer.nonfinite_streak == 0


def test_deferred_skipped_first_step_leaves_no_uninitialized_momentum() -> None:
    exact = Trainer("e", spec(), CPU, deferred=False)
    deferred = Trainer("d", spec(), CPU, deferred=True)
    data = batches(3)
    for trainer in (exact, deferred):
        results, _ = trainer.train_batches([poisoned(data[0]), *data[1:]], TrainOptions())
        assert [r.outcome for r in results] == [
            Outcome.SKIPPED_NONFINITE,
            Outcome.APPLIED,
            Outcome.APPLIED,
        ]
    for a, b in zip(exact.module.parameters(), deferred.module.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_deferred_nonfinite_micro_batch_skips_its_whole_accumulated_step() -> None:
    trainer = Trainer("d", spec(accumulate_steps=3), CPU, deferred=True)
    data = batches(6)
    trainer.train_batches(data[:3], TrainOptions())
    before = state(trainer)
    results, _ = trainer.train_batches([data[3], poisoned(data[4]), data[5]], TrainOptions())
    assert [r.outcome for r in results] == [
        Outcome.ACCUMULATED,
        Outcome.SKIPPED_NONFINITE,
        Outcome.SKIPPED_NONFINITE,
    ]
    assert state(trainer) == before
    assert trainer.step == 1
    # The bad micro-batch is answered as the exact path answers it: its place, its loss, why.
    bad = results[1]
    assert (bad.sequence, bad.step, bad.reason) == (2, 1, "loss is not finite")
    assert bad.loss is not None and not np.isfinite(bad.loss)


def _parameters(trainer: Trainer) -> dict[str, bytes]:
    return {n: p.detach().numpy().tobytes() for n, p in trainer.module.named_parameters()}


def _optimizer_state(trainer: Trainer) -> list[dict[str, bytes]]:
    return [
        {k: v.numpy().tobytes() for k, v in s.items() if isinstance(v, torch.Tensor)}
        for s in trainer.optimizer.state.values()
    ]


@pytest.mark.parametrize(
    "optimizer",
    [
        {"kind": "adam", "lr": 0.01},
        {"kind": "adamw", "lr": 0.01, "weight_decay": 0.1},
        {"kind": "adagrad", "lr": 0.1},
    ],
    ids=lambda o: o["kind"],
)
def test_deferred_path_steps_and_skips_every_fused_optimizer_like_the_exact_path(
    optimizer: dict[str, Any],
) -> None:
    """The deferred path hands found_inf to fused kernels that also count steps (Adam's)."""
    model = spec(optimizer=optimizer)
    exact = Trainer("e", model, CPU, deferred=False)
    deferred = Trainer("d", model, CPU, deferred=True)
    assert deferred.kind is StepKind.DEFERRED
    data = batches(4, seed=5)
    for trainer in (exact, deferred):
        results, error = trainer.train_batches(data[:2], TrainOptions())
        assert error is None and [r.outcome for r in results] == [Outcome.APPLIED] * 2
    before = (_parameters(deferred), _optimizer_state(deferred))
    results, _ = deferred.train_batches([poisoned(data[2])], TrainOptions())
    assert [r.outcome for r in results] == [Outcome.SKIPPED_NONFINITE]
    assert (_parameters(deferred), _optimizer_state(deferred)) == before
    for trainer in (exact, deferred):
        trainer.train_batches(data[3:], TrainOptions())
        assert trainer.step == 3
    for (n, a), b in zip(
        exact.module.named_parameters(), deferred.module.parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)


def _weighted(data: list[Batch]) -> list[Batch]:
    return [Batch(b.x, b.y, torch.linspace(0.1, 2.0, len(b.x))) for b in data]


def _named(count: int) -> list[Batch]:
    """Batches of a model of three named inputs (two id bags and dense features)."""
    checker = Trainer("c", parse_spec(SPEC), CPU).checker
    out = []
    for i in range(count):
        wire = pb.Batch(
            inputs=[pb.NamedTensor(name=k, tensor=to_proto(v)) for k, v in inputs(4, i).items()],
            y=to_proto(target(4, i)),
        )
        [message] = from_message(pb.TrainRequest(batches=[wire])).batches
        batch = decode(checker, message, i, None)
        assert isinstance(batch, Batch)
        out.append(batch)
    return out


@pytest.mark.parametrize("case", ["weights", "clip", "named inputs"])
def test_deferred_path_takes_weights_every_input_and_clipping_like_the_exact_path(
    case: str,
) -> None:
    """What the deferred (GPU) path passes to the loss and the optimizer, run on the CPU."""
    if case == "named inputs":  # without its schedule, which keeps a model off this path
        model: Any = parse_spec({k: v for k, v in SPEC.items() if k != "schedule"})
        data = _named(4)
    else:
        extra = {"clip_grad": {"max_norm": 1e-2}} if case == "clip" else {}
        model = spec(accumulate_steps=2, **extra)
        data = _weighted(batches(6)) if case == "weights" else batches(6)
    exact = Trainer("e", model, CPU, deferred=False)
    deferred = Trainer("d", model, CPU, deferred=True)
    assert deferred.kind is StepKind.DEFERRED
    r1, e1 = exact.train_batches(list(data), TrainOptions())
    r2, e2 = deferred.train_batches(list(data), TrainOptions())
    assert e1 is None and e2 is None
    assert [r.outcome for r in r1] == [r.outcome for r in r2]
    assert exact.step == deferred.step > 0
    for (n, a), b in zip(
        exact.module.named_parameters(), deferred.module.parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)
    if case == "clip":
        assert exact.grad_norm is not None and deferred.grad_norm is not None
        torch.testing.assert_close(float(deferred.grad_norm), float(exact.grad_norm))
    if case == "weights":  # the weights changed the step: a run without them ends elsewhere
        plain = Trainer("p", model, CPU, deferred=True)
        plain.train_batches([Batch(b.x, b.y) for b in data], TrainOptions())
        assert not torch.equal(next(plain.module.parameters()), next(deferred.module.parameters()))


@pytest.mark.parametrize("deferred", [False, True])
def test_cancel_stops_before_the_next_batch(deferred: bool) -> None:
    trainer = Trainer("t", spec(), CPU, deferred=deferred)
    calls = iter([False, False, True, True])
    results, _ = trainer.train_batches(list(batches(4)), TrainOptions(), lambda: next(calls))
    assert len(results) == 2
    assert trainer.step == 2


@pytest.mark.parametrize("deferred", [False, True])
def test_divergence_guard_stops_training(deferred: bool) -> None:
    trainer = Trainer("t", spec(), CPU, max_nonfinite_steps=2, deferred=deferred)
    bad = [poisoned(b) for b in batches(2)]
    results, error = trainer.train_batches(bad, TrainOptions())
    assert [r.outcome for r in results] == [Outcome.SKIPPED_NONFINITE] * 2
    assert error is None
    results, error = trainer.train_batches(batches(1), TrainOptions())
    assert results == []
    assert error is not None and "diverged" in error.message


def test_the_autograd_chain_walk_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    layers = {"kind": "mlp", "in_features": 2, "out_features": 1, "hidden": [2] * 8}
    trainer = Trainer("m", parse_spec({"architecture": layers}), torch.device("cpu"))
    assert len(trainer.autograd_chain()) > 5
    monkeypatch.setattr(engine, "MAX_CHAIN_NODES", 5)
    assert len(trainer.autograd_chain()) == 5


def test_the_schedule_steps_once_per_applied_step_and_not_on_skipped_ones() -> None:
    schedule = {"kind": "step", "step_size": 1, "gamma": 0.5}
    trainer = Trainer("m", spec(accumulate_steps=3, schedule=schedule), CPU)
    options = TrainOptions()
    outcomes = [trainer.train(b, options).outcome for b in batches(6)]
    assert outcomes.count(Outcome.APPLIED) == 2
    assert trainer.lr == 0.05 * 0.5**2  # two steps, not six batches
    # Finite inputs whose loss overflows float32: the step is skipped, lr stays.
    huge = Batch(torch.full((1, 3), 3e38), torch.zeros(1, 2))
    for _ in range(3):
        assert trainer.train(huge, options).outcome is Outcome.SKIPPED_NONFINITE
    assert trainer.lr == 0.05 * 0.5**2
    assert trainer.info().lr == trainer.lr


def test_update_lr_restarts_the_schedule_from_the_new_value() -> None:
    trainer = Trainer("m", spec(schedule={"kind": "exponential", "gamma": 0.5}), CPU)
    options = TrainOptions()
    for b in batches(2):
        trainer.train(b, options)
    trainer.update(0.2, (), ())
    assert trainer.lr == 0.2 and trainer.spec.optimizer.lr == 0.2
    trainer.train(batches(1)[0], options)
    assert trainer.lr == 0.1
    assert trainer.schedule is not None and trainer.schedule.base_lrs == [0.2]


def test_clipping_keeps_the_norm_before_it() -> None:
    trainer = Trainer("m", spec(clip_grad={"max_norm": 1e-3}), CPU)
    assert trainer.grad_norm is None
    trainer.train(batches(1)[0], TrainOptions())
    assert trainer.grad_norm is not None and float(trainer.grad_norm) > 1e-3
    grads = [p.grad for p in trainer.module.parameters() if p.grad is not None]
    after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert float(after) <= 1e-3 * (1 + 1e-5)


def test_reset_optimizer_gives_adagrad_the_state_it_starts_with() -> None:
    optimizer = {"kind": "adagrad", "lr": 0.1, "initial_accumulator_value": 0.5}
    trainer = Trainer("m", spec(optimizer=optimizer), CPU)
    fresh = Trainer("f", spec(optimizer=optimizer), CPU)
    options = TrainOptions()
    for b in batches(3):
        trainer.train(b, options)
    params, _ = fresh.parameters()
    trainer.set_parameters(params, reset_optimizer=True)
    for b in batches(3, seed=1):
        assert trainer.train(b, options).outcome is Outcome.APPLIED
        fresh.train(b, TrainOptions())
    for mine, theirs in zip(trainer.module.parameters(), fresh.module.parameters(), strict=True):
        assert torch.equal(mine, theirs)
