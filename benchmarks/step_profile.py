"""Where a Train stream's server CPU goes outside the step: one stream, profiled in process.

    .venv/bin/python benchmarks/step_profile.py small --seconds 5 [--profile]

Starts the server in this process (``BackgroundServer``), streams the
scenario into it from a ``gradstream.bench.service_client`` process. Over the measured
window it reads the CPU time of the server's threads (``/proc/self/task``) and prints it
per step: the model's worker (the step and everything around it: the job, the metrics,
the futures) and the event loop (receiving, decoding small batches, the replies). With
``--profile`` it also runs ``cProfile`` on both threads over the window and prints each
one's functions by own time (cProfile slows both; the split, not the rate, is the point).
Not a throughput benchmark: ``gradstream bench`` measures the service.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from gradstream.server.app import intra_op_threads
from gradstream.server.config import Settings
from gradstream.server.engine import Trainer
from gradstream.server.main import BackgroundServer


def _thread_cpu() -> dict[int, float]:
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def measure(scenario: str, seconds: float, profile: bool) -> dict[str, Any]:
    """Stream ``scenario`` for ``seconds`` after a warm-up; server thread CPU per step."""
    settings = Settings(port=0, metrics_port=-1, health_port=-1)
    torch.set_num_threads(intra_op_threads(settings))
    with BackgroundServer(settings) as server:
        loop = server._loop
        assert loop is not None
        # The client creates its model (bench-<scenario>) itself.
        child = subprocess.Popen(
            [
                *(sys.executable, "-m", "gradstream.bench.service_client"),
                *("--target", server.target, "--scenario", scenario),
                *("--seconds", str(seconds + 4)),
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            time.sleep(3.0)  # the client's warm-up and the server's first messages
            worker = server.server.registry.get(f"bench-{scenario}")
            tids: dict[str, int] = {}
            profilers = {"worker": cProfile.Profile(), "event loop": cProfile.Profile()}

            def on_worker(_: Trainer) -> None:
                tids["worker"] = threading.get_native_id()
                if profile:
                    profilers["worker"].enable()

            def on_loop() -> None:
                tids["event loop"] = threading.get_native_id()
                if profile:
                    profilers["event loop"].enable()

            loop.call_soon_threadsafe(on_loop)
            asyncio.run_coroutine_threadsafe(worker.run(on_worker), loop).result(30)
            step0, cpu0, t0 = worker.trainer.step, _thread_cpu(), time.perf_counter()
            time.sleep(seconds)
            step1, cpu1, t1 = worker.trainer.step, _thread_cpu(), time.perf_counter()

            def off_worker(_: Trainer) -> None:
                profilers["worker"].disable()

            if profile:
                loop.call_soon_threadsafe(profilers["event loop"].disable)
                asyncio.run_coroutine_threadsafe(worker.run(off_worker), loop).result(30)
        finally:
            child.kill()
            child.wait()
    steps = step1 - step0
    per_step = {
        name: (cpu1.get(tid, 0.0) - cpu0.get(tid, 0.0)) / steps * 1e6 for name, tid in tids.items()
    }
    others = (
        sum(cpu1.values())
        - sum(cpu0.get(t, 0.0) for t in cpu1)
        - sum(cpu1.get(t, 0.0) - cpu0.get(t, 0.0) for t in tids.values())
    )
    per_step["other threads"] = others / steps * 1e6
    result: dict[str, Any] = {"steps_per_s": steps / (t1 - t0), "cpu_us_per_step": per_step}
    if profile:
        for name, prof in profilers.items():
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
            result[f"profile {name}"] = text.getvalue()
    return result


def main() -> None:
    """Print the per-step CPU split (and the profiles) per scenario."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("scenarios", nargs="*", default=["small"])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--profile", action="store_true", help="also cProfile both threads")
    args = parser.parse_args()
    for name in args.scenarios:
        r = measure(name, args.seconds, args.profile)
        split = ", ".join(f"{k} {v:.1f}" for k, v in r["cpu_us_per_step"].items())
        print(f"{name}: {r['steps_per_s']:,.0f} steps/s; server CPU us per step: {split}")
        for key in ("profile worker", "profile event loop"):
            if key in r:
                print(f"--- {key}\n{r[key]}")


if __name__ == "__main__":
    main()
