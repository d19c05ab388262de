"""The arithmetic of the data-parallel step: row shards and shard losses that add up exactly."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradstream.server.collectives import Collectives, Topology
from gradstream.server.config import Settings
from gradstream.server.engine import StepKind, TrainerFactory
from gradstream.server.errors import FailedPrecondition
from gradstream.server.follower import Follower
from gradstream.server.main import build
from gradstream.server.models import loss_value
from gradstream.server.sharded import denominator, shard_loss, shard_sizes
from gradstream.server.spec import LossSpec, parse_spec
from tests.conftest import examples

KINDS = ["mse", "l1", "huber", "cross_entropy", "bce_with_logits"]


@given(rows=st.integers(1, 200), world=st.integers(1, 16))
def test_shards_cover_every_row_once_and_differ_by_at_most_one(rows: int, world: int) -> None:
    sizes = shard_sizes(rows, world)
    assert len(sizes) == world
    assert sum(sizes) == rows
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the extra rows go to the first ranks


def test_fewer_rows_than_ranks_leaves_ranks_without_rows() -> None:
    assert shard_sizes(3, 8) == [1, 1, 1, 0, 0, 0, 0, 0]


def _batch(
    kind: str, rows: int, weighted: bool, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    out = torch.randn(rows, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    if kind == "cross_entropy":
        y = torch.randint(0, 3, (rows,), generator=generator)
    elif kind == "bce_with_logits":
        y = torch.randint(0, 2, (rows, 3), generator=generator).double()
    else:
        y = torch.randn(rows, 3, generator=generator, dtype=torch.float64)
    w = torch.rand(rows, generator=generator, dtype=torch.float64) + 0.1 if weighted else None
    return out, y, w


@settings(max_examples=examples(80), deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    reduction=st.sampled_from(["mean", "sum"]),
    weighted=st.booleans(),
    rows=st.integers(1, 40),
    world=st.integers(1, 7),
    seed=st.integers(0, 2**31),
)
def test_shard_losses_and_gradients_add_up_to_the_full_batch(
    kind: str, reduction: str, weighted: bool, rows: int, world: int, seed: int
) -> None:
    """What the all-reduce sums is the full batch's loss and gradient, for any split."""
    spec = LossSpec(kind=kind, reduction=reduction)
    out, y, w = _batch(kind, rows, weighted, torch.Generator().manual_seed(seed))
    full = loss_value(spec, out, y, w)
    (full_grad,) = torch.autograd.grad(full, out)
    divisor = denominator(spec, y, w)
    total = torch.zeros((), dtype=torch.float64)
    grad = torch.zeros_like(out)
    start = 0
    for size in shard_sizes(rows, world):
        if size == 0:  # a rank without rows adds zeros
            continue
        part = slice(start, start + size)
        shard = out.detach()[part].requires_grad_(True)
        loss = shard_loss(spec, shard, y[part], None if w is None else w[part], divisor)
        (g,) = torch.autograd.grad(loss, shard)
        total += loss.detach()
        grad[part] = g
        start += size
    torch.testing.assert_close(total, full.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, full_grad, rtol=1e-12, atol=1e-12)


def test_a_wrong_denominator_is_caught() -> None:
    """The check above can fail: dividing each shard by its own row count is wrong."""
    spec = LossSpec(kind="mse")
    out, y, _ = _batch("mse", 5, False, torch.Generator().manual_seed(0))
    sizes = shard_sizes(5, 2)
    parts = [slice(0, sizes[0]), slice(sizes[0], 5)]
    naive = sum(shard_loss(spec, out[p], y[p], None, float(y[p].numel())) for p in parts)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(naive, loss_value(spec, out, y, None))


def test_denominators() -> None:
    y = torch.zeros(4, 3)
    w = torch.tensor([0.5, 1.0, 2.0, 0.25])
    assert denominator(LossSpec(reduction="mean"), y, None) == 12.0
    assert denominator(LossSpec(reduction="mean"), y, w) == 3.75
    assert denominator(LossSpec(reduction="sum"), y, w) == 1.0
    labels = torch.zeros(4, dtype=torch.int64)
    assert denominator(LossSpec(kind="cross_entropy"), labels, None) == 4.0


def test_every_rank_builds_its_trainers_alike() -> None:
    """Rank 0 and the followers build with one factory: same limits, same step implementation.

    A single process on CUDA defers to the fused step; a rank of a data-parallel job must
    not, on any rank, or rank 0 and the others would step differently.
    """
    settings = Settings(device="cpu", max_batch_rows=8, max_batch_bytes=1000, max_nonfinite_steps=3)
    spec = parse_spec(
        {
            "architecture": {"kind": "linear", "in_features": 2, "out_features": 1},
            "optimizer": {"lr": 0.1, "momentum": 0.9},
        }
    )
    cpu = torch.device("cpu")
    group = Collectives(Topology(rank=0, world_size=1, local_rank=0), cpu, timeout=30.0)
    try:
        leader = build(settings, group, cpu).registry.factory
        follower = Follower(settings, group).factory
    finally:
        group.close()
    assert dataclasses.replace(leader, gradients=follower.gradients) == follower
    assert (follower.max_batch_rows, follower.max_batch_bytes) == (8, 1000)
    assert follower.max_nonfinite_steps == 3
    cuda = torch.device("cuda", 0)
    assert TrainerFactory(cuda).step_kind(spec) is StepKind.DEFERRED
    for factory in (leader, follower):
        assert dataclasses.replace(factory, device=cuda).step_kind(spec) is StepKind.OPTIMIZER
    trainers = [f.build("m", spec) for f in (TrainerFactory(cpu), follower)]
    assert trainers[0].kind is trainers[1].kind
    assert trainers[0].optimizer.defaults == trainers[1].optimizer.defaults


def test_a_model_of_named_inputs_is_refused_in_data_parallel_mode() -> None:
    """Followers size their shards from the spec; an id bag's length is not in it."""
    spec = parse_spec(
        {
            "architecture": {
                "kind": "embedding_mlp",
                "embeddings": [{"input": "user", "num_embeddings": 4, "dim": 2}],
                "out_features": 1,
            }
        }
    )
    cpu = torch.device("cpu")
    group = Collectives(Topology(rank=0, world_size=1, local_rank=0), cpu, timeout=30.0)
    try:
        leader = build(Settings(device="cpu"), group, cpu).registry.factory
        with pytest.raises(FailedPrecondition, match="takes named inputs; data-parallel mode"):
            leader.build("ctr", spec)
    finally:
        group.close()
