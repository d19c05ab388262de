"""Contender (c), the client side: the SDK streaming a scenario into a live server.

Runs in its own process; prints steps/s, samples/s, MB/s and acknowledgement latency as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from gradstream.bench.scenarios import SCENARIOS
from gradstream.client import Client


def run(target: str, scenario_name: str, seconds: float, shared: bool = False) -> dict[str, Any]:
    """Warm up, then stream for ``seconds``; latency is batch yielded -> its result received."""
    scenario = SCENARIOS[scenario_name]
    batches = scenario.batches()
    sent: list[float] = []
    with Client(target, timeout=None) as client:
        name = f"bench-{scenario.name}"
        if name in {m.name for m in client.list_models()}:
            client.delete_model(name)
        client.create_model(name, scenario.spec)

        def stream(until: float, stamps: list[float] | None) -> Iterator[tuple[Any, Any]]:
            i = 0
            while time.perf_counter() < until:
                if stamps is not None:
                    stamps.append(time.perf_counter())
                yield batches[i % len(batches)]
                i += 1

        per_message = scenario.batches_per_message
        warmup = stream(time.perf_counter() + min(0.5, seconds / 4), None)
        for _ in client.train(name, warmup, batches_per_message=per_message, shared_memory=shared):
            pass
        latencies: list[float] = []
        start = time.perf_counter()
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
        client.delete_model(name)
    lat = np.array(latencies) if latencies else np.zeros(1)
    return {
        "steps_per_s": steps / elapsed,
        "samples_per_s": steps * scenario.rows / elapsed,
        "bytes_per_s": steps * scenario.batch_bytes / elapsed,
        "latency_p50_s": float(np.percentile(lat, 50)),
        "latency_p99_s": float(np.percentile(lat, 99)),
    }


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m gradstream.bench.service_client --target T --scenario S``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--shared-memory", action="store_true", help="the local shared-memory path")
    args = parser.parse_args(argv)
    json.dump(run(args.target, args.scenario, args.seconds, args.shared_memory), sys.stdout)


if __name__ == "__main__":
    main()
