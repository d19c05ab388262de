"""README and docs as a user reads them: every link resolves inside the repository, and
every code block is run (or, where it needs a cluster or Docker, checked).

Each fenced block of each page has a mode in ``BLOCKS``, in page order; a page whose
blocks change fails ``test_every_block_has_a_mode`` until its modes are updated:

- ``run``: one bash session per page runs its ``run`` blocks in order in a scratch
  directory, with the documented ports (50051, 50052, 9464) swapped for free ones and
  ``--host 0.0.0.0`` for loopback; ``gradstream serve`` runs in the background.
  ``python`` blocks in a ``run`` page run inside that session.
- ``make``: ``make -n`` of its targets; ``dist``: the wheel commands, run by test_dist.
- ``kubectl``: ``kubectl kustomize`` of every ``-k`` directory, every ``-f`` file exists;
  ``docker``: the files and make targets it names exist; ``yaml``/``json``: they parse;
  ``spec``: a model spec the server accepts; ``tokens``: a tokens file the server loads.
- ``fragment``: a Python excerpt (parsed only); ``text``: not code.

Every ``gradstream COMMAND --flag`` in any block must be a flag that command has.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gradstream.server.main import BackgroundServer
from gradstream.server.tokens import TokenStore
from tests.conftest import ROOT, require_tool, server_settings
from tests.e2e._cli import gradstream

PAGES = sorted(
    p.relative_to(ROOT).as_posix()
    for p in [ROOT / "README.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("examples/**/*.md")]
)
BLOCKS: dict[str, list[str]] = {
    "README.md": [
        *("make", "run", "dist", "run", "run", "run", "run", "run"),
        *("flags", "spec", "spec", "text"),
    ],
    "docs/architecture.md": ["text", "text", "text", "text"],
    "docs/bring-your-own-model.md": ["fragment", "flags", "fragment"],
    "docs/deploy.md": [
        *("docker", "docker", "text", "docker", "docker", "docker"),
        *("kubectl", "yaml", "kubectl", "kubectl", "kubectl", "docker", "docker"),
    ],
    "docs/durability.md": ["fragment"],
    "docs/observability.md": ["prometheus"],
    "docs/performance.md": ["flags"],
    "docs/scaling.md": ["flags", "flags"],
    "docs/security.md": ["tokens", "run", "run", "run", "kubectl", "yaml"],
    "docs/semantics.md": ["text"],  # pseudo-code with elisions (`lr=..., ...`)
    "docs/serving.md": ["flags", "text", "text"],  # serve flags, a layout, Triton's command
    "docs/testing.md": ["text", "text"],  # pytest and make commands, run by the tests themselves
}
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(
    r"`((?:docs|deploy|examples|proto|client|server|benchmarks|tests)/[\w./-]*\w)`"
)


def blocks(page: str) -> list[tuple[str, str]]:
    """(language, text) of every fenced block of a page."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer((ROOT / page).read_text())]


def modes(page: str) -> list[str]:
    """The mode of each block; the seed notebook's cells are kept as written, not run."""
    if page.startswith("docs/seed/"):
        return ["fragment" if lang == "python" else "text" for lang, _ in blocks(page)]
    return BLOCKS.get(page, [])


def test_every_block_has_a_mode() -> None:
    for page in PAGES:
        assert len(modes(page)) == len(blocks(page)), f"{page}: update BLOCKS in {__file__}"


@pytest.mark.parametrize("page", PAGES)
def test_links_point_inside_the_repository(page: str) -> None:
    text = (ROOT / page).read_text()
    assert "DESIGN.md" not in text
    assert "/work/" not in text
    assert "shared/" not in text
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "#", "mailto:")):
            continue
        assert ((ROOT / page).parent / target.split("#")[0]).exists(), f"{page}: {target}"
    for path in REPO_PATH.findall(text):
        assert (ROOT / path).exists(), f"{page}: `{path}` is not in the repository"


def _commands(text: str) -> Iterator[list[str]]:
    """Each ``gradstream COMMAND ...`` invocation in a block, as arguments, lines joined.

    ``gradstream`` is the command where it starts a command: first on the line, after
    ``;``, ``&&``, ``|``, ``(``, torchrun's ``--no-python`` or a ``VAR=value`` prefix (not
    as ``kubectl -n gradstream``).
    """
    joined = text.replace("\\\n", " ")
    for line in joined.splitlines():
        words = line.split(" #")[0].split()
        for i, word in enumerate(words[:-1]):
            before = words[i - 1] if i else ";"
            starts = before in {";", "&&", "||", "|", "(", "$(", "--no-python"}
            if word == "gradstream" and (starts or re.match(r"^\w+=", before)):
                rest = " ".join(words[i + 1 :])
                rest = re.split(r"\s(?:;|&&|\|\||\|)\s", rest)[0]
                try:
                    yield shlex.split(rest)
                except ValueError:
                    yield rest.split()


_HELP: dict[str, str] = {}


@pytest.mark.parametrize("page", PAGES)
def test_every_gradstream_flag_exists(page: str) -> None:
    for _, text in blocks(page):
        for command, *args in _commands(text):
            if command not in _HELP:
                _HELP[command] = gradstream(command, "--help").stdout
            for arg in args:
                flag = arg.split("=")[0]
                if flag.startswith("--"):
                    assert flag in _HELP[command], f"{page}: gradstream {command} {flag}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


SERVE_IN_BACKGROUND = """\
serve_bg() {
  local ready; ready=$(mktemp -u)
  gradstream serve "$@" --ready-file "$ready" 2>> serve.log &
  for _ in $(seq 1200); do [[ -e "$ready" ]] && return 0; sleep 0.1; done
  echo "gradstream serve did not start" >&2; cat serve.log >&2; return 1
}
trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT
"""


def _session(page: str) -> str:
    """The page's ``run`` blocks as one bash script."""
    parts = ["set -euo pipefail", SERVE_IN_BACKGROUND]
    for (lang, text), mode in zip(blocks(page), modes(page), strict=True):
        if mode != "run":
            continue
        if lang == "python":
            parts.append(f"python - <<'PYTHON_BLOCK'\n{text}PYTHON_BLOCK")
            continue
        joined = text.replace("\\\n", " ")
        joined = re.sub(r"^gradstream serve(.*?)( &)?$", r"serve_bg\1", joined, flags=re.MULTILINE)
        parts.append(joined.replace("source .venv/", f"source {ROOT}/.venv/"))
    return "\n".join(parts)


@pytest.mark.parametrize("page", [p for p in PAGES if "run" in modes(p)])
def test_run_blocks_run_as_written(page: str, tmp_path: Path) -> None:
    ports = {"50051": _free_port(), "50052": _free_port(), "9464": _free_port()}
    script = _session(page).replace("--host 0.0.0.0", "--host 127.0.0.1")
    for documented, free in ports.items():
        script = re.sub(rf"\b{documented}\b", str(free), script)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "GRADSTREAM_PORT": str(ports["50051"]),
        "GRADSTREAM_HEALTH_PORT": str(ports["50052"]),
        "GRADSTREAM_METRICS_PORT": str(ports["9464"]),
        "GRADSTREAM_TARGET": f"127.0.0.1:{ports['50051']}",
        "GRADSTREAM_DEVICE": "cpu",
    }
    result = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"{page}:\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr


def _of_mode(mode: str) -> list[tuple[str, str, str]]:
    return [
        (page, lang, text)
        for page in PAGES
        if len(blocks(page)) == len(modes(page))  # else test_every_block_has_a_mode fails
        for (lang, text), m in zip(blocks(page), modes(page), strict=True)
        if m == mode
    ]


def test_make_blocks_name_real_targets() -> None:
    for page, _, text in _of_mode("make"):
        targets = re.findall(r"^make (\w+)", text, re.MULTILINE)
        assert targets, page
        subprocess.run(["make", "-n", *targets], cwd=ROOT, check=True, capture_output=True)


def test_make_demo_installs_only_the_server_extra() -> None:
    demo = subprocess.run(
        ["make", "-n", "-B", "demo"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    assert "'.[server]'" in demo
    assert "dev" not in demo


def test_kubectl_blocks_build(tmp_path: Path) -> None:
    kubectl = require_tool("kubectl")
    for page, _, text in _of_mode("kubectl"):
        subprocess.run(["bash", "-n"], input=text, text=True, check=True)
        for directory in re.findall(r"kubectl apply -k (\S+)", text):
            subprocess.run(
                [kubectl, "kustomize", str(ROOT / directory)], check=True, capture_output=True
            )
        for file in re.findall(r"kubectl apply -f (\S+)", text):
            assert (ROOT / file).exists(), f"{page}: {file}"


def test_docker_blocks_name_what_exists() -> None:
    for page, _, text in _of_mode("docker"):
        subprocess.run(["bash", "-n"], input=text, text=True, check=True)
        for file in re.findall(r"docker compose -f (\S+)", text):
            assert (ROOT / file).exists(), f"{page}: {file}"
        for target in re.findall(r"^make (\w+)", text, re.MULTILINE):
            subprocess.run(["make", "-n", target], cwd=ROOT, check=True, capture_output=True)


def test_data_blocks_parse() -> None:
    for page, _, text in _of_mode("yaml"):
        assert yaml.safe_load(text), page
    for _, _, text in _of_mode("json"):
        json.loads(text)
    for page, _, text in _of_mode("fragment"):
        ast.parse(text.replace("\n    ...\n", "\n    pass\n"), filename=page)


def test_the_documented_spec_creates_a_model() -> None:
    from gradstream.client import Client

    with BackgroundServer(server_settings()) as running, Client(running.target) as client:
        for index, (_, _, text) in enumerate(_of_mode("spec")):
            client.create_model(f"documented-{index}", json.loads(text))


def test_the_documented_tokens_file_loads(tmp_path: Path) -> None:
    for index, (_, _, text) in enumerate(_of_mode("tokens")):
        path = tmp_path / f"tokens-{index}"
        path.write_text(text)
        path.chmod(0o600)
        TokenStore.load(path)


def test_prometheus_blocks_name_a_valid_config() -> None:
    promtool = require_tool("promtool")
    for _, _, text in _of_mode("prometheus"):
        for config in re.findall(r"--config\.file=(\S+)", text):
            subprocess.run(
                [promtool, "check", "config", str(ROOT / config)], check=True, capture_output=True
            )
