"""What a file really holds after a journaled change of it failed part way.

Live capture journals a change before making it. When the change then fails (a write
that stopped short, a truncate or fallocate the file system refused), the journal holds
a record of something that happened only in part or not at all. The records from
:func:`truth_records`, appended after it, override it: the file's real size, then the
real content of the range (and its allocation: zeros held allocated or as holes), so
the replica converges to the source again.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import Final

from replicator.engine.volumes import allocated_ranges, pread_all, split_by
from replicator.journal import Record

CHUNK: Final = 16 * 1024 * 1024  # bytes per record while reconciling


def truth_records(
    fd: int, name: str, offset: int, length: int, known_size: int | None = None
) -> Iterator[Record]:
    """RESIZE to the real size (unless it is ``known_size``), then the range as it is:
    WRITEs of its data, its zeros as ZERO or TRIM (allocated or a hole: ``range_records``,
    which reads no hole, so a failed allocation of a large range costs no data records).

    Read lazily, a chunk per record. Raises OSError when the range cannot be read back.
    """
    size = os.fstat(fd).st_size
    if size != known_size:
        yield Record.resize(name, size)
    pos, stop = offset, min(offset + length, size)
    for record in range_records(fd, name, offset, length, CHUNK, size):
        yield record
        pos = record.offset + record.length
    if pos < stop:
        raise OSError(errno.EIO, f"short read at {pos} of {name} while reconciling")


def range_records(
    fd: int, name: str, offset: int, length: int, piece: int, size: int | None = None
) -> Iterator[Record]:
    """Records that give a replica ``[offset, offset+length)`` of the file as it is now,
    clipped to ``size`` (the file's own when None): a WRITE per ``piece`` holding data,
    and zeros as the file holds them (journal/records.py): ZERO where it keeps blocks
    (written zeros, fallocated or zeroed ranges), TRIM where it has a hole: one for each
    run of pieces in a hole, which are not read. A file shorter than ``size`` (cut
    meanwhile) ends the records there.
    """
    if size is None:
        size = os.fstat(fd).st_size
    pos, stop = offset, min(offset + length, size)
    if stop <= pos:
        return
    allocated = allocated_ranges(fd, pos, stop)
    k = 0
    while pos < stop:
        end = min(pos + piece, stop)
        while k < len(allocated) and allocated[k][1] <= pos:
            k += 1
        if k == len(allocated) or allocated[k][0] >= end:  # a hole: up to the data's piece
            data_at = allocated[k][0] if k < len(allocated) else stop
            end = stop if data_at >= stop else pos + (data_at - pos) // piece * piece
            yield Record.trim(name, pos, end - pos)
            pos = end
            continue
        data = pread_all(fd, end - pos, pos)
        if data.count(0) != len(data):
            yield Record.write(name, pos, data)
        elif data:
            for at, n, kept in split_by(allocated, pos, pos + len(data)):
                yield (Record.zero if kept else Record.trim)(name, at, n)
        if len(data) < end - pos:
            return  # the file was cut meanwhile
        pos = end
