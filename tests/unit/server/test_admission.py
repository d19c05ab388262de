"""Exactly-once admission and non-finite losses in an accumulation window, on the Trainer.

The service tests (tests/integration/test_producer.py, test_accumulation.py) check these
through gRPC; these check the same rules in process, on both step paths, against the plain
PyTorch loop, so that `make mutate` (docs/testing.md) sees them in seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gradstream.server.batches import Batch
from gradstream.server.engine import Outcome, StepResult, Trainer, TrainOptions
from gradstream.server.errors import FailedPrecondition
from gradstream.server.models import loss_value
from tests.unit.server.test_engine import batches, poisoned, spec

CPU = torch.device("cpu")


def _parameters(trainer: Trainer) -> dict[str, bytes]:
    return {n: p.detach().numpy().tobytes() for n, p in trainer.module.named_parameters()}


def _gradients(trainer: Trainer) -> dict[str, bytes | None]:
    return {
        n: None if p.grad is None else p.grad.numpy().tobytes()
        for n, p in trainer.module.named_parameters()
    }


def _train(trainer: Trainer, items: list[Batch], options: TrainOptions) -> list[StepResult]:
    results, error = trainer.train_batches(items, options)
    assert error is None
    return results


@pytest.mark.parametrize("deferred", [False, True])
def test_a_resent_sequence_is_duplicate_and_changes_nothing(deferred: bool) -> None:
    trainer = Trainer("t", spec(), CPU, deferred=deferred)
    data = batches(3)
    options = TrainOptions(producer_id="p")
    sent = [Batch(b.x, b.y, sequence=i + 1) for i, b in enumerate(data)]
    assert [r.outcome for r in _train(trainer, sent, options)] == [Outcome.APPLIED] * 3
    assert trainer.producers == {"p": 3}
    before = _parameters(trainer), trainer.step
    again = _train(trainer, [sent[1], sent[2]], options)
    assert [(r.outcome, r.sequence, r.step) for r in again] == [
        (Outcome.DUPLICATE, 2, 3),
        (Outcome.DUPLICATE, 3, 3),
    ]
    assert (_parameters(trainer), trainer.step) == before
    assert trainer.producers == {"p": 3}
    # The next sequence is new; so is the same sequence from another producer.
    fresh = _train(trainer, [Batch(data[0].x, data[0].y, sequence=4)], options)
    other = _train(trainer, [sent[0]], TrainOptions(producer_id="q"))
    assert [r.outcome for r in fresh + other] == [Outcome.APPLIED] * 2
    assert trainer.producers == {"p": 4, "q": 1}


@pytest.mark.parametrize("deferred", [False, True])
def test_without_a_producer_or_a_sequence_nothing_is_a_duplicate(deferred: bool) -> None:
    trainer = Trainer("t", spec(), CPU, deferred=deferred)
    data = batches(2)
    numbered = [Batch(b.x, b.y, sequence=1) for b in data]
    # No producer id: sequences are the client's numbering, never remembered.
    results = _train(trainer, numbered, TrainOptions())
    assert [(r.outcome, r.sequence) for r in results] == [(Outcome.APPLIED, 1)] * 2
    # A producer, unnumbered batches: numbered by their place in the stream, not marked.
    options = TrainOptions(producer_id="p")
    results = _train(trainer, data + data, options)
    assert [(r.outcome, r.sequence) for r in results] == [
        (Outcome.APPLIED, i) for i in (1, 2, 3, 4)
    ]
    assert trainer.producers == {} and trainer.step == 6


@pytest.mark.parametrize("deferred", [False, True])
def test_a_skipped_batch_is_done_with_and_its_resend_is_duplicate(deferred: bool) -> None:
    trainer = Trainer("t", spec(), CPU, deferred=deferred)
    bad = Batch(poisoned(batches(1)[0]).x, batches(1)[0].y, sequence=1)
    options = TrainOptions(producer_id="p")
    [first] = _train(trainer, [bad], options)
    assert (first.outcome, first.sequence, first.reason) == (
        Outcome.SKIPPED_NONFINITE,
        1,
        "loss is not finite",
    )
    assert first.loss is not None and not np.isfinite(first.loss)
    assert first.step == 0  # the model's step, which the skipped batch did not advance
    assert trainer.nonfinite_streak == 1 and trainer.producers == {"p": 1}
    [again] = _train(trainer, [bad], options)
    assert again.outcome is Outcome.DUPLICATE and trainer.nonfinite_streak == 1


@pytest.mark.parametrize("deferred", [False, True])
def test_report_every_reads_back_every_kth_loss(deferred: bool) -> None:
    trainer = Trainer("t", spec(), CPU, deferred=deferred)
    results = _train(trainer, batches(5), TrainOptions(report_every=2))
    assert [r.loss is not None for r in results] == [False, True, False, True, False]
    assert [r.step for r in results] == [1, 2, 3, 4, 5]
    assert trainer.last_loss is not None and np.isfinite(trainer.last_loss)


def _textbook(data: list[Batch], accumulate: int) -> nn.Module:
    """The plain loop over ``data``: zero_grad, ``accumulate`` backward passes, step."""
    module = Trainer("r", spec(), CPU).module  # the spec's initial weights
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    for start in range(0, len(data) - len(data) % accumulate, accumulate):
        optimizer.zero_grad()
        for b in data[start : start + accumulate]:
            nn.functional.mse_loss(module(b.x), b.y).backward()
        optimizer.step()
    return module


# The exact path only: the deferred one skips the whole step (docs/semantics.md).
@pytest.mark.parametrize("bad_at", [0, 1, 2])
def test_a_nonfinite_loss_mid_window_leaves_the_window_as_if_never_sent(bad_at: int) -> None:
    data = batches(6, seed=4)
    sent = list(data)
    sent.insert(bad_at, poisoned(data[bad_at]))  # one bad batch inside the first window
    trainer = Trainer("t", spec(accumulate_steps=3), CPU)
    clean = Trainer("c", spec(accumulate_steps=3), CPU)
    outcomes = []
    for i, b in enumerate(sent):
        [result] = _train(trainer, [b], TrainOptions())
        outcomes.append(result.outcome)
        if i == bad_at:
            # The pending gradients are those of the good batches before it, bit for bit.
            assert trainer.pending == bad_at
            assert _gradients(trainer) == _gradients(clean)
        else:
            _train(clean, [b], TrainOptions())
            assert _gradients(trainer) == _gradients(clean)
    expected = [Outcome.ACCUMULATED, Outcome.ACCUMULATED, Outcome.APPLIED] * 2
    expected.insert(bad_at, Outcome.SKIPPED_NONFINITE)
    assert outcomes == expected
    assert trainer.step == 2 and trainer.nonfinite_streak == 0
    reference = _textbook(data, 3)
    for mine, theirs in zip(trainer.module.parameters(), reference.parameters(), strict=True):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("deferred", [False, True])
def test_a_message_cancelled_before_its_first_batch_trains_nothing(deferred: bool) -> None:
    trainer = Trainer("t", spec(), CPU, deferred=deferred)
    before = _parameters(trainer)
    results, error = trainer.train_batches(batches(2), TrainOptions(), lambda: True)
    assert (results, error) == ([], None)
    assert _parameters(trainer) == before and trainer.step == 0


@pytest.mark.parametrize("deferred", [False, True])
def test_a_finite_loss_with_a_nonfinite_gradient_skips_the_step(deferred: bool) -> None:
    linear = {"kind": "linear", "in_features": 1, "out_features": 1}
    init = {"kind": "tensors", "tensors": {"weight": [[1.0]], "bias": [0.0]}}
    trainer = Trainer("t", spec(architecture=linear, init=init), CPU, deferred=deferred)
    good = Batch(torch.ones(2, 1), torch.zeros(2, 1))
    _train(trainer, [good], TrainOptions())  # momentum exists
    before = (
        _parameters(trainer),
        [s["momentum_buffer"].clone() for s in trainer.optimizer.state.values()],
    )
    # loss (1.5e19)^2 fits float32; its gradient 2 * 1.5e19 * 1.5e19 does not.
    bad = Batch(torch.full((1, 1), 1.5e19), torch.zeros(1, 1))
    [result] = _train(trainer, [bad], TrainOptions())
    assert result.loss is not None and np.isfinite(result.loss)
    assert (result.outcome, result.reason, result.step) == (
        Outcome.SKIPPED_NONFINITE,
        "gradient is not finite",
        1,
    )
    assert trainer.step == 1 and trainer.nonfinite_streak == 1
    assert _parameters(trainer) == before[0]
    assert trainer.last_loss == 1.0  # of the last applied step, not the skipped one
    [again] = _train(trainer, [bad], TrainOptions())
    assert again.outcome is Outcome.SKIPPED_NONFINITE and trainer.nonfinite_streak == 2
    for mine, saved in zip(trainer.optimizer.state.values(), before[1], strict=True):
        assert torch.equal(mine["momentum_buffer"], saved)
    # The next good batch steps from where the model was, as if the bad one never came.
    clean = Trainer("c", spec(architecture=linear, init=init), CPU, deferred=deferred)
    _train(clean, [good, good], TrainOptions())
    _train(trainer, [good], TrainOptions())
    assert _parameters(trainer) == _parameters(clean) and trainer.nonfinite_streak == 0


def test_sample_weights_reach_the_loss() -> None:
    data = batches(1, seed=7)[0]
    w = torch.linspace(0.1, 2.0, len(data.x))
    trainer = Trainer("t", spec(), CPU)
    _train(trainer, [Batch(data.x, data.y, w)], TrainOptions())
    # The textbook step with the weighted loss of docs/semantics.md.
    module = Trainer("r", spec(), CPU).module
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    loss_value(trainer.spec.loss, module(data.x), data.y, w).backward()
    optimizer.step()
    unweighted = Trainer("u", spec(), CPU)
    _train(unweighted, [data], TrainOptions())
    assert _parameters(trainer) == _parameters_of(module)
    assert _parameters(trainer) != _parameters(unweighted)


def _parameters_of(module: nn.Module) -> dict[str, bytes]:
    return {n: p.detach().numpy().tobytes() for n, p in module.named_parameters()}


def test_a_model_with_every_parameter_frozen_refuses_to_train() -> None:
    trainer = Trainer("t", spec(), CPU)
    trainer.update(None, tuple(n for n, _ in trainer.module.named_parameters()), ())
    with pytest.raises(FailedPrecondition) as caught:
        trainer.train(batches(1)[0], TrainOptions())
    assert str(caught.value) == "model 't' has no trainable parameters"


@pytest.mark.parametrize("deferred", [False, True])
def test_a_diverged_model_says_how_to_train_it_again(deferred: bool) -> None:
    trainer = Trainer("t", spec(), CPU, max_nonfinite_steps=2, deferred=deferred)
    _train(trainer, [poisoned(b) for b in batches(2)], TrainOptions())
    _, error = trainer.train_batches(batches(1), TrainOptions())
    assert error is not None and error.message == (
        "model 't' diverged: 2 non-finite steps in a row; set its parameters to train it again"
    )
