"""The ``gradstream`` commands a new user meets: help, model management, errors, wrong targets.

Every command runs as a real process against a real server; no output is mocked.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from gradstream.client import export_module
from gradstream.server.main import BackgroundServer
from tests.conftest import server_settings
from tests.e2e._cli import GRADSTREAM, gradstream, one_line_error
from tests.integration._security import make_pki

SPEC = {
    "architecture": {"kind": "linear", "in_features": 2, "out_features": 1},
    "init": {"kind": "zeros"},
    "optimizer": {"kind": "sgd", "lr": 0.1},
}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    """A server with health and metrics ports and a checkpoint directory."""
    settings = server_settings(
        health_port=0, metrics_port=0, checkpoint_dir=tmp_path_factory.mktemp("ckpt")
    )
    with BackgroundServer(settings) as running:
        yield running


def test_help_shows_every_flag_with_its_default_and_version() -> None:
    assert gradstream("--version").stdout.strip() == "gradstream, version 0.1.0"
    train = gradstream("train", "--help").stdout
    for flag, default in (("--batch-size", "32"), ("--epochs", "1"), ("--report-every", "10")):
        line = train[train.index(flag) :]
        assert f"default: {default}" in " ".join(line[:300].split()), flag
    assert "--gradients" in gradstream("params", "--help").stdout
    serve = gradstream("serve", "--help").stdout
    assert "--insecure / --no-insecure" in serve
    assert "[INSECURE]" not in serve
    top = gradstream("--help").stdout
    for command in ("info", "update", "delete", "checkpoint", "demo", "bench"):
        described = next(line for line in top.splitlines() if line.strip().startswith(command))
        assert len(described.split()) > 2, described  # a description, not just the name
    bench = subprocess.run(
        [*GRADSTREAM, "bench", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "small, medium, large, soak" in bench
    assert "[]" not in bench
    assert "All three" not in bench


def test_no_command_is_a_usage_error() -> None:
    result = gradstream(check=False)
    assert result.returncode == 2
    assert "Commands:" in result.stderr


def test_manage_a_model_without_the_sdk(served: BackgroundServer, tmp_path: Path) -> None:
    target = ("--target", served.target)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    gradstream("create", "managed", "--spec", str(spec), *target)
    again = gradstream("create", "managed", "--spec", str(spec), *target, check=False)
    assert "ALREADY_EXISTS" in one_line_error(again, 1)

    shown = gradstream("info", "managed", *target).stdout
    assert "managed on cpu, step 0" in shown
    assert "weight: shape [1, 2]" in shown
    assert "MseLossBackward0" in shown
    described = json.loads(gradstream("info", "managed", "--json", *target).stdout)
    assert described["spec"]["optimizer"]["lr"] == 0.1
    assert described["parameters"]["weight"] == {"shape": [1, 2], "frozen": False}

    updated = gradstream("update", "managed", "--lr", "0.5", "--freeze", "bias", *target)
    assert "lr 0.5" in updated.stdout
    described = json.loads(gradstream("info", "managed", "--json", *target).stdout)
    assert described["spec"]["optimizer"]["lr"] == 0.5
    assert described["parameters"]["bias"]["frozen"] is True
    gradstream("update", "managed", "--unfreeze", "bias", *target)
    nothing = gradstream("update", "managed", *target, check=False)
    assert "give --lr, --freeze or --unfreeze" in one_line_error(nothing, 2)

    saved = gradstream("checkpoint", "managed", *target).stdout
    assert "at step 0" in saved

    assert gradstream("delete", "managed", *target).stdout.strip() == "deleted managed"
    gone = gradstream("info", "managed", *target, check=False)
    assert "NOT_FOUND" in one_line_error(gone, 1)
    gradstream("create", "managed", "--spec", json.dumps(SPEC), *target)  # the name is free again
    gradstream("delete", "managed", *target)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("--batch-size", "0"), "'--batch-size': 0"),
        (("--batch-size", "-5"), "'--batch-size': -5"),
        (("--epochs", "0"), "'--epochs': 0"),
        (("--report-every", "x"), "'--report-every': 'x'"),
        (("--delimiter", ";;"), "'--delimiter': ';;'"),
        (("--bogus",), "--bogus"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag_and_value(
    args: tuple[str, ...], named: str, tmp_path: Path
) -> None:
    data = tmp_path / "d.csv"
    data.write_text("1,2,3\n")
    line = one_line_error(gradstream("train", "m", str(data), *args, check=False), 2)
    assert named in line
    assert line.startswith("gradstream train: ")


def test_missing_or_unknown_files_exit_2_naming_them(tmp_path: Path) -> None:
    missing = one_line_error(gradstream("train", "m", str(tmp_path / "nope.csv"), check=False), 2)
    assert "nope.csv" in missing
    odd = tmp_path / "data.xlsx"
    odd.write_text("")
    assert "data.xlsx" in one_line_error(gradstream("train", "m", str(odd), check=False), 2)
    spec = one_line_error(gradstream("create", "m", "--spec", "nope.json", check=False), 2)
    assert "--spec" in spec
    assert "nope.json" in spec


def test_spec_errors_exit_1_from_the_client_and_from_the_server(served: BackgroundServer) -> None:
    target = ("--target", served.target)
    unknown_key = gradstream(
        "create", "s", "--spec", '{"architecture": {"kynd": 1}}', *target, check=False
    )
    assert "kynd" in one_line_error(unknown_key, 1)
    bad_value = {**SPEC, "optimizer": {"kind": "sgd", "lr": -1.0}}
    server_side = gradstream("create", "s", "--spec", json.dumps(bad_value), *target, check=False)
    assert "INVALID_ARGUMENT" in one_line_error(server_side, 1)
    not_json = gradstream("create", "s", "--spec", "{nope", *target, check=False)
    assert "not JSON" in one_line_error(not_json, 1)


def test_broken_pipe_is_quiet(served: BackgroundServer) -> None:
    wide = {
        **SPEC,
        "architecture": {"kind": "mlp", "in_features": 64, "hidden": [2048], "out_features": 1},
    }
    target = ("--target", served.target)
    gradstream("create", "wide", "--spec", json.dumps(wide), *target)
    try:
        command = " ".join([*GRADSTREAM, "params", "wide", *target])
        result = subprocess.run(
            ["bash", "-c", f"set -o pipefail; {command} | head -1"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.stdout.strip() == "{"
        assert result.stderr == ""
    finally:
        gradstream("delete", "wide", *target)


def test_a_wrong_target_gets_a_hint(served: BackgroundServer, tmp_path: Path) -> None:
    health = gradstream("models", "--target", f"127.0.0.1:{served.server.health_port}", check=False)
    assert "the health port is not the API port" in one_line_error(health, 1)
    metrics = gradstream(
        "models", "--target", f"127.0.0.1:{served.server.metrics_port}", check=False
    )
    assert "the metrics port is not the API port" in one_line_error(metrics, 1)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    nobody = gradstream("models", "--target", f"127.0.0.1:{free}", check=False)
    assert f"is a gradstream server listening on 127.0.0.1:{free}?" in one_line_error(nobody, 1)
    no_port = gradstream("models", "--target", "localhost", check=False)
    assert "give HOST:PORT" in one_line_error(no_port, 2)

    pki = make_pki(tmp_path)
    tls = server_settings(tls_cert=pki.server_cert, tls_key=pki.server_key)
    with BackgroundServer(tls) as secure:
        plain = gradstream("models", "--target", secure.target, check=False)
        assert "pass --ca" in one_line_error(plain, 1)
        assert gradstream("models", "--target", secure.target, "--ca", str(pki.ca)).returncode == 0


def _busy_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.mark.parametrize("flag", ["--port", "--health-port", "--metrics-port"])
def test_a_port_in_use_is_one_line_naming_it(flag: str) -> None:
    ports = {"--port": "0", "--health-port": "-1", "--metrics-port": "-1"}
    with _busy_port() as busy:
        ports[flag] = str(busy.getsockname()[1])
        args = [a for item in ports.items() for a in item]
        result = gradstream("serve", "--device", "cpu", *args, check=False, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "Event loop is closed" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert f"{flag} {ports[flag]}" in last
    assert "already in use" in last


def test_serve_refuses_an_open_port_without_tokens_in_one_line() -> None:
    result = gradstream("serve", "--host", "0.0.0.0", "--port", "0", check=False)
    line = one_line_error(result, 2)
    assert "--tokens-file" in line
    assert "--insecure" in line


def test_serve_without_the_server_extra_says_what_to_install() -> None:
    # A client-only install: torch (and with it the server) cannot be imported.
    for blocked in ("torch", "pydantic_settings"):
        code = (
            f"import sys; sys.modules[{blocked!r}] = None; "
            "from gradstream.client.cli import main; main(['serve', '--port', '0'])"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
        )
        line = one_line_error(result, 1)
        assert "needs the server extra: pip install 'gradstream[server]'" in line, blocked


def test_predict_reads_stdin_and_prints_csv(served: BackgroundServer) -> None:
    target = ("--target", served.target)
    weights = {"weight": [[1.0, 2.0]], "bias": [0.5]}
    spec = {**SPEC, "init": {"kind": "zeros"}}
    gradstream("create", "lin", "--spec", json.dumps(spec), *target)
    try:
        from gradstream.client import Client

        with Client(served.target) as client:
            client.set_parameters("lin", {k: np.array(v, np.float32) for k, v in weights.items()})
        result = gradstream("predict", "lin", "-", *target, stdin="a,b\n1,1\n2,0.5\n")
        assert result.stdout.split() == ["3.5", "3.5"]
        # The step of the parameters used, on stderr: stdout stays CSV.
        assert "predicted with the parameters of step 0" in result.stderr
    finally:
        gradstream("delete", "lin", *target)


def test_create_an_exported_model_from_a_program_file(
    served: BackgroundServer, tmp_path: Path
) -> None:
    program = tmp_path / "net.pt2"
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    program.write_bytes(export_module(net, (torch.randn(4, 3),)))
    spec = json.dumps({"architecture": {"kind": "exported"}})
    target = ("--target", served.target)
    out = gradstream("create", "byom", "--spec", spec, "--program", str(program), *target)
    assert "created byom" in out.stdout and "'0.weight': [4, 3]" in out.stdout
    missing = gradstream("create", "byom2", "--spec", spec, *target, check=False)
    assert missing.returncode != 0 and "program" in missing.stderr
