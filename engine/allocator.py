"""Keep freed bulk buffers in the process instead of handing them back to the kernel.

Replication moves data in buffers of 64 KiB to a few MiB (read chunks, records, frames),
each allocated, filled once and freed. glibc serves allocations above its mmap threshold
(128 KiB at start, raised only as far as the largest chunk freed so far) with a fresh
``mmap`` and returns them with ``munmap``; it also trims the heap's top whenever more
than twice that much is free. Every such buffer then costs a page fault per 4 KiB and
the kernel zeroing the page: a 1 GiB first sync took ~320,000 faults and 1.9 s of system
time in the sender alone, more than its reads and its socket writes together.

Raising both thresholds makes glibc reuse freed memory: the same sync takes ~20,000
faults and 0.55 s of system time, with the same peak RSS (the buffers in flight are
bounded by the link's queue and credit window either way; bench/RESULTS.md).

The command line calls :func:`keep_freed_buffers` for every command that runs the
engine. It is process-wide, so the engine never calls it for an embedding program;
docs/EMBEDDING.md recommends it. A ``GLIBC_TUNABLES`` setting of the operator's wins.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1  # malloc.h
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's maximum on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 128 * 1024 * 1024


def keep_freed_buffers() -> bool:
    """Set glibc's mmap and trim thresholds for bulk buffers; True when both were set.

    A no-op (False) off Linux, on a C library without ``mallopt`` (musl ignores it too)
    and when ``GLIBC_TUNABLES`` already sets malloc parameters.
    """
    if not sys.platform.startswith("linux") or "glibc.malloc." in os.environ.get(
        "GLIBC_TUNABLES", ""
    ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
