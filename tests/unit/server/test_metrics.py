"""Metrics recorded from real Trainer steps: what a scrape shows must be the model's state."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from gradstream.server.batches import Batch
from gradstream.server.engine import Outcome, StepResult, Trainer, TrainOptions
from gradstream.server.metrics import REJECT_REASONS, Metrics, grpc_type, rejected_label
from gradstream.server.spec import parse_spec
from gradstream.v1 import trainer_pb2
from tests.conftest import ROOT

CPU = torch.device("cpu")


def _trainer(name: str = "m", hidden: tuple[int, ...] = ()) -> Trainer:
    spec = parse_spec(
        {
            "architecture": {
                "kind": "mlp" if hidden else "linear",
                "in_features": 3,
                "out_features": 2,
                "hidden": list(hidden),
            },
            "loss": {"kind": "mse"},
            "optimizer": {"kind": "sgd", "lr": 0.1},
        }
    )
    return Trainer(name, spec, CPU)


def _steps(trainer: Trainer, count: int) -> list[StepResult]:
    torch.manual_seed(0)
    options = TrainOptions()
    return [
        trainer.train(Batch(torch.randn(4, 3), torch.randn(4, 2), None, 0), options)
        for _ in range(count)
    ]


def _value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_a_sample_exports_every_weight_and_the_norms_of_parameters_and_gradients() -> None:
    trainer, metrics = _trainer(), Metrics()
    _steps(trainer, 3)
    metrics.sample(trainer)
    weight, bias = trainer.module.get_parameter("weight"), trainer.module.get_parameter("bias")
    for (row, column), value in zip(
        [(r, c) for r in range(2) for c in range(3)],
        weight.detach().flatten().tolist(),
        strict=True,
    ):
        got = _value(
            metrics,
            "gradstream_parameter_value",
            model="m",
            parameter="weight",
            index=f"{row},{column}",
        )
        assert got == value
    assert (
        _value(metrics, "gradstream_parameter_value", model="m", parameter="bias", index="1")
        == bias[1].item()
    )
    assert _value(metrics, "gradstream_parameter_norm", model="m", parameter="weight") == (
        pytest.approx(torch.linalg.vector_norm(weight).item(), rel=1e-6)
    )
    assert weight.grad is not None
    assert _value(metrics, "gradstream_gradient_norm", model="m", parameter="weight") == (
        pytest.approx(torch.linalg.vector_norm(weight.grad).item(), rel=1e-6)
    )


def test_large_parameters_export_norms_but_no_values() -> None:
    # hidden 32: the first layer's weight has 96 elements, over the default limit of 64
    trainer, metrics = _trainer(hidden=(32,)), Metrics()
    _steps(trainer, 1)
    metrics.sample(trainer)
    params = dict(trainer.module.named_parameters())
    large = [n for n, p in params.items() if p.numel() > 64]
    small = [n for n, p in params.items() if p.numel() <= 64]
    assert large and small
    for name, param in params.items():
        norm = _value(metrics, "gradstream_parameter_norm", model="m", parameter=name)
        assert norm == pytest.approx(torch.linalg.vector_norm(param).item(), rel=1e-6)
    for name in large:
        assert (
            _value(metrics, "gradstream_parameter_value", model="m", parameter=name, index="0,0")
            is None
        )
    text = generate_latest(metrics.registry).decode()
    values = [line for line in text.splitlines() if line.startswith("gradstream_parameter_value")]
    assert len(values) == sum(params[n].numel() for n in small)


def test_max_elements_zero_exports_no_values() -> None:
    trainer, metrics = _trainer(), Metrics(max_elements=0)
    _steps(trainer, 1)
    metrics.sample(trainer)
    assert "gradstream_parameter_value{" not in generate_latest(metrics.registry).decode()
    assert _value(metrics, "gradstream_parameter_norm", model="m", parameter="bias") is not None


def test_a_frozen_parameter_reports_a_zero_gradient_norm() -> None:
    trainer, metrics = _trainer(), Metrics()
    trainer.update(None, ("bias",), ())
    _steps(trainer, 1)
    metrics.sample(trainer)
    assert _value(metrics, "gradstream_gradient_norm", model="m", parameter="bias") == 0.0
    assert _value(metrics, "gradstream_gradient_norm", model="m", parameter="weight") > 0  # type: ignore[operator]


@pytest.mark.parametrize(
    ("before", "after", "due"),
    [(0, 9, False), (9, 10, True), (10, 19, False), (0, 64, True), (19, 21, True), (5, 5, False)],
)
def test_sampling_is_due_when_a_job_passes_a_multiple_of_every(
    before: int, after: int, due: bool
) -> None:
    assert Metrics(every=10).sample_due(before, after) is due


def test_disabled_metrics_neither_record_nor_sample() -> None:
    metrics = Metrics(enabled=False)
    metrics.model_created("m", 0.1)
    trainer = _trainer()
    results = _steps(trainer, 10)
    metrics.record("m", [(r, 4) for r in results], 0.01)
    assert not metrics.sample_due(0, 10)
    assert _value(metrics, "gradstream_train_steps_total", model="m") == 0.0
    assert _value(metrics, "gradstream_train_loss", model="m") is None


def test_record_counts_steps_samples_and_the_last_loss() -> None:
    metrics, trainer = Metrics(), _trainer()
    metrics.model_created("m", 0.1)
    results = _steps(trainer, 5)
    rejected = StepResult(6, 5, Outcome.REJECTED, reason="batches[3].y: has shape [9]")
    metrics.record("m", [*((r, 4) for r in results), (rejected, 0)], 0.006)
    assert _value(metrics, "gradstream_train_steps_total", model="m") == 5
    assert _value(metrics, "gradstream_train_samples_total", model="m") == 20
    assert _value(metrics, "gradstream_train_loss", model="m") == results[-1].loss
    assert _value(metrics, "gradstream_train_batches_rejected_total", model="m", reason="y") == 1
    # one observation per job, of the mean time per batch
    assert _value(metrics, "gradstream_train_step_duration_seconds_count", model="m") == 1
    assert _value(metrics, "gradstream_train_step_duration_seconds_sum", model="m") == (
        pytest.approx(0.001)
    )


def test_smoothed_loss_is_the_window_mean_and_the_ema_of_reported_losses() -> None:
    metrics, trainer = Metrics(loss_window=3), _trainer()
    metrics.model_created("m", 0.1)
    results = _steps(trainer, 5)
    losses = [r.loss for r in results if r.loss is not None]
    assert len(losses) == 5
    metrics.record("m", [(r, 4) for r in results[:2]], 0.001)
    metrics.record("m", [(r, 4) for r in results[2:]], 0.001)
    last3 = losses[2:]
    assert _value(metrics, "gradstream_train_loss_window_mean", model="m") == pytest.approx(
        sum(last3) / 3, rel=1e-15
    )
    ema = losses[0]
    for loss in losses[1:]:
        ema = ema + 0.5 * (loss - ema)  # alpha = 2 / (3 + 1)
    assert _value(metrics, "gradstream_train_loss_ema", model="m") == pytest.approx(ema, rel=1e-15)


def test_evaluated_replaces_the_previous_evaluation() -> None:
    metrics = Metrics()
    metrics.evaluated("m", 7, 100, {"loss": 0.5, "roc_auc": 0.75})
    metrics.evaluated("m", 9, 50, {"loss": 0.25})
    assert _value(metrics, "gradstream_eval_metric", model="m", metric="loss") == 0.25
    assert _value(metrics, "gradstream_eval_step", model="m") == 9
    assert _value(metrics, "gradstream_eval_rows", model="m") == 50
    assert 'metric="roc_auc"' not in generate_latest(metrics.registry).decode()


def test_series_are_preinitialized_at_creation_and_all_gone_after_deletion() -> None:
    metrics, trainer = Metrics(), _trainer()
    metrics.model_created("m", 0.1)
    for reason in REJECT_REASONS:
        assert (
            _value(metrics, "gradstream_train_batches_rejected_total", model="m", reason=reason)
            == 0
        )
    for reason in ("nonfinite_loss", "nonfinite_gradient"):
        assert (
            _value(metrics, "gradstream_train_steps_skipped_total", model="m", reason=reason) == 0
        )
    assert _value(metrics, "gradstream_learning_rate", model="m") == 0.1
    metrics.record("m", [(r, 4) for r in _steps(trainer, 1)], 0.001)
    metrics.sample(trainer)
    metrics.model_deleted("m")
    assert 'model="m"' not in generate_latest(metrics.registry).decode()


@pytest.mark.parametrize(
    ("reason", "label"),
    [
        ("batches[12].x: has shape [3, 2], the model expects (rows, 4)", "x"),
        ("batches[0].y.shape: [-1] has a negative dimension", "y"),
        ("batches[7].sample_weight: has a negative weight -3.0", "sample_weight"),
        ("x: contains a non-finite value (nan)", "x"),
        ("something new: with a value 12345", "other"),
        ("no colon and a request id 7f3a", "other"),
        ("", "other"),
    ],
)
def test_rejection_labels_come_from_a_fixed_set(reason: str, label: str) -> None:
    assert rejected_label(reason) == label


def test_grpc_types_follow_the_streaming_flags() -> None:
    assert [grpc_type(c, s) for c in (False, True) for s in (False, True)] == [
        "unary",
        "server_stream",
        "client_stream",
        "bidi_stream",
    ]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process_* reads /proc")
def test_process_metrics_are_on_the_server_registry() -> None:
    text = generate_latest(Metrics(CollectorRegistry()).registry).decode()
    for name in ("python_info{", "process_resident_memory_bytes ", "python_gc_objects_collected"):
        assert name in text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_memory_is_exported_for_a_cuda_device() -> None:
    metrics = Metrics(device=torch.device("cuda"))  # --device auto gives "cuda", no index
    held = torch.empty(1024, 1024, device="cuda:0")
    value = _value(metrics, "gradstream_device_memory_allocated_bytes", device="cuda:0")
    assert value is not None
    assert value >= held.numel() * 4


def test_no_device_memory_series_on_the_cpu() -> None:
    metrics = Metrics(device=CPU)
    assert "gradstream_device_memory" not in generate_latest(metrics.registry).decode()


def test_every_exported_metric_is_documented() -> None:
    docs = (ROOT / "docs" / "observability.md").read_text()
    trainer, metrics = _trainer(), Metrics()
    metrics.model_created("m", 0.1)
    metrics.record("m", [(r, 4) for r in _steps(trainer, 1)], 0.001)
    metrics.sample(trainer)
    metrics.evaluated("m", 1, 4, {"loss": 0.5})
    metrics.grpc.preinitialize([trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"]])
    names = {
        re.sub(r"_(bucket|sum|count)$", "", line.split("{")[0].split(" ")[0])
        for line in generate_latest(metrics.registry).decode().splitlines()
        if line.startswith(("gradstream_", "grpc_"))
    }
    names |= {"gradstream_device_memory_allocated_bytes", "gradstream_device_memory_reserved_bytes"}
    assert len(names) >= 18  # 11 training, 2 device, 5 gRPC; checkpoints add more
    for name in sorted(names):
        assert f"`{name}`" in docs, f"{name} is not in docs/observability.md"
