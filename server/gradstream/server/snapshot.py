"""Published copies of a model's parameters and buffers, for Predict off the model's worker.

A copy is made only at a point where the worker is between two steps: at a step boundary
inside ``Trainer.apply``, at the end of a worker job, or by the predicting thread itself
while the worker runs no job (it then holds ``busy``, which the worker takes around each
job). So a copy never mixes two steps, and a published ``Snapshot`` is never written
again.

A prediction needs a copy at least as new as the model was at the end of the last worker
job (``settled``): everything answered before it arrived, not the steps of the message
under way. While predictions keep coming (``hot``), the worker publishes at the end of
each job that changed the model, so a prediction finds its copy ready and waits for no
thread: each cross-thread wake-up costs a scheduler slice on a busy machine. Otherwise a
prediction that finds the newest copy too old asks for one (``wanted``) and waits for the
next step boundary. Training without predictions copies nothing; with them, one copy per
job, plus at most one per step for waiting predictions (docs/decisions.md).
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

# How long a waiting prediction sleeps before it looks again whether the worker is idle:
# covers a job that ended between the prediction's request and its wait.
_POLL_SECONDS = 0.001
# How long after a prediction the worker keeps publishing at the end of its jobs.
HOT_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An immutable copy of the parameters and buffers as they were after step ``version``."""

    version: int
    revision: int  # the trainer's revision it was copied at
    tensors: dict[str, torch.Tensor]


class Snapshots:
    """One model's newest ``Snapshot`` and the predictions that run on it."""

    def __init__(self, module: nn.Module, device: torch.device, step: Callable[[], int]) -> None:
        self._live = dict(module.named_parameters()) | dict(module.named_buffers())
        # A module with buffers (running statistics, say) may change them on any forward.
        self.buffers_change = any(True for _ in module.buffers())
        self._device = device
        self._step = step
        # Multiply-adds per row, about: what a prediction of n rows costs, n times this.
        self.work_per_row = sum(t.numel() for t in self._live.values())
        # On the CPU a prediction waits for no device: any thread may run it cheaply.
        self.on_cpu = device.type == "cpu"
        # Bumped on the worker whenever the parameters or buffers may have changed.
        self.revision = 0
        # The revision at the end of the worker's last job: what a prediction must see.
        self.settled = 0
        self.wanted = False
        self._predicted_at = -HOT_SECONDS
        self.busy = threading.Lock()  # held by the worker while it runs a job
        self._latest: Snapshot | None = None
        self._published = threading.Condition()
        self._closed: Exception | None = None  # what a waiting prediction raises
        # The module's structure without storage: predictions call it with a snapshot's
        # tensors. functional_call swaps attributes, so each predicting thread has its own.
        # Built without copying the live tensors: each is replaced by an empty meta one.
        memo: dict[int, object] = {
            id(t): torch.empty_like(t, device="meta") for t in module.buffers()
        }
        for p in module.parameters():
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
        self._skeleton = copy.deepcopy(module, memo)
        self._local = threading.local()
        self._stream = (
            torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
            if device.type == "cuda"
            else None
        )

    def changed(self) -> None:
        """The parameters or buffers changed (on the worker)."""
        self.revision += 1

    def publish_if_wanted(self) -> None:
        """At a point between steps on the worker: copy if a prediction waits for one."""
        if self.wanted:
            self.publish()

    def settle(self) -> None:
        """At the end of a worker job: predictions from now on see at least this revision.

        While predictions keep coming, copy now, so that they find it ready."""
        self.settled = self.revision
        latest = self._latest
        stale = latest is None or latest.revision < self.revision
        if stale and (self.wanted or time.monotonic() - self._predicted_at < HOT_SECONDS):
            self.publish()

    def publish(self) -> None:
        """Copy the parameters and buffers now; the caller guarantees no step is under way."""
        revision, version = self.revision, self._step()
        if self._stream is None:
            copies = {n: t.detach().clone() for n, t in self._live.items()}
        else:
            # The copy runs on its own stream, after the training stream's work so far;
            # training overwrites the parameters only once the copy has read them. Both
            # are waits on the device: nothing here waits on the host.
            training = torch.cuda.current_stream(self._device)
            self._stream.wait_stream(training)
            with torch.cuda.stream(self._stream):
                copies = {n: t.detach().clone() for n, t in self._live.items()}
                done = torch.cuda.Event()  # type: ignore[no-untyped-call]
                done.record(self._stream)
            training.wait_event(done)
        snapshot = Snapshot(version, revision, copies)
        with self._published:
            self._latest = snapshot
            self.wanted = False
            self._published.notify_all()

    def close(self, error: Exception) -> None:
        """The model is gone: predictions waiting for a copy, and later ones, raise ``error``
        instead of waiting for the worker's last jobs."""
        with self._published:
            self._closed = error
            self._published.notify_all()

    def ready(self) -> Snapshot | None:
        """The snapshot a prediction arriving now may use, if it is there without waiting."""
        self._predicted_at = time.monotonic()
        latest = self._latest
        if latest is not None and latest.revision >= self.settled:
            return latest
        return None

    def newest(self, settled: bool = False) -> Snapshot:
        """A snapshot at least as new as the model when called (on a predicting thread);
        with ``settled``, at least as new as at the end of the worker's last job."""
        target = self.settled if settled else self.revision
        latest = self._latest
        if latest is not None and latest.revision >= target:
            return latest
        self.wanted = True
        while True:
            if self._closed is not None:
                raise copy.copy(self._closed)  # a fresh traceback for each waiting thread
            if self.busy.acquire(blocking=False):
                try:  # the worker runs no job: copy here
                    latest = self._latest
                    if latest is None or latest.revision < self.revision:
                        self.publish()
                finally:
                    self.busy.release()
            with self._published:
                if self._published.wait_for(
                    lambda: (
                        self._closed is not None
                        or (self._latest is not None and self._latest.revision >= target)
                    ),
                    _POLL_SECONDS,
                ):
                    if self._closed is not None:
                        raise copy.copy(self._closed)
                    assert self._latest is not None
                    return self._latest

    def predict(
        self, *inputs: torch.Tensor, snapshot: Snapshot | None = None
    ) -> tuple[torch.Tensor, int]:
        """The output on ``snapshot`` (default: the newest) on the CPU, and its step.

        ``inputs`` are the model's inputs in declaration order.
        """
        if snapshot is None:
            snapshot = self.newest()
        module: nn.Module | None = getattr(self._local, "module", None)
        if module is None:
            module = self._local.module = copy.deepcopy(self._skeleton)
        with torch.inference_mode():
            if self._stream is None:
                y = functional_call(module, snapshot.tensors, inputs)
            else:
                with torch.cuda.stream(self._stream):  # after the snapshot's copy
                    moved = tuple(t.to(self._device) for t in inputs)
                    y = functional_call(module, snapshot.tensors, moved).cpu()
        return y.detach(), snapshot.version
