"""Contender (c), the client side: the SDK streaming a scenario into a live server.

Runs in its own process; prints steps/s, samples/s, MB/s and acknowledgement latency as JSON.
With ``--predict`` it sends batch-1 predictions instead and prints their latency. With
``--barrier DIR`` several of these processes measure over the same window: each writes
``DIR/ready-<index>`` after its warm-up and starts once ``DIR/go`` exists.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gradstream.bench.scenarios import OPTIMIZERS, SCENARIOS, scenario
from gradstream.client import Client

BARRIER_TIMEOUT_S = 120.0


def wait_barrier(barrier: Path | None, index: int) -> None:
    """Say this process is warmed up, then wait for the go (bounded)."""
    if barrier is None:
        return
    (barrier / f"ready-{index}").touch()
    deadline = time.monotonic() + BARRIER_TIMEOUT_S
    while not (barrier / "go").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no go in {barrier} after {BARRIER_TIMEOUT_S} s")
        time.sleep(0.005)


def run(
    target: str,
    scenario_name: str,
    seconds: float,
    *,
    shared: bool = False,
    model: str | None = None,
    create: bool = True,
    barrier: Path | None = None,
    index: int = 0,
    optimizer: str = "sgd",
) -> dict[str, Any]:
    """Warm up, then stream for ``seconds``; latency is batch yielded -> its result received."""
    chosen = scenario(scenario_name, optimizer)
    batches = chosen.batches()
    sent: list[float] = []
    name = model or f"bench-{chosen.name}"
    with Client(target, timeout=None) as client:
        if create:
            if name in {m.name for m in client.list_models()}:
                client.delete_model(name)
            client.create_model(name, chosen.spec)

        def stream(until: float, stamps: list[float] | None) -> Iterator[tuple[Any, Any]]:
            i = 0
            while time.perf_counter() < until:
                if stamps is not None:
                    stamps.append(time.perf_counter())
                yield batches[i % len(batches)]
                i += 1

        per_message = chosen.batches_per_message
        warmup = stream(time.perf_counter() + min(0.5, seconds / 4), None)
        for _ in client.train(name, warmup, batches_per_message=per_message, shared_memory=shared):
            pass
        wait_barrier(barrier, index)
        latencies: list[float] = []
        start, cpu = time.perf_counter(), time.process_time()
        steps = 0
        for result in client.train(
            name,
            stream(start + seconds, sent),
            batches_per_message=per_message,
            shared_memory=shared,
        ):
            latencies.append(time.perf_counter() - sent[steps])
            steps += 1
            assert result.outcome == "APPLIED", result
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu
        if create:
            client.delete_model(name)
    lat = np.array(latencies) if latencies else np.zeros(1)
    return {
        **chosen.rates(steps, elapsed),
        "latency_p50_s": float(np.percentile(lat, 50)),
        "latency_p99_s": float(np.percentile(lat, 99)),
        "client_cores": cpu / elapsed,  # this process's CPU (every thread) over the window
    }


def run_predict(
    target: str,
    scenario_name: str,
    seconds: float,
    model: str,
    *,
    rate: float = 0.0,
    barrier: Path | None = None,
    index: int = 0,
) -> dict[str, Any]:
    """Batch-1 predictions for ``seconds``: their latency.

    ``rate`` > 0 sends at that many predictions a second on a fixed schedule (an open
    loop, as a service's callers do) and counts each latency from the request's scheduled
    time, so a prediction that had to wait for an earlier one counts that wait too
    (no coordinated omission). ``rate`` 0 sends back to back (a closed loop: the client's
    own speed sets the load).
    """
    scenario = SCENARIOS[scenario_name]
    rows = [x[:1] for x, _ in scenario.batches()]
    with Client(target, timeout=None) as client:
        warmup_end = time.perf_counter() + min(0.5, seconds / 4)
        while time.perf_counter() < warmup_end:
            client.predict(model, rows[0])
        wait_barrier(barrier, index)
        latencies: list[float] = []
        cpu_start = time.process_time()
        start = time.perf_counter()
        now = start
        while now - start < seconds:
            if rate > 0:
                scheduled = start + len(latencies) / rate
                if scheduled > now:
                    time.sleep(scheduled - now)
            else:
                scheduled = now
            client.predict(model, rows[len(latencies) % len(rows)])
            now = time.perf_counter()
            latencies.append(now - scheduled)
        elapsed = now - start
        cpu = time.process_time() - cpu_start
    lat = np.array(latencies)
    return {
        "predictions_per_s": len(latencies) / elapsed,
        "rate": rate,
        "latency_p50_s": float(np.percentile(lat, 50)),
        "latency_p99_s": float(np.percentile(lat, 99)),
        "client_cores": cpu / elapsed,
    }


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m gradstream.bench.service_client --target T --scenario S``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--shared-memory", action="store_true", help="the local shared-memory path")
    parser.add_argument("--model", help="model name (default bench-<scenario>)")
    parser.add_argument(
        "--existing", action="store_true", help="the model exists: neither create nor delete it"
    )
    parser.add_argument(
        "--optimizer", default="sgd", choices=OPTIMIZERS, help="for a model it creates"
    )
    parser.add_argument("--predict", action="store_true", help="batch-1 predictions, no training")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="predictions a second (0: back to back)"
    )
    parser.add_argument("--barrier", type=Path, help="start measuring with the other processes")
    parser.add_argument("--index", type=int, default=0, help="this process's name in --barrier")
    args = parser.parse_args(argv)
    if args.predict:
        model = args.model or f"bench-{args.scenario}"
        result = run_predict(
            args.target,
            args.scenario,
            args.seconds,
            model,
            rate=args.rate,
            barrier=args.barrier,
            index=args.index,
        )
    else:
        result = run(
            args.target,
            args.scenario,
            args.seconds,
            shared=args.shared_memory,
            model=args.model,
            create=not args.existing,
            barrier=args.barrier,
            index=args.index,
            optimizer=args.optimizer,
        )
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
