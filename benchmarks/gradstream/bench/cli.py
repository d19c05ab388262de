"""``gradstream bench``: run every contender side by side and print the ratios.

(a) the plain in-process PyTorch loop, (b) the server's own Trainer step in process, no
transport (the ceiling), (c) a raw gRPC byte stream between two processes, (d) the service
through the SDK with the client in its own process, and (e) the same with the local
shared-memory path; with ``--ingest-process``, (f) the service started the same way with
``--ingest process`` (receiving, decoding and checking in a front process, training in the
backend). The concurrent scenarios: fan-in (4 producers into one model against
one), models (2 models, a producer each, against one) and serve (batch-1 predictions while
another client trains, against each alone). All run in this one invocation on this one
machine, so the ratios compare like with like; absolute numbers depend on the machine.
Every ratio is the median of its per-round ratios, with the worst round beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from gradstream.bench.loop import run_loop
from gradstream.bench.scenarios import OPTIMIZERS, SCENARIOS, Scenario, scenario
from gradstream.bench.served import started
from gradstream.client import Client
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
    with started("gradstream.bench.raw", "server") as (port, _):
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
    result["steps_per_s"] = result["messages_per_s"] * scenario.batches_per_message
    result["samples_per_s"] = result["steps_per_s"] * scenario.rows
    return result


def _thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) so far of each thread of ``pid``, with its name."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        # "tid (comm) state ...": comm may hold spaces, so split after its closing paren.
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(task.name)] = (comm, (int(fields[11]) + int(fields[12])) / tick)
    return out


def _thread_load(
    pid: int, before: dict[int, tuple[str, float]], seconds: float
) -> dict[str, float]:
    """Cores used by each busy thread of ``pid`` since ``before``: the event loop (the main
    thread) apart from the rest, named by thread name and id."""
    after = _thread_cpu(pid)
    load: dict[str, float] = {}
    for tid, (comm, cpu) in after.items():
        used = (cpu - before.get(tid, (comm, 0.0))[1]) / seconds
        if used >= 0.01:
            load["event loop" if tid == pid else f"{comm}/{tid}"] = round(used, 3)
    return dict(sorted(load.items(), key=lambda kv: -kv[1]))


def _process_cpu(pid: int) -> float:
    """CPU seconds so far of process ``pid``, every thread of it."""
    return sum(cpu for _, cpu in _thread_cpu(pid).values())


def run_trainer(scenario: Scenario, seconds: float, device: str, threads: int) -> dict[str, Any]:
    """The server's Trainer step in a process of its own, with the server's torch threads."""
    return _child(
        "gradstream.bench.trainer",
        *("--scenario", scenario.name, "--seconds", str(seconds), "--device", device),
        *("--threads", str(intra_op_threads(Settings(threads=threads)))),
        *("--optimizer", scenario.spec["optimizer"]["kind"]),
    )


@contextlib.contextmanager
def _with_models(
    device: str, threads: int, models: list[str], scenario: Scenario, *, ingest: bool = False
) -> Iterator[LocalServer]:
    """A server of its own (with ``--ingest process`` when ``ingest``) with ``models``."""
    mode = ("--ingest", "process") if ingest else ()
    with LocalServer("--device", device, "--threads", str(threads), *mode) as served:
        with Client(served.target) as client:
            for name in models:
                client.create_model(name, scenario.spec)
        yield served


def run_service(
    scenario: Scenario,
    seconds: float,
    device: str,
    shared: bool = False,
    threads: int = 0,
    *,
    ingest: bool = False,
) -> dict[str, Any]:
    """The service through the SDK (with ``--ingest process`` when ``ingest``); the client
    in its own process."""
    model = f"bench-{scenario.name}"
    with _with_models(device, threads, [model], scenario, ingest=ingest) as server:
        assert server.process is not None
        flags = ["--shared-memory"] if shared else []
        args = ["--scenario", scenario.name, "--model", model, "--existing", *flags]
        (result,) = run_clients(server, [args], seconds)
        result["server_rss_bytes"] = _rss_bytes(server.process.pid)
    return result


def run_clients(
    server: LocalServer, clients: list[list[str]], seconds: float
) -> list[dict[str, Any]]:
    """Several ``service_client`` processes at once, measuring over the same window.

    Each one warms up, then all start together (a barrier of files); returns their results
    in order, the first with the server threads' load over the window (with ``--ingest
    process``: the backend's threads, and the front process's cores as ``front_cores``).
    """
    assert server.process is not None
    with tempfile.TemporaryDirectory() as tmp:
        barrier = Path(tmp)
        procs = [
            subprocess.Popen(
                [
                    *(sys.executable, "-m", "gradstream.bench.service_client"),
                    *("--target", server.target, "--seconds", str(seconds)),
                    *("--barrier", str(barrier), "--index", str(i), *args),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            for i, args in enumerate(clients)
        ]
        try:
            deadline = time.monotonic() + 120
            while not all((barrier / f"ready-{i}").exists() for i in range(len(procs))):
                failed = [p.returncode for p in procs if p.poll() not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    raise RuntimeError(f"bench clients did not get ready (exit codes {failed})")
                time.sleep(0.01)
            front = None if server.front_pid is None else _process_cpu(server.front_pid)
            before, start = _thread_cpu(server.process.pid), time.perf_counter()
            (barrier / "go").touch()
            outs = [p.communicate(timeout=seconds + 120)[0] for p in procs]
            elapsed = time.perf_counter() - start
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if any(p.returncode for p in procs):
            raise RuntimeError(f"bench clients failed: {[p.returncode for p in procs]}")
    results = [json.loads(out) for out in outs]
    results[0]["server_threads"] = _thread_load(server.process.pid, before, elapsed)
    if server.front_pid is not None and front is not None:
        results[0]["front_cores"] = round((_process_cpu(server.front_pid) - front) / elapsed, 3)
    return results


def _total(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Producers measured together as one: their rates added up."""
    total: dict[str, Any] = {
        key: sum(float(r[key]) for r in runs)
        for key in ("steps_per_s", "samples_per_s", "bytes_per_s")
    }
    total["producers"] = [r["steps_per_s"] for r in runs]
    total["client_cores"] = [r.get("client_cores", 0.0) for r in runs]
    total["server_threads"] = runs[0].get("server_threads", {})
    if "front_cores" in runs[0]:
        total["front_cores"] = runs[0]["front_cores"]
    return total


def run_fan_in(
    seconds: float, device: str, threads: int, optimizer: str = "sgd", producers: int = 4
) -> dict[str, Any]:
    """One producer, then ``producers`` at once, into one model (medium's stream)."""
    model = "bench-fan-in"
    with _with_models(device, threads, [model], scenario("medium", optimizer)) as server:
        args = ["--scenario", "medium", "--model", model, "--existing"]
        one = _total(run_clients(server, [args], seconds))
        many = _total(run_clients(server, [args] * producers, seconds))
    return {"one": one, "many": many}


def run_models(
    seconds: float,
    device: str,
    threads: int,
    optimizer: str = "sgd",
    models: int = 2,
    *,
    ingest: bool = False,
) -> dict[str, Any]:
    """One model with its producer, then ``models`` models each with its own, at once;
    with ``ingest`` the same again on a server with ``--ingest process``."""
    names = [f"bench-models-{i}" for i in range(models)]
    args = [["--scenario", "medium", "--model", n, "--existing"] for n in names]
    parts: dict[str, Any] = {}
    for prefix in ("", "ingest_") if ingest else ("",):
        chosen = scenario("medium", optimizer)
        with _with_models(device, threads, names, chosen, ingest=bool(prefix)) as server:
            parts[f"{prefix}one"] = _total(run_clients(server, args[:1], seconds))
            parts[f"{prefix}many"] = _total(run_clients(server, args, seconds))
    return parts


# Batch-1 predictions a second in the serve scenario: a steady caller's load, sent on a
# schedule (an open loop); 0 sends them back to back.
PREDICT_RATE = 200.0


def run_serve(
    seconds: float,
    device: str,
    threads: int,
    optimizer: str = "sgd",
    predict_rate: float = PREDICT_RATE,
) -> dict[str, Any]:
    """Batch-1 predictions idle, training alone, then both at once (medium's model).

    The predictions come at ``predict_rate`` a second (0: back to back), the same rate
    idle and under training, so the p99 ratio compares one load with and without training.
    """
    model = "bench-serve"
    with _with_models(device, threads, [model], scenario("medium", optimizer)) as server:
        train = ["--scenario", "medium", "--model", model, "--existing"]
        predict = [*train, "--predict", "--rate", str(predict_rate)]
        (idle,) = run_clients(server, [predict], seconds)
        (alone,) = run_clients(server, [train], seconds)
        loaded, under = run_clients(server, [train, predict], seconds)
    return {"train": alone, "train_predicting": loaded, "predict": idle, "predict_training": under}


GROUPS: dict[str, Callable[..., dict[str, Any]]] = {
    "fan-in": run_fan_in,
    "models": run_models,
    "serve": run_serve,
}
# ratio name -> (numerator, denominator, key, higher is better)
GROUP_RATIOS: dict[str, dict[str, tuple[str, str, str, bool]]] = {
    "fan-in": {"many_vs_one": ("many", "one", "steps_per_s", True)},
    "models": {
        "many_vs_one": ("many", "one", "steps_per_s", True),
        "ingest_many_vs_one": ("ingest_many", "ingest_one", "steps_per_s", True),
    },
    "serve": {
        "train_predicting_vs_train": ("train_predicting", "train", "steps_per_s", True),
        "predict_p99_training_vs_idle": ("predict_training", "predict", "latency_p99_s", False),
    },
}


def _rss_at(samples: list[tuple[float, int]], when: float) -> int:
    """The first RSS sampled at or after ``when`` seconds (the last one if none was)."""
    return next((rss for t, rss in samples if t >= when), samples[-1][1])


def run_soak(seconds: float, device: str, optimizer: str = "sgd") -> dict[str, Any]:
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
                "--optimizer",
                optimizer,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        start = time.monotonic()
        time.sleep(min(10.0, seconds / 5))
        first = _rss_bytes(pid)
        peak = first
        # (seconds since start, RSS) every few seconds: a leak keeps climbing to the end,
        # the allocator's high-water mark of the messages in flight levels off.
        samples: list[tuple[float, int]] = [(time.monotonic() - start, first)]
        while child.poll() is None:
            rss = _rss_bytes(pid)
            peak = max(peak, rss)
            now = time.monotonic() - start
            if now - samples[-1][0] >= max(1.0, seconds / 60):
                samples.append((round(now, 1), rss))
            time.sleep(0.5)
        last = _rss_bytes(pid)
        samples.append((round(time.monotonic() - start, 1), last))
        out, _ = child.communicate()
        result: dict[str, Any] = json.loads(out)
    result.update(
        server_rss_bytes=last,
        rss_after_warmup_bytes=first,
        rss_peak_bytes=peak,
        rss_growth=(last - first) / first,
        rss_growth_second_half=(last - _rss_at(samples, seconds / 2))
        / _rss_at(samples, seconds / 2),
        rss_samples=samples,
        seconds=seconds,
        rows=scenario.rows,
    )
    return result


CONTENDERS = ("loop", "trainer", "raw", "service", "shm")
# ratio name -> (numerator, denominator, key); all higher is better
RATIOS = {
    "service_vs_loop": ("service", "loop", "steps_per_s"),
    "service_vs_trainer": ("service", "trainer", "steps_per_s"),
    "trainer_vs_loop": ("trainer", "loop", "steps_per_s"),
    "service_vs_raw": ("service", "raw", "bytes_per_s"),
    "shm_vs_raw": ("shm", "raw", "bytes_per_s"),
}
# With --ingest-process: the service with --ingest process against the others.
INGEST_RATIOS = {
    "ingest_vs_loop": ("ingest", "loop", "steps_per_s"),
    "ingest_vs_trainer": ("ingest", "trainer", "steps_per_s"),
    "ingest_vs_service": ("ingest", "service", "steps_per_s"),
    "ingest_vs_raw": ("ingest", "raw", "bytes_per_s"),
}


def _median(runs: list[dict[str, Any]], key: str = "steps_per_s") -> dict[str, Any]:
    """The run with the median ``key`` (the lower middle one of an even count)."""
    return sorted(runs, key=lambda r: float(r[key]))[(len(runs) - 1) // 2]


def _summary(values: list[float], higher_is_better: bool = True) -> dict[str, Any]:
    """A ratio over the rounds: the median round's value, the worst round's and all."""
    ordered = sorted(values)
    return {
        "median": ordered[(len(ordered) - 1) // 2],
        "worst": ordered[0] if higher_is_better else ordered[-1],
        "rounds": values,
    }


def _round_ratios(
    rounds: dict[str, list[dict[str, Any]]], ratios: dict[str, tuple[str, str, str, bool]]
) -> dict[str, dict[str, Any]]:
    """Each ratio computed round by round (contenders of one round ran side by side)."""
    count = len(next(iter(rounds.values())))
    return {
        name: _summary(
            [float(rounds[a][i][key]) / float(rounds[b][i][key]) for i in range(count)], better
        )
        for name, (a, b, key, better) in ratios.items()
        if a in rounds and b in rounds
    }


def _row(scenario: str, contender: str, r: dict[str, Any]) -> str:
    cells = f"{scenario:<8} {contender:<8} {r['steps_per_s']:>10,.0f} {r['samples_per_s']:>12,.0f}"
    cells += f" {r['bytes_per_s'] / 1e6:>9.1f}"
    if "latency_p50_s" in r:
        cells += f" {r['latency_p50_s'] * 1e3:>8.2f} {r['latency_p99_s'] * 1e3:>8.2f}"
    if "server_rss_bytes" in r:
        cells += f" {r['server_rss_bytes'] / 1e6:>7.0f}"
    return cells


def _ratio_text(label: str, r: dict[str, Any], worst: str = "lowest") -> str:
    text = f"{label} {r['median']:.2f}x"
    return text + (f" ({worst} {r['worst']:.2f}x)" if len(r["rounds"]) > 1 else "")


def _threads_text(load: dict[str, float]) -> str:
    return ", ".join(f"{name} {cores:.2f}" for name, cores in list(load.items())[:4])


def _ratios_line(ratios: dict[str, Any], *shown: tuple[str, str]) -> str:
    """One indented line of ratios, each as ``label median (lowest ...)``."""
    return f"{'':<8} " + "   ".join(_ratio_text(label, ratios[key]) for label, key in shown)


def _ingest_cores(r: dict[str, Any]) -> str:
    """With ``--ingest process``: the backend's busy threads, then the front process's CPU."""
    return (
        f"server threads {_threads_text(r['server_threads'])}; "
        f"front process {r.get('front_cores', 0.0):.2f}"
    )


def _group_lines(name: str, r: dict[str, Any]) -> list[str]:
    ratios = r["ratios"]
    if name == "serve":
        lines = [
            _row(name, "train", r["train"]),
            _row("", "+predict", r["train_predicting"]),
        ]
        for label, key in (("predict", "predict"), ("+train", "predict_training")):
            p = r[key]
            how = f"at {p['rate']:,.0f}/s" if p.get("rate") else "back to back"
            lines.append(
                f"{'':<8} {label:<8} {p['predictions_per_s']:>10,.0f} predictions/s, batch 1,"
                f" {how:<14} {p['latency_p50_s'] * 1e3:>8.2f} {p['latency_p99_s'] * 1e3:>8.2f}"
            )
        lines.append(
            f"{'':<8} "
            + _ratio_text("training with/without predictions", ratios["train_predicting_vs_train"])
            + "   "
            + _ratio_text(
                "predict p99 training/idle", ratios["predict_p99_training_vs_idle"], "highest"
            )
        )
        return lines
    many = len(r["many"]["producers"])
    label = "producers" if name == "fan-in" else "models"
    lines = _one_many_lines(
        r,
        "",
        (name, f"1 {label[:-1]}", f"{many} {label}", f"{many} {label}/1"),
        f"server threads (cores): {_threads_text(r['many']['server_threads'])}",
    )
    lines.append(
        f"{'':<8} with 1: server threads {_threads_text(r['one']['server_threads'])}"
        + f"; client: {r['one']['client_cores'][0]:.2f}"
    )
    if "ingest_many" in r:
        lines += _one_many_lines(
            r,
            "ingest_",
            ("", "1 ingest", f"{many} ingest", f"{many} {label}/1 (ingest)"),
            f"ingest (cores): {_ingest_cores(r['ingest_many'])}",
        )
    return lines


def _one_many_lines(
    r: dict[str, Any], prefix: str, labels: tuple[str, str, str, str], cores: str
) -> list[str]:
    """A one-then-many measurement: both rows, the ratio with each producer's rate, the CPU.

    ``labels``: the scenario cell, the two rows' contender cells and the ratio's label.
    """
    scenario_cell, one, many, ratio = labels
    measured = r[f"{prefix}many"]
    return [
        _row(scenario_cell, one, r[f"{prefix}one"]),
        _row("", many, measured),
        f"{'':<8} "
        + _ratio_text(ratio, r["ratios"][f"{prefix}many_vs_one"])
        + f"   per producer: {', '.join(f'{v:,.0f}' for v in measured['producers'])}",
        f"{'':<8} {cores}; clients: {', '.join(f'{c:.2f}' for c in measured['client_cores'])}",
    ]


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
                f"{s['rss_growth'] * 100:+.2f}%, over its second half "
                f"{s['rss_growth_second_half'] * 100:+.2f}% "
                f"(peak {s['rss_peak_bytes'] / 1e6:.0f} MB)"
            )
            continue
        if name in GROUPS:
            lines.extend(_group_lines(name, r))
            continue
        for i, contender in enumerate(c for c in (*CONTENDERS, "ingest") if c in r):
            lines.append(_row(name if i == 0 else "", contender, r[contender]))
        ratios = r["ratios"]
        lines.append(
            _ratios_line(
                ratios,
                ("service/loop", "service_vs_loop"),
                ("service/trainer", "service_vs_trainer"),
                ("trainer/loop", "trainer_vs_loop"),
            )
        )
        lines.append(
            _ratios_line(ratios, ("service/raw", "service_vs_raw"), ("shm/raw", "shm_vs_raw"))
        )
        lines.append(
            f"{'':<8} server threads (cores): {_threads_text(r['service']['server_threads'])}"
            + f"; client: {r['service'].get('client_cores', 0.0):.2f}"
        )
        if "ingest" in r:
            lines.append(
                _ratios_line(
                    ratios,
                    ("ingest/loop", "ingest_vs_loop"),
                    ("ingest/trainer", "ingest_vs_trainer"),
                    ("ingest/service", "ingest_vs_service"),
                    ("ingest/raw", "ingest_vs_raw"),
                )
            )
            lines.append(
                f"{'':<8} ingest (cores): {_ingest_cores(r['ingest'])}"
                + f"; client: {r['ingest'].get('client_cores', 0.0):.2f}"
            )
        if len(r["rounds"]["loop"]) > 1:
            spread = "   ".join(f"{c} {min(v):,.0f}-{max(v):,.0f}" for c, v in r["rounds"].items())
            lines.append(f"{'':<8} steps/s over {len(r['rounds']['loop'])} rounds: {spread}")
    return "\n".join(lines)


DEFAULT = ("small", "medium", "large", "fan-in", "models", "serve")


def _run_group(
    name: str,
    repeat: int,
    seconds: float,
    device: str,
    threads: int,
    *,
    optimizer: str,
    predict_rate: float = PREDICT_RATE,
    ingest: bool = False,
) -> dict[str, Any]:
    """A concurrent scenario's rounds: each part's median round and the ratios per round."""
    rounds: dict[str, list[dict[str, Any]]] = {}
    extra: dict[str, Any] = {"predict_rate": predict_rate} if name == "serve" else {}
    if ingest and name == "models":
        extra["ingest"] = True
    for _ in range(repeat):
        for part, run in GROUPS[name](seconds, device, threads, optimizer, **extra).items():
            rounds.setdefault(part, []).append(run)
    chosen = {
        part: _median(runs, "steps_per_s" if "steps_per_s" in runs[0] else "latency_p99_s")
        for part, runs in rounds.items()
    }
    return {**chosen, "ratios": _round_ratios(rounds, GROUP_RATIOS[name])}


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
        help=f"any of {', '.join([*SCENARIOS, *GROUPS])} (default: {' '.join(DEFAULT)})",
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
        "--optimizer",
        default="sgd",
        choices=OPTIMIZERS,
        help="every model's optimizer (the loop's too), at the scenario's lr",
    )
    parser.add_argument(
        "--predict-rate",
        type=float,
        default=PREDICT_RATE,
        help="serve: batch-1 predictions a second, on a schedule (0: back to back)",
    )
    parser.add_argument(
        "--ingest-process",
        action="store_true",
        help="also the service with --ingest process (receiving in a front process, training "
        "in the backend): small, medium, large and models",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="rounds of every contender per scenario; the median round is reported",
    )
    args = parser.parse_args(argv)
    for name in args.scenarios:
        if name not in SCENARIOS and name not in GROUPS:
            parser.error(f"scenario {name!r}: choose from {', '.join([*SCENARIOS, *GROUPS])}")
    if args.predict_rate < 0:
        parser.error(f"--predict-rate {args.predict_rate}: must be 0 (back to back) or more")
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = args.scenarios or list(DEFAULT)
    repeat = 1 if args.quick else args.repeat
    duration = 0.5 if args.quick else args.duration
    results: dict[str, dict[str, Any]] = {}
    for name in chosen:
        if name == "soak":
            results[name] = {
                "service": run_soak(
                    8.0 if args.quick else args.seconds, args.device, args.optimizer
                )
            }
            continue
        if name in GROUPS:
            results[name] = _run_group(
                name,
                repeat,
                duration,
                args.device,
                args.threads,
                optimizer=args.optimizer,
                predict_rate=args.predict_rate,
                ingest=args.ingest_process,
            )
            continue
        chosen_scenario = scenario(name, args.optimizer)
        contenders = (*CONTENDERS, "ingest") if args.ingest_process else CONTENDERS
        rounds: dict[str, list[dict[str, Any]]] = {c: [] for c in contenders}
        # Contenders alternate within each round, so a slow spell of the machine does not
        # land on one of them only; each one's median round is reported.
        for _ in range(repeat):
            rounds["loop"].append(run_loop(chosen_scenario, duration, args.device))
            rounds["trainer"].append(
                run_trainer(chosen_scenario, duration, args.device, args.threads)
            )
            rounds["raw"].append(run_raw(chosen_scenario, duration))
            rounds["service"].append(
                run_service(chosen_scenario, duration, args.device, threads=args.threads)
            )
            rounds["shm"].append(
                run_service(
                    chosen_scenario, duration, args.device, shared=True, threads=args.threads
                )
            )
            if args.ingest_process:
                rounds["ingest"].append(
                    run_service(
                        chosen_scenario, duration, args.device, threads=args.threads, ingest=True
                    )
                )
        chosen_runs = {c: _median(runs) for c, runs in rounds.items()}
        ratios = _round_ratios(
            rounds, {k: (*v, True) for k, v in {**RATIOS, **INGEST_RATIOS}.items()}
        )
        results[name] = {
            **chosen_runs,
            **{key: ratio["median"] for key, ratio in ratios.items()},
            "ratios": ratios,
            "rounds": {c: [r["steps_per_s"] for r in runs] for c, runs in rounds.items()},
        }
    server_threads = intra_op_threads(Settings(threads=args.threads))
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, torch threads: loop "
        f"{torch.get_num_threads()}, server {server_threads}, "
        f"torch {torch.__version__}, device {args.device}, optimizer {args.optimizer}"
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
