"""The CPU step's shortcuts (layer chain, direct engine call, plain SGD) equal the eager loop.

Each shortcut skips Python bookkeeping only; these tests hold them to the seed's loop written
with ``nn.Module``, ``loss.backward()`` and ``torch.optim.SGD``, bit for bit, through a
learning-rate change and a freeze half-way.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from gradstream.server import engine
from gradstream.server.batches import Batch
from gradstream.server.engine import Outcome, Trainer, TrainOptions
from gradstream.server.models import forward_function
from gradstream.server.spec import parse_spec

CPU = torch.device("cpu")
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
}


def architecture(kind: str, activation: str) -> dict[str, Any]:
    if kind == "linear":
        return {"kind": "linear", "in_features": 4, "out_features": 2}
    return {
        "kind": "mlp",
        "in_features": 4,
        "hidden": [6, 5],
        "out_features": 2,
        "activation": activation,
    }


def eager_module(arch: dict[str, Any]) -> nn.Module:
    if arch["kind"] == "linear":
        return nn.Linear(4, 2)
    widths = [4, *arch["hidden"], 2]
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        if i:
            layers.append(ACTIVATIONS[arch["activation"]]())
        layers.append(nn.Linear(widths[i], widths[i + 1]))
    return nn.Sequential(*layers)


CASES = [("linear", "relu")] + [("mlp", a) for a in ACTIVATIONS]


@pytest.mark.parametrize(("kind", "activation"), CASES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("accumulate", [1, 3])
def test_cpu_step_shortcuts_equal_the_eager_loop_bitwise(
    kind: str, activation: str, dtype: str, accumulate: int
) -> None:
    arch = architecture(kind, activation)
    spec = parse_spec(
        {
            "architecture": arch,
            "init": {"kind": "seed", "seed": 7},
            "optimizer": {"kind": "sgd", "lr": 0.05},
            "accumulate_steps": accumulate,
            "dtype": dtype,
        }
    )
    trainer = Trainer("m", spec, CPU)
    # The shortcuts are what runs here; without them this test would compare torch to itself.
    assert trainer._forward is not trainer.module
    assert trainer._raw_step == trainer._plain_sgd_step

    torch_dtype = getattr(torch, dtype)
    module = eager_module(arch).to(torch_dtype)
    with torch.no_grad():
        for (_, mine), (_, theirs) in zip(
            module.named_parameters(), trainer.module.named_parameters(), strict=True
        ):
            mine.copy_(theirs)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05)
    first_weight = next(n for n, _ in module.named_parameters() if n.endswith("weight"))

    rng = np.random.default_rng(1)
    options = TrainOptions()
    for i in range(24):
        if i == 12:  # UpdateModel half-way: a new lr and a frozen first weight
            trainer.update(0.01, (first_weight,), ())
            for group in optimizer.param_groups:
                group["lr"] = 0.01
            dict(module.named_parameters())[first_weight].requires_grad_(False)
            dict(module.named_parameters())[first_weight].grad = None
        rows = int(rng.integers(1, 9))
        x = torch.from_numpy(rng.normal(size=(rows, 4))).to(torch_dtype)
        y = torch.from_numpy(rng.normal(size=(rows, 2))).to(torch_dtype)
        result = trainer.train(Batch(x, y), options)
        if i % accumulate == 0:
            optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(module(x), y)
        loss.backward()
        if i % accumulate == accumulate - 1:
            optimizer.step()
            assert result.outcome is Outcome.APPLIED
        assert result.loss == loss.item()

    for (name, mine), (_, theirs) in zip(
        module.named_parameters(), trainer.module.named_parameters(), strict=True
    ):
        assert theirs.detach().numpy().tobytes() == mine.detach().numpy().tobytes(), name


def test_other_optimizers_keep_torchs_own_step() -> None:
    for optimizer in ({"momentum": 0.9}, {"weight_decay": 0.01}, {"maximize": True}):
        spec = parse_spec(
            {
                "architecture": architecture("linear", "relu"),
                "optimizer": {"kind": "sgd", "lr": 0.1, **optimizer},
            }
        )
        trainer = Trainer("m", spec, CPU)
        assert trainer._raw_step != trainer._plain_sgd_step, optimizer


def test_forward_function_calls_the_module_itself_unless_it_knows_every_layer() -> None:
    known = nn.Sequential(nn.Linear(3, 4), nn.GELU(approximate="tanh"), nn.Linear(4, 1))
    chain = forward_function(known)
    assert chain is not known
    x = torch.randn(5, 3)
    assert torch.equal(chain(x), known(x))

    unknown = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.0), nn.Linear(4, 1))
    assert forward_function(unknown) is unknown

    hooked = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    calls: list[int] = []
    handle = hooked[1].register_forward_hook(lambda *_: calls.append(1))
    assert forward_function(hooked) is hooked
    handle.remove()
    assert forward_function(hooked) is not hooked

    # A hook on every module call, registered globally: only the module itself runs it.
    handle = nn.modules.module.register_module_forward_hook(lambda *_: calls.append(1))
    try:
        assert forward_function(hooked) is hooked
    finally:
        handle.remove()

    class Scaled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    assert forward_function(Scaled(3, 1)) is not None
    assert isinstance(forward_function(Scaled(3, 1)), Scaled)
    assert forward_function(nn.ReLU(inplace=True)) is not torch.relu


def test_backward_falls_back_to_the_public_call_without_the_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert engine._engine_backward() is not torch.autograd.backward  # this torch: direct
    monkeypatch.delattr(torch.autograd.Variable, "_execution_engine")
    assert engine._engine_backward() is torch.autograd.backward


def test_backward_falls_back_when_the_engine_call_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    def changed(*args: object, **kwargs: object) -> None:
        raise TypeError("run_backward(): incompatible function arguments")

    monkeypatch.setattr(
        torch.autograd.Variable, "_execution_engine", SimpleNamespace(run_backward=changed)
    )
    assert engine._engine_backward() is torch.autograd.backward
