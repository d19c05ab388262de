"""The committed Grafana dashboard is the generator's output and shows what operators need."""

from __future__ import annotations

import json
from typing import Any

from tests.conftest import ROOT
from tools.dashboard import WIDTH, dashboard, main, render

COMMITTED = ROOT / "deploy" / "grafana" / "dashboards" / "gradstream.json"


def _panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def _exprs() -> str:
    return "\n".join(t["expr"] for p in _panels() for t in p["targets"])


def test_the_committed_json_is_what_the_generator_makes() -> None:
    assert COMMITTED.read_text() == render(), "out of date: run `make dashboard`"


def test_main_writes_the_file(tmp_path: Any) -> None:
    out = tmp_path / "d.json"
    assert main([str(out)]) == 0
    assert json.loads(out.read_text()) == dashboard()


def test_every_panel_the_issue_asks_for_is_there() -> None:
    exprs = _exprs()
    for needed in (
        "gradstream_train_loss",
        "gradstream_parameter_value",
        "gradstream_parameter_norm",
        "gradstream_gradient_norm",
        "rate(gradstream_train_steps_total",
        "rate(gradstream_train_samples_total",
        "histogram_quantile(0.5, sum by (model, le) (rate(gradstream_train_step_duration_seconds",
        "histogram_quantile(0.99, sum by (model, le) (rate(gradstream_train_step_duration_seconds",
        "sum by (model, reason) (rate(gradstream_train_batches_rejected_total",
        "sum by (model, reason) (rate(gradstream_train_steps_skipped_total",
        "rate(grpc_server_started_total",
        "sum by (grpc_method, grpc_code) (rate(grpc_server_handled_total",
        "gradstream_device_memory_allocated_bytes",
    ):
        assert needed in exprs, needed


def test_panels_tile_the_grid_without_overlap_and_use_the_datasource_variable() -> None:
    all_panels = dashboard()["panels"]
    assert len({p["id"] for p in all_panels}) == len(all_panels)
    cells: set[tuple[int, int]] = set()
    for panel in all_panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= WIDTH, panel["title"]
        covered = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not covered & cells, f"{panel['title']} overlaps another panel"
        cells |= covered
    for panel in _panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])


def test_model_panels_follow_the_model_variable() -> None:
    for panel in _panels():
        for target in panel["targets"]:
            if "gradstream_" in target["expr"] and "memory" not in target["expr"]:
                assert 'model=~"$model"' in target["expr"], target["expr"]
