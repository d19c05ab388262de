"""``gradstream demo``: the seed notebook's linear regression, trained through the service."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np

from gradstream.client._client import Client
from gradstream.client._local import LocalServer

SEED_SPEC = {
    "architecture": {"kind": "linear", "in_features": 1, "out_features": 1, "bias": False},
    "init": {"kind": "zeros"},
    "loss": {"kind": "mse", "reduction": "mean"},
    "optimizer": {"kind": "sgd", "lr": 0.01},
}


def run_demo(target: str | None = None, steps: int = 100) -> int:
    """Train f(x) = w * x on x=[1,2,3,4], y=[2,4,6,8]; print the trajectory like the notebook."""
    if target is None:
        print("starting a local gradstream server ...")
        with LocalServer("--metrics-port", "-1", "--health-port", "-1") as server:
            return _demo(server.target, steps)
    return _demo(target, steps)


def _demo(target: str, steps: int) -> int:
    x = np.array([[1], [2], [3], [4]], dtype=np.float32)
    y = np.array([[2], [4], [6], [8]], dtype=np.float32)
    name = "seed-demo"
    with Client(target) as client:
        if name in {m.name for m in client.list_models()}:
            client.delete_model(name)
        info = client.create_model(name, SEED_SPEC)
        print(f"model {name!r} on {info.device}; loss graph: {' <- '.join(info.autograd_chain)}")
        five = np.array([[5.0]], dtype=np.float32)
        print(f"Prediction before training: f(5) = {client.predict(name, five).item():.3f}")

        grad = client.gradients(name, x, y)["weight"].item()
        # The notebook's numpy gradient np.dot(2x, y_hat - y) is a sum; the mean loss divides by N.
        oracle = float(np.dot(2 * x.ravel(), (0 * x - y).ravel())) / len(x)
        print(f"dloss/dw at w=0: autograd {grad:.4f}, numpy by hand {oracle:.4f}")

        # One batch in flight at a time, so the weight read after each result is that step's.
        turn = threading.Semaphore(1)

        def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for _ in range(steps):
                turn.acquire()
                yield x, y

        print("Training")
        for result in client.train(name, batches()):
            w = client.parameters(name)["weight"].item()
            print(f"epoch {result.step}: w = {w:.3f}, loss = {result.loss:.8f}")
            turn.release()
        print(f"Prediction after training: f(5) = {client.predict(name, five).item():.3f}")
        client.delete_model(name)
    return 0
