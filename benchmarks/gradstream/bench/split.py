"""A prototype for measurement, not a server feature: ingest in one process, training in others.

``python -m gradstream.bench.split --ready-file F --device cpu --threads N`` starts a
**front** process: a ``grpc.aio`` server on 127.0.0.1:0 serving the ``gradstream.v1``
methods the bench's SDK client calls (CreateModel, GetModel, ListModels, DeleteModel,
GetParameters, Train; anything else is UNIMPLEMENTED). It receives Train messages and
parses them (``wire.parse_train_request``) on its event loop; a thread per model decodes
and checks them (``session.decode_message`` with the model's ``BatchChecker``, built from
the spec as the server builds it) and copies the checked tensors of each message into a
slot of the model's shared-memory ring, while the event loop receives the next one. A
**trainer process** per model (spawned at CreateModel) builds the model with the server's
``TrainerFactory``, views the slot's tensors without a copy and steps them with
``session.train_message``; its results come back to the front, which answers them in order.

Ring and hand-off, per model: one ``SharedMemory`` segment of ``queue_depth + 1`` slots,
written only by the front (the trainer trusts it: no copy, no re-check). The front sends a
small pickled descriptor over a ``multiprocessing`` pipe (slot, and per tensor column its
offset, dtype and shape; a block-decoded message is one block per column, which the
trainer splits with ``unbind(0)`` as the server does); the trainer answers with the
results as tuples, and that answer releases the slot. A message whose checked tensors do
not fit a slot travels pickled in the descriptor. REJECTED batches travel as their
reasons only, so ``train_message`` numbers them in place. The trainer maps the segment
from ``/dev/shm`` itself; the front unlinks it when the model is deleted, when its
trainer dies, and on exit (the resource tracker does so if the front is killed); a
trainer whose front is gone reads EOF and exits.

Left out on purpose: auth and TLS, exactly-once producers (``producer_id``), checkpoints
and restore, Predict / Evaluate / Export / ComputeGradients / UpdateModel /
SetParameters, metrics and publishing, the client's shared-memory path, data-parallel
ranks, draining.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import mmap
import multiprocessing
import os
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from gradstream.bench.served import announce, started
from gradstream.server.allocator import tune_allocator
from gradstream.server.app import intra_op_threads
from gradstream.server.batches import Batch, BatchChecker
from gradstream.server.codec import encode
from gradstream.server.config import Settings
from gradstream.server.engine import Outcome, StepResult, Trainer, TrainerFactory, TrainOptions
from gradstream.server.errors import (
    AlreadyExists,
    GradstreamError,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from gradstream.server.interceptors import ErrorInterceptor
from gradstream.server.servicer import _info, _train_response
from gradstream.server.session import (
    WORKER_CHECK_BYTES,
    Rejected,
    _mean_batch_bytes,
    decode_message,
    train_message,
)
from gradstream.server.slots import ALIGN, block_of, columns_of
from gradstream.server.spec import ModelSpec, check_model_name, parse_spec
from gradstream.server.wire import TrainMessage, WireBatch, parse_train_request
from gradstream.v1 import trainer_pb2 as pb
from gradstream.wire import spec_from_proto

SLOT_BYTES = 16 << 20  # a 4 MiB message converted to a wider dtype still fits
START_TIMEOUT_S = 120.0  # a trainer process imports torch and builds its model
STOP_TIMEOUT_S = 5.0
TRAINER_COMM = "split-trainer"  # the trainer processes' name in /proc/<pid>/comm
SERVED = ("CreateModel", "GetModel", "ListModels", "DeleteModel", "GetParameters", "Train")

# A tensor in a slot: (offset from the slot's start, dtype name, shape).
Ref = tuple[int, str, tuple[int, ...]]


class _RemoteError(GradstreamError):
    """An error the trainer process raised, with its status code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code  # type: ignore[misc]


def _error(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, GradstreamError):
        return exc.code, exc.message
    return "INTERNAL", f"{type(exc).__name__}: {exc}"


# -- the hand-off: checked batches into a slot, and back out as tensors -----------------------


def pack(items: list[Batch | Rejected], slot: np.ndarray[Any, Any]) -> tuple[Any, ...]:
    """Copy a message's checked tensors into ``slot``; the descriptor that finds them again.

    ``("block", sequences, refs)``: every batch checked, each column one block;
    ``("items", [...])``: per batch its sequence and refs, or ``Rejected``;
    ``("inline", items)``: did not fit, the tensors themselves (pickled).
    """
    offset = 0

    def put(t: torch.Tensor) -> Ref:
        nonlocal offset
        end = offset + t.nbytes
        if end > slot.nbytes:
            raise OverflowError
        target = torch.from_numpy(slot[offset:end]).view(t.dtype).view(t.shape)
        target.copy_(t)
        ref = (offset, str(t.dtype).removeprefix("torch."), tuple(t.shape))
        offset = -(-end // ALIGN) * ALIGN
        return ref

    try:
        batches = [i for i in items if isinstance(i, Batch)]
        if len(batches) == len(items) > 1:
            blocks: list[torch.Tensor | None] = []
            for column in zip(*(columns_of(b) for b in batches), strict=True):
                present = [t for t in column if t is not None]
                block = block_of(present) if len(present) == len(column) else None
                if present and block is None:
                    break
                blocks.append(block)
            else:
                refs = [None if b is None else put(b) for b in blocks]
                return ("block", [b.sequence for b in batches], refs)
        described: list[Any] = []
        for item in items:
            if isinstance(item, Rejected):
                described.append(item)
            else:
                described.append(
                    (item.sequence, [None if t is None else put(t) for t in columns_of(item)])
                )
        return ("items", described)
    except OverflowError:
        return ("inline", items)


def unpack(buffer: mmap.mmap, base: int, descriptor: tuple[Any, ...]) -> list[Batch | Rejected]:
    """The batches of a descriptor, as views of the slot at ``base`` (no copy)."""

    def view(ref: Ref | None) -> torch.Tensor | None:
        if ref is None:
            return None
        offset, dtype, shape = ref
        kind = getattr(torch, dtype)
        count = int(np.prod(shape)) if shape else 1
        return torch.frombuffer(buffer, dtype=kind, count=count, offset=base + offset).view(shape)

    def batch(sequence: int, tensors: list[torch.Tensor | None]) -> Batch:
        x, y, weight, *more = tensors
        assert x is not None and y is not None
        return Batch(x, y, weight, sequence, tuple(t for t in more if t is not None))

    kind = descriptor[0]
    if kind == "inline":
        return list(descriptor[1])
    if kind == "block":
        _, sequences, refs = descriptor
        split = [None if r is None else view(r).unbind(0) for r in refs]  # type: ignore[union-attr]
        return [
            batch(s, [None if c is None else c[i] for c in split]) for i, s in enumerate(sequences)
        ]
    return [
        d if isinstance(d, Rejected) else batch(d[0], [view(r) for r in d[1]])
        for d in descriptor[1]
    ]


# -- the trainer process ----------------------------------------------------------------------


def _trainer_main(
    conn: Connection, name: str, spec: ModelSpec, ring: tuple[str, int], settings: Settings
) -> None:
    """A trainer process: build the model, then serve the front's requests until told to stop.

    ``ring``: the segment's name and the bytes of one slot.
    """
    with contextlib.suppress(OSError):
        Path("/proc/self/comm").write_text(TRAINER_COMM)
    torch.set_num_threads(intra_op_threads(settings))
    try:
        trainer = TrainerFactory(
            torch.device("cpu" if settings.device == "auto" else settings.device),
            max_nonfinite_steps=settings.max_nonfinite_steps,
            max_batch_rows=settings.max_batch_rows,
            max_batch_bytes=settings.max_batch_bytes,
            max_activation_bytes=settings.max_activation_bytes,
        ).build(name, spec)
    except Exception as exc:
        conn.send((0, False, _error(exc)))
        return
    # Mapped from /dev/shm directly: attaching a SharedMemory would register it with the
    # resource tracker a second time.
    fd = os.open(f"/dev/shm/{ring[0]}", os.O_RDWR)
    try:
        loop = _TrainerLoop(trainer, mmap.mmap(fd, 0), ring[1])
    finally:
        os.close(fd)
    conn.send((0, True, trainer.info()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the front is gone
            return
        if message is None:
            return
        kind, call, *args = message
        try:
            value = loop.handle(kind, args)
        except Exception as exc:
            conn.send((call, False, _error(exc)))
        else:
            conn.send((call, True, value))


@dataclass
class _TrainerLoop:
    """What a trainer process holds: the model, the ring's mapping, each stream's options."""

    trainer: Trainer
    buffer: mmap.mmap
    slot_bytes: int
    streams: dict[int, TrainOptions] = field(default_factory=dict)

    def handle(self, kind: str, args: list[Any]) -> Any:
        """Answer one request of the front."""
        trainer = self.trainer
        if kind == "train":
            stream, slot, descriptor = args
            options = self.streams.get(stream)
            if options is None:  # sent after the stream ended: nothing commits after a cancel
                return [], None
            items = unpack(self.buffer, slot * self.slot_bytes, descriptor)
            results, error = train_message(trainer, items, options)
            del items  # the slot is released with this answer: no view of it may outlive it
            rows = [(r.sequence, r.step, r.outcome.value, r.loss, r.reason) for r in results]
            return rows, None if error is None else _error(error)
        if kind == "open":
            stream, report_every = args
            self.streams[stream] = TrainOptions("", report_every)
            return trainer.step
        if kind == "close":
            self.streams.pop(args[0], None)
            return None
        if kind == "info":
            return trainer.info()
        if kind == "parameters":
            params, grads = trainer.parameters(args[0])
            as_numpy = {n: t.numpy() for n, t in params.items()}
            return as_numpy, {n: t.numpy() for n, t in grads.items()}, trainer.step
        raise ValueError(f"unknown request {kind!r}")


# -- the front --------------------------------------------------------------------------------


@dataclass
class _Model:
    """The front's handle on one model's trainer process and ring."""

    name: str
    checker: BatchChecker
    process: Any  # multiprocessing's SpawnProcess
    conn: Connection
    segment: SharedMemory
    ring: np.ndarray[Any, Any] | None
    slots: int
    slot_bytes: int
    free: asyncio.Queue[int] = field(default_factory=asyncio.Queue)
    pending: dict[int, tuple[asyncio.Future[Any], int | None]] = field(default_factory=dict)
    calls: int = 0
    ingest: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, initializer=_name_thread)
    )
    streams: int = 0
    failed: str = ""

    def call(self, kind: str, *args: Any, slot: int | None = None) -> asyncio.Future[Any]:
        """Send a request to the trainer process; the future resolves with its answer."""
        if self.failed:
            raise Unavailable(self.failed)
        self.calls += 1
        future = asyncio.get_running_loop().create_future()
        self.pending[self.calls] = (future, slot)
        self.conn.send((kind, self.calls, *args))
        return future

    def readable(self) -> None:
        """The event loop's reader of the pipe: settle answered calls, release their slots."""
        try:
            while self.conn.poll():
                call, ok, value = self.conn.recv()
                future, slot = self.pending.pop(call)
                if slot is not None:
                    self.free.put_nowait(slot)
                if not future.done():
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(_RemoteError(*value))
        except (EOFError, OSError):
            self.fail(f"the trainer process of model {self.name!r} exited")

    def fail(self, why: str) -> None:
        """The trainer is gone: fail every call waiting on it and free the ring."""
        if self.failed:
            return
        self.failed = why
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.conn.fileno())
        loop.run_in_executor(None, self.process.join, STOP_TIMEOUT_S)  # reap it
        for future, _ in self.pending.values():
            if not future.done():
                future.set_exception(Unavailable(why))
        self.pending.clear()
        self.release()
        for slot in range(self.slots):  # wake readers waiting for a slot: they fail now
            self.free.put_nowait(slot)

    def release(self) -> None:
        """Unmap and unlink the ring (once)."""
        if self.ring is not None:
            self.ring = None
            with contextlib.suppress(BufferError):
                self.segment.close()
            with contextlib.suppress(FileNotFoundError):
                self.segment.unlink()

    async def stop(self) -> None:
        """Stop the trainer process (bounded: killed if it does not exit), unlink the ring."""
        if not self.failed:
            with contextlib.suppress(OSError):
                self.conn.send(None)
        await asyncio.to_thread(self.process.join, STOP_TIMEOUT_S)
        if self.process.is_alive():
            self.process.kill()
            await asyncio.to_thread(self.process.join, STOP_TIMEOUT_S)
        self.fail(f"model {self.name!r} was deleted")
        self.conn.close()
        self.ingest.shutdown(wait=False, cancel_futures=True)


class Front:
    """The ingest process's servicer: decode and check here, train in the model's process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.models: dict[str, _Model] = {}
        self._context = multiprocessing.get_context("spawn")

    def _model(self, name: str) -> _Model:
        model = self.models.get(name)
        if model is None:
            raise NotFound(f"no model named {name!r}")
        return model

    async def CreateModel(self, request: pb.CreateModelRequest, context: Any) -> Any:
        name = check_model_name(request.name)
        try:
            data = spec_from_proto(request.spec)
        except ValueError as exc:
            raise InvalidArgument("spec", str(exc)) from None
        spec = parse_spec(data)
        if name in self.models:
            raise AlreadyExists(f"a model named {name!r} exists already")
        s = self.settings
        slots = s.queue_depth + 1
        segment = SharedMemory(create=True, size=slots * SLOT_BYTES)
        ours, theirs = self._context.Pipe()
        process = self._context.Process(
            target=_trainer_main,
            args=(theirs, name, spec, (segment.name, SLOT_BYTES), s),
            name=f"split-trainer-{name}",
            daemon=True,
        )
        checker = BatchChecker(spec, s.max_batch_rows, s.max_batch_bytes, s.max_activation_bytes)
        ring = np.ndarray((segment.size,), np.uint8, buffer=segment.buf)
        model = _Model(name, checker, process, ours, segment, ring, slots, SLOT_BYTES)
        for slot in range(slots):
            model.free.put_nowait(slot)
        self.models[name] = model
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[Any] = loop.create_future()
        model.pending[0] = (ready, None)  # the trainer's first message: built, or why not
        process.start()
        theirs.close()
        loop.add_reader(ours.fileno(), model.readable)
        try:
            info = await asyncio.wait_for(ready, START_TIMEOUT_S)
        except BaseException:
            self.models.pop(name, None)
            await model.stop()
            raise
        return pb.CreateModelResponse(model=_info(info))

    async def GetModel(self, request: pb.GetModelRequest, context: Any) -> Any:
        return pb.GetModelResponse(model=_info(await self._model(request.name).call("info")))

    async def ListModels(self, request: pb.ListModelsRequest, context: Any) -> Any:
        infos = [await m.call("info") for _, m in sorted(self.models.items())]
        return pb.ListModelsResponse(models=[_info(i) for i in infos])

    async def DeleteModel(self, request: pb.DeleteModelRequest, context: Any) -> Any:
        model = self._model(request.name)
        del self.models[request.name]
        await model.stop()
        return pb.DeleteModelResponse()

    async def GetParameters(self, request: pb.GetParametersRequest, context: Any) -> Any:
        model = self._model(request.name)
        params, grads, step = await model.call("parameters", request.include_gradients)
        response = pb.GetParametersResponse(step=step)
        for name, value in params.items():
            encode(torch.from_numpy(value), response.parameters[name])
        for name, value in grads.items():
            encode(torch.from_numpy(value), response.gradients[name])
        return response

    async def Train(self, requests: AsyncIterator[TrainMessage], context: Any) -> Any:
        stream = aiter(requests)
        first = await anext(stream, None)
        if first is None or first.open is None:
            raise InvalidArgument("open", "the first TrainRequest of a stream must carry open")
        if first.open.shared_memory or first.open.producer_id:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                "the split prototype has no shared-memory path and no exactly-once producers",
            )
        model = self._model(first.open.model)
        model.streams += 1
        sid = model.streams
        step = await model.call("open", sid, max(1, first.open.report_every))
        yield pb.TrainResponse(opened=pb.StreamState(model=model.name, step=step))
        in_flight = asyncio.Semaphore(self.settings.queue_depth + 1)
        jobs: asyncio.Queue[asyncio.Future[Any] | None] = asyncio.Queue()
        reader = asyncio.create_task(_read(model, sid, first, stream, in_flight, jobs))
        reader.add_done_callback(functools.partial(_reading_ended, jobs))
        try:
            while (job := await jobs.get()) is not None:
                try:
                    rows, error = await job
                finally:
                    in_flight.release()
                results = [StepResult(q, n, Outcome(o), loss, why) for q, n, o, loss, why in rows]
                if results:
                    yield _train_response(results, 0)
                if error is not None:
                    raise _RemoteError(*error)
        finally:
            reader.cancel()
            if not model.failed:
                model.call("close", sid)

    async def close(self) -> None:
        """Stop every trainer process and unlink every ring."""
        models, self.models = list(self.models.values()), {}
        await asyncio.gather(*(m.stop() for m in models))


async def _read(  # noqa: PLR0917
    model: _Model,
    sid: int,
    first: TrainMessage,
    stream: AsyncIterator[TrainMessage],
    in_flight: asyncio.Semaphore,
    jobs: asyncio.Queue[asyncio.Future[Any] | None],
) -> None:
    request: TrainMessage | None = first
    while request is not None:
        if request is not first and request.open is not None:
            raise InvalidArgument("open", "only the first TrainRequest of a stream may carry open")
        if request.batches:
            await in_flight.acquire()
            slot = await model.free.get()
            if model.ring is None:
                raise Unavailable(model.failed)
            base = slot * model.slot_bytes
            # Decoded, checked and copied on the model's ingest thread while this one
            # receives the next message (numpy's checks and torch's copy release the GIL).
            prepared = asyncio.get_running_loop().run_in_executor(
                model.ingest,
                _prepare,
                model.checker,
                request.batches,
                model.ring[base : base + model.slot_bytes],
            )
            jobs.put_nowait(asyncio.ensure_future(_submit(model, sid, slot, prepared)))
        request = await anext(stream, None)


def _name_thread() -> None:
    """Name the ingest thread in /proc, where the bench reads each thread's CPU."""
    with contextlib.suppress(OSError):
        Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text("split-ingest")


def _prepare(
    checker: BatchChecker, batches: list[WireBatch], slot: np.ndarray[Any, Any]
) -> tuple[Any, ...]:
    """A message decoded and checked as the server does, its tensors copied into ``slot``."""
    small = _mean_batch_bytes(batches) < WORKER_CHECK_BYTES
    return pack(decode_message(checker, batches, block=small), slot)


async def _submit(model: _Model, sid: int, slot: int, prepared: asyncio.Future[Any]) -> Any:
    """Send a prepared message to the trainer; its answer.

    The ingest thread is one per model and prepares in order, and the event loop wakes
    these tasks in the order their preparations finished: a stream's messages reach the
    trainer in the order they came.
    """
    try:
        descriptor = await prepared
    except BaseException:
        model.free.put_nowait(slot)
        raise
    return await model.call("train", sid, slot, descriptor, slot=slot)


def _reading_ended(
    jobs: asyncio.Queue[asyncio.Future[Any] | None], reader: asyncio.Task[None]
) -> None:
    """Queue how the reader ended behind the jobs it queued, then the end marker."""
    if not reader.cancelled() and (error := reader.exception()) is not None:
        failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        failed.set_exception(error)
        jobs.put_nowait(failed)
    jobs.put_nowait(None)


def _handlers(front: Front) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
    """The served methods, with Train decoded by ``wire.parse_train_request``; no others."""
    service = pb.DESCRIPTOR.services_by_name["TrainerService"]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        if method.name not in SERVED:
            continue
        request_type = getattr(pb, method.input_type.name)
        response_type = getattr(pb, method.output_type.name)
        make = (
            grpc.stream_stream_rpc_method_handler
            if method.name == "Train"
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            getattr(front, method.name),
            request_deserializer=(
                parse_train_request if method.name == "Train" else request_type.FromString
            ),
            response_serializer=response_type.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


async def serve(settings: Settings, ready_file: Path) -> None:
    """Serve until SIGTERM or SIGINT, then stop every trainer process."""
    front = Front(settings)
    limit = settings.max_message_bytes
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor()],
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ],
    )
    server.add_generic_rpc_handlers((_handlers(front),))
    port = server.add_insecure_port("127.0.0.1:0")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        announce(ready_file, port, pid=os.getpid())
        await stop.wait()
        await server.stop(1.0)
    finally:
        await front.close()


@contextlib.contextmanager
def running(device: str = "cpu", threads: int = 0, timeout: float = 60.0) -> Iterator[SplitServer]:
    """The front in a process of its own; yields it (``.target``, ``.process``); stops it."""
    args = ("--device", device, "--threads", str(threads))
    with started("gradstream.bench.split", *args, timeout=timeout) as (port, process):
        yield SplitServer(f"127.0.0.1:{port}", process)


@dataclass(frozen=True)
class SplitServer:
    """A running front: where to connect, and its process."""

    target: str
    process: Any  # subprocess.Popen[bytes]


def trainer_pids(front: int) -> list[int]:
    """The trainer processes of the front ``front`` (children named ``TRAINER_COMM``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == front and comm == TRAINER_COMM:
            pids.append(int(entry.name))
    return sorted(pids)


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m gradstream.bench.split --ready-file F``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: the server's default)"
    )
    args = parser.parse_args(argv)
    tune_allocator()  # as `gradstream serve` does
    # The front's torch work is copies and checks: an OpenMP team here would only spin on
    # the cores the trainer processes step on.
    torch.set_num_threads(1)
    asyncio.run(serve(Settings(device=args.device, threads=args.threads), args.ready_file))


if __name__ == "__main__":
    main()
