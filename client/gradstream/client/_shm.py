"""A shared-memory ring for producers on the server's own host.

Batches are written into a POSIX shared-memory segment and Train messages carry
only (offset, length) references, so the bytes never pass through gRPC. Space
is handed out in order and given back when the server acknowledges the message
that used it: until then the server may still be reading it.
"""

from __future__ import annotations

import secrets
import threading
from multiprocessing import shared_memory
from typing import Any

import numpy as np
import numpy.typing as npt

from gradstream.wire import ALIGN


class RingFull(Exception):
    """Not enough free space right now; the caller sends what it has, then waits."""


class SharedRing:
    """A circular buffer in a shared-memory segment; space is freed in order."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.segment = shared_memory.SharedMemory(
            create=True, size=size, name=f"gradstream-{secrets.token_hex(8)}"
        )
        self.name = self.segment.name.lstrip("/")
        self._head = 0  # bytes ever handed out (a position modulo size)
        self._tail = 0  # bytes ever given back
        self._freed = threading.Condition()

    def mark(self) -> int:
        """The position after everything handed out so far (give it back with ``release``)."""
        return self._head

    def reserve(self, nbytes: int) -> int:
        """Hand out ``nbytes`` contiguous bytes; raises RingFull if they are not free now."""
        if nbytes > self.size:
            raise ValueError(
                f"a batch of {nbytes} bytes does not fit the {self.size}-byte shared-memory ring"
            )
        with self._freed:
            start = self._head
            if start % self.size + nbytes > self.size:  # would wrap: skip to the start
                start += self.size - start % self.size
            if start + nbytes - self._tail > self.size:
                raise RingFull
            self._head = start + nbytes
        return start % self.size

    def release(self, mark: int) -> None:
        """Everything before ``mark`` may be reused."""
        with self._freed:
            self._tail = max(self._tail, mark)
            self._freed.notify_all()

    def wait(self, timeout: float) -> None:
        """Block until some space is given back (or ``timeout``)."""
        with self._freed:
            self._freed.wait(timeout)

    def put(self, arrays: list[npt.NDArray[Any]]) -> tuple[list[tuple[int, int]], int]:
        """Copy arrays into the ring: their (offset, length) places and the ring bytes used."""
        sizes = [-(-a.nbytes // ALIGN) * ALIGN for a in arrays]  # each array starts aligned
        start = self.reserve(sum(sizes))
        view = self.segment.buf
        assert view is not None
        places = []
        offset = start
        for array, size in zip(arrays, sizes, strict=True):
            target = np.ndarray(array.shape, array.dtype, buffer=view, offset=offset)
            target[...] = array
            places.append((offset, array.nbytes))
            offset += size
        return places, sum(sizes)

    def close(self) -> None:
        """Unmap and remove the segment."""
        self.segment.close()
        self.segment.unlink()
