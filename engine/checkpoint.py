"""A live NBD sender's manifests brought up to date when it stops cleanly.

The manifests (``manifests.state``) say what the replica holds once every record up to
their LSN is applied; a start compares the disks with them (a *local* basis) as long as
the journal still holds every record journaled after them. A live sender saves them only
at its initial sync, and its journal drops acknowledged records as it goes: after a day
of writes the journal no longer reaches back that far, so the next start had to ask the
receiver for manifests read from the whole replica (a *remote* basis), and could not
serve alone at all (``--wait-for-receiver``, engine/served_alone.py).

So, while it runs, the sender notes which extents of each disk its journaled records
touched (``TouchedExtents``, the journal's observer: a set add per record), and at a
clean stop, once the capture has stopped and the journal is synced, it reads and hashes
just those extents from the images and saves the manifests at the journal's last LSN:
exact, since every change to the images went through the journal in order. Skipped
(the next start compares with the receiver, as before) when the run did not end cleanly,
when changes were made unjournaled and not resynced (a full journal), when a volume
diverged from its journal, or when the touched extents exceed ``CHECKPOINT_MAX_BYTES``
(hashing them would hold up the stop longer than a service manager waits).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from replicator.engine.manifest import ExtentManifest, ManifestSet
from replicator.engine.scan import resize_basis
from replicator.engine.volumes import VolumeKind, VolumeSpec, extent_digest
from replicator.journal import Record, RecordType

CHECKPOINT_MAX_BYTES = 4 << 30  # at most this much read and hashed at a stop
_RANGES = (RecordType.WRITE, RecordType.ZERO, RecordType.TRIM)
_UNTRACKED = (RecordType.CREATE, RecordType.UNLINK, RecordType.RENAME)


@dataclass(slots=True)
class TouchedExtents:
    """The extents of each volume that journaled records changed (``Journal.observer``)."""

    extent_size: int
    extents: dict[str, set[int]] = field(default_factory=dict)
    resized: set[str] = field(default_factory=set)
    valid: bool = True  # False: a record this cannot follow (a folder's namespace)

    def __call__(self, records: Sequence[Record]) -> None:
        ext = self.extent_size
        for record in records:
            kind = record.type
            if kind in _RANGES:
                if record.length <= 0:
                    continue
                first, last = record.offset // ext, (record.offset + record.length - 1) // ext
                touched = self.extents.get(record.volume)
                if touched is None:
                    touched = self.extents[record.volume] = set()
                if first == last:
                    touched.add(first)
                else:
                    touched.update(range(first, last + 1))
            elif kind is RecordType.RESIZE:
                self.resized.add(record.volume)
            elif kind in _UNTRACKED:
                self.valid = False

    @property
    def bytes(self) -> int:
        return sum(len(s) for s in self.extents.values()) * self.extent_size


def checkpoint_manifests(
    manifests: ManifestSet, touched: TouchedExtents, volumes: Sequence[VolumeSpec], lsn: int
) -> tuple[ManifestSet, int]:
    """``manifests`` with every touched extent of the disk volumes read and hashed again,
    and their sizes as the images have them, at ``lsn``; and the bytes read.
    Blocking: run it in a thread, with nothing writing the images."""
    new = ManifestSet(lsn, manifests.extent_size, manifests.epoch)
    new.disks = {k: v.copy() for k, v in manifests.disks.items()}
    new.files = dict(manifests.files)
    new.modes = dict(manifests.modes)
    read = 0
    for spec in volumes:
        if spec.kind is not VolumeKind.DISK:
            continue
        with open(spec.path, "rb") as f:
            fd = f.fileno()
            size = os.fstat(fd).st_size
            disk = new.disks.get(spec.name)
            if disk is None:
                disk = new.disks[spec.name] = ExtentManifest(new.extent_size, 0)
            indices = set(touched.extents.get(spec.name, ()))
            if disk.size != size:
                old_count = disk.count
                resize_basis(disk, size)  # the new extents zero-filled, as a RESIZE does
                if spec.name in touched.resized:  # only the old last extent is unknown
                    indices.add(max(0, old_count - 1))
                else:  # not by a journaled RESIZE (never expected): read all it changed
                    indices.update(range(max(0, old_count - 1), disk.count))
            ext = disk.extent_size
            for index in sorted(i for i in indices if i < disk.count):
                start = index * ext
                data = os.pread(fd, min(ext, size - start), start)
                disk.set(index, extent_digest(data))
                read += len(data)
    return new, read
