"""Every Prometheus metric the server exports, on its own registry and HTTP port.

Cost model: the step's own bookkeeping (``record``) is a handful of counter
increments per request message, never a device read. Weights and gradients are
read from the device only after a message whose steps passed a multiple of
``metrics_every`` (``sample_due``), with one batched op and one copy to the host.
Label values are bounded by what the server knows (model and parameter names, a
fixed list of reasons and status codes): never a client, stream or request id,
never a value taken from a request.
"""

from __future__ import annotations

import itertools
import re
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import grpc
import prometheus_client
import torch
from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gradstream.server.engine import Outcome, StepResult, Trainer

# The _created series double every counter and no dashboard reads them.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

_BATCH_INDEX = re.compile(r"^batches\[\d+\]\.")
_STEP_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0)
# Every field a batch can be rejected for (batches.py, codec.py); anything else is "other".
REJECT_REASONS = ("x", "y", "sample_weight", "other")
SKIP_REASONS = ("nonfinite_loss", "nonfinite_gradient")
# Long-lived Train streams need buckets far past the defaults' 10 s.
_RPC_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.5, 2.5, 10.0, 60.0, 300.0, 1800.0)
GRPC_TYPES = ("unary", "server_stream", "client_stream", "bidi_stream")  # [2 * client + server]


class SmoothedLoss:
    """The last ``window`` batch losses' mean and their exponential moving average.

    The EMA starts at the first loss and moves by ``alpha = 2 / (window + 1)`` (the
    span-``window`` convention), so both follow the same horizon.
    """

    def __init__(self, window: int) -> None:
        self.losses: deque[float] = deque(maxlen=window)
        self.alpha = 2.0 / (window + 1)
        self.ema = 0.0

    def add(self, losses: list[float]) -> None:
        """Count losses in the order they were computed."""
        if not losses:
            return
        ema, start = (self.ema, 0) if self.losses else (losses[0], 1)
        for loss in losses[start:]:  # the same update as one at a time, without the lookups
            ema = ema + self.alpha * (loss - ema)
        self.ema = ema
        self.losses.extend(losses)

    @property
    def mean(self) -> float:
        """Mean of the losses in the window (summed afresh: no drift from running sums)."""
        return sum(self.losses) / len(self.losses)


@dataclass(frozen=True, slots=True)
class _Probe:
    """What one model's sample reads, and the labels of what it read, resolved once."""

    params: tuple[torch.nn.Parameter, ...]
    names: tuple[str, ...]
    small: tuple[int, ...]  # positions of the parameters exported value by value
    values: tuple[tuple[str, str], ...]  # (parameter, index) of each exported element


class _Weights(Collector):
    """The last sample of every model, turned into series only when scraped.

    A sample just replaces one tuple (atomic under the GIL): no per-gauge locks on
    the worker, and a model's series vanish with its entry.
    """

    def __init__(self) -> None:
        self.samples: dict[str, tuple[_Probe, list[float]]] = {}

    def collect(self) -> Iterator[Metric]:
        every = "sampled every metrics_every steps"
        value = GaugeMetricFamily(
            "gradstream_parameter_value",
            f"Value of one element of a small parameter, {every}.",
            labels=["model", "parameter", "index"],
        )
        norm = GaugeMetricFamily(
            "gradstream_parameter_norm",
            f"L2 norm of a parameter, {every}.",
            labels=["model", "parameter"],
        )
        gradient = GaugeMetricFamily(
            "gradstream_gradient_norm",
            f"L2 norm of a parameter's gradient after a step (0 without one), {every}.",
            labels=["model", "parameter"],
        )
        for model, (probe, host) in list(self.samples.items()):
            count = len(probe.names)
            for i, name in enumerate(probe.names):
                norm.add_metric([model, name], host[i])
                gradient.add_metric([model, name], host[count + i])
            for (name, index), element in zip(probe.values, host[2 * count :], strict=True):
                value.add_metric([model, name, index], element)
        yield value
        yield norm
        yield gradient


class _DeviceMemory(Collector):
    """Bytes held by PyTorch's CUDA caching allocator, read at scrape time.

    ``memory_allocated`` reads the allocator's host-side counters: no device sync.
    """

    def __init__(self, devices: Sequence[torch.device]) -> None:
        # "cuda" without an index is device 0 for every thread that has not chosen another.
        self.devices = tuple(torch.device("cuda", d.index or 0) for d in devices)

    def collect(self) -> Iterator[Metric]:
        allocated = GaugeMetricFamily(
            "gradstream_device_memory_allocated_bytes",
            "Bytes of device memory held by tensors.",
            labels=["device"],
        )
        reserved = GaugeMetricFamily(
            "gradstream_device_memory_reserved_bytes",
            "Bytes of device memory reserved by PyTorch's caching allocator.",
            labels=["device"],
        )
        for device in self.devices:
            allocated.add_metric([str(device)], float(torch.cuda.memory_allocated(device)))
            reserved.add_metric([str(device)], float(torch.cuda.memory_reserved(device)))
        yield allocated
        yield reserved


class GrpcServerMetrics:
    """The standard ``grpc_server_*`` family (as go-grpc-prometheus names it)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        r = registry
        self.started = Counter(
            "grpc_server_started", "RPCs started on the server.", labels, registry=r
        )
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, regardless of success or failure.",
            [*labels, "grpc_code"],
            registry=r,
        )
        self.received = Counter(
            "grpc_server_msg_received", "RPC stream messages received.", labels, registry=r
        )
        self.sent = Counter("grpc_server_msg_sent", "RPC stream messages sent.", labels, registry=r)
        self.seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC to its status.",
            labels,
            buckets=_RPC_BUCKETS,
            registry=r,
        )

    def preinitialize(self, services: Iterable[ServiceDescriptor]) -> None:
        """Create every method's series at zero, every status code included."""
        for service in services:
            for method in service.methods:
                kind = grpc_type(method.client_streaming, method.server_streaming)
                labels = (kind, service.full_name, method.name)
                self.started.labels(*labels)
                self.received.labels(*labels)
                self.sent.labels(*labels)
                self.seconds.labels(*labels)
                for code in grpc.StatusCode:
                    self.handled.labels(*labels, code.name)


def grpc_type(client_streaming: bool, server_streaming: bool) -> str:
    """The ``grpc_type`` label of a method."""
    return GRPC_TYPES[2 * client_streaming + server_streaming]


class Metrics:
    """The training metrics of every model in one server.

    With ``enabled=False`` (no metrics port) nothing is recorded or sampled.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        enabled: bool = True,
        every: int = 10,
        max_elements: int = 64,
        device: torch.device | None = None,
        loss_window: int = 100,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.loss_window = loss_window
        self._smoothed: dict[str, SmoothedLoss] = {}
        self.enabled = enabled
        self.every = every
        self.max_elements = max_elements
        self._probes: dict[str, _Probe] = {}  # filled by each model's worker
        r = self.registry
        self.train_loss = Gauge(
            "gradstream_train_loss", "Loss of the last reported step.", ["model"], registry=r
        )
        self.train_loss_mean = Gauge(
            "gradstream_train_loss_window_mean",
            "Mean loss of the model's last loss_window reported batches (progressive "
            "validation: each batch's loss is taken before its step).",
            ["model"],
            registry=r,
        )
        self.train_loss_ema = Gauge(
            "gradstream_train_loss_ema",
            "Exponential moving average of reported batch losses, alpha = 2 / (loss_window + 1).",
            ["model"],
            registry=r,
        )
        self.train_steps = Counter(
            "gradstream_train_steps", "Optimizer steps applied.", ["model"], registry=r
        )
        self.train_samples = Counter(
            "gradstream_train_samples",
            "Rows of batches whose gradient was used.",
            ["model"],
            registry=r,
        )
        self.batches_rejected = Counter(
            "gradstream_train_batches_rejected",
            "Batches refused as invalid, by the field at fault.",
            ["model", "reason"],
            registry=r,
        )
        self.steps_skipped = Counter(
            "gradstream_train_steps_skipped",
            "Steps skipped because loss or gradient was not finite.",
            ["model", "reason"],
            registry=r,
        )
        self.step_duration = Histogram(
            "gradstream_train_step_duration_seconds",
            "Worker time per batch, averaged over each request message.",
            ["model"],
            buckets=_STEP_BUCKETS,
            registry=r,
        )
        self.learning_rate = Gauge(
            "gradstream_learning_rate", "Current learning rate.", ["model"], registry=r
        )
        self.grad_norm = Gauge(
            "gradstream_grad_norm",
            "Total gradient norm before clipping, of the last applied step (with clip_grad).",
            ["model"],
            registry=r,
        )
        self.models = Gauge("gradstream_models", "Models resident on the server.", registry=r)
        self.checkpoint_last_success = Gauge(
            "gradstream_checkpoint_last_success_timestamp_seconds",
            "Unix time of the model's newest checkpoint on disk.",
            ["model"],
            registry=r,
        )
        self.checkpoint_duration = Histogram(
            "gradstream_checkpoint_duration_seconds",
            "Time to take a checkpoint: the copy off the device plus the fsynced write.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
            registry=r,
        )
        self.checkpoint_failures = Counter(
            "gradstream_checkpoint_failures", "Checkpoints that failed.", ["model"], registry=r
        )
        self.checkpoint_restore_fallbacks = Counter(
            "gradstream_checkpoint_restore_fallbacks",
            "Checkpoints skipped at start-up as truncated or corrupt.",
            ["model"],
            registry=r,
        )
        self._weights = _Weights()
        r.register(self._weights)
        self.grpc = GrpcServerMetrics(r)
        if device is not None and device.type == "cuda":
            r.register(_DeviceMemory([device]))
        # What prometheus-client's default registry would carry: process_*, python_info,
        # python_gc_*; this registry is our own, so they are added explicitly.
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(collector)
        self.active_streams = Gauge(
            "gradstream_active_streams",
            "Train and Evaluate streams open now (max_streams bounds it).",
            registry=r,
        )
        self.eval_metric = Gauge(
            "gradstream_eval_metric",
            "Loss and task metrics of the model's last Evaluate (docs/evaluation.md).",
            ["model", "metric"],
            registry=r,
        )
        self.eval_step = Gauge(
            "gradstream_eval_step",
            "The optimizer step the model's last Evaluate was taken at.",
            ["model"],
            registry=r,
        )
        self.eval_rows = Gauge(
            "gradstream_eval_rows", "Rows of the model's last Evaluate.", ["model"], registry=r
        )

    def model_created(self, model: str, lr: float) -> None:
        """Pre-initialize the model's series so rates start from zero, not from absence."""
        self.train_steps.labels(model)
        self.train_samples.labels(model)
        self.step_duration.labels(model)
        for reason in SKIP_REASONS:
            self.steps_skipped.labels(model, reason)
        for reason in REJECT_REASONS:
            self.batches_rejected.labels(model, reason)
        self.learning_rate.labels(model).set(lr)

    def model_deleted(self, model: str) -> None:
        """Drop every series of a deleted model."""
        self._probes.pop(model, None)
        self._smoothed.pop(model, None)
        self._weights.samples.pop(model, None)
        for metric in (
            self.train_loss,
            self.train_loss_mean,
            self.train_loss_ema,
            self.train_steps,
            self.train_samples,
            self.step_duration,
            self.learning_rate,
            self.grad_norm,
            self.batches_rejected,
            self.steps_skipped,
            self.eval_metric,
            self.eval_step,
            self.eval_rows,
        ):
            for labels in list(metric._metrics):  # prometheus-client has no "remove by model"
                if labels[0] == model:
                    metric.remove(*labels)

    def evaluated(self, model: str, step: int, rows: int, metrics: dict[str, float]) -> None:
        """Publish one Evaluate's loss and metrics, replacing the model's previous ones."""
        if not self.enabled:
            return
        for labels in list(self.eval_metric._metrics):
            if labels[0] == model and labels[1] not in metrics:
                self.eval_metric.remove(*labels)
        for name, value in metrics.items():
            self.eval_metric.labels(model, name).set(value)
        self.eval_step.labels(model).set(step)
        self.eval_rows.labels(model).set(rows)

    def record(self, model: str, results: Iterable[tuple[StepResult, int]], seconds: float) -> None:
        """Account one worker job: each result with the row count of its batch."""
        if not self.enabled:
            return
        applied = samples = batches = 0
        losses: list[float] = []
        for result, rows in results:
            batches += 1
            outcome = result.outcome
            if outcome is Outcome.APPLIED or outcome is Outcome.ACCUMULATED:
                applied += outcome is Outcome.APPLIED
                samples += rows
                if result.loss is not None:
                    losses.append(result.loss)
            elif outcome is Outcome.SKIPPED_NONFINITE:
                self.steps_skipped.labels(model, _skip_label(result.reason)).inc()
            elif outcome is Outcome.REJECTED:
                self.batches_rejected.labels(model, rejected_label(result.reason)).inc()
        loss = losses[-1] if losses else None
        if applied:
            self.train_steps.labels(model).inc(applied)
        if samples:
            self.train_samples.labels(model).inc(samples)
        if loss is not None:
            self.train_loss.labels(model).set(loss)
            smoothed = self._smoothed.get(model)
            if smoothed is None:
                smoothed = self._smoothed[model] = SmoothedLoss(self.loss_window)
            smoothed.add(losses)
            self.train_loss_mean.labels(model).set(smoothed.mean)
            self.train_loss_ema.labels(model).set(smoothed.ema)
        if batches:
            self.step_duration.labels(model).observe(seconds / batches)

    def stepped(self, model: str, lr: float, grad_norm: torch.Tensor | None) -> None:
        """After a job that applied steps: the lr a schedule moved to, the pre-clip norm."""
        self.learning_rate.labels(model).set(lr)
        if grad_norm is not None and self.enabled:
            self.grad_norm.labels(model).set(float(grad_norm))  # one read a message

    def sample_due(self, before: int, after: int) -> bool:
        """Whether a job that took the model from step ``before`` to ``after`` samples.

        It does when it passed a multiple of ``every``: once, after its last step.
        """
        return self.enabled and after // self.every > before // self.every

    def sample(self, trainer: Trainer) -> None:
        """Read norms of every parameter and gradient, and small parameters' values.

        Runs on the model's worker after a job that passed a sampling step: one
        ``_foreach_norm`` per list, one concatenation and one copy to the host, so
        the device is waited on once per sample and never on other steps. The
        gradients are those the last step left (its own, or a partial sum while
        accumulating).
        """
        probe = self._probes.get(trainer.name)
        if probe is None:
            probe = self._probes[trainer.name] = self._probe(trainer)
        if not probe.params:
            return
        params = [p.detach() for p in probe.params]
        with torch.no_grad():
            grads = [p.grad for p in probe.params]
            present = [g for g in grads if g is not None]
            found = iter(torch._foreach_norm(present) if present else ())
            zero = params[0].new_zeros(())
            parts = [
                torch.stack(torch._foreach_norm(params)),
                torch.stack([zero if g is None else next(found) for g in grads]),
                *(params[i].reshape(-1) for i in probe.small),
            ]
            # float64 holds every float32 value exactly; .cpu() is the one device sync.
            host: list[float] = torch.cat(parts).double().cpu().tolist()
        self._weights.samples[trainer.name] = (probe, host)

    def _probe(self, trainer: Trainer) -> _Probe:
        named = list(trainer.module.named_parameters())
        small = tuple(i for i, (_, p) in enumerate(named) if p.numel() <= self.max_elements)
        return _Probe(
            params=tuple(p for _, p in named),
            names=tuple(name for name, _ in named),
            small=small,
            values=tuple(
                (named[i][0], _index_label(index))
                for i in small
                for index in itertools.product(*(range(d) for d in named[i][1].shape))
            ),
        )


def _index_label(index: tuple[int, ...]) -> str:
    # Row-major like the tensor itself; "0" for a 0-d tensor (an empty label is no label).
    return ",".join(map(str, index)) or "0"


def _skip_label(reason: str) -> str:
    return "nonfinite_loss" if reason.startswith("loss") else "nonfinite_gradient"


def rejected_label(reason: str) -> str:
    """The bounded label for a rejection: the field at fault, without batch indexes."""
    field = _BATCH_INDEX.sub("", reason.split(":", 1)[0]).split(".")[0]
    return field if field in REJECT_REASONS else "other"


# Seconds: a data-parallel step, from a small model's on one host to a large one's over NCCL.
_RANK_STEP_BUCKETS = (
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    1e-2,
    2.5e-2,
    5e-2,
    0.1,
    0.25,
    1.0,
    5.0,
)


class RankMetrics:
    """Step timing of this rank; every rank exports its own (rank 0 beside the server's)."""

    def __init__(self, registry: CollectorRegistry, rank: int, world_size: int) -> None:
        labels = {"rank": str(rank)}
        self.step_duration = Histogram(
            "gradstream_rank_step_duration_seconds",
            "This rank's time for its part of one step: forward, backward, all-reduce, update.",
            ["rank"],
            buckets=_RANK_STEP_BUCKETS,
            registry=registry,
        ).labels(**labels)
        self.allreduce_duration = Histogram(
            "gradstream_rank_allreduce_duration_seconds",
            "Time in the gradient all-reduce: mostly waiting for the slowest rank.",
            ["rank"],
            buckets=_RANK_STEP_BUCKETS,
            registry=registry,
        ).labels(**labels)
        self.rows = Counter(
            "gradstream_rank_rows", "Rows this rank trained on.", ["rank"], registry=registry
        ).labels(**labels)
        Gauge("gradstream_world_size", "Ranks in the data-parallel job.", registry=registry).set(
            world_size
        )
