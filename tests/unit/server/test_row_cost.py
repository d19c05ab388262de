"""models.py: the per-row memory cost that bounds a batch before it runs (activation_row_bytes)."""

from __future__ import annotations

import pytest
from torch import nn

from gradstream.server import models
from gradstream.server.spec import ArchitectureSpec, parse_spec


def _wide_plugin(arch: ArchitectureSpec) -> nn.Module:
    return nn.Sequential(
        nn.Linear(arch.in_features, 4096), nn.ReLU(), nn.Linear(4096, arch.out_features)
    )


def test_a_plugins_per_row_cost_is_measured_on_the_meta_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(models, "architectures", lambda: {"wide": _wide_plugin})
    plugin = parse_spec({"architecture": {"kind": "wide", "in_features": 1, "out_features": 1}})
    builtin = parse_spec(
        {"architecture": {"kind": "mlp", "in_features": 1, "out_features": 1, "hidden": [4096]}}
    )
    # The same network either way: the measured cost is the built-in formula's, near enough.
    measured, formula = models.activation_row_bytes(plugin), models.activation_row_bytes(builtin)
    assert formula == 4 * (2 * 4096 + 1 + 2 * 4096)
    assert 0.5 * formula <= measured <= 2 * formula


def test_a_plugin_that_cannot_run_on_meta_tensors_has_no_measured_cost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Opaque(nn.Module):
        def forward(self, x: object) -> object:
            raise RuntimeError("needs real data")

    monkeypatch.setattr(models, "architectures", lambda: {"opaque": lambda _: Opaque()})
    spec = parse_spec({"architecture": {"kind": "opaque", "in_features": 1, "out_features": 1}})
    assert models.activation_row_bytes(spec) == 0
