"""Stream batches from a Python generator with the SDK, then evaluate on held-out data.

Needs a running server (``gradstream serve``; GRADSTREAM_TARGET picks another than
127.0.0.1:50051). The batches are produced lazily, one at a time, as a data pipeline
would; the SDK sends them as they come and yields one result per batch.

Evaluation here runs ``predict`` on held-out inputs and computes the metric on the
client. (A server-side Evaluate call is being added; this example does not need it.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from gradstream.client import Client

TARGET = os.environ.get("GRADSTREAM_TARGET", "127.0.0.1:50051")
TRUE_W = np.array([[2.0], [-3.0], [0.5]], dtype=np.float32)
SPEC = {
    "architecture": {"kind": "linear", "in_features": 3, "out_features": 1},
    "init": {"kind": "zeros"},
    "loss": {"kind": "mse"},
    "optimizer": {"kind": "sgd", "lr": 0.05},
}


def batches(count: int, size: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(x, y) pairs of y = x @ TRUE_W + 1 + noise, made on demand."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        x = rng.normal(size=(size, 3)).astype(np.float32)
        noise = rng.normal(0, 0.01, (size, 1)).astype(np.float32)
        yield x, x @ TRUE_W + 1.0 + noise


def main() -> None:
    name = "example-generator"
    with Client(TARGET) as client:
        client.create_model(name, SPEC)
        try:
            last = None
            for result in client.train(name, batches(300, 64, seed=0), report_every=50):
                if result.loss is not None:
                    print(f"step {result.step}: loss {result.loss:.6f}")
                last = result
            assert last is not None
            held_out_x, held_out_y = next(batches(1, 1000, seed=1))
            predicted = client.predict(name, held_out_x)
            mse = float(np.mean((predicted - held_out_y) ** 2))
            print(f"held-out mse after {last.step} steps: {mse:.6f}")
            weights = client.parameters(name)
            print(
                f"learned weight {weights['weight'].ravel().round(2)}, "
                f"bias {weights['bias'].round(2)}"
            )
        finally:
            client.delete_model(name)


if __name__ == "__main__":
    main()
