"""The life of one Train stream: read ahead, decode, queue steps, answer in order, drain.

Threads and queues of one stream (``docs/architecture.md`` draws them):

    event loop, reader task   reads request message n+1 while the worker steps message n;
                              decodes it (``decode``) here, or on the worker for large batches
    model worker thread       ``train_message``: the batches of one message, in order
    event loop, ``replies``   awaits each job in submission order and hands its results on

At most the model's ``queue_depth`` + 1 messages are read and not yet answered (the
worker's queue full, one message being answered): a client that stops reading its
responses makes the server stop reading its batches, and HTTP/2 flow control holds the
client. Without the bound, results and batches of a client that never reads piled up on
the server without limit.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gradstream.server.batches import Batch, BatchChecker
from gradstream.server.checkpoint import Checkpointer
from gradstream.server.codec import decode_wire
from gradstream.server.engine import Outcome, StepResult, Trainer, TrainOptions
from gradstream.server.errors import (
    GradstreamError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from gradstream.server.export import copy_model
from gradstream.server.metrics import Metrics
from gradstream.server.publishing import Publisher
from gradstream.server.shm import SharedSegment
from gradstream.server.wire import TrainMessage, WireBatch, WireTensor
from gradstream.server.worker import ModelWorker

log = logging.getLogger("gradstream.server")

# Batches at least this large (on average in a message) are checked on the model's worker.
WORKER_CHECK_BYTES = 256 * 1024
# A message of at least this many batches of one layout is checked as one block.
BLOCK_MIN_BATCHES = 4  # below it, the block's fixed cost outweighs what it saves


@dataclass(frozen=True, slots=True)
class Rejected:
    """A batch refused by ``decode``: it is answered REJECTED in its place, never trained."""

    reason: str
    sequence: int = 0


@dataclass(frozen=True, slots=True)
class Opened:
    """Where a stream starts: the model's step and this producer's applied and durable marks."""

    model: str
    step: int
    last_applied_sequence: int
    last_durable_sequence: int


@dataclass(frozen=True, slots=True)
class Reply:
    """One message's results, and the producer's newly durable sequence (0: no news)."""

    results: list[StepResult]
    last_durable_sequence: int = 0


def checked(
    checker: BatchChecker, batch: WireBatch, field: str, segment: SharedSegment | None = None
) -> Batch:
    """A wire batch checked against the model's inputs, or InvalidArgument naming the field."""
    quote = segment is None  # a segment's bytes are never echoed back
    weight = batch.sample_weight
    if checker.single and batch.x is not None and not batch.inputs:
        # The one-x batch of linear and mlp: no per-input bookkeeping on the hot path.
        return checker.batch(
            decode_wire(batch.x, f"{field}.x", segment),
            decode_wire(batch.y, f"{field}.y", segment),
            None if weight is None else decode_wire(weight, f"{field}.sample_weight", segment),
            batch.sequence,
            field,
            quote=quote,
        )
    inputs = checker.arrange(batch.x, batch.inputs, field)
    arrays = [decode_wire(tensor, where, segment) for where, tensor in inputs]
    return checker.batch(
        arrays[0],
        decode_wire(batch.y, f"{field}.y", segment),
        None if weight is None else decode_wire(weight, f"{field}.sample_weight", segment),
        batch.sequence,
        field,
        quote=quote,
        more=arrays[1:],
        fields=[where for where, _ in inputs],
    )


def decode(
    checker: BatchChecker, batch: WireBatch, index: int, segment: SharedSegment | None
) -> Batch | Rejected:
    """A wire batch as a checked batch, or the rejection that names what is wrong with it."""
    try:
        return checked(checker, batch, f"batches[{index}]", segment)
    except (InvalidArgument, ResourceExhausted) as exc:  # this batch alone; the stream goes on
        return Rejected(str(exc), batch.sequence)


def decode_message(
    checker: BatchChecker,
    batches: Sequence[WireBatch],
    segment: SharedSegment | None = None,
    *,
    block: bool = True,
) -> list[Batch | Rejected]:
    """Every batch of a message decoded and checked, in order; a failing one REJECTED.

    With ``block``, a message whose batches all have one layout is checked as one block
    (``_block``): the same batches and the same rejections as ``decode`` one by one,
    with a fraction of the Python work per batch.
    """
    if block and len(batches) >= BLOCK_MIN_BATCHES:
        items = _block(checker, batches)
        if items is not None:
            return list(items)  # a list of Batch is a list of Batch | Rejected
    return [decode(checker, b, i, segment) for i, b in enumerate(batches)]


def _block(checker: BatchChecker, batches: Sequence[WireBatch]) -> list[Batch] | None:
    """The batches checked as one block, or None to leave them to ``decode`` one by one.

    Taken when every batch carries the same tensors (same input names in the same order,
    dtypes, shapes, byte lengths) in the message itself, none in shared memory, and its
    first batch passes ``decode``: what is left to check then depends only on the values,
    checked once over each tensor's bytes joined (``BatchChecker.block``). The batches'
    tensors are views of that block. Anything that fails, however, sends the message
    back to ``decode`` one batch at a time, so which batch is REJECTED and why is
    exactly what ``decode`` says.
    """
    first = batches[0]
    names = [name for name, _ in first.inputs]
    if names:
        if any([name for name, _ in batch.inputs] != names for batch in batches):
            return None
    elif any(batch.inputs for batch in batches):
        return None
    columns = [
        [batch.x for batch in batches],
        [batch.y for batch in batches],
        [batch.sample_weight for batch in batches],
        *([batch.inputs[k][1] for batch in batches] for k in range(len(names))),
    ]
    joined: dict[int, bytes] = {}  # by the first batch's tensor
    for column in columns:
        head = column[0]
        if head is None:
            if any(t is not None for t in column):
                return None
            continue
        if head.shared is not None:
            return None
        try:
            if len({(t.dtype, t.shape, len(t.data), t.shared) for t in column}) != 1:  # type: ignore[union-attr]
                return None
        except AttributeError:  # a batch without this tensor
            return None
        joined[id(head)] = b"".join([t.data for t in column])  # type: ignore[union-attr]
    like = decode(checker, first, 0, None)
    if isinstance(like, Rejected):
        return None
    n = len(batches)
    stacked = {
        id(t): decode_wire(WireTensor(t.dtype, (n, *t.shape), joined[id(t)]), "")
        for t in (first.x, first.y, first.sample_weight, *(t for _, t in first.inputs))
        if t is not None
    }
    inputs = [stacked[id(t)] for _, t in checker.arrange(first.x, first.inputs)]
    weight = None if first.sample_weight is None else stacked[id(first.sample_weight)]
    assert first.y is not None  # decode checked it
    checked = checker.block(inputs, stacked[id(first.y)], weight, like)
    if checked is None:
        return None
    split = [t.unbind(0) for t in checked]
    more = len(like.more)
    xs, ys = split[0], split[1 + more]
    ws = split[2 + more] if weight is not None else None
    rest = list(zip(*split[1 : 1 + more], strict=True)) if more else None
    return [
        Batch(
            xs[i],
            ys[i],
            None if ws is None else ws[i],
            batch.sequence,
            () if rest is None else rest[i],
        )
        for i, batch in enumerate(batches)
    ]


def train_message(
    trainer: Trainer,
    items: Sequence[Batch | Rejected],
    options: TrainOptions,
    cancelled: Callable[[], bool] = lambda: False,
) -> tuple[list[StepResult], GradstreamError | None]:
    """One message's batches in order; a rejection is answered in its place, untrained.

    Returns the results so far and the error that stopped the message, if one did.
    """
    results: list[StepResult] = []
    run: list[Batch] = []

    def flush() -> GradstreamError | None:
        done, error = trainer.train_batches(run, options, cancelled)
        results.extend(done)
        run.clear()
        return error

    for item in items:
        if not isinstance(item, Rejected):
            run.append(item)
            continue
        if run and (error := flush()) is not None:
            return results, error
        if cancelled():
            return results, None
        options.batches_seen += 1
        sequence = item.sequence or options.batches_seen
        results.append(StepResult(sequence, trainer.step, Outcome.REJECTED, reason=item.reason))
    return results, flush() if run else None


class TrainSession:
    """One Train stream of one model: its options, its reader, its replies."""

    def __init__(
        self,
        worker: ModelWorker,
        options: TrainOptions,
        metrics: Metrics,
        checkpointer: Checkpointer,
        segment: SharedSegment | None = None,
        *,
        publisher: Publisher | None = None,
        source: MessageSource | None = None,
    ) -> None:
        self.worker = worker
        self.publisher = publisher  # continuous export (docs/serving.md)
        self.options = options
        self.metrics = metrics
        self.checkpointer = checkpointer
        # Where each message's batches come from: the request's own bytes (and the
        # producer's shared memory, read-only), or the ingest front's slots (ingest.py).
        self.source: MessageSource | None = source or WireSource(segment)
        self.cancelled = False
        self.draining = False  # set by drain(): read no more, end with UNAVAILABLE
        self.error: GradstreamError | None = None  # ends the stream after the results before it
        self._reader: asyncio.Task[None] | None = None
        # Enough to keep the worker's queue full while one message's results are written.
        self._in_flight = asyncio.Semaphore(worker.queue_depth + 1)
        self._durable_sent = checkpointer.durable_sequence(worker.trainer.name, options.producer_id)

    def drain(self) -> None:
        """Read no more; the steps in flight are answered, then the stream ends UNAVAILABLE."""
        self.draining = True
        if self._reader is not None:
            self._reader.cancel()

    async def open(self) -> Opened:
        """The stream's starting point, read on the worker after the jobs queued before."""
        producer, durable = self.options.producer_id, self._durable_sent

        def opened(trainer: Trainer) -> Opened:
            return Opened(trainer.name, trainer.step, trainer.producers.get(producer, 0), durable)

        return await self.worker.run(opened)

    async def replies(self, first: Any, requests: AsyncIterator[Any]) -> AsyncIterator[Reply]:
        """Train every batch of the stream; one reply per message, in order."""
        name, producer = self.worker.trainer.name, self.options.producer_id
        jobs: asyncio.Queue[asyncio.Future[list[StepResult]] | None] = asyncio.Queue()
        reader = asyncio.create_task(self._read(first, requests, jobs))
        reader.add_done_callback(functools.partial(_reading_ended, self, jobs))
        self._reader = reader
        if self.draining:  # drain() ran while this stream was opening
            reader.cancel()
        answered = rejected = 0
        try:
            while (job := await jobs.get()) is not None:
                try:
                    results = await job
                    answered += len(results)
                    rejected += sum(r.outcome == Outcome.REJECTED for r in results)
                    self.checkpointer.after_steps(self.worker)
                    durable = self.checkpointer.durable_sequence(name, producer)
                    news = durable if durable > self._durable_sent else 0
                    if results or news:
                        self._durable_sent = max(durable, self._durable_sent)
                        yield Reply(results, news)
                finally:
                    self._in_flight.release()
                if self.error is not None:
                    raise self.error
            await reader
        finally:
            self.cancelled = True
            reader.cancel()
            self.source = None  # its segments close once the last job reading them is gone
            if rejected:  # a stream that only trained is not worth a line at INFO
                log.info(
                    "train stream ended model=%s producer=%s batches=%d rejected=%d",
                    name,
                    producer or "-",
                    answered,
                    rejected,
                )

    async def _read(
        self,
        first: Any,
        requests: AsyncIterator[Any],
        jobs: asyncio.Queue[asyncio.Future[list[StepResult]] | None],
    ) -> None:
        trainer = self.worker.trainer
        request = first
        while request is not None:
            source = self.source
            if source is None:  # replies() ended
                return
            check = source.checks(request, request is first, trainer)
            if check is not None:
                await self._in_flight.acquire()
                try:
                    future = await self.worker.submit(self._job(check))
                except BaseException:
                    self._in_flight.release()
                    raise
                jobs.put_nowait(future)
            request = await anext(requests, None)

    def _job(
        self, check: Callable[[Trainer], list[Batch | Rejected]]
    ) -> Callable[[Trainer], list[StepResult]]:
        metrics, model = self.metrics, self.worker.trainer.name

        def job(trainer: Trainer) -> list[StepResult]:
            items = check(trainer)
            start = time.perf_counter()
            first_step = trainer.step
            # Nothing commits after a cancel.
            results, self.error = train_message(
                trainer, items, self.options, lambda: self.cancelled
            )
            rows = [0 if isinstance(i, Rejected) else i.x.shape[0] for i in items]
            # The only place weights are read from the device for metrics: at most once a message.
            if metrics.sample_due(first_step, trainer.step):
                metrics.sample(trainer)
            if trainer.step != first_step:
                metrics.stepped(model, trainer.lr, trainer.grad_norm)
            metrics.record(model, zip(results, rows, strict=False), time.perf_counter() - start)
            publisher = self.publisher
            if publisher is not None and publisher.due(model, trainer.step):
                publisher.offer(copy_model(trainer))  # written on the publisher's thread
            return results

        return job


Checks = Callable[[Trainer], list[Batch | Rejected]]


class MessageSource(Protocol):
    """How a stream's request messages become batches: the first part of each one's job."""

    def checks(self, request: Any, first: bool, trainer: Trainer) -> Checks | None:
        """The message's batches as the worker's job gets them (None: it carries none).

        Raises what ends the stream after the messages before it (a misplaced open).
        """
        ...


class WireSource:
    """Train's own messages: decoded and checked here, or on the worker for large batches."""

    def __init__(self, segment: SharedSegment | None = None) -> None:
        self.segment = segment  # the producer's shared memory, read-only

    def checks(self, request: TrainMessage, first: bool, trainer: Trainer) -> Checks | None:
        """``decode_message`` and ``trainer.stage`` of the message's batches."""
        if not first and request.open is not None:
            raise InvalidArgument("open", "only the first TrainRequest of a stream may carry open")
        if not request.batches:
            return None
        small = _mean_batch_bytes(request.batches) < WORKER_CHECK_BYTES
        check = _checks(request.batches, self.segment, block=small)
        if small:
            # Small batches: their checks are mostly Python (holding the GIL), and the
            # worker is the busier thread; spare it. Large ones are left to the worker,
            # see _checks.
            return _done(check(trainer))
        return check


def _reading_ended(
    session: TrainSession,
    jobs: asyncio.Queue[asyncio.Future[list[StepResult]] | None],
    reader: asyncio.Task[None],
) -> None:
    """Queue how the reader ended, then the end marker, behind the jobs it queued.

    A done callback, not the reader's own except/finally: a task cancelled before its
    first step never runs its body, and drain() can cancel a stream's reader that early;
    the stream then waited for a marker that never came.
    """
    ended: BaseException | None = None
    if reader.cancelled():
        # drain() cancelled it: replies() reads this failure after the steps queued before.
        # Otherwise only replies()' own exit cancels the reader, and nobody is left to read.
        if session.draining:
            ended = Unavailable("the server is shutting down; reconnect to resume the stream")
    else:
        ended = reader.exception()
    if ended is not None:
        failed: asyncio.Future[list[StepResult]] = asyncio.get_running_loop().create_future()
        failed.set_exception(ended)
        jobs.put_nowait(failed)
    jobs.put_nowait(None)


def _checks(
    batches: list[WireBatch], segment: SharedSegment | None, *, block: bool = False
) -> Callable[[Trainer], list[Batch | Rejected]]:
    """Decode and check a message's batches; one that fails keeps its place as REJECTED.

    Run on the model's own thread for large batches: numpy's checks release the GIL, so
    they overlap the event loop receiving the next message (docs/performance.md). Those
    are checked batch by batch (``block`` False): a block would first copy every batch's
    bytes into one, and their Python work per batch is small against their size.
    """

    def check(trainer: Trainer) -> list[Batch | Rejected]:
        items = decode_message(trainer.checker, batches, segment, block=block)
        return [item if isinstance(item, Rejected) else trainer.stage(item) for item in items]

    return check


def _done(items: list[Batch | Rejected]) -> Callable[[Trainer], list[Batch | Rejected]]:
    return lambda _: items


def _mean_batch_bytes(batches: list[WireBatch]) -> float:
    def size(t: WireTensor | None) -> int:
        return 0 if t is None else t.shared[1] if t.shared is not None else len(t.data)

    total = sum(
        size(b.x) + size(b.y) + size(b.sample_weight) + sum(size(t) for _, t in b.inputs)
        for b in batches
    )
    return total / len(batches)
