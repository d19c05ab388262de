"""The model worker's thread steps with the intra-op thread count the server chose."""

from __future__ import annotations

import asyncio
import ctypes
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gradstream.server.app import TORCH_DEFAULT_THREADS, intra_op_threads
from gradstream.server.config import Settings
from gradstream.server.engine import Trainer
from gradstream.server.spec import parse_spec
from gradstream.server.worker import ModelWorker


def _openmp_threads() -> int:
    """What the calling thread's next OpenMP region (MKL's GEMMs included) would use."""
    maps = Path("/proc/self/maps").read_text().splitlines()
    libgomp = next((line.split()[-1] for line in maps if "libgomp" in line), None)
    if libgomp is None:
        pytest.skip("torch is not built with GNU OpenMP here")
    return int(ctypes.CDLL(libgomp).omp_get_max_threads())


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.skipif(TORCH_DEFAULT_THREADS < 2, reason="needs a default above one thread")
def test_worker_thread_uses_the_configured_thread_count(one_thread: None) -> None:
    # OpenMP's count is per thread: a new thread starts from the process default, which is
    # what the worker used before it applied torch's setting itself.
    spec = parse_spec({"architecture": {"kind": "linear", "in_features": 2, "out_features": 1}})
    worker = ModelWorker(Trainer("m", spec, torch.device("cpu")))
    try:
        seen = asyncio.run(worker.run(lambda _: _openmp_threads()))
    finally:
        worker.close(5)
    assert seen == 1


def test_default_leaves_a_core_to_the_event_loop() -> None:
    assert intra_op_threads(Settings(threads=3)) == 3
    assert intra_op_threads(Settings()) == max(1, TORCH_DEFAULT_THREADS - 1)
    # Not cumulative: a second server in the process gets the same count.
    torch.set_num_threads(intra_op_threads(Settings()))
    assert intra_op_threads(Settings()) == max(1, TORCH_DEFAULT_THREADS - 1)
    torch.set_num_threads(TORCH_DEFAULT_THREADS)
