"""Which torch device a server trains on, from the ``device`` setting."""

from __future__ import annotations

import torch

from gradstream.server.errors import InvalidArgument


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU; ``cuda:N`` must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InvalidArgument(
            "device", f"{name!r} is not a device (auto, cpu, cuda, cuda:N)"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgument("device", f"{name!r} asked for, but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidArgument(
                "device", f"{name!r}: only {torch.cuda.device_count()} CUDA devices here"
            )
    elif device.type != "cpu":
        raise InvalidArgument("device", f"{name!r} is not supported (auto, cpu, cuda, cuda:N)")
    return device
