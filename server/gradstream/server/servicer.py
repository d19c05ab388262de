"""The wire <-> domain translation of ``gradstream.v1.TrainerService``; no torch math here."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import torch

from gradstream.server import exported
from gradstream.server.batches import BatchChecker
from gradstream.server.checkpoint import Checkpointer
from gradstream.server.codec import decode, decode_array, decode_wire, encode
from gradstream.server.engine import (
    ModelInfo,
    Outcome,
    StepResult,
    Trainer,
    TrainOptions,
)
from gradstream.server.errors import (
    DataLoss,
    FailedPrecondition,
    GradstreamError,
    InvalidArgument,
    Unavailable,
)
from gradstream.server.evaluation import Evaluation, evaluate_batches
from gradstream.server.export import CHUNK_BYTES, ExportFormat, chunks, copy_model, write
from gradstream.server.listening import peer
from gradstream.server.metrics import Metrics
from gradstream.server.publishing import Publisher
from gradstream.server.registry import ModelRegistry
from gradstream.server.session import MessageSource, TrainSession, WireSource, checked
from gradstream.server.shm import open_shared_memory
from gradstream.server.spec import parse_spec
from gradstream.server.tokens import may_read
from gradstream.server.wire import TrainMessage, batch_of, named_of, parse_train_request, tensor_of
from gradstream.server.worker import ModelWorker
from gradstream.v1 import trainer_pb2 as pb
from gradstream.wire import spec_from_proto, spec_to_proto

log = logging.getLogger("gradstream.server")

_OUTCOMES: dict[Outcome, Any] = {
    outcome: pb.Outcome.Value(f"OUTCOME_{outcome.value}") for outcome in Outcome
}
_EXPORT_FORMATS: dict[int, ExportFormat] = {
    pb.ExportFormat.Value(f"EXPORT_FORMAT_{fmt.name}"): fmt for fmt in ExportFormat
}
Context = grpc.aio.ServicerContext[object, object]


class TrainerServicer:
    """Translates each RPC between protobuf and the domain: registry, trainers, ``TrainSession``."""

    def __init__(
        self,
        registry: ModelRegistry,
        metrics: Metrics,
        checkpointer: Checkpointer | None = None,
        *,
        publisher: Publisher | None = None,
        eval_auc_max_scores: int = 1_000_000,
        predict_threads: int = 0,
        predict_inline_work: int = 0,
        export_max_batch_size: int = 0,
        export_chunk_bytes: int = CHUNK_BYTES,
        max_program_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.checkpointer = checkpointer or Checkpointer(None, metrics)
        self.publisher = publisher
        self.eval_auc_max_scores = eval_auc_max_scores
        self.export_max_batch_size = export_max_batch_size
        self.export_chunk_bytes = export_chunk_bytes
        self.max_program_bytes = max_program_bytes
        self.predict_inline_work = predict_inline_work
        # Predict's own threads: a large batch neither blocks the event loop nor waits
        # behind training (snapshot.py); None: Predict goes through the worker queue.
        self._predict_pool = (
            concurrent.futures.ThreadPoolExecutor(
                predict_threads,
                thread_name_prefix="gradstream-predict",
                initializer=_apply_threads,
                initargs=(torch.get_num_threads(),),
            )
            if predict_threads
            else None
        )
        self.draining = False
        self._sessions: set[TrainSession] = set()
        self._streams_closed = asyncio.Event()

    def drain(self) -> None:
        """Refuse new streams; open ones finish the steps in flight, then end with UNAVAILABLE."""
        self.draining = True
        for session in self._sessions:
            session.drain()

    @property
    def open_streams(self) -> int:
        """How many Train streams are open now."""
        return len(self._sessions)

    async def wait_streams_closed(self) -> None:
        """Return once no Train stream is open."""
        while self._sessions:
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
        if request.program:
            data = await self._with_program(data, request.program)
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

    async def _with_program(self, data: dict[str, Any], program: bytes) -> dict[str, Any]:
        """The spec with CreateModel's archive, and the widths of its inputs and output."""
        arch = dict(data.get("architecture") or {})
        if arch.get("kind") == "exported":
            # Size first, then the checks, then torch: nothing of the archive runs.
            _, *widths = await asyncio.to_thread(
                exported.signature, program, self.max_program_bytes
            )
            for field, width in zip(("in_features", "out_features"), widths, strict=True):
                given = arch.setdefault(field, width)
                if given != width:
                    raise InvalidArgument(
                        f"spec.architecture.{field}", f"is {given}; the program's is {width}"
                    )
        arch["program"] = program  # any other kind refuses it, naming the field
        return {**data, "architecture": arch}

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.GetModelResponse:
        info = await self.registry.get(request.name).run(Trainer.info)
        return pb.GetModelResponse(model=_info(info))

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        infos = []
        for name in filter(may_read, self.registry.names()):
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
        if self.publisher is not None:
            self.publisher.forget(request.name)
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
            self.metrics.learning_rate.labels(request.name).set(info.lr)
        return pb.UpdateModelResponse(model=_info(info))

    async def Predict(self, request: pb.PredictRequest, context: Context) -> pb.PredictResponse:
        worker = self.registry.get(request.name)
        trainer = worker.trainer
        if self._predict_pool is None:
            inputs = _inputs(trainer.checker, request)
            y, step = await worker.run(lambda t: (t.predict(*inputs).cpu(), t.step))
            return pb.PredictResponse(y=encode(y), step=step)
        snapshots = trainer.snapshots
        snapshot = snapshots.ready()
        work = _rows(request) * snapshots.work_per_row
        if snapshot is not None and snapshots.on_cpu and work <= self.predict_inline_work:
            # Small, and its copy is ready: here on the event loop. A hand-off to a Predict
            # thread and back is two wake-ups, each a scheduler slice on a busy machine.
            y, step = snapshots.predict(*_inputs(trainer.checker, request), snapshot=snapshot)
        else:
            job = functools.partial(_predict, trainer, request)
            y, step = await asyncio.get_running_loop().run_in_executor(self._predict_pool, job)
        return pb.PredictResponse(y=encode(y), step=step)

    def close(self) -> None:
        """Stop Predict's threads once the predictions under way are answered."""
        if self._predict_pool is not None:
            self._predict_pool.shutdown(wait=True)

    async def Evaluate(
        self, request_iterator: AsyncIterator[pb.EvaluateRequest], context: Context
    ) -> pb.EvaluateResponse:
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None or not first.HasField("open"):
            raise InvalidArgument("open", "the first EvaluateRequest of a stream must carry open")
        worker = self.registry.get(first.open.model)
        checker = worker.trainer.checker
        evaluation = Evaluation(
            worker.trainer.spec, tuple(first.open.top_k), self.eval_auc_max_scores
        )
        step, index = 0, 0
        request: pb.EvaluateRequest | None = first
        while request is not None:
            if request is not first and request.HasField("open"):
                raise InvalidArgument(
                    "open", "only the first EvaluateRequest of a stream may carry open"
                )
            batches = []
            for batch in request.batches:
                # Counted over the whole stream; the same checks as a Train batch.
                batches.append(checked(checker, batch_of(batch), f"batches[{index}]"))
                index += 1
            if batches:
                job = functools.partial(evaluate_batches, evaluation=evaluation, batches=batches)
                step = await worker.run(job)
            request = await anext(requests, None)
        metrics = evaluation.result()
        # top-k names come from the request: kept out of Prometheus, whose series a
        # request must never create (docs/observability.md).
        fixed = {k: v for k, v in metrics.items() if not k.startswith("top_")}
        self.metrics.evaluated(first.open.model, step, evaluation.rows, fixed)
        loss = metrics.pop("loss")
        return pb.EvaluateResponse(
            model=first.open.model, step=step, rows=evaluation.rows, loss=loss, metrics=metrics
        )

    async def ExportModel(
        self, request: pb.ExportModelRequest, context: Context
    ) -> AsyncIterator[pb.ExportModelResponse]:
        fmt = _EXPORT_FORMATS.get(request.format)
        if fmt is None:
            known = ", ".join(f"EXPORT_FORMAT_{f.name}" for f in ExportFormat)
            raise InvalidArgument(
                "format", f"{request.format} is not a format; give one of {known}"
            )
        # The worker copies the parameters; encoding runs on another thread.
        copy = await self.registry.get(request.name).run(copy_model)
        with tempfile.TemporaryDirectory(prefix="gradstream-export-") as tmp:
            try:
                await asyncio.to_thread(write, copy, fmt, Path(tmp), self.export_max_batch_size)
            except GradstreamError:
                raise
            except Exception as exc:  # a plug-in module torch cannot trace, say
                raise FailedPrecondition(
                    f"model {copy.name!r} cannot be exported as {fmt.value}: "
                    f"{type(exc).__name__}: {exc}"
                ) from None
            pieces = chunks(Path(tmp), self.export_chunk_bytes)
            try:
                while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
                    path, data = piece
                    yield pb.ExportModelResponse(path=path, data=data, step=copy.step)
            finally:
                pieces.close()

    async def ComputeGradients(
        self, request: pb.ComputeGradientsRequest, context: Context
    ) -> pb.ComputeGradientsResponse:
        worker = self.registry.get(request.name)
        checker = worker.trainer.checker
        inputs = _inputs(checker, request)
        rows = inputs[0].shape[0]
        has_y, has_v = request.HasField("y"), request.HasField("grad_output")
        if has_y == has_v:
            raise InvalidArgument(
                "y", "give exactly one of y (gradient of the loss) and grad_output"
            )
        y = weight = vector = None
        if has_y:
            y = checker.targets(decode_array(request.y, "y"), rows)
            if request.HasField("sample_weight"):
                weight = checker.weights(decode_array(request.sample_weight, "sample_weight"), rows)
        else:
            vector = checker.grad_output(decode_array(request.grad_output, "grad_output"))

        def gradients(trainer: Trainer) -> tuple[dict[str, torch.Tensor], float | None]:
            grads, loss = trainer.gradients(inputs, y, weight, vector)
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
        segment = None
        if first.open.shared_memory:
            segment = open_shared_memory(first.open.shared_memory, peer(context))
        options = TrainOptions(first.open.producer_id, max(1, first.open.report_every))
        async for response in self.train_stream(
            worker, options, first, requests, WireSource(segment)
        ):
            yield response

    async def train_stream(
        self,
        worker: ModelWorker,
        options: TrainOptions,
        first: Any,
        requests: AsyncIterator[Any],
        source: MessageSource,
    ) -> AsyncIterator[pb.TrainResponse]:
        """A Train stream from its opened answer to its end, its batches read by ``source``.

        Train's own, and the ingest front's (``ingest.py``), whose batches come in slots.
        """
        session = TrainSession(
            worker,
            options,
            self.metrics,
            self.checkpointer,
            publisher=self.publisher,
            source=source,
        )
        self._sessions.add(session)
        try:
            opened = await session.open()
            yield pb.TrainResponse(
                opened=pb.StreamState(
                    model=opened.model,
                    step=opened.step,
                    last_applied_sequence=opened.last_applied_sequence,
                    last_durable_sequence=opened.last_durable_sequence,
                )
            )
            if self.draining:  # drain() ran while this stream was opening
                session.drain()
            async for reply in session.replies(first, requests):
                yield _train_response(reply.results, reply.last_durable_sequence)
        finally:
            self._sessions.discard(session)
            self._streams_closed.set()


def _result(result: StepResult) -> pb.StepResult:
    return pb.StepResult(
        sequence=result.sequence,
        step=result.step,
        loss=result.loss,
        outcome=_OUTCOMES[result.outcome],
        reason=result.reason,
    )


def _train_response(results: list[StepResult], durable: int) -> pb.TrainResponse:
    """``TrainResponse(results=[_result(r) ...])``, built in place: a message answers up to
    64 batches, and keyword arguments that are defaults cost time on the event loop."""
    response = pb.TrainResponse(last_durable_sequence=durable)
    add = response.results.add
    for r in results:
        if r.reason:
            add(
                sequence=r.sequence,
                step=r.step,
                loss=r.loss,
                outcome=_OUTCOMES[r.outcome],
                reason=r.reason,
            )
        elif r.loss is None:
            add(sequence=r.sequence, step=r.step, outcome=_OUTCOMES[r.outcome])
        else:
            add(sequence=r.sequence, step=r.step, loss=r.loss, outcome=_OUTCOMES[r.outcome])
    return response


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
        lr=info.lr,
        inputs=[pb.InputInfo(name=i.name, kind=i.kind, shape=i.shape) for i in info.inputs],
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
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[method.client_streaming, method.server_streaming]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=deserialize,
            response_serializer=response_type.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)  # type: ignore[attr-defined]


def _apply_threads(count: int) -> None:
    # One count for the process in torch 2.13; set per thread for builds where it is not
    # (see worker.py).
    torch.set_num_threads(count)


def _predict(trainer: Trainer, request: pb.PredictRequest) -> tuple[torch.Tensor, int]:
    """On a Predict thread: decode and check the inputs (hardening's checks), predict on the
    snapshot."""
    snapshots = trainer.snapshots
    inputs = _inputs(trainer.checker, request)
    return snapshots.predict(*inputs, snapshot=snapshots.ready() or snapshots.newest(settled=True))


def _rows(request: pb.PredictRequest) -> int:
    """The rows a request's inputs claim (before any check)."""
    tensors = [request.x] if request.HasField("x") else [n.tensor for n in request.inputs]
    return max((t.shape[0] for t in tensors if t.shape), default=0)


def _inputs(
    checker: BatchChecker, request: pb.PredictRequest | pb.ComputeGradientsRequest
) -> tuple[torch.Tensor, ...]:
    """A request's x or named inputs, checked against the model's, in declaration order."""
    given = checker.arrange(tensor_of(request, "x"), named_of(request.inputs))
    return checker.features(
        [decode_wire(tensor, field) for field, tensor in given], [field for field, _ in given]
    )
