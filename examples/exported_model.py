"""Bring your own model: a network gradstream has no builder for, sent as a torch.export archive.

Needs a running server (``gradstream serve``; GRADSTREAM_TARGET picks another than
127.0.0.1:50051) and torch on the client (``export_module`` imports it). The network, a
small residual MLP with layer norm, is defined here, traced with ``torch.export`` and
sent with CreateModel; the server trains the archive's module with the spec's loss and
optimizer. Nothing from the archive is executed on the server beyond the traced ATen
graph (docs/bring-your-own-model.md).
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
from torch import nn

from gradstream.client import Client, NotFound, export_module

TARGET = os.environ.get("GRADSTREAM_TARGET", "127.0.0.1:50051")
FEATURES = 6


class ResidualMLP(nn.Module):
    """x -> Linear -> (LayerNorm -> Linear -> GELU) + skip -> Linear: one regression output."""

    def __init__(self, features: int, width: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(features, width)
        self.norm = nn.LayerNorm(width)
        self.block = nn.Linear(width, width)
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h + nn.functional.gelu(self.block(self.norm(h)))
        out: torch.Tensor = self.head(h)
        return out


def data(rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A smooth nonlinear target a linear model cannot fit."""
    x = rng.normal(size=(rows, FEATURES)).astype(np.float32)
    y = np.sin(x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3] - 0.25 * x[:, 3:4]
    return x, y.astype(np.float32)


def main() -> None:
    name = "example-exported"
    torch.manual_seed(0)
    module = ResidualMLP(FEATURES)
    # Traced in the mode it trains in; this network has no dropout or batch norm.
    program = export_module(module, (torch.randn(8, FEATURES),))
    spec = {
        "architecture": {"kind": "exported"},  # in_features/out_features come from the program
        "loss": {"kind": "mse"},
        "optimizer": {"kind": "adam", "lr": 0.01},
        "clip_grad": {"max_norm": 1.0},
    }
    rng = np.random.default_rng(1)
    with Client(TARGET) as client:
        with contextlib.suppress(NotFound):
            client.delete_model(name)  # from an earlier run
        info = client.create_model(name, spec, program=program)
        print(f"created {name} from a {len(program)}-byte archive: {sorted(info.parameters)}")
        held_x, held_y = data(512, rng)
        before = float(np.mean((client.predict(name, held_x) - held_y) ** 2))
        batches = [data(64, rng) for _ in range(400)]
        results = list(client.train(name, batches, report_every=100))
        after = float(np.mean((client.predict(name, held_x) - held_y) ** 2))
        print(f"trained {results[-1].step} steps")
        print(f"held-out mse: {before:.4f} before, {after:.4f} after")
        client.delete_model(name)
        print(f"deleted {name}")


if __name__ == "__main__":
    main()
