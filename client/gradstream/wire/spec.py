"""Model specs as plain dicts <-> ``gradstream.v1.ModelSpec``.

The proto mirrors the dict field for field, so the conversion is structural:
unknown keys are refused here, values are validated by the server.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf.message import Message

from gradstream.v1 import trainer_pb2 as pb
from gradstream.wire.tensor import from_proto, to_proto


class SpecError(ValueError):
    """A spec dict that does not fit the wire format; ``field`` is its dotted path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def spec_to_proto(spec: Mapping[str, Any]) -> pb.ModelSpec:
    """Build the message from a spec dict (tensors may be numpy arrays or lists)."""
    message = pb.ModelSpec()
    _fill(message, spec, "spec")
    return message


def spec_from_proto(message: pb.ModelSpec) -> dict[str, Any]:
    """The spec as a plain dict holding the fields that are set; tensors as numpy arrays."""
    return _to_dict(message, "spec")


def _is_struct(fd: Any) -> bool:
    return fd.message_type is not None and fd.message_type.full_name == "google.protobuf.Struct"


def _is_map(fd: Any) -> bool:
    return fd.message_type is not None and fd.message_type.GetOptions().map_entry


def _fill(message: Message, data: Mapping[str, Any], path: str) -> None:
    if not isinstance(data, Mapping):
        raise SpecError(path, f"expected an object, got {data!r}")
    fields = message.DESCRIPTOR.fields_by_name
    for key, value in data.items():
        where = f"{path}.{key}"
        fd = fields.get(key)
        if fd is None:
            raise SpecError(where, f"unknown field; {path} has {', '.join(fields)}")
        if value is None:
            continue
        target = getattr(message, key)
        try:
            if _is_struct(fd):
                target.update(value)
            elif _is_map(fd):  # name -> Tensor
                for name, array in value.items():
                    to_proto(array, target[name])
            elif fd.message_type is not None and fd.is_repeated:  # e.g. schedule.schedulers
                for i, item in enumerate(value):
                    _fill(target.add(), item, f"{where}[{i}]")
            elif fd.message_type is not None:
                _fill(target, value, where)
            elif fd.is_repeated:
                target.extend(value)
            else:
                setattr(message, key, value)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, SpecError):
                raise
            raise SpecError(where, f"{value!r} does not fit: {exc}") from None


def _to_dict(message: Message, path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for fd, value in message.ListFields():
        if _is_struct(fd):
            out[fd.name] = {k: _plain(v) for k, v in value.items()}
        elif _is_map(fd):
            out[fd.name] = {k: from_proto(v, f"{path}.{fd.name}[{k}]") for k, v in value.items()}
        elif fd.message_type is not None and fd.is_repeated:
            out[fd.name] = [_to_dict(v, f"{path}.{fd.name}[{i}]") for i, v in enumerate(value)]
        elif fd.message_type is not None:
            out[fd.name] = _to_dict(value, f"{path}.{fd.name}")
        elif fd.is_repeated:
            out[fd.name] = list(value)
        else:
            out[fd.name] = value
    return out


def _plain(value: Any) -> Any:
    """Struct values come back as protobuf containers; turn them into dicts and lists."""
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "__iter__") and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value
