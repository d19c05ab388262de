"""deploy/k8s: every overlay renders and validates against the oldest Kubernetes we support."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from gradstream.server.app import SERVICE_NAME
from gradstream.server.config import Settings
from tests.conftest import ROOT
from tests.deploy.conftest import (
    COMPONENTS,
    DEPLOY,
    OLDEST_KUBERNETES,
    OVERLAYS,
    Manifest,
    config_data,
    container,
    one,
    pod_spec,
    render,
    render_with_component,
)

# Kinds the Kubernetes schemas do not know: each needs a schema of its own here.
CUSTOM_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): Path(__file__).with_name(
        "servicemonitor.schema.json"
    ),
}
# Seconds the final checkpoint may take after the drain; the grace period must cover it.
FINAL_CHECKPOINT_BUDGET = 30
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_overlays_exist() -> None:
    """The cpu and gpu overlays are there (the fixture renders whatever overlays exist)."""
    assert {p.name for p in OVERLAYS} >= {"cpu", "gpu"}


def test_every_object_validates_strictly(overlay: list[Manifest]) -> None:
    """kubernetes-validate --strict: unknown fields (a typo the API server would drop) fail."""
    failures = []
    for obj in overlay:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_SCHEMAS:
            continue
        try:
            kubernetes_validate.validate(obj, OLDEST_KUBERNETES, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            failures.append(f"{obj['kind']}: no schema in Kubernetes {OLDEST_KUBERNETES}")
        except kubernetes_validate.ValidationError as exc:
            failures.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}")
    assert not failures, "\n".join(failures)


def test_oldest_version_is_really_needed() -> None:
    """preStop.sleep sets the floor: 1.28 has no such field; 1.29 has it behind an alpha
    feature gate (PodLifecycleSleepAction), on by default from 1.30."""
    statefulset = one(render(OVERLAYS[0]), "StatefulSet")
    assert container([statefulset])["lifecycle"]["preStop"]["sleep"]["seconds"] > 0
    with pytest.raises(kubernetes_validate.ValidationError, match="sleep"):
        kubernetes_validate.validate(statefulset, "1.28.0", strict=True)


def test_custom_resources_match_the_operator_fields(overlay: list[Manifest]) -> None:
    """ServiceMonitor (and any PodMonitor) checked against the Prometheus Operator's CRD fields."""
    monitors = [o for o in overlay if o["apiVersion"].startswith("monitoring.coreos.com/")]
    assert any(o["kind"] == "ServiceMonitor" for o in monitors)
    for obj in monitors:
        key = (obj["apiVersion"], obj["kind"])
        assert key in CUSTOM_SCHEMAS, f"no schema here for {key}: add the operator's fields"
        schema = json.loads(CUSTOM_SCHEMAS[key].read_text())
        jsonschema.validate(obj, schema)


def test_servicemonitor_schema_catches_a_typo() -> None:
    """The subset schema refuses an unknown endpoint field, as strict validation would."""
    schema = json.loads(CUSTOM_SCHEMAS[("monitoring.coreos.com/v1", "ServiceMonitor")].read_text())
    monitor = one(render(OVERLAYS[0]), "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError, match="intervall"):
        jsonschema.validate(monitor, schema)


def test_servicemonitor_scrapes_the_service_metrics_port(overlay: list[Manifest]) -> None:
    """The ServiceMonitor selects the Service and names its metrics port; /metrics is the path."""
    monitor = one(overlay, "ServiceMonitor")
    service = one(overlay, "Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint["port"] == "metrics"
        assert endpoint.get("path", "/metrics") == "/metrics"


def test_one_writer_per_checkpoint_volume(overlay: list[Manifest]) -> None:
    """A StatefulSet of one with a ReadWriteOnce claim, mounted where the server checkpoints."""
    assert not [o for o in overlay if o["kind"] == "Deployment"]
    statefulset = one(overlay, "StatefulSet")
    assert statefulset["spec"]["replicas"] == 1
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert statefulset["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Retain"
    mounts = {m["name"]: m["mountPath"] for m in container(overlay)["volumeMounts"]}
    checkpoint_dir = config_data(overlay)["GRADSTREAM_CHECKPOINT_DIR"]
    assert mounts[claim["metadata"]["name"]] == checkpoint_dir


def test_grace_period_covers_prestop_drain_and_final_checkpoint(overlay: list[Manifest]) -> None:
    """SIGKILL must not land before the drain and the final checkpoint are done."""
    drain = float(
        config_data(overlay).get(
            "GRADSTREAM_DRAIN_TIMEOUT", str(Settings.model_fields["drain_timeout"].default)
        )
    )
    pre_stop = container(overlay)["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = pod_spec(overlay)["terminationGracePeriodSeconds"]
    assert grace > pre_stop + drain + FINAL_CHECKPOINT_BUDGET


def test_probes_are_native_grpc_on_the_health_port(overlay: list[Manifest]) -> None:
    """startup, readiness and liveness: gRPC health on the plaintext health port."""
    c = container(overlay)
    health = next(p["containerPort"] for p in c["ports"] if p["name"] == "health")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == health, probe
        # The server answers "" and its own service name; anything else is NOT_FOUND.
        assert c[probe]["grpc"].get("service", "") in ("", SERVICE_NAME), probe


def test_no_service_links(overlay: list[Manifest]) -> None:
    """A Service named gradstream would inject GRADSTREAM_PORT=tcp://..., which the server reads."""
    assert pod_spec(overlay)["enableServiceLinks"] is False


def test_images_are_tagged_with_the_version(overlay: list[Manifest]) -> None:
    """The overlays run what `make images` builds: VERSION-cpu or VERSION-cuda, never latest."""
    for c in pod_spec(overlay)["containers"]:
        name, _, tag = c["image"].rpartition(":")
        assert name and tag in (f"{VERSION}-cpu", f"{VERSION}-cuda"), c["image"]


def test_gpu_overlay_schedules_on_a_gpu() -> None:
    """gpu: one GPU in limits, the NVIDIA taint tolerated, a GPU node selected, --device cuda."""
    objects = render(_overlay_path("gpu"))
    spec = pod_spec(objects)
    c = container(objects)
    assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert any(
        t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" and t["effect"] == "NoSchedule"
        for t in spec["tolerations"]
    )
    assert spec["nodeSelector"]
    assert _flag(c["args"], "--device") == "cuda"
    assert c["image"].endswith("-cuda")


def test_cpu_overlay_runs_on_the_cpu() -> None:
    """cpu: the CPU image, --device cpu, no GPU asked for, torch threads below the CPU limit."""
    objects = render(_overlay_path("cpu"))
    c = container(objects)
    assert _flag(c["args"], "--device") == "cpu"
    assert c["image"].endswith("-cpu")
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    threads = int(config_data(objects)["GRADSTREAM_THREADS"])
    # One core of the limit stays with the gRPC event loop.
    assert 0 < threads < int(c["resources"]["limits"]["cpu"])


def test_service_ports_are_named_grpc_and_metrics(overlay: list[Manifest]) -> None:
    """The Service's named ports point at the container's ports of the same name."""
    service = one(overlay, "Service")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(ports) == {"grpc", "metrics"}
    container_ports = {p["name"]: p["containerPort"] for p in container(overlay)["ports"]}
    for name, port in ports.items():
        target = port["targetPort"]
        assert target == name or target == container_ports[name]
        assert port["port"] == container_ports[name]
    assert service["spec"]["selector"].items() <= _pod_labels(overlay).items()


def test_network_policy_keeps_metrics_to_the_monitoring_namespace(
    overlay: list[Manifest],
) -> None:
    """Only the monitoring namespace reaches the metrics port; gRPC stays reachable."""
    policy = one(overlay, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= _pod_labels(overlay).items()
    assert "Ingress" in policy["spec"]["policyTypes"]
    metrics_port = next(p for p in container(overlay)["ports"] if p["name"] == "metrics")
    grpc_allowed = False
    for rule in policy["spec"]["ingress"]:
        # A rule without ports opens every port, the metrics port included.
        ports = rule.get("ports")
        assert ports, f"ingress rule {rule} opens every port"
        names = {p["port"] for p in ports}
        if names & {"metrics", metrics_port["containerPort"]}:
            assert rule.get("from") == [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                    }
                }
            ], rule
        grpc_allowed |= "grpc" in names
    assert grpc_allowed


def test_pod_disruption_budget_selects_the_pod(overlay: list[Manifest]) -> None:
    """The PDB covers the gradstream pod and does not block node drains forever."""
    pdb = one(overlay, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= _pod_labels(overlay).items()
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_grafana_dashboard_configmap(overlay: list[Manifest]) -> None:
    """The dashboard ConfigMap for the Grafana sidecar: its label, a fixed name, the JSON."""
    (dashboard,) = [
        o
        for o in overlay
        if o["kind"] == "ConfigMap" and o["metadata"].get("labels", {}).get("grafana_dashboard")
    ]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["name"] == "gradstream-dashboard"
    (text,) = dashboard["data"].values()
    committed = (DEPLOY / "grafana" / "dashboards" / "gradstream.json").read_text()
    assert json.loads(text) == json.loads(committed)
    assert json.loads(text)["title"]
    # `kubectl apply` keeps the whole object in an annotation limited to 256 KiB.
    assert len(text.encode()) < 256 * 1024


def test_namespace_enforces_restricted(overlay: list[Manifest]) -> None:
    """The namespace makes the API server refuse any pod that breaks the restricted standard."""
    labels = one(overlay, "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert labels["pod-security.kubernetes.io/enforce-version"] == "v" + OLDEST_KUBERNETES[:4]
    namespaced = [o for o in overlay if o["kind"] != "Namespace"]
    assert {o["metadata"]["namespace"] for o in namespaced} == {
        one(overlay, "Namespace")["metadata"]["name"]
    }


@pytest.mark.parametrize("component", COMPONENTS, ids=[p.name for p in COMPONENTS])
@pytest.mark.parametrize("overlay_dir", OVERLAYS, ids=[p.name for p in OVERLAYS])
def test_components_render_and_validate(tmp_path: Path, overlay_dir: Path, component: Path) -> None:
    """Each component added to each overlay still renders and validates."""
    objects = render_with_component(tmp_path / "with", overlay_dir, component)
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) not in CUSTOM_SCHEMAS:
            kubernetes_validate.validate(obj, OLDEST_KUBERNETES, strict=True)


def test_tls_component_points_at_the_mounted_secret(tmp_path: Path) -> None:
    """components/tls: TLS paths inside the TLS Secret's mount, which is then required."""
    objects = render_with_component(tmp_path / "tls", _overlay_path("gpu"), _component_path("tls"))
    data = config_data(objects)
    mounts = {m["name"]: m["mountPath"] for m in container(objects)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    for key in ("GRADSTREAM_TLS_CERT", "GRADSTREAM_TLS_KEY"):
        assert Path(data[key]).parent == Path(mounts["tls"]), key
    assert volumes["tls"]["secret"]["optional"] is False


def test_secrets_are_mounted_optional_until_used(overlay: list[Manifest]) -> None:
    """Secrets are mounted read-only; the tokens Secret, which the ConfigMap's tokens file
    points into, is required (without it the pod waits instead of crash-looping); TLS stays
    optional until components/tls uses it."""
    volumes = {v["name"]: v for v in pod_spec(overlay)["volumes"]}
    mounts = {m["name"]: m for m in container(overlay)["volumeMounts"]}
    for name, path in (("tokens", "/etc/gradstream/tokens"), ("tls", "/etc/gradstream/tls")):
        assert mounts[name]["mountPath"] == path
        assert mounts[name]["readOnly"] is True
    assert volumes["tokens"]["secret"]["optional"] is False
    assert volumes["tls"]["secret"]["optional"] is True
    tokens_file = Path(config_data(overlay)["GRADSTREAM_TOKENS_FILE"])
    assert tokens_file.parent == Path("/etc/gradstream/tokens")


def _overlay_path(name: str) -> Path:
    """An overlay directory by name."""
    return DEPLOY / "k8s" / "overlays" / name


def _component_path(name: str) -> Path:
    """A component directory by name."""
    return DEPLOY / "k8s" / "components" / name


def _flag(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def _pod_labels(objects: list[Manifest]) -> dict[str, Any]:
    labels: dict[str, Any] = one(objects, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    return labels


def test_ports_agree_with_the_server_defaults(overlay: list[Manifest]) -> None:
    """Container, probe and Service ports are the server's own defaults: rename one, this fails."""
    defaults = {
        name: Settings.model_fields[field].default
        for name, field in (
            ("grpc", "port"),
            ("health", "health_port"),
            ("metrics", "metrics_port"),
        )
    }
    c = container(overlay)
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == defaults
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == defaults["health"]
    service_ports = {p["name"]: p["port"] for p in one(overlay, "Service")["spec"]["ports"]}
    assert service_ports == {"grpc": defaults["grpc"], "metrics": defaults["metrics"]}


def test_configmap_ports_match_the_container(overlay: list[Manifest]) -> None:
    """The ports the server binds (ConfigMap) are the ports the pod declares."""
    data = config_data(overlay)
    ports = {p["name"]: p["containerPort"] for p in container(overlay)["ports"]}
    assert int(data["GRADSTREAM_PORT"]) == ports["grpc"]
    assert int(data["GRADSTREAM_HEALTH_PORT"]) == ports["health"]
    assert int(data["GRADSTREAM_METRICS_PORT"]) == ports["metrics"]
    assert re.fullmatch(r"0\.0\.0\.0|::", data["GRADSTREAM_HOST"])
