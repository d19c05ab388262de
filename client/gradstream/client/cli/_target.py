"""The server a command talks to: checking ``--target`` and explaining a wrong one."""

from __future__ import annotations

import grpc

from gradstream.client._errors import GradstreamError

# The target of the command running now, for hints in error messages.
_current = {"target": "", "tls": False}


class ConnectionBroke(Exception):
    """The server went away in the middle of a command that had been working."""

    def __init__(self, exc: GradstreamError, done: str) -> None:
        super().__init__(
            f"{exc}; the connection to {_current['target']} broke after {done}: did the "
            "server stop? (with --producer-id a run reconnects, and a re-run resumes)"
        )


def check_target(target: str) -> str:
    """``target`` if it names a port; an error otherwise (gRPC would silently pick 443)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return target
    host, colon, port = target.rpartition(":")
    if not colon or not host or not port.isdigit() or host.endswith(":"):
        raise ValueError(f"{target!r}: give HOST:PORT, such as 127.0.0.1:50051")
    return target


def remember(target: str, tls: bool) -> None:
    """Note the target being used, for ``explain``."""
    _current.update(target=target, tls=tls)


def explain(exc: GradstreamError) -> str:
    """The error's one line, with a hint where the answer suggests a wrong target."""
    target, tls = str(_current["target"]), bool(_current["tls"])
    details = exc.details
    listening = f"is a gradstream server listening on {target}?"
    if exc.code == grpc.StatusCode.UNIMPLEMENTED and "Method not found" in details:
        return (
            f"{exc}; {listening} Something answers there but not the gradstream API "
            "(the health port is not the API port: --port is)"
        )
    if exc.code == grpc.StatusCode.UNAVAILABLE:
        if "HTTP/2" in details or "http2" in details.lower():
            return (
                f"{exc}; {listening} That port does not speak gRPC "
                "(the metrics port is not the API port)"
            )
        if not tls and ("Socket closed" in details or "ssl" in details.lower()):
            return f"{exc}; {listening} If the server wants TLS, pass --ca (or --tls)"
        if tls and ("handshake" in details.lower() or "ssl" in details.lower()):
            return f"{exc}; does the server at {target} serve TLS with a certificate --ca trusts?"
        if "Connection refused" in details or "failed to connect" in details.lower():
            return f"{exc}; {listening}"
    return str(exc)
