"""CUDA: the training step captured in a CUDA graph trains exactly as the eager step does.

Skipped without a GPU; not run on the CPU-only machine this was written on
(benchmarks/gpu.sh runs it on a lent GPU).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cuda_graph as cg
import pytest
import torch

from gradstream.bench.scenarios import scenario

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _parity(name: str, optimizer: str, steps: int = 20) -> dict[str, Any]:
    """Every contender but the compiled one over ``steps`` steps on the GPU, compared."""
    chosen = scenario(name, optimizer)
    device = torch.device("cuda")
    trained = cg.train_all(chosen, device, cg.device_batches(chosen, device), steps, False)
    assert trained.errors == {}
    assert list(trained.steps) == ["eager", "graph"]
    return cg.parity(trained)


@pytest.mark.parametrize("name", ["small", "medium"])
def test_captured_sgd_step_equals_the_eager_step_bitwise(name: str) -> None:
    parity = _parity(name, "sgd")
    assert list(parity) == ["graph_vs_eager"]
    assert parity["graph_vs_eager"]["bitwise"], parity


@pytest.mark.parametrize("name", ["small", "medium"])
def test_captured_adam_step_equals_eager_capturable_adam_bitwise(name: str) -> None:
    parity = _parity(name, "adam")
    # Capturing changes nothing. Capturable Adam's arithmetic differs from the plain one's:
    # the benchmark reports by how much; this bound only catches a step gone wrong (NaN).
    assert parity["graph_vs_eager_capturable"]["bitwise"], parity
    lr = scenario(name, "adam").spec["optimizer"]["lr"]
    assert 0 <= parity["graph_vs_eager"]["max_abs_diff"] < lr * 20


def test_benchmark_prints_and_writes_every_contender_on_cuda(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "graph.json"
    args = ["small", "--optimizer", "sgd", "--steps", "8", "--seconds", "0.05", "--rounds", "1"]
    assert cg.main([*args, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "small sgd (4 x 1): graph/eager " in printed
    (result,) = json.loads(out.read_text())["results"]
    assert list(result["rates"]) == ["eager", "graph"]
    assert result["rates"]["graph"]["median"] > 0
    assert result["parity"]["graph_vs_eager"]["bitwise"]
