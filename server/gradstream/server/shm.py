"""Mapping a local producer's shared-memory segment (``TrainOpen.shared_memory``)."""

from __future__ import annotations

import mmap
import os
import re

from gradstream.server.errors import InvalidArgument, PermissionDenied

_NAME = re.compile(r"^gradstream-[A-Za-z0-9_-]{1,64}$")
_LOCAL_PEERS = ("ipv4:127.", "ipv6:[::1]", "unix:")


def map_shared_memory(name: str, peer: str) -> memoryview:
    """Map ``/dev/shm/<name>`` read-only for a producer on this host.

    Only segments named ``gradstream-*`` (what the SDK creates) and only for
    loopback peers: a remote client's name would refer to nothing of its own here.
    """
    field = "open.shared_memory"
    if not peer.startswith(_LOCAL_PEERS):
        raise PermissionDenied(f"{field}: shared memory is for producers on the server's host")
    if not _NAME.match(name):
        raise InvalidArgument(field, f"{name!r} is not a gradstream segment name (gradstream-*)")
    try:
        fd = os.open(f"/dev/shm/{name}", os.O_RDONLY)
    except OSError as exc:
        raise InvalidArgument(field, f"cannot open segment {name!r}: {exc.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise InvalidArgument(field, f"segment {name!r} is empty")
        mapping = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    return memoryview(mapping)
