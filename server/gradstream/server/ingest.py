"""Train under ``--ingest process``: decoded and checked on the front, stepped behind it.

Front (``ingest_train``, called by the front process for each client Train stream):

    event loop      reads the client's messages, sends one descriptor per message to the
                    server's ``IngestService/Train``, passes each answer on as bytes
    decode thread   one per stream: parses, decodes and checks a message with the
                    server's own ``session.decode_message`` and the model's contract
                    (``ContractResponse``), copies its checked tensors into a slot of
                    the stream's ring (``slots.Ring``) while the loop receives the next

A slot is free again when the answer to its message has come back: at most
``queue_depth + 1`` messages are in flight, as on the server itself.

Server (``IngestServicer``): ``Contract`` answers the model's input contract and
identity; ``Train`` runs the server's own ``TrainSession`` on views of the slots
(``SlotSource``), so steps, REJECTED answers, exactly-once producers, checkpoints and
metrics are the server's, unchanged.

The seam with the front process (``front.ingested``): ``ingest_train`` raises
``ForwardRaw`` before it has sent anything when a stream is not its to ingest (a
producer's shared memory, a first message that does not parse or carries no open): the
front then forwards the stream to the server's ``TrainerService/Train`` unchanged, with
the message it read first.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from gradstream.internal.v1 import ingest_pb2 as ipb
from gradstream.server.batches import Batch, BatchChecker
from gradstream.server.engine import Trainer, TrainOptions
from gradstream.server.errors import (
    FailedPrecondition,
    GradstreamError,
    InvalidArgument,
    Unavailable,
)
from gradstream.server.interceptors import INGEST_CONTRACT, INGEST_TRAIN, Malformed
from gradstream.server.relay import pump, relay_error
from gradstream.server.servicer import TrainerServicer
from gradstream.server.session import (
    WORKER_CHECK_BYTES,
    Checks,
    Rejected,
    _mean_batch_bytes,
    decode_message,
)
from gradstream.server.slots import Ring, SlotViews
from gradstream.server.wire import TrainMessage, parse_train_request
from gradstream.v1 import trainer_pb2 as pb

Metadata = Sequence[tuple[str, str | bytes]]
Context = grpc.aio.ServicerContext[Any, Any]


class ForwardRaw(Exception):
    """Not a stream for the front to ingest: forward it to the server's Train unchanged.

    ``first``: the request message already read from the client (None: the client sent none).
    """

    def __init__(self, first: bytes | None) -> None:
        super().__init__("forward this Train stream unchanged")
        self.first = first


def _parse(data: bytes) -> TrainMessage | Malformed:
    try:
        return parse_train_request(data)
    except Exception as exc:  # answered as the server's MalformedRequestInterceptor would
        return Malformed("request", exc)


async def ingest_train(
    requests: AsyncIterator[bytes],
    context: Context,
    backend: grpc.aio.Channel,
    metadata: Metadata,
) -> AsyncIterator[bytes]:
    """One client Train stream, through the server's ``IngestService``; its answers as bytes.

    ``requests`` and the answers are serialized messages; ``metadata`` goes with both
    internal calls (the front's secret, the client's peer and token). A failed internal
    call ends the client's stream with its status.
    """
    stream = aiter(requests)
    data = await anext(stream, None)
    first = None if data is None else _parse(data)
    if not isinstance(first, TrainMessage) or first.open is None or first.open.shared_memory:
        raise ForwardRaw(data)
    assert data is not None
    timeout = context.time_remaining()
    contract_call = backend.unary_unary(
        INGEST_CONTRACT,
        request_serializer=ipb.ContractRequest.SerializeToString,
        response_deserializer=ipb.ContractResponse.FromString,
    )
    try:
        contract = await contract_call(
            ipb.ContractRequest(model=first.open.model), metadata=metadata, timeout=timeout
        )
    except grpc.aio.AioRpcError as exc:
        await relay_error(context, exc)
    opening = ipb.TrainRequest(
        open=ipb.TrainOpen(
            model=first.open.model,
            producer_id=first.open.producer_id,
            report_every=first.open.report_every,
            identity=contract.identity,
        )
    )
    ingest = _Stream(BatchChecker.from_contract(contract.checker), contract.queue_depth + 1)
    # Bytes both ways: the answers are passed on as they came.
    call = backend.stream_stream(INGEST_TRAIN, None, None)(None, metadata=metadata, timeout=timeout)
    reader = asyncio.create_task(ingest.read(data, stream))
    sender = asyncio.create_task(pump(ingest.descriptors(opening), call))
    try:
        opened = False
        async for answer in call:
            if opened:  # the answer to the oldest message in flight: its slot is free
                ingest.answered()
            opened = True
            yield answer
        if ingest.error is not None:  # the client may still be sending: not waited for
            raise ingest.error
        await reader  # done: the descriptors ended with its end; raises what ended it
    except grpc.aio.AioRpcError as exc:
        await relay_error(context, exc)
    except GradstreamError as exc:
        await context.abort(grpc.StatusCode[exc.code], exc.message)
    finally:
        call.cancel()
        sender.cancel()
        reader.cancel()
        ingest.close()


class _Stream:
    """One client stream on the front: its ring, its decode thread, its messages in flight."""

    def __init__(self, checker: BatchChecker, slots: int) -> None:
        self.checker = checker
        self.ring = Ring(slots)
        self.free: asyncio.Queue[int] = asyncio.Queue()
        for slot in range(slots):
            self.free.put_nowait(slot)
        self.sent: collections.deque[int] = collections.deque()  # slots awaiting an answer
        self.prepared: asyncio.Queue[tuple[int, asyncio.Future[Any]] | None] = asyncio.Queue()
        self.error: BaseException | None = None  # ends the stream after the answers before it
        self._decoder = ThreadPoolExecutor(1, thread_name_prefix="gradstream-ingest")

    async def read(self, first: bytes, stream: AsyncIterator[bytes]) -> None:
        """Hand each client message to the decode thread, in order, once a slot is free."""
        loop = asyncio.get_running_loop()
        data: bytes | None = first
        try:
            while data is not None:
                slot = await self.free.get()
                job = loop.run_in_executor(
                    self._decoder, _prepare, self.checker, self.ring, slot, data, data is first
                )
                self.prepared.put_nowait((slot, job))
                data = await anext(stream, None)
        finally:
            self.prepared.put_nowait(None)

    async def descriptors(self, opening: ipb.TrainRequest) -> AsyncIterator[bytes]:
        """The internal stream's messages: the open, then one per client message with batches.

        A message that failed to prepare ends it: the server answers the ones before,
        then the client's stream ends with ``error``.
        """
        yield opening.SerializeToString()
        while (entry := await self.prepared.get()) is not None:
            slot, job = entry
            try:
                descriptor = await job
            except BaseException as exc:
                self.error = exc
                self.free.put_nowait(slot)
                return
            if descriptor.items or descriptor.sequences:
                self.sent.append(slot)
            else:
                self.free.put_nowait(slot)
                if not descriptor.HasField("open"):
                    continue
            yield descriptor.SerializeToString()

    def answered(self) -> None:
        """The oldest message in flight is answered: its slot is free."""
        if self.sent:
            self.free.put_nowait(self.sent.popleft())

    def close(self) -> None:
        """Stop the decode thread and unlink every slot."""
        self._decoder.shutdown(wait=False, cancel_futures=True)
        while not self.prepared.empty():
            entry = self.prepared.get_nowait()
            if entry is not None:
                entry[1].cancel()
        self.ring.close()


def _prepare(
    checker: BatchChecker, ring: Ring, slot: int, data: bytes, first: bool
) -> ipb.TrainRequest:
    """On the decode thread: a client message decoded, checked and packed into ``slot``.

    A message without batches is an empty descriptor; a misplaced open travels on, so the
    server refuses it after the messages before it, as Train does.
    """
    message = _parse(data)
    if isinstance(message, Malformed):
        raise InvalidArgument("", message.describe())
    if message.open is not None and not first:
        return ipb.TrainRequest(open=ipb.TrainOpen(model=message.open.model))
    if not message.batches:
        return ipb.TrainRequest()
    small = _mean_batch_bytes(message.batches) < WORKER_CHECK_BYTES
    return ring.pack(slot, decode_message(checker, message.batches, block=small))


# -- the server's side --------------------------------------------------------------------


class SlotSource:
    """A ``session.MessageSource`` of the ingest front's descriptors: views of its slots."""

    def __init__(self) -> None:
        self.views = SlotViews()

    def checks(self, request: ipb.TrainRequest, first: bool, trainer: Trainer) -> Checks | None:
        """The message's batches, viewed in place: the front checked them already."""
        if not first and request.HasField("open"):
            raise InvalidArgument("open", "only the first TrainRequest of a stream may carry open")
        if not request.sequences and not request.items:
            return None
        return _Views(self.views, request)


class _Views:
    """A message's batches, viewed in its slot by its job on the model's worker.

    Made there, not on the event loop: a batch's views and ``Batch`` are Python work per
    batch, and on the worker they do not contend for the GIL with the step (the point of
    this mode). The slot is written again once the message is answered: after its job,
    nothing on the server may hold a view of it (the worker keeps its last job until the
    next one, so the job drops the descriptor). Staged (a CUDA model), the job trains
    pinned copies; on the CPU, the views themselves. A stream's jobs all run on its
    model's one worker, in order, so its ``SlotViews`` is only ever used by one thread.
    """

    def __init__(self, views: SlotViews, request: ipb.TrainRequest) -> None:
        self.made: tuple[SlotViews, ipb.TrainRequest] | None = (views, request)

    def __call__(self, trainer: Trainer) -> list[Batch | Rejected]:
        # Dropped here: a kept job must not keep the stream's mappings either.
        made, self.made = self.made, None
        assert made is not None, "a message's views are made once"
        views, request = made
        items = views.items(request)
        return [i if isinstance(i, Rejected) else trainer.stage(i) for i in items]


class IngestServicer:
    """``gradstream.internal.v1.IngestService``: the front's Train, on the server's models."""

    def __init__(self, trainer: TrainerServicer) -> None:
        self.trainer = trainer

    async def Contract(
        self, request: ipb.ContractRequest, context: Context
    ) -> ipb.ContractResponse:
        """The model's input contract and identity."""
        if self.trainer.draining:
            raise Unavailable("the server is shutting down; reconnect to it once it is back")
        worker = self.trainer.registry.get(request.model)
        return ipb.ContractResponse(
            identity=worker.identity,
            checker=worker.trainer.checker.contract(),
            queue_depth=worker.queue_depth,
        )

    async def Train(
        self, request_iterator: AsyncIterator[ipb.TrainRequest], context: Context
    ) -> AsyncIterator[pb.TrainResponse]:
        """Train's stream, with the batches of each message in a slot."""
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None or not first.HasField("open"):
            raise InvalidArgument("open", "the first TrainRequest of a stream must carry open")
        if self.trainer.draining:
            raise Unavailable("the server is shutting down; reconnect to it once it is back")
        name = first.open.model
        worker = self.trainer.registry.get(name)
        if worker.identity != first.open.identity:
            raise FailedPrecondition(
                f"model {name!r} was deleted and created again as this stream opened; "
                "open the stream again"
            )
        options = TrainOptions(first.open.producer_id, max(1, first.open.report_every))
        async for response in self.trainer.train_stream(
            worker, options, first, requests, SlotSource()
        ):
            yield response


def add_to_server(servicer: IngestServicer, server: grpc.aio.Server) -> None:
    """Register ``IngestService`` (on the server process's private socket only)."""
    service = ipb.DESCRIPTOR.services_by_name["IngestService"]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Contract": grpc.unary_unary_rpc_method_handler(
            servicer.Contract,
            request_deserializer=ipb.ContractRequest.FromString,
            response_serializer=ipb.ContractResponse.SerializeToString,
        ),
        "Train": grpc.stream_stream_rpc_method_handler(
            servicer.Train,
            request_deserializer=ipb.TrainRequest.FromString,
            response_serializer=pb.TrainResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    with contextlib.suppress(AttributeError):
        server.add_registered_method_handlers(service.full_name, handlers)  # type: ignore[attr-defined]
