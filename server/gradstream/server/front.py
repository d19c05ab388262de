"""The front process of ``ingest=process``: the public gRPC port, forwarding to the backend.

The backend (``app.Server``, everything that trains and keeps state) listens only on a unix
socket in a private directory and answers only calls that carry its secret. The front owns
the public host and port with the server's TLS credentials and message limits, and forwards
every call as raw bytes: the client's metadata (less the two internal keys, which it sets
itself: the secret and the client's address), its deadline, its cancellation; the backend's
status, details and metadata come back unchanged. So the backend's interceptors (tokens,
limits, metrics) decide exactly as when clients reach it directly. A method may be served by
a handler of its own instead of the raw forward (``Front(methods=...)``: Train's ingest).

Lifecycle: the backend starts ``python -m gradstream.server.front`` (``FrontProcess``) with
the settings, socket and secret on its stdin, reads the bound port from its stdout, and
keeps its stdin open. ``stop`` on stdin drains the front (no new calls; those in flight
finish as the backend ends them); end of stdin means the backend is gone, and the front
exits at once, non-zero (a SIGTERM sent to the front alone ends its calls at once). The
backend watches the front's exit in turn. Train is the one method the front serves itself
(``ingested``: decoded and checked here, stepped by the backend on shared memory,
``ingest.py``); that brings torch into this process, for numpy checks and copies only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import IO, Any

import grpc
import torch
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from gradstream.server.config import Settings
from gradstream.server.ingest import ForwardRaw, ingest_train
from gradstream.server.interceptors import TRAIN
from gradstream.server.listening import (
    FORWARDED_PEER,
    INTERNAL_SECRET,
    server_credentials,
    server_options,
)
from gradstream.server.relay import pump, relay_error
from gradstream.v1 import trainer_pb2

log = logging.getLogger("gradstream.front")
Context = grpc.aio.ServicerContext[Any, Any]

# Methods that only the front may call on the backend: never forwarded for a client.
INTERNAL_PREFIX = "/gradstream.internal."
_SERVICES = (
    trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"],
    health_pb2.DESCRIPTOR.services_by_name["Health"],
    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
)
# (request streaming, response streaming) of every method the backend serves; a method not
# here is forwarded as a stream both ways (on the wire every kind is one), and the backend
# answers it UNIMPLEMENTED.
KINDS: dict[str, tuple[bool, bool]] = {
    f"/{service.full_name}/{method.name}": (method.client_streaming, method.server_streaming)
    for service in _SERVICES
    for method in service.methods
}
_DROPPED = frozenset({INTERNAL_SECRET, FORWARDED_PEER})


class BackendLink:
    """The front's channel to the backend's socket, and what every forwarded call carries."""

    def __init__(self, socket: Path, secret: str) -> None:
        self.channel = grpc.aio.insecure_channel(
            f"unix:{socket}",
            # The front's public port already enforces max_message_bytes both ways, and the
            # backend its own: no third limit here.
            options=[
                ("grpc.max_receive_message_length", -1),
                ("grpc.max_send_message_length", -1),
            ],
        )
        self._secret = secret

    def metadata(self, context: Context) -> tuple[tuple[str, Any], ...]:
        """The client's metadata without the internal keys, then the secret and the peer."""
        given: Any = context.invocation_metadata() or ()
        return (
            *((k, v) for k, v in given if k not in _DROPPED),
            (INTERNAL_SECRET, self._secret),
            (FORWARDED_PEER, context.peer()),
        )

    @staticmethod
    def timeout(context: Context) -> float | None:
        """What is left of the client's deadline (None: it set none)."""
        return context.time_remaining()

    async def close(self) -> None:
        """Close the channel; calls still on it end CANCELLED."""
        await self.channel.close(None)


async def _relay_headers(context: Context, call: Any) -> None:
    initial = await call.initial_metadata()
    if initial:
        await context.send_initial_metadata(tuple(initial))


async def _relay_trailers(context: Context, call: Any) -> None:
    trailing = await call.trailing_metadata()
    if trailing:
        context.set_trailing_metadata(tuple(trailing))


def _call(
    link: BackendLink, callable_: Any, streaming_in: bool, request: Any, context: Context
) -> tuple[Any, asyncio.Task[None] | None]:
    """The backend's call for a client's, and the task that sends a request stream's messages."""
    metadata, timeout = link.metadata(context), link.timeout(context)
    if not streaming_in:
        return callable_(request, metadata=metadata, timeout=timeout), None
    call = callable_(None, metadata=metadata, timeout=timeout)
    return call, asyncio.create_task(pump(request, call))


def forward(link: BackendLink, method: str) -> grpc.RpcMethodHandler[Any, Any]:
    """The handler that forwards ``method`` to the backend as raw bytes, of its own kind."""
    streaming_in, streaming_out = KINDS.get(method, (True, True))
    channel = link.channel
    if not streaming_out:
        # One multi-callable per method, made once.
        unary = (
            channel.stream_unary(method, None, None)
            if streaming_in
            else channel.unary_unary(method, None, None)
        )

        async def one(request: Any, context: Context) -> bytes:
            call, sender = _call(link, unary, streaming_in, request, context)
            try:
                response: bytes = await call
            except grpc.aio.AioRpcError as error:
                await relay_error(context, error)
                raise  # not reached: abort raised
            finally:
                call.cancel()  # the client went away (or the call is over: then a no-op)
                if sender is not None:
                    sender.cancel()
            await _relay_headers(context, call)
            await _relay_trailers(context, call)
            return response

        make = (
            grpc.stream_unary_rpc_method_handler
            if streaming_in
            else grpc.unary_unary_rpc_method_handler
        )
        return make(one)

    streaming = (
        channel.stream_stream(method, None, None)
        if streaming_in
        else channel.unary_stream(method, None, None)
    )

    async def many(request: Any, context: Context) -> AsyncIterator[bytes]:
        call, sender = _call(link, streaming, streaming_in, request, context)
        try:
            await _relay_headers(context, call)
            async for response in call:
                yield response
            await _relay_trailers(context, call)
        except grpc.aio.AioRpcError as error:
            await relay_error(context, error)
        finally:
            call.cancel()
            if sender is not None:
                sender.cancel()

    make = (
        grpc.stream_stream_rpc_method_handler
        if streaming_in
        else grpc.unary_stream_rpc_method_handler
    )
    return make(many)


# A method the front serves itself: made once per front, from the link and the settings.
MethodFactory = Callable[[BackendLink, Settings], "grpc.RpcMethodHandler[Any, Any]"]


class _Proxy(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Every method: a handler of its own where one is given, else the raw forward."""

    def __init__(
        self, link: BackendLink, settings: Settings, methods: Mapping[str, MethodFactory]
    ) -> None:
        self._link = link
        self._handlers = {name: make(link, settings) for name, make in methods.items()}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            if method.startswith(INTERNAL_PREFIX):
                return None  # UNIMPLEMENTED, as for any method nobody serves
            handler = self._handlers[method] = forward(self._link, method)
        return handler


class Front:
    """The public port of an ``ingest=process`` server; ``start`` -> ``stop``."""

    def __init__(
        self,
        settings: Settings,
        socket: Path,
        secret: str,
        methods: Mapping[str, MethodFactory] | None = None,
    ) -> None:
        self.settings = settings
        self.link = BackendLink(socket, secret)
        self._methods = dict(methods or {})
        self._grpc: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        """Bind the public port (TLS as the settings say) and serve; returns the port."""
        s = self.settings
        self._grpc = grpc.aio.server(options=server_options(s))
        self._grpc.add_generic_rpc_handlers((_Proxy(self.link, s, self._methods),))
        address = f"{s.host}:{s.port}"
        credentials = server_credentials(s)
        if credentials is not None:
            self.port = self._grpc.add_secure_port(address, credentials)
        else:
            self.port = self._grpc.add_insecure_port(address)
        await self._grpc.start()
        return self.port

    async def stop(self, grace: float | None) -> None:
        """Refuse new calls; let those in flight end within ``grace`` seconds."""
        if self._grpc is not None:
            await self._grpc.stop(grace)
        await self.link.close()


# -- the front's process -------------------------------------------------------------------

STOP = b"stop\n"
TERMINATED = b"SIGTERM"  # not a command the backend sends: a line always ends in a newline


def ingested(link: BackendLink, settings: Settings) -> grpc.RpcMethodHandler[Any, Any]:
    """Train, decoded and checked here and stepped by the backend (``ingest.py``); a stream
    that is not the front's to ingest (a producer's shared memory) is forwarded raw.

    The limits a batch is checked against come with each model's contract, from the
    backend, not from ``settings``."""
    raw: Any = forward(link, TRAIN).stream_stream  # the raw forward's own (async) behaviour

    async def train(requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[bytes]:
        metadata = link.metadata(context)
        try:
            async for answer in ingest_train(requests, context, link.channel, metadata):
                yield answer
        except ForwardRaw as handed:
            async for answer in raw(_prepend(handed.first, requests), context):
                yield answer

    return grpc.stream_stream_rpc_method_handler(train)


async def _prepend(first: bytes | None, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first is not None:
        yield first
    async for request in rest:
        yield request


def _methods() -> dict[str, MethodFactory]:
    """Methods the front serves itself rather than forwarding raw: Train's ingest path."""
    return {TRAIN: ingested}


def _settle(said: asyncio.Future[bytes], command: bytes) -> None:
    if not said.done():
        said.set_result(command)


async def _serve(config: dict[str, Any], commands: IO[bytes]) -> int:
    settings = Settings(**config["settings"])
    socket = Path(config["socket"])
    front = Front(settings, socket, config["secret"], _methods())
    try:
        answer: dict[str, Any] = {"port": await front.start()}
    except Exception as exc:  # a port in use: the backend says so and exits
        answer = {"error": str(exc) or type(exc).__name__}
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
    if "error" in answer:
        return 1
    loop = asyncio.get_running_loop()
    said: asyncio.Future[bytes] = loop.create_future()

    def listen() -> None:
        line = commands.readline()  # b"" once the backend is gone
        loop.call_soon_threadsafe(_settle, said, line)

    threading.Thread(target=listen, name="gradstream-front-stdin", daemon=True).start()
    # Only the backend drains the server; a SIGTERM sent to the front alone ends its calls
    # now, and the backend, seeing the front gone, stops too.
    loop.add_signal_handler(signal.SIGTERM, _settle, said, TERMINATED)
    command = await said
    if command == STOP:
        # The backend drains: the calls in flight end as it ends them.
        await front.stop(settings.drain_timeout)
        return 0
    await front.stop(0)
    if command == TERMINATED:
        return 0
    log.error("the backend process is gone: the front stops")
    shutil.rmtree(socket.parent, ignore_errors=True)
    return 1


# How far the front stands back from the backend when both want a core (nice, 0-19).
FRONT_NICE = 10


def _yield_to_backend() -> None:
    """Lower the front's priority: its threads so far, and those it starts (they inherit it).

    The front is there to keep the backend's model workers fed; it idles most of the time,
    waiting for a free slot. When the two contend for a core, the step should win: a
    worker waiting in the run queue is throughput lost, a front waiting there is not (the
    slots in flight cover it). Where the kernel groups a session's processes for
    scheduling (autogroup; the front has a session of its own), the group's nice is what
    counts between the two, so it is lowered as well, where the kernel has it.
    """
    nice = os.nice(FRONT_NICE)  # relative to the backend's, whatever an operator set there
    with contextlib.suppress(OSError):  # threads started on import (Linux: nice is per thread)
        for task in os.listdir("/proc/self/task"):
            os.setpriority(os.PRIO_PROCESS, int(task), nice)
    group = Path("/proc/self/autogroup")
    with contextlib.suppress(OSError, ValueError):
        # "/autogroup-<n> nice <k>"
        grouped = int(group.read_text().split()[-1])
        group.write_text(str(min(19, grouped + FRONT_NICE)))


def main() -> None:
    """``python -m gradstream.server.front``: the configuration is the first line of stdin."""
    # The backend decides when the front stops (it drains first); the front runs in a session
    # of its own, so a terminal's Ctrl-C reaches only the backend, and a stray SIGINT is moot.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The front's torch work is checks and copies of one message at a time: a team of
    # OpenMP threads would only spin on the cores the backend's steps run on.
    torch.set_num_threads(1)
    _yield_to_backend()
    commands = sys.stdin.buffer
    config = json.loads(commands.readline())
    logging.basicConfig(
        level=config["settings"].get("log_level", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    code = asyncio.run(_serve(config, commands))
    sys.stdout.flush()
    os._exit(code)  # no finalizers: a grpc server's complain once its loop is gone


# -- the backend's handle on it ------------------------------------------------------------


class FrontDied(RuntimeError):
    """The front process exited while the backend still served."""


class FrontProcess:
    """The front as the backend sees it: spawned, watched, drained, reaped."""

    def __init__(self, process: subprocess.Popen[bytes], port: int) -> None:
        self.process = process
        self.port = port

    @property
    def pid(self) -> int:
        """The front's process id."""
        return self.process.pid

    @classmethod
    def spawn(
        cls, settings: Settings, socket: Path, secret: str, timeout: float = 60.0
    ) -> FrontProcess:
        """Start the front and wait until it listens (blocking: call it off the event loop)."""
        process = subprocess.Popen(
            [sys.executable, "-m", "gradstream.server.front"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            # Its own session: a terminal's Ctrl-C or a group kill reaches the backend, which
            # drains and then stops the front, never the front first.
            start_new_session=True,
        )
        assert process.stdin is not None and process.stdout is not None
        config = {"settings": settings.model_dump(mode="json"), "socket": str(socket)}
        config["secret"] = secret  # on a pipe, never in argv or the environment
        try:
            process.stdin.write(json.dumps(config).encode() + b"\n")
            process.stdin.flush()
            line = _read_line(process.stdout, timeout)
            if not line:
                raise FrontDied(f"the front process did not start within {timeout:.0f} s")
            answer = json.loads(line)
            if "error" in answer:
                raise FrontDied(f"the front process could not listen: {answer['error']}")
            return cls(process, int(answer["port"]))
        except BaseException:
            process.kill()
            process.wait()
            raise

    def watch(self, exited: Callable[[int], object]) -> None:
        """Call ``exited(returncode)`` from a thread of its own once the front has exited."""

        def wait() -> None:
            exited(self.process.wait())

        threading.Thread(target=wait, name="gradstream-front-watch", daemon=True).start()

    def drain(self) -> None:
        """Ask the front to refuse new calls and exit once those in flight have ended."""
        assert self.process.stdin is not None
        with contextlib.suppress(OSError):  # it may be gone already
            self.process.stdin.write(STOP)
            self.process.stdin.flush()

    def reap(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for the front to exit, then kill it; its exit code."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error("the front process did not exit within %.1f s: killed", timeout)
            self.process.kill()
            code = self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        return code


def _read_line(stream: IO[bytes], timeout: float) -> bytes:
    """One line of ``stream``, or b"" if none came within ``timeout`` seconds."""
    line: list[bytes] = []
    reader = threading.Thread(target=lambda: line.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return line[0] if line else b""


if __name__ == "__main__":
    main()
