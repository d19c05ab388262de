"""Bearer tokens: who may do what to which models, read from a file.

The file has one token per line, ``#`` starts a comment::

    # token                         models                   actions
    4f1c0a...e9                     *                        admin
    b7d2...31                       fraud-*,churn            train,read
    0c9e...aa                       fraud-v2                 predict

``models`` is a comma-separated list of names or globs (``fnmatch``, case-sensitive).
``actions`` is a comma-separated subset of ``train``, ``predict``, ``read`` and
``admin``; ``admin`` includes the other three. Tokens are kept only as SHA-256
digests and compared with ``hmac.compare_digest`` against every entry, so neither
memory dumps nor timing tell a token.
"""

from __future__ import annotations

import hashlib
import hmac
from contextvars import ContextVar
from dataclasses import dataclass
from enum import StrEnum
from fnmatch import fnmatchcase
from pathlib import Path


class Action(StrEnum):
    """What a token may do; every RPC needs exactly one (see ``RPC_ACTIONS``)."""

    TRAIN = "train"
    PREDICT = "predict"
    READ = "read"
    ADMIN = "admin"


# Every TrainerService method and the action it needs. A method missing here
# (one added later) needs admin: new RPCs are closed until someone opens them.
RPC_ACTIONS: dict[str, Action] = {
    "CreateModel": Action.ADMIN,
    "DeleteModel": Action.ADMIN,
    "UpdateModel": Action.ADMIN,
    "SetParameters": Action.ADMIN,
    "SaveCheckpoint": Action.TRAIN,  # a producer makes its own work durable (SDK buffer)
    "Train": Action.TRAIN,
    "Predict": Action.PREDICT,
    "ComputeGradients": Action.PREDICT,
    "GetModel": Action.READ,
    "ListModels": Action.READ,
    "GetParameters": Action.READ,
}
MIN_TOKEN_LENGTH = 16


class TokenFileError(ValueError):
    """The token file is malformed; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class Grant:
    """What one token may do: actions on the models matching any of the patterns."""

    digest: bytes
    models: tuple[str, ...]
    actions: frozenset[Action]
    line: int

    def allows(self, action: Action, model: str) -> bool:
        """True when this grant covers ``action`` on ``model``."""
        if action not in self.actions and Action.ADMIN not in self.actions:
            return False
        return any(fnmatchcase(model, pattern) for pattern in self.models)


# The grant of the RPC being handled, set by the auth interceptor for the handler's task;
# None where auth is off. The servicer reads it where an answer depends on the caller.
CALLER: ContextVar[Grant | None] = ContextVar("gradstream_caller", default=None)


def may_read(model: str) -> bool:
    """Whether the caller of the RPC being handled may read ``model`` (always, auth off)."""
    grant = CALLER.get()
    return grant is None or grant.allows(Action.READ, model)


def digest(token: str) -> bytes:
    """The SHA-256 of a token: what is stored and compared."""
    return hashlib.sha256(token.encode()).digest()


class TokenStore:
    """The grants of a token file; ``find`` is constant-time in the token's content."""

    def __init__(self, grants: list[Grant]) -> None:
        self.grants = grants

    @classmethod
    def load(cls, path: Path) -> TokenStore:
        """Parse a token file; a malformed line raises TokenFileError naming the line."""
        return cls.parse(path.read_text(), str(path))

    @classmethod
    def parse(cls, text: str, source: str = "tokens") -> TokenStore:
        """Parse the text of a token file (format in the module docstring)."""
        grants: list[Grant] = []
        seen: set[bytes] = set()
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            where = f"{source}:{number}"
            parts = line.split()
            if len(parts) != 3:
                raise TokenFileError(
                    f"{where}: expected TOKEN MODELS ACTIONS, got {len(parts)} fields"
                )
            token, models, actions = parts
            if len(token) < MIN_TOKEN_LENGTH:
                raise TokenFileError(f"{where}: tokens need at least {MIN_TOKEN_LENGTH} characters")
            try:
                allowed = frozenset(Action(a) for a in actions.split(",") if a)
            except ValueError:
                known = ", ".join(a.value for a in Action)
                raise TokenFileError(
                    f"{where}: actions {actions!r} must be among {known}"
                ) from None
            patterns = tuple(m for m in models.split(",") if m)
            if not allowed or not patterns:
                raise TokenFileError(f"{where}: no models or no actions")
            key = digest(token)
            if key in seen:
                raise TokenFileError(f"{where}: the same token is listed twice")
            seen.add(key)
            grants.append(Grant(key, patterns, allowed, number))
        if not grants:
            raise TokenFileError(f"{source}: has no tokens")
        return cls(grants)

    def find(self, token: str) -> Grant | None:
        """The grant of a token, or None. Every entry is compared, found or not."""
        key = digest(token)
        found: Grant | None = None
        for grant in self.grants:
            if hmac.compare_digest(grant.digest, key):
                found = grant
        return found
