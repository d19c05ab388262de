"""Who may connect, and how: the token policy and the TLS credentials of the gRPC port."""

from __future__ import annotations

import contextvars
import ipaddress
from pathlib import Path
from typing import Any

import grpc

from gradstream.server.config import Settings
from gradstream.server.tokens import TokenStore


class StartupRefused(ValueError):
    """The settings would expose the server unsafely, or name unreadable credentials."""


# ingest=process: the front proves itself to the backend with this metadata key (the secret),
# and tells it who the client is with the other; a client's own copies never get through.
INTERNAL_SECRET = "x-gradstream-internal"
FORWARDED_PEER = "x-gradstream-peer"
# The client's address as the front saw it; set only for a call that carried the secret.
_FORWARDED: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "gradstream_forwarded_peer", default=None
)


def set_forwarded_peer(peer: str | None) -> None:
    """Record the peer the front vouched for, for this call (the secret interceptor's job)."""
    _FORWARDED.set(peer)


def peer(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The client's address: the front's word for it behind a front, else the connection's.

    Every security decision about where a client is (shared memory is for this host only)
    asks here, not ``context.peer()``: behind a front, the connection is the front's.
    """
    forwarded = _FORWARDED.get()
    return forwarded if forwarded is not None else context.peer()


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches: 127.0.0.0/8, ::1, localhost."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


# What a front adds to a client's headers: the secret and the client's address.
FRONT_METADATA_BYTES = 1024


def server_options(settings: Settings, *, behind_front: bool = False) -> list[tuple[str, Any]]:
    """The gRPC options of the public port (ingest=process: the front's; ``behind_front``: the
    backend's, which takes what the front adds to the headers)."""
    limit = settings.max_message_bytes
    return [
        # Over-limit messages are refused by gRPC itself with RESOURCE_EXHAUSTED.
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        # Two servers silently sharing a port would split one model's streams.
        ("grpc.so_reuseport", 0),
        # Keepalive: ping a silent client after keepalive_time and drop it when the
        # ping goes unanswered, so a vanished producer frees its stream slot.
        ("grpc.keepalive_time_ms", int(settings.keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout * 1000)),
        # Training streams are often quiet between batches: allow pings then too.
        ("grpc.keepalive_permit_without_calls", 1),
        # A client pinging faster than this is flooding: after two strikes, GOAWAY.
        (
            "grpc.http2.min_ping_interval_without_data_ms",
            int(settings.keepalive_min_ping_interval * 1000),
        ),
        ("grpc.http2.max_ping_strikes", 2),
        # Headers (the bearer token among them) are small; 16 KiB bounds what a
        # client can make the server buffer before any handler runs.
        ("grpc.max_metadata_size", 16 * 1024 + (FRONT_METADATA_BYTES if behind_front else 0)),
    ]


def load_tokens(settings: Settings) -> TokenStore | None:
    """The token store, or None where auth is off; refuses unsafe exposure.

    Auth is on whenever a tokens file is given. Without one the server only listens
    on loopback, unless ``insecure`` says the operator wants an open port.
    """
    if settings.tokens_file is not None:
        try:
            return TokenStore.load(settings.tokens_file)
        except OSError as exc:
            raise StartupRefused(
                f"tokens_file: cannot read {settings.tokens_file}: {exc}"
            ) from None
    if not is_loopback(settings.host) and not settings.insecure:
        raise StartupRefused(
            f"refusing to listen on {settings.host} without tokens: anyone who reaches the "
            "port could change or delete models. Give --tokens-file (see docs/security.md), "
            "or --insecure to run without authentication."
        )
    return None


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StartupRefused(f"{what}: cannot read {path}: {exc}") from None


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS for the gRPC port, or None for plaintext; a CA turns on mutual TLS."""
    if settings.tls_cert is None and settings.tls_key is None:
        if settings.metrics_tls:
            raise StartupRefused("metrics_tls needs tls_cert and tls_key")
        if settings.tls_ca is not None:
            raise StartupRefused("tls_ca needs tls_cert and tls_key (the server's own TLS)")
        return None
    if settings.tls_cert is None or settings.tls_key is None:
        raise StartupRefused("tls_cert and tls_key go together")
    ca = None if settings.tls_ca is None else _read(settings.tls_ca, "tls_ca")
    return grpc.ssl_server_credentials(
        [(_read(settings.tls_key, "tls_key"), _read(settings.tls_cert, "tls_cert"))],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )
