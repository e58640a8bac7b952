"""When the journal is full: keep the VM writing, track what changed, resync it later.

Live capture cannot make a guest wait for a receiver that is away, and failing its writes
(ENOSPC) takes the VM down. So when an append finds the sender's journal at its cap, the
exports of that journal switch to *overflow* (the hand-off is the shared journal-first
policy, ``engine/journal_first.py``): writes go to the files unjournaled and the records
they would have journaled are absorbed by a ``DirtyMap``: the 64 KiB extents they touch,
per volume, and the size a file grew to. The replica meanwhile stays at its last
consistency point: nothing after it is journaled, so nothing can be applied.

Once the journal has room again (the receiver is back and acknowledged the backlog),
``resync_overflow`` brings the replica forward without a full scan:

1. under the journal-first lock, the volumes that grew get a RESIZE to their size and the
   map is taken over; journaling resumes for new writes. From here until step 3 no
   barrier may be journaled (the ticker and guest FLUSHes skip theirs), so the receiver
   applies nothing of what follows until it is all there;
2. each dirty extent is read from the file and journaled (WRITE, or ZERO for zeros)
   under the lock, a few extents per hold: a guest write to the same extent is journaled
   before or after the read as it reached the file, so the last record of every extent
   holds its current bytes;
3. a FLUSH barrier, under the lock: the replica jumps from its old consistency point
   to the state the files had at that instant, which they really had.

If the journal fills again during the resync (for lack of acks, or under the guest's own
writes), the extents not journaled yet go back into a fresh map together with the new
writes, and a later resync finishes the same epoch (no barrier was journaled meanwhile).

The map is not persisted: a sender that restarts compares every volume with its basis
before serving (the initial sync), which finds every change a lost map would have held.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from replicator.engine.journal_first import JournalFirst
from replicator.engine.volumes import DEFAULT_EXTENT
from replicator.journal import JournalFull, Record, RecordType

EXTENT = DEFAULT_EXTENT
RESYNC_HOLD_BYTES = 1024 * 1024  # bytes read and journaled per hold of the lock
_RANGES = (RecordType.WRITE, RecordType.ZERO, RecordType.TRIM)


@dataclass(slots=True)
class VolumeDirt:
    extents: set[int] = field(default_factory=set)
    grown_to: int = 0  # the file grew to this size while unjournaled (0: it did not)


@dataclass(slots=True)
class DirtyMap:
    """Extents changed without a journal record, by volume."""

    volumes: dict[str, VolumeDirt] = field(default_factory=dict)

    def mark(self, volume: str, offset: int, length: int, file_size: int) -> None:
        dirt = self.volumes.setdefault(volume, VolumeDirt())
        if length > 0:
            dirt.extents.update(range(offset // EXTENT, (offset + length - 1) // EXTENT + 1))
        dirt.grown_to = max(dirt.grown_to, file_size)

    def absorb(self, record: Record) -> None:
        """Track a change made without its record: the extents a WRITE, ZERO or TRIM
        covers, the size a RESIZE grows the file to."""
        if record.type in _RANGES:
            self.mark(record.volume, record.offset, record.length, 0)
        elif record.type is RecordType.RESIZE:
            dirt = self.volumes.setdefault(record.volume, VolumeDirt())
            dirt.grown_to = max(dirt.grown_to, record.size)

    def merge(self, other: DirtyMap) -> None:
        for volume, dirt in other.volumes.items():
            mine = self.volumes.setdefault(volume, VolumeDirt())
            mine.extents |= dirt.extents
            mine.grown_to = max(mine.grown_to, dirt.grown_to)

    @property
    def bytes(self) -> int:
        return sum(len(d.extents) for d in self.volumes.values()) * EXTENT

    def __bool__(self) -> bool:
        return any(d.extents or d.grown_to for d in self.volumes.values())

    def take(self) -> DirtyMap:
        """Everything marked so far, leaving this map empty."""
        taken = DirtyMap(self.volumes)
        self.volumes = {}
        return taken

    def runs(self, volume: str, limit: int = RESYNC_HOLD_BYTES) -> Iterator[tuple[int, int]]:
        """(offset, length) runs of contiguous dirty extents of ``volume``, each at most
        ``limit`` bytes, in order."""
        extents = sorted(self.volumes.get(volume, VolumeDirt()).extents)
        start = prev = -2
        for index in extents:
            if index != prev + 1 or (index - start + 1) * EXTENT > limit:
                if start >= 0:
                    yield start * EXTENT, (prev - start + 1) * EXTENT
                start = index
            prev = index
        if start >= 0:
            yield start * EXTENT, (prev - start + 1) * EXTENT

    def without(self, volume: str, offset: int, length: int) -> None:
        dirt = self.volumes.get(volume)
        if dirt is not None:
            dirt.extents.difference_update(range(offset // EXTENT, (offset + length) // EXTENT))

    def copy(self) -> DirtyMap:
        return DirtyMap(
            {k: dataclasses.replace(v, extents=set(v.extents)) for k, v in self.volumes.items()}
        )


class Served(Protocol):
    """What a resync needs of an export (``JournaledFileExport``)."""

    @property
    def volume(self) -> str: ...
    @property
    def file_size(self) -> int: ...
    @property
    def capture(self) -> JournalFirst[DirtyMap]: ...

    def extent_records(self, offset: int, length: int) -> list[Record]: ...


async def resync_overflow(
    exports: Sequence[Served], make_room: Callable[[], Awaitable[bool]]
) -> int:
    """Journal every extent changed while the journal was full, then a barrier (see the
    module docstring). Returns the bytes journaled.

    The epoch can be larger than the journal: when it fills up, ``make_room`` is awaited
    outside the lock (the sender drops records the receiver already holds durably, then
    waits for acks) and the run is read again. When it says there is no way (``False``:
    the receiver is gone) the rest goes back into the overflow map, the epoch stays open
    (no barrier), and JournalFull is raised.
    """
    if not exports:
        return 0
    capture = exports[0].capture
    by_volume = {e.volume: e for e in exports}

    async def plan(dirt: DirtyMap) -> tuple[list[Record], DirtyMap]:
        # grown files first: writes past the old end need the room
        grown = [v for v, d in dirt.volumes.items() if d.grown_to]
        return [Record.resize(v, by_volume[v].file_size) for v in grown], dirt

    async def read(export: Served, offset: int, length: int) -> list[Record]:
        return export.extent_records(offset, length)

    work = await capture.resync_start(plan, make_room)
    if work is None:
        return 0
    for dirt in work.volumes.values():
        dirt.grown_to = 0
    sent = 0
    try:
        for volume in list(work.volumes):
            export = by_volume[volume]
            for offset, length in list(work.runs(volume)):
                step = functools.partial(read, export, offset, length)
                records = await capture.resync_step(step, make_room)
                work.without(volume, offset, length)
                sent += sum(len(r.data) for r in records or ())
        await capture.resync_close(make_room)
    except JournalFull:
        await capture.resync_requeue(lambda dirt: dirt.merge(work))
        raise
    await capture.journal.sync()
    return sent
