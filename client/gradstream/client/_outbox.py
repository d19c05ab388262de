"""The SDK's outbox: the caller's batches, encoded once, on their way to the server.

One feeder thread reads the caller's batches, refuses one that no message could hold and
encodes each into the message being filled, where its data is aligned for the place the
entry has in that message. A Train call's request iterator (``Sending``) seals that
message and sends it when the window has room: at most ``window`` messages and
``window_bytes`` unacknowledged (always one), which bounds the client's memory and the time
a batch waits behind others while keeping enough in flight to fill the pipe. From a lazy
iterator a message goes out with whatever is ready, so a slow producer gets one batch per
message and a fast one full ones; a sequence fills every message.

Sent messages stay in the outbox until they are released: on acknowledgement for a plain
stream; once durable (or answered, by a server that keeps no checkpoints) for an
exactly-once producer, whose next call after a reconnect sends them again, byte for byte.
With a shared-memory ring the bytes lie in the ring and the messages carry references; a
message's ring space is given back when the message is released.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from gradstream.client._errors import ResourceExhausted
from gradstream.client._shm import RingFull, SharedRing
from gradstream.v1 import trainer_pb2 as pb
from gradstream.wire import wire_array, wire_inputs
from gradstream.wire.train import (
    MESSAGE_FRAMING,
    BatchParts,
    MessageBuilder,
    encode_batch,
    entry_bound,
)

# (x, y), (x, y, sample_weight) or, for producers, (x, y, sample_weight_or_None, sequence),
# where x is an array or a dict of the model's named inputs (name -> array).
BatchLike = tuple[Any, Any] | tuple[Any, Any, Any] | tuple[Any, Any, Any, Any]
_POLL = 0.1  # seconds between checks of a stop flag while waiting


class _Message:
    """One TrainRequest's batches; ``cost`` is what it takes of the window (bytes or ring)."""

    __slots__ = ("builder", "cost", "mark", "sequences")

    def __init__(self) -> None:
        self.builder = MessageBuilder()
        self.sequences: list[int] = []
        self.cost = 0
        self.mark = 0  # the ring's position after this message's bytes


class Outbox:
    """Encoded batches, oldest first, from the feeder until they are released.

    ``numbered`` (producers): batches carry sequences, given by the caller as a fourth
    element or counted on from ``start``'s ``after``. ``max_batches``/``max_bytes`` bound
    what is held; ``on_full`` is called while the feeder waits for room.
    """

    def __init__(
        self,
        batches: Iterable[BatchLike],
        *,
        batches_per_message: int,
        message_bytes: int,
        max_message_bytes: int,
        ring: SharedRing | None = None,
        numbered: bool = False,
        release_on_ack: bool = True,
        max_batches: int = 0,
        max_bytes: int = 0,
        on_full: Callable[[], None] | None = None,
    ) -> None:
        self.ring = ring
        self.numbered = numbered
        self.release_on_ack = release_on_ack
        self.error: BaseException | None = None  # the caller's iterator failed, or a batch
        self.done = False  # the feeder has taken every batch (or failed)
        self.last_sequence = 0  # the sequence of the last batch taken (0: none)
        self._batches = batches
        self._eager = not isinstance(batches, Sequence)
        self._per_message = max(1, batches_per_message)
        self._message_bytes = message_bytes
        # What one message's batches may take; with the ring the bytes do not travel in it.
        self._limit = max(0, max_message_bytes - MESSAGE_FRAMING) if ring is None else 0
        self._max_message_bytes = max_message_bytes
        self._max_batches = max_batches
        self._max_bytes = max_bytes
        self._on_full = on_full
        self._cond = threading.Condition()
        self._sealed: deque[_Message] = deque()  # sent at least once, not yet released
        self._head = 0  # absolute position of _sealed[0]
        self._open = _Message()
        self._held_batches = 0
        self._held_bytes = 0
        self._flush = False  # the feeder is stuck: send the open message as it is
        self._stopped = False
        self._next_sequence = 1

    # -- the feeder ----------------------------------------------------------------------

    def start(self, after: int = 0) -> None:
        """Start the feeder; automatic sequences continue after ``after``."""
        self._next_sequence = after + 1
        threading.Thread(target=self._feed, name="gradstream-batches", daemon=True).start()

    def stop(self) -> None:
        """The stream is over: stop reading batches and sending."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def raise_error(self) -> None:
        """The caller's iterator or one of its batches failed: that is the error to see."""
        if self.error is not None:
            raise self.error

    def _feed(self) -> None:
        try:
            explicit: bool | None = None
            for index, batch in enumerate(self._batches):
                sequence, arrays, explicit = self._parse(batch, index, explicit)
                parts = batch_parts(arrays, index)
                bound = entry_bound(parts)
                if self._limit and bound > self._limit:
                    # Splitting the batch would turn one optimizer step into several.
                    raise ResourceExhausted(
                        f"batch {index}: about {bound} bytes, more than "
                        f"max_message_bytes={self._max_message_bytes} allows in one message; "
                        "send smaller batches (each batch is one optimizer step) or raise "
                        "max_message_bytes on the server and the client"
                    )
                if not self._put(sequence, parts, bound):
                    return
        except BaseException as exc:  # re-raised in the caller's thread
            self.error = exc
        finally:
            with self._cond:
                self.done = True
                self._cond.notify_all()

    def _parse(
        self, batch: Any, index: int, explicit: bool | None
    ) -> tuple[int, Sequence[Any], bool | None]:
        """The batch's sequence (0 when unnumbered) and arrays."""
        if not self.numbered:
            if not isinstance(batch, tuple | list) or len(batch) not in (2, 3):
                raise TypeError(
                    f"batch {index}: expected (x, y) or (x, y, sample_weight), x an array "
                    f"or a dict of named inputs; got {_describe(batch)}"
                )
            return 0, batch, None
        if not isinstance(batch, tuple | list) or len(batch) not in (2, 3, 4):
            raise TypeError(
                f"batch {index}: expected (x, y), (x, y, sample_weight) or "
                f"(x, y, sample_weight, sequence), x an array or a dict of named inputs; "
                f"got {_describe(batch)}"
            )
        given = len(batch) == 4
        if explicit is not None and given != explicit:
            raise ValueError(
                f"batch {index}: give a sequence with every batch (4-tuples) or with none"
            )
        if not given:
            return self._next_sequence, batch, False
        sequence = int(batch[3])
        if sequence <= self.last_sequence:
            raise ValueError(
                f"batch {index}: sequence {sequence} does not increase "
                f"(the one before was {self.last_sequence})"
            )
        return sequence, batch[:3], True

    def _put(self, sequence: int, parts: BatchParts, bound: int) -> bool:
        """Add one batch to the open message once there is room; False if stopped first."""
        while True:
            with self._cond:
                while not self._room(bound):
                    if self._stopped:
                        return False
                    self._stuck(full=self._held_full(bound))
                    self._cond.wait(_POLL)
                if self._stopped:
                    return False
                try:
                    self._add(sequence, parts)
                    return True
                except RingFull:
                    self._stuck(full=True)
            assert self.ring is not None
            self.ring.wait(_POLL)

    def _room(self, bound: int) -> bool:
        if self._flush:
            return False
        size, count = self._open.builder.size, self._open.builder.count
        if count and (self._full(self._open) or (self._limit and size + bound > self._limit)):
            return False  # the sender takes the open message first
        return not self._held_full(bound)

    def _held_full(self, bound: int) -> bool:
        if not self._held_batches or not self._max_batches:
            return False  # one batch always fits, however large
        return self._held_batches >= self._max_batches or self._held_bytes + bound > self._max_bytes

    def _full(self, message: _Message) -> bool:
        builder = message.builder
        return builder.count >= self._per_message or builder.size >= self._message_bytes

    def _stuck(self, full: bool) -> None:
        """The feeder must wait: the open message goes out as it is (called locked).

        ``full``: what is held (or the ring) has no room, which only releases free.
        """
        if self._open.builder.count and not self._flush:
            self._flush = True
            self._cond.notify_all()
        if full and self._on_full is not None:
            self._on_full()

    def _add(self, sequence: int, parts: BatchParts) -> None:
        """Encode one batch into the open message (called locked; RingFull adds nothing)."""
        message = self._open
        if self.ring is None:
            entry = encode_batch(parts, sequence=sequence, start=message.builder.size)
            cost = len(entry)
        else:
            places, cost = self.ring.put(parts.arrays())
            entry = encode_batch(parts, places, sequence)
        message.builder.add(entry)
        message.sequences.append(sequence)
        message.cost += cost
        self._held_batches += 1
        self._held_bytes += cost
        self.last_sequence = sequence
        self._next_sequence = sequence + 1
        # Wake a sender only when there is something new for it to decide.
        if message.builder.count == 1 or self._full(message):
            self._cond.notify_all()

    # -- releasing -----------------------------------------------------------------------

    def release(self, upto: int) -> None:
        """Release the sent messages whose batches all have sequences up to ``upto``."""
        with self._cond:
            while self._sealed and self._sealed[0].sequences[-1] <= upto:
                self._release_oldest()
            self._cond.notify_all()

    def _release_oldest(self) -> None:
        message = self._sealed.popleft()
        self._head += 1
        self._held_batches -= message.builder.count
        self._held_bytes -= message.cost
        if self.ring is not None:
            self.ring.release(message.mark)

    def _seal(self) -> _Message:
        """The open message becomes the newest sent one (called locked)."""
        message = self._open
        message.mark = self.ring.mark() if self.ring is not None else 0
        self._sealed.append(message)
        self._open = _Message()
        self._flush = False
        self._cond.notify_all()
        return message

    def sending(self, opener: pb.TrainRequest, window: int, window_bytes: int) -> Sending:
        """A new call's requests; a producer's wait for ``Sending.resume``."""
        return Sending(self, opener, window, window_bytes, wait=self.numbered)


def batch_parts(batch: Sequence[Any], index: int) -> BatchParts:
    """``(x_or_inputs, y[, sample_weight])`` as it travels; a malformed one names batch ``index``.

    ``x_or_inputs`` is an array (the model's single input ``x``) or a dict name -> array
    (the model's named inputs, sent in the dict's order).
    """
    x, y, weight = (*batch, None)[:3]
    where = f"batch {index}"
    if x is None:
        raise ValueError(f"{where}: x is None; give an array or a dict of named inputs")
    if y is None:
        raise ValueError(f"{where}: y is None; every batch needs its targets")
    named = isinstance(x, Mapping)
    return BatchParts(
        y=_wire(y, f"{where}: y"),
        x=None if named else _wire(x, f"{where}: x"),
        sample_weight=None if weight is None else _wire(weight, f"{where}: sample_weight"),
        inputs=tuple(wire_inputs(x, f"{where}: inputs")) if named else (),
    )


def _wire(value: Any, where: str) -> tuple[Any, int]:
    try:
        return wire_array(value)
    except TypeError as exc:
        raise TypeError(f"{where}: {exc}") from None


def _describe(batch: Any) -> str:
    if isinstance(batch, tuple | list):
        return f"a {type(batch).__name__} of {len(batch)}"
    return type(batch).__name__


class Sending:
    """One Train call's requests: the opener, then the outbox's messages as the window allows."""

    def __init__(
        self, outbox: Outbox, opener: pb.TrainRequest, window: int, window_bytes: int, wait: bool
    ) -> None:
        self._outbox = outbox
        self._opener = opener
        self._window = max(1, window)
        self._window_bytes = window_bytes
        self._position: int | None = None if wait else outbox._head
        self._in_flight: deque[int] = deque()  # the cost of each unacknowledged message
        self._in_flight_bytes = 0
        self._ended = False

    def resume(self, applied: int, answered: int) -> list[int]:
        """Send from the first message with a batch after ``applied``.

        Returns the held sequences in (``answered``, ``applied``]: batches the server
        applied whose results never arrived.
        """
        outbox = self._outbox
        with outbox._cond:
            position = outbox._head
            for message in outbox._sealed:
                if message.sequences[-1] > applied:
                    break
                position += 1
            lost = [
                s
                for m in (*outbox._sealed, outbox._open)
                for s in m.sequences
                if answered < s <= applied
            ]
            self._position = position
            outbox._cond.notify_all()
        return lost

    def acked(self) -> None:
        """The oldest message in flight was answered: more may go out."""
        outbox = self._outbox
        with outbox._cond:
            if self._in_flight:
                self._in_flight_bytes -= self._in_flight.popleft()
                if outbox.release_on_ack and outbox._sealed:
                    outbox._release_oldest()
            outbox._cond.notify_all()

    def end(self) -> None:
        """The call is over: its request iterator stops."""
        with self._outbox._cond:
            self._ended = True
            self._outbox._cond.notify_all()

    def requests(self) -> Iterator[pb.TrainRequest | bytes]:
        """The opener, then serialized messages; ends (half-closes) once all are sent."""
        yield self._opener
        while (message := self._next()) is not None:
            yield message.builder.to_bytes()

    def _credit(self, cost: int) -> bool:
        return not self._in_flight or (
            len(self._in_flight) < self._window
            and self._in_flight_bytes + cost <= self._window_bytes
        )

    def _next(self) -> _Message | None:
        """The next message to send, once the window has room; None at the end."""
        outbox = self._outbox
        with outbox._cond:
            while not (outbox._stopped or self._ended):
                if self._position is None:
                    outbox._cond.wait(_POLL)
                    continue
                self._position = max(self._position, outbox._head)
                index = self._position - outbox._head
                message: _Message | None = None
                if index < len(outbox._sealed):
                    message = outbox._sealed[index]
                elif outbox._open.builder.count:
                    ready = (
                        outbox._eager or outbox._flush or outbox.done or outbox._full(outbox._open)
                    )
                    # Sealed only once it may go out: until then the feeder keeps filling it.
                    if ready and (not self._in_flight or len(self._in_flight) < self._window):
                        message = outbox._seal()
                elif outbox.done:
                    return None
                if message is not None and self._credit(message.cost):
                    self._position += 1
                    self._in_flight.append(message.cost)
                    self._in_flight_bytes += message.cost
                    return message
                outbox._cond.wait(_POLL)
        return None
