"""Where one Train message's CPU time goes on the server, part by part, on one thread.

    .venv/bin/python benchmarks/ingest_split.py medium large

For each scenario: the message's bytes as the SDK writes them, then, timed with
``time.thread_time`` (CPU of this thread only, so other load on the machine slows it less
than wall time would): parse (``wire.parse_train_request``), decode and check every batch
(``session.decode_message``), train (``session.train_message`` on the server's Trainer) and the
reply (the ``TrainResponse`` built and serialized). In
the service parse, decode and reply run on the event loop (or, for large batches, the check on the
worker) and the last on the model's worker, under one GIL. Not a throughput benchmark:
the split is what to optimise; ``gradstream bench`` measures the service.
"""

from __future__ import annotations

import argparse
import time

import torch

from gradstream.bench.scenarios import SCENARIOS, Scenario
from gradstream.server.app import intra_op_threads
from gradstream.server.config import Settings
from gradstream.server.engine import TrainerFactory, TrainOptions
from gradstream.server.servicer import _train_response
from gradstream.server.session import decode_message, train_message
from gradstream.server.spec import ModelSpec
from gradstream.server.wire import parse_train_request
from gradstream.wire.tensor import wire_array
from gradstream.wire.train import MessageBuilder, encode_batch


def message_bytes(scenario: Scenario) -> bytes:
    """One Train request of ``batches_per_message`` of the scenario's batches."""
    batches = scenario.batches()
    builder = MessageBuilder()
    for i in range(scenario.batches_per_message):
        x, y = batches[i % len(batches)]
        builder.add(encode_batch([wire_array(x), wire_array(y)], start=builder.size))
    return builder.to_bytes()


def split(scenario: Scenario, seconds: float) -> dict[str, float]:
    """CPU microseconds per batch of parse, decode + check and train, over ``seconds``."""
    data = message_bytes(scenario)
    trainer = TrainerFactory(torch.device("cpu")).build(
        "split", ModelSpec.model_validate(scenario.spec)
    )
    options = TrainOptions()
    totals = {"parse": 0.0, "decode": 0.0, "train": 0.0, "reply": 0.0}
    batches = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.thread_time()
        message = parse_train_request(data)
        t1 = time.thread_time()
        items = decode_message(trainer.checker, message.batches)
        t2 = time.thread_time()
        results, error = train_message(trainer, items, options)
        t3 = time.thread_time()
        _train_response(results, 0).SerializeToString()
        t4 = time.thread_time()
        assert error is None and len(results) == len(items)
        totals["parse"] += t1 - t0
        totals["decode"] += t2 - t1
        totals["train"] += t3 - t2
        totals["reply"] += t4 - t3
        batches += len(items)
    return {part: total / batches * 1e6 for part, total in totals.items()}


def main() -> None:
    """Print the split per scenario."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("scenarios", nargs="*", default=["medium", "large"])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    torch.set_num_threads(intra_op_threads(Settings()))
    print(f"torch threads {torch.get_num_threads()}; CPU microseconds per batch")
    for name in args.scenarios:
        s = split(SCENARIOS[name], args.seconds)
        total = sum(s.values())
        parts = "   ".join(f"{k} {v:,.1f} ({v / total:.0%})" for k, v in s.items())
        print(f"{name:<8} {parts}   total {total:,.1f}")


if __name__ == "__main__":
    main()
