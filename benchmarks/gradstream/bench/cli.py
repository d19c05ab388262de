"""``gradstream bench``: run every contender side by side and print the ratios.

(a) the plain in-process PyTorch loop, (b) a raw gRPC byte stream between two
processes, (c) the service through the SDK with the client in its own process, and (d) the same
with the local shared-memory path.
All of them run in this one invocation on this one machine, so the ratios compare
like with like; absolute numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from gradstream.bench.loop import run_loop
from gradstream.bench.scenarios import SCENARIOS, Scenario
from gradstream.client._local import LocalServer
from gradstream.server.app import intra_op_threads
from gradstream.server.config import Settings


def _child(module: str, *args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def run_raw(scenario: Scenario, seconds: float) -> dict[str, Any]:
    """The transport bound: the same bytes per message, acked, no protobuf, no torch."""
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "ready.json"
        server = subprocess.Popen(
            [sys.executable, "-m", "gradstream.bench.raw", "server", "--ready-file", str(ready)]
        )
        try:
            deadline = time.monotonic() + 30
            while not ready.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            port = json.loads(ready.read_text())["port"]
            payload = scenario.batch_bytes * scenario.batches_per_message
            result = _child(
                "gradstream.bench.raw",
                "client",
                "--target",
                f"127.0.0.1:{port}",
                "--payload-bytes",
                str(payload),
                "--seconds",
                str(seconds),
            )
        finally:
            server.terminate()
            server.wait(10)
    result["steps_per_s"] = result["messages_per_s"] * scenario.batches_per_message
    result["samples_per_s"] = result["steps_per_s"] * scenario.rows
    return result


def run_service(
    scenario: Scenario, seconds: float, device: str, shared: bool = False, threads: int = 0
) -> dict[str, Any]:
    """The service through the SDK; the client in a process of its own."""
    with LocalServer("--device", device, "--threads", str(threads)) as server:
        assert server.process is not None
        flags = ["--shared-memory"] if shared else []
        result = _child(
            "gradstream.bench.service_client",
            *("--target", server.target, "--scenario", scenario.name, "--seconds", str(seconds)),
            *flags,
        )
        result["server_rss_bytes"] = _rss_bytes(server.process.pid)
    return result


def run_soak(seconds: float, device: str) -> dict[str, Any]:
    """A steady medium stream for ``seconds``; server RSS sampled from after warm-up to the end."""
    scenario = SCENARIOS["soak"]
    with LocalServer("--device", device) as server:
        assert server.process is not None
        pid = server.process.pid
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gradstream.bench.service_client",
                "--target",
                server.target,
                "--scenario",
                "soak",
                "--seconds",
                str(seconds),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(min(10.0, seconds / 5))
        first = _rss_bytes(pid)
        peak = first
        while child.poll() is None:
            peak = max(peak, _rss_bytes(pid))
            time.sleep(0.5)
        last = _rss_bytes(pid)
        out, _ = child.communicate()
        result: dict[str, Any] = json.loads(out)
    result.update(
        server_rss_bytes=last,
        rss_after_warmup_bytes=first,
        rss_peak_bytes=peak,
        rss_growth=(last - first) / first,
        seconds=seconds,
        rows=scenario.rows,
    )
    return result


CONTENDERS = ("loop", "raw", "service", "shm")


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median steps/s (the lower middle one of an even count)."""
    return sorted(runs, key=lambda r: float(r["steps_per_s"]))[(len(runs) - 1) // 2]


def _ratio(runs: dict[str, dict[str, Any]], a: str, b: str, key: str) -> float:
    return float(runs[a][key]) / float(runs[b][key])


def _row(scenario: str, contender: str, r: dict[str, Any]) -> str:
    cells = f"{scenario:<8} {contender:<8} {r['steps_per_s']:>10,.0f} {r['samples_per_s']:>12,.0f}"
    cells += f" {r['bytes_per_s'] / 1e6:>9.1f}"
    if "latency_p50_s" in r:
        cells += f" {r['latency_p50_s'] * 1e3:>8.2f} {r['latency_p99_s'] * 1e3:>8.2f}"
        cells += f" {r['server_rss_bytes'] / 1e6:>7.0f}"
    return cells


def _table(results: dict[str, dict[str, Any]]) -> str:
    head = (
        f"{'scenario':<8} {'contender':<8} {'steps/s':>10} {'samples/s':>12} {'MB/s':>9} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'RSS MB':>7}"
    )
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        if name == "soak":
            s = r["service"]
            lines.append(_row(name, "service", s))
            lines.append(
                f"{'':<8} RSS growth over {s['seconds']:.0f} s after warm-up: "
                f"{s['rss_growth'] * 100:+.2f}%"
            )
            continue
        for i, contender in enumerate(("loop", "raw", "service", "shm")):
            lines.append(_row(name if i == 0 else "", contender, r[contender]))
        lines.append(
            f"{'':<8} service/loop {r['service_vs_loop']:.2f}x   "
            f"service/raw {r['service_vs_raw']:.2f}x   shm/raw {r['shm_vs_raw']:.2f}x"
        )
        if len(r["rounds"]["loop"]) > 1:
            spread = "   ".join(f"{c} {min(v):,.0f}-{max(v):,.0f}" for c, v in r["rounds"].items())
            lines.append(f"{'':<8} steps/s over {len(r['rounds']['loop'])} rounds: {spread}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen scenarios and print (and optionally save) the table."""
    parser = argparse.ArgumentParser(
        prog="gradstream bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"any of {', '.join(SCENARIOS)} (default: small medium large)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the loop and the server)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--seconds", type=float, default=600.0, help="soak duration")
    parser.add_argument(
        "--quick", action="store_true", help="short runs: a smoke test, not a measurement"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads for the loop and the server (0: torch's default)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="rounds of every contender per scenario; the median round is reported",
    )
    args = parser.parse_args(argv)
    for name in args.scenarios:
        if name not in SCENARIOS:
            parser.error(f"scenario {name!r}: choose from {', '.join(SCENARIOS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = args.scenarios or ["small", "medium", "large"]
    duration = 0.5 if args.quick else args.duration
    results: dict[str, dict[str, Any]] = {}
    for name in chosen:
        if name == "soak":
            results[name] = {"service": run_soak(20.0 if args.quick else args.seconds, args.device)}
            continue
        scenario = SCENARIOS[name]
        rounds: dict[str, list[dict[str, Any]]] = {c: [] for c in CONTENDERS}
        # Contenders alternate within each round, so a slow spell of the machine does not
        # land on one of them only; each one's median round is reported.
        for _ in range(1 if args.quick else args.repeat):
            rounds["loop"].append(run_loop(scenario, duration, args.device))
            rounds["raw"].append(run_raw(scenario, duration))
            rounds["service"].append(
                run_service(scenario, duration, args.device, threads=args.threads)
            )
            rounds["shm"].append(
                run_service(scenario, duration, args.device, shared=True, threads=args.threads)
            )
        chosen_runs = {c: _median(runs) for c, runs in rounds.items()}
        results[name] = {
            **chosen_runs,
            "service_vs_loop": _ratio(chosen_runs, "service", "loop", "steps_per_s"),
            "service_vs_raw": _ratio(chosen_runs, "service", "raw", "bytes_per_s"),
            "shm_vs_raw": _ratio(chosen_runs, "shm", "raw", "bytes_per_s"),
            "rounds": {c: [r["steps_per_s"] for r in runs] for c, runs in rounds.items()},
        }
    server_threads = intra_op_threads(Settings(threads=args.threads))
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, torch threads: loop "
        f"{torch.get_num_threads()}, server {server_threads}, "
        f"torch {torch.__version__}, device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
    )
    print(f"gradstream bench on {machine}{' (--quick: smoke test only)' if args.quick else ''}")
    print(_table(results))
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine, "quick": args.quick, "results": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
