"""The exceptions the SDK raises.

GradstreamError            any failed call; ``.code`` is the grpc.StatusCode
├── InvalidArgument        a bad spec, tensor or name; the message names the field
│   └── BatchRejected      one batch of a Train stream was refused (``.result`` says which)
├── NotFound
├── AlreadyExists
├── ResourceExhausted      a server limit: message size, models, streams
├── FailedPrecondition     e.g. a model that diverged
├── Unavailable            draining, restarting or unreachable
├── Unauthenticated
├── PermissionDenied
├── DataLoss
└── Internal
"""

from __future__ import annotations

from typing import ClassVar

import grpc

from gradstream.client._models import StepResult


class GradstreamError(Exception):
    """A call to the server failed; ``code`` and ``details`` are the gRPC status."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code  # type: ignore[misc]

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class InvalidArgument(GradstreamError):
    """The request was malformed."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class BatchRejected(InvalidArgument):
    """A batch in a Train stream was rejected; the model is unchanged by it."""

    def __init__(self, result: StepResult) -> None:
        super().__init__(f"batch {result.sequence} rejected: {result.reason}")
        self.result = result


class NotFound(GradstreamError):
    """No such model."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(GradstreamError):
    """The model name is taken."""

    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhausted(GradstreamError):
    """A server limit was reached."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(GradstreamError):
    """The model is not in a state to do this."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(GradstreamError):
    """The server is unreachable, draining or restoring."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(GradstreamError):
    """Missing or wrong token."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(GradstreamError):
    """The token may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class DataLoss(GradstreamError):
    """The server's stored state is corrupt."""

    code = grpc.StatusCode.DATA_LOSS


class Internal(GradstreamError):
    """A server bug; the message carries an incident id found in the server log."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[GradstreamError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        ResourceExhausted,
        FailedPrecondition,
        Unavailable,
        Unauthenticated,
        PermissionDenied,
        DataLoss,
        Internal,
    )
}


def from_rpc_error(error: grpc.RpcError) -> GradstreamError:
    """The typed exception for a failed call."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (error.details() if isinstance(error, grpc.Call) else None) or str(error)
    return _BY_CODE.get(code, GradstreamError)(details, code)
