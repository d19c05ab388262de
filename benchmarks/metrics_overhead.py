"""What metrics cost: steps per second with metrics on against off, small batches.

Two real ``gradstream serve`` processes run side by side, one with the metrics
port (scraped every ``--scrape-every`` seconds, 15 as in
deploy/prometheus/prometheus.yml) and one with ``--metrics-port -1``. Timed
runs alternate between them so drift on a shared machine hits both alike; the
figure is the median of the per-round ratios. It also prints each server's CPU
time per step (from /proc), which other load on the machine disturbs far less
than wall-clock rates. ``--control`` runs both servers without metrics to show
the noise floor. Not a test: it prints numbers, it asserts nothing.

    .venv/bin/python benchmarks/metrics_overhead.py [--rounds 7] [--batches 20000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

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


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), 0 elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _timed(
    client: Client, server: LocalServer, batches: list[tuple[np.ndarray, np.ndarray]]
) -> tuple[float, float]:
    """Steps per second, and the server's CPU microseconds per step."""
    assert server.process is not None
    cpu = _cpu_seconds(server.process.pid)
    start = time.perf_counter()
    count = sum(1 for _ in client.train("bench", batches, report_every=64))
    elapsed = time.perf_counter() - start
    return count / elapsed, 1e6 * (_cpu_seconds(server.process.pid) - cpu) / count


def _scraper(port: int, every: float, stop: threading.Event) -> None:
    while not stop.wait(every):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            r.read()


def _servers(control: bool) -> Iterator[tuple[str, LocalServer]]:
    common = ("--device", "cpu", "--threads", "1")
    # --control: "on" is a second metrics-off server, to show the harness's noise floor.
    yield "on", LocalServer(*common, *(("--metrics-port", "-1") if control else ()))
    yield "off", LocalServer(*common, "--metrics-port", "-1")


def _components(rows: int, scrape_every: float, rounds: int = 300) -> None:
    """In one process, interleaved: a 64-batch message's training against its metrics work.

    Load from elsewhere slows both sides of each ratio alike, so this resolves
    fractions of a percent where the end-to-end rates above cannot.
    """
    import torch
    from prometheus_client import generate_latest

    from gradstream.server.batches import Batch
    from gradstream.server.engine import Trainer, TrainOptions
    from gradstream.server.metrics import Metrics
    from gradstream.server.spec import parse_spec
    from gradstream.v1 import trainer_pb2

    torch.set_num_threads(1)
    trainer = Trainer("bench", parse_spec(SPEC), torch.device("cpu"))
    metrics = Metrics()
    metrics.model_created("bench", 0.01)
    metrics.grpc.preinitialize([trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"]])
    batches = [
        Batch(torch.from_numpy(x), torch.from_numpy(y), None, 0) for x, y in _batches(64, rows)
    ]
    options = TrainOptions(report_every=64)
    times: dict[str, list[float]] = {"train": [], "record": [], "sample": [], "scrape": []}
    for i in range(rounds):
        start = time.perf_counter()
        results = [trainer.train(batch, options) for batch in batches]
        middle = time.perf_counter()
        metrics.record("bench", [(r, rows) for r in results], middle - start)
        recorded = time.perf_counter()
        metrics.sample(trainer)  # 64 steps always pass a multiple of metrics_every (10)
        end = time.perf_counter()
        times["train"].append(middle - start)
        times["record"].append(recorded - middle)
        times["sample"].append(end - recorded)
        if i % 10 == 0:
            start = time.perf_counter()
            generate_latest(metrics.registry)
            times["scrape"].append(time.perf_counter() - start)
    train, record, sample, scrape = (statistics.median(times[k]) for k in times)
    # one scrape per scrape_every seconds, spread over the messages trained meanwhile
    scrape_share = scrape * train / scrape_every
    extra = (record + sample + scrape_share) / train
    print(
        f"per 64-batch message: training {1e6 * train:.0f} us; record {1e6 * record:.1f} us, "
        f"sample {1e6 * sample:.1f} us, scrape {1e3 * scrape:.1f} ms every {scrape_every:g} s "
        f"({1e6 * scrape_share:.2f} us a message): metrics add {100 * extra:.2f} % "
        f"(steps/s on/off {1 / (1 + extra):.4f})"
    )


def main() -> None:
    """Run the rounds and print steps/s per mode and the overhead."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batches", type=int, default=20000)
    parser.add_argument("--rows", type=int, default=8, help="rows per batch")
    parser.add_argument(
        "--scrape-every",
        type=float,
        default=15.0,
        help="seconds between scrapes of the metrics server (deploy/prometheus: 15)",
    )
    parser.add_argument(
        "--control", action="store_true", help="both servers without metrics (an A/A run)"
    )
    parser.add_argument(
        "--components-only", action="store_true", help="only the in-process breakdown"
    )
    args = parser.parse_args()
    if args.components_only:
        _components(args.rows, args.scrape_every)
        return
    batches = _batches(args.batches, args.rows)
    servers = dict(_servers(args.control))
    clients: dict[str, Client] = {}
    stop = threading.Event()
    try:
        for mode, server in servers.items():
            server.start()
            clients[mode] = Client(server.target)
            clients[mode].create_model("bench", SPEC)
            _timed(clients[mode], server, batches[: args.batches // 4])  # warm up
        assert servers["off"].metrics_port == 0
        if servers["on"].metrics_port:
            threading.Thread(
                target=_scraper,
                args=(servers["on"].metrics_port, args.scrape_every, stop),
                daemon=True,
            ).start()
        rates: dict[str, list[float]] = {"on": [], "off": []}
        cpu: dict[str, list[float]] = {"on": [], "off": []}
        for i in range(args.rounds):
            order = ("on", "off") if i % 2 == 0 else ("off", "on")
            for mode in order:
                rate, micros = _timed(clients[mode], servers[mode], batches)
                rates[mode].append(rate)
                cpu[mode].append(micros)
            print(
                f"round {i + 1}: on {rates['on'][-1]:6.0f} steps/s {cpu['on'][-1]:6.1f} us CPU/step"
                f"   off {rates['off'][-1]:6.0f} steps/s {cpu['off'][-1]:6.1f} us CPU/step"
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
    # CPU time per step is what a shared machine's load disturbs least.
    on_cpu, off_cpu = statistics.median(cpu["on"]), statistics.median(cpu["off"])
    print(
        f"median server CPU per step: on {on_cpu:.1f} us, off {off_cpu:.1f} us "
        f"(on/off {on_cpu / off_cpu:.4f}, extra {100 * (on_cpu / off_cpu - 1):+.2f} %)"
    )
    _components(args.rows, args.scrape_every)


if __name__ == "__main__":
    main()
