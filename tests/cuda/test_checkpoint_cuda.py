"""CUDA: checkpoints taken off the GPU restore onto it bitwise; fused optimizers step there.

Skipped without a GPU; not run on the CPU-only machine this was written on.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gradstream.server import checkpoint as ck
from gradstream.server.batches import Batch
from gradstream.server.engine import Outcome, Trainer, TrainerFactory, TrainOptions
from gradstream.server.spec import parse_spec

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
SPEC = {
    "architecture": {"kind": "mlp", "in_features": 16, "hidden": [64], "out_features": 1},
    "init": {"kind": "seed", "seed": 1},
    "optimizer": {"kind": "sgd", "lr": 0.01, "momentum": 0.9},
    "accumulate_steps": 2,
}


def _batches(trainer: Trainer, n: int) -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    return [
        trainer.stage(
            Batch(torch.randn(32, 16, generator=g), torch.randn(32, 1, generator=g), sequence=i + 1)
        )
        for i in range(n)
    ]


def test_checkpoint_mid_accumulation_on_cuda_restores_bitwise(tmp_path: Path) -> None:
    device = torch.device("cuda")
    reference = Trainer("m", parse_spec(SPEC), device)
    reference.train_batches(_batches(reference, 21), TrainOptions(producer_id="p"))
    first = Trainer("m", parse_spec(SPEC), device)
    batches = _batches(first, 21)
    first.train_batches(batches[:11], TrainOptions(producer_id="p"))
    assert first.pending == 1
    ck.write(tmp_path / "m", ck.take(first), keep=1)
    resumed = ck.restore(ck.newest(tmp_path / "m")[1], TrainerFactory(device))
    assert all(p.device.type == "cuda" for p in resumed.module.parameters())
    resumed.train_batches(_batches(resumed, 21), TrainOptions(producer_id="p"))
    assert resumed.step == reference.step and resumed.producers == {"p": 21}
    for (name, got), want in zip(
        resumed.module.named_parameters(), reference.module.parameters(), strict=True
    ):
        assert torch.equal(got, want), name
        assert torch.equal(
            resumed.optimizer.state[got]["momentum_buffer"],
            reference.optimizer.state[want]["momentum_buffer"],
        )


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_fused_optimizers_step_and_skip_on_the_deferred_path(kind: str) -> None:
    """The GPU's default path hands found_inf to fused kernels that also count steps."""
    spec = parse_spec({**SPEC, "optimizer": {"kind": kind, "lr": 0.01}, "accumulate_steps": 1})
    trainer = Trainer("m", spec, torch.device("cuda"))
    assert trainer.deferred
    good = _batches(trainer, 3)
    results, error = trainer.train_batches(good[:2], TrainOptions())
    assert error is None and [r.outcome for r in results] == [Outcome.APPLIED] * 2
    before = [p.detach().clone() for p in trainer.module.parameters()]
    bad = Batch(good[2].x * 3e38, good[2].y)
    results, _ = trainer.train_batches([bad], TrainOptions())
    assert [r.outcome for r in results] == [Outcome.SKIPPED_NONFINITE]
    for p, q in zip(trainer.module.parameters(), before, strict=True):
        assert torch.equal(p, q)
    results, _ = trainer.train_batches(good[2:], TrainOptions())
    assert [r.outcome for r in results] == [Outcome.APPLIED] and trainer.step == 3
