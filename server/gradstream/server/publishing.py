"""Continuous export: new versions of each learning model in a directory a server polls.

Layout (version = the model's step)::

    <export_dir>/<model>/config.pbtxt             triton only, rewritten atomically
    <export_dir>/<model>/<step>/model.onnx        triton
    <export_dir>/<model>/<step>/model.pt2         pt2
    <export_dir>/<model>/<step>/model.safetensors safetensors

A version is written into a hidden ``.tmp-*`` folder beside the versions and renamed
into place once complete, so a loader that lists the folder sees whole versions only;
versions beyond the newest ``keep`` are renamed to ``.trash-*`` before they are removed.
Triton's poll mode ignores folders whose names are not numbers.

The model's worker only decides (``due``) and copies (``offer``); encoding and writing
happen on the publisher's thread, newest copy first: a copy still waiting when a newer
one of the same model arrives is dropped.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from gradstream.server.export import TRITON_CONFIG, ExportFormat, ModelCopy, triton_config, write

log = logging.getLogger(__name__)
_TMP = ".tmp-"
_TRASH = ".trash-"


def versions(model_dir: Path) -> list[int]:
    """The complete versions of one model's folder, oldest first."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


class ExportDirectory:
    """Writes versions of models into one directory atomically and prunes old ones."""

    def __init__(
        self, root: Path, fmt: ExportFormat, keep: int = 3, max_batch_size: int = 0
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = root
        self.format = fmt
        self.keep = keep
        self.max_batch_size = max_batch_size

    def write(self, copy: ModelCopy) -> Path:
        """Write ``copy`` as version ``copy.step`` of its model; returns the version's folder.

        A version that exists already is left as it is (the same step holds the same
        parameters).
        """
        model_dir = self.root / copy.name
        final = model_dir / str(copy.step)
        if final.exists():
            return final
        model_dir.mkdir(parents=True, exist_ok=True)
        tmp = model_dir / f"{_TMP}{copy.step}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            if self.format is ExportFormat.TRITON:
                write(copy, ExportFormat.ONNX, tmp)
                # The config first: a version must never appear without the config it needs.
                config = model_dir / f"{_TMP}{TRITON_CONFIG}-{uuid.uuid4().hex[:8]}"
                _write_durably(config, triton_config(copy, self.max_batch_size).encode())
                os.replace(config, model_dir / TRITON_CONFIG)
            else:
                write(copy, self.format, tmp, self.max_batch_size)
            for path in tmp.iterdir():
                _fsync(path)
            _fsync(tmp)
            tmp.rename(final)
            _fsync(model_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in versions(model_dir)[: -self.keep]:
            trash = model_dir / f"{_TRASH}{old}-{uuid.uuid4().hex[:8]}"
            (model_dir / str(old)).rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        return final


class Publisher:
    """Decides when each model is exported and writes the exports on its own thread."""

    def __init__(
        self,
        directory: ExportDirectory,
        every_steps: int = 0,
        every_seconds: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if every_steps <= 0 and every_seconds <= 0:
            raise ValueError("set export_every_steps or export_every_seconds (or both)")
        self.directory = directory
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self._clock = clock
        self._last: dict[str, tuple[int, float]] = {}  # model -> (step, time) of its last offer
        self._waiting: dict[str, ModelCopy] = {}
        self._busy = 0
        self._closed = False
        self._changed = threading.Condition()
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="gradstream-publisher", daemon=True)
        self._thread.start()

    def due(self, name: str, step: int) -> bool:
        """True when ``name`` at ``step`` should be exported: cheap, for the model's worker.

        A model's first step is always due; then every ``every_steps`` steps and/or once
        ``every_seconds`` have passed with a new step.
        """
        last = self._last.get(name)
        if last is None:
            return step > 0
        last_step, last_time = last
        if step == last_step:
            return False
        if self.every_steps and abs(step - last_step) >= self.every_steps:
            return True
        return bool(self.every_seconds) and self._clock() - last_time >= self.every_seconds

    def offer(self, copy: ModelCopy) -> None:
        """Queue a copy for writing; an older copy of the same model still waiting is dropped."""
        self._last[copy.name] = (copy.step, self._clock())
        with self._changed:
            self._waiting[copy.name] = copy
            self._changed.notify_all()

    def forget(self, name: str) -> None:
        """A deleted model: drop its waiting copy and its schedule (its files stay)."""
        self._last.pop(name, None)
        with self._changed:
            self._waiting.pop(name, None)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every offered copy is written; False if ``timeout`` passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._waiting and not self._busy, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Write what is waiting, then stop the thread."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._waiting or self._closed)
                if not self._waiting:
                    return
                name = next(iter(self._waiting))
                copy = self._waiting.pop(name)
                self._busy += 1
            try:
                self.directory.write(copy)
            except Exception:
                # A failed export must not stop the others or training: logged and counted.
                self.failures += 1
                log.exception("export of model %r at step %d failed", copy.name, copy.step)
            finally:
                with self._changed:
                    self._busy -= 1
                    self._changed.notify_all()


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
