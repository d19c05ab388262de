"""The ``gradstream`` command against a real server process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradstream.client import Client
from gradstream.client._local import LocalServer

SPEC = {
    "architecture": {"kind": "linear", "in_features": 2, "out_features": 1},
    "init": {"kind": "zeros"},
    "optimizer": {"kind": "sgd", "lr": 0.1},
}


def gradstream(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gradstream.client.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=check,
    )


@pytest.fixture(scope="module")
def served() -> Iterator[LocalServer]:
    with LocalServer() as server:
        yield server


def test_create_train_predict_params_from_the_command_line(
    served: LocalServer, tmp_path: Path
) -> None:
    target = served.target
    created = gradstream("create", "cli-model", "--spec", json.dumps(SPEC), "--target", target)
    assert "created cli-model on cpu" in created.stdout
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (64, 2)).astype(np.float32)
    y = x @ np.array([[2.0], [-1.0]], np.float32) + 0.5
    csv = tmp_path / "data.csv"
    np.savetxt(csv, np.hstack([x, y]), delimiter=",", header="a,b,target", comments="")
    trained = gradstream(
        "train", "cli-model", str(csv), "--batch-size", "16", "--epochs", "30", "--target", target
    )
    assert "trained 120 batches, step 120" in trained.stdout
    assert "batches/s" in trained.stderr  # the progress line
    npz = tmp_path / "data.npz"
    np.savez(npz, x=x, y=y)
    gradstream(
        "train",
        "cli-model",
        str(npz),
        "--batch-size",
        "64",
        "--epochs",
        "20",
        "--quiet",
        "--target",
        target,
    )
    params = json.loads(gradstream("params", "cli-model", "--target", target).stdout)
    np.testing.assert_allclose(np.array(params["weight"]), [[2.0, -1.0]], atol=0.05)
    np.testing.assert_allclose(params["bias"], [0.5], atol=0.05)
    np.save(tmp_path / "x.npy", x[:3])
    predicted = gradstream("predict", "cli-model", str(tmp_path / "x.npy"), "--target", target)
    np.testing.assert_allclose(np.loadtxt(predicted.stdout.splitlines()), y[:3].ravel(), atol=0.1)
    assert "cli-model" in gradstream("models", "--target", target).stdout


def test_errors_are_one_line_naming_the_problem(served: LocalServer) -> None:
    result = gradstream("params", "missing-model", "--target", served.target, check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == "gradstream: NOT_FOUND: no model named 'missing-model'"


def test_serve_flags_mirror_every_setting() -> None:
    from gradstream.server.config import Settings

    help_text = gradstream("serve", "--help").stdout
    for field in Settings.model_fields:
        assert "--" + field.replace("_", "-") in help_text


def test_sigterm_stops_the_server_cleanly() -> None:
    server = LocalServer().start()
    with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    with Client(server.target) as client:
        client.create_model("m", SPEC)
    start = time.monotonic()
    assert server.stop(signal.SIGTERM) == 0
    assert time.monotonic() - start < 30
    assert server.stop(signal.SIGINT) == 0  # already stopped: nothing to do


def test_demo_prints_the_notebooks_trajectory() -> None:
    out = gradstream("demo").stdout.splitlines()
    assert "Prediction before training: f(5) = 0.000" in out
    assert "epoch 1: w = 0.300, loss = 30.00000000" in out
    assert "epoch 2: w = 0.555, loss = 21.67499924" in out
    assert "epoch 24: w = 1.960, loss = 0.01699772" in out
    assert any(line.startswith("epoch 25: w = 1.966,") for line in out)
    assert out[-1] == "Prediction after training: f(5) = 10.000"
    assert any("MseLossBackward0" in line for line in out)


def test_server_logs_each_lifecycle_event_at_info(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    checkpoints = tmp_path / "ckpt"
    with LocalServer(
        "--checkpoint-dir", str(checkpoints), "--metrics-port", "-1", log=log
    ) as server:
        target = ("--target", server.target)
        gradstream("create", "logged", "--spec", json.dumps(SPEC), *target)
        data = tmp_path / "d.csv"
        data.write_text("1,2,3\n4,5,nan\n")  # the second batch is rejected (NaN)
        gradstream("train", "logged", str(data), "--batch-size", "1", "--skip-rejected", *target)
        gradstream("checkpoint", "logged", *target)
        gradstream("delete", "logged", *target)
    text = log.read_text()
    assert "metrics off" in text
    assert "INFO gradstream.server: model created name=logged architecture=linear" in text
    assert "train stream ended model=logged producer=- batches=1 rejected=1" in text
    assert "checkpoint written model=logged checkpoint=" in text
    assert re.search(r"model deleted name=logged step=\d+ models=0", text), text


def test_torchrun_ranks_refuse_an_open_port_with_the_reason_first(tmp_path: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "PATH": f"{torchrun.parent}{os.pathsep}{os.environ['PATH']}"}
    serve = [
        "gradstream",
        "serve",
        "--host",
        "0.0.0.0",
        "--device",
        "cpu",
        "--port",
        "0",
        "--health-port",
        "-1",
    ]
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "--no-python", *serve],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if not re.match(r"^[WEI]\d{4} ", line)]
    refusal = "gradstream serve: refusing to listen on 0.0.0.0 without tokens"
    assert ours[0].startswith(refusal), result.stderr  # before torchrun's own report
    assert "Gloo" not in result.stderr
    assert "Connection closed" not in result.stderr
