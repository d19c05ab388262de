"""One thread per model: every touch of a model's tensors happens on its worker.

Request handlers run on the asyncio event loop and only decode, validate and
enqueue; the worker runs the torch work in order, so steps on one model are
serialized without locks and the event loop never blocks on torch. A semaphore
bounds the jobs in flight per model: that is the back-pressure a fast producer
feels (its stream stops being read; HTTP/2 flow control does the rest).
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from gradstream.server.engine import Trainer
from gradstream.server.errors import NotFound

T = TypeVar("T")
# Never reused in a process: a model deleted and created again under its name is another model.
_IDENTITIES = itertools.count(1)
_Job = tuple[Callable[[Trainer], Any], asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


class ModelWorker:
    """Runs jobs against one ``Trainer`` on a dedicated thread, in submission order."""

    def __init__(self, trainer: Trainer, queue_depth: int = 8) -> None:
        self.trainer = trainer
        self.identity = next(_IDENTITIES)
        self.queue_depth = queue_depth
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._slots = asyncio.Semaphore(queue_depth)
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name=f"gradstream-worker-{trainer.name}", daemon=True
        )
        self._thread.start()

    async def submit(self, job: Callable[[Trainer], T]) -> asyncio.Future[T]:
        """Queue a job, waiting while the queue is full; the future resolves when it ran."""
        await self._slots.acquire()
        if self._closed:  # a job queued after close() would never run: fail it now
            self._slots.release()
            raise NotFound(f"model {self.trainer.name!r} was deleted")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        future.add_done_callback(lambda _: self._slots.release())
        self._jobs.put((job, loop, future))
        return future

    async def run(self, job: Callable[[Trainer], T]) -> T:
        """Queue a job and wait for its result (or exception)."""
        return await (await self.submit(job))

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued jobs, then stop the thread."""
        self._closed = True
        self._jobs.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        # In torch 2.13 the intra-op count is one value for the process
        # (tests/unit/server/test_intra_op_threads.py); set it again on the thread that
        # steps anyway, so that a build whose count is per thread still honours --threads.
        torch.set_num_threads(torch.get_num_threads())
        while (item := self._jobs.get()) is not None:
            job, loop, future = item
            if future.cancelled():
                continue
            try:
                # busy: a prediction copies the parameters itself only while no job runs.
                with self.trainer.snapshots.busy:
                    try:
                        result = job(self.trainer)
                    finally:
                        self.trainer.snapshots.settle()
            except BaseException as exc:  # delivered to the awaiting handler
                loop.call_soon_threadsafe(_settle, future, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)
        # Jobs that slipped in behind close(): fail them rather than leave them waiting.
        while True:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                _, loop, future = item
                gone = NotFound(f"model {self.trainer.name!r} was deleted")
                loop.call_soon_threadsafe(_settle, future, None, gone)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
