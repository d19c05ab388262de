"""The Train reply built in place equals the one built result by result."""

from __future__ import annotations

import math

from gradstream.server.engine import Outcome, StepResult
from gradstream.server.metrics import SmoothedLoss
from gradstream.server.servicer import _result, _train_response
from gradstream.v1 import trainer_pb2 as pb


def test_the_reply_is_the_same_message_for_every_kind_of_result() -> None:
    results = [
        StepResult(1, 1, Outcome.APPLIED, 0.25),
        StepResult(2, 1, Outcome.ACCUMULATED, None),
        StepResult(3, 1, Outcome.REJECTED, reason="batches[2].x: has dtype int32"),
        StepResult(4, 1, Outcome.SKIPPED_NONFINITE, math.inf, "loss is not finite"),
        StepResult(5, 2, Outcome.DUPLICATE),
        StepResult(6, 3, Outcome.APPLIED, 0.0),  # a loss of 0.0 is still sent
    ]
    for durable in (0, 7):
        expected = pb.TrainResponse(
            results=[_result(r) for r in results], last_durable_sequence=durable
        )
        built = _train_response(results, durable)
        assert built == expected
        assert built.SerializeToString() == expected.SerializeToString()
    assert _train_response(results, 0).results[5].HasField("loss")
    assert not _train_response(results, 0).results[1].HasField("loss")


def test_smoothed_loss_in_blocks_equals_one_loss_at_a_time() -> None:
    losses = [0.9, 0.7, 0.8, 0.3, 0.55, 0.1, 0.2]
    one, blocks = SmoothedLoss(3), SmoothedLoss(3)
    for loss in losses:
        one.add([loss])
    blocks.add(losses[:4])
    blocks.add([])
    blocks.add(losses[4:])
    assert blocks.ema == one.ema  # bit for bit, not approximately
    assert list(blocks.losses) == list(one.losses) == losses[-3:]
    assert blocks.mean == one.mean
