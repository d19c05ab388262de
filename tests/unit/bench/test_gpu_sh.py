"""benchmarks/gpu.sh: its parts keep to the script's time and a failing part stops no other."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, require_tool

SCRIPT = ROOT / "benchmarks" / "gpu.sh"
# The script's part() and its deadline, with a deadline of 12 s from now, then four parts.
HARNESS = """
set -euo pipefail
eval "$(sed -n '/^DEADLINE=/,/^}/p' "$1")"
DEADLINE=$((SECONDS + 12))
part ok 5 ok.txt echo hello
part fails 5 fails.txt bash -c 'echo boom; exit 3'
part slow 2 slow.txt sleep 30
part capped 60 capped.txt sleep 30
part late 5 late.txt echo never
echo "failed: ${failed[*]}"
"""


def test_gpu_sh_parses_and_passes_shellcheck() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)
    shellcheck = require_tool("shellcheck", Path(sys.executable).parent / "shellcheck")
    result = subprocess.run(
        [shellcheck, str(SCRIPT)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout


def test_parts_run_in_turn_within_the_deadline_and_failures_are_noted(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", "-c", HARNESS, "harness", str(SCRIPT)],
        env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.splitlines()[-1] == "failed: fails slow capped late"
    out = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert out["ok.txt"] == "hello\n"
    assert out["fails.txt"] == "boom\nfails: exit status 3\n"
    assert out["slow.txt"] == "slow: stopped after its 2 s\n"
    # Its own limit is 60 s; what was left of the script's time stopped it first.
    assert out["capped.txt"].startswith("capped: stopped after its ")
    assert int(out["capped.txt"].split()[-2]) <= 10
    assert out["late.txt"] == "late: not run, the script's time is spent\n"
