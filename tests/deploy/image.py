"""Build and run deploy/Dockerfile with podman on a machine without a container registry.

The recipe (docs/deploy.md, "Test the image"): Debian's podman and buildah; a base image
made by mmdebstrap from the Debian sources apt already uses; the `cpu` target built with
the CPU torch wheel from a local wheel directory, PyPI for the rest, and the host's CA
bundle. Everything podman keeps (images, containers, volumes) lives under one directory
that `Podman.destroy` removes.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.conftest import ROOT

# Debian packages of the recipe; crun is not used (it refuses hybrid cgroup machines).
PACKAGES = (
    "podman",
    "buildah",
    "mmdebstrap",
    "runc",
    "fuse-overlayfs",
    "slirp4netns",
    "uidmap",
    "containernetworking-plugins",
    "golang-github-containers-common",
)
# What the base has that the official python:3.11-slim base has: python, venv, pip, CAs.
BASE_PACKAGES = "python3,python3-venv,python3-pip,python-is-python3,ca-certificates"
BASE_SUITE = "bookworm"
BASE_TAG = "localhost/gradstream-test-base:bookworm"
IMAGE_TAG = "localhost/gradstream:test-cpu"
# The already-allowed index of the Dockerfile's cuda stage; the torch wheel itself comes
# from the local wheel directory (pip prefers its 2.13.0+cpu over PyPI's 2.13.0).
PYPI_SIMPLE = "https://pypi.org/simple"
WHEELS = Path(os.environ.get("GRADSTREAM_WHEELS", "/opt/wheels"))
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
BLOB_CACHE = Path("/var/lib/containers/cache")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Unavailable(Exception):
    """Containers cannot run on this machine; the message says why."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def install_tools() -> None:
    """podman, buildah and mmdebstrap from Debian's packages, where they are missing."""
    if shutil.which("podman") and shutil.which("buildah") and shutil.which("mmdebstrap"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Unavailable("podman is not installed and cannot be (needs root and apt-get)")
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        done = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=600, check=False
        )
        if done.returncode != 0:
            raise Unavailable(f"{' '.join(argv[:2])} failed: {done.stderr.strip()[-2000:]}")


class Podman:
    """podman with its configuration and all its storage under one directory."""

    def __init__(self, home: Path) -> None:
        self.home = home
        for sub in ("root", "run", "tmp"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        # podman's default ulimits exceed what a sandbox allows; runc and cgroupfs work on
        # hybrid cgroup machines without systemd; the event log is a file, not journald.
        hard_files = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        files = 1 << 20 if hard_files == resource.RLIM_INFINITY else min(hard_files, 1 << 20)
        (home / "containers.conf").write_text(
            "[containers]\n"
            f'default_ulimits = ["nofile={files}:{files}", "nproc=32768:32768"]\n'
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
        )
        (home / "storage.conf").write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f'graphroot = "{home / "root"}"\n'
            f'runroot = "{home / "run"}"\n'
        )
        # Outside the directory podman keeps one cache of blob digests; removed at the end
        # when this run made it.
        self.made_blob_cache = not BLOB_CACHE.exists()
        self.env = os.environ | {
            "CONTAINERS_CONF": str(home / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(home / "storage.conf"),
            "TMPDIR": str(home / "tmp"),
        }

    def run(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``podman ARGS``; raises with its output when ``check`` and it fails."""
        done = subprocess.run(
            ["podman", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )
        return done

    def make_base(self, cache: Path) -> None:
        """The base image: a Debian rootfs (made once per run into ``cache``), imported."""
        rootfs = cache / f"rootfs-{BASE_SUITE}.tar"
        if not rootfs.exists():
            # mmdebstrap picks its output format from the name: keep the .tar.
            partial = cache / f"rootfs-{BASE_SUITE}.partial.tar"
            done = subprocess.run(
                [
                    "mmdebstrap",
                    "--quiet",
                    "--variant=minbase",
                    f"--include={BASE_PACKAGES}",
                    BASE_SUITE,
                    str(partial),
                ],
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            if done.returncode != 0:
                raise Unavailable(f"mmdebstrap failed: {done.stderr.strip()[-2000:]}")
            partial.rename(rootfs)
        self.run("import", "--change", f"ENV PATH={PATH}", str(rootfs), BASE_TAG, timeout=300)
        # Whether this machine can start a container at all (a sandbox may forbid it).
        done = self.run(
            "run", "--rm", "--pull=never", "--network", "none", BASE_TAG, "true", check=False
        )
        if done.returncode != 0:
            raise Unavailable(f"podman cannot run a container here: {done.stderr.strip()}")

    def build(self, target: str = "cpu", tag: str = IMAGE_TAG) -> str:
        """``podman build`` of deploy/Dockerfile's target on the local base; its log."""
        pip_conf = self.home / "pip.conf"
        pip_conf.write_text(f"[global]\nfind-links = /opt/wheels\ncert = {HOST_CA}\n")
        done = self.run(
            "build",
            "--pull=never",  # the base is local; nothing comes from a container registry
            "--format",
            "docker",  # OCI images drop HEALTHCHECK
            "--layers=false",  # built once per run: committing every step would only cost time
            "--network",
            "host",
            "--file",
            str(ROOT / "deploy" / "Dockerfile"),
            "--target",
            target,
            "--build-arg",
            f"PYTHON_IMAGE={BASE_TAG}",
            "--build-arg",
            f"TORCH_INDEX={PYPI_SIMPLE}",
            # The mounts the final image must not keep a trace of (test_image_files).
            "--volume",
            f"{pip_conf}:/etc/pip.conf:ro",
            "--volume",
            f"{WHEELS}:/opt/wheels:ro",
            "--volume",
            f"{HOST_CA}:{HOST_CA}:ro",
            "--tag",
            tag,
            str(ROOT),
            timeout=900,
        )
        return done.stdout + done.stderr

    def wait_healthy(self, container: str, timeout: float = 90) -> None:
        """Until the image's HEALTHCHECK passes in the container (it exits 0)."""
        deadline = time.monotonic() + timeout
        while True:
            done = self.run("healthcheck", "run", container, check=False)
            if done.returncode == 0:
                return
            state = self.run("inspect", "--format", "{{.State.Status}}", container).stdout
            if state.strip() != "running" or time.monotonic() > deadline:
                logs = self.run("logs", container, check=False)
                raise AssertionError(
                    f"{container} not healthy ({state.strip()}): {done.stdout}{done.stderr}\n"
                    f"{logs.stdout}{logs.stderr}"
                )
            time.sleep(0.5)

    def stop(self, container: str, timeout: int = 60) -> int:
        """SIGTERM (the image's stop signal), wait; the container's exit code."""
        self.run("stop", "--time", str(timeout), container, timeout=timeout + 30)
        code = self.run("inspect", "--format", "{{.State.ExitCode}}", container).stdout
        return int(code)

    def destroy(self) -> None:
        """Remove every container, image and volume, then the directory itself."""
        for args in (
            ("rm", "--all", "--force", "--time", "0"),
            ("volume", "prune", "--force"),
            ("system", "reset", "--force"),
        ):
            self.run(*args, timeout=300, check=False)
        # The overlay driver bind-mounts its own directory; a reset may leave that mount.
        for point in sorted(self.mounts(), key=len, reverse=True):
            subprocess.run(["umount", point], capture_output=True, timeout=60, check=False)
        shutil.rmtree(self.home, ignore_errors=True)
        if self.made_blob_cache:
            shutil.rmtree(BLOB_CACHE, ignore_errors=True)
            with contextlib.suppress(OSError):
                BLOB_CACHE.parent.rmdir()  # only where nothing else is in it

    def mounts(self) -> list[str]:
        """Mount points under the directory."""
        with open("/proc/self/mounts") as table:
            points = [line.split()[1] for line in table]
        return [p for p in points if Path(p).is_relative_to(self.home)]
