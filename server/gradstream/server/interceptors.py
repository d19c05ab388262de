"""Cross-cutting concerns of every RPC: exceptions become status codes here, in one place,
and every RPC is counted in the ``grpc_server_*`` metrics."""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import Gauge

from gradstream.internal.v1 import ingest_pb2
from gradstream.server.errors import GradstreamError
from gradstream.server.listening import FORWARDED_PEER, INTERNAL_SECRET, set_forwarded_peer
from gradstream.server.metrics import GrpcServerMetrics, grpc_type
from gradstream.server.tokens import CALLER, RPC_ACTIONS, Action, TokenStore
from gradstream.server.wire import TrainMessage
from gradstream.v1 import trainer_pb2

log = logging.getLogger("gradstream.server")
Context = grpc.aio.ServicerContext[Any, Any]


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], exc: BaseException, method: str
) -> None:
    if isinstance(exc, GradstreamError) and exc.code != "INTERNAL":
        await context.abort(grpc.StatusCode[exc.code], exc.message)
    if _out_of_memory(exc):
        log.warning("out of memory in %s: %s", method, exc)
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "device out of memory: send fewer rows per batch or use a smaller model",
        )
    # Anything unexpected: the detail goes to the log, the client gets an id to quote.
    incident = uuid.uuid4().hex[:12]
    log.error("internal error in %s (incident %s)", method, incident, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (incident {incident})")


def _out_of_memory(exc: BaseException) -> bool:
    # torch.OutOfMemoryError (CUDA), the CPU allocator's RuntimeError, numpy's MemoryError.
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def _is_abort(exc: BaseException) -> bool:
    # context.abort() raises this; it already carries the status to send.
    return isinstance(exc, grpc.aio.AbortError)


Call = Callable[[AsyncIterator[Any], Context], AsyncIterator[Any]]
Around = Callable[[AsyncIterator[Any], Context, Call], AsyncIterator[Any]]
_MAKERS: dict[tuple[bool, bool], Any] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _adapt(handler: Any, around: Around, deserializer: Any = None) -> Any:
    """``handler`` with ``around`` wrapped about it, as a handler of the same kind.

    The one place that knows gRPC's four handler kinds: every interceptor sees each call
    as a stream of requests in and a stream of responses out (one of each for unary), and
    ``call`` runs the wrapped handler on such a stream. A response-streaming handler that
    writes through ``context.write`` (grpc.health's Watch) yields nothing here.
    """
    streaming_in, streaming_out = bool(handler.request_streaming), bool(handler.response_streaming)
    inner: Any = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )

    async def call(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        argument = requests if streaming_in else await anext(requests)
        if not streaming_out:
            yield await inner(argument, context)
            return
        result = inner(argument, context)
        if inspect.isasyncgen(result):
            async for response in result:
                yield response
        else:
            await result

    def requests_of(argument: Any) -> AsyncIterator[Any]:
        return argument if streaming_in else _one(argument)

    behaviour: Any
    if not streaming_out:

        async def behaviour(argument: Any, context: Context) -> Any:
            responses = [r async for r in around(requests_of(argument), context, call)]
            return responses[-1] if responses else None

    elif inspect.isasyncgenfunction(inner):

        async def behaviour(argument: Any, context: Context) -> AsyncIterator[Any]:
            async for response in around(requests_of(argument), context, call):
                yield response

    else:

        async def behaviour(argument: Any, context: Context) -> None:
            async for response in around(requests_of(argument), context, call):
                await context.write(response)

    return _MAKERS[(streaming_in, streaming_out)](
        behaviour,
        request_deserializer=deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


async def _one(request: Any) -> AsyncIterator[Any]:
    yield request


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Maps ``GradstreamError`` to its status code; anything else to a sanitized INTERNAL."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method

        async def around(
            requests: AsyncIterator[Any], context: Context, call: Call
        ) -> AsyncIterator[Any]:
            try:
                async for response in call(requests, context):
                    yield response
            except Exception as exc:
                if _is_abort(exc):
                    raise
                await _abort(context, exc, method)

        return _adapt(handler, around)


class _MethodSeries:
    """One method's ``grpc_server_*`` children, resolved once (labels() costs a lock and a dict)."""

    def __init__(self, metrics: GrpcServerMetrics, kind: str, service: str, method: str) -> None:
        labels = (kind, service, method)
        self.started = metrics.started.labels(*labels)
        self.received = metrics.received.labels(*labels)
        self.sent = metrics.sent.labels(*labels)
        self.seconds = metrics.seconds.labels(*labels)
        self._handled = metrics.handled
        self._labels = labels

    def done(self, code: grpc.StatusCode, start: float) -> None:
        self._handled.labels(*self._labels, code.name).inc()
        self.seconds.observe(time.perf_counter() - start)


def _final_code(
    context: grpc.aio.ServicerContext[Any, Any], exc: BaseException | None
) -> grpc.StatusCode:
    """The status the client gets: set by abort/set_code, else from how the handler ended."""
    code = context.code()
    if code is not None and not isinstance(code, grpc.StatusCode):
        code = _CODES.get(code)  # some grpc versions hand back the raw integer
    if code is not None:
        return code
    if exc is None:
        return grpc.StatusCode.OK
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN  # what gRPC sends for an exception nobody mapped


_CODES = {code.value[0]: code for code in grpc.StatusCode}


class MetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts RPCs, messages and handling time as the standard ``grpc_server_*`` family.

    Install it before ``ErrorInterceptor`` so it wraps it and sees the final status
    code, including the ones mapped from exceptions. Only methods the server has
    a handler for are counted: an unknown method name never becomes a label.
    """

    def __init__(self, metrics: GrpcServerMetrics) -> None:
        self.metrics = metrics
        self._series: dict[str, _MethodSeries] = {}

    def _lookup(
        self, path: str, request_streaming: bool, response_streaming: bool
    ) -> _MethodSeries:
        series = self._series.get(path)
        if series is None:
            service, _, method = path.lstrip("/").rpartition("/")
            kind = grpc_type(request_streaming, response_streaming)
            series = self._series[path] = _MethodSeries(self.metrics, kind, service, method)
        return series

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        path = handler_call_details.method
        if path == INGEST_CONTRACT:
            return self._contract(handler)
        series = self._lookup(
            _COUNTED_AS.get(path, path), handler.request_streaming, handler.response_streaming
        )

        async def counted(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async for request in requests:
                series.received.inc()
                yield request

        async def around(
            requests: AsyncIterator[Any], context: Context, call: Call
        ) -> AsyncIterator[Any]:
            start = time.perf_counter()
            series.started.inc()
            exc: BaseException | None = None
            try:
                async for response in call(counted(requests), context):
                    series.sent.inc()
                    yield response
            except BaseException as error:
                exc = error
                raise
            finally:
                series.done(_final_code(context, exc), start)

        return _adapt(handler, around)

    def _contract(self, handler: Any) -> Any:
        """The ingest front's Contract: a refusal is the client's Train refused (its front
        ends the stream there, with this status); an answer counts nothing, the Train
        that follows is counted."""
        train = self._lookup(TRAIN, True, True)

        async def around(
            requests: AsyncIterator[Any], context: Context, call: Call
        ) -> AsyncIterator[Any]:
            start = time.perf_counter()
            try:
                async for response in call(requests, context):
                    yield response
            except BaseException as error:
                train.started.inc()
                train.received.inc()
                train.done(_final_code(context, error), start)
                raise

        return _adapt(handler, around)


# -- malformed requests --------------------------------------------------------------------


class Malformed:
    """Stands in for a request whose bytes did not parse; the handler is never called with it."""

    def __init__(self, kind: str, error: Exception) -> None:
        self.kind = kind
        self.error = error

    def describe(self) -> str:
        """The status message: which message type did not parse (not the parser's internals)."""
        return f"request: not a valid {self.kind} message"


def _safe_deserializer(
    deserializer: Callable[[bytes], Any] | None,
) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    kind = getattr(getattr(deserializer, "__self__", None), "__name__", "request")

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # the parser's own error would surface as UNKNOWN
            return Malformed(kind, exc)

    return parse


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Bytes that are not the method's message type get INVALID_ARGUMENT, never UNKNOWN.

    grpc.aio reports a request that fails to parse as UNKNOWN (unary) or raises it
    inside the handler (streams); here the parser's exception becomes a ``Malformed``
    value that is answered before any handler sees it. Every service on the port
    (health and reflection too) and every kind of method is covered.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler

        async def around(
            requests: AsyncIterator[Any], context: Context, call: Call
        ) -> AsyncIterator[Any]:
            async for response in call(_checked(requests, context), context):
                yield response

        return _adapt(handler, around, _safe_deserializer(handler.request_deserializer))


async def _refuse_malformed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    if isinstance(request, Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.describe())


async def _checked(
    requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[Any]:
    async for request in requests:
        await _refuse_malformed(request, context)
        yield request


# -- bearer tokens -------------------------------------------------------------------------

_TRAINER_PREFIX = "/gradstream.v1.TrainerService/"
TRAIN = f"{_TRAINER_PREFIX}Train"
# The ingest front's calls to the server process (ingest.py). Its Train is the client's
# Train stream: a token, the stream limit and the metrics see it as Train; its Contract
# opens that stream: a token needs the right to train the model.
INGEST_TRAIN = "/gradstream.internal.v1.IngestService/Train"
INGEST_CONTRACT = "/gradstream.internal.v1.IngestService/Contract"
_COUNTED_AS = {INGEST_TRAIN: TRAIN, INGEST_CONTRACT: TRAIN}


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def _model_of(request: Any) -> str:
    if isinstance(request, TrainMessage):  # Train's first message, decoded by wire.py
        return request.open.model if request.open is not None else ""
    if isinstance(request, trainer_pb2.EvaluateRequest):  # Evaluate's first message
        return request.open.model
    if isinstance(request, ingest_pb2.TrainRequest):  # the ingest front's Train
        return request.open.model
    if isinstance(request, ingest_pb2.ContractRequest):
        return request.model
    return str(getattr(request, "name", ""))


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Bearer tokens on every TrainerService RPC; health and reflection stay open.

    The token is checked before the handler runs (UNAUTHENTICATED), then the action
    the RPC needs on the model the request names (PERMISSION_DENIED): for Train that
    is the first message's ``open.model``. ListModels answers only the models the
    token may read. A denied call never reaches the servicer.
    """

    def __init__(self, store: TokenStore) -> None:
        self.store = store

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method = _COUNTED_AS.get(handler_call_details.method, handler_call_details.method)
        if handler is None or not method.startswith(_TRAINER_PREFIX):
            return handler
        rpc = method.removeprefix(_TRAINER_PREFIX)
        action = RPC_ACTIONS.get(rpc, Action.ADMIN)
        token = _bearer(handler_call_details.invocation_metadata)
        grant = self.store.find(token) if token is not None else None
        denial = None
        if token is None:
            denial = "missing credentials: send the metadata 'authorization: Bearer <token>'"
        elif grant is None:
            denial = "unknown token"

        async def check(context: grpc.aio.ServicerContext[Any, Any], request: Any) -> None:
            if grant is None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, denial or "")
            if rpc == "ListModels" or isinstance(request, Malformed):
                return  # ListModels is filtered by the servicer; a malformed one refused further in
            assert grant is not None
            model = _model_of(request)
            if not grant.allows(action, model):
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"this token may not {action.value} model {model!r}",
                )

        async def around(
            requests: AsyncIterator[Any], context: Context, call: Call
        ) -> AsyncIterator[Any]:
            if grant is None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, denial or "")
            first = await anext(requests, None)
            if first is not None:
                await check(context, first)
            CALLER.set(grant)  # this task's: ListModels answers what the caller may read
            async for response in call(_prepend(first, requests), context):
                yield response

        return _adapt(handler, around)


async def _prepend(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    if first is None:
        return
    yield first
    async for item in rest:
        yield item


# -- concurrent streams --------------------------------------------------------------------


class StreamLimitInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """At most ``max_streams`` request streams (Train, Evaluate) at once; the next is refused.

    Evaluate counts too: each open one holds its accumulated scores, so an unbounded
    number of them is unbounded memory.

    Counting happens on the event loop, so the check and the increment cannot
    interleave with another stream's. ``active`` (and the gauge) always return to
    zero: the count drops in a ``finally`` whether the stream ends, fails or is cancelled.
    """

    def __init__(self, max_streams: int, gauge: Gauge | None = None) -> None:
        self.max_streams = max_streams
        self.gauge = gauge
        self.active = 0

    def _set(self, value: int) -> None:
        self.active = value
        if self.gauge is not None:
            self.gauge.set(value)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if (
            handler is None
            or not handler.request_streaming
            or not _COUNTED_AS.get(
                handler_call_details.method, handler_call_details.method
            ).startswith(_TRAINER_PREFIX)
        ):
            return handler

        async def around(
            requests: AsyncIterator[Any], context: Context, call: Call
        ) -> AsyncIterator[Any]:
            if self.active >= self.max_streams:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"max_streams: {self.max_streams} Train streams and Evaluate streams are open "
                    "already; retry later",
                )
            self._set(self.active + 1)
            try:
                async for response in call(requests, context):
                    yield response
            finally:
                self._set(self.active - 1)

        return _adapt(handler, around)


# -- the backend's private socket (ingest=process) -----------------------------------------


async def _unauthenticated(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED, f"missing or wrong {INTERNAL_SECRET} metadata"
    )
    yield b""  # never reached: makes this a stream handler of any call's shape


_REFUSED = grpc.stream_stream_rpc_method_handler(_unauthenticated)


class InternalSecretInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Behind a front, only the front may call: every call must carry its secret.

    First in the chain, so a refused call reaches nothing else (not even the metrics).
    A call with the secret also carries the client's address as the front saw it, which
    ``listening.peer`` then answers for the rest of the call.
    """

    def __init__(self, secret: str) -> None:
        self._secret = secret.encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        secrets: list[str | bytes] = []
        forwarded: list[str | bytes] = []
        for key, value in handler_call_details.invocation_metadata or ():
            if key == INTERNAL_SECRET:
                secrets.append(value)
            elif key == FORWARDED_PEER:
                forwarded.append(value)
        # Exactly one of each, as the front sends them: a second copy is someone else's.
        if len(secrets) != 1 or len(forwarded) > 1:
            return _REFUSED
        given = secrets[0].encode() if isinstance(secrets[0], str) else secrets[0]
        if not hmac.compare_digest(given, self._secret):
            return _REFUSED
        if forwarded:
            peer = forwarded[0]
            set_forwarded_peer(peer if isinstance(peer, str) else peer.decode(errors="replace"))
        else:
            set_forwarded_peer(None)
        return await continuation(handler_call_details)
