"""The server's entry: choose single-process or ``torchrun`` mode, build the parts, serve.

``gradstream serve`` calls ``run``. In a single process it builds one ``Server``; under
``torchrun`` (see ``collectives``) rank 0 builds the same ``Server`` around a registry whose
trainers split every batch over the ranks (``sharded``), and every other rank runs the
``follower.Follower`` loop. Nothing here is imported back by the parts it builds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading

import torch

from gradstream.server.app import Server, intra_op_threads
from gradstream.server.collectives import Collectives, Topology, rank_device, requested
from gradstream.server.config import Settings
from gradstream.server.devices import resolve_device
from gradstream.server.engine import TrainerFactory
from gradstream.server.follower import Follower
from gradstream.server.front import FrontDied
from gradstream.server.listening import StartupRefused, load_tokens, server_credentials
from gradstream.server.metrics import Metrics, RankMetrics
from gradstream.server.registry import ModelRegistry
from gradstream.server.sharded import leader_gradients, rank_factory

log = logging.getLogger("gradstream.server")


def build(
    settings: Settings, group: Collectives | None = None, device: torch.device | None = None
) -> Server:
    """A server and its parts; with ``group``, rank 0 of a data-parallel job."""
    tokens = load_tokens(settings)
    credentials = server_credentials(settings)
    if device is None:
        device = resolve_device(settings.device)
    torch.set_num_threads(intra_op_threads(settings))
    # The first optimizer imports torch._dynamo, seconds of work: do it before serving,
    # not inside the first CreateModel.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])
    # No metrics port: nothing is recorded, so "metrics off" costs nothing.
    metrics = Metrics(
        enabled=settings.metrics_port >= 0,
        every=settings.metrics_every,
        max_elements=settings.metrics_max_elements,
        device=device,
        loss_window=settings.loss_window,
    )
    if group is None:
        factory = TrainerFactory(
            device,
            max_nonfinite_steps=settings.max_nonfinite_steps,
            max_batch_rows=settings.max_batch_rows,
            max_batch_bytes=settings.max_batch_bytes,
            max_activation_bytes=settings.max_activation_bytes,
        )
    else:
        # Beside the server's metrics, on its port.
        rank_metrics = RankMetrics(metrics.registry, group.rank, group.world_size)
        factory = rank_factory(settings, device, leader_gradients(group, rank_metrics))
    registry = ModelRegistry(
        factory,
        metrics,
        max_models=settings.max_models,
        queue_depth=settings.queue_depth,
        max_model_parameters=settings.max_model_parameters,
        max_model_layers=settings.max_model_layers,
    )
    return Server(settings, registry, metrics, tokens=tokens, credentials=credentials)


def run(settings: Settings) -> None:
    """Run a server in this process until SIGINT or SIGTERM (under torchrun: one rank of it)."""
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if requested(settings):
        if settings.ingest == "process":
            raise StartupRefused(
                "ingest: 'process' cannot run data-parallel (distributed is "
                f"{settings.distributed!r}, WORLD_SIZE {os.environ.get('WORLD_SIZE', '1')}): "
                "set --ingest inline (GRADSTREAM_INGEST=inline) under torchrun"
            )
        # Every rank checks what would stop rank 0 from serving before any joins the group,
        # so a refusal is each rank's own one line, not a peer's broken-connection error.
        load_tokens(settings)
        server_credentials(settings)
        _run_rank(settings)
    else:
        server = build(settings)
        asyncio.run(_serve(server))
        if server.failure is not None:  # the orchestrator restarts the whole server
            raise FrontDied(server.failure)


async def _serve(server: Server, group: Collectives | None = None) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.request_stop)
    await server.start()
    if group is not None:
        group.start_heartbeat()  # keeps the followers' waits bounded while idle
    await server.main_loop()
    await server.stop()
    if group is not None:
        await asyncio.to_thread(group.stop_followers)


def _run_rank(settings: Settings) -> None:
    """Join the process group; rank 0 serves, the others follow."""
    topology = Topology.from_env()
    device = rank_device(settings, topology)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    group = Collectives(topology, device, settings.collective_timeout)
    try:
        if topology.rank == 0:
            rank_settings = settings.model_copy(update={"device": str(device)})
            asyncio.run(_serve(build(rank_settings, group, device), group))
        else:
            # A follower ends when rank 0 says STOP or the group breaks, not on the
            # launcher's SIGTERM: rank 0 may still need it to finish a drain.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            Follower(settings, group).run()
    finally:
        group.close()


class BackgroundServer:
    """A server on its own event loop in a daemon thread: for notebooks and tests.

    >>> with BackgroundServer(Settings(port=0)) as server:
    ...     Client(f"127.0.0.1:{server.port}")
    """

    def __init__(self, settings: Settings) -> None:
        self.server = build(settings)
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
