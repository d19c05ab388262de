"""Contender (a): the plain in-process PyTorch loop, as the seed notebook writes it."""

from __future__ import annotations

import time

import torch
from torch import nn

from gradstream.bench.scenarios import Scenario


def build(spec: dict[str, object], features: int) -> nn.Module:
    """The scenario's model written out by hand."""
    arch = spec["architecture"]
    assert isinstance(arch, dict)
    if arch["kind"] == "linear":
        return nn.Linear(features, 1)
    widths = [features, *arch["hidden"], 1]
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(widths[i], widths[i + 1]))
    return nn.Sequential(*layers)


def run_loop(scenario: Scenario, seconds: float, device: str) -> dict[str, float]:
    """zero_grad, forward, loss, backward, step, loss.item(): steps/s over ``seconds``."""
    dev = torch.device(device)
    model = build(scenario.spec, scenario.features).to(dev)
    optimizer_spec = scenario.spec["optimizer"]
    assert isinstance(optimizer_spec, dict)
    lr = float(optimizer_spec["lr"])
    optimizer: torch.optim.Optimizer
    if optimizer_spec["kind"] == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    # Batches arrive from the host, as they would from a producer.
    host = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in scenario.batches()]
    steps = 0
    warmup_end = time.perf_counter() + min(0.5, seconds / 4)
    start = None
    while True:
        for x_host, y_host in host:
            x, y = x_host.to(dev, non_blocking=True), y_host.to(dev, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            loss.item()
            now = time.perf_counter()
            if start is None:
                if now >= warmup_end:
                    start, steps = now, 0
                continue
            steps += 1
            if now - start >= seconds:
                return scenario.rates(steps, now - start)
