"""The container image, built and run: `make image-test` (GRADSTREAM_IMAGE_TEST=1).

It installs podman where it can (Debian packages), builds the `cpu` target of
deploy/Dockerfile on a local Debian base (tests/deploy/image.py) and runs it the ways
docs/deploy.md documents. Skipped, saying why, where containers cannot run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradstream.client import Client
from tests.deploy.conftest import K8S, config_data, container, load_compose, pod_spec, render
from tests.deploy.image import BASE_TAG, IMAGE_TAG, Podman, Unavailable, free_port, install_tools

# The first test also installs podman, makes the base and builds: minutes on a loaded machine.
pytestmark = [pytest.mark.image, pytest.mark.timeout(900)]

UID = "10001"
CHECKPOINTS = "/var/lib/gradstream"
SPEC = {
    "architecture": {"kind": "linear", "in_features": 1, "out_features": 1, "bias": False},
    "init": {"kind": "zeros"},
    "loss": {"kind": "mse", "reduction": "mean"},
    "optimizer": {"kind": "sgd", "lr": 0.01},
}
# What test_image_files compares between the image and its base.
FACTS = """
import hashlib, json, os
ca = open("/etc/ssl/certs/ca-certificates.crt", "rb").read()
s = os.stat("/var/lib/gradstream") if os.path.exists("/var/lib/gradstream") else None
print(json.dumps({
    "top": sorted(os.listdir("/")),
    "opt": sorted(os.listdir("/opt")),
    "ca": hashlib.sha256(ca).hexdigest(),
    "leftovers": [p for p in ("/etc/pip.conf", "/opt/wheels", "/wheels", "/src")
                  if os.path.lexists(p)],
    "checkpoints": s and [s.st_uid, s.st_gid, s.st_mode & 0o777],
    "mb": {
        top: round(sum(os.lstat(os.path.join(d, f)).st_size
                       for d, _, fs in os.walk(top) for f in fs) / 1e6)
        for top in ("/usr", "/opt/venv", "/opt/venv/lib/python3.11/site-packages/torch")
        if os.path.isdir(top)
    },
}))
"""
# The pod's securityContext, as podman options: no capabilities, no privilege gain.
RESTRICTED = ("--cap-drop", "ALL", "--security-opt", "no-new-privileges")


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    """podman installed, the base image imported; everything removed afterwards."""
    if not os.environ.get("GRADSTREAM_IMAGE_TEST"):
        pytest.skip("builds the image: run `make image-test` (GRADSTREAM_IMAGE_TEST=1)")
    cache = tmp_path_factory.mktemp("image-cache")
    try:
        install_tools()
    except Unavailable as exc:
        pytest.skip(f"cannot run containers here: {exc}")
    engine = Podman(tmp_path_factory.mktemp("podman"))
    try:
        try:
            engine.make_base(cache)
        except Unavailable as exc:
            pytest.skip(f"cannot run containers here: {exc}")
        yield engine
    finally:
        engine.destroy()
        shutil.rmtree(cache, ignore_errors=True)
    assert not engine.mounts() and not engine.home.exists(), "podman's storage was left behind"


@pytest.fixture(scope="module")
def image(podman: Podman) -> str:
    """The `cpu` target, built once."""
    podman.build()
    return IMAGE_TAG


def _python(podman: Podman, image: str, code: str, *options: str) -> str:
    """Run python code in a fresh container of the image; its stdout."""
    done = podman.run(
        "run",
        "--rm",
        "--pull=never",
        "--network",
        "none",
        "--entrypoint",
        "python",
        *options,
        image,
        "-c",
        code,
    )
    return done.stdout


def _inspect(podman: Podman, image: str) -> dict[str, Any]:
    data: list[dict[str, Any]] = json.loads(podman.run("image", "inspect", image).stdout)
    return data[0]


def _wait_serving(port: int, service: str = "", timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, f"health on {port} not SERVING in {timeout} s"
            time.sleep(0.5)


def _k8s_tmpfs() -> list[str]:
    """The paths the pod mounts emptyDirs on: the writable places of a read-only root."""
    objects = render(K8S / "overlays" / "cpu")
    empty = {v["name"] for v in pod_spec(objects)["volumes"] if "emptyDir" in v}
    return [m["mountPath"] for m in container(objects)["volumeMounts"] if m["name"] in empty]


def test_image_files(podman: Podman, image: str) -> None:
    """No trace of the build mounts; the top level is the base's; user and health check set."""
    built = json.loads(_python(podman, image, FACTS))
    base = json.loads(_python(podman, BASE_TAG, FACTS))
    assert built["top"] == base["top"]
    assert built["opt"] == ["venv"]  # not /opt/wheels
    assert built["ca"] == base["ca"]  # the base's own CA bundle, not the host's
    assert built["leftovers"] == []
    assert built["checkpoints"][:2] == [int(UID), int(UID)]
    inspected = _inspect(podman, image)
    config = inspected["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["gradstream", "serve"]
    assert config["Cmd"] == ["--device", "cpu"]
    assert "GRADSTREAM_HEALTH_PORT" in " ".join(inspected["Healthcheck"]["Test"])
    print(f"image {image}: {int(inspected['Size']) / 1e9:.2f} GB; MB by path: {built['mb']}")


def test_default_start_refuses_in_one_line(podman: Podman, image: str) -> None:
    """`run IMAGE` with no arguments: exit 2 with one line naming --tokens-file and --insecure."""
    done = podman.run(
        "run",
        "--rm",
        "--pull=never",
        "--network",
        "none",
        "--no-healthcheck",
        image,
        check=False,
        timeout=120,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stdout + done.stderr
    assert len(lines) == 1, done.stderr
    assert "refusing to listen on 0.0.0.0 without tokens" in lines[0]
    assert "--tokens-file" in lines[0] and "--insecure" in lines[0]


def test_serve_train_drain_restore(podman: Podman, image: str, tmp_path: Path) -> None:
    """The documented production shape: image user, read-only root with the pod's tmpfs
    mounts, no capabilities; gRPC, health, metrics; SIGTERM writes the final checkpoint into
    the volume, and a new container on that volume restores the model at its step."""
    podman.run("volume", "create", "checkpoints")
    tmpfs = [arg for path in _k8s_tmpfs() for arg in ("--tmpfs", path)]
    assert tmpfs, "the cpu overlay declares no emptyDir mounts"

    def start(name: str) -> tuple[int, int, int]:
        ports = free_port(), free_port(), free_port()
        podman.run(
            "run",
            "--detach",
            "--pull=never",
            "--name",
            name,
            "--network",
            "host",
            "--read-only",
            *tmpfs,
            *RESTRICTED,
            "--volume",
            f"checkpoints:{CHECKPOINTS}",
            # Loopback only on the host's network; the ports by environment, so the
            # HEALTHCHECK has to follow GRADSTREAM_HEALTH_PORT.
            "--env",
            "GRADSTREAM_HOST=127.0.0.1",
            "--env",
            f"GRADSTREAM_PORT={ports[0]}",
            "--env",
            f"GRADSTREAM_HEALTH_PORT={ports[1]}",
            "--env",
            f"GRADSTREAM_METRICS_PORT={ports[2]}",
            image,
        )
        _wait_serving(ports[1])
        return ports

    port, _, metrics_port = start("first")
    status = podman.run("exec", "first", "cat", "/proc/1/status").stdout
    assert re.search(rf"^Uid:\s+{UID}\s+{UID}\s+{UID}\s+{UID}$", status, re.M), status
    assert re.search(r"^CapEff:\s+0+$", status, re.M), status
    cmdline = podman.run("exec", "first", "cat", "/proc/1/cmdline").stdout.split("\0")
    assert "serve" in cmdline and any(a.endswith("/gradstream") for a in cmdline), cmdline
    podman.wait_healthy("first", timeout=30)

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        assert r.status == 200
        assert b"gradstream_" in r.read()

    demo = subprocess.run(
        [str(Path(sys.executable).parent / "gradstream"), "demo", "--target", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "Prediction after training: f(5) = 10.000" in demo.stdout, demo.stdout

    x = np.array([[1], [2], [3], [4]], dtype=np.float32)
    y = 2 * x
    with Client(f"127.0.0.1:{port}") as client:
        client.create_model("kept", SPEC)
        results = list(client.train("kept", [(x, y)] * 7))
        assert [r.step for r in results][-1] == 7
        weights = client.parameters("kept")["weight"]

    assert podman.stop("first") == 0
    logs = podman.run("logs", "first").stderr
    assert "final checkpoints written" in logs, logs
    volume = Path(
        podman.run("volume", "inspect", "--format", "{{.Mountpoint}}", "checkpoints").stdout.strip()
    )
    written = [p for p in volume.rglob("*") if p.is_file()]
    assert any("kept" in str(p) for p in written), written
    assert all(p.stat().st_uid == int(UID) for p in written), written

    port, _, _ = start("second")
    with Client(f"127.0.0.1:{port}") as client:
        assert client.get_model("kept").step == 7
        assert np.array_equal(client.parameters("kept")["weight"], weights)
    assert podman.stop("second") == 0


def _documented(podman: Podman, image: str, tmp_path: Path, where: str) -> list[str]:
    """The run options of the documented start: the Kubernetes cpu overlay or compose."""
    if where == "compose":
        service: dict[str, Any] = load_compose()["services"]["gradstream"]
        options = [f"--env={k}={v}" for k, v in service["environment"].items()]
        options += ["--read-only"] if service["read_only"] else []
        options += [f"--tmpfs={p}" for p in service["tmpfs"]]
        options += [f"--cap-drop={c}" for c in service["cap_drop"]]
        options += [f"--security-opt={o.replace(':true', '')}" for o in service["security_opt"]]
        options += [f"--volume=compose-checkpoints:{CHECKPOINTS}"]
        return [*options, image, *service["command"]]
    objects = render(K8S / "overlays" / "cpu")
    c = container(objects)
    security = pod_spec(objects)["securityContext"]
    # Downward-API entries (the pod IP for the metrics bind) have no value outside a
    # cluster; in its own network namespace the default loopback bind stands in for it.
    env = config_data(objects) | {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
    # The Secret the docs say to create first, mounted where the ConfigMap points.
    tokens_file = Path(env["GRADSTREAM_TOKENS_FILE"])
    (tmp_path / "tokens").mkdir()
    (tmp_path / "tokens" / tokens_file.name).write_text("a-token-of-the-test-0123456789 * admin\n")
    (tmp_path / "tokens").chmod(0o755)
    (tmp_path / "tokens" / tokens_file.name).chmod(0o444)
    options = [f"--env={k}={v}" for k, v in env.items()]
    options += [f"--user={security['runAsUser']}:{security['runAsGroup']}", "--read-only"]
    options += [f"--tmpfs={p}" for p in _k8s_tmpfs()]
    options += [*RESTRICTED, f"--volume={tmp_path / 'tokens'}:{tokens_file.parent}:ro"]
    options += [f"--volume=k8s-checkpoints:{CHECKPOINTS}"]
    return [*options, image, *c.get("args", [])]


@pytest.mark.parametrize("where", ["kubernetes", "compose"])
def test_documented_start_is_healthy(
    podman: Podman, image: str, tmp_path: Path, where: str
) -> None:
    """The Kubernetes cpu overlay (with its tokens Secret) and the compose service, as
    written: they bind 0.0.0.0, so each runs in a network namespace of its own."""
    name = f"documented-{where}"
    podman.run(
        "run",
        "--detach",
        "--pull=never",
        "--name",
        name,
        "--network",
        "none",
        *_documented(podman, image, tmp_path, where),
    )
    try:
        podman.wait_healthy(name)
    finally:
        code = podman.stop(name)
    assert code == 0, podman.run("logs", name).stderr
