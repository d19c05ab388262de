"""The restricted Pod Security Standard, container by container, in every overlay.

The checks follow the standard's policy table (baseline and restricted, as of v1.30),
plus what the image needs to run read-only: HOME and /tmp on emptyDirs.
"""

from __future__ import annotations

import copy
from pathlib import PurePosixPath
from typing import Any

import pytest

from tests.deploy.conftest import Manifest, pod_spec

# Volume types the restricted standard allows.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """Every way a pod spec breaks the restricted Pod Security Standard (empty: none)."""
    found: list[str] = []
    pod_ctx = spec.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            found.append(f"pod: {field}")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']}: {sorted(kinds - RESTRICTED_VOLUMES)}")
    for sysctl in pod_ctx.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            found.append(f"pod: sysctl {sysctl['name']}")
    if pod_ctx.get("runAsUser") == 0:
        found.append("pod: runAsUser 0")
    pod_seccomp = pod_ctx.get("seccompProfile", {}).get("type")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        found.append(f"pod: seccompProfile {pod_seccomp}")

    containers = [
        *spec.get("initContainers", []),
        *spec.get("containers", []),
        *spec.get("ephemeralContainers", []),
    ]
    for c in containers:
        name = c["name"]
        ctx = c.get("securityContext", {})
        if ctx.get("privileged"):
            found.append(f"{name}: privileged")
        if ctx.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        if ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is not True:
            found.append(f"{name}: runAsNonRoot is not true")
        if ctx.get("runAsUser") == 0:
            found.append(f"{name}: runAsUser 0")
        seccomp = ctx.get("seccompProfile", {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile {seccomp}")
        caps = ctx.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            found.append(f"{name}: capabilities do not drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: capabilities add {caps['add']}")
        if ctx.get("procMount", "Default") != "Default":
            found.append(f"{name}: procMount {ctx['procMount']}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            found.append(f"{name}: hostPort")
    return found


def test_every_container_meets_restricted(overlay: list[Manifest]) -> None:
    """runAsNonRoot, no privilege escalation, drop ALL, RuntimeDefault seccomp, safe volumes."""
    assert restricted_violations(pod_spec(overlay)) == []


def test_the_checker_catches_each_violation(overlay: list[Manifest]) -> None:
    """Breaking any one rule in the real spec is reported (so the test above can fail)."""
    breakers = {
        "allowPrivilegeEscalation": lambda s: _ctx(s).update(allowPrivilegeEscalation=True),
        "runAsNonRoot": lambda s: (
            _ctx(s).pop("runAsNonRoot"),
            s["securityContext"].pop("runAsNonRoot"),
        ),
        "seccompProfile": lambda s: (
            _ctx(s).pop("seccompProfile"),
            s["securityContext"].pop("seccompProfile"),
        ),
        "drop ALL": lambda s: _ctx(s)["capabilities"].update(drop=[]),
        "capabilities add": lambda s: _ctx(s)["capabilities"].update(add=["SYS_ADMIN"]),
        "hostPath": lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        "privileged": lambda s: _ctx(s).update(privileged=True),
        "hostNetwork": lambda s: s.update(hostNetwork=True),
    }
    for rule, breaks in breakers.items():
        spec = copy.deepcopy(pod_spec(overlay))
        breaks(spec)
        assert restricted_violations(spec), f"breaking {rule} went unnoticed"


def test_root_filesystem_is_read_only_with_writable_home_and_tmp(overlay: list[Manifest]) -> None:
    """readOnlyRootFilesystem, and HOME, the caches and /tmp on emptyDirs."""
    spec = pod_spec(overlay)
    empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    for c in spec["containers"]:
        assert c["securityContext"]["readOnlyRootFilesystem"] is True, c["name"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        for needed in ("/tmp", env["HOME"], env["XDG_CACHE_HOME"]):
            assert _mounted_on(needed, mounts) in empty_dirs, f"{c['name']}: {needed}"


@pytest.mark.parametrize("path", ["/tmp", "/home/gradstream/.cache"])
def test_mount_lookup(path: str) -> None:
    """_mounted_on finds the mount holding a path, not only one at the path itself."""
    assert _mounted_on(path, {"/tmp": "tmp", "/home/gradstream": "home"}) in ("tmp", "home")
    assert _mounted_on("/etc/x", {"/tmp": "tmp"}) is None


def _mounted_on(path: str, mounts: dict[str, str]) -> str | None:
    target = PurePosixPath(path)
    for mount_path, name in sorted(mounts.items(), key=lambda m: -len(m[0])):
        if target == PurePosixPath(mount_path) or PurePosixPath(mount_path) in target.parents:
            return name
    return None


def _ctx(spec: dict[str, Any]) -> dict[str, Any]:
    ctx: dict[str, Any] = spec["containers"][0]["securityContext"]
    return ctx
