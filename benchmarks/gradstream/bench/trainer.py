"""Contender (e): the server's own training step called in-process, no transport.

``python -m gradstream.bench.trainer --scenario S`` builds the model with the server's
``TrainerFactory`` and feeds ``Trainer.train_batches`` the scenario's batches, already
checked, one message's worth at a time, with the server's intra-op threads: the ceiling
the service can reach. Prints steps/s as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

from gradstream.bench.scenarios import OPTIMIZERS, SCENARIOS, Scenario, scenario
from gradstream.server.batches import Batch
from gradstream.server.engine import TrainerFactory, TrainOptions
from gradstream.server.spec import ModelSpec


def run_trainer(scenario: Scenario, seconds: float, device: str) -> dict[str, float]:
    """``Trainer.train_batches`` on pre-checked batches, message by message: steps/s."""
    spec = ModelSpec.model_validate(scenario.spec)
    trainer = TrainerFactory(torch.device(device)).build("bench", spec)
    batches: list[Batch] = [trainer.checker.batch(x, y) for x, y in scenario.batches()]
    per_message = scenario.batches_per_message
    messages = [
        [batches[(m * per_message + i) % len(batches)] for i in range(per_message)]
        for m in range(len(batches))
    ]
    options = TrainOptions()
    steps = 0
    warmup_end = time.perf_counter() + min(0.5, seconds / 4)
    start: float | None = None
    while True:
        for message in messages:
            results, error = trainer.train_batches(message, options)
            assert error is None and all(r.outcome.name == "APPLIED" for r in results), error
            now = time.perf_counter()
            if start is None:
                if now >= warmup_end:
                    start, steps = now, 0
                continue
            steps += len(results)
            if now - start >= seconds:
                return scenario.rates(steps, now - start)


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m gradstream.bench.trainer --scenario S --threads N``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, required=True, help="torch intra-op threads")
    parser.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = run_trainer(
        scenario(args.scenario, args.optimizer), args.seconds, args.device
    )
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
