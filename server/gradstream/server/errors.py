"""The exceptions the service raises, each carrying its gRPC status code.

    GradstreamError                 INTERNAL (message sanitized on the wire)
    ├── InvalidArgument             INVALID_ARGUMENT: bad spec, dtype, shape, NaN/Inf, empty batch
    ├── NotFound                    NOT_FOUND: unknown model
    ├── AlreadyExists               ALREADY_EXISTS: model name taken
    ├── ResourceExhausted           RESOURCE_EXHAUSTED: a limit, device out of memory
    ├── FailedPrecondition          FAILED_PRECONDITION: model diverged
    ├── Unavailable                 UNAVAILABLE: draining or restoring
    ├── DataLoss                    DATA_LOSS: corrupt checkpoint
    ├── Unauthenticated             UNAUTHENTICATED: bad token
    └── PermissionDenied            PERMISSION_DENIED: token not allowed here

Codes are names of ``grpc.StatusCode`` members, not the members themselves, so
the engine can raise these without importing grpc; ``interceptors.py`` maps them.
"""

from __future__ import annotations

from typing import ClassVar


class GradstreamError(Exception):
    """Base of every error the service reports to a client."""

    code: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(GradstreamError):
    """The request is malformed; ``field`` names what was wrong."""

    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class NotFound(GradstreamError):
    """No model of that name."""

    code = "NOT_FOUND"


class AlreadyExists(GradstreamError):
    """A model of that name exists already."""

    code = "ALREADY_EXISTS"


class ResourceExhausted(GradstreamError):
    """A configured limit or the device's memory was exceeded."""

    code = "RESOURCE_EXHAUSTED"


class FailedPrecondition(GradstreamError):
    """The model cannot do this in its current state."""

    code = "FAILED_PRECONDITION"


class Unavailable(GradstreamError):
    """The server is draining or restoring; retry elsewhere or later."""

    code = "UNAVAILABLE"


class DataLoss(GradstreamError):
    """Stored state is corrupt."""

    code = "DATA_LOSS"


class Unauthenticated(GradstreamError):
    """Missing or unknown credentials."""

    code = "UNAUTHENTICATED"


class PermissionDenied(GradstreamError):
    """The credentials do not allow this action on this model."""

    code = "PERMISSION_DENIED"
