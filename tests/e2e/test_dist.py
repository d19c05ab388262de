"""``make dist`` builds a wheel that installs on its own and carries the command."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.conftest import ROOT


def test_make_dist_builds_a_wheel_that_installs_into_a_fresh_venv(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        ["make", "dist", f"DIST={dist}", f"VENV={Path(sys.executable).parents[1]}"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = dist.glob("gradstream-*-py3-none-any.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # The dependencies come from this environment (no network); gradstream from the wheel only.
    site = Path(sysconfig.get_paths()["purelib"])
    [fresh_site] = (venv / "lib").glob("python*/site-packages")
    (fresh_site / "dependencies.pth").write_text(f"{site}\n")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
    subprocess.run([*pip, str(wheel)], check=True, capture_output=True, timeout=300)

    version = subprocess.run(
        [str(venv / "bin" / "gradstream"), "--version"], capture_output=True, text=True, check=True
    )
    assert version.stdout.startswith("gradstream, version ")
    where = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import gradstream.client.cli, gradstream.server.main, gradstream.v1.trainer_pb2 as pb;"
            "print(gradstream.client.cli.__file__); print(pb.__file__)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(path.startswith(str(fresh_site)) for path in where), where
