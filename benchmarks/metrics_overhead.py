"""What metrics cost: steps per second with metrics on against off, small batches.

Two real ``gradstream serve`` processes run side by side, one with the metrics
port (and a scraper hitting it every second, harsher than Prometheus's usual
15 s) and one with ``--metrics-port -1``. Timed runs alternate between them so
drift on a shared machine hits both alike; the figure is the median of the
per-round ratios. Not a test: it prints numbers, it asserts nothing.

    .venv/bin/python benchmarks/metrics_overhead.py [--rounds 7] [--batches 20000]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import urllib.request
from collections.abc import Iterator

import numpy as np
from gradstream.client import Client
from gradstream.client._local import LocalServer

SPEC = {
    "architecture": {"kind": "linear", "in_features": 8, "out_features": 1},
    "loss": {"kind": "mse"},
    "optimizer": {"kind": "sgd", "lr": 0.01},
}


def _batches(count: int, rows: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(count, rows, 8)).astype(np.float32)
    y = x.sum(axis=2, keepdims=True)
    return list(zip(x, y, strict=True))


def _steps_per_second(client: Client, batches: list[tuple[np.ndarray, np.ndarray]]) -> float:
    start = time.perf_counter()
    count = sum(1 for _ in client.train("bench", batches, report_every=64))
    return count / (time.perf_counter() - start)


def _scraper(port: int, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            r.read()


def _servers() -> Iterator[tuple[str, LocalServer]]:
    yield "on", LocalServer("--device", "cpu", "--threads", "1")
    yield "off", LocalServer("--device", "cpu", "--threads", "1", "--metrics-port", "-1")


def main() -> None:
    """Run the rounds and print steps/s per mode and the overhead."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batches", type=int, default=20000)
    parser.add_argument("--rows", type=int, default=8, help="rows per batch")
    args = parser.parse_args()
    batches = _batches(args.batches, args.rows)
    servers = dict(_servers())
    clients: dict[str, Client] = {}
    stop = threading.Event()
    try:
        for mode, server in servers.items():
            server.start()
            clients[mode] = Client(server.target)
            clients[mode].create_model("bench", SPEC)
            _steps_per_second(clients[mode], batches[: args.batches // 4])  # warm up
        assert servers["off"].metrics_port == 0
        threading.Thread(
            target=_scraper, args=(servers["on"].metrics_port, stop), daemon=True
        ).start()
        rates: dict[str, list[float]] = {"on": [], "off": []}
        for i in range(args.rounds):
            order = ("on", "off") if i % 2 == 0 else ("off", "on")
            for mode in order:
                rates[mode].append(_steps_per_second(clients[mode], batches))
            print(
                f"round {i + 1}: on {rates['on'][-1]:8.0f} steps/s   "
                f"off {rates['off'][-1]:8.0f} steps/s"
            )
    finally:
        stop.set()
        for client in clients.values():
            client.close()
        for server in servers.values():
            server.stop()
    ratios = [on / off for on, off in zip(rates["on"], rates["off"], strict=True)]
    ratio = statistics.median(ratios)
    print(
        f"median steps/s: on {statistics.median(rates['on']):.0f}, "
        f"off {statistics.median(rates['off']):.0f}; "
        f"on/off median ratio {ratio:.4f} (overhead {100 * (1 - ratio):+.2f} %), "
        f"ratios {min(ratios):.3f}..{max(ratios):.3f}"
    )


if __name__ == "__main__":
    main()
