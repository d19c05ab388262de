"""Every script in examples/ runs end to end, as a user would run it."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gradstream.server.main import BackgroundServer
from tests.conftest import ROOT, require_tool, server_settings

EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def served() -> Iterator[BackgroundServer]:
    with BackgroundServer(server_settings()) as running:
        yield running


def run(command: list[str], env: dict[str, str] | None = None) -> str:
    """The example's stdout; fails with its stderr when it fails."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env={**os.environ, "PATH": path, **(env or {})},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_every_example_is_tested_here() -> None:
    source = Path(__file__).read_text()
    for script in EXAMPLES.iterdir():
        if script.suffix in (".py", ".sh"):
            assert f'"{script.name}"' in source, script.name


def test_csv_classifier(served: BackgroundServer) -> None:
    out = run(["bash", str(EXAMPLES / "csv_classifier.sh")], {"GRADSTREAM_TARGET": served.target})
    accuracy = float(re.findall(r"held-out accuracy: ([0-9.]+)", out)[0])
    assert accuracy > 0.9, out
    assert "deleted example-classifier" in out


def test_generator_sdk(served: BackgroundServer) -> None:
    out = run(
        [sys.executable, str(EXAMPLES / "generator_sdk.py")], {"GRADSTREAM_TARGET": served.target}
    )
    mse = float(re.findall(r"held-out mse after 300 steps: ([0-9.e-]+)", out)[0])
    assert mse < 1e-3, out


def test_exported_model(served: BackgroundServer) -> None:
    out = run(
        [sys.executable, str(EXAMPLES / "exported_model.py")], {"GRADSTREAM_TARGET": served.target}
    )
    before, after = map(
        float, re.findall(r"held-out mse: ([0-9.]+) before, ([0-9.]+) after", out)[0]
    )
    assert after < before / 4, out
    assert "trained 400 steps" in out and "deleted example-exported" in out


def test_ctr_embedding(served: BackgroundServer) -> None:
    out = run(
        [sys.executable, str(EXAMPLES / "ctr_embedding.py")], {"GRADSTREAM_TARGET": served.target}
    )
    loss, chance = map(float, re.findall(r"log loss: ([0-9.]+) \(base rate's ([0-9.]+)\)", out)[0])
    before, after = map(float, re.findall(r"roc auc: ([0-9.]+) before, ([0-9.]+) after", out)[0])
    # Better than knowing only the click rate, and ranking clicks well above chance.
    assert loss < chance - 0.03 and after > 0.65 and after > before, out
    assert "inputs: user (integer), item (integer), category (integer), dense (float)" in out
    assert "trained 300 steps" in out and re.search(r"exported ctr.safetensors, \d+ bytes", out)
    assert "deleted example-ctr" in out


def test_exactly_once_producer() -> None:
    out = run([sys.executable, str(EXAMPLES / "exactly_once_producer.py")])
    assert re.search(r"the model is at step 400, reconnects [1-9]", out), out


def test_monitoring() -> None:
    require_tool("prometheus")
    require_tool("curl")
    ports = {
        "GRADSTREAM_PORT": str(free_port()),
        "GRADSTREAM_METRICS_PORT": str(free_port()),
        "PROMETHEUS_PORT": str(free_port()),
    }
    out = run(["bash", str(EXAMPLES / "monitoring.sh")], ports)
    assert "Prometheus sees model 'monitored' at 500 steps" in out, out
    assert re.search(r"alert rules loaded: [1-9]", out), out
