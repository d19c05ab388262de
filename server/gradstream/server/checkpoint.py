"""Checkpoints: atomic save, validated restore, retention. Nothing is ever unpickled.

On disk, per model::

    <checkpoint_dir>/<model>/ckpt-0000000007/tensors.safetensors   parameters, momentum, ...
                                            /meta.json             step, spec, producers, digests
                                            /program.pt2           an exported model's archive
    <checkpoint_dir>/<model>/ckpt-0000000008-requested/...         one a client asked for
    <checkpoint_dir>/<model>/.tmp-...                              a write in progress (or killed)

The directory's name is the model's name: a checkpoint copied into another
model's directory restores as that model, whatever name its meta.json records.
Checkpoints the server takes (periodic, first, final) and the ones clients ask
for (SaveCheckpoint) are retained separately, ``keep`` of each: a client with
the train action cannot push the server's own history out.

A checkpoint is written into a ``.tmp-`` directory, every file and the directory
fsynced, then renamed to ``ckpt-<serial>`` and the model directory fsynced: a
``ckpt-`` directory is complete or absent, whatever moment the writer dies at.
``meta.json`` carries the SHA-256 of the tensors file and of its own body, so a
truncated or flipped byte is found at restore, which then falls back to the
previous checkpoint.

What a checkpoint holds is the model's state between two worker jobs: the
parameters, the optimizer state (SGD's momentum buffers), the step, the spec,
the RNG state, the producer-sequence table, and, when a step is being
accumulated (``pending > 0``), the accumulated ``.grad`` of every parameter and
the pending count. The producer table marks a batch as applied once its
gradient is in ``.grad``, so saving ``.grad`` with it keeps "every applied batch
is applied once" exact across a crash, mid-accumulation included.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import safetensors.torch
import torch

from gradstream.server.engine import Trainer, TrainerFactory, TrainerState
from gradstream.server.errors import (
    DataLoss,
    FailedPrecondition,
    GradstreamError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from gradstream.server.metrics import Metrics
from gradstream.server.spec import check_model_name, parse_spec

if TYPE_CHECKING:
    from gradstream.server.registry import ModelRegistry
    from gradstream.server.worker import ModelWorker

log = logging.getLogger("gradstream.server")

FORMAT = 1
TENSORS = "tensors.safetensors"
META = "meta.json"
PROGRAM = "program.pt2"  # an exported model's torch.export archive, as the client sent it
# Far above any real model's: a safetensors header lists names, dtypes, shapes and offsets.
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_META_BYTES = 16 * 1024 * 1024
_CHECKPOINT = re.compile(r"ckpt-(\d{10})(-requested)?")
REQUESTED = "-requested"  # suffix of the checkpoints clients asked for
_FULL = (errno.ENOSPC, errno.EDQUOT)
_LEFTOVER_PREFIXES = (".tmp-", ".trash-")
_STATE_PREFIXES = ("param", "grad", "optim")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A model's state copied off the device: what one checkpoint holds."""

    name: str
    spec: dict[str, Any]  # JSON form; init tensors live in ``tensors`` as init/<name>
    step: int
    pending: int
    nonfinite_streak: int
    producers: dict[str, int]
    param_groups: list[dict[str, Any]]  # optimizer hyperparameters, without the params
    optimizer_scalars: dict[str, dict[str, Any]]  # non-tensor optimizer state per parameter
    tensors: dict[str, torch.Tensor]  # on the CPU, contiguous, nothing shared
    created: float = field(default_factory=time.time)
    schedule: list[dict[str, Any]] | None = None  # the lr schedule's progress
    program: bytes = b""  # architecture exported: the archive, so restore needs no client


@dataclass(frozen=True, slots=True)
class SavedCheckpoint:
    """A checkpoint that is on disk: its directory name, step and producer table."""

    name: str
    step: int
    producers: dict[str, int]


# -- state <-> snapshot --------------------------------------------------------------------


def take(trainer: Trainer) -> Snapshot:
    """Copy a trainer's state to the CPU; run it on the model's worker (between jobs)."""
    state = trainer.state_dict()
    tensors = {key: _cpu_copy(value) for key, value in state["tensors"].items()}
    spec = trainer.spec.model_dump()
    for name, value in spec["init"].pop("tensors").items():
        tensors[f"init/{name}"] = torch.from_numpy(np.array(value, copy=True))
    spec["init"]["tensors"] = {}
    tensors["rng/cpu"] = torch.get_rng_state()
    if trainer.device.type == "cuda":
        tensors["rng/cuda"] = torch.cuda.get_rng_state(trainer.device)
    return Snapshot(
        name=trainer.name,
        spec=json.loads(json.dumps(spec)),  # tuples -> lists: what a reload gives
        step=state["step"],
        pending=state["pending"],
        nonfinite_streak=state["nonfinite_streak"],
        producers=state["producers"],
        param_groups=state["param_groups"],
        optimizer_scalars=state["optimizer_scalars"],
        tensors=tensors,
        schedule=state["schedule"],
        program=trainer.spec.architecture.program,
    )


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True).contiguous()


def restore(snapshot: Snapshot, factory: TrainerFactory) -> Trainer:
    """Build, with ``factory``, the trainer a snapshot describes, in the state it was saved in."""
    where = f"checkpoint of model {snapshot.name!r}"
    tensors = snapshot.tensors
    spec_data = json.loads(json.dumps(snapshot.spec))
    spec_data["init"]["tensors"] = {
        key.removeprefix("init/"): value.numpy()
        for key, value in tensors.items()
        if key.startswith("init/")
    }
    if snapshot.program:
        spec_data["architecture"]["program"] = snapshot.program
    try:
        spec = parse_spec(spec_data)
    except GradstreamError as exc:
        raise DataLoss(f"{where}: its spec no longer validates: {exc}") from None
    state = TrainerState(
        tensors={k: v for k, v in tensors.items() if k.split("/", 1)[0] in _STATE_PREFIXES},
        step=snapshot.step,
        pending=snapshot.pending,
        nonfinite_streak=snapshot.nonfinite_streak,
        producers=dict(snapshot.producers),
        frozen=list(spec.frozen),
        param_groups=snapshot.param_groups,
        optimizer_scalars=snapshot.optimizer_scalars,
        schedule=snapshot.schedule,
    )
    try:
        trainer = factory.build(snapshot.name, spec, state)
    except ValueError as exc:
        raise DataLoss(f"{where}: {exc}") from None
    # One RNG per process: the state of the last model restored wins. No built-in
    # architecture draws random numbers while training; dropout in a plug-in does.
    if "rng/cpu" in tensors:
        torch.set_rng_state(tensors["rng/cpu"])
    if "rng/cuda" in tensors and factory.device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng/cuda"], factory.device)
    return trainer


# -- files ---------------------------------------------------------------------------------


def write(
    model_dir: Path, snapshot: Snapshot, keep: int, requested: bool = False
) -> SavedCheckpoint:
    """Write a snapshot atomically as the model's newest checkpoint, then keep the newest ``keep``.

    ``requested``: a client asked for it; those are retained apart from the server's own.
    Leftovers of a writer killed before its prune go first; short of space, so do
    the checkpoints this write would retire anyway (never the last one). A failed
    write leaves no temporary directory behind.
    Not safe against a concurrent writer of the same model: the caller serializes.
    """
    created = not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    if created:
        _fsync_dir(model_dir.parent)
    # A writer killed between its rename and its prune leaves keep + 1; retire those
    # first so that crash after crash the directory never holds more than keep + 1.
    _prune(model_dir, keep, requested)
    data = safetensors.torch.save(snapshot.tensors)
    meta = _meta(snapshot, data)
    size = len(data) + len(meta) + len(snapshot.program)
    if _free_bytes(model_dir) < size + _SLACK_BYTES:
        _prune(model_dir, keep - 1, requested)
    try:
        final = _write_checkpoint(model_dir, data, meta, requested, snapshot.program)
    except OSError as exc:
        if exc.errno not in _FULL or not _prune(model_dir, keep - 1, requested):
            raise
        final = _write_checkpoint(
            model_dir, data, meta, requested, snapshot.program
        )  # once, with the room freed
    _prune(model_dir, keep, requested)
    return SavedCheckpoint(final.name, snapshot.step, dict(snapshot.producers))


# Filesystem blocks and the directory entries beyond the two files' bytes.
_SLACK_BYTES = 64 * 1024


def _free_bytes(path: Path) -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def _prune(model_dir: Path, keep: int, requested: bool) -> bool:
    """Remove the oldest checkpoints of one kind beyond ``keep`` (at least one stays).

    Returns whether anything was removed.
    """
    same_kind = [path for _, path in _checkpoints(model_dir) if _is_requested(path) == requested]
    old = same_kind[: -max(keep, 1)]
    for path in old:
        _remove(path)
    return bool(old)


def _is_requested(path: Path) -> bool:
    return path.name.endswith(REQUESTED)


def _write_checkpoint(
    model_dir: Path, data: bytes, meta: bytes, requested: bool, program: bytes = b""
) -> Path:
    serial = max((s for s, _ in _checkpoints(model_dir)), default=0) + 1
    tmp = model_dir / f".tmp-{serial:010d}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        _write_file(tmp / TENSORS, data)
        if program:
            _write_file(tmp / PROGRAM, program)
        _write_file(tmp / META, meta)
        _fsync_dir(tmp)
        final = model_dir / f"ckpt-{serial:010d}{REQUESTED if requested else ''}"
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk must not fill up with leftovers
        raise
    _fsync_dir(model_dir)
    return final


def _meta(snapshot: Snapshot, data: bytes) -> bytes:
    body = {
        "model": snapshot.name,
        "created": snapshot.created,
        "spec": snapshot.spec,
        "step": snapshot.step,
        "pending": snapshot.pending,
        "nonfinite_streak": snapshot.nonfinite_streak,
        "producers": snapshot.producers,
        "param_groups": snapshot.param_groups,
        "optimizer_scalars": snapshot.optimizer_scalars,
        "schedule": snapshot.schedule,
    }
    meta = {
        "format": FORMAT,
        "tensors_sha256": hashlib.sha256(data).hexdigest(),
        "body_sha256": _digest(body),
        "body": body,
    }
    if snapshot.program:
        meta["program_sha256"] = hashlib.sha256(snapshot.program).hexdigest()
    return json.dumps(meta, indent=1, sort_keys=True).encode()


def read(path: Path) -> Snapshot:
    """Load and verify one checkpoint directory; DATA_LOSS says what is wrong with it."""
    where = f"checkpoint {path.parent.name}/{path.name}"
    meta_path, tensors_path = path / META, path / TENSORS
    for required in (meta_path, tensors_path):
        if not required.is_file():
            others = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
            raise DataLoss(f"{where}: {required.name} is missing (found {others})")
    if meta_path.stat().st_size > MAX_META_BYTES:
        raise DataLoss(f"{where}: {META} is over {MAX_META_BYTES} bytes")
    try:
        meta = json.loads(meta_path.read_bytes())
        body = meta["body"]
        if meta["format"] != FORMAT:
            raise DataLoss(f"{where}: format {meta['format']!r}, this server reads {FORMAT}")
        if _digest(body) != meta["body_sha256"]:
            raise DataLoss(f"{where}: {META} does not match its checksum (corrupt)")
    except (ValueError, KeyError, TypeError) as exc:
        raise DataLoss(f"{where}: {META} is not a valid checkpoint record ({exc})") from None
    data = tensors_path.read_bytes()
    check_safetensors_header(data, f"{where}: {TENSORS}")
    if hashlib.sha256(data).hexdigest() != meta["tensors_sha256"]:
        raise DataLoss(f"{where}: {TENSORS} does not match its checksum (corrupt or truncated)")
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise DataLoss(f"{where}: {TENSORS} does not parse: {exc}") from None
    program = b""
    if "program_sha256" in meta:
        program_path = path / PROGRAM
        if not program_path.is_file():
            raise DataLoss(f"{where}: {PROGRAM} is missing")
        program = program_path.read_bytes()
        if hashlib.sha256(program).hexdigest() != meta["program_sha256"]:
            raise DataLoss(f"{where}: {PROGRAM} does not match its checksum (corrupt or truncated)")
    try:
        return Snapshot(
            name=str(body["model"]),
            spec=dict(body["spec"]),
            step=int(body["step"]),
            pending=int(body["pending"]),
            nonfinite_streak=int(body["nonfinite_streak"]),
            producers={str(k): int(v) for k, v in body["producers"].items()},
            param_groups=list(body["param_groups"]),
            optimizer_scalars=dict(body["optimizer_scalars"]),
            tensors=tensors,
            created=float(body["created"]),
            schedule=body.get("schedule"),
            program=program,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DataLoss(f"{where}: {META} lacks a field ({exc})") from None


def check_safetensors_header(data: bytes, what: str) -> None:
    """Refuse what is not a safetensors file, above all a pickle, before anything parses it."""
    if data[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or data[:2] == b"PK":
        raise DataLoss(
            f"{what} is a pickle or a torch.save archive, not safetensors: refused "
            "(checkpoints are never unpickled)"
        )
    if len(data) < 8:
        raise DataLoss(f"{what} is {len(data)} bytes: truncated")
    header = int.from_bytes(data[:8], "little")
    if header > MAX_HEADER_BYTES:
        raise DataLoss(
            f"{what} declares a {header}-byte header, "
            f"over the {MAX_HEADER_BYTES}-byte limit: refused"
        )
    if 8 + header > len(data):
        raise DataLoss(
            f"{what} declares a {header}-byte header but has {len(data)} bytes: truncated"
        )


def newest(model_dir: Path) -> tuple[Path, Snapshot, list[tuple[Path, str]]]:
    """The newest checkpoint that loads, with the newer ones skipped and why.

    Leftovers of killed writes are removed first. Raises DATA_LOSS when none loads.
    """
    remove_leftovers(model_dir)
    skipped: list[tuple[Path, str]] = []
    for _, path in reversed(_checkpoints(model_dir)):
        try:
            return path, read(path), skipped
        except DataLoss as exc:
            skipped.append((path, exc.message))
    reasons = "; ".join(reason for _, reason in skipped) or "the directory holds none"
    raise DataLoss(f"model {model_dir.name!r} has no valid checkpoint: {reasons}")


def remove_leftovers(model_dir: Path) -> list[Path]:
    """Delete the temporary directories killed writes and prunes left behind."""
    removed = []
    for path in model_dir.iterdir():
        if path.name.startswith(_LEFTOVER_PREFIXES):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _checkpoints(model_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in model_dir.iterdir():
        match = _CHECKPOINT.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _remove(path: Path) -> None:
    # Renamed first so a crash halfway through rmtree leaves a leftover, not a broken ckpt-.
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def check_directory(directory: Path) -> None:
    """Create the checkpoint directory if needed and prove it takes a file; OSError if not."""
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".tmp-probe-{uuid.uuid4().hex[:8]}"
    try:
        _write_file(probe, b"gradstream")
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def _write_error(name: str, model_dir: Path, exc: OSError) -> GradstreamError:
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    what = (
        f"checkpoint of model {name!r} into {model_dir} failed: {code} ({exc.strerror}); "
        "the model itself is unharmed"
    )
    if exc.errno in _FULL:
        return ResourceExhausted(f"{what}; free space on the checkpoint volume")
    return Unavailable(what)


def _digest(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- when to checkpoint ----------------------------------------------------------------------


class Checkpointer:
    """Decides when each model is checkpointed, writes in the background, restores at start-up.

    The state is copied under the model's worker (a job between two steps), so
    training stalls only for the copy; the files are written on a thread. Writes
    of one model are serialized; writes of different models run side by side.
    """

    def __init__(
        self,
        directory: Path | None,
        metrics: Metrics,
        every_steps: int = 0,
        every_seconds: float = 0.0,
        keep: int = 3,
    ) -> None:
        self.directory = directory
        self.metrics = metrics
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.keep = keep
        self._durable: dict[str, dict[str, int]] = {}
        self._saved: dict[str, tuple[int, int, float]] = {}  # step, pending, monotonic time
        self._locks: dict[str, asyncio.Lock] = {}
        self._scheduled: dict[str, asyncio.Task[Any]] = {}
        # Workers of deleted models: a save still scheduled for one must not bring it back.
        self._retired: weakref.WeakSet[ModelWorker] = weakref.WeakSet()

    @property
    def enabled(self) -> bool:
        """Whether a checkpoint directory was given."""
        return self.directory is not None

    def durable_sequence(self, model: str, producer: str) -> int:
        """The producer's last sequence saved in the model's newest checkpoint (0: none)."""
        return self._durable.get(model, {}).get(producer, 0)

    async def save(self, worker: ModelWorker, requested: bool = False) -> SavedCheckpoint:
        """Checkpoint one model now; returns once the checkpoint is durable on disk.

        ``requested``: a client's SaveCheckpoint, retained apart from the server's own.
        A full disk is RESOURCE_EXHAUSTED, any other failure to write UNAVAILABLE; both
        name the directory and the errno.
        """
        if self.directory is None:
            raise FailedPrecondition("checkpoints are off: start the server with --checkpoint-dir")
        name = worker.trainer.name
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if worker in self._retired:
                raise NotFound(f"model {name!r} was deleted")
            start = time.perf_counter()
            try:
                snapshot = await worker.run(take)
                saved = await asyncio.to_thread(
                    write, self.directory / name, snapshot, self.keep, requested
                )
            except GradstreamError:
                self.metrics.checkpoint_failures.labels(name).inc()
                raise
            except OSError as exc:
                self.metrics.checkpoint_failures.labels(name).inc()
                raise _write_error(name, self.directory / name, exc) from None
            except Exception as exc:
                self.metrics.checkpoint_failures.labels(name).inc()
                log.error("checkpoint of model %r failed", name, exc_info=exc)
                raise GradstreamError(f"checkpoint of model {name!r} failed") from exc
            self.metrics.checkpoint_duration.observe(time.perf_counter() - start)
            self.metrics.checkpoint_last_success.labels(name).set(time.time())
            self._durable[name] = saved.producers
            self._saved[name] = (snapshot.step, snapshot.pending, time.monotonic())
            log.info(
                "checkpoint written model=%s checkpoint=%s step=%d", name, saved.name, saved.step
            )
            return saved

    def after_steps(self, worker: ModelWorker) -> None:
        """Schedule a checkpoint when ``every_steps`` steps passed since the last one."""
        if self.directory is None or not self.every_steps:
            return
        trainer = worker.trainer
        last_step = self._saved.get(trainer.name, (0, 0, 0.0))[0]
        if trainer.step - last_step >= self.every_steps:
            self._schedule(worker)

    def _schedule(self, worker: ModelWorker) -> None:
        name = worker.trainer.name
        running = self._scheduled.get(name)
        if running is not None and not running.done():
            return  # the next trigger catches up once this one is written
        self._scheduled[name] = asyncio.create_task(self._save_quietly(worker))

    async def _save_quietly(self, worker: ModelWorker) -> None:
        try:
            await self.save(worker)
        except GradstreamError as exc:  # counted in save(); the next trigger retries
            log.warning("periodic checkpoint of %r failed: %s", worker.trainer.name, exc.message)

    async def run_timer(self, registry: ModelRegistry) -> None:
        """Every ``every_seconds``, checkpoint the models that changed since their last one."""
        if self.directory is None or not self.every_seconds:
            return
        while True:
            await asyncio.sleep(min(1.0, self.every_seconds))
            now = time.monotonic()
            for name in registry.names():
                try:
                    worker = registry.get(name)
                except GradstreamError:
                    continue
                step, pending, when = self._saved.get(name, (-1, -1, 0.0))
                changed = (worker.trainer.step, worker.trainer.pending) != (step, pending)
                if changed and now - when >= self.every_seconds:
                    self._schedule(worker)

    async def save_all(self, registry: ModelRegistry) -> None:
        """A final checkpoint of every model (the drain on SIGTERM)."""
        if self.directory is None:
            return
        workers = []
        for name in registry.names():
            try:
                workers.append(registry.get(name))
            except GradstreamError:
                continue
        results = await asyncio.gather(*(self.save(w) for w in workers), return_exceptions=True)
        for worker, result in zip(workers, results, strict=True):
            if isinstance(result, BaseException):
                log.error("final checkpoint of %r failed: %s", worker.trainer.name, result)

    async def restore_all(self, registry: ModelRegistry) -> None:
        """Make every model in the directory resident again from its newest valid checkpoint."""
        if self.directory is None:
            return
        check_directory(self.directory)
        for model_dir in sorted(self.directory.iterdir()):
            if not model_dir.is_dir() or model_dir.name.startswith("."):
                continue
            await self._restore(registry, model_dir)
        for leftover in self.directory.iterdir():
            if leftover.name.startswith(".deleted-"):
                shutil.rmtree(leftover, ignore_errors=True)

    async def _restore(self, registry: ModelRegistry, model_dir: Path) -> None:
        name = model_dir.name
        try:
            check_model_name(name)
        except GradstreamError as exc:
            log.error("directory %s is not restored: %s", model_dir, exc.message)
            return
        try:
            path, snapshot, skipped = await asyncio.to_thread(newest, model_dir)
            if snapshot.name != name:
                # The directory decides: a checkpoint copied from a/ into b/ is a clone
                # named b, never a stale a replacing the live one.
                log.warning(
                    "checkpoint %s/%s records model %r: restored as %r, its directory's name",
                    name,
                    path.name,
                    snapshot.name,
                    name,
                )
                snapshot = dataclasses.replace(snapshot, name=name)
            for bad, reason in skipped:
                self.metrics.checkpoint_restore_fallbacks.labels(name).inc()
                log.error("skipping checkpoint %s of model %r: %s", bad.name, name, reason)
            trainer = await asyncio.to_thread(restore, snapshot, registry.factory)
        except GradstreamError as exc:  # DATA_LOSS, or a spec this server cannot build
            log.error("model %r not restored: %s", name, exc.message)
            registry.mark_lost(name, exc.message)
            return
        registry.adopt(trainer)
        self._durable[name] = dict(snapshot.producers)
        self._saved[name] = (snapshot.step, snapshot.pending, time.monotonic())
        self.metrics.checkpoint_last_success.labels(name).set(snapshot.created)
        log.info("model restored name=%s checkpoint=%s step=%d", name, path.name, snapshot.step)

    async def forget(self, name: str, worker: ModelWorker | None = None) -> None:
        """Delete a deleted model's checkpoints, so that a restart does not bring it back."""
        if worker is not None:
            self._retired.add(worker)
        self._durable.pop(name, None)
        self._saved.pop(name, None)
        if self.directory is None or not (self.directory / name).exists():
            return
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            gone = self.directory / f".deleted-{name}-{uuid.uuid4().hex[:8]}"
            (self.directory / name).rename(gone)
            await asyncio.to_thread(_fsync_dir, self.directory)
            await asyncio.to_thread(shutil.rmtree, gone, True)
        self._locks.pop(name, None)
        with contextlib.suppress(KeyError):
            self.metrics.checkpoint_last_success.remove(name)
