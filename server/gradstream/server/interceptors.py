"""Cross-cutting concerns of every RPC: exceptions become status codes here, in one place,
and every RPC is counted in the ``grpc_server_*`` metrics."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from gradstream.server.errors import GradstreamError
from gradstream.server.metrics import GrpcServerMetrics, grpc_type

log = logging.getLogger("gradstream.server")
Context = grpc.aio.ServicerContext[Any, Any]


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], exc: BaseException, method: str
) -> None:
    if isinstance(exc, GradstreamError) and exc.code != "INTERNAL":
        await context.abort(grpc.StatusCode[exc.code], exc.message)
    # Anything unexpected: the detail goes to the log, the client gets an id to quote.
    incident = uuid.uuid4().hex[:12]
    log.error("internal error in %s (incident %s)", method, incident, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (incident {incident})")


def _is_abort(exc: BaseException) -> bool:
    # context.abort() raises this; it already carries the status to send.
    return isinstance(exc, grpc.aio.AbortError)


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
        if handler.unary_unary is not None:
            inner: Any = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                try:
                    return await inner(request, context)
                except BaseException as exc:
                    if _is_abort(exc) or not isinstance(exc, Exception):
                        raise
                    await _abort(context, exc, method)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            inner_stream: Any = handler.stream_stream

            async def stream_stream(
                requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                try:
                    async for response in inner_stream(requests, context):
                        yield response
                except BaseException as exc:
                    if _is_abort(exc) or not isinstance(exc, Exception):
                        raise
                    await _abort(context, exc, method)

            return grpc.stream_stream_rpc_method_handler(
                stream_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


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

    def _lookup(self, path: str, handler: Any) -> _MethodSeries:
        series = self._series.get(path)
        if series is None:
            service, _, method = path.lstrip("/").rpartition("/")
            kind = grpc_type(handler.request_streaming, handler.response_streaming)
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
        series = self._lookup(handler_call_details.method, handler)
        options = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }

        async def counted(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async for request in requests:
                series.received.inc()
                yield request

        def arguments(request: Any) -> Any:
            if handler.request_streaming:
                return counted(request)
            series.received.inc()
            return request

        if not handler.response_streaming:
            inner = handler.unary_unary or handler.stream_unary

            async def unary_response(request: Any, context: Context) -> Any:
                start = time.perf_counter()
                series.started.inc()
                exc: BaseException | None = None
                try:
                    response = await inner(arguments(request), context)
                    series.sent.inc()
                    return response
                except BaseException as error:
                    exc = error
                    raise
                finally:
                    series.done(_final_code(context, exc), start)

            make = (
                grpc.stream_unary_rpc_method_handler
                if handler.request_streaming
                else grpc.unary_unary_rpc_method_handler
            )
            return make(unary_response, **options)

        inner_stream = handler.unary_stream or handler.stream_stream
        if not inspect.isasyncgenfunction(inner_stream):
            # Writes through context.write (grpc.health's Watch): counted as started/handled only.
            async def written(request: Any, context: Context) -> None:
                start = time.perf_counter()
                series.started.inc()
                exc: BaseException | None = None
                try:
                    await inner_stream(arguments(request), context)
                except BaseException as error:
                    exc = error
                    raise
                finally:
                    series.done(_final_code(context, exc), start)

            stream_handler: Any = written
        else:

            async def streamed(request: Any, context: Context) -> AsyncIterator[Any]:
                start = time.perf_counter()
                series.started.inc()
                exc: BaseException | None = None
                try:
                    async for response in inner_stream(arguments(request), context):
                        series.sent.inc()
                        yield response
                except BaseException as error:
                    exc = error
                    raise
                finally:
                    series.done(_final_code(context, exc), start)

            stream_handler = streamed

        make_stream = (
            grpc.stream_stream_rpc_method_handler
            if handler.request_streaming
            else grpc.unary_stream_rpc_method_handler
        )
        return make_stream(stream_handler, **options)
