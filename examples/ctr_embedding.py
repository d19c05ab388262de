"""Click-through prediction with ``embedding_mlp``: ids and dense features as named inputs.

Needs a running server (``gradstream serve``; GRADSTREAM_TARGET picks another than
127.0.0.1:50051); the client needs numpy only. Synthetic click logs: each impression has
a user id, an item id, the categories of the user's last three clicks (a bag of ids) and
four dense features; whether it was clicked depends on all of them. The model has one
``EmbeddingBag`` table per id input and an mlp over the concatenated features; it trains
with Adam under a linear warmup then cosine decay, is evaluated on held-out impressions
(log loss and ROC AUC, against the base rate's log loss), and exported as safetensors.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np

from gradstream.client import Client, NotFound

TARGET = os.environ.get("GRADSTREAM_TARGET", "127.0.0.1:50051")
USERS, ITEMS, CATEGORIES, BAG, DENSE = 300, 200, 12, 3, 4
STEPS, BATCH, WARMUP = 300, 256, 30

SPEC = {
    "architecture": {
        "kind": "embedding_mlp",
        "embeddings": [
            {"input": "user", "num_embeddings": USERS, "dim": 8, "mode": "sum"},
            {"input": "item", "num_embeddings": ITEMS, "dim": 8, "mode": "sum"},
            {"input": "category", "num_embeddings": CATEGORIES, "dim": 4, "mode": "mean"},
        ],
        "dense_features": DENSE,
        "hidden": [32, 16],
        "out_features": 1,
        "activation": "relu",
    },
    "loss": {"kind": "bce_with_logits"},
    "optimizer": {"kind": "adam", "lr": 0.01},
    # Linear warmup over WARMUP steps, then cosine decay to a tenth of the lr.
    "schedule": {
        "kind": "sequential",
        "schedulers": [
            {"kind": "linear", "start_factor": 0.1, "end_factor": 1.0, "total_iters": WARMUP},
            {"kind": "cosine_annealing", "t_max": STEPS - WARMUP, "eta_min": 0.001},
        ],
        "milestones": [WARMUP],
    },
    "init": {"kind": "seed", "seed": 0},
}


class ClickLog:
    """Impressions whose click probability comes from latent user, item and category tastes."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.user_taste = rng.normal(size=(USERS, 3))
        self.item_style = rng.normal(size=(ITEMS, 3))
        self.item_category = rng.integers(0, CATEGORIES, ITEMS)
        self.category_pull = rng.normal(size=CATEGORIES)
        self.dense_weight = np.array([1.0, -0.8, 0.5, 0.0])

    def sample(self, rows: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """A batch: named inputs (ids as int64, features as float32) and clicks (0/1)."""
        rng = self.rng
        user = rng.integers(0, USERS, rows)
        item = rng.integers(0, ITEMS, rows)
        history = rng.integers(0, CATEGORIES, (rows, BAG))
        dense = rng.normal(size=(rows, DENSE))
        logit = (
            (self.user_taste[user] * self.item_style[item]).sum(axis=1)
            + 0.7 * (history == self.item_category[item, None]).sum(axis=1)
            + 0.5 * self.category_pull[self.item_category[item]]
            + dense @ self.dense_weight
            - 1.0
        )
        clicked = rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))
        inputs: dict[str, np.ndarray] = {
            "user": user[:, None],  # (rows, 1): a bag of one id
            "item": item[:, None],
            "category": history,  # (rows, 3): the last three clicked categories
            "dense": dense.astype(np.float32),
        }
        return inputs, clicked.astype(np.float32)[:, None]


def main() -> None:
    name = "example-ctr"
    log = ClickLog(seed=7)
    held_out = [log.sample(1024) for _ in range(4)]
    rate = float(np.mean(np.concatenate([y for _, y in held_out])))
    chance = -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))
    with Client(TARGET) as client:
        with contextlib.suppress(NotFound):
            client.delete_model(name)  # from an earlier run
        info = client.create_model(name, SPEC)
        shown = ", ".join(f"{i.name} ({i.kind})" for i in info.inputs)
        print(f"created {name}; inputs: {shown}")
        before = client.evaluate(name, held_out)
        results = list(client.train(name, (log.sample(BATCH) for _ in range(STEPS)), 50))
        after = client.evaluate(name, held_out)
        lr = client.get_model(name).lr
        print(f"trained {results[-1].step} steps, lr now {lr:.4g}")
        print(f"held-out log loss: {after['log_loss']:.4f} (base rate's {chance:.4f})")
        print(f"held-out roc auc: {before['roc_auc']:.3f} before, {after['roc_auc']:.3f} after")
        one = {k: v[:3] for k, v in held_out[0][0].items()}
        print(f"click probabilities of 3 impressions: {_sigmoid(client.predict(name, one))}")
        with tempfile.TemporaryDirectory() as folder:
            (path,) = client.export(name, "safetensors", Path(folder) / "ctr.safetensors")
            print(f"exported {path.name}, {path.stat().st_size} bytes")
        client.delete_model(name)
        print(f"deleted {name}")


def _sigmoid(logits: np.ndarray) -> list[float]:
    return [round(float(p), 3) for p in 1.0 / (1.0 + np.exp(-logits.reshape(-1)))]


if __name__ == "__main__":
    main()
