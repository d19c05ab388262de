"""``session.train_message``: rejections keep their place and count; cancelling stops it."""

from __future__ import annotations

import pytest
import torch

from gradstream.server.batches import Batch
from gradstream.server.engine import Outcome, Trainer, TrainOptions
from gradstream.server.session import Rejected, train_message
from tests.unit.server.test_engine import batches, poisoned, spec

CPU = torch.device("cpu")


@pytest.mark.parametrize("deferred", [False, True])
def test_rejections_are_numbered_by_their_place_and_carry_the_models_step(deferred: bool) -> None:
    trainer = Trainer("t", spec(), CPU, deferred=deferred)
    good = batches(1)[0]
    items: list[Batch | Rejected] = [Rejected("a"), good, Rejected("b"), Rejected("c")]
    results, error = train_message(trainer, items, TrainOptions())
    assert error is None
    assert [(r.outcome, r.sequence, r.step) for r in results] == [
        (Outcome.REJECTED, 1, 0),
        (Outcome.APPLIED, 2, 1),
        (Outcome.REJECTED, 3, 1),
        (Outcome.REJECTED, 4, 1),
    ]


@pytest.mark.parametrize("deferred", [False, True])
def test_cancelling_stops_inside_a_run_of_batches(deferred: bool) -> None:
    trainer = Trainer("t", spec(), CPU, deferred=deferred)
    calls = iter([False, True, True, True])
    results, error = train_message(trainer, list(batches(3)), TrainOptions(), lambda: next(calls))
    assert error is None and len(results) == 1 and trainer.step == 1


@pytest.mark.parametrize("deferred", [False, True])
def test_a_message_of_rejections_only_does_not_touch_a_diverged_model(deferred: bool) -> None:
    trainer = Trainer("t", spec(), CPU, max_nonfinite_steps=1, deferred=deferred)
    trainer.train_batches([poisoned(batches(1)[0])], TrainOptions())
    results, error = train_message(trainer, [Rejected("bad")], TrainOptions())
    assert error is None and [r.outcome for r in results] == [Outcome.REJECTED]
    _, error = train_message(trainer, batches(1), TrainOptions())
    assert error is not None and "diverged" in error.message
