"""Exactly-once training streams: a producer's batches survive reconnects and server restarts.

``Client.train(name, batches, producer_id="...")`` returns a ``ProducerStream``.
Every batch carries a sequence number. The stream keeps each batch until the
server reports it durable (saved in a checkpoint), so when the connection breaks
(the server restarts, a pod is rescheduled) it reconnects with backoff, learns
from the server which sequence it last applied, and re-sends only what came
after. The server answers a batch it applied before with DUPLICATE, never
applying it twice.

Threads: the caller's thread reads responses (this iterator); a feeder thread
pulls the caller's batches into the bounded buffer; gRPC's request thread sends
from the buffer. The caller's iterator is only ever read by the feeder, so a
reconnect never has two readers of it.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from gradstream.client._errors import BatchRejected, DataLoss, Unavailable, from_rpc_error
from gradstream.client._tensor import wire_array
from gradstream.client._wire import encode_batch
from gradstream.v1 import trainer_pb2 as pb
from gradstream.v1 import trainer_pb2_grpc as pb_grpc

_OUTCOME_NAMES = {v: k.removeprefix("OUTCOME_") for k, v in pb.Outcome.items()}
# Answers that mean "the server is not there right now": worth a reconnect.
_RETRY = frozenset({grpc.StatusCode.UNAVAILABLE})
_POLL = 0.1  # seconds between checks of a stop flag while waiting


@dataclass(frozen=True, slots=True)
class _Entry:
    sequence: int
    batch: bytes  # one ``batches`` entry of a TrainRequest, as wire bytes (``encode_batch``)

    @property
    def size(self) -> int:
        return len(self.batch)


class _Attempt:
    """One Train call: the request thread waits for its StreamState before sending."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.dead = False
        self.resume_at = 0  # absolute buffer position of the first batch to send


class ProducerStream(Iterator[Any]):
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
        batches: Iterable[Any],
        producer_id: str,
        *,
        train_call: Callable[[Iterator[pb.TrainRequest | bytes]], Any],
        report_every: int,
        skip_rejected: bool,
        batches_per_message: int,
        message_bytes: int,
        max_pending_batches: int,
        max_pending_bytes: int,
        reconnect_timeout: float,
        wait_durable: bool,
        step_result: Callable[[pb.StepResult], Any],
    ) -> None:
        self.name = name
        self.producer_id = producer_id
        self.reconnects = 0
        self._stub = stub
        self._train_call = train_call  # Train, sending bytes as they are
        self._channel = channel
        self._batches = batches
        self._opener = pb.TrainRequest(
            open=pb.TrainOpen(model=name, producer_id=producer_id, report_every=report_every)
        )
        self._skip_rejected = skip_rejected
        self._per_message = max(1, batches_per_message)
        self._message_bytes = message_bytes
        self._max_batches = max(1, max_pending_batches)
        self._max_bytes = max_pending_bytes
        self._reconnect_timeout = reconnect_timeout
        self._wait_durable = wait_durable
        self._step_result = step_result
        # The buffer: batches not yet durable, oldest first; positions are absolute.
        self._cond = threading.Condition()
        self._buffer: collections.deque[_Entry] = collections.deque()
        self._head = 0  # absolute position of _buffer[0]
        self._bytes = 0
        self._fed = 0  # sequence of the last batch the feeder took (or the numbering base)
        self._last_fed = 0  # sequence of the last batch the feeder took (0: none)
        self._persist = 0  # highest sequence the server reported applied: to make durable
        self._source_done = False
        self._source_error: BaseException | None = None
        self._stopped = False
        self._durable = 0
        self._yielded = 0  # highest sequence whose result the caller has
        self._checkpoints = True  # False once the server says it keeps none
        self._saving = False
        self._last_save = 0.0
        self._feeder: threading.Thread | None = None
        self._attempt: _Attempt | None = None
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

    def __next__(self) -> Any:
        return next(self._results)

    def close(self) -> None:
        """Stop streaming; batches not yet sent are not sent."""
        self._results.close()

    # -- the stream ----------------------------------------------------------------------

    def _run(self) -> Generator[Any, None, None]:
        deadline: float | None = None
        backoff = 0.05
        last_error: grpc.RpcError | None = None
        try:
            while True:
                attempt = _Attempt()
                self._attempt = attempt
                call: Any = self._train_call(self._requests(attempt))
                try:
                    for response in call:
                        if response.HasField("opened"):
                            yield from self._opened(attempt, response.opened)
                            deadline, backoff = None, 0.05
                        if response.last_durable_sequence:
                            self._set_durable(response.last_durable_sequence)
                        for message in response.results:
                            result = self._step_result(message)
                            if result.sequence <= self._yielded:
                                continue  # a re-sent batch whose result the caller has
                            if result.outcome == "REJECTED" and not self._skip_rejected:
                                raise BatchRejected(result)
                            self._yielded = result.sequence
                            if result.outcome in ("APPLIED", "ACCUMULATED"):
                                self._persist = result.sequence
                            if not self._checkpoints:
                                self._trim(self._yielded)
                            yield result
                    self._raise_source_error()
                    if self._done():
                        if self._needs_checkpoint():
                            self._save_checkpoint()
                        if not self._needs_checkpoint():
                            return
                        # The checkpoint lacks batches the server had answered: it restarted
                        # in between. A new stream sends them again.
                    last_error = None
                except grpc.RpcError as exc:
                    self._raise_source_error()
                    if exc.code() not in _RETRY:
                        raise from_rpc_error(exc) from None
                    last_error = exc
                finally:
                    attempt.dead = True
                    with self._cond:
                        self._cond.notify_all()
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
            with self._cond:
                self._stopped = True
                self._cond.notify_all()

    def _opened(self, attempt: _Attempt, state: pb.StreamState) -> Iterator[Any]:
        """Resume after what the server applied; results applied but never received: DUPLICATE."""
        applied = state.last_applied_sequence
        if applied < self._durable:
            raise DataLoss(
                f"the server holds producer {self.producer_id!r} at sequence {applied}, but "
                f"{self._durable} was reported durable: its checkpoints were lost or rolled back"
            )
        self._set_durable(state.last_durable_sequence)
        if self._feeder is None:
            # Automatic numbering continues after what this producer sent before.
            self._fed = applied
            self._feeder = threading.Thread(
                target=self._feed, name=f"gradstream-producer-{self.producer_id}", daemon=True
            )
            self._feeder.start()
        lost: list[int] = []
        with self._cond:
            position = self._head
            for entry in self._buffer:
                if entry.sequence > applied:
                    break
                if entry.sequence > self._yielded:
                    lost.append(entry.sequence)
                position += 1
            attempt.resume_at = position
        attempt.opened.set()
        for sequence in lost:
            self._yielded = self._persist = sequence
            yield self._step_result(
                pb.StepResult(
                    sequence=sequence,
                    step=state.step,
                    outcome=pb.OUTCOME_DUPLICATE,
                    reason="applied before a reconnect; its result was lost with the connection",
                )
            )

    def _requests(self, attempt: _Attempt) -> Iterator[pb.TrainRequest | bytes]:
        yield self._opener
        while not attempt.opened.wait(_POLL):
            if attempt.dead:
                return
        position = attempt.resume_at
        while True:
            # A message is its batches' entries concatenated. Each entry was encoded on its
            # own, so only the first one's data is sure to be aligned in the message (the
            # server copies unaligned data to check it: slower, not wrong); a batch large
            # enough for alignment to matter usually travels alone.
            entries: list[bytes] = []
            with self._cond:
                while (
                    not attempt.dead
                    and position >= self._head + len(self._buffer)
                    and not self._source_done
                ):
                    self._cond.wait(_POLL)
                if attempt.dead:
                    return
                position = max(position, self._head)
                size = 0
                while (
                    position < self._head + len(self._buffer)
                    and len(entries) < self._per_message
                    and size < self._message_bytes
                ):
                    entry = self._buffer[position - self._head]
                    entries.append(entry.batch)
                    size += entry.size
                    position += 1
            if not entries:
                return  # the caller's batches are all sent: half-close
            yield entries[0] if len(entries) == 1 else b"".join(entries)

    def _done(self) -> bool:
        with self._cond:
            return self._source_done and self._yielded >= self._last_fed

    # -- the buffer ----------------------------------------------------------------------

    def _feed(self) -> None:
        explicit: bool | None = None
        try:
            for index, item in enumerate(self._batches):
                entry, explicit = self._entry(item, index, explicit)
                with self._cond:
                    while self._full(entry.size) and not self._stopped:
                        self._request_checkpoint()
                        self._cond.wait(_POLL)
                    if self._stopped:
                        return
                    self._buffer.append(entry)
                    self._bytes += entry.size
                    self._fed = self._last_fed = entry.sequence
                    self._cond.notify_all()
        except BaseException as exc:  # re-raised in the caller's thread
            self._source_error = exc
        finally:
            with self._cond:
                self._source_done = True
                self._cond.notify_all()

    def _entry(self, item: Any, index: int, explicit: bool | None) -> tuple[_Entry, bool]:
        if not isinstance(item, tuple | list) or len(item) not in (2, 3, 4):
            raise TypeError(
                f"batch {index}: expected (x, y), (x, y, sample_weight) or "
                f"(x, y, sample_weight, sequence), got {type(item)}"
            )
        given = len(item) == 4
        if explicit is not None and given != explicit:
            raise ValueError(
                f"batch {index}: give a sequence with every batch (4-tuples) or with none"
            )
        if given:
            sequence = int(item[3])
            if sequence <= self._last_fed:
                raise ValueError(
                    f"batch {index}: sequence {sequence} does not increase "
                    f"(the one before was {self._last_fed})"
                )
        else:
            sequence = self._fed + 1
        weight = item[2] if len(item) >= 3 else None
        parts = [wire_array(v) for v in (item[0], item[1], weight) if v is not None]
        # Encoded (and so copied) now: the buffer must not change if the caller reuses
        # its arrays, and a re-send after a reconnect costs no encoding.
        return _Entry(sequence, encode_batch(parts, sequence=sequence)), given

    def _full(self, size: int) -> bool:
        if not self._buffer:
            return False  # one batch always fits, however large
        return len(self._buffer) >= self._max_batches or self._bytes + size > self._max_bytes

    def _trim(self, upto: int) -> None:
        with self._cond:
            while self._buffer and self._buffer[0].sequence <= upto:
                self._bytes -= self._buffer.popleft().size
                self._head += 1
            self._cond.notify_all()

    def _set_durable(self, sequence: int) -> None:
        if sequence > self._durable:
            self._durable = sequence
            self._trim(sequence)

    # -- checkpoints ---------------------------------------------------------------------

    def _request_checkpoint(self) -> None:
        """The buffer is full: ask the server to make what it applied durable (called locked)."""
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
            with self._cond:
                self._saving = False
                self._last_save = time.monotonic()
                self._cond.notify_all()

    def _save_checkpoint(self) -> None:
        try:
            response = self._stub.SaveCheckpoint(
                pb.SaveCheckpointRequest(name=self.name), timeout=self._reconnect_timeout
            )
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            # The server keeps no checkpoints: nothing survives its restart, so the
            # buffer holds only what has no result yet.
            self._checkpoints = False
            self._trim(self._yielded)
            return
        self._set_durable(response.producer_sequences.get(self.producer_id, 0))

    def _needs_checkpoint(self) -> bool:
        return self._wait_durable and self._checkpoints and self._durable < self._persist

    def _raise_source_error(self) -> None:
        if self._source_error is not None:
            raise self._source_error
