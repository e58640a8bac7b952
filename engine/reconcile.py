"""What a file really holds after a journaled change of it failed part way.

Live capture journals a change before making it. When the change then fails (a write
that stopped short, a truncate or fallocate the file system refused), the journal holds
a record of something that happened only in part or not at all. The records from
:func:`truth_records`, appended after it, override it: the file's real size, then the
real content of the range, so the replica converges to the source again.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import Final

from replicator.engine.volumes import pread_all
from replicator.journal import Record

CHUNK: Final = 16 * 1024 * 1024  # bytes per WRITE record while reconciling


def truth_records(
    fd: int, name: str, offset: int, length: int, known_size: int | None = None
) -> Iterator[Record]:
    """RESIZE to the real size (unless it is ``known_size``), then WRITEs of the range.

    Read lazily, a chunk per record. Raises OSError when the range cannot be read back.
    """
    size = os.fstat(fd).st_size
    if size != known_size:
        yield Record.resize(name, size)
    pos, stop = offset, min(offset + length, size)
    while pos < stop:
        want = min(stop - pos, CHUNK)
        data = pread_all(fd, want, pos)
        if len(data) != want:
            raise OSError(errno.EIO, f"short read at {pos} of {name} while reconciling")
        yield Record.write(name, pos, data)
        pos += want
