"""A rank other than 0 of a data-parallel job: it replays rank 0's commands on its own models.

It keeps a trainer per model, built by the same factory as rank 0's (``sharded.rank_factory``),
bit-for-bit equal to rank 0's, and serves only metrics and health.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server

from gradstream.server.batches import Batch
from gradstream.server.collectives import Collectives, Header, Op
from gradstream.server.config import Settings
from gradstream.server.engine import Trainer
from gradstream.server.metrics import RankMetrics
from gradstream.server.models import DTYPES
from gradstream.server.sharded import FollowerGradients, pull_state, rank_factory, shard_sizes

log = logging.getLogger("gradstream.server.distributed")


class Follower:
    """Follows rank 0 until STOP; a failed collective ends the process (``collectives.fatal``)."""

    def __init__(self, settings: Settings, group: Collectives) -> None:
        self.settings = settings
        self.group = group
        self.device = group.device
        self.trainers: dict[int, Trainer] = {}
        self.registry = CollectorRegistry()
        self.metrics = RankMetrics(self.registry, group.rank, group.world_size)
        self.gradients = FollowerGradients(group, self.metrics)
        self.factory = rank_factory(settings, self.device, lambda _: self.gradients)

    def run(self) -> None:
        """Serve metrics and health, then follow until STOP (or fail fast)."""
        stop_endpoints = self._start_endpoints()
        try:
            with self.group.command():
                while self._follow_one():
                    pass
        finally:
            stop_endpoints()
        log.info("rank %d stopped", self.group.rank)

    def _follow_one(self) -> bool:
        header = self.group.receive_header()
        match header.op:
            case Op.NOOP:
                pass
            case Op.CREATE:
                name, spec = self.group.broadcast_object()
                trainer = self.factory.build(name, spec, pull_state(self.group))
                self.trainers[header.model] = trainer
                log.info("rank %d has model %r at step %d", self.group.rank, name, trainer.step)
            case Op.SYNC:
                self.trainers[header.model].load_state_dict(pull_state(self.group))
            case Op.TRAIN:
                self._train(self.trainers[header.model], header)
            case Op.DELETE:
                del self.trainers[header.model]
            case Op.STOP:
                return False
        return True

    def _train(self, trainer: Trainer, header: Header) -> None:
        rows = shard_sizes(header.rows, self.group.world_size)[self.group.rank]
        arch, dtype = trainer.spec.architecture, DTYPES[trainer.spec.dtype]
        x = torch.empty(rows, arch.in_features, dtype=dtype, device=self.device)
        y = (
            torch.empty(rows, dtype=torch.int64, device=self.device)
            if trainer.spec.loss.kind == "cross_entropy"
            else torch.empty(rows, arch.out_features, dtype=dtype, device=self.device)
        )
        weight = torch.empty(rows, dtype=dtype, device=self.device) if header.weighted else None
        if rows:
            self.group.receive_rows([x, y] if weight is None else [x, y, weight])
        self.gradients.divisor = header.denominator
        trainer.apply(Batch(x, y, weight))

    def _start_endpoints(self) -> Callable[[], None]:
        """Metrics and gRPC health on the configured ports plus LOCAL_RANK (0: free ports)."""
        s, offset = self.settings, self.group.topology.local_rank
        closers: list[Callable[[], None]] = []
        ports: dict[str, int] = {"metrics_port": -1, "health_port": -1}
        host = s.host
        if s.metrics_port >= 0:
            http, _ = start_http_server(
                s.metrics_port and s.metrics_port + offset,
                addr=s.metrics_host,
                registry=self.registry,
            )
            ports["metrics_port"] = http.server_port
            closers.append(http.shutdown)
        if s.health_port >= 0:
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
            servicer = health.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
            ports["health_port"] = server.add_insecure_port(
                f"{host}:{s.health_port and s.health_port + offset}"
            )
            server.start()
            servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            closers.append(lambda: _ignore(server.stop(0).wait()))
        if s.ready_file is not None:
            _write_ready(
                rank_ready_file(s.ready_file, self.group.rank),
                {**ports, "pid": os.getpid(), "rank": self.group.rank},
            )

        def close() -> None:
            for closer in closers:
                closer()

        return close


def _ignore(_: object) -> None:
    pass


def rank_ready_file(ready_file: Path, rank: int) -> Path:
    """Where a rank other than 0 writes its ports: beside rank 0's ready file."""
    return ready_file.with_name(f"{ready_file.name}.rank{rank}")


def _write_ready(path: Path, content: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content))
    tmp.replace(path)
