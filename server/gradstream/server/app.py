"""The server's lifecycle: start -> serve until asked to stop -> drain -> stop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from gradstream.server import ingest
from gradstream.server.checkpoint import Checkpointer, check_directory
from gradstream.server.config import Settings
from gradstream.server.export import CHUNK_BYTES, ExportFormat
from gradstream.server.front import FrontProcess
from gradstream.server.interceptors import (
    AuthInterceptor,
    ErrorInterceptor,
    InternalSecretInterceptor,
    MalformedRequestInterceptor,
    MetricsInterceptor,
    StreamLimitInterceptor,
)
from gradstream.server.listening import StartupRefused, server_options
from gradstream.server.metrics import Metrics
from gradstream.server.publishing import ExportDirectory, Publisher
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
    steps: with torch's default the two fight for the cores (docs/performance.md).
    """
    return settings.threads or max(1, TORCH_DEFAULT_THREADS - 1)


SERVICE_NAME = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name


def make_publisher(settings: Settings) -> Publisher | None:
    """Continuous export as the settings ask (docs/serving.md), or None when export_dir is unset."""
    if settings.export_dir is None:
        return None
    if not settings.export_every_steps and not settings.export_every_seconds:
        raise StartupRefused(
            "export_dir: set export_every_steps or export_every_seconds to say how often to export"
        )
    directory = ExportDirectory(
        settings.export_dir,
        ExportFormat(settings.export_format),
        settings.export_keep,
        settings.export_max_batch_size,
    )
    return Publisher(directory, settings.export_every_steps, settings.export_every_seconds)


class Server:
    """One gradstream server: the gRPC port, the plaintext health port and the metrics port.

    It receives its parts, built by ``main.build``: the registry (whose factory decides how
    models train, in one process or on every rank), the metrics, and the listening policy.
    Lifecycle: ``start`` -> ``main_loop`` (until ``request_stop``) -> ``stop``.
    """

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        metrics: Metrics,
        *,
        tokens: TokenStore | None,
        credentials: grpc.ServerCredentials | None,
    ) -> None:
        self.settings = settings
        self.tokens = tokens
        self.credentials = credentials
        self.device = registry.factory.device
        self.metrics = metrics
        self.registry = registry
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
        self.publisher = make_publisher(settings)
        self.servicer = TrainerServicer(
            self.registry,
            self.metrics,
            self.checkpointer,
            publisher=self.publisher,
            eval_auc_max_scores=settings.eval_auc_max_scores,
            predict_threads=settings.predict_threads,
            predict_inline_work=settings.predict_inline_work,
            export_max_batch_size=settings.export_max_batch_size,
            max_program_bytes=settings.max_program_bytes,
            # A chunk and its envelope fit in one message whatever max_message_bytes is.
            export_chunk_bytes=max(1, min(CHUNK_BYTES, settings.max_message_bytes // 2)),
        )
        self._timer: asyncio.Task[None] | None = None
        self.streams = StreamLimitInterceptor(settings.max_streams, self.metrics.active_streams)
        self.health = health_aio.HealthServicer()
        self.port = self.health_port = self.metrics_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._metrics_http: Any = None
        self._stopping = asyncio.Event()
        # ingest=process: the public port is the front's; this server listens on a private
        # socket in a directory of its own (0700), and the front proves itself with a secret.
        self.front: FrontProcess | None = None
        self.failure: str | None = None
        self._private: Path | None = None
        self._secret = ""

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
        secret = self._secret = secrets.token_hex(32)
        if s.ingest == "process":
            # First: a call without the front's secret reaches nothing else.
            interceptors.insert(0, InternalSecretInterceptor(secret))
        self._grpc = grpc.aio.server(
            interceptors=interceptors,
            options=server_options(s, behind_front=s.ingest == "process"),
        )
        add_to_server(self.servicer, self._grpc)
        if s.ingest == "process":  # the front's Train (ingest.py), beside the public service
            ingest.add_to_server(ingest.IngestServicer(self.servicer), self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc
        )
        if s.ingest == "process":
            # Mode 0700; named by this process, whose socket it holds.
            self._private = Path(tempfile.mkdtemp(prefix=f"gradstream-{os.getpid()}-"))
            socket = self._private / "backend.sock"
            self._grpc.add_insecure_port(f"unix:{socket}")
            await self._grpc.start()
        else:
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
        if self._private is not None:  # last: nothing can fail after it but the front itself
            socket = self._private / "backend.sock"
            try:
                self.front = await asyncio.to_thread(FrontProcess.spawn, s, socket, secret)
            except BaseException:
                shutil.rmtree(self._private, ignore_errors=True)
                raise
            self.port = self.front.port
            loop = asyncio.get_running_loop()
            self.front.watch(lambda code: loop.call_soon_threadsafe(self._front_exited, code))
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "gradstream serving on %s:%d (health %s, metrics %s, device %s, %s, %s)",
            s.host,
            self.port,
            self.health_port if s.health_port >= 0 else "off",
            self.metrics_port if s.metrics_port >= 0 else "off",
            self.device,
            "plaintext" if self.credentials is None else "mTLS" if s.tls_ca else "TLS",
            "auth off" if self.tokens is None else f"{len(self.tokens.grants)} tokens",
        )
        if self.front is not None:
            log.info("ingest=process: front pid %d forwards to %s", self.front.pid, self._private)
        if s.ready_file is not None:
            ready = {
                "port": self.port,
                "health_port": self.health_port,
                "metrics_port": self.metrics_port,
                "pid": os.getpid(),
            }
            if self.front is not None:
                ready["front_pid"] = self.front.pid
            tmp = s.ready_file.with_name(s.ready_file.name + ".tmp")
            tmp.write_text(json.dumps(ready))
            tmp.replace(s.ready_file)

    def _front_exited(self, code: int) -> None:
        if self._stopping.is_set():
            return  # it was asked to
        self.failure = f"the front process exited with code {code}"
        log.error("%s: stopping", self.failure)
        self.request_stop()

    def request_stop(self) -> None:
        """Ask ``serve`` to drain and stop (signal-safe)."""
        self._stopping.set()

    async def main_loop(self) -> None:
        """Serve until ``request_stop``."""
        await self._stopping.wait()

    async def serve(self) -> None:
        """Start, serve until ``request_stop``, then stop."""
        await self.start()
        await self.main_loop()
        await self.stop()

    async def stop(self) -> None:
        """Drain within drain_timeout, then free the models.

        NOT_SERVING at once; new streams are refused with UNAVAILABLE; open streams
        get the results of the steps in flight, then UNAVAILABLE (producers resume
        after the restart); a final checkpoint of every model; then the port closes.
        """
        self._stopping.set()  # a front exiting from here on was asked to
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_timeout
        await self.health.enter_graceful_shutdown()
        if self.front is not None:
            self.front.drain()  # no new calls; those in flight end as this server ends them
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
        if self.front is not None:  # every call it forwarded has ended: it exits now
            await asyncio.to_thread(self.front.reap, max(1.0, deadline - loop.time()))
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
        await asyncio.to_thread(self.servicer.close)
        await self.registry.close()
        if self.publisher is not None:  # the versions already offered are still written
            await asyncio.to_thread(self.publisher.close, max(1.0, deadline - loop.time()))
        if self._health_server is not None:
            await self._health_server.stop(0)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        log.info("gradstream stopped")
