"""The pod as the kubelet sees it: each overlay's settings and args run a real server whose
probes answer SERVING on the health port and which exits well inside the grace period."""

from __future__ import annotations

import signal
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradstream.client import Client
from gradstream.client._local import LocalServer
from tests.deploy.conftest import OVERLAYS, config_data, container, pod_spec, render

# Paths inside Secrets this machine does not have: leave those settings out.
SECRET_SETTINGS = ("GRADSTREAM_TOKENS_FILE", "GRADSTREAM_TLS_")


@pytest.mark.parametrize("overlay_dir", OVERLAYS, ids=[p.name for p in OVERLAYS])
def test_overlay_pod_serves_probes_and_stops_in_time(tmp_path: Path, overlay_dir: Path) -> None:
    """Probes SERVING, gRPC answering, and SIGTERM to exit within grace minus preStop."""
    objects = render(overlay_dir)
    c = container(objects)
    args = c.get("args", [])
    if "cuda" in args and not torch.cuda.is_available():
        pytest.skip("the gpu overlay runs --device cuda; no CUDA device here")
    env = {k: v for k, v in config_data(objects).items() if not k.startswith(SECRET_SETTINGS)}
    # The pod's writable places, here under tmp_path instead of the PVC and emptyDirs.
    # Downward-API values (valueFrom: the pod IP) mean nothing here: their defaults apply.
    env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
    env.update(
        HOME=str(tmp_path / "home"),
        XDG_CACHE_HOME=str(tmp_path / "home" / ".cache"),
        TMPDIR=str(tmp_path),
        GRADSTREAM_CHECKPOINT_DIR=str(tmp_path / "checkpoints"),
    )
    # LocalServer's flags put every port on 127.0.0.1 and a free number; flags win over env.
    server = LocalServer(*args, env=env, log=tmp_path / "server.log").start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                service = c[probe]["grpc"].get("service", "")
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, probe
        with Client(server.target) as client:
            assert client.list_models() == []
    finally:
        # What the kubelet leaves after the preStop hook; past it, SIGKILL (exit -9).
        budget = pod_spec(objects)["terminationGracePeriodSeconds"]
        budget -= c["lifecycle"]["preStop"]["sleep"]["seconds"]
        code = server.stop(signal.SIGTERM, timeout=budget)
    log = (tmp_path / "server.log").read_text()
    assert code == 0, f"exit {code} after SIGTERM (-9: killed at the grace period):\n{log}"
