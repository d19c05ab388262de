"""The wire <-> domain translation of ``gradstream.v1.TrainerService``; no torch math here."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import torch

from gradstream.client._spec import spec_from_proto, spec_to_proto
from gradstream.server.batches import Batch, BatchChecker
from gradstream.server.checkpoint import Checkpointer
from gradstream.server.codec import decode, decode_array, decode_wire, encode
from gradstream.server.engine import (
    ModelInfo,
    Outcome,
    Rejected,
    StepResult,
    Trainer,
    TrainOptions,
)
from gradstream.server.errors import (
    DataLoss,
    GradstreamError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from gradstream.server.metrics import Metrics
from gradstream.server.registry import ModelRegistry
from gradstream.server.shm import SharedSegment, open_shared_memory
from gradstream.server.spec import parse_spec
from gradstream.server.wire import TrainMessage, WireBatch, WireTensor, parse_train_request
from gradstream.server.worker import ModelWorker
from gradstream.v1 import trainer_pb2 as pb

log = logging.getLogger("gradstream.server")

# Batches at least this large (on average in a message) are checked on the model's worker.
WORKER_CHECK_BYTES = 256 * 1024

_OUTCOMES: dict[Outcome, Any] = {
    outcome: pb.Outcome.Value(f"OUTCOME_{outcome.value}") for outcome in Outcome
}
Context = grpc.aio.ServicerContext[object, object]


class _Stream:
    """The state one Train stream shares with the jobs it queued."""

    def __init__(self, options: TrainOptions) -> None:
        self.options = options
        self.cancelled = False
        self.error: GradstreamError | None = None  # ends the stream after the results before it
        self.reader: asyncio.Task[None] | None = None
        self.draining = False  # set by drain(): read no more, end with UNAVAILABLE
        self.segment: SharedSegment | None = None  # the producer's shared memory, read-only


class TrainerServicer:
    """Decodes and validates requests, queues the work on the model's worker, encodes replies."""

    def __init__(
        self, registry: ModelRegistry, metrics: Metrics, checkpointer: Checkpointer | None = None
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.checkpointer = checkpointer or Checkpointer(None, metrics)
        self.draining = False
        self._streams: set[_Stream] = set()
        self._streams_closed = asyncio.Event()

    def drain(self) -> None:
        """Refuse new streams; open ones finish the steps in flight, then end with UNAVAILABLE."""
        self.draining = True
        for stream in self._streams:
            stream.draining = True
            if stream.reader is not None:
                stream.reader.cancel()

    @property
    def open_streams(self) -> int:
        """How many Train streams are open now."""
        return len(self._streams)

    async def wait_streams_closed(self) -> None:
        """Return once no Train stream is open."""
        while self._streams:
            self._streams_closed.clear()
            await self._streams_closed.wait()

    async def SaveCheckpoint(
        self, request: pb.SaveCheckpointRequest, context: Context
    ) -> pb.SaveCheckpointResponse:
        saved = await self.checkpointer.save(self.registry.get(request.name), requested=True)
        return pb.SaveCheckpointResponse(
            checkpoint=saved.name, step=saved.step, producer_sequences=saved.producers
        )

    async def CreateModel(
        self, request: pb.CreateModelRequest, context: Context
    ) -> pb.CreateModelResponse:
        try:
            data = spec_from_proto(request.spec)
        except ValueError as exc:  # a malformed init tensor
            raise InvalidArgument("spec", str(exc)) from None
        info = await self.registry.create(request.name, parse_spec(data))
        if self.checkpointer.enabled:
            # A model is durable from its creation: a crash before the first periodic
            # checkpoint restores it at step 0 and producers re-send from their start.
            try:
                await self.checkpointer.save(self.registry.get(request.name))
            except GradstreamError:  # not durable: not created (the error names why)
                async with self.registry.deleting(request.name):
                    await self.registry.delete(request.name)
                    await self.checkpointer.forget(request.name)
                raise
        return pb.CreateModelResponse(model=_info(info))

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.GetModelResponse:
        info = await self.registry.get(request.name).run(Trainer.info)
        return pb.GetModelResponse(model=_info(info))

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        infos = []
        for name in self.registry.names():
            try:
                infos.append(_info(await self.registry.get(name).run(Trainer.info)))
            except GradstreamError:  # deleted while listing
                continue
        return pb.ListModelsResponse(models=infos)

    async def DeleteModel(
        self, request: pb.DeleteModelRequest, context: Context
    ) -> pb.DeleteModelResponse:
        try:
            worker: ModelWorker | None = self.registry.get(request.name)
        except DataLoss:  # restored from no checkpoint: nothing runs, only files to remove
            worker = None
        async with self.registry.deleting(request.name):  # until the directory is gone
            await self.registry.delete(request.name)
            await self.checkpointer.forget(request.name, worker)
        return pb.DeleteModelResponse()

    async def UpdateModel(
        self, request: pb.UpdateModelRequest, context: Context
    ) -> pb.UpdateModelResponse:
        lr = request.lr if request.HasField("lr") else None
        freeze, unfreeze = tuple(request.freeze), tuple(request.unfreeze)

        def update(trainer: Trainer) -> ModelInfo:
            trainer.update(lr, freeze, unfreeze)
            return trainer.info()

        info = await self.registry.get(request.name).run(update)
        if lr is not None:
            self.metrics.learning_rate.labels(request.name).set(lr)
        return pb.UpdateModelResponse(model=_info(info))

    async def Predict(self, request: pb.PredictRequest, context: Context) -> pb.PredictResponse:
        worker = self.registry.get(request.name)
        x = worker.trainer.checker.inputs(decode_array(request.x, "x"))
        y = await worker.run(lambda t: t.predict(x).cpu())
        return pb.PredictResponse(y=encode(y))

    async def ComputeGradients(
        self, request: pb.ComputeGradientsRequest, context: Context
    ) -> pb.ComputeGradientsResponse:
        worker = self.registry.get(request.name)
        checker = worker.trainer.checker
        x = checker.inputs(decode_array(request.x, "x"))
        has_y, has_v = request.HasField("y"), request.HasField("grad_output")
        if has_y == has_v:
            raise InvalidArgument(
                "y", "give exactly one of y (gradient of the loss) and grad_output"
            )
        y = weight = vector = None
        if has_y:
            y = checker.targets(decode_array(request.y, "y"), x.shape[0])
            if request.HasField("sample_weight"):
                weight = checker.weights(
                    decode_array(request.sample_weight, "sample_weight"), x.shape[0]
                )
        else:
            vector = checker.grad_output(decode_array(request.grad_output, "grad_output"))

        def gradients(trainer: Trainer) -> tuple[dict[str, torch.Tensor], float | None]:
            grads, loss = trainer.gradients(x, y, weight, vector)
            return {n: g.cpu() for n, g in grads.items()}, loss

        grads, loss = await worker.run(gradients)
        response = pb.ComputeGradientsResponse(loss=loss)
        for name, grad in grads.items():
            encode(grad, response.gradients[name])
        return response

    async def GetParameters(
        self, request: pb.GetParametersRequest, context: Context
    ) -> pb.GetParametersResponse:
        def read(trainer: Trainer) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
            params, grads = trainer.parameters(request.include_gradients)
            return params, grads, trainer.step

        params, grads, step = await self.registry.get(request.name).run(read)
        response = pb.GetParametersResponse(step=step)
        for name, value in params.items():
            encode(value, response.parameters[name])
        for name, value in grads.items():
            encode(value, response.gradients[name])
        return response

    async def SetParameters(
        self, request: pb.SetParametersRequest, context: Context
    ) -> pb.SetParametersResponse:
        worker = self.registry.get(request.name)
        values = {n: decode(t, f"parameters[{n}]") for n, t in request.parameters.items()}
        reset = request.reset_optimizer

        def assign(trainer: Trainer) -> ModelInfo:
            trainer.set_parameters(values, reset)
            return trainer.info()

        return pb.SetParametersResponse(model=_info(await worker.run(assign)))

    async def Train(
        self, request_iterator: AsyncIterator[TrainMessage], context: Context
    ) -> AsyncIterator[pb.TrainResponse]:
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None or first.open is None:
            raise InvalidArgument("open", "the first TrainRequest of a stream must carry open")
        if self.draining:
            raise Unavailable("the server is shutting down; reconnect to it once it is back")
        worker = self.registry.get(first.open.model)
        stream = _Stream(TrainOptions(first.open.producer_id, max(1, first.open.report_every)))
        producer = first.open.producer_id
        durable_sent = self.checkpointer.durable_sequence(worker.trainer.name, producer)
        if first.open.shared_memory:
            stream.segment = open_shared_memory(first.open.shared_memory, context.peer())

        def opened(trainer: Trainer) -> pb.StreamState:
            return pb.StreamState(
                model=trainer.name,
                step=trainer.step,
                last_applied_sequence=trainer.producers.get(producer, 0),
                last_durable_sequence=durable_sent,
            )

        self._streams.add(stream)
        try:
            yield pb.TrainResponse(opened=await worker.run(opened))
            # Reading runs ahead of the worker so decoding message n+1 overlaps step n;
            # the worker's bounded queue stops the reader when it is too far ahead.
            jobs: asyncio.Queue[asyncio.Future[list[StepResult]] | None] = asyncio.Queue()
            reader = asyncio.create_task(self._read(first, requests, worker, stream, jobs))
            reader.add_done_callback(functools.partial(_reading_ended, stream, jobs))
            stream.reader = reader
            if self.draining:  # drain() ran while this stream was opening
                stream.draining = True
                reader.cancel()
            try:
                while (job := await jobs.get()) is not None:
                    results = await job
                    self.checkpointer.after_steps(worker)
                    durable = self.checkpointer.durable_sequence(worker.trainer.name, producer)
                    news = durable if durable > durable_sent else 0
                    if results or news:
                        durable_sent = max(durable, durable_sent)
                        yield pb.TrainResponse(
                            results=[_result(r) for r in results], last_durable_sequence=news
                        )
                    if stream.error is not None:
                        raise stream.error
                await reader
            finally:
                stream.cancelled = True
                reader.cancel()
                stream.segment = None  # closed once the last job reading it is gone
        finally:
            self._streams.discard(stream)
            self._streams_closed.set()

    async def _read(
        self,
        first: TrainMessage,
        requests: AsyncIterator[TrainMessage],
        worker: ModelWorker,
        stream: _Stream,
        jobs: asyncio.Queue[asyncio.Future[list[StepResult]] | None],
    ) -> None:
        name = worker.trainer.name
        request: TrainMessage | None = first
        while request is not None:
            if request is not first and request.open is not None:
                raise InvalidArgument(
                    "open", "only the first TrainRequest of a stream may carry open"
                )
            if request.batches:
                check = _checks(request.batches, stream.segment)
                if _mean_batch_bytes(request.batches) < WORKER_CHECK_BYTES:
                    # Small batches: their checks are mostly Python (holding the GIL),
                    # and the worker is the busier thread; spare it. Large ones are left
                    # to the worker, see _checks.
                    check = _done(check(worker.trainer))
                job = _train_job(check, stream, self.metrics, name)
                jobs.put_nowait(await worker.submit(job))
            request = await anext(requests, None)


def _reading_ended(
    stream: _Stream,
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
        # drain() cancelled it: Train reads this failure after the steps queued before.
        # Otherwise only Train's own exit cancels the reader, and nobody is left to read.
        if stream.draining:
            ended = Unavailable("the server is shutting down; reconnect to resume the stream")
    else:
        ended = reader.exception()
    if ended is not None:
        failed: asyncio.Future[list[StepResult]] = asyncio.get_running_loop().create_future()
        failed.set_exception(ended)
        jobs.put_nowait(failed)
    jobs.put_nowait(None)


def _validate(
    checker: BatchChecker, batch: WireBatch, index: int, segment: SharedSegment | None
) -> Batch | Rejected:
    field = f"batches[{index}]"
    try:
        weight = batch.sample_weight
        return checker.batch(
            decode_wire(batch.x, f"{field}.x", segment),
            decode_wire(batch.y, f"{field}.y", segment),
            None if weight is None else decode_wire(weight, f"{field}.sample_weight", segment),
            batch.sequence,
            field,
            quote=segment is None,  # a segment's bytes are never echoed back
        )
    except (InvalidArgument, ResourceExhausted) as exc:  # this batch alone; the stream goes on
        return Rejected(str(exc), batch.sequence)


def _checks(
    batches: list[WireBatch], segment: SharedSegment | None
) -> Callable[[Trainer], list[Batch | Rejected]]:
    """Decode and check a message's batches; one that fails keeps its place as REJECTED.

    Run on the model's own thread for large batches: numpy's checks release the GIL, so
    they overlap the event loop receiving the next message (large batches: the loop was
    the bottleneck, 12 % of it in these checks).
    """

    def check(trainer: Trainer) -> list[Batch | Rejected]:
        return [
            item if isinstance(item, Rejected) else trainer.stage(item)
            for item in (_validate(trainer.checker, b, i, segment) for i, b in enumerate(batches))
        ]

    return check


def _done(items: list[Batch | Rejected]) -> Callable[[Trainer], list[Batch | Rejected]]:
    return lambda _: items


def _mean_batch_bytes(batches: list[WireBatch]) -> float:
    def size(t: WireTensor | None) -> int:
        return 0 if t is None else t.shared[1] if t.shared is not None else len(t.data)

    total = sum(size(b.x) + size(b.y) + size(b.sample_weight) for b in batches)
    return total / len(batches)


def _train_job(
    check: Callable[[Trainer], list[Batch | Rejected]],
    stream: _Stream,
    metrics: Metrics,
    model: str,
) -> Callable[[Trainer], list[StepResult]]:
    def job(trainer: Trainer) -> list[StepResult]:
        items = check(trainer)
        start = time.perf_counter()
        first_step = trainer.step
        results, stream.error = trainer.train_batches(
            items,
            stream.options,
            lambda: stream.cancelled,  # nothing commits after a cancel
        )
        rows = [0 if isinstance(i, Rejected) else i.x.shape[0] for i in items]
        # The only place weights are read from the device for metrics: at most once a message.
        if metrics.sample_due(first_step, trainer.step):
            metrics.sample(trainer)
        metrics.record(model, zip(results, rows, strict=False), time.perf_counter() - start)
        return results

    return job


def _result(result: StepResult) -> pb.StepResult:
    return pb.StepResult(
        sequence=result.sequence,
        step=result.step,
        loss=result.loss,
        outcome=_OUTCOMES[result.outcome],
        reason=result.reason,
    )


def _info(info: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=info.name,
        spec=spec_to_proto(info.spec.model_dump()),
        step=info.step,
        pending_batches=info.pending_batches,
        device=info.device,
        parameters=[
            pb.ParameterInfo(name=p.name, shape=p.shape, frozen=p.frozen) for p in info.parameters
        ],
        autograd_chain=info.autograd_chain,
        nonfinite_streak=info.nonfinite_streak,
    )


def add_to_server(servicer: TrainerServicer, server: grpc.aio.Server) -> None:
    """Register the service like the generated ``add_TrainerServiceServicer_to_server``,
    except that Train requests are decoded by ``wire.parse_train_request`` (zero-copy
    for large messages)."""
    service = pb.DESCRIPTOR.services_by_name["TrainerService"]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        request_type = getattr(pb, method.input_type.name)
        response_type = getattr(pb, method.output_type.name)
        deserialize = parse_train_request if method.name == "Train" else request_type.FromString
        make = (
            grpc.stream_stream_rpc_method_handler
            if method.client_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=deserialize,
            response_serializer=response_type.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)  # type: ignore[attr-defined]
