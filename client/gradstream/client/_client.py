"""The synchronous Python SDK: numpy (or torch) in, numpy out; it never imports torch."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

import grpc
import numpy.typing as npt

from gradstream.client._errors import BatchRejected, from_rpc_error
from gradstream.client._models import (
    CheckpointInfo,
    ModelInfo,
    Prediction,
    StepResult,
    model_info,
    step_result,
)
from gradstream.client._outbox import BatchLike, Outbox, batch_parts
from gradstream.client._producer import ProducerStream
from gradstream.client._shm import SharedRing
from gradstream.v1 import trainer_pb2 as pb
from gradstream.v1 import trainer_pb2_grpc as pb_grpc
from gradstream.wire import from_proto, set_model_input, spec_to_proto, to_proto
from gradstream.wire.train import proto_batch

T = TypeVar("T")
Array = npt.NDArray[Any]
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# "pt2" -> "EXPORT_FORMAT_PT2": the names the SDK and the CLI take.
_EXPORT_FORMATS = {
    k.removeprefix("EXPORT_FORMAT_").lower(): k for k, v in pb.ExportFormat.items() if v
}


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

    def create_model(
        self,
        name: str,
        spec: Mapping[str, Any],
        program: bytes | str | os.PathLike[str] | None = None,
    ) -> ModelInfo:
        """Create a model from a spec dict (the JSON shape of ``gradstream.v1.ModelSpec``).

        ``program``: for architecture ``exported``, the ``torch.export`` archive as bytes
        (``export_module``'s) or the path of a file holding them (``torch.export.save``).
        ``in_features`` and ``out_features`` may be left out: the server reads them from it.
        """
        if program is not None and not isinstance(program, bytes):
            program = Path(program).read_bytes()
        request = pb.CreateModelRequest(name=name, spec=spec_to_proto(spec), program=program or b"")
        return model_info(self._call(self._stub.CreateModel, request).model)

    def get_model(self, name: str) -> ModelInfo:
        """Spec, step, device, inputs, parameter shapes, frozen set, autograd chain of a model."""
        return model_info(self._call(self._stub.GetModel, pb.GetModelRequest(name=name)).model)

    def list_models(self) -> list[ModelInfo]:
        """Every model on the server."""
        response = self._call(self._stub.ListModels, pb.ListModelsRequest())
        return [model_info(m) for m in response.models]

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
        return model_info(self._call(self._stub.UpdateModel, request).model)

    # -- inference and inspection -------------------------------------------------------

    @overload
    def predict(
        self, name: str, x_or_inputs: Any, *, with_step: Literal[False] = False
    ) -> Array: ...
    @overload
    def predict(self, name: str, x_or_inputs: Any, *, with_step: Literal[True]) -> Prediction: ...
    def predict(
        self, name: str, x_or_inputs: Any, *, with_step: bool = False
    ) -> Array | Prediction:
        """The model's output (inference mode, nothing recorded); with ``with_step``, a
        ``Prediction``: the output and the step of the parameters it was computed with.

        ``x_or_inputs``: an array for a model with the single input ``x``, or a dict
        name -> array of the model's named inputs (``get_model(name).inputs``).
        """
        request = pb.PredictRequest(name=name)
        set_model_input(request, x_or_inputs)
        response = self._call(self._stub.Predict, request)
        y = from_proto(response.y, "y")
        return Prediction(y, response.step) if with_step else y

    def gradients(
        self,
        name: str,
        x_or_inputs: Any,
        y: Any = None,
        grad_output: Any = None,
        sample_weight: Any = None,
    ) -> dict[str, Array]:
        """Gradients of the loss on (x, y), or with ``grad_output`` = v the vector-Jacobian
        product v^T J of the model output (the notebook's ``y.backward(vector)``). Nothing steps.

        ``x_or_inputs`` is an array or a dict of named inputs, as for ``predict``.
        """
        request = pb.ComputeGradientsRequest(name=name)
        set_model_input(request, x_or_inputs)
        if y is not None:
            to_proto(y, request.y)
        if grad_output is not None:
            to_proto(grad_output, request.grad_output)
        if sample_weight is not None:
            to_proto(sample_weight, request.sample_weight)
        response = self._call(self._stub.ComputeGradients, request)
        return {n: from_proto(t, f"gradients[{n}]") for n, t in response.gradients.items()}

    # -- evaluation and export ------------------------------------------------------------

    def evaluate(
        self,
        name: str,
        batches: Iterable[BatchLike],
        top_k: Sequence[int] = (),
        *,
        message_bytes: int = 4 * 1024 * 1024,
    ) -> dict[str, float]:
        """The model's loss and task metrics on ``(x, y[, sample_weight])`` batches; no step.

        ``x`` is an array or a dict of named inputs, as for ``train``. Returns ``loss``
        (weighted and reduced as training does), the metrics of the model's task
        (docs/evaluation.md), ``step`` (the step it was taken at) and ``rows``. ``top_k``
        asks a multiclass model for top-k accuracy too.
        """
        failed: list[BaseException] = []  # the caller's batches failed: that is the error

        def requests() -> Iterator[pb.EvaluateRequest]:
            message = pb.EvaluateRequest(open=pb.EvaluateOpen(model=name, top_k=list(top_k)))
            try:
                for index, batch in enumerate(batches):
                    if not isinstance(batch, tuple | list) or len(batch) not in (2, 3):
                        raise TypeError(
                            f"batch {index}: expected (x, y) or (x, y, sample_weight), x an "
                            f"array or a dict of named inputs; got {type(batch).__name__}"
                        )
                    message.batches.append(proto_batch(batch_parts(batch, index)))
                    if message.ByteSize() >= message_bytes:
                        yield message
                        message = pb.EvaluateRequest()
            except Exception as exc:
                # Raised here, gRPC would log it and say only "Exception iterating
                # requests!": end the stream instead, and raise it in the caller's thread.
                failed.append(exc)
                return
            yield message

        try:
            response = self._stub.Evaluate(requests())
        except grpc.RpcError as exc:
            if failed:
                raise failed[0] from None
            raise from_rpc_error(exc) from None
        if failed:
            raise failed[0]
        return {
            "loss": response.loss,
            **dict(response.metrics),
            "step": response.step,
            "rows": response.rows,
        }

    def export(self, name: str, format: str, path: str | Path) -> list[Path]:
        """Export the model as ``safetensors``, ``pt2``, ``onnx`` or ``triton`` into ``path``.

        ``path`` is the file for the single-file formats, and the model repository folder
        (created if missing) for ``triton``. Returns the files written. The files are
        written as they arrive, each under a temporary name renamed once complete.
        """
        code = _EXPORT_FORMATS.get(format)
        if code is None:
            known = ", ".join(_EXPORT_FORMATS)
            raise ValueError(f"format: {format!r} is not an export format; give one of {known}")
        request = pb.ExportModelRequest(name=name, format=code)
        target = Path(path)
        written: list[Path] = []
        single = format != "triton"
        current: Any = None
        try:
            for chunk in self._stub.ExportModel(request):
                if chunk.path:
                    if current is not None:
                        written.append(_finish(current))
                        current = None
                    if single and written:
                        raise ValueError(f"the server sent more than one file for {format}")
                    file = target if single else _inside(target, chunk.path)
                    file.parent.mkdir(parents=True, exist_ok=True)
                    current = open(file.with_name(f".{file.name}.part"), "wb")  # noqa: SIM115
                if current is None:
                    raise ValueError("the server sent data before naming its file")
                current.write(chunk.data)
            if current is not None:
                written.append(_finish(current))
                current = None
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            if current is not None:
                current.close()
                Path(current.name).unlink(missing_ok=True)
        return written

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
        return model_info(self._call(self._stub.SetParameters, request).model)

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

        ``x`` is an array for a model with the single input ``x``, or a dict name -> array
        of the model's named inputs (``get_model(name).inputs``), e.g.
        ``({"user": user_ids, "item": item_ids, "dense": features}, clicks)``.
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
        The packing, window and shared-memory options mean the same on both paths.
        """
        if producer_id:
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
                max_message_bytes=self.max_message_bytes,
                window=window,
                window_bytes=window_bytes,
                shared_memory=shared_memory,
                max_pending_batches=max_pending_batches,
                max_pending_bytes=max_pending_bytes,
                reconnect_timeout=reconnect_timeout,
                wait_durable=wait_durable,
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
        outbox = Outbox(
            batches,
            batches_per_message=batches_per_message,
            message_bytes=message_bytes,
            max_message_bytes=self.max_message_bytes,
            ring=ring,
        )
        opener = pb.TrainRequest(
            open=pb.TrainOpen(
                model=name, report_every=report_every, shared_memory=ring.name if ring else ""
            )
        )
        sending = outbox.sending(opener, window, window_bytes)
        outbox.start()
        responses: Any = self._train_call(sending.requests())
        try:
            for response in responses:
                if response.results:
                    sending.acked()
                for r in response.results:
                    result = step_result(r)
                    if result.outcome == "REJECTED" and not skip_rejected:
                        raise BatchRejected(result)
                    yield result
        except grpc.RpcError as exc:
            outbox.raise_error()
            raise from_rpc_error(exc) from None
        finally:
            responses.cancel()
            outbox.stop()
            if ring is not None:
                ring.close()
        outbox.raise_error()


def _serialize_train(request: pb.TrainRequest | bytes) -> bytes:
    return request if isinstance(request, bytes) else request.SerializeToString()


def _inside(root: Path, relative: str) -> Path:
    """``root / relative``, refusing a path from the server that would leave ``root``."""
    parts = relative.split("/")
    if relative.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"the server sent an unsafe export path {relative!r}")
    return root.joinpath(*parts)


def _finish(file: Any) -> Path:
    """Close a ``.NAME.part`` file and rename it to NAME: a complete file or none."""
    file.close()
    part = Path(file.name)
    final = part.with_name(part.name.removeprefix(".").removesuffix(".part"))
    part.replace(final)
    return final


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
