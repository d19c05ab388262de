"""CUDA: the service on a GPU (skipped without one; benchmarks/gpu.sh runs these on a lent GPU)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from gradstream.client import Client
from gradstream.server.batches import Batch
from gradstream.server.config import Settings
from gradstream.server.engine import Outcome, Trainer, TrainOptions
from gradstream.server.main import BackgroundServer
from gradstream.server.spec import parse_spec

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
SPEC: dict[str, Any] = {
    "architecture": {"kind": "mlp", "in_features": 16, "hidden": [64], "out_features": 1},
    "init": {"kind": "seed", "seed": 1},
    "optimizer": {"kind": "sgd", "lr": 0.01, "momentum": 0.9},
}


def _batches(count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        (rng.normal(size=(32, 16)).astype(np.float32), rng.normal(size=(32, 1)).astype(np.float32))
        for _ in range(count)
    ]


def test_training_on_cuda_matches_the_cpu_loop() -> None:
    settings = Settings(port=0, health_port=-1, metrics_port=-1, device="cuda")
    data = _batches(20)
    with BackgroundServer(settings) as server, Client(server.target) as client:
        info = client.create_model("gpu", SPEC)
        assert info.device.startswith("cuda")
        initial = client.parameters("gpu")
        results = list(client.train("gpu", data))
        assert [r.outcome for r in results] == ["APPLIED"] * 20
        got = client.parameters("gpu")
    module = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    module.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in initial.items()})
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
    for x, y in data:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(module(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        optimizer.step()
    for name, value in module.state_dict().items():
        np.testing.assert_allclose(got[name], value.numpy(), rtol=1e-4, atol=1e-5)


def test_steady_state_steps_make_no_host_device_sync_outside_the_reporting_read() -> None:
    device = torch.device("cuda")
    trainer = Trainer("sync", parse_spec(SPEC), device)
    assert trainer.deferred
    staged = [
        trainer.stage(Batch(torch.from_numpy(x), torch.from_numpy(y))) for x, y in _batches(64)
    ]
    trainer.train_batches(staged[:4], TrainOptions())  # warm-up: momentum buffers exist
    resolve = trainer._resolve

    def reporting_read(*args: Any) -> Any:
        torch.cuda.set_sync_debug_mode(0)  # the one read a response needs
        try:
            return resolve(*args)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    trainer._resolve = reporting_read  # type: ignore[method-assign, assignment]
    torch.cuda.set_sync_debug_mode("error")
    try:
        results, error = trainer.train_batches(staged[4:], TrainOptions(report_every=8))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert error is None
    assert [r.outcome for r in results] == [Outcome.APPLIED] * 60
    assert trainer.step == 64
    assert all(p.device.type == "cuda" for p in trainer.module.parameters())
    assert all(s["momentum_buffer"].device.type == "cuda" for s in trainer.optimizer.state.values())
