"""Data-parallel serving under torchrun: two Gloo ranks on the CPU, started by the test."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gradstream.client import Client

STARTUP_TIMEOUT = 60.0
SPECS: dict[str, dict[str, Any]] = {
    # momentum: the optimizer state must stay equal too
    "linear-mse": {
        "architecture": {"kind": "linear", "in_features": 4, "out_features": 2},
        "optimizer": {"lr": 0.05, "momentum": 0.9},
    },
    # sample weights, class labels, accumulation over two batches
    "mlp-ce-weighted": {
        "architecture": {"kind": "mlp", "in_features": 3, "out_features": 3, "hidden": [5]},
        "loss": {"kind": "cross_entropy"},
        "optimizer": {"lr": 0.1, "weight_decay": 1e-3},
        "accumulate_steps": 2,
    },
    # sum reduction, float64
    "linear-huber-sum": {
        "architecture": {"kind": "linear", "in_features": 2, "out_features": 1},
        "loss": {"kind": "huber", "reduction": "sum", "delta": 0.5},
        "optimizer": {"lr": 0.01, "nesterov": True, "momentum": 0.5},
        "dtype": "float64",
    },
}


def free_port() -> int:
    """A port that was free a moment ago (the launcher binds it soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class TorchrunJob:
    """``python -m torch.distributed.run --nproc-per-node N --no-python gradstream serve``."""

    def __init__(
        self, workdir: Path, *serve_args: str, nproc: int = 2, port: int = 0, max_restarts: int = 0
    ) -> None:
        self.workdir = workdir
        self.ready = workdir / "ready.json"
        self.log = workdir / "torchrun.log"
        gradstream = Path(sys.executable).with_name("gradstream")
        self.command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={nproc}",
            "--master-addr=127.0.0.1",
            f"--master-port={free_port()}",
            f"--max-restarts={max_restarts}",
            "--monitor-interval=0.1",
            "--no-python",
            str(gradstream),
            "serve",
            "--host=127.0.0.1",
            f"--port={port}",
            "--health-port=0",
            "--metrics-port=0",
            "--device=cpu",
            f"--ready-file={self.ready}",
            *serve_args,
        ]
        self.process: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}

    def start(self) -> TorchrunJob:
        """Launch and wait (bounded) until rank 0 serves and rank 1 has written its ports."""
        for stale in self.workdir.glob("ready.json*"):
            stale.unlink()
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        rank1 = self.workdir / "ready.json.rank1"
        while not (self.ready.exists() and rank1.exists()):
            if self.process.poll() is not None:
                raise RuntimeError(f"torchrun exited with {self.process.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"not ready in {STARTUP_TIMEOUT} s:\n{self.tail()}")
            time.sleep(0.05)
        self.ports = json.loads(self.ready.read_text())
        self.rank1 = json.loads(rank1.read_text())
        return self

    @property
    def target(self) -> str:
        """host:port of rank 0's gRPC endpoint."""
        return f"127.0.0.1:{self.ports['port']}"

    def tail(self, lines: int = 40) -> str:
        """The end of the job's log, for failure messages."""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def wait(self, timeout: float) -> int:
        """The launcher's exit code, waiting at most ``timeout`` seconds."""
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the launcher (it drains rank 0 and stops the others), then reap."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the launcher and every rank (they share its session)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def __enter__(self) -> TorchrunJob:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.kill()


def random_batches(spec: dict[str, Any], count: int, seed: int) -> list[tuple[Any, ...]]:
    """Batches of 1 to 33 rows: odd sizes, sizes below the world size, a weight column."""
    rng = np.random.default_rng(seed)
    arch, loss = spec["architecture"], spec.get("loss", {}).get("kind", "mse")
    dtype = np.float64 if spec.get("dtype") == "float64" else np.float32
    sizes = [1, 3, *rng.integers(1, 34, count - 2).tolist()]
    batches: list[tuple[Any, ...]] = []
    for rows in sizes:
        x = rng.normal(size=(rows, arch["in_features"])).astype(dtype)
        if loss == "cross_entropy":
            y: Any = rng.integers(0, arch["out_features"], rows).astype(np.int64)
            w = rng.uniform(0.1, 2.0, rows).astype(dtype)
            batches.append((x, y, w))
        else:
            y = rng.normal(size=(rows, arch["out_features"])).astype(dtype)
            batches.append((x, y))
    return batches


def train_everything(client: Client, prefix: str, count: int) -> dict[str, dict[str, Any]]:
    """Each spec: 50 streamed batches, an lr change and a freeze half-way; final parameters."""
    final: dict[str, dict[str, Any]] = {}
    for i, (key, spec) in enumerate(SPECS.items()):
        name = f"{prefix}-{key}"
        client.create_model(name, spec)
        batches = random_batches(spec, count, seed=i)
        half = count // 2
        first = list(client.train(name, batches[:half], batches_per_message=7))
        # Mirrored on every rank by a state push; the second half shows it took.
        client.update_model(name, lr=spec["optimizer"]["lr"] / 2)
        if key == "linear-mse":
            client.update_model(name, freeze=["bias"])
        second = list(client.train(name, batches[half:], batches_per_message=5))
        outcomes = [r.outcome for r in first + second]
        k = spec.get("accumulate_steps", 1)
        assert outcomes == ["APPLIED" if j % k == k - 1 else "ACCUMULATED" for j in range(count)]
        final[key] = {
            "params": client.parameters(name),
            "losses": [r.loss for r in first + second],
        }
        client.delete_model(name)
    return final


def scrape(port: int) -> dict[str, float]:
    """Prometheus text exposition as {series: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            samples[series] = float(value)
    return samples


@pytest.fixture
def job(tmp_path: Path) -> Iterator[TorchrunJob]:
    """Two Gloo ranks on the CPU."""
    with TorchrunJob(tmp_path, "--collective-timeout=20") as running:
        yield running


def test_two_ranks_equal_one_process_on_50_batches_of_random_sizes(
    job: TorchrunJob, client: Client, record_property: Any
) -> None:
    count = 50
    with Client(job.target) as distributed:
        got = train_everything(distributed, "dist", count)
    expected = train_everything(client, "single", count)
    bitwise: dict[str, bool] = {}
    for key in SPECS:
        a, b = got[key]["params"], expected[key]["params"]
        assert a.keys() == b.keys()
        for n in a:
            assert a[n].dtype == b[n].dtype
            np.testing.assert_allclose(a[n], b[n], rtol=0, atol=1e-6, err_msg=f"{key}.{n}")
        np.testing.assert_allclose(got[key]["losses"], expected[key]["losses"], rtol=1e-5)
        bitwise[key] = all(a[n].tobytes() == b[n].tobytes() for n in a)
    # Not asserted: a split batch sums its rows in another order (see docs/scaling.md).
    record_property("bitwise_equal", json.dumps(bitwise))
    print(f"two ranks vs one process, bitwise equal: {bitwise}")
    # Every rank exports its own step timing; rank 1 saw every batch of every model.
    rank1 = scrape(job.rank1["metrics_port"])
    assert rank1['gradstream_rank_step_duration_seconds_count{rank="1"}'] == count * len(SPECS)
    rank0 = scrape(job.ports["metrics_port"])
    assert rank0['gradstream_rank_step_duration_seconds_count{rank="0"}'] == count * len(SPECS)
    assert rank0["gradstream_world_size"] == 2
    # Rows are split, not copied: the ranks' rows add up to the batches' rows.
    rows = sum(len(b[0]) for i, s in enumerate(SPECS.values()) for b in random_batches(s, count, i))
    assert rank0['gradstream_rank_rows_total{rank="0"}'] + rank1[
        'gradstream_rank_rows_total{rank="1"}'
    ] == rows
