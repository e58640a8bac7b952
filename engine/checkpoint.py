"""A live NBD sender's manifests brought up to date when it stops cleanly.

The manifests (``manifests.state``) say what the replica holds once every record up to
their LSN is applied; a start compares the disks with them (a *local* basis) as long as
the journal still holds every record journaled after them. A live sender saves them only
at its initial sync, and its journal drops acknowledged records as it goes: after a day
of writes the journal no longer reaches back that far, so the next start had to ask the
receiver for manifests read from the whole replica (a *remote* basis), and could not
serve alone at all (``--wait-for-receiver``, engine/served_alone.py).

So, while it runs, the sender notes which extents of each disk its journaled records
touched (``TouchedExtents``, the journal's observer: a bit set per record), and at a
clean stop, once the capture has stopped and the journal is synced, it reads and hashes
just those extents from the images and saves the manifests at the journal's last LSN:
exact, since every change to the images went through the journal in order. Skipped
(the next start compares with the receiver, as before) when changes were made unjournaled
and not resynced (a full journal), when a volume diverged from its journal, or when the
touched extents exceed ``CHECKPOINT_MAX_BYTES`` (hashing them would hold up the stop
longer than a service manager waits).

A run that does not end cleanly (SIGKILL, a crash, power lost) saves no checkpoint. For
it, like DRBD's bitmap, the marks themselves are made durable (``touched.state``, against
the manifests' LSN) before each trim drops records (``Journal.before_trim``): the records
dropped are all marked. A start that finds the journal no longer reaching back to its
manifests takes them with the marked extents unknown, so its scan reads and sends those
again; only a missing or damaged note leaves the receiver as the one who can tell.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from replicator.engine.manifest import ExtentManifest, ManifestSet
from replicator.engine.scan import resize_basis
from replicator.engine.volumes import VolumeKind, VolumeSpec, extent_digest
from replicator.journal import Record, RecordType
from replicator.journal.durable import StateFileError, read_state, write_state
from replicator.journal.records import RecordHead

CHECKPOINT_MAX_BYTES = 4 << 30  # at most this much read and hashed at a stop
TOUCHED_FILE = "touched.state"
RANGE_TYPES = (RecordType.WRITE, RecordType.ZERO, RecordType.TRIM)  # a range of a volume
_UNTRACKED = (RecordType.CREATE, RecordType.UNLINK, RecordType.RENAME)
_WHOLE = (RecordType.FILE, RecordType.CHMOD)  # ``files``: in memory only (not save_touched's)


@dataclass(slots=True)
class TouchedExtents:
    """The extents of each volume that journaled records changed (``Journal.observer``):
    a bitmap per volume, one bit per extent, so it persists as it is (``save_touched``)."""

    extent_size: int
    extents: dict[str, bytearray] = field(default_factory=dict)
    resized: set[str] = field(default_factory=set)
    valid: bool = True  # False: a record this cannot follow (a folder's namespace)
    files: set[str] = field(default_factory=set)  # volumes set whole (FILE) or chmod-ed

    def __call__(self, records: Sequence[Record] | Sequence[RecordHead]) -> None:
        for record in records:
            kind = record.type
            if kind in RANGE_TYPES:
                self.mark_range(record.volume, record.offset, record.length)
            elif kind is RecordType.RESIZE:
                self.resized.add(record.volume)
            elif kind in _WHOLE:
                self.files.add(record.volume)
            elif kind in _UNTRACKED:
                self.valid = False

    def mark_range(self, volume: str, offset: int, length: int) -> None:
        """Mark the extents of ``volume`` that ``length`` bytes at ``offset`` touch."""
        if length > 0:
            ext = self.extent_size
            self._mark(volume, offset // ext, (offset + length - 1) // ext)

    def _mark(self, volume: str, first: int, last: int) -> None:
        bits = self.extents.get(volume)
        if bits is None:
            bits = self.extents[volume] = bytearray()
        if last >> 3 >= len(bits):
            bits.extend(bytes((last >> 3) + 1 - len(bits)))
        if first == last:
            bits[first >> 3] |= 1 << (first & 7)
            return
        for index in range(first, last + 1):
            bits[index >> 3] |= 1 << (index & 7)

    def indices(self, volume: str) -> Iterator[int]:
        """The extents of ``volume`` marked, in order."""
        for at, byte in enumerate(self.extents.get(volume, b"")):
            if byte:
                base = at << 3
                for bit in range(8):
                    if byte >> bit & 1:
                        yield base + bit

    @property
    def bytes(self) -> int:
        count = sum(int.from_bytes(b, "little").bit_count() for b in self.extents.values())
        return count * self.extent_size


def save_touched(state_dir: Path, since: int, touched: TouchedExtents) -> None:
    """Durably note the extents changed since the manifests at ``since`` (blocking)."""
    write_state(
        state_dir / TOUCHED_FILE,
        {
            "since": since,
            "extent_size": touched.extent_size,
            "extents": {k: bytes(v) for k, v in touched.extents.items()},
            "resized": sorted(touched.resized),
            "valid": touched.valid,
        },
    )


def load_touched(state_dir: Path, since: int, extent_size: int) -> TouchedExtents | None:
    """The extents noted since the manifests at ``since``; None when none were noted for
    those manifests (or the file cannot be trusted: then only the receiver can tell)."""
    try:
        raw = read_state(state_dir / TOUCHED_FILE)
    except (StateFileError, OSError):
        return None
    if raw is None or raw.get("since") != since or raw.get("extent_size") != extent_size:
        return None
    extents, resized = raw.get("extents"), raw.get("resized")
    if not isinstance(extents, dict) or not isinstance(resized, list) or not raw.get("valid"):
        return None
    touched = TouchedExtents(extent_size)
    for volume, bits in extents.items():
        if not isinstance(volume, str) or not isinstance(bits, bytes):
            return None
        touched.extents[volume] = bytearray(bits)
    touched.resized = {v for v in resized if isinstance(v, str)}
    return touched


def drop_touched(state_dir: Path) -> None:
    """The manifests were saved afresh: what was noted against the old ones is void."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(state_dir / TOUCHED_FILE)


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
            indices = set(touched.indices(spec.name))
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
