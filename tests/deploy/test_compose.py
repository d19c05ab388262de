"""deploy/compose.yaml: the Compose spec, files that exist, and a stack whose parts find each other.

No Docker engine runs here, so the file is checked, not run: against the Compose
specification's JSON schema, then service by service against what the stack needs.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gradstream.server.config import Settings
from tests.conftest import ROOT, require_tool
from tests.deploy.conftest import DEPLOY, dockerfile_instructions, load_compose, pending_missing

COMPOSE = DEPLOY / "compose.yaml"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
LOOPBACK = {"localhost", "127.0.0.1", "::1"}


def _services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = load_compose()["services"]
    return services


def _bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of every bind mount (short syntax, relative to compose)."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append(((COMPOSE.parent / source).resolve(), target))
    return mounts


def _host_path(service: dict[str, Any], container_path: str) -> Path | None:
    """The host file behind a path inside the container, through the bind mounts."""
    for source, target in sorted(_bind_mounts(service), key=lambda m: -len(m[1])):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return source / Path(container_path).relative_to(target)
    return None


def _netns(name: str) -> str:
    """The service whose network namespace a service lives in."""
    mode = _services()[name].get("network_mode", "")
    return mode.removeprefix("service:") if mode.startswith("service:") else name


def _listening() -> dict[str, set[int]]:
    """Ports each network namespace has a listener on, from each service's own settings."""
    ports: dict[str, set[int]] = {}
    for name, service in _services().items():
        env = service.get("environment", {})
        if name == "gradstream":
            own = {
                int(env.get(f"GRADSTREAM_{f.upper()}", Settings.model_fields[f].default))
                for f in ("port", "health_port", "metrics_port")
            }
        elif name == "prometheus":
            flag = next(a for a in service["command"] if a.startswith("--web.listen-address="))
            own = {int(flag.rpartition(":")[2])}
        elif name == "grafana":
            own = {int(env.get("GF_SERVER_HTTP_PORT", 3000))}
        else:
            own = set()
        ports.setdefault(_netns(name), set()).update(own)
    return ports


def _reachable(client: str, url: str) -> bool:
    """Whether a service can open host:port: a listener in its namespace or a named one."""
    parts = urlsplit(url if "//" in url else f"//{url}")
    host, port = parts.hostname or "", parts.port
    if host in LOOPBACK:
        return port in _listening()[_netns(client)]
    # Only a service with a network of its own has a DNS name in the compose network.
    return host in _services() and _netns(host) == host and port in _listening()[host]


def test_compose_spec_schema() -> None:
    """check-jsonschema against the Compose specification's schema (vendored in the tool)."""
    tool = require_tool("check-jsonschema", Path(sys.executable).parent / "check-jsonschema")
    done = subprocess.run(
        [tool, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_schema_check_can_fail(tmp_path: Path) -> None:
    """A misspelt service key fails the same check (so the test above means something)."""
    tool = require_tool("check-jsonschema", Path(sys.executable).parent / "check-jsonschema")
    broken = load_compose()
    broken["services"]["gradstream"]["volume"] = broken["services"]["gradstream"].pop("volumes")
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(broken))
    done = subprocess.run(
        [tool, "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0


def test_three_services() -> None:
    """gradstream, Prometheus and Grafana; Triton only with its profile."""
    default = {n for n, s in _services().items() if not s.get("profiles")}
    assert default == {"gradstream", "prometheus", "grafana"}
    assert set(_services()) - default == {"triton"}
    assert _services()["triton"]["profiles"] == ["triton"]


def _flags(service: dict[str, Any]) -> dict[str, str]:
    """--name=value arguments of a service's command."""
    return dict(a.removeprefix("--").partition("=")[::2] for a in service["command"][1:])


def _volume(service: dict[str, Any], container_path: str) -> tuple[str, str]:
    """(named volume, mode) mounted at container_path."""
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        if target == container_path:
            return source, (mode or ["rw"])[0]
    raise AssertionError(f"nothing is mounted at {container_path}")


def test_triton_polls_the_repository_gradstream_exports() -> None:
    """Triton reads, read-only and in poll mode, the volume gradstream continuously exports
    a Triton repository to; the server accepts those settings and would export."""
    gradstream, triton = _services()["gradstream"], _services()["triton"]
    env = gradstream["environment"]
    settings = Settings(**{k.removeprefix("GRADSTREAM_").lower(): v for k, v in env.items()})
    assert settings.export_format == "triton"
    assert settings.export_dir is not None
    assert settings.export_every_steps or settings.export_every_seconds
    assert settings.export_keep >= 1
    flags = _flags(triton)
    assert triton["command"][0] == "tritonserver"
    assert flags["model-control-mode"] == "poll"
    assert int(flags["repository-poll-secs"]) > 0
    exports, mode = _volume(gradstream, str(settings.export_dir))
    assert mode == "rw"
    assert _volume(triton, flags["model-repository"]) == (exports, "ro")
    assert exports in load_compose()["volumes"]
    # The image has the directory, owned by the server's user, so a new volume is too.
    copied = [r for w, r in dockerfile_instructions() if w == "COPY" and "--chown=10001" in r]
    assert any(r.split()[-1] == str(settings.export_dir) for r in copied), copied


def test_gradstream_image_has_the_export_extra() -> None:
    """Triton exports need onnx: compose builds the image with the export extra."""
    extras = _services()["gradstream"]["build"]["args"]["GRADSTREAM_EXTRAS"].split(",")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert set(extras) == {"server", "export"}
    assert set(extras) <= set(declared["optional-dependencies"])
    args = [r for w, r in dockerfile_instructions() if w == "ARG"]
    assert "GRADSTREAM_EXTRAS=server" in args  # the default image stays without it


def test_triton_ports_are_published_where_it_listens() -> None:
    """Triton's HTTP, gRPC and metrics ports reach the laptop (loopback only)."""
    triton = _services()["triton"]
    holder = _services()[_netns("triton")]
    published = {int(str(p).split(":")[-1]) for p in holder["ports"]}
    own = {int(_flags(triton)[f"{kind}-port"]) for kind in ("http", "grpc", "metrics")}
    assert own <= published
    # Nothing else in the shared namespace listens on them.
    assert not own & _listening()[_netns("triton")]


def test_gradstream_builds_the_cpu_target() -> None:
    """The build points at deploy/Dockerfile's cpu target and tags it as `make images` does."""
    service = _services()["gradstream"]
    build = service["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert (context / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    stages = {r.split()[2] for w, r in dockerfile_instructions() if w == "FROM" and " AS " in r}
    assert build["target"] in stages
    assert service["image"] == f"gradstream:{VERSION}-{build['target']}"


def test_other_images_pinned() -> None:
    """Prometheus and Grafana images carry a version, never latest."""
    for name, service in _services().items():
        image = service["image"]
        tag = image.rpartition(":")[2] if ":" in image else ""
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{name}: {image}"


def test_bind_mounts_exist() -> None:
    """Every bind-mounted file or directory exists in the repository."""
    for name, service in _services().items():
        for source, _ in _bind_mounts(service):
            if pending_missing(source):
                continue
            assert source.exists(), f"{name} mounts {source}, which does not exist"


def test_ports_published_on_loopback_only() -> None:
    """Every published port is bound to 127.0.0.1 (the stack runs without tokens)."""
    published = [port for service in _services().values() for port in service.get("ports", [])]
    assert published
    for port in published:
        assert str(port).startswith("127.0.0.1:"), port


def test_gradstream_ports_are_published() -> None:
    """gRPC, health and metrics, at the server's default ports, reach the laptop."""
    holder = _services()[_netns("gradstream")]
    published = {int(str(p).split(":")[-1]) for p in holder["ports"]}
    defaults = {Settings.model_fields[f].default for f in ("port", "health_port", "metrics_port")}
    assert defaults <= published
    assert defaults <= _listening()[_netns("gradstream")]


def test_grace_period_covers_the_drain() -> None:
    """Docker waits for the drain before SIGKILL."""
    grace = _services()["gradstream"]["stop_grace_period"]
    seconds = int(grace.removesuffix("s"))
    assert seconds > Settings.model_fields["drain_timeout"].default


def _prometheus_config() -> Path:
    service = _services()["prometheus"]
    flag = next(a for a in service["command"] if a.startswith("--config.file="))
    path = _host_path(service, flag.partition("=")[2])
    assert path is not None, "the Prometheus config is not bind-mounted"
    if pending_missing(path) or pending_missing(path.parent):
        pytest.skip(f"{path} comes with the observability branch")
    return path


def test_prometheus_config_passes_promtool() -> None:
    """`promtool check config` on the file Prometheus loads (rules included)."""
    promtool = require_tool("promtool")
    done = subprocess.run(
        [promtool, "check", "config", str(_prometheus_config())],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_prometheus_reaches_gradstream_metrics() -> None:
    """Every static scrape target resolves to a listener in this stack's network layout."""
    config = yaml.safe_load(_prometheus_config().read_text())
    targets = [
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    metrics_port = int(_services()["gradstream"]["environment"]["GRADSTREAM_METRICS_PORT"])
    assert any(target.endswith(f":{metrics_port}") for target in targets), targets
    for target in targets:
        assert _reachable("prometheus", target), f"Prometheus cannot reach {target}"


def test_grafana_provisioning_matches_the_stack() -> None:
    """Grafana's datasources point at this Prometheus; its dashboard folder is mounted."""
    grafana = _services()["grafana"]
    provisioning = _host_path(grafana, "/etc/grafana/provisioning")
    assert provisioning is not None
    if pending_missing(provisioning):
        pytest.skip(f"{provisioning} comes with the observability branch")
    datasources = [
        source
        for path in sorted((provisioning / "datasources").glob("*.y*ml"))
        for source in yaml.safe_load(path.read_text()).get("datasources", [])
    ]
    assert any(s.get("type") == "prometheus" for s in datasources)
    for source in datasources:
        assert _reachable("grafana", source["url"]), f"Grafana cannot reach {source['url']}"
    providers = [
        provider
        for path in sorted((provisioning / "dashboards").glob("*.y*ml"))
        for provider in yaml.safe_load(path.read_text()).get("providers", [])
    ]
    assert providers
    for provider in providers:
        folder = _host_path(grafana, provider["options"]["path"])
        assert folder is not None and (folder / "gradstream.json").exists(), provider


def test_reachability_model() -> None:
    """The layout model itself: loopback inside the shared namespace, no name for joiners."""
    assert _reachable("prometheus", "localhost:9464")
    assert _reachable("grafana", "http://localhost:9090")
    assert not _reachable("prometheus", "localhost:1")
    assert not _reachable("prometheus", "gradstream:9464")  # no DNS name of its own
