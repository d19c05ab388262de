"""deploy/k8s/overlays/distributed: the PyTorchJob and StatefulSet variants render and validate."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from gradstream.server.config import Settings
from tests.conftest import ROOT, require_tool

DISTRIBUTED = ROOT / "deploy" / "k8s" / "overlays" / "distributed"
VARIANTS = ("pytorchjob", "statefulset")
# pod-index labels on StatefulSet pods are 1.28+; the base overlays need 1.30 (preStop.sleep).
KUBERNETES = "1.30.0"
PYTORCHJOB_SCHEMA = Path(__file__).with_name("pytorchjob.schema.json")
# Settings other branches add; the server ignores GRADSTREAM_* variables it does not know.
PENDING_SETTINGS = {"tokens_file"}

Manifest = dict[str, Any]


def render(variant: str) -> list[Manifest]:
    """``kubectl kustomize`` of one variant, as a list of objects."""
    done = subprocess.run(
        [require_tool("kubectl"), "kustomize", str(DISTRIBUTED / variant)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"kubectl kustomize {variant} failed:\n{done.stderr}"
    return [o for o in yaml.safe_load_all(done.stdout) if o]


@pytest.fixture(scope="module", params=VARIANTS)
def rendered(request: pytest.FixtureRequest) -> list[Manifest]:
    """Each variant, rendered once."""
    return render(request.param)


def pod_templates(objects: list[Manifest]) -> dict[str, dict[str, Any]]:
    """Every pod template, by workload (and replica type)."""
    found: dict[str, dict[str, Any]] = {}
    for obj in objects:
        if obj["kind"] == "StatefulSet":
            found[obj["metadata"]["name"]] = obj["spec"]["template"]
        elif obj["kind"] == "PyTorchJob":
            for kind, replica in obj["spec"]["pytorchReplicaSpecs"].items():
                found[f"{obj['metadata']['name']}/{kind}"] = replica["template"]
    return found


def of_kind(objects: list[Manifest], kind: str) -> list[Manifest]:
    """Every object of a kind."""
    return [o for o in objects if o["kind"] == kind]


def test_built_in_kinds_validate_strictly(rendered: list[Manifest]) -> None:
    """kubernetes-validate --strict on every built-in object, and on each pod template."""
    failures = []
    checked = [o for o in rendered if o["kind"] != "PyTorchJob"]
    # The PyTorchJob's pod templates are core/v1 PodTemplateSpecs: validate them as such.
    checked += [
        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": t}
        for name, t in pod_templates(rendered).items()
        if "/" in name
    ]
    for obj in checked:
        try:
            kubernetes_validate.validate(obj, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as exc:
            failures.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}")
    assert not failures, "\n".join(failures)


def test_the_validator_refuses_a_misspelt_field() -> None:
    """The checks can fail: a typo in a pod template and in the PyTorchJob are found."""
    (job,) = of_kind(render("pytorchjob"), "PyTorchJob")
    template = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    template["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(kubernetes_validate.ValidationError, match="volumeMount"):
        kubernetes_validate.validate(
            {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": "w"},
                "template": template,
            },
            KUBERNETES,
            strict=True,
        )
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["restartPolicy"] = "OnFail"
    with pytest.raises(jsonschema.ValidationError, match="OnFail"):
        jsonschema.validate(job, json.loads(PYTORCHJOB_SCHEMA.read_text()))


def test_pytorchjob_matches_the_operator_fields() -> None:
    """The PyTorchJob against a subset of the training operator's CRD; rank 0 is the Master."""
    objects = render("pytorchjob")
    (job,) = of_kind(objects, "PyTorchJob")
    jsonschema.validate(job, json.loads(PYTORCHJOB_SCHEMA.read_text()))
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1  # exactly one rank 0
    for kind, replica in replicas.items():
        (container,) = replica["template"]["spec"]["containers"]
        args = container["args"]
        assert container["command"] == ["torchrun"], kind
        assert args[-3:] == ["--no-python", "gradstream", "serve"], kind
        # The operator's env: node rank = pod rank, so rank 0 is the Master pod.
        assert "--node-rank=$(RANK)" in args and "--nnodes=$(WORLD_SIZE)" in args
        assert "--nproc-per-node=1" in args and "--max-restarts=0" in args
    mounts = {
        kind: {m["name"] for m in r["template"]["spec"]["containers"][0]["volumeMounts"]}
        for kind, r in replicas.items()
    }
    assert "checkpoints" in mounts["Master"] and "checkpoints" not in mounts["Worker"]
    (service,) = [s for s in of_kind(objects, "Service") if s["metadata"]["name"] == "gradstream"]
    assert service["spec"]["selector"]["training.kubeflow.org/replica-type"] == "master"
    assert service["spec"]["selector"]["training.kubeflow.org/job-name"] == job["metadata"]["name"]


def test_statefulset_puts_rank_0_on_pod_0_behind_the_service() -> None:
    """Node rank = pod index; the rendezvous and the producers' Service both find pod 0."""
    objects = render("statefulset")
    (sts,) = of_kind(objects, "StatefulSet")
    services = {s["metadata"]["name"]: s for s in of_kind(objects, "Service")}
    headless = services[sts["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["GRADSTREAM_NNODES"]["value"] == str(sts["spec"]["replicas"])
    index = env["GRADSTREAM_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert index == "metadata.labels['apps.kubernetes.io/pod-index']"
    master = f"--master-addr={sts['metadata']['name']}-0.{sts['spec']['serviceName']}"
    assert master in container["args"]
    assert "--node-rank=$(GRADSTREAM_NODE_RANK)" in container["args"]
    selector = services["gradstream"]["spec"]["selector"]
    assert selector["apps.kubernetes.io/pod-index"] == "0"
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert all(
        labels.get(k) == v for k, v in selector.items() if k != "apps.kubernetes.io/pod-index"
    )


def test_references_resolve_and_settings_exist(rendered: list[Manifest]) -> None:
    """Every ConfigMap and PVC a pod names is rendered; every GRADSTREAM_* is a real setting."""
    configmaps = {o["metadata"]["name"]: o for o in of_kind(rendered, "ConfigMap")}
    claims = {o["metadata"]["name"] for o in of_kind(rendered, "PersistentVolumeClaim")}
    for name, template in pod_templates(rendered).items():
        spec = template["spec"]
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in configmaps, name
        for volume in spec["volumes"]:
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, name
    (config,) = configmaps.values()
    fields = set(Settings.model_fields) | PENDING_SETTINGS
    unknown = {k for k in config["data"] if k.removeprefix("GRADSTREAM_").lower() not in fields}
    assert not unknown, f"not gradstream settings: {sorted(unknown)}"
    assert config["data"]["GRADSTREAM_DISTRIBUTED"] == "on"
    Settings(
        **{
            k.removeprefix("GRADSTREAM_").lower(): v
            for k, v in config["data"].items()
            if k.removeprefix("GRADSTREAM_").lower() not in PENDING_SETTINGS
        }
    )
