"""The benchmark scenarios: shapes, models and the data every contender trains on."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class Scenario:
    """One workload: batches of ``rows`` x ``features`` float32 into the model ``spec``."""

    name: str
    rows: int
    features: int
    spec: dict[str, Any]
    distinct_batches: int = 16
    batches_per_message: int = 64
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_bytes(self) -> int:
        """Bytes of x and y in one batch."""
        return self.rows * (self.features + 1) * 4

    def rates(self, steps: int, seconds: float) -> dict[str, float]:
        """Steps, samples and bytes per second of ``steps`` batches in ``seconds``."""
        rate = steps / seconds
        return {
            "steps_per_s": rate,
            "samples_per_s": rate * self.rows,
            "bytes_per_s": rate * self.batch_bytes,
        }

    def batches(self) -> list[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]]:
        """A fixed set of batches, cycled by every contender (same data for all)."""
        rng = np.random.default_rng(0)
        out = []
        for _ in range(self.distinct_batches):
            x = rng.uniform(-1, 1, (self.rows, self.features)).astype(np.float32)
            y = (x.sum(axis=1, keepdims=True) * 0.5).astype(np.float32)
            out.append((x, y))
        return out


def _linear(features: int) -> dict[str, Any]:
    return {
        "architecture": {"kind": "linear", "in_features": features, "out_features": 1},
        "init": {"kind": "zeros"},
        "loss": {"kind": "mse"},
        "optimizer": {"kind": "sgd", "lr": 0.01},
    }


SCENARIOS: dict[str, Scenario] = {
    "small": Scenario("small", 4, 1, _linear(1), notes="the seed's shape: linear, batch 4 x 1"),
    "medium": Scenario(
        "medium",
        256,
        64,
        {
            "architecture": {
                "kind": "mlp",
                "in_features": 64,
                "hidden": [64, 64],
                "out_features": 1,
                "activation": "relu",
            },
            "init": {"kind": "seed", "seed": 0},
            "loss": {"kind": "mse"},
            "optimizer": {"kind": "sgd", "lr": 0.001},
        },
        notes="mlp 64-64-64-1, batch 256 x 64",
    ),
    "large": Scenario(
        "large",
        65536,
        16,
        _linear(16),
        distinct_batches=4,
        batches_per_message=1,
        notes="linear, batch 65,536 x 16 (about 4.2 MB a message)",
    ),
}
SCENARIOS["soak"] = Scenario(
    "soak", 256, 64, SCENARIOS["medium"].spec, notes="medium's stream, held for --seconds"
)

OPTIMIZERS = ("sgd", "adam")


def scenario(name: str, optimizer: str = "sgd") -> Scenario:
    """The scenario ``name`` with its model trained by ``optimizer`` at the same lr.

    ``adam`` is ``torch.optim.Adam`` with torch's defaults besides the lr, on every
    contender (the loop builds the same class).
    """
    base = SCENARIOS[name]
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer {optimizer!r}: choose from {', '.join(OPTIMIZERS)}")
    if optimizer == base.spec["optimizer"]["kind"]:
        return base
    lr = base.spec["optimizer"]["lr"]
    return replace(base, spec={**base.spec, "optimizer": {"kind": optimizer, "lr": lr}})
