"""When the journal is full: keep the VM writing, track what changed, resync it later.

Live capture cannot make a guest wait for a receiver that is away, and failing its writes
(ENOSPC) takes the VM down. So when an append finds the sender's journal at its cap, the
exports of that journal switch to *overflow*: writes go to the files unjournaled and the
64 KiB extents they touch are marked in a ``DirtyMap`` (per volume, plus the size the file
grew to). The replica meanwhile stays at its last consistency point: nothing after it is
journaled, so nothing can be applied.

Once the journal has room again (the receiver is back and acknowledged the backlog),
``resync`` brings the replica forward without a full scan:

1. under the sequencer, the map is taken over and journaling resumes for new writes;
   from here until step 3 no barrier may be journaled (the ticker and guest FLUSHes skip
   theirs), so the receiver applies nothing of what follows until it is all there;
2. each dirty extent is read from the file and journaled (WRITE, or ZERO for zeros)
   under the sequencer, a few extents per hold: a guest write to the same extent is
   journaled before or after the read as it reached the file, so the last record of
   every extent holds its current bytes;
3. a FLUSH barrier, under the sequencer: the replica jumps from its old consistency point
   to the state the files had at that instant, which they really had.

If the journal fills again during the resync, the extents not journaled yet go back into
a fresh map together with the new writes, and a later resync finishes the same epoch (no
barrier was journaled meanwhile).

The map is not persisted: a sender that restarts compares every volume with its basis
before serving (the initial sync), which finds every change a lost map would have held.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

from replicator.engine.volumes import DEFAULT_EXTENT

EXTENT = DEFAULT_EXTENT
RESYNC_HOLD_BYTES = 1024 * 1024  # bytes read and journaled per hold of the sequencer


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
