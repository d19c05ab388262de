"""``gradstream bench --quick`` runs every contender and scenario and prints the table
(a smoke test, not a measurement)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


def _bench(
    out: Path, *args: str, timeout: float = 600
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """``gradstream bench ARGS --json OUT``, which must succeed; its output and its JSON."""
    result = subprocess.run(
        [sys.executable, "-m", "gradstream.client.cli", "bench", *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    return result, json.loads(out.read_text())


def _script(name: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``benchmarks/NAME ARGS``, which must succeed; its output."""
    script = Path(__file__).parents[2] / "benchmarks" / name
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )


def test_bench_quick_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    result, data = _bench(tmp_path / "bench.json", "--quick", "--ingest-process")
    assert "--quick: smoke test only" in result.stdout
    for scenario in ("small", "medium", "large", "fan-in", "models", "serve"):
        assert scenario in result.stdout
    assert result.stdout.count("service/loop") == 3
    assert result.stdout.count("service/trainer") == 3
    assert "4 producers/1" in result.stdout
    assert "2 models/1" in result.stdout
    assert "predict p99 training/idle" in result.stdout
    assert result.stdout.count("ingest/service") == 3
    assert result.stdout.count("; front process ") == 4  # small, medium, large, models
    assert "2 models/1 (ingest)" in result.stdout
    assert data["quick"] is True
    for name in ("small", "medium", "large"):
        r = data["results"][name]
        assert r["loop"]["steps_per_s"] > 0
        assert r["trainer"]["steps_per_s"] > 0
        assert r["raw"]["bytes_per_s"] > 0
        assert r["service"]["steps_per_s"] > 0
        assert 0 < r["service"]["latency_p50_s"] <= r["service"]["latency_p99_s"]
        assert r["service"]["server_rss_bytes"] > 10_000_000
        # The event loop is the server's main thread; the model's worker is another.
        threads = r["service"]["server_threads"]
        assert "event loop" in threads and len(threads) >= 2, threads
        assert r["shm"]["steps_per_s"] > 0
        # --ingest-process: the server with --ingest process in the same rounds, its ratios,
        # the backend's threads and the front process's CPU.
        for other in ("loop", "trainer", "service"):
            assert r[f"ingest_vs_{other}"] == r["ingest"]["steps_per_s"] / r[other]["steps_per_s"]
        assert r["ingest_vs_raw"] == r["ingest"]["bytes_per_s"] / r["raw"]["bytes_per_s"]
        assert "event loop" in r["ingest"]["server_threads"]
        assert r["ingest"]["front_cores"] > 0
        assert "front_cores" not in r["service"]
        assert r["service_vs_loop"] == r["service"]["steps_per_s"] / r["loop"]["steps_per_s"]
        assert r["shm_vs_raw"] == r["shm"]["bytes_per_s"] / r["raw"]["bytes_per_s"]
        trainer = r["ratios"]["service_vs_trainer"]
        assert trainer["median"] == trainer["worst"] == trainer["rounds"][0]
        assert trainer["median"] == r["service"]["steps_per_s"] / r["trainer"]["steps_per_s"]
    models = data["results"]["models"]
    assert models["ingest_many"]["front_cores"] >= 0  # a 0.5 s window: may round to 0
    assert len(models["ingest_many"]["producers"]) == 2
    assert models["ratios"]["ingest_many_vs_one"]["median"] == (
        models["ingest_many"]["steps_per_s"] / models["ingest_one"]["steps_per_s"]
    )
    for name, producers in (("fan-in", 4), ("models", 2)):
        r = data["results"][name]
        assert len(r["many"]["producers"]) == producers
        assert r["many"]["steps_per_s"] == sum(r["many"]["producers"])
        assert r["one"]["steps_per_s"] > 0
        assert r["ratios"]["many_vs_one"]["median"] == (
            r["many"]["steps_per_s"] / r["one"]["steps_per_s"]
        )
    serve = data["results"]["serve"]
    assert serve["train"]["steps_per_s"] > 0
    assert serve["train_predicting"]["steps_per_s"] > 0
    for part in ("predict", "predict_training"):
        assert serve[part]["predictions_per_s"] > 0
        assert 0 < serve[part]["latency_p50_s"] <= serve[part]["latency_p99_s"]
        # On a schedule at the default rate: never ahead of it.
        assert serve[part]["rate"] == 200
        assert serve[part]["predictions_per_s"] <= 200 * 1.05
    assert "at 200/s" in result.stdout
    p99 = serve["ratios"]["predict_p99_training_vs_idle"]["median"]
    assert p99 == serve["predict_training"]["latency_p99_s"] / serve["predict"]["latency_p99_s"]


def test_bench_serve_sends_predictions_back_to_back_at_rate_zero(tmp_path: Path) -> None:
    result, data = _bench(tmp_path / "serve.json", "serve", "--quick", "--predict-rate", "0")
    serve = data["results"]["serve"]
    assert "back to back" in result.stdout
    for part in ("predict", "predict_training"):
        assert serve[part]["rate"] == 0
        assert serve[part]["predictions_per_s"] > 0


def test_ingest_split_prints_each_part_per_batch() -> None:
    result = _script("ingest_split.py", "small", "large", "--seconds", "0.2", timeout=120)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("torch threads")
    for name, line in zip(("small", "large"), lines[1:], strict=True):
        assert line.startswith(name), line
        for part in ("parse", "decode", "train", "reply", "total"):
            assert f"{part} " in line, line


def test_bench_optimizer_adam_trains_every_contender_with_adam(tmp_path: Path) -> None:
    _, data = _bench(tmp_path / "bench.json", "medium", "--quick", "--optimizer", "adam")
    assert data["machine"].endswith("optimizer adam")
    r = data["results"]["medium"]
    for contender in ("loop", "trainer", "service", "shm"):
        assert r[contender]["steps_per_s"] > 0
    assert r["service_vs_loop"] == r["service"]["steps_per_s"] / r["loop"]["steps_per_s"]
    assert "ingest" not in r  # only with --ingest-process


def test_bench_scenarios_take_the_optimizer_at_the_same_lr() -> None:
    from gradstream.bench.scenarios import SCENARIOS, scenario

    adam = scenario("medium", "adam")
    assert adam.spec["optimizer"] == {
        "kind": "adam",
        "lr": SCENARIOS["medium"].spec["optimizer"]["lr"],
    }
    assert scenario("medium", "sgd") is SCENARIOS["medium"]
    assert SCENARIOS["medium"].spec["optimizer"]["kind"] == "sgd"  # the table is not changed


def test_bench_soak_quick_reports_rss_growth_and_its_samples(tmp_path: Path) -> None:
    result, data = _bench(tmp_path / "soak.json", "soak", "--quick", timeout=300)
    assert "RSS growth over 8 s after warm-up" in result.stdout
    assert "over its second half" in result.stdout
    soak = data["results"]["soak"]["service"]
    samples = soak["rss_samples"]
    assert len(samples) >= 3 and all(rss > 10_000_000 for _, rss in samples)
    assert [t for t, _ in samples] == sorted(t for t, _ in samples)
    assert samples[-1][1] == soak["server_rss_bytes"]
    assert soak["rss_growth"] == (soak["server_rss_bytes"] - samples[0][1]) / samples[0][1]
    assert soak["steps_per_s"] > 0


def test_step_profile_prints_server_cpu_per_step_and_both_profiles() -> None:
    result = _script("step_profile.py", "small", "--seconds", "0.5", "--profile", timeout=180)
    first = result.stdout.splitlines()[0]
    assert first.startswith("small: ") and "steps/s; server CPU us per step:" in first, first
    assert "worker " in first and "event loop " in first
    assert "--- profile worker" in result.stdout
    assert "--- profile event loop" in result.stdout


def test_bench_refuses_a_negative_predict_rate() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gradstream.client.cli", "bench", "serve", "--predict-rate", "-5"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "--predict-rate -5.0: must be 0 (back to back) or more" in result.stderr


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pins to a core of its own")
def test_ingest_pin_alternates_unpinned_and_pinned_runs() -> None:
    result = _script("ingest_pin.py", "small", "--seconds", "0.3", "--rounds", "1", timeout=180)
    lines = result.stdout.splitlines()
    assert [line.split()[2] for line in lines] == ["unpinned", "pinned"], result.stdout
    for line in lines:
        words = line.split()
        assert float(words[3].replace(",", "")) > 0 and float(words[7]) > 0, line
