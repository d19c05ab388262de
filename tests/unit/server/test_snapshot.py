"""Parameter snapshots: copies between steps, predictions bit for bit as ``module(x)``."""

from __future__ import annotations

import threading

import torch
from torch import nn

from gradstream.server.batches import Batch
from gradstream.server.engine import TrainerFactory, TrainOptions
from gradstream.server.snapshot import Snapshots
from gradstream.server.spec import parse_spec

MLP = {
    "architecture": {"kind": "mlp", "in_features": 5, "out_features": 2, "hidden": [7, 3]},
    "optimizer": {"kind": "sgd", "lr": 0.1, "momentum": 0.9},
}


def test_a_prediction_equals_the_modules_own_output_bitwise_and_reports_the_step() -> None:
    trainer = TrainerFactory(torch.device("cpu")).build("m", parse_spec(MLP))
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(16, 5, generator=g), torch.randn(16, 2, generator=g))
    for _ in range(3):
        trainer.train(batch, TrainOptions())
    x = torch.randn(9, 5, generator=g)
    y, version = trainer.snapshots.predict(x)
    with torch.inference_mode():
        expected = trainer.module(x)
    assert version == 3
    assert torch.equal(y, expected)


def test_a_published_snapshot_is_not_written_by_later_steps() -> None:
    trainer = TrainerFactory(torch.device("cpu")).build("m", parse_spec(MLP))
    batch = Batch(torch.ones(4, 5), torch.zeros(4, 2))
    trainer.train(batch, TrainOptions())
    first = trainer.snapshots.newest()
    kept = {n: t.clone() for n, t in first.tensors.items()}
    trainer.train(batch, TrainOptions())
    assert all(torch.equal(first.tensors[n], kept[n]) for n in kept)
    second = trainer.snapshots.newest()
    assert (first.version, second.version) == (1, 2)
    assert not torch.equal(second.tensors["0.weight"], first.tensors["0.weight"])
    # Nothing changed since: the same copy serves, no new one is made.
    assert trainer.snapshots.newest() is second


def test_a_waiting_prediction_gets_the_copy_made_at_the_step_boundary() -> None:
    trainer = TrainerFactory(torch.device("cpu")).build("m", parse_spec(MLP))
    batch = Batch(torch.ones(4, 5), torch.zeros(4, 2))
    got: list[int] = []
    with trainer.snapshots.busy:  # the worker is in a job: the prediction cannot copy
        waiter = threading.Thread(target=lambda: got.append(trainer.snapshots.newest().version))
        waiter.start()
        while not trainer.snapshots.wanted:
            waiter.join(0.001)
        trainer.train(batch, TrainOptions())  # publishes at its step boundary
        waiter.join(10)
    assert got == [1]


def test_buffers_are_copied_and_used() -> None:
    norm = nn.BatchNorm1d(4)
    module = nn.Sequential(nn.Linear(3, 4), norm).eval()
    norm.load_state_dict(
        norm.state_dict()
        | {"running_mean": torch.full((4,), 0.5), "running_var": torch.full((4,), 2.0)}
    )
    snapshots = Snapshots(module, torch.device("cpu"), lambda: 0)
    x = torch.randn(6, 3)
    y, _ = snapshots.predict(x)
    with torch.inference_mode():
        assert torch.equal(y, module(x))


def test_while_predictions_come_a_job_end_publishes_so_none_waits_for_a_step() -> None:
    trainer = TrainerFactory(torch.device("cpu")).build("m", parse_spec(MLP))
    snapshots = trainer.snapshots
    batch = Batch(torch.ones(4, 5), torch.zeros(4, 2))
    assert snapshots.ready() is None  # nothing copied yet; this prediction makes it hot
    with snapshots.busy:  # a worker job of two steps
        trainer.train(batch, TrainOptions())
        trainer.train(batch, TrainOptions())
        snapshots.settle()
    with snapshots.busy:  # the next job, under way: its steps are not answered yet
        trainer.train(batch, TrainOptions())
        ready = snapshots.ready()
        assert ready is not None and ready.version == 2
        # What it reads is the parameters after step 2, not the live ones of step 3.
        _, version = snapshots.predict(torch.ones(1, 5), snapshot=ready)
        assert version == 2
        live = dict(trainer.module.named_parameters())["0.weight"]
        assert not torch.equal(ready.tensors["0.weight"], live)
    # Still strict where asked: newest() without settled sees step 3 (copies, no job runs).
    assert snapshots.newest().version == 3


def test_without_predictions_a_job_end_copies_nothing() -> None:
    trainer = TrainerFactory(torch.device("cpu")).build("m", parse_spec(MLP))
    batch = Batch(torch.ones(4, 5), torch.zeros(4, 2))
    with trainer.snapshots.busy:
        trainer.train(batch, TrainOptions())
        trainer.snapshots.settle()
    assert trainer.snapshots.ready() is None  # settled at step 1, and no copy was made
