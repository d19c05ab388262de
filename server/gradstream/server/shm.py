"""Reading a local producer's shared-memory segment (``TrainOpen.shared_memory``).

The segment is never mapped: a producer can shrink a file under a mapping, and a
read past its new end is a SIGBUS that kills the server. Each tensor is copied out
with ``preadv``, straight into the buffer the batch's tensor then uses; a read comes
back short when the file shrank: that batch is refused, nothing faults. The copy is
also what is checked and then trained, so rewriting the segment after a batch was
sent cannot slip bytes past the checks (docs/decisions.md, "Shared memory is read,
never mapped").
"""

from __future__ import annotations

import os
import re
import stat
import weakref

import numpy as np

from gradstream.server.errors import InvalidArgument, PermissionDenied

_NAME = re.compile(r"gradstream-[A-Za-z0-9_-]{1,64}")
_LOCAL_PEERS = ("ipv4:127.", "ipv6:[::1]", "unix:")
_DIRECTORY = "/dev/shm"
# Non-blocking: a FIFO named like a segment would block open() until a writer came.
# No symlinks: a link to a file the server can read must not be read back through batches.
_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC


class SharedSegment:
    """A producer's segment, opened read-only; slicing it copies the bytes out.

    ``segment[a:b]`` is a writable view of a fresh buffer the bytes were read into with
    ``preadv`` (``len(segment)`` is the size at open). A segment that shrank since
    raises InvalidArgument instead of faulting.
    """

    def __init__(self, name: str, fd: int, size: int) -> None:
        self.name = name
        self._fd = fd
        self._size = size
        # Closed when the last job that may read it lets go: never under a reader,
        # so a later file cannot take the descriptor's number and be read instead.
        weakref.finalize(self, os.close, fd)

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, span: slice) -> memoryview:
        start, stop, _ = span.indices(self._size)
        length = max(0, stop - start)
        # Read straight into the buffer the batch's tensor will use: one copy, no
        # intermediate bytes, and no zero-filling (as bytearray would) of what is overwritten.
        data = np.empty(length, dtype=np.uint8).data
        done = 0
        while done < length:
            got = os.preadv(self._fd, [data[done:]], start + done)
            if got == 0:
                raise InvalidArgument(
                    "open.shared_memory",
                    f"segment {self.name!r} shrank: bytes [{start}, {stop}) are no longer in it",
                )
            done += got
        return data


def open_shared_memory(name: str, peer: str, directory: str = _DIRECTORY) -> SharedSegment:
    """Open ``/dev/shm/<name>`` for a producer on this host, without blocking.

    Only segments named ``gradstream-*`` (what the SDK creates), only for loopback
    peers, and only a regular file with one link owned by the server's user: what
    the SDK creates when producer and server run as one user. Anything else (a
    symlink, a FIFO, a hard link to another file, another user's file) is refused.
    """
    field = "open.shared_memory"
    if not peer.startswith(_LOCAL_PEERS):
        raise PermissionDenied(f"{field}: shared memory is for producers on the server's host")
    if not _NAME.fullmatch(name):
        raise InvalidArgument(field, f"{name!r} is not a gradstream segment name (gradstream-*)")
    try:
        fd = os.open(os.path.join(directory, name), _FLAGS)
    except OSError as exc:
        raise InvalidArgument(field, f"cannot open segment {name!r}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidArgument(field, f"segment {name!r} is not a regular file")
        if info.st_uid != os.geteuid():
            raise PermissionDenied(
                f"{field}: segment {name!r} is owned by uid {info.st_uid}, not by the "
                f"server's uid {os.geteuid()}"
            )
        if info.st_nlink != 1:
            raise InvalidArgument(field, f"segment {name!r} has {info.st_nlink} links, not 1")
        if info.st_size == 0:
            raise InvalidArgument(field, f"segment {name!r} is empty")
    except BaseException:
        os.close(fd)
        raise
    return SharedSegment(name, fd, info.st_size)
