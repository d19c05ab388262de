"""Data-parallel gradients: a batch's rows split over the ranks, summed by one all-reduce.

The gradient source of every rank's trainers in a ``torchrun`` job. Each rank runs forward
and ``autograd.grad`` on its own rows of the shard objective ``sum_i w_i l_i / D`` (``D`` is
the full batch's denominator: the element count, or the sum of weights, or 1 for sum
reduction), then one all-reduce (SUM) of ``[gradients, loss, used flags]``. The sum over
ranks is the full batch's gradient and loss, whatever the split; a rank with no rows adds
zeros. Every decision after it (skip a non-finite loss or gradient, accumulate, step) is
``Trainer.apply``'s, on all-reduced values that are the same bits on every rank, so the
ranks never diverge. ``docs/decisions.md`` says why this is not ``DistributedDataParallel``.
"""

from __future__ import annotations

import math
import time
from typing import Any, cast

import torch

from gradstream.server.batches import Batch
from gradstream.server.collectives import Collectives, Header, Op
from gradstream.server.config import Settings
from gradstream.server.engine import GradientSource, Trainer, TrainerFactory, TrainerState
from gradstream.server.errors import FailedPrecondition
from gradstream.server.metrics import RankMetrics
from gradstream.server.models import loss_value
from gradstream.server.spec import InitSpec, LossSpec, ModelSpec


def shard_sizes(rows: int, world_size: int) -> list[int]:
    """Rows per rank: contiguous, the first ``rows % world_size`` ranks get one more."""
    base, extra = divmod(rows, world_size)
    return [base + (rank < extra) for rank in range(world_size)]


def denominator(spec: LossSpec, y: torch.Tensor, weight: torch.Tensor | None) -> float:
    """What the full batch's loss is divided by: 1 (sum), the element count, or sum(w).

    Every loss has one element per element of y (cross_entropy: one per label), so
    ``y.numel()`` is the count ``reduction='mean'`` divides by.
    """
    if spec.reduction == "sum":
        return 1.0
    if weight is None:
        return float(y.numel())
    return float(weight.sum())


def shard_loss(
    spec: LossSpec,
    output: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor | None,
    divisor: float,
) -> torch.Tensor:
    """This shard's part of the full batch's loss: the parts of all shards add up to it."""
    return loss_value(spec, output, y, weight, denominator=divisor)


def rank_factory(settings: Settings, device: torch.device, gradients: Any) -> TrainerFactory:
    """The trainer factory of every rank: the same limits, the same step on every rank.

    Never deferred: the fused form's decisions stay on one device, and every rank must
    take each decision from the all-reduced values, the same way.
    """
    return TrainerFactory(
        device,
        max_nonfinite_steps=settings.max_nonfinite_steps,
        max_batch_rows=settings.max_batch_rows,
        max_batch_bytes=settings.max_batch_bytes,
        max_activation_bytes=settings.max_activation_bytes,
        deferred=False,
        gradients=gradients,
    )


def shard_gradients(
    trainer: Trainer,
    rows: Batch,
    divisor: float,
    group: Collectives,
    metrics: RankMetrics,
    *,
    pending_sends: list[Any] | None = None,
) -> float:
    """This rank's rows into the all-reduced gradient, added to ``.grad`` if the loss is finite.

    Returns the full batch's loss, the same on every rank.
    """
    start = time.perf_counter()
    params = [p for p in trainer.module.parameters() if p.requires_grad]
    sizes = [p.numel() for p in params]
    dtype = params[0].dtype
    if rows.x.shape[0]:
        loss = shard_loss(trainer.spec.loss, trainer.module(rows.x), rows.y, rows.weight, divisor)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        used = torch.tensor([g is not None for g in grads], dtype=dtype, device=loss.device)
        flat = torch.cat(
            [
                *(
                    torch.zeros_like(p).reshape(-1) if g is None else g.reshape(-1)
                    for p, g in zip(params, grads, strict=True)
                ),
                loss.detach().reshape(1).to(dtype),
                used,
            ]
        )
        metrics.rows.inc(rows.x.shape[0])
    else:  # no rows here: zeros, and no parameter marked used
        flat = torch.zeros(sum(sizes) + 1 + len(params), dtype=dtype, device=group.device)
    for work in pending_sends or ():  # rank 0 sent the other shards while it computed its own
        work.wait()
    reduce_start = time.perf_counter()
    group.all_reduce(flat)
    metrics.allreduce_duration.observe(time.perf_counter() - reduce_start)
    total = sum(sizes)
    loss_number, *used_flags = flat[total:].tolist()  # the step's one read of the host
    if math.isfinite(loss_number):
        for param, grad, used_flag in zip(
            params, torch.split(flat[:total], sizes), used_flags, strict=True
        ):
            if not used_flag:
                continue  # as backward leaves it: no gradient, so the optimizer leaves it alone
            if param.grad is None:
                param.grad = grad.view_as(param)
            else:
                param.grad.add_(grad.view_as(param))
    metrics.step_duration.observe(time.perf_counter() - start)
    return float(loss_number)


# -- state pushed from rank 0 --------------------------------------------------------------


def push_state(trainer: Trainer, group: Collectives) -> None:
    """Rank 0: send ``trainer.state_dict()`` to every other rank (see ``pull_state``)."""
    state = trainer.state_dict()
    tensors = state["tensors"]
    meta = {k: v for k, v in state.items() if k != "tensors"}
    meta["tensors"] = [(key, tuple(t.shape), str(t.dtype)) for key, t in tensors.items()]
    group.broadcast_object(meta)
    for tensor in tensors.values():
        group.broadcast(tensor)


def pull_state(group: Collectives) -> TrainerState:
    """Other ranks: the state ``push_state`` sends, on this rank's device."""
    meta = group.broadcast_object()
    tensors: dict[str, torch.Tensor] = {}
    for key, shape, dtype in meta.pop("tensors"):
        value = torch.empty(
            shape, dtype=getattr(torch, dtype.removeprefix("torch.")), device=group.device
        )
        group.broadcast(value)
        tensors[key] = value
    # The fields push_state sent, as it read them from state_dict().
    return cast(TrainerState, {**meta, "tensors": tensors})


def follower_spec(spec: ModelSpec) -> ModelSpec:
    """The spec a follower builds from: the parameters follow by broadcast, the init
    tensors (possibly large) stay behind."""
    return spec.model_copy(update={"init": InitSpec(kind="zeros")})


class LeaderGradients:
    """Rank 0's source: splits each batch over the ranks and keeps their copies equal.

    Built by the factory once the trainer has its state: that state goes to every rank.
    Reads (predict, gradients, parameters, info, checkpoints) stay local: every rank
    holds the same state, so rank 0's answer is the job's.
    """

    def __init__(self, trainer: Trainer, group: Collectives, metrics: RankMetrics) -> None:
        if not trainer.checker.single:
            # Followers size each shard from the spec; a free size (an id bag) is not in it.
            raise FailedPrecondition(
                f"model {trainer.name!r} takes named inputs; data-parallel mode trains models "
                "of one float input x (run it on a single-process server)"
            )
        self.group = group
        self.metrics = metrics
        self.model_id = group.new_model_id()
        with group.command():
            group.send_header(Header(Op.CREATE, self.model_id))
            group.broadcast_object((trainer.name, follower_spec(trainer.spec)))
            push_state(trainer, group)

    def accumulate(self, trainer: Trainer, batch: Batch) -> float:
        """Send each rank its rows, take this rank's share, all-reduce."""
        tensors = [batch.x, batch.y] if batch.weight is None else [batch.x, batch.y, batch.weight]
        tensors = [t.to(trainer.device, non_blocking=True) for t in tensors]
        rows = tensors[0].shape[0]
        sizes = shard_sizes(rows, self.group.world_size)
        # From the host copy: no device sync, and the same sum on every device type.
        divisor = denominator(trainer.spec.loss, batch.y, batch.weight)
        with self.group.command():
            self.group.send_header(
                Header(Op.TRAIN, self.model_id, rows, batch.weight is not None, divisor)
            )
            sends = self.group.send_rows(tensors, sizes)
            own = [t[: sizes[0]] for t in tensors]
            mine = Batch(own[0], own[1], own[2] if len(own) > 2 else None, batch.sequence)
            return shard_gradients(
                trainer, mine, divisor, self.group, self.metrics, pending_sends=sends
            )

    def state_changed(self, trainer: Trainer) -> None:
        """Set on rank 0 (which validated it); push the result to every rank."""
        with self.group.command():
            self.group.send_header(Header(Op.SYNC, self.model_id))
            push_state(trainer, self.group)

    def close(self, trainer: Trainer) -> None:
        """Drop the other ranks' copies."""
        with self.group.command():
            self.group.send_header(Header(Op.DELETE, self.model_id))


class FollowerGradients:
    """Another rank's source: the rows rank 0 sent it, for the divisor of the command."""

    def __init__(self, group: Collectives, metrics: RankMetrics) -> None:
        self.group = group
        self.metrics = metrics
        self.divisor = 0.0  # the full batch's denominator, set by the follower per TRAIN

    def accumulate(self, trainer: Trainer, batch: Batch) -> float:
        """Take this rank's share, all-reduce."""
        return shard_gradients(trainer, batch, self.divisor, self.group, self.metrics)

    def state_changed(self, trainer: Trainer) -> None:
        """Rank 0 pushes state; nothing to send from here."""

    def close(self, trainer: Trainer) -> None:
        """Rank 0 dropped the model."""


def leader_gradients(group: Collectives, metrics: RankMetrics) -> Any:
    """The factory's ``gradients`` on rank 0."""

    def make(trainer: Trainer) -> GradientSource:
        return LeaderGradients(trainer, group, metrics)

    return make
