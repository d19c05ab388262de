"""A Train stream's message: rejected batches answered in their place, untrained."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradstream.server.batches import Batch
from gradstream.server.engine import Outcome, Trainer, TrainOptions
from gradstream.server.session import Rejected, train_message
from tests.unit.server.test_engine import batches, spec

CPU = torch.device("cpu")


@pytest.mark.parametrize("deferred", [False, True])
def test_rejected_and_duplicate_keep_their_place(deferred: bool) -> None:
    trainer = Trainer("t", spec(), CPU, deferred=deferred)
    good = batches(2)
    options = TrainOptions(producer_id="p")
    items: list[Batch | Rejected] = [
        Batch(good[0].x, good[0].y, sequence=5),
        Rejected("batches[1].x: bad", sequence=6),
        Batch(good[1].x, good[1].y, sequence=5),
        Batch(good[1].x, good[1].y, sequence=7),
    ]
    results, error = train_message(trainer, items, options)
    assert error is None
    assert [(r.outcome, r.sequence) for r in results] == [
        (Outcome.APPLIED, 5),
        (Outcome.REJECTED, 6),
        (Outcome.DUPLICATE, 5),
        (Outcome.APPLIED, 7),
    ]
    assert results[1].reason == "batches[1].x: bad"
    assert trainer.producers == {"p": 7}


@pytest.mark.parametrize("deferred", [False, True])
def test_a_rejection_alone_trains_nothing_and_counts_in_the_stream(deferred: bool) -> None:
    trainer = Trainer("t", spec(), CPU, deferred=deferred)
    options = TrainOptions(report_every=2)
    good = batches(1)[0]
    results, error = train_message(
        trainer, [Rejected("batches[0].y: bad"), Batch(good.x, good.y)], options
    )
    assert error is None
    assert [(r.outcome, r.sequence) for r in results] == [
        (Outcome.REJECTED, 1),
        (Outcome.APPLIED, 2),
    ]
    assert results[1].loss is not None  # the second batch of the stream: reported
    assert trainer.step == 1 and np.isfinite(results[1].loss)
