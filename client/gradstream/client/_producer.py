"""Exactly-once training streams: a producer's batches survive reconnects and server restarts.

``Client.train(name, batches, producer_id="...")`` returns a ``ProducerStream``.
Every batch carries a sequence number. The stream is a retry loop around one outbox
(``_outbox.py``): the outbox keeps each batch's encoded bytes until the server reports
it durable (saved in a checkpoint), so when the connection breaks (the server restarts,
a pod is rescheduled) the stream reconnects with backoff, learns from the server which
sequence it last applied, and sends the held messages from there on. The server answers
a batch it applied before with DUPLICATE, never applying it twice.

Threads: the caller's thread reads responses (this iterator); the outbox's feeder pulls
the caller's batches; gRPC's request thread sends. The caller's iterator is only ever
read by the feeder, so a reconnect never has two readers of it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

import grpc

from gradstream.client._errors import BatchRejected, DataLoss, Unavailable, from_rpc_error
from gradstream.client._models import StepResult, step_result
from gradstream.client._outbox import BatchLike, Outbox, Sending
from gradstream.client._shm import SharedRing
from gradstream.v1 import trainer_pb2 as pb
from gradstream.v1 import trainer_pb2_grpc as pb_grpc

# Answers that mean "the server is not there right now": worth a reconnect.
_RETRY = frozenset({grpc.StatusCode.UNAVAILABLE})


class ProducerStream(Iterator[StepResult]):
    """The results of one producer's batches, each exactly once, across reconnects.

    Iterate it for one ``StepResult`` per batch. ``durable_sequence`` is the
    highest sequence the server has saved in a checkpoint; ``applied_sequence``
    the highest whose result arrived; ``reconnects`` how often the stream had to
    reconnect. A result lost in a reconnect for a batch the server had applied
    comes back as DUPLICATE with a reason saying so.
    """

    def __init__(
        self,
        stub: pb_grpc.TrainerServiceStub,
        channel: grpc.Channel,
        name: str,
        batches: Iterable[BatchLike],
        producer_id: str,
        *,
        train_call: Callable[[Iterator[pb.TrainRequest | bytes]], Any],
        report_every: int,
        skip_rejected: bool,
        batches_per_message: int,
        message_bytes: int,
        max_message_bytes: int,
        window: int,
        window_bytes: int,
        shared_memory: bool,
        max_pending_batches: int,
        max_pending_bytes: int,
        reconnect_timeout: float,
        wait_durable: bool,
    ) -> None:
        self.name = name
        self.producer_id = producer_id
        self.reconnects = 0
        self._stub = stub
        self._train_call = train_call  # Train, sending bytes as they are
        self._channel = channel
        self._batches = batches
        self._report_every = report_every
        self._skip_rejected = skip_rejected
        self._packing = {
            "batches_per_message": batches_per_message,
            "message_bytes": message_bytes,
            "max_message_bytes": max_message_bytes,
            "max_batches": max(1, max_pending_batches),
            "max_bytes": max_pending_bytes,
        }
        self._window = window
        self._window_bytes = window_bytes
        self._shared_memory = shared_memory
        self._reconnect_timeout = reconnect_timeout
        self._wait_durable = wait_durable
        self._outbox: Outbox | None = None
        self._persist = 0  # highest sequence the server reported applied: to make durable
        self._durable = 0
        self._yielded = 0  # highest sequence whose result the caller has
        self._checkpoints = True  # False once the server says it keeps none
        self._saving = False
        self._last_save = 0.0
        self._results = self._run()

    # -- what the caller sees -------------------------------------------------------------

    @property
    def durable_sequence(self) -> int:
        """The highest sequence saved in a server checkpoint (0: none yet)."""
        return self._durable

    @property
    def applied_sequence(self) -> int:
        """The highest sequence whose result has been returned."""
        return self._yielded

    def __iter__(self) -> ProducerStream:
        return self

    def __next__(self) -> StepResult:
        return next(self._results)

    def close(self) -> None:
        """Stop streaming; batches not yet sent are not sent."""
        self._results.close()

    # -- the stream ----------------------------------------------------------------------

    def _run(self) -> Generator[StepResult, None, None]:
        ring = SharedRing(self._window_bytes) if self._shared_memory else None
        outbox = self._outbox = Outbox(
            self._batches,
            ring=ring,
            numbered=True,
            release_on_ack=False,
            on_full=self._request_checkpoint,
            **self._packing,
        )
        opener = pb.TrainRequest(
            open=pb.TrainOpen(
                model=self.name,
                producer_id=self.producer_id,
                report_every=self._report_every,
                shared_memory=ring.name if ring else "",
            )
        )
        started = False
        deadline: float | None = None
        backoff = 0.05
        last_error: grpc.RpcError | None = None
        try:
            while True:
                sending = outbox.sending(opener, self._window, self._window_bytes)
                call: Any = self._train_call(sending.requests())
                try:
                    for response in call:
                        if response.HasField("opened"):
                            if not started:
                                # Automatic numbering continues after what this producer sent.
                                outbox.start(after=response.opened.last_applied_sequence)
                                started = True
                            yield from self._opened(sending, response.opened)
                            deadline, backoff = None, 0.05
                        if response.last_durable_sequence:
                            self._set_durable(response.last_durable_sequence)
                        if response.results:
                            sending.acked()
                        for message in response.results:
                            result = step_result(message)
                            if result.sequence <= self._yielded:
                                continue  # a re-sent batch whose result the caller has
                            if result.outcome == "REJECTED" and not self._skip_rejected:
                                raise BatchRejected(result)
                            self._yielded = result.sequence
                            if result.outcome in ("APPLIED", "ACCUMULATED"):
                                self._persist = result.sequence
                            if not self._checkpoints:
                                outbox.release(self._yielded)
                            yield result
                    outbox.raise_error()
                    if self._done():
                        if self._needs_checkpoint():
                            self._save_checkpoint()
                        if not self._needs_checkpoint():
                            return
                        # The checkpoint lacks batches the server had answered: it restarted
                        # in between. A new stream sends them again.
                    last_error = None
                except grpc.RpcError as exc:
                    outbox.raise_error()
                    if exc.code() not in _RETRY:
                        raise from_rpc_error(exc) from None
                    last_error = exc
                finally:
                    sending.end()
                    call.cancel()
                # Reconnect: backoff, then wait for the channel, bounded by reconnect_timeout.
                now = time.monotonic()
                deadline = deadline or now + self._reconnect_timeout
                if now >= deadline:
                    why = (
                        "the stream kept ending early"
                        if last_error is None
                        else (from_rpc_error(last_error).details)
                    )
                    raise Unavailable(
                        f"gave up reconnecting after {self._reconnect_timeout} s: {why}"
                    )
                time.sleep(min(backoff, deadline - now))
                backoff = min(2 * backoff, 1.0)
                with contextlib.suppress(grpc.FutureTimeoutError):
                    grpc.channel_ready_future(self._channel).result(
                        timeout=max(0.01, min(5.0, deadline - time.monotonic()))
                    )
                self.reconnects += 1
        finally:
            outbox.stop()
            if ring is not None:
                ring.close()

    def _opened(self, sending: Sending, state: pb.StreamState) -> Iterator[StepResult]:
        """Resume after what the server applied; results applied but never received: DUPLICATE."""
        applied = state.last_applied_sequence
        if applied < self._durable:
            raise DataLoss(
                f"the server holds producer {self.producer_id!r} at sequence {applied}, but "
                f"{self._durable} was reported durable: its checkpoints were lost or rolled back"
            )
        self._set_durable(state.last_durable_sequence)
        for sequence in sending.resume(applied, self._yielded):
            self._yielded = self._persist = sequence
            yield step_result(
                pb.StepResult(
                    sequence=sequence,
                    step=state.step,
                    outcome=pb.OUTCOME_DUPLICATE,
                    reason="applied before a reconnect; its result was lost with the connection",
                )
            )

    def _done(self) -> bool:
        outbox = self._outbox
        assert outbox is not None
        return outbox.done and self._yielded >= outbox.last_sequence

    def _set_durable(self, sequence: int) -> None:
        if sequence > self._durable:
            self._durable = sequence
            assert self._outbox is not None
            self._outbox.release(sequence)

    # -- checkpoints ---------------------------------------------------------------------

    def _request_checkpoint(self) -> None:
        """The outbox is full: ask the server to make what it applied durable."""
        if self._saving or not self._checkpoints or time.monotonic() - self._last_save < 0.5:
            return
        self._saving = True
        threading.Thread(target=self._save_in_background, daemon=True).start()

    def _save_in_background(self) -> None:
        try:
            self._save_checkpoint()
        except Exception:  # the stream itself reports a server that is gone
            pass
        finally:
            self._last_save = time.monotonic()
            self._saving = False

    def _save_checkpoint(self) -> None:
        try:
            response = self._stub.SaveCheckpoint(
                pb.SaveCheckpointRequest(name=self.name), timeout=self._reconnect_timeout
            )
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            # The server keeps no checkpoints: nothing survives its restart, so the
            # outbox holds only what has no result yet.
            self._checkpoints = False
            assert self._outbox is not None
            self._outbox.release(self._yielded)
            return
        self._set_durable(response.producer_sequences.get(self.producer_id, 0))

    def _needs_checkpoint(self) -> bool:
        return self._wait_durable and self._checkpoints and self._durable < self._persist
