"""publishing.py: versions appear whole, old ones go, a failed or half-done write never shows."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch

from gradstream.server import export as ex
from gradstream.server import publishing
from gradstream.server.batches import Batch
from gradstream.server.engine import Trainer, TrainOptions
from gradstream.server.publishing import ExportDirectory, Publisher, versions
from gradstream.server.spec import parse_spec

SPEC = {"architecture": {"kind": "linear", "in_features": 3, "out_features": 1}}


def _trainer(name: str = "m") -> Trainer:
    return Trainer(name, parse_spec(SPEC), torch.device("cpu"))


def _step(trainer: Trainer) -> None:
    trainer.train(Batch(torch.ones(2, 3), torch.ones(2, 1)), TrainOptions())


def test_versions_appear_and_the_oldest_are_pruned(tmp_path: Path) -> None:
    directory = ExportDirectory(tmp_path, ex.ExportFormat.SAFETENSORS, keep=2)
    trainer = _trainer()
    for _ in range(4):
        _step(trainer)
        directory.write(ex.copy_model(trainer))
    assert versions(tmp_path / "m") == [3, 4]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["3", "4"]  # no leftovers
    with safetensors.safe_open(str(tmp_path / "m" / "4" / ex.SAFETENSORS_FILE), "pt") as f:
        assert f.metadata()["gradstream.step"] == "4"
        weight = dict(trainer.module.named_parameters())["weight"]
        assert torch.equal(f.get_tensor("weight"), weight.detach())


def test_a_failed_write_leaves_no_version_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = ExportDirectory(tmp_path, ex.ExportFormat.SAFETENSORS, keep=2)
    trainer = _trainer()
    _step(trainer)
    directory.write(ex.copy_model(trainer))

    def half_then_fail(copy: ex.ModelCopy, fmt: Any, folder: Path, *_: Any) -> Path:
        (folder / ex.SAFETENSORS_FILE).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(publishing, "write", half_then_fail)
    _step(trainer)
    with pytest.raises(OSError, match="disk full"):
        directory.write(ex.copy_model(trainer))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1"]


def test_a_version_being_written_is_never_visible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A watcher lists the folder while a write is held halfway: it sees nothing new."""
    halfway, resume = threading.Event(), threading.Event()
    real_write = ex.write

    def slow_write(copy: ex.ModelCopy, fmt: Any, folder: Path, *rest: Any) -> Path:
        path = real_write(copy, fmt, folder, *rest)
        halfway.set()
        assert resume.wait(10)
        return path

    monkeypatch.setattr(publishing, "write", slow_write)
    directory = ExportDirectory(tmp_path, ex.ExportFormat.TRITON, keep=3)
    trainer = _trainer()
    _step(trainer)
    writer = threading.Thread(target=directory.write, args=(ex.copy_model(trainer),))
    writer.start()
    assert halfway.wait(60)
    assert versions(tmp_path / "m") == []
    assert not (tmp_path / "m" / ex.TRITON_CONFIG).exists()
    resume.set()
    writer.join(60)
    assert versions(tmp_path / "m") == [1]
    assert (tmp_path / "m" / "1" / ex.ONNX_FILE).stat().st_size > 0
    assert 'name: "m"' in (tmp_path / "m" / ex.TRITON_CONFIG).read_text()


def test_every_version_a_watcher_sees_is_complete(tmp_path: Path) -> None:
    directory = ExportDirectory(tmp_path, ex.ExportFormat.SAFETENSORS, keep=2)
    trainer = _trainer()
    seen: set[int] = set()
    broken: list[str] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for version in versions(tmp_path / "m"):
                try:
                    with safetensors.safe_open(
                        str(tmp_path / "m" / str(version) / ex.SAFETENSORS_FILE), "pt"
                    ) as f:
                        step = int(f.metadata()["gradstream.step"])
                except Exception as exc:
                    # Pruned between the listing and the open: safetensors reports the
                    # missing file as its own error type, so ask the directory instead.
                    if (tmp_path / "m" / str(version)).exists():
                        broken.append(f"{version}: {exc}")
                    continue
                if step != version:
                    broken.append(f"{version}: holds step {step}")
                seen.add(version)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(30):
            _step(trainer)
            directory.write(ex.copy_model(trainer))
    finally:
        done.set()
        watcher.join(10)
    assert not broken
    assert seen and max(seen) <= 30
    assert versions(tmp_path / "m") == [29, 30]


def test_publisher_exports_every_n_steps_on_its_thread(tmp_path: Path) -> None:
    directory = ExportDirectory(tmp_path, ex.ExportFormat.SAFETENSORS, keep=10)
    publisher = Publisher(directory, every_steps=3)
    trainer = _trainer()
    try:
        for _ in range(10):
            _step(trainer)
            if publisher.due(trainer.name, trainer.step):
                publisher.offer(ex.copy_model(trainer))
                assert publisher.flush(30)
    finally:
        publisher.close(30)
    assert versions(tmp_path / "m") == [1, 4, 7, 10]
    assert publisher.failures == 0


def test_publisher_by_seconds(tmp_path: Path) -> None:
    now = [0.0]
    directory = ExportDirectory(tmp_path, ex.ExportFormat.SAFETENSORS, keep=10)
    publisher = Publisher(directory, every_seconds=5.0, clock=lambda: now[0])
    trainer = _trainer()
    try:
        assert not publisher.due("m", 0)  # nothing trained yet
        _step(trainer)
        assert publisher.due("m", 1)
        publisher.offer(ex.copy_model(trainer))
        assert not publisher.due("m", 2)  # 0 s later
        now[0] = 6.0
        assert not publisher.due("m", 1)  # no new step
        assert publisher.due("m", 2)
    finally:
        publisher.close(30)


def test_a_newer_copy_replaces_one_still_waiting(tmp_path: Path) -> None:
    directory = ExportDirectory(tmp_path, ex.ExportFormat.SAFETENSORS, keep=10)
    started, release = threading.Event(), threading.Event()
    real_write = directory.write

    def held_write(copy: ex.ModelCopy) -> Path:
        started.set()
        assert release.wait(10)
        return real_write(copy)

    directory.write = held_write  # type: ignore[method-assign]
    publisher = Publisher(directory, every_steps=1)
    trainer = _trainer()
    try:
        for _ in range(3):
            _step(trainer)
            publisher.offer(ex.copy_model(trainer))
            assert started.wait(10)  # step 1 is being written, 2 then 3 wait
        release.set()
        assert publisher.flush(30)
    finally:
        publisher.close(30)
    assert versions(tmp_path / "m") == [1, 3]


def test_publisher_needs_a_schedule(tmp_path: Path) -> None:
    directory = ExportDirectory(tmp_path, ex.ExportFormat.SAFETENSORS)
    with pytest.raises(ValueError, match="export_every_steps"):
        Publisher(directory)
