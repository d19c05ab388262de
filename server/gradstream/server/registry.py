"""The models resident on this server, by name, each with its worker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator

import torch

from gradstream.server.engine import ModelInfo, Trainer, TrainerFactory
from gradstream.server.errors import AlreadyExists, DataLoss, NotFound, ResourceExhausted
from gradstream.server.metrics import Metrics
from gradstream.server.models import architectures
from gradstream.server.spec import ModelSpec, check_depth, check_model_name
from gradstream.server.worker import ModelWorker

log = logging.getLogger("gradstream.server")


def parameter_count(spec: ModelSpec) -> int:
    """Parameter elements the spec's network would have, counted on the meta device.

    Nothing is allocated, so a spec asking for a 10**12-element layer is refused
    before it can exhaust memory. Unknown kinds count 0; building them fails later.
    """
    builder = architectures().get(spec.architecture.kind)
    if builder is None:
        return 0
    try:
        if spec.architecture.kind == "exported":  # the archive's tensors load on the CPU only
            module = builder(spec.architecture)
        else:
            with torch.device("meta"):
                module = builder(spec.architecture)
        return sum(p.numel() for p in module.parameters())
    except (RuntimeError, OverflowError):  # sizes past int64: certainly too many
        return sys.maxsize


class ModelRegistry:
    """Creates, finds and frees models; enforces ``max_models``."""

    def __init__(
        self,
        factory: TrainerFactory,
        metrics: Metrics,
        max_models: int = 64,
        queue_depth: int = 4,
        *,
        max_model_parameters: int = 0,
        max_model_layers: int = 0,
    ) -> None:
        self.factory = factory  # every trainer, created or restored, is built by it
        self.metrics = metrics
        self.max_models = max_models
        self.queue_depth = queue_depth
        self.max_model_parameters = max_model_parameters
        self.max_model_layers = max_model_layers
        self._workers: dict[str, ModelWorker] = {}
        self._creating: set[str] = set()
        # Names whose deletion (worker, then checkpoint directory) is under way.
        self._deleting: dict[str, asyncio.Event] = {}
        self._lost: dict[str, str] = {}  # models whose checkpoints did not restore -> why

    def get(self, name: str) -> ModelWorker:
        """The worker of a model, or NOT_FOUND."""
        worker = self._workers.get(name)
        if worker is None and name in self._lost:
            raise DataLoss(self._lost[name])
        if worker is None:
            raise NotFound(f"no model named {name!r}")
        return worker

    def names(self) -> list[str]:
        """Model names, sorted."""
        return sorted(self._workers)

    async def create(self, name: str, spec: ModelSpec) -> ModelInfo:
        """Build the model off the event loop and start its worker."""
        check_model_name(name)
        check_depth(spec, self.max_model_layers)
        # A name being deleted is free once its files are gone, not before: a model
        # created earlier would write its checkpoints into the directory being removed.
        while (deleting := self._deleting.get(name)) is not None:
            await deleting.wait()
        if name in self._workers or name in self._creating:
            raise AlreadyExists(f"a model named {name!r} exists already")
        if name in self._lost:
            raise AlreadyExists(
                f"a model named {name!r} exists with no valid checkpoint; delete it first"
            )
        if len(self._workers) + len(self._creating) >= self.max_models:
            raise ResourceExhausted(
                f"max_models: the server holds {self.max_models} models already"
            )
        self._creating.add(name)
        try:
            if self.max_model_parameters:
                # Off the event loop: a plug-in's meta build is proportional to its size.
                count = await asyncio.to_thread(parameter_count, spec)
                if count > self.max_model_parameters:
                    raise ResourceExhausted(
                        f"max_model_parameters: spec.architecture has {count} parameter "
                        f"elements, the limit is {self.max_model_parameters}"
                    )
            trainer = await asyncio.to_thread(self.factory.build, name, spec)
            info = await asyncio.to_thread(trainer.info)
        finally:
            self._creating.discard(name)
        self._workers[name] = ModelWorker(trainer, self.queue_depth)
        self.metrics.model_created(name, trainer.lr)
        self.metrics.models.set(len(self._workers))
        log.info(
            "model created name=%s architecture=%s device=%s models=%d",
            name,
            spec.architecture.kind,
            info.device,
            len(self._workers),
        )
        return info

    def adopt(self, trainer: Trainer) -> None:
        """Make a trainer built elsewhere (restored from a checkpoint) resident."""
        self._workers[trainer.name] = ModelWorker(trainer, self.queue_depth)
        self.metrics.model_created(trainer.name, trainer.lr)
        self.metrics.models.set(len(self._workers))

    def mark_lost(self, name: str, reason: str) -> None:
        """A model whose checkpoints did not restore: it answers DATA_LOSS until deleted."""
        self._lost[name] = reason

    @contextlib.asynccontextmanager
    async def deleting(self, name: str) -> AsyncIterator[None]:
        """Hold ``name`` while a deletion runs: a CreateModel of it waits until the end."""
        while (other := self._deleting.get(name)) is not None:
            await other.wait()
        done = self._deleting[name] = asyncio.Event()
        try:
            yield
        finally:
            del self._deleting[name]
            done.set()

    async def delete(self, name: str) -> None:
        """Stop the model's worker after the jobs queued before, then drop it."""
        if self._lost.pop(name, None) is not None and name not in self._workers:
            return
        worker = self.get(name)
        del self._workers[name]
        # A prediction waiting for a copy fails now, not after the worker's queued jobs.
        worker.trainer.snapshots.close(NotFound(f"model {name!r} was deleted"))
        await asyncio.to_thread(worker.close)
        await asyncio.to_thread(worker.trainer.close)
        self.metrics.model_deleted(name)
        self.metrics.models.set(len(self._workers))
        log.info(
            "model deleted name=%s step=%d models=%d", name, worker.trainer.step, len(self._workers)
        )

    async def close(self) -> None:
        """Stop every worker."""
        for name in list(self._workers):
            await self.delete(name)
