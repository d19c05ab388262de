"""The wire API: committed stubs are current, and the proto passes buf's STANDARD lint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, require_tool

# Each proto file, and the stubs generated from it beside it.
PROTOS = ("gradstream/v1/trainer.proto", "gradstream/internal/v1/ingest.proto")
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iproto",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--mypy_grpc_out={tmp_path}",
            f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
            *(f"proto/{p}" for p in PROTOS),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    for proto in PROTOS:
        for suffix in SUFFIXES:
            name = proto.removesuffix(".proto") + suffix
            fresh = (tmp_path / name).read_text()
            committed = (ROOT / "proto" / name).read_text()
            assert committed == fresh, f"proto/{name} is stale: run `make proto`"


def test_buf_lint_standard_passes() -> None:
    buf = require_tool("buf", ROOT / ".tools" / "node_modules" / ".bin" / "buf")
    config = (ROOT / "proto" / "buf.yaml").read_text()
    assert "STANDARD" in config
    result = subprocess.run(
        [buf, "lint"], cwd=ROOT / "proto", capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
