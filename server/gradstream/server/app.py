"""Wiring and lifecycle: start -> serve until a signal -> drain -> stop."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from gradstream.server.checkpoint import Checkpointer, check_directory
from gradstream.server.config import Settings
from gradstream.server.errors import InvalidArgument
from gradstream.server.interceptors import (
    AuthInterceptor,
    ErrorInterceptor,
    MalformedRequestInterceptor,
    MetricsInterceptor,
    StreamLimitInterceptor,
)
from gradstream.server.metrics import Metrics
from gradstream.server.registry import ModelRegistry
from gradstream.server.servicer import TrainerServicer, add_to_server
from gradstream.server.tokens import TokenStore
from gradstream.v1 import trainer_pb2

log = logging.getLogger("gradstream.server")

# torch's own choice (a thread per physical core, or OMP_NUM_THREADS), read before any
# Server changed it: several servers in one process must not each take one more away.
TORCH_DEFAULT_THREADS = torch.get_num_threads()


def intra_op_threads(settings: Settings) -> int:
    """The torch threads each model's worker steps with: the setting, else one fewer than
    torch's default (at least 1).

    Every Train message is received on the one event-loop thread while the model's worker
    steps: with torch's default the two fought for the cores, and on 2 cores medium
    batches ran at half the plain loop's speed (docs/performance.md).
    """
    return settings.threads or max(1, TORCH_DEFAULT_THREADS - 1)


SERVICE_NAME = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU; ``cuda:N`` must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InvalidArgument(
            "device", f"{name!r} is not a device (auto, cpu, cuda, cuda:N)"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgument("device", f"{name!r} asked for, but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidArgument(
                "device", f"{name!r}: only {torch.cuda.device_count()} CUDA devices here"
            )
    elif device.type != "cpu":
        raise InvalidArgument("device", f"{name!r} is not supported (auto, cpu, cuda, cuda:N)")
    return device


class StartupRefused(ValueError):
    """The settings would expose the server unsafely, or name unreadable credentials."""


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches: 127.0.0.0/8, ::1, localhost."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def load_tokens(settings: Settings) -> TokenStore | None:
    """The token store, or None where auth is off; refuses unsafe exposure.

    Auth is on whenever a tokens file is given. Without one the server only listens
    on loopback, unless ``insecure`` says the operator wants an open port.
    """
    if settings.tokens_file is not None:
        try:
            return TokenStore.load(settings.tokens_file)
        except OSError as exc:
            raise StartupRefused(
                f"tokens_file: cannot read {settings.tokens_file}: {exc}"
            ) from None
    if not is_loopback(settings.host) and not settings.insecure:
        raise StartupRefused(
            f"refusing to listen on {settings.host} without tokens: anyone who reaches the "
            "port could change or delete models. Give --tokens-file (see docs/security.md), "
            "or --insecure to run without authentication."
        )
    return None


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StartupRefused(f"{what}: cannot read {path}: {exc}") from None


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS for the gRPC port, or None for plaintext; a CA turns on mutual TLS."""
    if settings.tls_cert is None and settings.tls_key is None:
        if settings.metrics_tls:
            raise StartupRefused("metrics_tls needs tls_cert and tls_key")
        if settings.tls_ca is not None:
            raise StartupRefused("tls_ca needs tls_cert and tls_key (the server's own TLS)")
        return None
    if settings.tls_cert is None or settings.tls_key is None:
        raise StartupRefused("tls_cert and tls_key go together")
    ca = None if settings.tls_ca is None else _read(settings.tls_ca, "tls_ca")
    return grpc.ssl_server_credentials(
        [(_read(settings.tls_key, "tls_key"), _read(settings.tls_cert, "tls_cert"))],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


class Server:
    """One gradstream server: the gRPC port, the plaintext health port and the metrics port."""

    # What holds the models: distributed.py swaps in one that replicates them on every rank.
    registry_type: Callable[..., ModelRegistry] = ModelRegistry

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tokens = load_tokens(settings)
        self.credentials = server_credentials(settings)
        self.device = resolve_device(settings.device)
        torch.set_num_threads(intra_op_threads(settings))
        # The first optimizer imports torch._dynamo, seconds of work: do it before serving,
        # not inside the first CreateModel.
        torch.optim.SGD([torch.zeros(1, requires_grad=True)])
        # No metrics port: nothing is recorded, so "metrics off" costs nothing.
        self.metrics = Metrics(
            enabled=settings.metrics_port >= 0,
            every=settings.metrics_every,
            max_elements=settings.metrics_max_elements,
            device=self.device,
        )
        self.registry = self.registry_type(
            self.device,
            self.metrics,
            max_models=settings.max_models,
            queue_depth=settings.queue_depth,
            max_nonfinite_steps=settings.max_nonfinite_steps,
            max_batch_rows=settings.max_batch_rows,
            max_batch_bytes=settings.max_batch_bytes,
            max_model_parameters=settings.max_model_parameters,
            max_model_layers=settings.max_model_layers,
            max_activation_bytes=settings.max_activation_bytes,
        )
        if settings.checkpoint_dir is not None:
            try:
                check_directory(settings.checkpoint_dir)
            except OSError as exc:
                raise StartupRefused(
                    f"checkpoint_dir: cannot write to {settings.checkpoint_dir}: {exc}"
                ) from None
        self.checkpointer = Checkpointer(
            settings.checkpoint_dir,
            self.metrics,
            every_steps=settings.checkpoint_every_steps,
            every_seconds=settings.checkpoint_every_seconds,
            keep=settings.checkpoint_keep,
        )
        self.servicer = TrainerServicer(self.registry, self.metrics, self.checkpointer)
        self._timer: asyncio.Task[None] | None = None
        self.streams = StreamLimitInterceptor(settings.max_streams, self.metrics.active_streams)
        self.health = health_aio.HealthServicer()
        self.port = self.health_port = self.metrics_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._metrics_http: Any = None
        self._stopping = asyncio.Event()

    def _options(self) -> list[tuple[str, Any]]:
        limit = self.settings.max_message_bytes
        return [
            # Over-limit messages are refused by gRPC itself with RESOURCE_EXHAUSTED.
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            # Two servers silently sharing a port would split one model's streams.
            ("grpc.so_reuseport", 0),
            # Keepalive: ping a silent client after keepalive_time and drop it when the
            # ping goes unanswered, so a vanished producer frees its stream slot.
            ("grpc.keepalive_time_ms", int(self.settings.keepalive_time * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.settings.keepalive_timeout * 1000)),
            # Training streams are often quiet between batches: allow pings then too.
            ("grpc.keepalive_permit_without_calls", 1),
            # A client pinging faster than this is flooding: after two strikes, GOAWAY.
            (
                "grpc.http2.min_ping_interval_without_data_ms",
                int(self.settings.keepalive_min_ping_interval * 1000),
            ),
            ("grpc.http2.max_ping_strikes", 2),
            # Headers (the bearer token among them) are small; 16 KiB bounds what a
            # client can make the server buffer before any handler runs.
            ("grpc.max_metadata_size", 16 * 1024),
        ]

    def _interceptors(self) -> list[grpc.aio.ServerInterceptor]:  # type: ignore[type-arg]
        # Outermost first: credentials before anything reads the request, then
        # unparsable bytes, then the stream limit, then exceptions -> status codes.
        chain: list[grpc.aio.ServerInterceptor] = []  # type: ignore[type-arg]
        if self.tokens is not None:
            chain.append(AuthInterceptor(self.tokens))
        chain += [MalformedRequestInterceptor(), self.streams, ErrorInterceptor()]
        return chain

    async def start(self) -> None:
        """Bind every port and start serving."""
        s = self.settings
        # Every model is resident again before the port opens: no stream sees a half-restored one.
        await self.checkpointer.restore_all(self.registry)
        self._timer = asyncio.create_task(self.checkpointer.run_timer(self.registry))
        interceptors = self._interceptors()
        if self.metrics.enabled:
            # Outermost: it sees the status every other interceptor and handler ends with.
            interceptors.insert(0, MetricsInterceptor(self.metrics.grpc))
            self.metrics.grpc.preinitialize(
                (
                    trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"],
                    health_pb2.DESCRIPTOR.services_by_name["Health"],
                )
            )
        self._grpc = grpc.aio.server(interceptors=interceptors, options=self._options())
        add_to_server(self.servicer, self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc
        )
        address = f"{s.host}:{s.port}"
        if self.credentials is not None:
            self.port = self._grpc.add_secure_port(address, self.credentials)
        else:
            self.port = self._grpc.add_insecure_port(address)
        await self._grpc.start()
        if s.health_port >= 0:
            # Probes get a port of their own so a saturated training port never fails them.
            self._health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            self.health_port = self._health_server.add_insecure_port(f"{s.host}:{s.health_port}")
            await self._health_server.start()
        if s.metrics_port >= 0:
            tls = s.metrics_tls and s.tls_cert is not None and s.tls_key is not None
            self._metrics_http, _ = start_http_server(
                s.metrics_port,
                addr=s.metrics_host,
                registry=self.metrics.registry,
                certfile=str(s.tls_cert) if tls else None,
                keyfile=str(s.tls_key) if tls else None,
            )
            self.metrics_port = self._metrics_http.server_port
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "gradstream serving on %s:%d (health %d, metrics %d, device %s, %s, %s)",
            s.host,
            self.port,
            self.health_port,
            self.metrics_port,
            self.device,
            "plaintext" if self.credentials is None else "mTLS" if s.tls_ca else "TLS",
            "auth off" if self.tokens is None else f"{len(self.tokens.grants)} tokens",
        )
        if s.ready_file is not None:
            ready = {
                "port": self.port,
                "health_port": self.health_port,
                "metrics_port": self.metrics_port,
                "pid": os.getpid(),
            }
            tmp = s.ready_file.with_name(s.ready_file.name + ".tmp")
            tmp.write_text(json.dumps(ready))
            tmp.replace(s.ready_file)

    def request_stop(self) -> None:
        """Ask ``serve`` to drain and stop (signal-safe)."""
        self._stopping.set()

    async def serve(self) -> None:
        """Start, wait for ``request_stop``, then stop."""
        await self.start()
        await self._stopping.wait()
        await self.stop()

    async def stop(self) -> None:
        """Drain within drain_timeout, then free the models.

        NOT_SERVING at once; new streams are refused with UNAVAILABLE; open streams
        get the results of the steps in flight, then UNAVAILABLE (producers resume
        after the restart); a final checkpoint of every model; then the port closes.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_timeout
        await self.health.enter_graceful_shutdown()
        log.info("draining: %d streams open", self.servicer.open_streams)
        self.servicer.drain()
        if self._timer is not None:
            self._timer.cancel()
        # Streams get at most half the drain time: the final checkpoint needs the rest.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self.servicer.wait_streams_closed(), self.settings.drain_timeout / 2
            )
        if self.checkpointer.enabled:
            try:
                await asyncio.wait_for(
                    self.checkpointer.save_all(self.registry), max(0.0, deadline - loop.time())
                )
                log.info("final checkpoints written")
            except TimeoutError:
                log.error("final checkpoints did not finish within drain_timeout")
        if self._grpc is not None:
            await self._grpc.stop(max(0.0, deadline - loop.time()))
        await self.registry.close()
        if self._health_server is not None:
            await self._health_server.stop(0)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        log.info("gradstream stopped")


def run(settings: Settings, make_server: Callable[[Settings], Server] | None = None) -> None:
    """Run a server in this process until SIGINT or SIGTERM (under torchrun: one rank of it)."""
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if make_server is None:
        from gradstream.server import distributed

        if distributed.requested(settings):
            distributed.run(settings, run)
            return

    async def main() -> None:
        server = (make_server or Server)(settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.request_stop)
        await server.serve()

    asyncio.run(main())


class BackgroundServer:
    """A server on its own event loop in a daemon thread: for notebooks and tests.

    >>> with BackgroundServer(Settings(port=0)) as server:
    ...     Client(f"127.0.0.1:{server.port}")
    """

    def __init__(self, settings: Settings) -> None:
        self.server = Server(settings)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="gradstream-server", daemon=True)

    @property
    def port(self) -> int:
        """The bound gRPC port."""
        return self.server.port

    @property
    def target(self) -> str:
        """host:port to connect to."""
        return f"{self.server.settings.host}:{self.server.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        """Start and wait until the ports are bound."""
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError(f"server did not start within {timeout} s")
        if self._error is not None:
            raise self._error
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Drain and stop; returns when the thread has ended."""
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self.server.request_stop)
            self._thread.join(timeout)

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            try:
                await self.server.start()
            except BaseException as exc:
                self._error = exc
                raise
            finally:
                self._started.set()
            await self.server._stopping.wait()
            await self.server.stop()

        with contextlib.suppress(BaseException):
            asyncio.run(main())

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
