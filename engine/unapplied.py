"""The replica as the records it holds past its consistency point will leave it, worked
out without applying them: what a ``verify`` session compares with the sources.

The receiver applies records up to the last barrier it holds (engine/job_replica.py);
records after it (a sender killed between two barriers shipped them) wait for the next
one. A verify session must neither apply them (the replica would leave its consistency
point, and `failover --force` refuse it until the next send) nor leave them out (its answer
would not say whether the replica will equal the source). So a replica file's manifest is
of the file as those records will leave it: the extents they touch are read from the
replica, changed in memory as the applier changes the file (``Applier.apply``), and
hashed; every other extent is hashed as it is. A folder's listing is folded with them as
the sender folds its own (``tree.fold``).

Records that change which file a name leads to (``NAMESPACE_TYPES``: a FUSE job's creates,
renames, removals) are not worked out: ``NotComparable`` says which one, and verify is
refused until they are applied. So are writes to a replica name that is not a regular file
(the applier refuses them) and, in a listing, into a folder the replica lacks (the applier
makes it first).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from replicator.engine.manifest import digest_chunks
from replicator.engine.tree import fold, from_entries
from replicator.engine.volumes import extent_digest, pread_all
from replicator.journal import Record, RecordType
from replicator.journal.records import NAMESPACE_TYPES
from replicator.transport.messages import DIGEST_SIZE, TreeEntry

_DATA = frozenset({RecordType.WRITE, RecordType.ZERO, RecordType.TRIM, RecordType.RESIZE})


class NotComparable(Exception):
    """The unapplied records change the replica in a way verify does not work out."""


def _named(record: Record) -> str:
    return f"lsn {record.lsn} ({record.type.name} {record.volume!r})"


def of_file(records: Iterable[Record], path: str) -> list[Record]:
    """The records of ``records`` that change replica file ``path`` (its content, its mode),
    in order. Raises NotComparable when any of them changes the folder's names."""
    mine: list[Record] = []
    for record in records:
        if record.type in NAMESPACE_TYPES:
            raise NotComparable(f"{_named(record)} changes the names in the replica folder")
        if record.volume == path:
            mine.append(record)
    return mine


@dataclass(frozen=True, slots=True)
class _Change:
    """Bytes ``[offset, end)`` of a file become ``data`` (None: zeros)."""

    offset: int
    end: int
    data: bytes | memoryview | None

    def apply(self, buf: bytearray, start: int) -> None:
        """Change ``buf``, the file's bytes from ``start``, where the two overlap."""
        lo, hi = max(self.offset, start), min(self.end, start + len(buf))
        if lo >= hi:
            return
        if self.data is None:
            buf[lo - start : hi - start] = bytes(hi - lo)
        else:
            buf[lo - start : hi - start] = self.data[lo - self.offset : hi - self.offset]


def manifest(
    fd: int | None, records: list[Record], extent_size: int, chunk_extents: int
) -> Iterator[tuple[bool, int, bytes]]:
    """(exists, size, digests of up to ``chunk_extents`` extents) of the replica file open
    as ``fd`` (None: there is none) as ``records`` (``of_file``'s) will leave it, as
    ``JobReplica.replica_manifest`` gives them for a file as it is. Blocking.

    Raises NotComparable, before it yields anything, when the records write a file that
    is not a regular one (the applier refuses to)."""
    base: bytes | None = None  # the content a FILE record gives it (None: the replica's)
    changes = list(records)
    for i in range(len(changes) - 1, -1, -1):
        if changes[i].type is RecordType.FILE:  # replaced whole: what came before is gone
            base, changes = bytes(changes[i].data), changes[i + 1 :]
            break
    writing = next((r for r in records if r.type in _DATA or r.type is RecordType.FILE), None)
    if fd is not None and writing is not None and not stat.S_ISREG(os.fstat(fd).st_mode):
        raise NotComparable(f"{_named(writing)} writes a replica name that is not a file")
    base_size = len(base) if base is not None else os.fstat(fd).st_size if fd is not None else 0
    exists = base is not None or fd is not None
    size = base_size
    touched: dict[int, list[_Change]] = {}

    def touch(change: _Change) -> None:
        if change.end > change.offset:
            for index in range(change.offset // extent_size, (change.end - 1) // extent_size + 1):
                touched.setdefault(index, []).append(change)

    for record in changes:
        if record.type not in _DATA:
            continue  # a CHMOD changes no byte (nor makes a file)
        exists = True  # the applier opens the file with O_CREAT
        if record.type is RecordType.WRITE:
            end = record.offset + len(record.data)
            touch(_Change(record.offset, end, record.data))
            size = max(size, end) if end > record.offset else size  # no byte: no growth
        elif record.type is RecordType.RESIZE:
            # cut off, then grown again: zeros (bytes past the size are zeros here anyway)
            touch(_Change(record.size, size, None))
            size = record.size
        else:  # ZERO, TRIM: zeros (allocated or a hole) within the file as it is then
            touch(_Change(record.offset, min(size, record.offset + record.length), None))
    if not exists:
        yield False, 0, b""
        return
    count = -(-size // extent_size)
    # extents not wholly in the file as it was (it grew, or its short last one changed size)
    beyond = range(min(base_size, size) // extent_size, count) if size != base_size else range(0)

    def digest(index: int) -> bytes:
        start = index * extent_size
        buf = bytearray(min(extent_size, size - start))
        if start < base_size:
            n = min(len(buf), base_size - start)
            if base is not None:
                buf[:n] = base[start : start + n]
            elif fd is not None:
                read = pread_all(fd, n, start)  # short: the file shrank meanwhile
                buf[: len(read)] = read
        for change in touched.get(index, ()):
            change.apply(buf, start)
        return extent_digest(memoryview(buf))

    # the replica file's own digests where nothing changes (a FILE record: none are kept)
    kept = None
    if base is None and fd is not None:
        kept = digest_chunks(fd, base_size, extent_size, chunk_extents)
    ahead = bytearray()  # those digests, read from extent ``first`` on
    first = 0
    while True:
        end = min(count, first + chunk_extents)
        want = (end - first) * DIGEST_SIZE
        while kept is not None and len(ahead) < want:
            more = next(kept, b"")
            if not more:  # the file's end
                kept = None
            ahead += more
        part = ahead[:want]
        del ahead[:want]
        part += bytes(want - len(part))  # past the file's end: worked out below
        for index in range(first, end):
            if base is not None or index in touched or index in beyond:
                at = (index - first) * DIGEST_SIZE
                part[at : at + DIGEST_SIZE] = digest(index)
        yield True, size, bytes(part)
        first = end
        if first >= count:
            return


def tree(entries: list[TreeEntry], records: Iterable[Record]) -> list[TreeEntry]:
    """The listing ``entries`` of a replica folder as ``records`` will leave it, folded as
    the sender folds its own records on their way (``tree.fold``): the modes they set, the
    files their writes make. Raises NotComparable for a record that changes the names, or
    that writes where the applier makes a folder first or refuses to write."""
    layout = from_entries(entries)
    for record in records:
        if record.type in NAMESPACE_TYPES:
            raise NotComparable(f"{_named(record)} changes the names in the replica folder")
        path = record.volume
        if record.type in _DATA or record.type is RecordType.FILE:
            parent = path.rpartition("/")[0]
            if path in layout.dirs or path in layout.links:
                raise NotComparable(f"{_named(record)} writes a replica name that is not a file")
            if path not in layout.files and parent and parent not in layout.dirs:
                raise NotComparable(f"{_named(record)} writes into a folder the replica lacks")
        fold(layout, record)
    return [
        *(TreeEntry(path, "d", mode, "") for path, mode in layout.dirs.items()),
        *(TreeEntry(path, "f", mode, "") for path, mode in layout.files.items()),
        *(TreeEntry(path, "l", 0, target) for path, target in layout.links.items()),
    ]
