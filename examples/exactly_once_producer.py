"""An exactly-once producer that survives a server restart.

Starts its own ``gradstream serve`` (loopback, a free port, checkpoints in a temporary
directory), streams 400 numbered batches with ``producer_id``, kills the server with
SIGKILL half-way, and starts it again on the same port. The producer reconnects, the
server restores its last checkpoint and tells the producer where it stands, the
producer re-sends what the checkpoint lacks, and every batch is applied exactly once:
the model ends at step 400.

Run it with ``python examples/exactly_once_producer.py`` (``gradstream`` on PATH, the
server extra installed).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gradstream.client import Client, ProducerStream

BATCHES = 400
SPEC = {
    "architecture": {"kind": "linear", "in_features": 4, "out_features": 1},
    "init": {"kind": "zeros"},
    "loss": {"kind": "mse"},
    "optimizer": {"kind": "sgd", "lr": 0.01},
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def serve(port: int, checkpoints: Path) -> subprocess.Popen[bytes]:
    """``gradstream serve`` on ``port``; returns once it serves."""
    ready = checkpoints / "ready.json"
    ready.unlink(missing_ok=True)
    process = subprocess.Popen(
        [
            "gradstream",
            "serve",
            "--port",
            str(port),
            "--health-port",
            "-1",
            "--metrics-port",
            "-1",
            "--device",
            "cpu",
            "--checkpoint-dir",
            str(checkpoints),
            "--checkpoint-every-steps",
            "50",
            "--ready-file",
            str(ready),
        ],
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("gradstream serve did not start")
        time.sleep(0.1)
    return process


def batches(seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    w = np.array([[1.0], [-1.0], [2.0], [0.5]], dtype=np.float32)
    for _ in range(BATCHES):
        x = rng.normal(size=(16, 4)).astype(np.float32)
        yield x, x @ w


def main() -> None:
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        checkpoints = Path(directory)
        server = serve(port, checkpoints)
        target = f"127.0.0.1:{port}"
        with Client(target) as client:
            client.create_model("producer-example", SPEC)
            applied = 0
            restarted = threading.Event()

            def restart() -> None:
                nonlocal server
                server.send_signal(signal.SIGKILL)  # no drain, no final checkpoint
                server.wait()
                print("server killed; starting it again on the same port")
                server = serve(port, checkpoints)
                restarted.set()

            stream = client.train("producer-example", batches(seed=0), producer_id="etl-1")
            assert isinstance(stream, ProducerStream)  # what train returns with a producer_id
            for result in stream:
                if result.outcome == "APPLIED":
                    applied += 1
                if result.sequence == BATCHES // 2 and not restarted.is_set():
                    threading.Thread(target=restart).start()
            restarted.wait()
            step = client.get_model("producer-example").step
            print(
                f"sent {BATCHES} batches; the model is at step {step}, "
                f"reconnects {stream.reconnects}, durable sequence {stream.durable_sequence}"
            )
            assert step == BATCHES, step
            print(
                json.dumps(
                    {
                        k: v.astype(float).ravel().round(3).tolist()
                        for k, v in client.parameters("producer-example").items()
                    }
                )
            )
        server.send_signal(signal.SIGTERM)
        server.wait(60)


if __name__ == "__main__":
    main()
