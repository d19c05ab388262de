"""The Grafana dashboard of gradstream's metrics, generated from typed panels.

``deploy/grafana/dashboards/gradstream.json`` is this module's output, committed;
a test fails when the two differ. After editing a panel:

    make dashboard   # python -m tools.dashboard deploy/grafana/dashboards/gradstream.json

Every query uses only Prometheus's PromQL plus two Grafana variables,
``$model`` (a regex over model names) and ``$__rate_interval``; the tests run each
one through a real Prometheus with those two substituted.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# Grafana 10.x/11.x read this schema version without migrating it.
SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
TRAINER = 'grpc_service="gradstream.v1.TrainerService"'
MODEL = 'model=~"$model"'
WIDTH = 24  # Grafana's grid is 24 columns wide
HEIGHT = 8

Unit = Literal["none", "short", "s", "bytes", "reqps"]


@dataclass(frozen=True, slots=True)
class Target:
    """One PromQL query of a panel and the legend of its series."""

    expr: str
    legend: str


@dataclass(frozen=True, slots=True)
class Panel:
    """A time series panel."""

    title: str
    description: str
    targets: tuple[Target, ...]
    unit: Unit = "short"
    axis_label: str = ""
    width: int = 12


@dataclass(frozen=True, slots=True)
class Row:
    """A titled row of panels."""

    title: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)


def _rate(metric: str, by: str, selector: str = MODEL) -> str:
    return f"sum by ({by}) (rate({metric}{{{selector}}}[$__rate_interval]))"


def _quantile(q: float, metric: str, by: str, selector: str) -> str:
    return f"histogram_quantile({q}, {_rate(metric + '_bucket', by + ', le', selector)})"


ROWS: tuple[Row, ...] = (
    Row(
        "Training",
        (
            Panel(
                "Loss",
                "Loss of the last reported step of each model (gradstream_train_loss).",
                (Target(f"gradstream_train_loss{{{MODEL}}}", "{{model}}"),),
                unit="none",
            ),
            Panel(
                "Steps and samples per second",
                "Optimizer steps applied and rows trained on, per second.",
                (
                    Target(_rate("gradstream_train_steps_total", "model"), "{{model}} steps/s"),
                    Target(_rate("gradstream_train_samples_total", "model"), "{{model}} samples/s"),
                ),
                axis_label="per second",
            ),
            Panel(
                "Step latency",
                "Worker time per batch: median and 99th percentile.",
                (
                    Target(
                        _quantile(0.5, "gradstream_train_step_duration_seconds", "model", MODEL),
                        "{{model}} p50",
                    ),
                    Target(
                        _quantile(0.99, "gradstream_train_step_duration_seconds", "model", MODEL),
                        "{{model}} p99",
                    ),
                ),
                unit="s",
            ),
            Panel(
                "Learning rate",
                "The optimizer's current learning rate (UpdateModel changes it).",
                (Target(f"gradstream_learning_rate{{{MODEL}}}", "{{model}}"),),
                unit="none",
            ),
        ),
    ),
    Row(
        "Weights and gradients (sampled every metrics_every steps)",
        (
            Panel(
                "Weights of small parameters",
                "Every element of parameters with at most metrics_max_elements elements.",
                (
                    Target(
                        f"gradstream_parameter_value{{{MODEL}}}",
                        "{{model}} {{parameter}}[{{index}}]",
                    ),
                ),
                unit="none",
                width=WIDTH,
            ),
            Panel(
                "Parameter norms",
                "L2 norm of every parameter.",
                (Target(f"gradstream_parameter_norm{{{MODEL}}}", "{{model}} {{parameter}}"),),
                unit="none",
            ),
            Panel(
                "Gradient norms",
                "L2 norm of every parameter's gradient after the sampled step.",
                (Target(f"gradstream_gradient_norm{{{MODEL}}}", "{{model}} {{parameter}}"),),
                unit="none",
            ),
        ),
    ),
    Row(
        "Data quality",
        (
            Panel(
                "Rejected batches by reason",
                "Batches refused as invalid, per second, by the field at fault.",
                (
                    Target(
                        _rate("gradstream_train_batches_rejected_total", "model, reason"),
                        "{{model}} {{reason}}",
                    ),
                ),
                axis_label="batches/s",
            ),
            Panel(
                "Skipped steps by reason",
                "Steps skipped for a non-finite loss or gradient, per second.",
                (
                    Target(
                        _rate("gradstream_train_steps_skipped_total", "model, reason"),
                        "{{model}} {{reason}}",
                    ),
                ),
                axis_label="steps/s",
            ),
        ),
    ),
    Row(
        "Service",
        (
            Panel(
                "gRPC requests by method",
                "RPCs started per second on TrainerService.",
                (
                    Target(
                        _rate("grpc_server_started_total", "grpc_method", TRAINER),
                        "{{grpc_method}}",
                    ),
                ),
                unit="reqps",
            ),
            Panel(
                "gRPC errors by code",
                "RPCs per second that ended with a status other than OK (only codes seen).",
                (
                    Target(
                        _rate(
                            "grpc_server_handled_total",
                            "grpc_method, grpc_code",
                            f'{TRAINER}, grpc_code!="OK"',
                        )
                        + " > 0",
                        "{{grpc_method}} {{grpc_code}}",
                    ),
                ),
                unit="reqps",
            ),
            Panel(
                "gRPC unary latency p99",
                "99th percentile of unary RPC handling time, by method.",
                (
                    Target(
                        _quantile(
                            0.99,
                            "grpc_server_handling_seconds",
                            "grpc_method",
                            f'{TRAINER}, grpc_type="unary"',
                        ),
                        "{{grpc_method}}",
                    ),
                ),
                unit="s",
            ),
            Panel(
                "Memory",
                "Device memory held by tensors (CUDA only) and the server's resident memory.",
                (
                    Target("gradstream_device_memory_allocated_bytes", "{{instance}} {{device}}"),
                    Target(
                        "process_resident_memory_bytes and on (job, instance) gradstream_models",
                        "{{instance}} process RSS",
                    ),
                ),
                unit="bytes",
            ),
        ),
    ),
)


def _variables() -> list[dict[str, Any]]:
    models = "label_values(gradstream_train_steps_total, model)"
    return [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "hide": 0,
        },
        {
            "name": "model",
            "label": "Model",
            "type": "query",
            "datasource": DATASOURCE,
            "definition": models,
            "query": {"query": models, "refId": "model"},
            "refresh": 2,  # on time range change: models come and go
            "includeAll": True,
            "multi": True,
            "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "sort": 1,
            "hide": 0,
        },
    ]


def _panel(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    custom: dict[str, Any] = {"lineWidth": 1, "fillOpacity": 0, "showPoints": "never"}
    if panel.axis_label:
        custom["axisLabel"] = panel.axis_label
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": HEIGHT, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit, "custom": custom}, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": [
            {
                "datasource": DATASOURCE,
                "expr": target.expr,
                "legendFormat": target.legend,
                "range": True,
                "refId": chr(ord("A") + i),
            }
            for i, target in enumerate(panel.targets)
        ],
    }


def dashboard() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model."""
    panels: list[dict[str, Any]] = []
    y = 0
    for row in ROWS:
        panels.append(
            {
                "id": len(panels) + 1,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": WIDTH, "x": 0, "y": y},
                "panels": [],
            }
        )
        y += 1
        x = 0
        for panel in row.panels:
            if x + panel.width > WIDTH:
                x, y = 0, y + HEIGHT
            panels.append(_panel(panel, len(panels) + 1, x, y))
            x += panel.width
        y += HEIGHT
    return {
        "uid": "gradstream",
        "title": "gradstream",
        "description": "Training and service metrics of gradstream servers.",
        "tags": ["gradstream", "pytorch", "grpc"],
        "editable": True,
        "graphTooltip": 1,  # shared crosshair
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser",
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "templating": {"list": _variables()},
        "annotations": {"list": []},
        "links": [],
        "panels": panels,
    }


def render() -> str:
    """The dashboard as the committed file's text."""
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the dashboard to the path given, or to stdout."""
    args = sys.argv[1:] if argv is None else argv
    if args:
        Path(args[0]).write_text(render())
    else:
        sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
