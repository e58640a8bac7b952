"""Which extents of a volume a scan reads, in which pieces, and how the pieces are dealt to
its hashing helpers.

Kept apart from ``volumes.py`` so that ``early_hashing.py`` can plan a scan's hashing
before the engine is imported (it imports the standard library only): both ask these
functions, so the early helpers are asked exactly what the scan would ask them.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import Final

DEFAULT_EXTENT: Final = 64 * 1024
READ_CHUNK: Final = 4 * 1024 * 1024
# Below this size the threads of ``volumes.iter_extents`` finish before two helpers have
# started (a helper takes 25-40 ms to start here; a threaded scan of 128 MiB takes 50-100 ms).
HELPER_MIN_SIZE: Final = 128 * 1024 * 1024
HELPERS: Final = 2

Plan = list[tuple[bool, int, int]]  # (read?, first extent, extent count), in order
Run = tuple[int, int]  # (first extent, extent count) that a helper hashes


def data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """Allocated (start, end) ranges via SEEK_DATA/SEEK_HOLE (the whole file if unsupported)."""
    ranges: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            if end > start:
                ranges.append((start, end))
            pos = end
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return [(0, size)] if size else []
        raise
    return ranges


def plan_reads(
    ranges: list[tuple[int, int]], size: int, extent_size: int, first: int = 0
) -> Iterator[tuple[bool, int, int]]:
    """(read?, first extent, extent count) jobs from extent ``first`` on: holes are never
    read, data in chunks."""
    n_extents = (size + extent_size - 1) // extent_size
    chunk_extents = max(1, READ_CHUNK // extent_size)
    r = 0
    idx = first
    while idx < n_extents:
        off = idx * extent_size
        length = min(extent_size, size - off)
        while r < len(ranges) and ranges[r][1] <= off:
            r += 1
        if r >= len(ranges) or ranges[r][0] >= off + length:
            next_data = ranges[r][0] if r < len(ranges) else size
            last = min(n_extents, max(idx + 1, next_data // extent_size))
            yield False, idx, last - idx
            idx = last
            continue
        range_extents = (ranges[r][1] - off + extent_size - 1) // extent_size
        count = min(chunk_extents, n_extents - idx, range_extents)  # stop where the data ends
        yield True, idx, count
        idx += count


def deal(runs: list[Run], parts: int) -> list[list[Run]]:
    """``runs`` dealt out in turns to at most ``parts`` helpers (empty hands left out):
    each hashes every ``parts``-th run, so all of them work near where the scan is."""
    return [hand for hand in (runs[k::parts] for k in range(parts)) if hand]


def helper_plan(fd: int, size: int, extent_size: int, helpers: int) -> tuple[Plan, list[list[Run]]]:
    """The scan's plan for ``fd`` and the runs it reads, dealt to ``helpers`` helpers (no
    hands when nothing is allocated)."""
    plan = list(plan_reads(data_ranges(fd, size), size, extent_size))
    return plan, deal([(first, count) for read, first, count in plan if read], helpers)
