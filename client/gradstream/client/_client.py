"""The synchronous Python SDK: numpy (or torch) in, numpy out; it never imports torch."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy.typing as npt

from gradstream.client._errors import BatchRejected, ResourceExhausted, from_rpc_error
from gradstream.client._shm import RingFull, SharedRing
from gradstream.client._spec import spec_from_proto, spec_to_proto
from gradstream.client._tensor import from_proto, to_proto, wire_array
from gradstream.client._wire import MAX_PADDING, MessageBuilder, encode_batch
from gradstream.v1 import trainer_pb2 as pb
from gradstream.v1 import trainer_pb2_grpc as pb_grpc

T = TypeVar("T")
Array = npt.NDArray[Any]
# (x, y), (x, y, sample_weight) or, for producers, (x, y, sample_weight_or_None, sequence)
BatchLike = tuple[Any, Any] | tuple[Any, Any, Any] | tuple[Any, Any, Any, Any]
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_OUTCOME_NAMES = {v: k.removeprefix("OUTCOME_") for k, v in pb.Outcome.items()}


@dataclass(frozen=True, slots=True)
class StepResult:
    """What happened to one batch: APPLIED, ACCUMULATED, SKIPPED_NONFINITE, DUPLICATE or REJECTED.

    ``loss`` is None on batches that were not reporting points (see ``report_every``).
    """

    sequence: int
    step: int
    loss: float | None
    outcome: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """A checkpoint the server wrote: its name, step and every producer's durable sequence."""

    checkpoint: str
    step: int
    producer_sequences: dict[str, int]


@dataclass(frozen=True, slots=True)
class ParameterInfo:
    """Shape and frozen state of one parameter."""

    shape: tuple[int, ...]
    frozen: bool


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model as the server describes it."""

    name: str
    spec: dict[str, Any]
    step: int
    pending_batches: int
    device: str
    parameters: dict[str, ParameterInfo]
    autograd_chain: list[str] = field(default_factory=list)
    nonfinite_streak: int = 0
    lr: float = 0.0  # what the next step uses: the schedule's current value


def _model_info(message: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=message.name,
        spec=spec_from_proto(message.spec),
        step=message.step,
        pending_batches=message.pending_batches,
        device=message.device,
        parameters={p.name: ParameterInfo(tuple(p.shape), p.frozen) for p in message.parameters},
        autograd_chain=list(message.autograd_chain),
        nonfinite_streak=message.nonfinite_streak,
        lr=message.lr,
    )


class Client:
    """A connection to one gradstream server.

    >>> with Client("127.0.0.1:50051") as client:
    ...     client.create_model("seed", {"architecture": {"kind": "linear", "in_features": 1,
    ...                                                     "out_features": 1, "bias": False}})
    ...     for result in client.train("seed", [(x, y)] * 100):
    ...         print(result.step, result.loss)
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        timeout: float | None = 60.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        channel: grpc.Channel | None = None,
        tls: bool | None = None,
        ca: str | Path | bytes | None = None,
        cert: str | Path | bytes | None = None,
        key: str | Path | bytes | None = None,
        token: str | None = None,
    ) -> None:
        """Connect to ``target`` (host:port); nothing is sent until the first call.

        TLS is on when ``tls`` is true or any of ``ca`` (the CA that signed the
        server's certificate; the system's roots when omitted), ``cert`` and ``key``
        (this client's certificate, for mutual TLS) is given; each is PEM bytes or a
        file path. ``token`` is sent as ``authorization: Bearer <token>`` on every call.
        """
        self.target = target
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        if channel is None:
            options = [
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
                # Reconnect to a restarted server within a second, not gRPC's up-to-2-minutes.
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ]
            if tls or (tls is None and (ca, cert, key) != (None, None, None)):
                if (cert is None) != (key is None):
                    raise ValueError("cert and key go together (mutual TLS needs both)")
                credentials = grpc.ssl_channel_credentials(
                    root_certificates=_pem(ca),
                    private_key=_pem(key),
                    certificate_chain=_pem(cert),
                )
                channel = grpc.secure_channel(target, credentials, options=options)
            else:
                channel = grpc.insecure_channel(target, options=options)
        if token is not None:
            channel = grpc.intercept_channel(channel, _BearerToken(token))
        self._channel = channel
        self._stub = pb_grpc.TrainerServiceStub(self._channel)
        # Train's batches arrive already serialized (see _wire.py); only the opener is a message.
        self._train_call = self._channel.stream_stream(
            "/gradstream.v1.TrainerService/Train",
            request_serializer=_serialize_train,
            response_deserializer=pb.TrainResponse.FromString,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def _call(self, method: Callable[..., T], request: Any) -> T:
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    # -- models -------------------------------------------------------------------------

    def create_model(self, name: str, spec: Mapping[str, Any]) -> ModelInfo:
        """Create a model from a spec dict (the JSON shape of ``gradstream.v1.ModelSpec``)."""
        request = pb.CreateModelRequest(name=name, spec=spec_to_proto(spec))
        return _model_info(self._call(self._stub.CreateModel, request).model)

    def get_model(self, name: str) -> ModelInfo:
        """Spec, step, device, parameter shapes, frozen set and autograd chain of a model."""
        return _model_info(self._call(self._stub.GetModel, pb.GetModelRequest(name=name)).model)

    def list_models(self) -> list[ModelInfo]:
        """Every model on the server."""
        response = self._call(self._stub.ListModels, pb.ListModelsRequest())
        return [_model_info(m) for m in response.models]

    def delete_model(self, name: str) -> None:
        """Free a model."""
        self._call(self._stub.DeleteModel, pb.DeleteModelRequest(name=name))

    def update_model(
        self,
        name: str,
        lr: float | None = None,
        freeze: Iterable[str] = (),
        unfreeze: Iterable[str] = (),
    ) -> ModelInfo:
        """Set the learning rate; freeze (``requires_grad_(False)``) or unfreeze parameters."""
        request = pb.UpdateModelRequest(name=name, lr=lr, freeze=freeze, unfreeze=unfreeze)
        return _model_info(self._call(self._stub.UpdateModel, request).model)

    # -- inference and inspection -------------------------------------------------------

    def predict(self, name: str, x: Any) -> Array:
        """The model's output on x (inference mode, nothing recorded)."""
        response = self._call(self._stub.Predict, pb.PredictRequest(name=name, x=to_proto(x)))
        return from_proto(response.y, "y")

    def gradients(
        self,
        name: str,
        x: Any,
        y: Any = None,
        grad_output: Any = None,
        sample_weight: Any = None,
    ) -> dict[str, Array]:
        """Gradients of the loss on (x, y), or with ``grad_output`` = v the vector-Jacobian
        product v^T J of the model output (the notebook's ``y.backward(vector)``). Nothing steps."""
        request = pb.ComputeGradientsRequest(name=name, x=to_proto(x))
        if y is not None:
            to_proto(y, request.y)
        if grad_output is not None:
            to_proto(grad_output, request.grad_output)
        if sample_weight is not None:
            to_proto(sample_weight, request.sample_weight)
        response = self._call(self._stub.ComputeGradients, request)
        return {n: from_proto(t, f"gradients[{n}]") for n, t in response.gradients.items()}

    def parameters(self, name: str, gradients: bool = False) -> dict[str, Array]:
        """Parameter values by name; with ``gradients`` also ``"<name>.grad"`` where one is set."""
        request = pb.GetParametersRequest(name=name, include_gradients=gradients)
        response = self._call(self._stub.GetParameters, request)
        values = {n: from_proto(t, n) for n, t in response.parameters.items()}
        values.update({f"{n}.grad": from_proto(t, n) for n, t in response.gradients.items()})
        return values

    def set_parameters(
        self, name: str, params: Mapping[str, Any], reset_optimizer: bool = False
    ) -> ModelInfo:
        """Overwrite some or all parameters (all or nothing)."""
        request = pb.SetParametersRequest(name=name, reset_optimizer=reset_optimizer)
        for key, value in params.items():
            to_proto(value, request.parameters[key])
        return _model_info(self._call(self._stub.SetParameters, request).model)

    def save_checkpoint(self, name: str) -> CheckpointInfo:
        """Checkpoint a model now; returns once it is on the server's disk."""
        response = self._call(self._stub.SaveCheckpoint, pb.SaveCheckpointRequest(name=name))
        return CheckpointInfo(response.checkpoint, response.step, dict(response.producer_sequences))

    # -- training -----------------------------------------------------------------------

    def train(
        self,
        name: str,
        batches: Iterable[BatchLike],
        report_every: int = 1,
        *,
        skip_rejected: bool = False,
        batches_per_message: int = 64,
        message_bytes: int = 4 * 1024 * 1024,
        window: int = 8,
        window_bytes: int = 64 * 1024 * 1024,
        shared_memory: bool = False,
        producer_id: str | None = None,
        max_pending_batches: int = 4096,
        max_pending_bytes: int = 256 * 1024 * 1024,
        reconnect_timeout: float = 60.0,
        wait_durable: bool = True,
    ) -> Iterator[StepResult]:
        """Stream batches of ``(x, y)`` or ``(x, y, sample_weight)``; yields one result per batch.

        Several batches travel in one message (up to ``batches_per_message`` and
        ``message_bytes``), which is what makes small batches fast. From a lazy
        iterator, batches are sent as soon as they are produced. At most ``window``
        messages and ``window_bytes`` are unacknowledged at a time. With
        ``shared_memory`` (a producer on the server's own host) the bytes go through a
        shared-memory ring of ``window_bytes`` and the messages carry only references.
        The loss is read
        back from the device every ``report_every`` batches. A REJECTED batch
        raises ``BatchRejected`` unless ``skip_rejected``.

        With ``producer_id`` every batch is applied exactly once, across reconnects
        and server restarts (see docs/durability.md), and the iterator returned is a
        ``ProducerStream`` (``.durable_sequence``, ``.applied_sequence``). Batches
        are numbered after the producer's last applied sequence, or by the caller:
        give every batch as ``(x, y, sample_weight_or_None, sequence)`` with
        increasing sequences. Batches not yet saved in a checkpoint are kept (at
        most ``max_pending_batches`` and ``max_pending_bytes``; when full, the SDK
        asks the server for a checkpoint) and re-sent after a reconnect, tried for
        ``reconnect_timeout`` seconds while the server answers UNAVAILABLE. With
        ``wait_durable`` the iterator ends only once every batch is in a checkpoint.
        """
        if producer_id:
            from gradstream.client._producer import ProducerStream

            if shared_memory:
                raise ValueError("shared_memory is not supported with producer_id (yet)")

            return ProducerStream(
                self._stub,
                self._channel,
                name,
                batches,
                producer_id,
                train_call=self._train_call,
                report_every=report_every,
                skip_rejected=skip_rejected,
                batches_per_message=batches_per_message,
                message_bytes=message_bytes,
                max_pending_batches=max_pending_batches,
                max_pending_bytes=max_pending_bytes,
                reconnect_timeout=reconnect_timeout,
                wait_durable=wait_durable,
                step_result=_step_result,
            )
        return self._train(
            name,
            batches,
            report_every,
            skip_rejected=skip_rejected,
            batches_per_message=batches_per_message,
            message_bytes=message_bytes,
            window=window,
            window_bytes=window_bytes,
            shared_memory=shared_memory,
        )

    def _train(
        self,
        name: str,
        batches: Iterable[BatchLike],
        report_every: int,
        *,
        skip_rejected: bool,
        batches_per_message: int,
        message_bytes: int,
        window: int,
        window_bytes: int,
        shared_memory: bool,
    ) -> Iterator[StepResult]:
        ring = SharedRing(window_bytes) if shared_memory else None
        opener = pb.TrainRequest(
            open=pb.TrainOpen(
                model=name, report_every=report_every, shared_memory=ring.name if ring else ""
            )
        )
        packer = _Packer(
            batches,
            batches_per_message,
            message_bytes,
            window,
            window_bytes,
            ring,
            max_message_bytes=self.max_message_bytes,
        )
        responses: Any = self._train_call(packer.requests(opener))
        try:
            for response in responses:
                if response.results:
                    packer.acked()
                for r in response.results:
                    result = _step_result(r)
                    if result.outcome == "REJECTED" and not skip_rejected:
                        raise BatchRejected(result)
                    yield result
        except grpc.RpcError as exc:
            packer.raise_producer_error()
            raise from_rpc_error(exc) from None
        finally:
            responses.cancel()
            packer.stop()
            if ring is not None:
                ring.close()
        packer.raise_producer_error()


def _serialize_train(request: pb.TrainRequest | bytes) -> bytes:
    return request if isinstance(request, bytes) else request.SerializeToString()


def _step_result(r: pb.StepResult) -> StepResult:
    return StepResult(
        sequence=r.sequence,
        step=r.step,
        loss=r.loss if r.HasField("loss") else None,
        outcome=_OUTCOME_NAMES[r.outcome],
        reason=r.reason,
    )


def _pem(value: str | Path | bytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Adds ``authorization: Bearer <token>`` to every call on the channel."""

    def __init__(self, token: str) -> None:
        if not token or any(c.isspace() for c in token):
            raise ValueError("token must be non-empty and without whitespace")
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        return _CallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), self._header],
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


@dataclass(frozen=True, slots=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


class _Packer:
    """Turns the caller's batches into TrainRequests of several batches each.

    A sequence is packed directly. A lazy iterator is drained by a thread that
    encodes into the message being filled; a message goes out with whatever is
    ready, so a slow producer gets one batch per message and a fast one full ones.
    At most ``window`` messages and ``window_bytes`` bytes (but always one message)
    are unacknowledged at once: that bounds the client's memory and the time a
    batch waits behind others, while keeping enough in flight to fill the pipe.
    """

    def __init__(
        self,
        batches: Iterable[BatchLike],
        per_message: int,
        message_bytes: int,
        window: int,
        window_bytes: int,
        ring: SharedRing | None = None,
        max_message_bytes: int = 0,
    ) -> None:
        self.batches = batches
        self.ring = ring
        # What one message may hold, less room for the message's own framing; with the
        # ring the bytes do not travel in the message at all.
        self.limit = max(0, max_message_bytes - _MESSAGE_SLACK) if ring is None else 0
        self.per_message = max(1, per_message)
        self.message_bytes = message_bytes
        self.window = max(1, window)
        self.window_bytes = window_bytes
        self.error: BaseException | None = None
        self._in_flight: deque[tuple[int, int]] = deque()  # (size, ring mark), unacknowledged
        self._in_flight_bytes = 0
        self._acks = threading.Condition()
        self._stopped = threading.Event()
        self._filled = threading.Condition()
        self._current = MessageBuilder()
        self._size = 0
        self._flush = False  # the ring is full: send the message being filled as it is
        self._done = False

    def stop(self) -> None:
        """The call is over: stop pulling batches."""
        self._stopped.set()
        with self._filled:
            self._filled.notify_all()

    def acked(self) -> None:
        """The oldest message was answered: more may go out."""
        with self._acks:
            if self._in_flight:
                size, mark = self._in_flight.popleft()
                self._in_flight_bytes -= size
                if self.ring is not None:
                    self.ring.release(mark)
            self._acks.notify_all()

    def raise_producer_error(self) -> None:
        """The caller's iterator failed: that, not the cancelled call, is the error to see."""
        if self.error is not None:
            raise self.error

    def requests(self, opener: pb.TrainRequest) -> Iterator[pb.TrainRequest | bytes]:
        """The request stream: the opener, then serialized messages as credits allow."""
        yield opener
        try:
            yield from self._sent(
                self._packed() if isinstance(self.batches, Sequence) else self._pumped()
            )
        except Exception as exc:  # grpc would only log it; the caller must see it
            self.error = exc

    def _sent(self, messages: Iterator[tuple[MessageBuilder, int, int]]) -> Iterator[bytes]:
        for message, size, mark in messages:
            with self._acks:
                while self._in_flight and (
                    len(self._in_flight) >= self.window
                    or self._in_flight_bytes + size > self.window_bytes
                ):
                    if self._stopped.is_set():
                        return
                    self._acks.wait(0.1)
                self._in_flight.append((size, mark))
                self._in_flight_bytes += size
            yield message.to_bytes()

    def _full(self, message: MessageBuilder, size: int) -> bool:
        return message.count >= self.per_message or size >= self.message_bytes

    def _encodable(self, batch: BatchLike, index: int) -> _Encoded:
        """The batch's arrays as they travel; refuses one that no message could hold."""
        if not isinstance(batch, tuple | list) or len(batch) not in (2, 3):
            raise TypeError(
                f"batch {index}: expected (x, y) or (x, y, sample_weight), got {type(batch)}"
            )
        encoded = _Encoded([wire_array(v) for v in batch if v is not None])
        if self.limit and encoded.nbytes > self.limit:
            # Splitting the batch would turn one optimizer step into several: not ours to do.
            raise ResourceExhausted(
                f"batch {index}: about {encoded.nbytes} bytes, more than "
                f"max_message_bytes={self.limit + _MESSAGE_SLACK} allows in one message; send "
                "smaller batches (each batch is one optimizer step) or raise max_message_bytes "
                "on the server and the client"
            )
        return encoded

    def _overflows(self, size: int, encoded: _Encoded) -> bool:
        return bool(self.limit) and size + encoded.nbytes > self.limit

    def _mark(self) -> int:
        return 0 if self.ring is None else self.ring.mark()

    def _packed(self) -> Iterator[tuple[MessageBuilder, int, int]]:
        request, size = MessageBuilder(), 0
        assert isinstance(self.batches, Sequence)
        for index, batch in enumerate(self.batches):
            try:
                parts = self._encodable(batch, index)
            except Exception:
                if request.count:  # what came before the bad batch still goes out
                    yield request, size, self._mark()
                raise
            if request.count and self._overflows(size, parts):
                yield request, size, self._mark()
                request, size = MessageBuilder(), 0
            while True:
                try:
                    size += _add(request, parts, self.ring)
                    break
                except RingFull:
                    if request.count:  # send what is packed; its ack frees space
                        yield request, size, self._mark()
                        request, size = MessageBuilder(), 0
                    elif self._stopped.is_set():
                        return
                    else:
                        assert self.ring is not None
                        self.ring.wait(0.1)
            if self._full(request, size):
                yield request, size, self._mark()
                request, size = MessageBuilder(), 0
        if request.count:
            yield request, size, self._mark()

    def _pumped(self) -> Iterator[tuple[MessageBuilder, int, int]]:
        threading.Thread(target=self._pump, name="gradstream-batches", daemon=True).start()
        while True:
            with self._filled:
                while not self._current.count and not self._done:
                    if self._stopped.is_set():
                        return
                    self._filled.wait(0.1)
                if not self._current.count:
                    return
                message, size, mark = self._current, self._size, self._mark()
                self._current, self._size, self._flush = MessageBuilder(), 0, False
                self._filled.notify_all()
            yield message, size, mark

    def _pump(self) -> None:
        try:
            for index, batch in enumerate(self.batches):
                parts = self._encodable(batch, index)
                while not self._pump_one(parts):
                    if self._stopped.is_set():
                        return
                    assert self.ring is not None
                    self.ring.wait(0.1)
        except BaseException as exc:  # re-raised in the caller's thread
            self.error = exc
        finally:
            with self._filled:
                self._done = True
                self._filled.notify_all()

    def _pump_one(self, parts: _Encoded) -> bool:
        """Add one batch to the message being filled; False if the ring has no room yet."""
        with self._filled:
            while (
                self._flush
                or self._full(self._current, self._size)
                or (self._current.count and self._overflows(self._size, parts))
            ):
                if self._stopped.is_set():
                    return True
                self._filled.wait(0.1)
            try:
                self._size += _add(self._current, parts, self.ring)
            except RingFull:
                self._flush = bool(self._current.count)
                return False
            finally:
                self._filled.notify_all()
        return True


_MESSAGE_SLACK = 1024  # the message's own framing, beyond its batches


class _Encoded:
    """A batch's arrays as they travel, with an upper bound of its encoded size, computed once."""

    __slots__ = ("nbytes", "parts")

    def __init__(self, parts: list[tuple[npt.NDArray[Any], int]]) -> None:
        self.parts = parts
        # Its bytes plus framing and alignment padding per tensor.
        self.nbytes = 24 + sum(a.nbytes + 32 + 11 * a.ndim + MAX_PADDING for a, _ in parts)


def _add(message: MessageBuilder, encoded: _Encoded, ring: SharedRing | None) -> int:
    """Append one batch; its bytes go into the message, or into the ring (RingFull if no room).

    Returns what it adds to the window: the entry's bytes, or the ring space it took.
    """
    if ring is None:
        entry = encode_batch(encoded.parts, start=message.size)
        message.add(entry)
        return len(entry)
    places, used = ring.put([a for a, _ in encoded.parts])  # RingFull before anything is added
    message.add(encode_batch(encoded.parts, places))
    return used
