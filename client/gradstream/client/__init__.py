"""The gradstream Python SDK: ``Client`` talks to a gradstream server over gRPC."""

from gradstream.client._client import Client
from gradstream.client._errors import (
    AlreadyExists,
    BatchRejected,
    DataLoss,
    FailedPrecondition,
    GradstreamError,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from gradstream.client._export import export_module
from gradstream.client._models import (
    CheckpointInfo,
    InputInfo,
    ModelInfo,
    ParameterInfo,
    Prediction,
    StepResult,
)
from gradstream.client._producer import ProducerStream
from gradstream.wire import SpecError

__all__ = [
    "AlreadyExists",
    "BatchRejected",
    "CheckpointInfo",
    "Client",
    "DataLoss",
    "FailedPrecondition",
    "GradstreamError",
    "InputInfo",
    "Internal",
    "InvalidArgument",
    "ModelInfo",
    "NotFound",
    "ParameterInfo",
    "PermissionDenied",
    "Prediction",
    "ProducerStream",
    "ResourceExhausted",
    "SpecError",
    "StepResult",
    "Unauthenticated",
    "Unavailable",
    "export_module",
]
