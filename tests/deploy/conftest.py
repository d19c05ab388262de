"""What the deploy tests share: the rendered overlays, the compose file, the pending settings."""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, require_tool

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = sorted(p for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
COMPONENTS = sorted(
    p for p in (K8S / "components").iterdir() if (p / "kustomization.yaml").exists()
)
# The oldest Kubernetes the manifests support: preStop.sleep is new in 1.30 (beta, on by
# default); native gRPC probes are GA since 1.27.
OLDEST_KUBERNETES = "1.30.0"
# Settings that other branches add (durability: checkpoint_dir; security: tokens and TLS,
# insecure). Until they are merged the server ignores these variables; drop each name
# once its field is in config.py.
PENDING_SETTINGS = {
    "checkpoint_dir",  # durability
    "tokens_file",  # security
    "tls_cert",  # security
    "tls_key",  # security
    "tls_ca",  # security
    "insecure",  # security
}
# Files the observability branch owns; missing on this branch alone, present once merged.
PENDING_FILES = {
    DEPLOY / "prometheus",
    DEPLOY / "prometheus" / "prometheus.yml",
    DEPLOY / "grafana" / "provisioning",
}

Manifest = dict[str, Any]


def kubectl() -> str:
    """kubectl (Debian's package; .ci/run installs it)."""
    return require_tool("kubectl")


def render(directory: Path) -> list[Manifest]:
    """``kubectl kustomize DIRECTORY`` as a list of objects."""
    done = subprocess.run(
        [kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"kubectl kustomize {directory} failed:\n{done.stderr}"
    objects = [o for o in yaml.safe_load_all(done.stdout) if o]
    assert objects, f"kubectl kustomize {directory} rendered nothing"
    return objects


def render_with_component(tmp: Path, overlay: Path, component: Path) -> list[Manifest]:
    """An overlay with a component added, as a user's own kustomization would add it."""
    # kustomize takes relative paths only, and loads other kustomizations from anywhere.
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(overlay, tmp)],
                "components": [os.path.relpath(component, tmp)],
            }
        )
    )
    return render(tmp)


def one(objects: list[Manifest], kind: str) -> Manifest:
    """The single object of a kind."""
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(objects: list[Manifest]) -> dict[str, Any]:
    """The pod template's spec of the one workload."""
    spec: dict[str, Any] = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    return spec


def container(objects: list[Manifest]) -> dict[str, Any]:
    """The gradstream container."""
    (found,) = [c for c in pod_spec(objects)["containers"] if c["name"] == "gradstream"]
    c: dict[str, Any] = found
    return c


def config_data(objects: list[Manifest]) -> dict[str, str]:
    """The GRADSTREAM_* settings ConfigMap's data."""
    (cm,) = [
        o
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("gradstream-config")
    ]
    data: dict[str, str] = cm["data"]
    return data


@pytest.fixture(scope="session", params=OVERLAYS, ids=[p.name for p in OVERLAYS])
def overlay(request: pytest.FixtureRequest) -> Iterator[list[Manifest]]:
    """Every overlay, rendered once per session."""
    yield render(request.param)


def load_compose() -> dict[str, Any]:
    """deploy/compose.yaml."""
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return data


def dockerfile_instructions(path: Path = DEPLOY / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of a Dockerfile: continuations joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        word, _, rest = (pending + line).partition(" ")
        instructions.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def dockerfile_env(path: Path = DEPLOY / "Dockerfile") -> dict[str, str]:
    """Every ENV of a Dockerfile, in the KEY=VALUE form."""
    env: dict[str, str] = {}
    for word, rest in dockerfile_instructions(path):
        if word == "ENV":
            for pair in shlex.split(rest):
                key, sep, value = pair.partition("=")
                assert sep, f"ENV {rest!r}: use the KEY=VALUE form"
                env[key] = value
    return env


def pending_missing(path: Path) -> bool:
    """True for a file another branch brings, while it is missing here outside CI."""
    return path in PENDING_FILES and not path.exists() and not os.environ.get("CI")
