"""Data-parallel training under ``torchrun``: rank 0 serves gRPC, every rank trains its rows.

``gradstream serve`` started by ``torchrun`` (``WORLD_SIZE`` > 1, or ``--distributed on``)
joins a ``torch.distributed`` process group (NCCL on CUDA, Gloo on the CPU). Rank 0 runs
the normal server, with a ``DistributedTrainer`` per model; every other rank runs
``Follower.run``: a loop that takes commands from rank 0 and keeps a plain ``Trainer``
per model, bit-for-bit equal to rank 0's.

The protocol, one command at a time under ``Collectives.lock`` (rank 0 has one
worker thread per model; the lock keeps every rank's collectives in one order):

    header     broadcast, float64[5] = (op, model id, rows, has weights, denominator)
    CREATE     + object (name, spec without init tensors, step) + state push
    SYNC       + state push: parameters, gradients, optimizer state, lr, frozen, pending
    TRAIN      + rows point-to-point from rank 0 to each rank, then one all-reduce
    DELETE     the model's id is dropped
    NOOP       a heartbeat while idle, so a follower's wait is bounded by the timeout
    STOP       followers return; the job ends

A TRAIN step on every rank: forward and ``autograd.grad`` on its own rows of the
shard objective ``sum_i w_i l_i / D`` (``D`` is the full batch's denominator: the
element count, or the sum of weights, or 1 for sum reduction), then one all-reduce
(SUM) of ``[gradients, loss, used flags]``. The sum over ranks is the full batch's
gradient and loss, whatever the split; a rank with no rows adds zeros. Every
decision (skip a non-finite loss or gradient, accumulate, step) reads the
all-reduced values, which are the same bits on every rank, so the ranks never
diverge. ``docs/decisions.md`` says why this is not ``DistributedDataParallel``.

Any failure inside a command (a peer died, a collective timed out) ends the
process at once with ``EXIT_RESTART``: the ranks may now disagree, and the only
consistent state is the last checkpoint, which every rank restores after the
restart (rank 0 reads it and pushes it to the others).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from datetime import timedelta
from enum import IntEnum
from pathlib import Path
from typing import Any

import grpc
import torch
import torch.distributed as dist
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from gradstream.server.app import Server, resolve_device
from gradstream.server.batches import Batch
from gradstream.server.config import Settings
from gradstream.server.engine import Outcome, StepResult, Trainer, TrainOptions
from gradstream.server.errors import FailedPrecondition
from gradstream.server.models import DTYPES, _elementwise
from gradstream.server.registry import ModelRegistry
from gradstream.server.spec import InitSpec, LossSpec, ModelSpec

log = logging.getLogger("gradstream.server.distributed")

# EX_TEMPFAIL: "try again later". A rank exits with it when the group broke; the
# launcher (torchrun --max-restarts, Kubernetes) restarts the job from its checkpoint.
EXIT_RESTART = 75
_HEADER = 5
_STEP_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0, 5.0)


class Op(IntEnum):
    """A command from rank 0 to the other ranks."""

    NOOP = 0
    CREATE = 1
    SYNC = 2
    TRAIN = 3
    DELETE = 4
    STOP = 5


@dataclass(frozen=True, slots=True)
class Header:
    """The fixed part of every command; the rest follows by collectives the op implies."""

    op: Op
    model: int = 0
    rows: int = 0
    weighted: bool = False
    denominator: float = 0.0


@dataclass(frozen=True, slots=True)
class Topology:
    """Where this process sits in the job, from torchrun's environment."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_env(cls) -> Topology:
        """RANK, WORLD_SIZE and LOCAL_RANK as torchrun sets them (a world of one without)."""
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )


def requested(settings: Settings) -> bool:
    """Whether to run data-parallel: ``--distributed on``, or ``auto`` under a launcher."""
    if settings.distributed == "auto":
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    return settings.distributed == "on"


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
    if weight is None:
        total = _elementwise(spec, output, y, "sum")
    else:
        per_element = _elementwise(spec, output, y, "none")
        if per_element.ndim > 1:
            dims = tuple(range(1, per_element.ndim))
            per_element = (
                per_element.mean(dims) if spec.reduction == "mean" else per_element.sum(dims)
            )
        total = (weight * per_element).sum()
    if spec.reduction == "sum":
        return total
    return total / torch.tensor(divisor, dtype=total.dtype, device=total.device)


# -- metrics -------------------------------------------------------------------------------


class RankMetrics:
    """Step timing of this rank; every rank exports its own (rank 0 beside the server's)."""

    def __init__(self, registry: CollectorRegistry, rank: int, world_size: int) -> None:
        labels = {"rank": str(rank)}
        self.step_duration = Histogram(
            "gradstream_rank_step_duration_seconds",
            "This rank's time for its part of one step: forward, backward, all-reduce, update.",
            ["rank"],
            buckets=_STEP_BUCKETS,
            registry=registry,
        ).labels(**labels)
        self.allreduce_duration = Histogram(
            "gradstream_rank_allreduce_duration_seconds",
            "Time in the gradient all-reduce: mostly waiting for the slowest rank.",
            ["rank"],
            buckets=_STEP_BUCKETS,
            registry=registry,
        ).labels(**labels)
        self.rows = Counter(
            "gradstream_rank_rows", "Rows this rank trained on.", ["rank"], registry=registry
        ).labels(**labels)
        Gauge("gradstream_world_size", "Ranks in the data-parallel job.", registry=registry).set(
            world_size
        )


# -- the process group ---------------------------------------------------------------------


class Collectives:
    """The process group as gradstream uses it: one command at a time; a failure is fatal.

    Control traffic (headers, small objects) goes over Gloo on the CPU, so reading a
    header never waits on a GPU stream; tensors go over the default group (NCCL on CUDA).
    """

    def __init__(self, topology: Topology, device: torch.device, timeout: float) -> None:
        self.topology = topology
        self.rank, self.world_size = topology.rank, topology.world_size
        self.device = device
        self.timeout = timeout
        backend = "nccl" if device.type == "cuda" else "gloo"
        delta = timedelta(seconds=timeout)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's point-to-point calls need it set
        if "MASTER_ADDR" in os.environ:
            # Our own keys per restart of torchrun's workers: the launcher's store outlives
            # them, and a restarted group must not find the last attempt's addresses.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.PrefixStore(  # type: ignore[attr-defined]
                f"gradstream/attempt-{attempt}",
                dist.TCPStore(  # type: ignore[attr-defined]
                    os.environ["MASTER_ADDR"],
                    int(os.environ["MASTER_PORT"]),
                    topology.world_size,
                    is_master=False,
                    timeout=delta,
                ),
            )
            dist.init_process_group(
                backend,
                store=store,
                rank=topology.rank,
                world_size=topology.world_size,
                timeout=delta,
                device_id=device if device.type == "cuda" else None,
            )
        else:  # --distributed on without a launcher: a world of one
            dist.init_process_group(
                backend,
                store=dist.HashStore(),  # type: ignore[attr-defined]
                rank=0,
                world_size=1,
                timeout=delta,
            )
        self.control: Any = (
            dist.new_group(backend="gloo", timeout=delta) if backend == "nccl" else None
        )
        self.lock = threading.Lock()
        self.last_command = time.monotonic()
        self._next_id = 1
        self._stopped = threading.Event()
        log.info(
            "rank %d of %d joined (%s, %s, collective timeout %.0f s)",
            self.rank,
            self.world_size,
            backend,
            device,
            timeout,
        )

    # -- framing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def command(self) -> Iterator[None]:
        """One command's collectives, in order on every rank; any failure ends the process."""
        with self.lock:
            try:
                yield
            except BaseException as exc:
                fatal(exc)
            finally:
                self.last_command = time.monotonic()

    def new_model_id(self) -> int:
        """A fresh id for a model; ids are never reused within a job."""
        with self.lock:
            self._next_id += 1
            return self._next_id - 1

    def send_header(self, header: Header) -> None:
        """Rank 0: broadcast the next command's header."""
        values = (
            float(header.op),
            float(header.model),
            float(header.rows),
            float(header.weighted),
            header.denominator,
        )
        dist.broadcast(torch.tensor(values, dtype=torch.float64), 0, group=self.control)

    def receive_header(self) -> Header:
        """Other ranks: wait (at most the collective timeout) for the next command."""
        buffer = torch.zeros(_HEADER, dtype=torch.float64)
        dist.broadcast(buffer, 0, group=self.control)
        op, model, rows, weighted, divisor = buffer.tolist()
        return Header(Op(int(op)), int(model), int(rows), bool(weighted), divisor)

    def broadcast_object(self, value: Any = None) -> Any:
        """Rank 0 sends a small picklable value, the others receive it (trusted peers only)."""
        box = [value]
        dist.broadcast_object_list(box, 0, group=self.control)
        return box[0]

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Rank 0's tensor into every rank's tensor of the same shape, in place."""
        dist.broadcast(tensor, 0)

    def send_rows(self, tensors: list[torch.Tensor], sizes: list[int]) -> list[Any]:
        """Rank 0: start sending each rank its rows of each tensor; returns works to wait on."""
        ops: list[dist.P2POp] = []
        start = sizes[0]
        for rank in range(1, self.world_size):
            stop = start + sizes[rank]
            if stop > start:
                ops.extend(
                    dist.P2POp(dist.isend, t[start:stop].contiguous(), rank) for t in tensors
                )
            start = stop
        return dist.batch_isend_irecv(ops) if ops else []

    def receive_rows(self, tensors: list[torch.Tensor]) -> None:
        """Other ranks: receive this rank's rows from rank 0 into ``tensors``."""
        ops = [dist.P2POp(dist.irecv, t, 0) for t in tensors]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over the ranks, in place; every rank gets the same bits."""
        dist.all_reduce(tensor)

    # -- rank 0's heartbeat ----------------------------------------------------------------

    def start_heartbeat(self) -> None:
        """Rank 0: send NOOP when idle so followers' waits stay within the timeout."""
        interval = max(0.05, self.timeout / 4)

        def beat() -> None:
            while not self._stopped.wait(interval / 2):
                if time.monotonic() - self.last_command < interval:
                    continue
                with self.command():
                    if self._stopped.is_set():
                        return
                    self.send_header(Header(Op.NOOP))

        threading.Thread(target=beat, name="gradstream-heartbeat", daemon=True).start()

    def stop_followers(self) -> None:
        """Rank 0: tell every other rank to return; no command may follow."""
        with self.command():
            self._stopped.set()
            self.send_header(Header(Op.STOP))

    def close(self) -> None:
        """Leave the process group."""
        self._stopped.set()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def fatal(exc: BaseException) -> None:
    """The group is broken: log why and exit at once, so the launcher restarts the job."""
    log.critical(
        "the process group failed (%s: %s); exiting with %d so the job restarts from its "
        "last checkpoint",
        type(exc).__name__,
        exc,
        EXIT_RESTART,
    )
    logging.shutdown()
    os._exit(EXIT_RESTART)


# -- the step every rank runs --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ShardOutcome:
    """What the step did; the same on every rank, because it is read from all-reduced values."""

    outcome: Outcome
    loss: float
    reason: str = ""


def train_shard(
    trainer: Trainer,
    rows: list[torch.Tensor] | None,
    divisor: float,
    group: Collectives,
    *,
    metrics: RankMetrics,
    pending_sends: list[Any] | None = None,
) -> ShardOutcome:
    """One batch's step on this rank's rows ``[x, y(, w)]`` (None: this rank has none)."""
    start = time.perf_counter()
    if trainer.pending == 0:
        trainer.optimizer.zero_grad(set_to_none=True)
    params = [p for p in trainer.module.parameters() if p.requires_grad]
    sizes = [p.numel() for p in params]
    dtype = params[0].dtype
    if rows is not None:
        x, y = rows[0], rows[1]
        weight = rows[2] if len(rows) > 2 else None
        loss = shard_loss(trainer.spec.loss, trainer.module(x), y, weight, divisor)
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
        metrics.rows.inc(x.shape[0])
    else:
        flat = torch.zeros(sum(sizes) + 1 + len(params), dtype=dtype, device=group.device)
    for work in pending_sends or ():  # rank 0 sent the other shards while it computed its own
        work.wait()
    reduce_start = time.perf_counter()
    group.all_reduce(flat)
    metrics.allreduce_duration.observe(time.perf_counter() - reduce_start)
    total = sum(sizes)
    loss_number, *used_flags = flat[total:].tolist()  # the step's one read of the host
    try:
        if not math.isfinite(loss_number):
            return ShardOutcome(Outcome.SKIPPED_NONFINITE, loss_number, "loss is not finite")
        for param, grad, used_flag in zip(
            params, torch.split(flat[:total], sizes), used_flags, strict=True
        ):
            if not used_flag:
                continue  # as backward leaves it: no gradient, so SGD leaves it alone
            if param.grad is None:
                param.grad = grad.view_as(param)
            else:
                param.grad.add_(grad.view_as(param))
        trainer.pending += 1
        if trainer.pending < trainer.spec.accumulate_steps:
            return ShardOutcome(Outcome.ACCUMULATED, loss_number)
        trainer.pending = 0
        if trainer._gradients_nonfinite():
            trainer.optimizer.zero_grad(set_to_none=True)
            return ShardOutcome(Outcome.SKIPPED_NONFINITE, loss_number, "gradient is not finite")
        trainer.optimizer.step()
        return ShardOutcome(Outcome.APPLIED, loss_number)
    finally:
        metrics.step_duration.observe(time.perf_counter() - start)


# -- state pushed from rank 0 --------------------------------------------------------------


def push_state(trainer: Trainer, group: Collectives) -> None:
    """Rank 0: make every other rank's copy of the model equal to this one."""
    params = list(trainer.module.parameters())
    optimizer_state: list[dict[str, Any]] = []
    for param in params:
        entry: dict[str, Any] = {}
        for key, value in trainer.optimizer.state.get(param, {}).items():
            entry[key] = (
                ("tensor", tuple(value.shape), str(value.dtype))
                if isinstance(value, torch.Tensor)
                else ("value", value)
            )
        optimizer_state.append(entry)
    meta = {
        "pending": trainer.pending,
        "requires_grad": [p.requires_grad for p in params],
        "has_grad": [p.grad is not None for p in params],
        "param_groups": [
            {k: v for k, v in g.items() if k != "params"} for g in trainer.optimizer.param_groups
        ],
        "optimizer_state": optimizer_state,
    }
    group.broadcast_object(meta)
    for param in params:
        group.broadcast(param.detach())
    for param in params:
        if param.grad is not None:
            group.broadcast(param.grad)
    for param in params:
        for value in trainer.optimizer.state.get(param, {}).values():
            if isinstance(value, torch.Tensor):
                group.broadcast(value)


def pull_state(trainer: Trainer, group: Collectives) -> None:
    """Other ranks: take the state ``push_state`` sends, in the same order."""
    meta = group.broadcast_object()
    params = list(trainer.module.parameters())
    with torch.no_grad():
        for param in params:
            group.broadcast(param.data)
    for param, has_grad in zip(params, meta["has_grad"], strict=True):
        if has_grad:
            grad = torch.empty_like(param)
            group.broadcast(grad)
            param.grad = grad
        else:
            param.grad = None
    trainer.optimizer.state.clear()
    for param, entry in zip(params, meta["optimizer_state"], strict=True):
        state: dict[str, Any] = {}
        for key, (kind, *rest) in entry.items():
            if kind == "tensor":
                shape, dtype = rest
                value = torch.empty(
                    shape, dtype=getattr(torch, dtype.removeprefix("torch.")), device=group.device
                )
                group.broadcast(value)
                state[key] = value
            else:
                state[key] = rest[0]
        if state:
            trainer.optimizer.state[param] = state
    for current, saved in zip(trainer.optimizer.param_groups, meta["param_groups"], strict=True):
        current.update(saved)
    for param, requires_grad in zip(params, meta["requires_grad"], strict=True):
        param.requires_grad_(requires_grad)
    trainer.pending = meta["pending"]


def _follower_spec(spec: ModelSpec) -> ModelSpec:
    # The parameters follow by broadcast, so the (possibly large) init tensors stay behind.
    return spec.model_copy(update={"init": InitSpec(kind="zeros")})


# -- rank 0 --------------------------------------------------------------------------------


class DistributedTrainer(Trainer):
    """Rank 0's trainer: the single-process ``Trainer``, with every change mirrored on all ranks.

    Reads (predict, gradients, parameters, info, checkpoints) stay local: every rank
    holds the same state, so rank 0's answer is the job's.
    """

    group: Collectives
    rank_metrics: RankMetrics
    model_id: int

    def __init__(
        self,
        name: str,
        spec: ModelSpec,
        device: torch.device,
        max_nonfinite_steps: int = 0,
        *,
        group: Collectives,
        rank_metrics: RankMetrics,
        max_batch_rows: int = 0,
        max_batch_bytes: int = 0,
        max_activation_bytes: int = 0,
    ) -> None:
        super().__init__(
            name,
            spec,
            device,
            max_nonfinite_steps,
            deferred=False,
            max_batch_rows=max_batch_rows,
            max_batch_bytes=max_batch_bytes,
            max_activation_bytes=max_activation_bytes,
        )
        self._join(group, rank_metrics)

    @classmethod
    def adopt(
        cls, trainer: Trainer, group: Collectives, rank_metrics: RankMetrics
    ) -> DistributedTrainer:
        """Take over a trainer built elsewhere (restored from a checkpoint) and replicate it."""
        adopted = cls.__new__(cls)
        adopted.__dict__.update(trainer.__dict__)
        adopted._join(group, rank_metrics)
        return adopted

    def _join(self, group: Collectives, rank_metrics: RankMetrics) -> None:
        # Every batch goes through train() below: a trainer that defers its outcomes to
        # the end of a message (the single-process CUDA path) would bypass it.
        self.deferred = False
        self.group = group
        self.rank_metrics = rank_metrics
        self.model_id = group.new_model_id()
        with group.command():
            group.send_header(Header(Op.CREATE, self.model_id))
            group.broadcast_object((self.name, _follower_spec(self.spec), self.step))
            push_state(self, group)

    def release(self) -> None:
        """Drop the other ranks' copies (the model was deleted)."""
        with self.group.command():
            self.group.send_header(Header(Op.DELETE, self.model_id))

    def train(self, batch: Batch, options: TrainOptions) -> StepResult:
        """``Trainer.train`` with the rows split over the ranks; the result is the same."""
        if not any(p.requires_grad for p in self._params.values()):
            raise FailedPrecondition(f"model {self.name!r} has no trainable parameters")
        sequence, answered = self._admit(batch, options)
        if answered is not None:
            return answered
        tensors = [batch.x, batch.y] if batch.weight is None else [batch.x, batch.y, batch.weight]
        tensors = [t.to(self.device, non_blocking=True) for t in tensors]
        rows = tensors[0].shape[0]
        sizes = shard_sizes(rows, self.group.world_size)
        # From the host copy: no device sync, and the same sum on every device type.
        divisor = denominator(self.spec.loss, batch.y, batch.weight)
        with self.group.command():
            self.group.send_header(
                Header(Op.TRAIN, self.model_id, rows, batch.weight is not None, divisor)
            )
            sends = self.group.send_rows(tensors, sizes)
            own = [t[: sizes[0]] for t in tensors]
            done = train_shard(
                self, own, divisor, self.group, metrics=self.rank_metrics, pending_sends=sends
            )
        report = options.batches_seen % options.report_every == 0
        if done.outcome is Outcome.SKIPPED_NONFINITE:
            return self._skipped(sequence, done.loss, done.reason)
        loss = done.loss if report else None
        if done.outcome is Outcome.ACCUMULATED:
            return StepResult(sequence, self.step, Outcome.ACCUMULATED, loss)
        self.step += 1
        self.nonfinite_streak = 0
        self.last_loss = done.loss
        return StepResult(sequence, self.step, Outcome.APPLIED, loss)

    def set_parameters(self, values: dict[str, torch.Tensor], reset_optimizer: bool) -> None:
        """Set on rank 0 (which validates), then push the result to every rank."""
        super().set_parameters(values, reset_optimizer)
        self._sync()

    def update(self, lr: float | None, freeze: tuple[str, ...], unfreeze: tuple[str, ...]) -> None:
        """Update on rank 0 (which validates), then push the result to every rank."""
        super().update(lr, freeze, unfreeze)
        self._sync()

    def _sync(self) -> None:
        with self.group.command():
            self.group.send_header(Header(Op.SYNC, self.model_id))
            push_state(self, self.group)


class DistributedRegistry(ModelRegistry):
    """Rank 0's models: each one created, restored and deleted on every rank."""

    def __init__(self, *args: Any, group: Collectives, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group = group
        # Beside the server's metrics, on its port.
        self.rank_metrics = RankMetrics(self.metrics.registry, group.rank, group.world_size)
        self.trainer_type = functools.partial(
            DistributedTrainer, group=group, rank_metrics=self.rank_metrics
        )

    def adopt(self, trainer: Trainer) -> None:
        """A model restored from a checkpoint on rank 0: every other rank gets its state."""
        super().adopt(DistributedTrainer.adopt(trainer, self.group, self.rank_metrics))

    async def delete(self, name: str) -> None:
        """Delete on rank 0, then on every other rank."""
        worker = self._workers.get(name)
        await super().delete(name)
        if worker is not None and isinstance(worker.trainer, DistributedTrainer):
            await asyncio.to_thread(worker.trainer.release)


class RankZeroServer(Server):
    """The gRPC server of rank 0; its models train on every rank."""

    def __init__(self, settings: Settings, group: Collectives) -> None:
        self.group = group
        self.registry_type = functools.partial(DistributedRegistry, group=group)
        super().__init__(settings)

    async def start(self) -> None:
        """Serve, and keep the followers' waits bounded while idle."""
        await super().start()
        self.group.start_heartbeat()

    async def stop(self) -> None:
        """Drain as a single server does, then release the other ranks."""
        await super().stop()
        await asyncio.to_thread(self.group.stop_followers)


# -- the other ranks -----------------------------------------------------------------------


class Follower:
    """A rank other than 0: replays rank 0's commands on its own copies of the models."""

    def __init__(self, settings: Settings, group: Collectives) -> None:
        self.settings = settings
        self.group = group
        self.device = group.device
        self.trainers: dict[int, Trainer] = {}
        self.registry = CollectorRegistry()
        self.metrics = RankMetrics(self.registry, group.rank, group.world_size)

    def run(self) -> None:
        """Serve metrics and health, then follow until STOP (or fail fast)."""
        stop_endpoints = self._start_endpoints()
        try:
            with self.group.command():
                while self._follow_one():
                    pass
        finally:
            stop_endpoints()
        log.info("rank %d stopped", self.group.rank)

    def _follow_one(self) -> bool:
        header = self.group.receive_header()
        match header.op:
            case Op.NOOP:
                pass
            case Op.CREATE:
                name, spec, step = self.group.broadcast_object()
                trainer = Trainer(name, spec, self.device)
                pull_state(trainer, self.group)
                self.trainers[header.model] = trainer
                log.info("rank %d has model %r at step %d", self.group.rank, name, step)
            case Op.SYNC:
                pull_state(self.trainers[header.model], self.group)
            case Op.TRAIN:
                self._train(self.trainers[header.model], header)
            case Op.DELETE:
                del self.trainers[header.model]
            case Op.STOP:
                return False
        return True

    def _train(self, trainer: Trainer, header: Header) -> None:
        rows = shard_sizes(header.rows, self.group.world_size)[self.group.rank]
        if not rows:
            train_shard(trainer, None, header.denominator, self.group, metrics=self.metrics)
            return
        arch, dtype = trainer.spec.architecture, DTYPES[trainer.spec.dtype]
        x = torch.empty(rows, arch.in_features, dtype=dtype, device=self.device)
        y = (
            torch.empty(rows, dtype=torch.int64, device=self.device)
            if trainer.spec.loss.kind == "cross_entropy"
            else torch.empty(rows, arch.out_features, dtype=dtype, device=self.device)
        )
        tensors = [x, y]
        if header.weighted:
            tensors.append(torch.empty(rows, dtype=dtype, device=self.device))
        self.group.receive_rows(tensors)
        train_shard(trainer, tensors, header.denominator, self.group, metrics=self.metrics)

    def _start_endpoints(self) -> Callable[[], None]:
        """Metrics and gRPC health on the configured ports plus LOCAL_RANK (0: free ports)."""
        s, offset = self.settings, self.group.topology.local_rank
        closers: list[Callable[[], None]] = []
        ports: dict[str, int] = {"metrics_port": -1, "health_port": -1}
        host = s.host
        if s.metrics_port >= 0:
            http, _ = start_http_server(
                s.metrics_port and s.metrics_port + offset,
                addr=s.metrics_host,
                registry=self.registry,
            )
            ports["metrics_port"] = http.server_port
            closers.append(http.shutdown)
        if s.health_port >= 0:
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
            servicer = health.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
            ports["health_port"] = server.add_insecure_port(
                f"{host}:{s.health_port and s.health_port + offset}"
            )
            server.start()
            servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            closers.append(lambda: _ignore(server.stop(0).wait()))
        if s.ready_file is not None:
            _write_ready(
                rank_ready_file(s.ready_file, self.group.rank),
                {**ports, "pid": os.getpid(), "rank": self.group.rank},
            )

        def close() -> None:
            for closer in closers:
                closer()

        return close


def _ignore(_: object) -> None:
    pass


def rank_ready_file(ready_file: Path, rank: int) -> Path:
    """Where a rank other than 0 writes its ports: beside rank 0's ready file."""
    return ready_file.with_name(f"{ready_file.name}.rank{rank}")


def _write_ready(path: Path, content: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content))
    tmp.replace(path)


# -- entry point ---------------------------------------------------------------------------


def rank_device(settings: Settings, topology: Topology) -> torch.device:
    """The settings' device, with CUDA pinned to this process's LOCAL_RANK."""
    device = resolve_device(settings.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", topology.local_rank)
    return device


Serve = Callable[[Settings, Callable[[Settings], Server]], None]


def run(settings: Settings, serve: Serve) -> None:
    """Join the process group; rank 0 serves via ``serve``, the others follow."""
    topology = Topology.from_env()
    device = rank_device(settings, topology)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    group = Collectives(topology, device, settings.collective_timeout)
    try:
        if topology.rank == 0:
            serve(
                settings.model_copy(update={"device": str(device)}),
                functools.partial(RankZeroServer, group=group),
            )
        else:
            # A follower ends when rank 0 says STOP or the group breaks, not on the
            # launcher's SIGTERM: rank 0 may still need it to finish a drain.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            Follower(settings, group).run()
    finally:
        group.close()
