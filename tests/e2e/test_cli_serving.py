"""``gradstream eval`` and ``gradstream export`` against a real server process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from gradstream.client import Client
from gradstream.client._local import LocalServer
from tests.e2e.test_cli import SPEC, gradstream


def _ok(*args: str) -> str:
    """Run the command; its stdout, or a failure that shows its stderr."""
    result = gradstream(*args, check=False)
    assert result.returncode == 0, (
        f"gradstream {args[0]} exited {result.returncode}: {result.stderr}"
    )
    return result.stdout


@pytest.fixture(scope="module")
def served() -> Iterator[LocalServer]:
    with LocalServer() as server:
        yield server


def test_eval_and_export_from_the_command_line(served: LocalServer, tmp_path: Path) -> None:
    target = served.target
    _ok("create", "cli-serve", "--spec", json.dumps(SPEC), "--target", target)
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (50, 2)).astype(np.float32)
    y = x @ np.array([[2.0], [-1.0]], np.float32) + 0.5
    csv = tmp_path / "data.csv"
    np.savetxt(csv, np.hstack([x, y]), delimiter=",", header="a,b,target", comments="")
    _ok("train", "cli-serve", str(csv), "--epochs", "3", "--quiet", "--target", target)
    evaluated = json.loads(
        _ok("eval", "cli-serve", str(csv), "--batch-size", "7", "--target", target)
    )
    with Client(target) as client:
        predicted = client.predict("cli-serve", x).astype(np.float64)
    assert evaluated["rows"] == 50 and evaluated["step"] == 6
    assert evaluated["mse"] == pytest.approx(float(np.mean((predicted - y) ** 2)), rel=1e-5)
    assert evaluated["loss"] == pytest.approx(evaluated["mse"])
    assert set(evaluated) == {"loss", "mse", "mae", "rmse", "r2", "step", "rows"}

    out = tmp_path / "model.pt2"
    exported = _ok("export", "cli-serve", "--format", "pt2", "-o", str(out), "--target", target)
    assert exported.strip() == str(out)
    module = torch.export.load(str(out)).module()
    assert np.array_equal(
        module(torch.from_numpy(x)).detach().numpy(), predicted.astype(np.float32)
    )

    refused = gradstream("export", "cli-serve", "--format", "zip", "-o", "x", check=False)
    assert refused.returncode == 2 and "'zip'" in refused.stderr, refused.stderr
