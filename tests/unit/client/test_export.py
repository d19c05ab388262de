"""``export_module``: bytes the server's loader accepts, with a dynamic batch dimension."""

from __future__ import annotations

import torch
from torch import nn

from gradstream.client import export_module
from gradstream.server.exported import load_program


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.a(x) * self.b(z)
        return out


def test_exported_bytes_load_on_the_server_and_take_any_row_count() -> None:
    torch.manual_seed(0)
    module = TwoInputs()
    data = export_module(module, (torch.randn(4, 3), torch.randn(4, 4)))
    loaded = load_program(data, 1 << 20).module()
    for rows in (2, 9):
        x, z = torch.randn(rows, 3), torch.randn(rows, 4)
        assert torch.equal(loaded(x, z), module(x, z))
