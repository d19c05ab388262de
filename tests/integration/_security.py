"""Certificates and token files for the security tests: made fresh by ``trustme``, never mocked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme

ADMIN = "admin-token-0123456789abcdef"
READER = "reader-token-0123456789abcdef"  # read on alpha*
OTHER = "other-token-0123456789abcdef"  # everything on beta*
TRAINER = "trainer-token-0123456789abcdef"  # train and predict on alpha*
TOKENS = f"""\
# token                          models     actions
{ADMIN}    *          admin
{READER}   alpha*     read
{OTHER}    beta*      admin
{TRAINER}  alpha*     train,predict   # a producer
"""


@dataclass(frozen=True)
class Pki:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, as files."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    tokens: Path


def make_pki(directory: Path) -> Pki:
    """Write a fresh CA, server and client certificates and a token file into ``directory``."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("producer@example.test")
    paths = Pki(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        tokens=directory / "tokens",
    )
    ca.cert_pem.write_to_path(str(paths.ca))
    server.private_key_pem.write_to_path(str(paths.server_key))
    with paths.server_cert.open("wb") as f:
        for blob in server.cert_chain_pems:
            f.write(blob.bytes())
    client.private_key_pem.write_to_path(str(paths.client_key))
    with paths.client_cert.open("wb") as f:
        for blob in client.cert_chain_pems:
            f.write(blob.bytes())
    paths.tokens.write_text(TOKENS)
    paths.tokens.chmod(0o600)
    return paths
