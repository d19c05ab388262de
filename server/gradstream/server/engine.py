"""One model being trained: the seed notebook's loop, made a service.

Each ``Trainer`` owns its module, loss and optimizer on one device. Its methods
are not thread-safe: the model's worker (``worker.py``) is the only caller, so
steps are serialized without locks.
"""

from __future__ import annotations

import collections
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, TypedDict

import torch

from gradstream.server.batches import Batch, BatchChecker
from gradstream.server.errors import FailedPrecondition, GradstreamError, InvalidArgument
from gradstream.server.models import (
    build_module,
    example_inputs,
    forward_function,
    loss_function,
    loss_value,
)
from gradstream.server.optim import (
    build_optimizer,
    build_schedule,
    current_lr,
    gradient_clip,
    load_schedule_state,
    schedule_state,
    set_lr,
)
from gradstream.server.snapshot import Snapshots
from gradstream.server.spec import InputSpec, ModelSpec, OptimizerSpec, RMSpropSpec, SGDSpec

# Nodes of the loss's autograd graph that GetModel lists at most.
MAX_CHAIN_NODES = 1024


def _engine_backward() -> Callable[[torch.Tensor, torch.Tensor], None]:
    """``torch.autograd.backward(loss, seed)`` for a scalar loss, minus its argument handling.

    The wrapper normalizes and re-checks its arguments in Python on every call, a cost
    of the same order as a small model's step (docs/performance.md); the engine call it
    ends in is made directly, with the arguments it would pass. The
    engine does not check the seed against the loss, so callers pass what the Trainer
    builds: a scalar loss and a scalar seed of its dtype. Falls back to the public call if
    a torch release moves the engine or changes the call (tried once, here, on a probe).
    """
    engine = getattr(torch.autograd.Variable, "_execution_engine", None)
    run = getattr(engine, "run_backward", None)
    if run is None:
        return torch.autograd.backward

    def backward(loss: torch.Tensor, seed: torch.Tensor) -> None:
        run((loss,), (seed,), False, False, (), allow_unreachable=True, accumulate_grad=True)

    probe = torch.ones((), requires_grad=True)
    try:
        with torch.enable_grad():
            backward(probe * 2.0, torch.ones(()))
    except (TypeError, RuntimeError):
        return torch.autograd.backward
    return (
        backward if probe.grad is not None and probe.grad.item() == 2.0 else torch.autograd.backward
    )


_backward = _engine_backward()


def _plain_sgd(spec: OptimizerSpec) -> bool:
    """SGD whose step is ``param -= lr * grad`` and nothing else."""
    return (
        isinstance(spec, SGDSpec)
        and spec.momentum == 0
        and spec.weight_decay == 0
        and not spec.maximize
        and not spec.differentiable
        and not spec.fused
        and not spec.foreach
    )


class Outcome(StrEnum):
    """What one batch did to the model."""

    APPLIED = "APPLIED"
    ACCUMULATED = "ACCUMULATED"
    SKIPPED_NONFINITE = "SKIPPED_NONFINITE"
    DUPLICATE = "DUPLICATE"
    REJECTED = "REJECTED"


@dataclass(frozen=True, slots=True)
class StepResult:
    """The outcome of one batch; ``loss`` is None when it was not read back from the device."""

    sequence: int
    step: int
    outcome: Outcome
    loss: float | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ParameterInfo:
    """Name, shape and frozen state of one parameter."""

    name: str
    shape: tuple[int, ...]
    frozen: bool


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A snapshot of a model's state for GetModel and friends."""

    name: str
    spec: ModelSpec
    step: int
    pending_batches: int
    device: str
    parameters: tuple[ParameterInfo, ...]
    autograd_chain: tuple[str, ...]
    nonfinite_streak: int
    lr: float = 0.0  # what the next step uses: the schedule's current value
    inputs: tuple[InputSpec, ...] = ()  # what every batch must carry, in declaration order


@dataclass(slots=True)
class TrainOptions:
    """Per-stream choices: who is producing and how often to read the loss back."""

    producer_id: str = ""
    report_every: int = 1
    batches_seen: int = field(default=0)


@dataclass(slots=True)
class _Deferred:
    """A batch of a deferred message whose outcome waits for the end-of-message read."""

    outcome: Outcome  # the outcome if everything turns out finite
    sequence: int
    index: int  # position in the stream, for report_every
    loss: torch.Tensor | None = None
    bad: torch.Tensor | None = None  # the step's found_inf, on the batch that ends a step


class StepKind(StrEnum):
    """How a trainer's optimizer step runs: chosen once, by ``step_kind``."""

    PLAIN_SGD = "plain_sgd"  # ``param.add_(grad, alpha=-lr)``: SGD's own CPU arithmetic, inline
    OPTIMIZER = "optimizer"  # the optimizer's step, without its profiling wrappers
    DEFERRED = "deferred"  # fused on the device; outcomes read once per request message


def step_kind(spec: ModelSpec, device: torch.device, deferred: bool | None) -> StepKind:
    """The one switch between the step's implementations, as ``torch.optim.sgd`` has one.

    ``deferred`` None decides by device: off the CPU, outcomes are read back once per request
    message instead of once per batch (see ``Trainer.train_batches``); that needs a fused
    kernel, which can skip a step on the device (RMSprop has none), and no schedule, whose
    next lr depends on whether the step applied. On the CPU a read costs nothing and the
    exact path is kept. Data-parallel ranks pass False: every rank must step the same way.
    A schedule steps the optimizer through its wrapper (``OPTIMIZER``).
    """
    optimizer = spec.optimizer
    if deferred is None:
        deferred = device.type != "cpu" and optimizer.foreach is not True
    fused = not isinstance(optimizer, RMSpropSpec)
    if deferred and fused and not optimizer.differentiable and spec.schedule is None:
        return StepKind.DEFERRED
    if device.type == "cpu" and _plain_sgd(optimizer) and spec.schedule is None:
        return StepKind.PLAIN_SGD
    return StepKind.OPTIMIZER


class GradientSource(Protocol):
    """Where a batch's gradients come from: this process, or every rank's share of the rows."""

    def accumulate(self, trainer: Trainer, batch: Batch) -> float:
        """Add the batch's gradients to ``.grad`` unless its loss is not finite; return the loss."""
        ...

    def state_changed(self, trainer: Trainer) -> None:
        """The trainer's state was set from outside a step (parameters, lr, freezing)."""
        ...

    def close(self, trainer: Trainer) -> None:
        """The model is deleted."""
        ...


class LocalGradients:
    """forward -> loss -> backward on the whole batch, in this process."""

    def accumulate(self, trainer: Trainer, batch: Batch) -> float:
        """The seed's ``loss_fn(model(x), y).backward()``, with the loss checked first."""
        x, y, w, more = batch.x, batch.y, batch.weight, batch.more
        if not trainer._on_cpu:
            x = x.to(trainer.device, non_blocking=True)
            y = y.to(trainer.device, non_blocking=True)
            w = None if w is None else w.to(trainer.device, non_blocking=True)
            more = tuple(t.to(trainer.device, non_blocking=True) for t in more)
        # The inputs in declaration order; a one-input model's call stays a plain one.
        output = trainer._forward(x, *more) if more else trainer._forward(x)
        loss = trainer._loss(output, y, w)
        # The loss is checked before backward so a bad batch adds nothing to the
        # gradients already accumulated; what is still pending stays pending.
        loss_number = loss.item()
        if math.isfinite(loss_number):
            _backward(loss, trainer._grad_seed)
        return loss_number

    def state_changed(self, trainer: Trainer) -> None:
        """Nothing else holds a copy."""

    def close(self, trainer: Trainer) -> None:
        """Nothing else holds a copy."""


class TrainerState(TypedDict):
    """A trainer's whole state between two steps: what checkpoints save and ranks copy.

    ``tensors`` are the live tensors (detached, not copied), keyed ``param/<name>``,
    ``grad/<name>`` (only while a step is being accumulated) and ``optim/<name>/<key>``.
    """

    tensors: dict[str, torch.Tensor]
    step: int
    pending: int
    nonfinite_streak: int
    producers: dict[str, int]
    frozen: list[str]
    param_groups: list[dict[str, Any]]  # optimizer hyperparameters, without the params
    optimizer_scalars: dict[str, dict[str, Any]]  # non-tensor optimizer state per parameter
    schedule: list[dict[str, Any]] | None  # the lr schedule's progress (optim.schedule_state)


_Scalar = int | float | bool | str | None


@dataclass(frozen=True, slots=True)
class TrainerFactory:
    """Builds every trainer of a process: new models, restored ones, other ranks' copies.

    The limits and the step implementation are decided here once, so a model keeps them
    across a restart and every rank of a data-parallel job steps the same way.
    """

    device: torch.device
    max_nonfinite_steps: int = 0
    max_batch_rows: int = 0
    max_batch_bytes: int = 0
    max_activation_bytes: int = 0
    deferred: bool | None = None  # see step_kind; data-parallel ranks: False
    gradients: Callable[[Trainer], GradientSource] = lambda _: LocalGradients()

    def step_kind(self, spec: ModelSpec) -> StepKind:
        """How trainers of ``spec`` built here step (nothing is built)."""
        return step_kind(spec, self.device, self.deferred)

    def build(self, name: str, spec: ModelSpec, state: TrainerState | None = None) -> Trainer:
        """A trainer of ``spec``, in ``state`` when given (a checkpoint, rank 0's copy)."""
        trainer = Trainer(
            name,
            spec,
            self.device,
            self.max_nonfinite_steps,
            self.deferred,
            max_batch_rows=self.max_batch_rows,
            max_batch_bytes=self.max_batch_bytes,
            max_activation_bytes=self.max_activation_bytes,
        )
        if state is not None:
            trainer.load_state_dict(state)
        # Last: a source that replicates the model copies the state it now has.
        trainer.source = self.gradients(trainer)
        return trainer


class Trainer:
    """Parameters, gradients and optimizer state of one model, resident on ``device``."""

    def __init__(
        self,
        name: str,
        spec: ModelSpec,
        device: torch.device,
        max_nonfinite_steps: int = 0,
        deferred: bool | None = None,
        *,
        max_batch_rows: int = 0,
        max_batch_bytes: int = 0,
        max_activation_bytes: int = 0,
    ) -> None:
        self.name = name
        self.spec = spec
        self.device = device
        self.module = build_module(spec, device)
        self._forward = forward_function(self.module)
        self.kind = step_kind(spec, device, deferred)
        optimizer_spec = spec.optimizer
        if (
            self.kind is StepKind.DEFERRED
            and not isinstance(optimizer_spec, RMSpropSpec)
            and optimizer_spec.fused is None
        ):
            optimizer_spec = optimizer_spec.model_copy(update={"fused": True})
        self.optimizer = build_optimizer(optimizer_spec, self.module)
        self.checker = BatchChecker(spec, max_batch_rows, max_batch_bytes, max_activation_bytes)
        self.source: GradientSource = LocalGradients()
        self.step = 0
        self.pending = 0  # batches whose gradients are accumulated towards the next step
        self.nonfinite_streak = 0
        self.max_nonfinite_steps = max_nonfinite_steps
        self.producers: dict[str, int] = {}  # producer_id -> last applied sequence
        self._params = dict(self.module.named_parameters())
        self._param_list = list(self._params.values())
        self._on_cpu = device.type == "cpu"
        self._loss = loss_function(spec.loss)
        dtype = self._param_list[0].dtype if self._param_list else torch.float32
        # backward()'s implicit seed, made once instead of on every step.
        self._grad_seed = torch.ones((), device=device, dtype=dtype)
        # The optimizer's step without its profiling and hook wrappers (the same math, bit
        # for bit); the wrappers' one duty that matters, no_grad, is done by apply().
        self._raw_step = (
            self.optimizer.step
            if spec.optimizer.differentiable
            else inspect.unwrap(type(self.optimizer).step).__get__(self.optimizer)
        )
        if self.kind is StepKind.PLAIN_SGD:
            self._raw_step = self._plain_sgd_step
        # Stepped once per applied step, after the optimizer; building it sets step 1's lr.
        self.schedule = build_schedule(spec.schedule, self.optimizer)
        if self.schedule is not None:
            # The schedule wraps optimizer.step to check it ran first: call the wrapper.
            self._raw_step = self.optimizer.step
        self._clip = gradient_clip(spec.clip_grad)
        # Total gradient norm before clipping, of the last applied step (None: no clipping).
        self.grad_norm: torch.Tensor | None = None
        # found_inf is filled on the device by one fused kernel for all gradients.
        self._found_inf = torch.zeros(1, device=device)
        # The deferred path's found_inf for this step: a scalar, as fused Adam, AdamW and
        # Adagrad subtract it from their scalar step counts (shape (1,) does not broadcast there).
        self._step_bad = torch.zeros((), device=device)
        self._one = torch.ones((), device=device)
        self.last_loss: float | None = None  # of the last applied step, for metrics
        # Copies of the parameters for Predict off the worker, made on demand (snapshot.py).
        self.snapshots = Snapshots(self.module, device, lambda: self.step)

    @property
    def deferred(self) -> bool:
        """Whether outcomes are read back once per request message (``StepKind.DEFERRED``)."""
        return self.kind is StepKind.DEFERRED

    # -- training: admit -> gradients (local or sharded) -> finite check -> step -> outcome --

    def train_batches(
        self,
        items: Sequence[Batch],
        options: TrainOptions,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> tuple[list[StepResult], GradstreamError | None]:
        """The batches of one request message, in order; stops early if ``cancelled()``.

        Returns the results so far and the error that stopped it, if one did.
        """
        if self.kind is StepKind.DEFERRED:
            return self._train_deferred(items, options, cancelled)
        results: list[StepResult] = []
        for item in items:
            if cancelled():
                break
            try:
                results.append(self.train(item, options))
            except GradstreamError as exc:
                return results, exc
        return results, None

    def _is_duplicate(self, batch: Batch, options: TrainOptions) -> bool:
        """A producer re-sent a sequence it was already answered for."""
        last = self.producers.get(options.producer_id, 0) if options.producer_id else 0
        return bool(batch.sequence) and batch.sequence <= last

    def _check_diverged(self) -> None:
        if self.max_nonfinite_steps and self.nonfinite_streak >= self.max_nonfinite_steps:
            raise FailedPrecondition(
                f"model {self.name!r} diverged: {self.nonfinite_streak} non-finite steps in a row; "
                "set its parameters to train it again"
            )

    def _admit(self, batch: Batch, options: TrainOptions) -> tuple[int, StepResult | None]:
        """Count the batch in its stream; answer a re-sent one DUPLICATE; refuse if diverged.

        Returns the batch's sequence, and its result when it is not to be trained.
        """
        options.batches_seen += 1
        sequence = batch.sequence or options.batches_seen
        if self._is_duplicate(batch, options):
            return sequence, StepResult(sequence, self.step, Outcome.DUPLICATE)
        self._check_diverged()
        # Marked before the step: a batch whose loss is skipped as non-finite is still
        # done with, and a re-send of it is a DUPLICATE.
        self._mark(options.producer_id, batch.sequence)
        return sequence, None

    def train(self, batch: Batch, options: TrainOptions) -> StepResult:
        """One batch: admit, then ``apply``: forward -> loss -> backward -> step (every k)."""
        if not any(p.requires_grad for p in self._param_list):
            raise FailedPrecondition(f"model {self.name!r} has no trainable parameters")
        sequence, done = self._admit(batch, options)
        if done is not None:
            return done
        outcome, loss, reason = self.apply(batch)
        report = options.batches_seen % options.report_every == 0
        if outcome is Outcome.SKIPPED_NONFINITE:
            return StepResult(sequence, self.step, outcome, loss, reason)
        return StepResult(sequence, self.step, outcome, loss if report else None)

    def apply(self, batch: Batch) -> tuple[Outcome, float, str]:
        """An admitted batch's gradients into the model: the part every rank runs alike.

        Returns the outcome, the loss and, for a skipped batch, why.
        """
        if self.pending == 0:
            # zero_grad(set_to_none=True), without Optimizer.zero_grad's profiler scaffolding.
            for p in self._param_list:
                p.grad = None
        if self.snapshots.buffers_change:
            self.snapshots.changed()
        loss = self.source.accumulate(self, batch)
        if not math.isfinite(loss):
            self.nonfinite_streak += 1
            return Outcome.SKIPPED_NONFINITE, loss, "loss is not finite"
        self.pending += 1
        if self.pending < self.spec.accumulate_steps:
            return Outcome.ACCUMULATED, loss, ""
        self.pending = 0
        if self._gradients_nonfinite():
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_streak += 1
            return Outcome.SKIPPED_NONFINITE, loss, "gradient is not finite"
        # torch.no_grad()'s two calls, without building the context manager each step.
        enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            # Clipping: after the last micro-batch's backward, before the step.
            if self._clip is not None:
                self.grad_norm = self._clip(self._param_list)
            self._raw_step()
        finally:
            torch._C._set_grad_enabled(enabled)
        # The schedule steps once per applied step, on every path (no schedule is DEFERRED).
        if self.schedule is not None:
            self.schedule.step()
        self.step += 1
        self.nonfinite_streak = 0
        self.last_loss = loss
        # A step boundary: a waiting prediction gets this step's parameters now, not at
        # the end of the message (deferred steps: at the job's end, after _resolve).
        self.snapshots.changed()
        self.snapshots.publish_if_wanted()
        return Outcome.APPLIED, loss, ""

    def _plain_sgd_step(self) -> None:
        """SGD.step's arithmetic when momentum, weight decay and maximize are off.

        ``param.add_(grad, alpha=-lr)`` per parameter with a gradient, as its single-tensor
        path does on the CPU: the same result, bit for bit, without gathering lists and
        choosing an implementation on every step (docs/performance.md). lr is read each
        step: UpdateModel and restore set it in the group.
        """
        lr = self.optimizer.param_groups[0]["lr"]
        for p in self._param_list:
            if p.grad is not None:
                p.add_(p.grad, alpha=-lr)

    def stage(self, batch: Batch) -> Batch:
        """Copy a batch into pinned host memory so its move to the GPU is asynchronous.

        Runs on the request handler's thread, overlapping the device's work on earlier batches.
        """
        if self._on_cpu:
            return batch

        def pinned(t: torch.Tensor) -> torch.Tensor:
            staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            return staged.copy_(t)

        weight = None if batch.weight is None else pinned(batch.weight)
        more = tuple(pinned(t) for t in batch.more)
        return Batch(pinned(batch.x), pinned(batch.y), weight, batch.sequence, more)

    def _train_deferred(
        self,
        items: Sequence[Batch],
        options: TrainOptions,
        cancelled: Callable[[], bool],
    ) -> tuple[list[StepResult], GradstreamError | None]:
        """The steps of a message without a host-device sync until its end.

        Losses and "something was not finite" flags stay on the device; a non-finite
        loss contributes a zero gradient, and any non-finite loss or gradient in an
        accumulated step makes the fused SGD kernel skip that whole step (``found_inf``),
        leaving parameters and momentum untouched. One read at the end turns the flags
        into outcomes.
        """
        try:
            self._check_diverged()
        except GradstreamError as exc:
            return [], exc
        k = self.spec.accumulate_steps
        pending: list[_Deferred] = []
        for item in items:
            if cancelled():
                break
            options.batches_seen += 1
            index = options.batches_seen
            sequence = item.sequence or index
            if self._is_duplicate(item, options):
                pending.append(_Deferred(Outcome.DUPLICATE, sequence, index))
                continue
            self._mark(options.producer_id, item.sequence)
            if self.pending == 0:
                for p in self._param_list:
                    p.grad = None
                self._step_bad = torch.zeros((), device=self.device)
            x = item.x.to(self.device, non_blocking=True)
            y = item.y.to(self.device, non_blocking=True)
            w = None if item.weight is None else item.weight.to(self.device, non_blocking=True)
            more = tuple(t.to(self.device, non_blocking=True) for t in item.more)
            loss = self._loss(self._forward(x, *more), y, w)
            finite = torch.isfinite(loss)
            self._step_bad.add_(~finite)
            _backward(torch.where(finite, loss, 0.0), self._grad_seed)
            self.pending += 1
            if self.pending < k:
                pending.append(_Deferred(Outcome.ACCUMULATED, sequence, index, loss.detach()))
                continue
            self.pending = 0
            grads = [p.grad for p in self._param_list if p.grad is not None]
            if grads:
                torch._amp_foreach_non_finite_check_and_unscale_(grads, self._step_bad, self._one)
            if self._clip is not None:  # a non-finite step is skipped whatever clipping did
                with torch.no_grad():
                    self.grad_norm = self._clip(self._param_list)
            self._fused_step(self._step_bad)
            pending.append(
                _Deferred(Outcome.APPLIED, sequence, index, loss.detach(), self._step_bad)
            )
        return self._resolve(pending, options.report_every), None

    def _fused_step(self, found_inf: torch.Tensor) -> None:
        # A skipped first step would leave the momentum buffers the fused kernel just
        # created uninitialized, so the very first step is decided on the host.
        sgd = self.spec.optimizer
        first = not self.optimizer.state and isinstance(sgd, SGDSpec) and sgd.momentum != 0
        if first and bool(found_inf.item()):
            return
        self.optimizer.found_inf = found_inf  # type: ignore[attr-defined]
        with torch.no_grad():
            self._raw_step()

    def _resolve(self, pending: list[_Deferred], report_every: int) -> list[StepResult]:
        """The one host read of a deferred message: losses and flags become outcomes."""
        tensors = [t for d in pending for t in (d.loss, d.bad) if t is not None]
        # The fused kernel may have written the parameters, applied or not.
        self.snapshots.changed()
        # Nothing to read when every batch was a DUPLICATE (a producer's re-send) or none ran.
        read = torch.stack([t.double().reshape(()) for t in tensors]).tolist() if tensors else []
        values = iter(read)
        results = []
        for d in pending:
            if d.loss is None:
                results.append(StepResult(d.sequence, self.step, d.outcome))
                continue
            loss = next(values)
            shown = loss if d.index % report_every == 0 else None
            if d.outcome is Outcome.ACCUMULATED:
                if math.isfinite(loss):
                    results.append(StepResult(d.sequence, self.step, Outcome.ACCUMULATED, shown))
                else:
                    results.append(self._skipped(d.sequence, loss, "loss is not finite"))
                continue
            if next(values):
                finite = math.isfinite(loss)
                reason = "gradient is not finite" if finite else "loss is not finite"
                results.append(self._skipped(d.sequence, loss, reason))
                continue
            self.step += 1
            self.nonfinite_streak = 0
            self.last_loss = loss
            results.append(StepResult(d.sequence, self.step, Outcome.APPLIED, shown))
        return results

    def _skipped(self, sequence: int, loss: float, reason: str) -> StepResult:
        self.nonfinite_streak += 1
        return StepResult(sequence, self.step, Outcome.SKIPPED_NONFINITE, loss, reason)

    def _mark(self, producer_id: str, sequence: int) -> None:
        if producer_id and sequence:
            self.producers[producer_id] = sequence

    def _gradients_nonfinite(self) -> bool:
        grads = [p.grad for p in self._params.values() if p.grad is not None]
        if not grads:
            return False
        self._found_inf.zero_()
        # Multiplying by exactly 1.0 leaves every finite gradient bit-for-bit as it was.
        torch._amp_foreach_non_finite_check_and_unscale_(grads, self._found_inf, self._one)
        return bool(self._found_inf.item())

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> TrainerState:
        """The state a checkpoint saves and rank 0 copies to the other ranks (not copied here)."""
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, dict[str, Any]] = {}
        for name, param in self._params.items():
            tensors[f"param/{name}"] = param.detach()
            if self.pending and param.grad is not None:
                tensors[f"grad/{name}"] = param.grad.detach()
            for key, value in self.optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim/{name}/{key}"] = value.detach()
                elif isinstance(value, _Scalar):
                    scalars.setdefault(name, {})[key] = value
                else:
                    raise TypeError(f"optimizer state {name}.{key} is a {type(value).__name__}")
        return TrainerState(
            tensors=tensors,
            step=self.step,
            pending=self.pending,
            nonfinite_streak=self.nonfinite_streak,
            producers=dict(self.producers),
            frozen=[n for n, p in self._params.items() if not p.requires_grad],
            param_groups=[
                {k: v for k, v in group.items() if k != "params" and isinstance(v, _Scalar)}
                for group in self.optimizer.param_groups
            ],
            optimizer_scalars=scalars,
            schedule=None if self.schedule is None else schedule_state(self.schedule),
        )

    def load_state_dict(self, state: TrainerState) -> None:
        """Take ``state`` (copied onto this trainer's device); ValueError if it does not fit."""
        tensors = state["tensors"]
        saved = {k.removeprefix("param/") for k in tensors if k.startswith("param/")}
        if saved != set(self._params):
            raise ValueError(
                f"it holds parameters {sorted(saved)}, the spec builds {sorted(self._params)}"
            )
        for name, param in self._params.items():
            for prefix in ("param/", "grad/"):
                value = tensors.get(prefix + name)
                if value is not None and (value.shape != param.shape or value.dtype != param.dtype):
                    raise ValueError(
                        f"{prefix}{name} is {value.dtype} {list(value.shape)}, "
                        f"the model has {param.dtype} {list(param.shape)}"
                    )
        with torch.no_grad():
            for name, param in self._params.items():
                param.copy_(tensors[f"param/{name}"])
        for name, param in self._params.items():
            grad = tensors.get(f"grad/{name}") if state["pending"] else None
            param.grad = None if grad is None else grad.to(self.device, copy=True)
        self.optimizer.state.clear()
        for name, param in self._params.items():
            optimizer_state: dict[str, Any] = dict(state["optimizer_scalars"].get(name, {}))
            prefix = f"optim/{name}/"
            for key, value in tensors.items():
                if key.startswith(prefix):
                    optimizer_state[key.removeprefix(prefix)] = value.to(self.device, copy=True)
            if optimizer_state:
                self.optimizer.state[param] = optimizer_state
        for group, saved_group in zip(
            self.optimizer.param_groups, state["param_groups"], strict=False
        ):
            for key, value in saved_group.items():
                if key in group:
                    group[key] = value
        if self.schedule is not None:
            try:
                load_schedule_state(self.schedule, state.get("schedule") or [])
            except ValueError as exc:
                raise ValueError(f"its schedule state does not fit the spec: {exc}") from None
        frozen = set(state["frozen"])
        for name, param in self._params.items():
            param.requires_grad_(name not in frozen)
        self.step = state["step"]
        self.pending = state["pending"]
        self.nonfinite_streak = state["nonfinite_streak"]
        self.producers = dict(state["producers"])
        self.snapshots.changed()

    def close(self) -> None:
        """The model is deleted: whatever else holds a copy of it lets it go."""
        self.source.close(self)

    # -- inspection and inference --------------------------------------------------------

    def predict(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The model's output on its inputs (declaration order) in inference mode, detached."""
        with torch.inference_mode():
            output: torch.Tensor = self.module(*(t.to(self.device) for t in inputs))
            return output.detach()

    def gradients(
        self,
        x: torch.Tensor | tuple[torch.Tensor, ...],
        y: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        grad_output: torch.Tensor | None = None,
    ) -> tuple[dict[str, torch.Tensor], float | None]:
        """d loss / d theta, or the vector-Jacobian product v^T (d output / d theta).

        ``x`` is the input, or every input in declaration order. ``torch.autograd.grad``
        leaves every ``.grad`` alone: nothing accumulates, nothing steps.
        """
        trainable = {n: p for n, p in self._params.items() if p.requires_grad}
        if not trainable:
            raise FailedPrecondition(f"model {self.name!r} has no trainable parameters")
        inputs = x if isinstance(x, tuple) else (x,)
        output = self.module(*(t.to(self.device) for t in inputs))
        if grad_output is not None:
            if grad_output.shape != output.shape:
                raise InvalidArgument(
                    "grad_output",
                    f"has shape {list(grad_output.shape)}, the output has {list(output.shape)}",
                )
            root, vector, loss = output, grad_output.to(self.device, output.dtype), None
        else:
            assert y is not None
            root = loss_value(
                self.spec.loss,
                output,
                y.to(self.device),
                None if weight is None else weight.to(self.device),
            )
            vector, loss = None, root.item()
        grads = torch.autograd.grad(
            root, list(trainable.values()), grad_outputs=vector, allow_unused=True
        )
        return {
            n: torch.zeros_like(p) if g is None else g
            for (n, p), g in zip(trainable.items(), grads, strict=True)
        }, loss

    def parameters(
        self, include_gradients: bool = False
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Detached copies of the parameters and, if asked, of the gradients set now."""
        params = {n: p.detach().clone() for n, p in self._params.items()}
        grads = {}
        if include_gradients:
            grads = {
                n: p.grad.detach().clone() for n, p in self._params.items() if p.grad is not None
            }
        return params, grads

    def set_parameters(self, values: dict[str, torch.Tensor], reset_optimizer: bool) -> None:
        """Overwrite named parameters, all or none; clears the divergence guard."""
        for name, value in values.items():
            param = self._params.get(name)
            if param is None:
                known = ", ".join(self._params)
                raise InvalidArgument(
                    f"parameters[{name}]", f"no such parameter; the model has {known}"
                )
            if tuple(value.shape) != tuple(param.shape):
                raise InvalidArgument(
                    f"parameters[{name}]",
                    f"has shape {list(value.shape)}, the parameter has {list(param.shape)}",
                )
            if not value.is_floating_point():
                raise InvalidArgument(
                    f"parameters[{name}]", f"has dtype {value.dtype}, expected float"
                )
            # Checked in the parameter's dtype: 1e300 is finite in float64, not in float32.
            if not bool(torch.isfinite(value.to(param.dtype)).all()):
                raise InvalidArgument(
                    f"parameters[{name}]", f"contains a non-finite value as {param.dtype}"
                )
        with torch.no_grad():
            for name, value in values.items():
                self._params[name].copy_(value)
        if reset_optimizer:
            self.optimizer.state.clear()
            self.optimizer.zero_grad(set_to_none=True)
            self.pending = 0
        self.nonfinite_streak = 0
        self.snapshots.changed()
        self.source.state_changed(self)

    def update(self, lr: float | None, freeze: tuple[str, ...], unfreeze: tuple[str, ...]) -> None:
        """Change the learning rate; freeze (``requires_grad_(False)``) or unfreeze parameters."""
        for field_name, names in (("freeze", freeze), ("unfreeze", unfreeze)):
            for name in names:
                if name not in self._params:
                    known = ", ".join(self._params)
                    raise InvalidArgument(
                        field_name, f"no parameter named {name!r}; the model has {known}"
                    )
        both = set(freeze) & set(unfreeze)
        if both:
            raise InvalidArgument("freeze", f"{sorted(both)} are in both freeze and unfreeze")
        if lr is not None and not (math.isfinite(lr) and lr >= 0):
            raise InvalidArgument("lr", f"must be a finite number >= 0, got {lr}")
        if lr is not None:
            set_lr(self.optimizer, self.schedule, lr)
        for name in freeze:
            # A frozen parameter must not move, not even by a gradient accumulated before.
            self._params[name].requires_grad_(False)
            self._params[name].grad = None
        for name in unfreeze:
            self._params[name].requires_grad_(True)
        frozen = tuple(n for n, p in self._params.items() if not p.requires_grad)
        optimizer = (
            self.spec.optimizer if lr is None else self.spec.optimizer.model_copy(update={"lr": lr})
        )
        self.spec = self.spec.model_copy(update={"frozen": frozen, "optimizer": optimizer})
        self.source.state_changed(self)

    def info(self) -> ModelInfo:
        """Spec, step, device, parameter shapes and the loss's autograd chain."""
        return ModelInfo(
            name=self.name,
            spec=self.spec,
            step=self.step,
            pending_batches=self.pending,
            device=str(self.device),
            parameters=tuple(
                ParameterInfo(n, tuple(p.shape), not p.requires_grad)
                for n, p in self._params.items()
            ),
            autograd_chain=self.autograd_chain(),
            nonfinite_streak=self.nonfinite_streak,
            lr=self.lr,
            inputs=self.checker.declared,
        )

    @property
    def lr(self) -> float:
        """The learning rate the next step uses."""
        return current_lr(self.optimizer)

    def autograd_chain(self) -> tuple[str, ...]:
        """The ``grad_fn`` names of the loss on one zero row, breadth first (the seed's grad_fn)."""
        dtype = next(iter(self._params.values())).dtype
        rows = 1
        inputs = example_inputs(self.checker.declared, rows, dtype, self.device)
        if self.spec.loss.kind == "cross_entropy":
            y = torch.zeros(rows, dtype=torch.int64, device=self.device)
        else:
            y = torch.zeros(
                rows, self.spec.architecture.out_features, device=self.device, dtype=dtype
            )
        loss = loss_value(self.spec.loss, self.module(*inputs), y, None)
        names: list[str] = []
        seen: set[int] = set()
        frontier = collections.deque([loss.grad_fn])
        # Bounded: a plug-in's graph can be as deep as it likes; the chain is for reading.
        while frontier and len(names) < MAX_CHAIN_NODES:
            node = frontier.popleft()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            names.append(node.name().removeprefix("torch::autograd::"))
            frontier.extend(next_fn for next_fn, _ in node.next_functions)
        return tuple(names)
