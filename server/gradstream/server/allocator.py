"""The C allocator setting of a server process (no torch here: set before it loads)."""

from __future__ import annotations

import ctypes
import os
import platform


def tune_allocator() -> None:
    """Keep freed large blocks for reuse instead of returning them to the kernel (glibc).

    Every Train message arrives as a fresh multi-megabyte ``bytes``; by default glibc
    maps each one anew and unmaps it when freed, paying a page fault per 4 KiB. Raising
    the mmap and trim thresholds lets the heap reuse the same pages. Left alone where
    the operator tuned malloc already, and off glibc.
    """
    if any(k.startswith("MALLOC_") for k in os.environ) or "GLIBC_TUNABLES" in os.environ:
        return
    if platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest allowed value
    libc.mallopt(m_trim_threshold, 256 << 20)
