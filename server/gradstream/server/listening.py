"""Who may connect, and how: the token policy and the TLS credentials of the gRPC port."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import grpc

from gradstream.server.config import Settings
from gradstream.server.tokens import TokenStore


class StartupRefused(ValueError):
    """The settings would expose the server unsafely, or name unreadable credentials."""


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches: 127.0.0.0/8, ::1, localhost."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


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
