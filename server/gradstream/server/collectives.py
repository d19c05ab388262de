"""The process group of a data-parallel job, as gradstream uses it: framed commands, fail fast.

``gradstream serve`` started by ``torchrun`` (``WORLD_SIZE`` > 1, or ``--distributed on``)
joins a ``torch.distributed`` process group (NCCL on CUDA, Gloo on the CPU). Rank 0 runs the
normal server and sends commands; every other rank runs ``follower.Follower``, which replays
them on its own copies of the models.

The protocol, one command at a time under ``Collectives.lock`` (rank 0 has one
worker thread per model; the lock keeps every rank's collectives in one order):

    header     broadcast, float64[5] = (op, model id, rows, has weights, denominator)
    CREATE     + object (name, spec without init tensors) + state push
    SYNC       + state push (``Trainer.state_dict``)
    TRAIN      + rows point-to-point from rank 0 to each rank, then one all-reduce
    DELETE     the model's id is dropped
    NOOP       a heartbeat while idle, so a follower's wait is bounded by the timeout
    STOP       followers return; the job ends

Any failure inside a command (a peer died, a collective timed out) ends the
process at once with ``EXIT_RESTART``: the ranks may now disagree, and the only
consistent state is the last checkpoint, which every rank restores after the
restart (rank 0 reads it and pushes it to the others).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from enum import IntEnum
from typing import Any

import torch
import torch.distributed as dist

from gradstream.server.config import Settings
from gradstream.server.devices import resolve_device

log = logging.getLogger("gradstream.server.distributed")

# EX_TEMPFAIL: "try again later". A rank exits with it when the group broke; the
# launcher (torchrun --max-restarts, Kubernetes) restarts the job from its checkpoint.
EXIT_RESTART = 75
_HEADER = 5


class Op(IntEnum):
    """A command from rank 0 to the other ranks."""

    NOOP = 0
    CREATE = 1
    SYNC = 2
    TRAIN = 3
    DELETE = 4
    STOP = 5


@dataclass(frozen=True, slots=True)
class Header:
    """The fixed part of every command; the rest follows by collectives the op implies."""

    op: Op
    model: int = 0
    rows: int = 0
    weighted: bool = False
    denominator: float = 0.0


@dataclass(frozen=True, slots=True)
class Topology:
    """Where this process sits in the job, from torchrun's environment."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_env(cls) -> Topology:
        """RANK, WORLD_SIZE and LOCAL_RANK as torchrun sets them (a world of one without)."""
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )


# -- the process group ---------------------------------------------------------------------


class Collectives:
    """The process group as gradstream uses it: one command at a time; a failure is fatal.

    Control traffic (headers, small objects) goes over Gloo on the CPU, so reading a
    header never waits on a GPU stream; tensors go over the default group (NCCL on CUDA).
    """

    def __init__(self, topology: Topology, device: torch.device, timeout: float) -> None:
        self.topology = topology
        self.rank, self.world_size = topology.rank, topology.world_size
        self.device = device
        self.timeout = timeout
        backend = "nccl" if device.type == "cuda" else "gloo"
        delta = timedelta(seconds=timeout)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's point-to-point calls need it set
        if "MASTER_ADDR" in os.environ:
            # Our own keys per restart of torchrun's workers: the launcher's store outlives
            # them, and a restarted group must not find the last attempt's addresses.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.PrefixStore(  # type: ignore[attr-defined]
                f"gradstream/attempt-{attempt}",
                dist.TCPStore(  # type: ignore[attr-defined]
                    os.environ["MASTER_ADDR"],
                    int(os.environ["MASTER_PORT"]),
                    topology.world_size,
                    is_master=False,
                    timeout=delta,
                ),
            )
            dist.init_process_group(
                backend,
                store=store,
                rank=topology.rank,
                world_size=topology.world_size,
                timeout=delta,
                device_id=device if device.type == "cuda" else None,
            )
        else:  # --distributed on without a launcher: a world of one
            dist.init_process_group(
                backend,
                store=dist.HashStore(),  # type: ignore[attr-defined]
                rank=0,
                world_size=1,
                timeout=delta,
            )
        self.control: Any = (
            dist.new_group(backend="gloo", timeout=delta) if backend == "nccl" else None
        )
        self.lock = threading.Lock()
        self.last_command = time.monotonic()
        self._next_id = 1
        self._stopped = threading.Event()
        log.info(
            "rank %d of %d joined (%s, %s, collective timeout %.0f s)",
            self.rank,
            self.world_size,
            backend,
            device,
            timeout,
        )

    # -- framing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def command(self) -> Iterator[None]:
        """One command's collectives, in order on every rank; any failure ends the process."""
        with self.lock:
            try:
                yield
            except BaseException as exc:
                fatal(exc)
            finally:
                self.last_command = time.monotonic()

    def new_model_id(self) -> int:
        """A fresh id for a model; ids are never reused within a job."""
        with self.lock:
            self._next_id += 1
            return self._next_id - 1

    def send_header(self, header: Header) -> None:
        """Rank 0: broadcast the next command's header."""
        values = (
            float(header.op),
            float(header.model),
            float(header.rows),
            float(header.weighted),
            header.denominator,
        )
        dist.broadcast(torch.tensor(values, dtype=torch.float64), 0, group=self.control)

    def receive_header(self) -> Header:
        """Other ranks: wait (at most the collective timeout) for the next command."""
        buffer = torch.zeros(_HEADER, dtype=torch.float64)
        dist.broadcast(buffer, 0, group=self.control)
        op, model, rows, weighted, divisor = buffer.tolist()
        return Header(Op(int(op)), int(model), int(rows), bool(weighted), divisor)

    def broadcast_object(self, value: Any = None) -> Any:
        """Rank 0 sends a small picklable value, the others receive it (trusted peers only)."""
        box = [value]
        dist.broadcast_object_list(box, 0, group=self.control)
        return box[0]

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Rank 0's tensor into every rank's tensor of the same shape, in place."""
        dist.broadcast(tensor, 0)

    def send_rows(self, tensors: list[torch.Tensor], sizes: list[int]) -> list[Any]:
        """Rank 0: start sending each rank its rows of each tensor; returns works to wait on."""
        ops: list[dist.P2POp] = []
        start = sizes[0]
        for rank in range(1, self.world_size):
            stop = start + sizes[rank]
            if stop > start:
                ops.extend(
                    dist.P2POp(dist.isend, t[start:stop].contiguous(), rank) for t in tensors
                )
            start = stop
        return dist.batch_isend_irecv(ops) if ops else []

    def receive_rows(self, tensors: list[torch.Tensor]) -> None:
        """Other ranks: receive this rank's rows from rank 0 into ``tensors``."""
        ops = [dist.P2POp(dist.irecv, t, 0) for t in tensors]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over the ranks, in place; every rank gets the same bits."""
        dist.all_reduce(tensor)

    # -- rank 0's heartbeat ----------------------------------------------------------------

    def start_heartbeat(self) -> None:
        """Rank 0: send NOOP when idle so followers' waits stay within the timeout."""
        interval = max(0.05, self.timeout / 4)

        def beat() -> None:
            while not self._stopped.wait(interval / 2):
                if time.monotonic() - self.last_command < interval:
                    continue
                with self.command():
                    if self._stopped.is_set():
                        return
                    self.send_header(Header(Op.NOOP))

        threading.Thread(target=beat, name="gradstream-heartbeat", daemon=True).start()

    def stop_followers(self) -> None:
        """Rank 0: tell every other rank to return; no command may follow."""
        with self.command():
            self._stopped.set()
            self.send_header(Header(Op.STOP))

    def close(self) -> None:
        """Leave the process group."""
        self._stopped.set()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def fatal(exc: BaseException) -> None:
    """The group is broken: log why and exit at once, so the launcher restarts the job."""
    log.critical(
        "the process group failed (%s: %s); exiting with %d so the job restarts from its "
        "last checkpoint",
        type(exc).__name__,
        exc,
        EXIT_RESTART,
    )
    logging.shutdown()
    os._exit(EXIT_RESTART)


def requested(settings: Settings) -> bool:
    """Whether to run data-parallel: ``--distributed on``, or ``auto`` under a launcher."""
    if settings.distributed == "auto":
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    return settings.distributed == "on"


def rank_device(settings: Settings, topology: Topology) -> torch.device:
    """The settings' device, with CUDA pinned to this process's LOCAL_RANK."""
    device = resolve_device(settings.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", topology.local_rank)
    return device
