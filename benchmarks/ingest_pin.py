"""``gradstream serve --ingest process`` with its backend on a core of its own, against unpinned.

    .venv/bin/python benchmarks/ingest_pin.py medium --seconds 4 --rounds 3 [--server-only]

Starts the server with ``--ingest process`` and one model of the scenario per run, and
streams into it from a ``gradstream.bench.service_client`` process, alternating unpinned and
pinned runs. Pinned: the backend process (every thread: it trains) on the last core, the
front process (every thread: it receives, decodes and checks) and the client on the others
(``sched_setaffinity``); with ``--server-only`` the client is left to the scheduler, as
producers on other machines would be. Prints each run's steps/s and the backend process's
cores over the measured window. Needs at least 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from gradstream.bench.cli import _with_models, run_clients
from gradstream.bench.scenarios import SCENARIOS, scenario


def _pin(pid: int, cores: set[int]) -> None:
    """Every thread of ``pid`` onto ``cores``."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(task.name), cores)


@contextlib.contextmanager
def _affinity(cores: set[int]) -> Iterator[None]:
    """This process (and what it starts meanwhile) on ``cores``; restored after."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def run(name: str, seconds: float, *, pin: bool, client_too: bool) -> tuple[float, float]:
    """One run: steps/s and the backend process's cores over the window."""
    cores = sorted(os.sched_getaffinity(0))
    own, rest = {cores[-1]}, set(cores[:-1])
    model = f"pin-{name}"
    with _with_models("cpu", 0, [model], scenario(name, "sgd"), ingest=True) as server:
        assert server.process is not None and server.front_pid is not None
        if pin:
            _pin(server.process.pid, own)
            _pin(server.front_pid, rest)
        clients = _affinity(rest) if pin and client_too else contextlib.nullcontext()
        with clients:
            args = ["--scenario", name, "--model", model, "--existing"]
            (result,) = run_clients(server, [args], seconds)
    return float(result["steps_per_s"]), float(sum(result["server_threads"].values()))


def main() -> None:
    """Alternate unpinned and pinned runs and print each."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("scenario", nargs="?", default="medium", choices=sorted(SCENARIOS))
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--server-only", action="store_true", help="pin the server's two processes, not the client"
    )
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("ingest_pin.py needs at least 2 cores")
    for i in range(args.rounds):
        for pin in (False, True):
            rate, cores = run(args.scenario, args.seconds, pin=pin, client_too=not args.server_only)
            label = "pinned  " if pin else "unpinned"
            print(f"round {i} {label} {rate:>10,.0f} steps/s   backend process {cores:.2f} cores")


if __name__ == "__main__":
    main()
