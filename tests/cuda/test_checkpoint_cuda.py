"""CUDA: a checkpoint taken off the GPU (deferred path, fused SGD) restores onto it bitwise.

Skipped without a GPU; not run on the CPU-only machine this was written on.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gradstream.server import checkpoint as ck
from gradstream.server.batches import Batch
from gradstream.server.engine import Trainer, TrainerFactory, TrainOptions
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
