"""Checkpoint triggers and metrics on an in-process server with a checkpoint directory."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from gradstream.client import (
    Client,
    FailedPrecondition,
    ResourceExhausted,
    Unavailable,
)
from gradstream.server.config import Settings
from gradstream.server.listening import StartupRefused
from gradstream.server.main import BackgroundServer
from tests.conftest import SmallVolume

SPEC = {
    "architecture": {"kind": "linear", "in_features": 2, "out_features": 1},
    "optimizer": {"kind": "sgd", "lr": 0.01, "momentum": 0.5},
}


def _batches(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    x = np.ones((4, 2), np.float32)
    return [(x, np.full((4, 1), i, np.float32)) for i in range(n)]


def _steps(model_dir: Path) -> list[int]:
    return [
        json.loads((p / "meta.json").read_text())["body"]["step"]
        for p in sorted(model_dir.glob("ckpt-*"))
    ]


def _wait_for(check: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _settings(directory: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "port": 0,
        "health_port": -1,
        "metrics_port": 0,
        "device": "cpu",
        "checkpoint_dir": directory,
        "checkpoint_every_steps": 0,
        "checkpoint_every_seconds": 0,
        "checkpoint_keep": 10,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def test_every_n_steps_and_on_creation(tmp_path: Path) -> None:
    settings = _settings(tmp_path, checkpoint_every_steps=5)
    with BackgroundServer(settings) as server, Client(server.target) as client:
        client.create_model("m", SPEC)
        assert _steps(tmp_path / "m") == [0]  # on creation, before CreateModel answers
        list(client.train("m", _batches(6)))  # one message: one worker job
        _wait_for(lambda: len(_steps(tmp_path / "m")) == 2, "a checkpoint after 5 steps")
        list(client.train("m", _batches(3)))  # 3 more: not due yet
        list(client.train("m", _batches(3)))
        _wait_for(lambda: len(_steps(tmp_path / "m")) == 3, "a checkpoint 5 steps later")
        assert _steps(tmp_path / "m") == [0, 6, 12]
        port = server.server.metrics_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert "gradstream_checkpoint_duration_seconds_count" in text
        assert 'gradstream_checkpoint_last_success_timestamp_seconds{model="m"}' in text


def test_every_t_seconds_only_when_the_model_changed(tmp_path: Path) -> None:
    settings = _settings(tmp_path, checkpoint_every_seconds=0.2)
    with BackgroundServer(settings) as server, Client(server.target) as client:
        client.create_model("m", SPEC)
        list(client.train("m", _batches(3)))
        _wait_for(lambda: 3 in _steps(tmp_path / "m"), "a timed checkpoint at step 3")
        list(client.train("m", _batches(2)))
        _wait_for(lambda: 5 in _steps(tmp_path / "m"), "a timed checkpoint at step 5")
        # Unchanged models are not written again: one checkpoint per state.
        assert _steps(tmp_path / "m") == sorted(set(_steps(tmp_path / "m")))


def test_save_checkpoint_reports_the_producer_table_and_delete_removes_the_files(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path, checkpoint_keep=2)
    with BackgroundServer(settings) as server, Client(server.target) as client:
        client.create_model("m", SPEC)
        list(client.train("m", _batches(4), producer_id="p", wait_durable=False))
        saved = client.save_checkpoint("m")
        assert (saved.step, saved.producer_sequences) == (4, {"p": 4})
        client.save_checkpoint("m")
        # checkpoint_keep of the requested ones; the server's own (the first) stays.
        assert len(list((tmp_path / "m").glob("ckpt-*-requested"))) == 2
        assert (tmp_path / "m" / "ckpt-0000000001").is_dir()
        client.delete_model("m")
        assert not (tmp_path / "m").exists()


def test_save_checkpoint_without_a_directory_is_a_failed_precondition(
    client: Client, name: str
) -> None:
    client.create_model(name, SPEC)
    with pytest.raises(FailedPrecondition, match="--checkpoint-dir"):
        client.save_checkpoint(name)


def test_batch_limits_hold_after_a_restart(tmp_path: Path) -> None:
    """A restored model is built like a new one: max_batch_rows and max_batch_bytes still apply."""
    settings = _settings(tmp_path, max_batch_rows=8, max_batch_bytes=1000)
    x, y = np.ones((9, 2), np.float32), np.ones((9, 1), np.float32)
    for life in ("created", "restored"):
        with BackgroundServer(settings) as server, Client(server.target) as client:
            if life == "created":
                client.create_model("m", SPEC)
            results = list(client.train("m", [(x, y), (x[:8], y[:8])], skip_rejected=True))
            assert [r.outcome for r in results] == ["REJECTED", "APPLIED"], life
            assert "max_batch_rows: has 9 rows, the limit is 8" in results[0].reason
            with pytest.raises(ResourceExhausted, match="max_batch_rows"):
                client.predict("m", x)


def test_a_checkpoint_copied_into_another_directory_restores_under_that_name(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path)
    with BackgroundServer(settings) as server, Client(server.target) as client:
        client.create_model("a", SPEC)
        list(client.train("a", _batches(3)))
        old = client.save_checkpoint("a").checkpoint
        (tmp_path / "b").mkdir()
        shutil.copytree(tmp_path / "a" / old, tmp_path / "b" / old)
        list(client.train("a", _batches(4)))
        live = client.parameters("a")
    with BackgroundServer(settings) as server, Client(server.target) as client:
        models = {m.name: m.step for m in client.list_models()}
        assert models == {"a": 7, "b": 3}  # a is the live one, b its clone at step 3
        assert all(client.parameters("a")[k].tobytes() == v.tobytes() for k, v in live.items())


def test_a_create_racing_a_delete_of_the_same_name_keeps_its_checkpoint(
    tmp_path: Path,
) -> None:
    wide = {"kind": "mlp", "in_features": 8, "out_features": 1, "hidden": [1024, 1024]}
    slow = {"architecture": wide}
    settings = _settings(tmp_path)
    with BackgroundServer(settings) as server, Client(server.target) as client:
        client.create_model("m", slow)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            # The old worker is busy: the delete waits for it before removing m/.
            busy = pool.submit(client.predict, "m", np.ones((20_000, 8), np.float32))
            time.sleep(0.2)
            deleted = pool.submit(client.delete_model, "m")
            time.sleep(0.2)
            created = pool.submit(client.create_model, "m", SPEC)
            assert not busy.done(), "the slow job ended too soon for this test to mean anything"
            busy.result(timeout=60)
            deleted.result(timeout=60)
            created.result(timeout=60)
        assert _steps(tmp_path / "m") == [0]
    with BackgroundServer(settings) as server, Client(server.target) as client:
        assert [m.name for m in client.list_models()] == ["m"]
        assert client.get_model("m").spec["architecture"]["kind"] == "linear"


def test_a_full_disk_is_resource_exhausted_naming_the_directory_and_counted(
    tmp_path: Path, small_volume: SmallVolume
) -> None:
    volume = small_volume(1024 * 1024)
    settings = _settings(volume)
    with BackgroundServer(settings) as server, Client(server.target) as client:
        client.create_model("m", SPEC)
        filler = volume / "filler"
        with open(filler, "wb") as f, contextlib.suppress(OSError):
            f.write(bytes(2 * 1024 * 1024))
        with pytest.raises(ResourceExhausted) as caught:
            client.save_checkpoint("m")
        assert str(volume / "m") in str(caught.value)
        assert "ENOSPC" in str(caught.value)
        with pytest.raises(ResourceExhausted, match="ENOSPC"):
            client.create_model("n", SPEC)  # not durable: not created
        assert [m.name for m in client.list_models()] == ["m"]
        assert sorted(p.name for p in (volume / "m").iterdir()) == ["ckpt-0000000001"]
        port = server.server.metrics_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert 'gradstream_checkpoint_failures_total{model="m"} 1.0' in text


def test_a_read_only_checkpoint_directory_is_refused_at_start_and_unavailable_later(
    small_volume: SmallVolume,
) -> None:
    with pytest.raises(StartupRefused, match="checkpoint_dir"):
        BackgroundServer(_settings(small_volume(1024 * 1024, "ro")))
    volume = small_volume(1024 * 1024)
    with BackgroundServer(_settings(volume)) as server, Client(server.target) as client:
        client.create_model("m", SPEC)
        subprocess.run(["mount", "-o", "remount,ro", str(volume)], check=True)
        with pytest.raises(Unavailable, match="EROFS"):
            client.save_checkpoint("m")


def test_a_producer_saving_over_and_over_keeps_the_servers_history(tmp_path: Path) -> None:
    settings = _settings(tmp_path, checkpoint_keep=2)
    with BackgroundServer(settings) as server, Client(server.target) as client:
        client.create_model("m", SPEC)
        for _ in range(5):
            list(client.train("m", _batches(1)))
            client.save_checkpoint("m")
        assert "ckpt-0000000001" in [p.name for p in (tmp_path / "m").iterdir()]
