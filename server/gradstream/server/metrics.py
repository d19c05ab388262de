"""Every Prometheus metric the server exports, on its own registry and HTTP port."""

from __future__ import annotations

import re
from collections.abc import Iterable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gradstream.server.engine import Outcome, StepResult

# The _created series double every counter and no dashboard reads them.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

_BATCH_INDEX = re.compile(r"^batches\[\d+\]\.")
_STEP_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0)


class Metrics:
    """The training metrics of every model in one server."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.train_loss = Gauge(
            "gradstream_train_loss", "Loss of the last reported step.", ["model"], registry=r
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

    def model_created(self, model: str, lr: float) -> None:
        """Pre-initialize the model's series so rates start from zero, not from absence."""
        self.train_steps.labels(model)
        self.train_samples.labels(model)
        for reason in ("loss is not finite", "gradient is not finite"):
            self.steps_skipped.labels(model, _skip_label(reason))
        self.learning_rate.labels(model).set(lr)

    def model_deleted(self, model: str) -> None:
        """Drop every series of a deleted model."""
        for metric in (
            self.train_loss,
            self.train_steps,
            self.train_samples,
            self.step_duration,
            self.learning_rate,
            self.batches_rejected,
            self.steps_skipped,
        ):
            for labels in list(metric._metrics):  # prometheus-client has no "remove by model"
                if labels[0] == model:
                    metric.remove(*labels)

    def record(self, model: str, results: Iterable[tuple[StepResult, int]], seconds: float) -> None:
        """Account one worker job: each result with the row count of its batch."""
        applied = samples = batches = 0
        loss: float | None = None
        for result, rows in results:
            batches += 1
            match result.outcome:
                case Outcome.APPLIED | Outcome.ACCUMULATED:
                    applied += result.outcome is Outcome.APPLIED
                    samples += rows
                    if result.loss is not None:
                        loss = result.loss
                case Outcome.SKIPPED_NONFINITE:
                    self.steps_skipped.labels(model, _skip_label(result.reason)).inc()
                case Outcome.REJECTED:
                    self.batches_rejected.labels(model, rejected_label(result.reason)).inc()
        if applied:
            self.train_steps.labels(model).inc(applied)
        if samples:
            self.train_samples.labels(model).inc(samples)
        if loss is not None:
            self.train_loss.labels(model).set(loss)
        if batches:
            self.step_duration.labels(model).observe(seconds / batches)


def _skip_label(reason: str) -> str:
    return "nonfinite_loss" if reason.startswith("loss") else "nonfinite_gradient"


def rejected_label(reason: str) -> str:
    """The bounded label for a rejection: the field at fault, without batch indexes."""
    field = _BATCH_INDEX.sub("", reason.split(":", 1)[0])
    return field.split(".")[0] or "other"
