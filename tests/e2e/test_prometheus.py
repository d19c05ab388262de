"""A real Prometheus scrapes a real ``gradstream serve`` while a client trains.

One scenario (about 30 s of training) feeds every test here: the dashboard's
queries and the alert rules run through Prometheus's HTTP API against what it
scraped, exactly as Grafana and the rule evaluator will run them.

Two models train side by side. ``healthy`` learns a linear map; ``diverging``
only gets batches whose loss overflows to inf and batches that are rejected, so
the alerts meant for it have something to fire on and the healthy one must not
trip them.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from gradstream.client import Client, NotFound
from gradstream.client._local import LocalServer
from tests.conftest import ROOT, require_tool
from tools.dashboard import dashboard

RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
RULE_TESTS = Path(__file__).with_name("prometheus_rules_test.yml")
TRAIN_SECONDS = 30.0
# $__rate_interval is Grafana's; with a 1 s scrape interval 15 s spans enough samples.
RATE_INTERVAL = "15s"

HEALTHY = {
    "architecture": {"kind": "linear", "in_features": 3, "out_features": 2},
    "loss": {"kind": "mse"},
    "optimizer": {"kind": "sgd", "lr": 0.05},
}
# w = 1, so x = 1e30 gives (1e30 - y)^2 = inf in float32: a skipped step.
DIVERGING = {
    "architecture": {"kind": "linear", "in_features": 1, "out_features": 1, "bias": False},
    "init": {"kind": "tensors", "tensors": {"weight": [[1.0]]}},
    "loss": {"kind": "mse"},
    "optimizer": {"kind": "sgd", "lr": 0.01},
}
NONFINITE_BATCHES = 10  # fewer than max_nonfinite_steps (50): the model stays trainable
# The alert wants > 0.1 rejected batches/s over 5 minutes: more than 30 in the window.
REJECTED_BATCHES = 60

# Which models each alert must fire for in this run (its expression, `for` aside).
EXPECTED_FIRING: dict[str, set[str]] = {
    "GradstreamLossNotFinite": {"diverging"},
    # Compares the last 30 minutes with the 30 before: a 30 s run has no "before".
    "GradstreamLossNotFalling": set(),
    "GradstreamNoSteps": {"diverging"},
    "GradstreamBatchesRejected": {"diverging"},
    "GradstreamStepsSkipped": {"diverging"},
    # No checkpoint gauge in this run, and a fresh one would not be an hour old.
    "GradstreamCheckpointStale": set(),
    # No checkpoint directory in this run: nothing to fail.
    "GradstreamCheckpointFailing": set(),
}
# Queries with no data on a healthy CPU-only run, and why.
EMPTY_WITHOUT_CUDA = {
    # Exported only for CUDA devices: PyTorch has no allocator statistics for the CPU.
    "gradstream_device_memory_allocated_bytes",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Prometheus:
    """A Prometheus server on loopback with its own data directory."""

    def __init__(self, binary: str, workdir: Path, target: str) -> None:
        self.port = _free_port()
        config = workdir / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(RULES)],
                    "scrape_configs": [
                        {"job_name": "gradstream", "static_configs": [{"targets": [target]}]}
                    ],
                }
            )
        )
        self.log = (workdir / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=self.log,
        )

    def get(self, path: str, **params: Any) -> Any:
        """GET an API path; the ``data`` of a successful answer."""
        url = f"http://127.0.0.1:{self.port}{path}?{urllib.parse.urlencode(params, doseq=True)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's vector."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.get("/api/v1/query", **params)
        assert data["resultType"] == "vector", (expr, data)
        result: list[dict[str, Any]] = data["result"]
        return result

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "prometheus exited; see prometheus.log"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2):
                    return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"prometheus not ready after {timeout} s")

    def wait_for(self, expr: str, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Poll until ``expr`` returns data (bounded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.query(expr)
            if result:
                return result
            time.sleep(0.2)
        raise TimeoutError(f"{expr} returned nothing for {timeout} s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@dataclass
class Run:
    """What the scenario left to check."""

    prometheus: Prometheus
    metrics_port: int
    live_scrape: str = ""  # /metrics taken in the middle of training
    last_loss: float | None = None
    steps: int = 0
    training_until: float = 0.0  # wall-clock time at which training was still going


def _healthy_batches(until: float) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    w = np.array([[1.0, -2.0], [0.5, 0.0], [3.0, 1.0]], np.float32)
    while time.monotonic() < until:
        x = rng.normal(size=(16, 3)).astype(np.float32)
        yield x, x @ w + 0.5
        time.sleep(0.004)  # a steady producer, not a flood: 2 cores are shared


def _ghost_requests(client: Client, stop: threading.Event) -> None:
    # A steady trickle of NOT_FOUND so the error panel has a live rate to show.
    while not stop.wait(0.2):
        with pytest.raises(NotFound):
            client.get_model("ghost")


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text: str = response.read().decode()
        return text


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """Serve, scrape, train ~30 s; yields once training has ended (Prometheus still runs)."""
    binary = require_tool("prometheus")
    workdir = tmp_path_factory.mktemp("prometheus")
    with LocalServer("--device", "cpu", log=workdir / "gradstream.log") as server:
        prometheus = Prometheus(binary, workdir, f"127.0.0.1:{server.metrics_port}")
        try:
            prometheus.wait_ready()
            state = Run(prometheus, server.metrics_port)
            with Client(server.target) as client:
                _scenario(client, state)
            yield state
        finally:
            prometheus.stop()


def _scenario(client: Client, state: Run) -> None:
    prometheus = state.prometheus
    client.create_model("healthy", HEALTHY)
    client.create_model("diverging", DIVERGING)
    # increase() needs a sample from before the bad batches.
    prometheus.wait_for('gradstream_train_steps_total{model="diverging"}')
    huge = np.array([[1e30]], np.float32)
    skipped = list(
        client.train("diverging", [(huge, np.zeros((1, 1), np.float32))] * NONFINITE_BATCHES)
    )
    assert [r.outcome for r in skipped] == ["SKIPPED_NONFINITE"] * NONFINITE_BATCHES
    wrong = [(np.ones((1, 2), np.float32), np.ones((1, 1), np.float32))] * REJECTED_BATCHES
    rejected = list(client.train("diverging", wrong, skip_rejected=True))
    assert [r.outcome for r in rejected] == ["REJECTED"] * REJECTED_BATCHES

    # The dashboard's evaluation panel: one Evaluate of the healthy model before it trains.
    x = np.ones((8, 3), np.float32)
    client.evaluate("healthy", [(x, np.zeros((8, 2), np.float32))])

    stop = threading.Event()
    ghost = threading.Thread(target=_ghost_requests, args=(client, stop), daemon=True)
    ghost.start()
    start = time.monotonic()
    until = start + TRAIN_SECONDS

    def scrape_midway() -> None:
        if time.monotonic() > start + TRAIN_SECONDS / 2 and not state.live_scrape:
            state.live_scrape = _scrape(state.metrics_port)

    try:
        for result in client.train("healthy", _healthy_batches(until)):
            assert result.outcome == "APPLIED"
            state.steps = result.step
            if result.loss is not None:
                state.last_loss = result.loss
            scrape_midway()
            if until - time.monotonic() > 2.0:
                state.training_until = time.time()
    finally:
        stop.set()
        ghost.join(5)
    assert state.live_scrape, "training ended before the midway scrape"
    assert state.steps > 100, f"only {state.steps} steps in {TRAIN_SECONDS} s"


def test_promtool_check_metrics_finds_nothing_in_a_live_scrape(run: Run) -> None:
    promtool = require_tool("promtool")
    checked = subprocess.run(
        [promtool, "check", "metrics"],
        input=run.live_scrape.encode(),
        capture_output=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr.decode()
    assert checked.stdout.decode() + checked.stderr.decode() == ""
    assert 'gradstream_train_loss{model="healthy"}' in run.live_scrape


def test_last_scraped_loss_is_the_last_loss_the_client_received(run: Run) -> None:
    assert run.last_loss is not None
    deadline = time.monotonic() + 20.0
    seen: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        seen = run.prometheus.query('gradstream_train_loss{model="healthy"}')
        if seen and float(seen[0]["value"][1]) == run.last_loss:
            break
        time.sleep(0.2)
    assert seen, "Prometheus never scraped gradstream_train_loss"
    assert float(seen[0]["value"][1]) == run.last_loss
    (steps,) = run.prometheus.query('gradstream_train_steps_total{model="healthy"}')
    assert float(steps["value"][1]) == run.steps


def _panel_targets() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


def _promql(expr: str) -> str:
    return expr.replace("$__rate_interval", RATE_INTERVAL).replace("$model", ".*")


@pytest.mark.parametrize(("title", "expr"), _panel_targets(), ids=lambda v: str(v)[:40])
def test_every_dashboard_query_returns_data(run: Run, title: str, expr: str) -> None:
    result = run.prometheus.query(_promql(expr), at=run.training_until)
    if expr in EMPTY_WITHOUT_CUDA:
        assert result == [], f"{title}: CUDA series on a CPU server"
        return
    assert result, f"{title}: {expr} returned no data"
    values = [float(sample["value"][1]) for sample in result]
    assert any(not math.isnan(v) for v in values), f"{title}: {expr} is all NaN"


def test_dashboard_model_variable_lists_the_models(run: Run) -> None:
    (variable,) = [v for v in dashboard()["templating"]["list"] if v["name"] == "model"]
    assert variable["definition"] == "label_values(gradstream_train_steps_total, model)"
    models = run.prometheus.get(
        "/api/v1/label/model/values", **{"match[]": "gradstream_train_steps_total"}
    )
    assert set(models) == {"healthy", "diverging"}


def test_every_alert_rule_is_loaded_and_evaluates_without_error(run: Run) -> None:
    expected = {
        rule["alert"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
    }
    assert expected == set(EXPECTED_FIRING)
    deadline = time.monotonic() + 20.0
    rules: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        groups = run.prometheus.get("/api/v1/rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        if rules and all(rule["health"] != "unknown" for rule in rules):
            break
        time.sleep(0.2)
    assert {rule["name"] for rule in rules} == expected
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))


@pytest.mark.parametrize("alert", sorted(EXPECTED_FIRING))
def test_alert_fires_exactly_where_expected(run: Run, alert: str) -> None:
    (rule,) = [
        rule
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
        if rule["alert"] == alert
    ]
    result = run.prometheus.query(rule["expr"], at=run.training_until)
    assert {sample["metric"].get("model") for sample in result} == EXPECTED_FIRING[alert]


@pytest.mark.parametrize(
    "args",
    [
        ("check", "config", str(CONFIG)),
        ("check", "rules", str(RULES)),
        ("test", "rules", str(RULE_TESTS)),
    ],
    ids=["check-config", "check-rules", "test-rules"],
)
def test_promtool_accepts_the_config_and_rules(args: tuple[str, ...]) -> None:
    """The shipped config and rules parse; the unit tests of the slow alerts pass."""
    checked = subprocess.run(
        [require_tool("promtool"), *args], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    if args[0] == "check" and args[1] == "config":
        # the rule file is found relative to the config, as in a local run
        assert "1 rule files found" in checked.stdout
