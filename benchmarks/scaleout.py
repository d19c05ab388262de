"""Steps/s of ``gradstream serve`` under torchrun (N Gloo or NCCL ranks) against one process.

    .venv/bin/python benchmarks/scaleout.py                  # small, medium, large on the CPU
    .venv/bin/python benchmarks/scaleout.py large --nproc 2 --seconds 8 --device cuda

Each contender is a real server on loopback fed by one SDK stream, cycling the same
batches (the shapes of ``gradstream bench``'s scenarios). It prints steps/s and the
ratio to one process; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from gradstream.client import Client
from gradstream.client._local import LocalServer

SCENARIOS: dict[str, dict[str, Any]] = {
    "small": {"rows": 4, "features": 1, "hidden": [], "per_message": 64},
    "medium": {"rows": 256, "features": 64, "hidden": [64, 64], "per_message": 64},
    "large": {"rows": 65536, "features": 16, "hidden": [], "per_message": 1},
}


def spec(scenario: dict[str, Any]) -> dict[str, Any]:
    """The scenario's model: linear, or an MLP for medium; SGD on MSE."""
    hidden = scenario["hidden"]
    return {
        "architecture": {
            "kind": "mlp" if hidden else "linear",
            "in_features": scenario["features"],
            "out_features": 1,
            "hidden": hidden,
        },
        "init": {"kind": "seed", "seed": 0},
        "optimizer": {"lr": 0.001},
    }


def batches(scenario: dict[str, Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Four fixed batches, cycled."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(4):
        x = rng.uniform(-1, 1, (scenario["rows"], scenario["features"])).astype(np.float32)
        out.append((x, (x.sum(axis=1, keepdims=True) * 0.5).astype(np.float32)))
    return out


def steps_per_second(target: str, scenario: dict[str, Any], seconds: float) -> float:
    """Stream for about ``seconds`` after a warm-up; optimizer steps per second."""
    data = batches(scenario)
    per_message = scenario["per_message"]
    with Client(target, timeout=None, max_message_bytes=64 * 1024 * 1024) as client:
        client.create_model("bench", spec(scenario))
        list(client.train("bench", data * 4, batches_per_message=per_message))  # warm-up
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            chunk = data * max(1, 64 // len(data))
            done += len(list(client.train("bench", chunk, 1000, batches_per_message=per_message)))
        rate = done / (time.perf_counter() - start)
        client.delete_model("bench")
    return rate


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def torchrun(nproc: int, device: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A torchrun job of ``nproc`` ranks; returns it with rank 0's target once it serves."""
    ready = workdir / "ready.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1", f"--master-port={free_port()}", "--no-python",
        str(Path(sys.executable).with_name("gradstream")), "serve", "--port=0",
        "--health-port=-1", "--metrics-port=-1", f"--device={device}",
        f"--ready-file={ready}", "--max-message-bytes=67108864",
    ]  # fmt: skip
    log = (workdir / "torchrun.log").open("ab")
    job = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 120
    while not ready.exists():
        if job.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"torchrun did not serve; see {workdir / 'torchrun.log'}")
        time.sleep(0.1)
    return job, f"127.0.0.1:{json.loads(ready.read_text())['port']}"


def main() -> None:
    """Measure every chosen scenario; print a table and, with --json, write the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scenarios", nargs="*", choices=[*SCENARIOS, []])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: list[dict[str, Any]] = []
    for name in args.scenarios or list(SCENARIOS):
        scenario = SCENARIOS[name]
        row: dict[str, Any] = {"scenario": name, "nproc": args.nproc}
        for threads in sorted({1, os.cpu_count() or 1}):
            flags = ("--device", args.device, "--threads", str(threads))
            with LocalServer(*flags, "--max-message-bytes", str(64 * 1024 * 1024)) as one:
                row[f"one_process_{threads}_threads"] = steps_per_second(
                    one.target, scenario, args.seconds
                )
        with tempfile.TemporaryDirectory() as tmp:
            job, target = torchrun(args.nproc, args.device, Path(tmp))
            try:
                row["ranks"] = steps_per_second(target, scenario, args.seconds)
            finally:
                os.killpg(job.pid, signal.SIGTERM)
                job.wait(60)
        best = max(v for k, v in row.items() if k.startswith("one_process"))
        row["ratio_to_best_one_process"] = row["ranks"] / best
        results.append(row)
        print(
            f"{name:7s} one process: "
            + ", ".join(f"{v:,.1f}" for k, v in row.items() if k.startswith("one_process"))
            + f" steps/s (1 / {os.cpu_count()} threads); {args.nproc} ranks: "
            + f"{row['ranks']:,.1f} steps/s = {row['ratio_to_best_one_process']:.2f}x",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
