"""What a later scan cycle ships without the sender's journal, noted before it goes.

A first sync ships its records straight to the receiver (``Link.ship_direct``) and
journals only its EPOCH, once the receiver holds the rest. Later scan cycles do the same:
writing every changed byte into the sender's journal and reading it back to ship it cost
~20 ms of a 1% cycle of a 1 GiB image, and the image holds those bytes anyway. What the
journal gave them is the basis after a cycle that did not end (the sender killed, the link
lost, a stop): the manifests plus the records journaled since are what the replica will
hold. Without the journal, records such a cycle shipped may wait in the receiver's journal
to be applied with the next EPOCH, and nothing on this side would say which.

So before each batch of records goes, what it changes is appended to ``direct.intent`` and
fdatasynced, against the LSN of the manifests the cycle started from: the extents its
writes cover, the disks it resizes, the volumes whose content (FILE) or mode (CHMOD) it
sets, and the LSNs it is numbered with. A basis taken from those manifests
(``sender_state.choose_basis``) marks all of that unknown, so the scan reads and sends it
again, and the new records, applied after the old ones, leave the replica as the source
is. As with DRBD's activity log, what is sent again after a failure is what was in flight,
never the whole disk. The LSNs let the basis check that every record the receiver may hold
beyond this journal is one noted here (a state folder copied back from an older backup
fails that check, and the replica is compared instead). A cycle cut short leaves the file
for the next one, which adds to it; it is removed once manifests are saved again.

Format: entries of a 4-byte length, a 16-byte blake3 of the body, and the body (msgpack):
first ``[since, extent_size, created_ns]``, then one ``[first_lsn, last_lsn, [[kind, volume, offset,
length], ...]]`` per batch. A kill cannot cut an entry short (it is written whole before
the fdatasync, and the page cache outlives the process); a machine that loses power in
mid-append can. Either way, anything that does not check out makes the whole file
untrusted, and the receiver's manifests are read instead (``IntentDamaged``).
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import msgpack

from replicator.engine.checkpoint import RANGE_TYPES, TouchedExtents
from replicator.journal import Record, RecordType
from replicator.journal.durable import fdatasync_fd, sync_dir

FILE_NAME = "direct.intent"
_HEAD = struct.Struct("<I16s")
_MAX_ENTRY = 64 * 1024 * 1024
_WHOLE = (RecordType.FILE, RecordType.CHMOD)
_RANGE, _RESIZE, _CONTENT = 0, 1, 2


class IntentDamaged(Exception):
    """``direct.intent`` exists but does not check out: only the replica can tell."""


@dataclass(slots=True)
class Intent:
    """What cycles from the manifests at ``since`` may have shipped without the journal."""

    since: int
    touched: TouchedExtents
    created_ns: int = 0  # when the first cycle from ``since`` began to ship: the oldest
    whole: set[str] = field(default_factory=set)  # content or mode sent (FILE, CHMOD)
    lsns: list[tuple[int, int]] = field(default_factory=list)  # inclusive ranges

    def covers(self, first: int, last: int) -> bool:
        """Whether every LSN from ``first`` to ``last`` was noted here."""
        for low, high in sorted(self.lsns):
            if low > first:
                return False
            if high >= first:
                first = high + 1
                if first > last:
                    return True
        return first > last

    def add(self, first: int, last: int, entries: Sequence[object]) -> None:
        self.lsns.append((first, last))
        for entry in entries:
            kind, volume, offset, length = _items(entry, 4)
            if not (
                isinstance(volume, str) and isinstance(offset, int) and isinstance(length, int)
            ):
                raise ValueError(f"entry {[kind, volume, offset, length]!r} is not a change")
            if kind == _RANGE:
                self.touched.mark_range(volume, offset, length)
            elif kind == _RESIZE:
                self.touched.resized.add(volume)
            elif kind == _CONTENT:
                self.whole.add(volume)
            else:
                raise ValueError(f"entry kind {kind!r} is unknown")


def _entries(records: Sequence[Record]) -> list[list[object]]:
    entries: list[list[object]] = []
    for record in records:
        if record.type in RANGE_TYPES:
            entries.append([_RANGE, record.volume, record.offset, record.length])
        elif record.type is RecordType.RESIZE:
            entries.append([_RESIZE, record.volume, 0, record.size])
        elif record.type in _WHOLE:
            entries.append([_CONTENT, record.volume, 0, 0])
        else:  # a scan's records are the ones above and its EPOCH, which is journaled
            raise ValueError(f"a {record.type.name} record cannot travel without the journal")
    return entries


def _items(value: object, count: int | None) -> list[object]:
    """``value`` as the list of ``count`` items (any number: None) it must be."""
    if not isinstance(value, list) or (count is not None and len(value) != count):
        raise ValueError(f"{value!r} is not a list of {count or 'any number of'} items")
    return value


def _frame(body: object) -> bytes:
    packed = msgpack.packb(body)
    return _HEAD.pack(len(packed), blake3.blake3(packed).digest(16)) + packed


def load(state_dir: Path, extent_size: int) -> Intent | None:
    """The notes in ``state_dir``, None when there are none (blocking).

    Raises IntentDamaged when the file does not check out, or was made for another
    extent size."""
    try:
        raw = (state_dir / FILE_NAME).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise IntentDamaged(f"{state_dir / FILE_NAME}: {exc}") from exc
    bodies: list[object] = []
    pos = 0
    while pos < len(raw):
        if len(raw) - pos < _HEAD.size:
            raise IntentDamaged(f"{FILE_NAME} ends inside an entry header at byte {pos}")
        size, digest = _HEAD.unpack_from(raw, pos)
        body = raw[pos + _HEAD.size : pos + _HEAD.size + size]
        if len(body) != size or blake3.blake3(body).digest(16) != digest:
            raise IntentDamaged(f"{FILE_NAME}: the entry at byte {pos} does not check out")
        try:
            bodies.append(msgpack.unpackb(body))
        except (ValueError, msgpack.UnpackException) as exc:
            raise IntentDamaged(f"{FILE_NAME}: the entry at byte {pos}: {exc}") from exc
        pos += _HEAD.size + size
    try:
        head, *batches = bodies
        since, size, created = _items(head, 3)
        if size != extent_size or not isinstance(since, int) or not isinstance(created, int):
            raise IntentDamaged(f"{FILE_NAME} was made for extents of {size}, not {extent_size}")
        intent = Intent(since, TouchedExtents(extent_size), created)
        for batch in batches:
            first, last, entries = _items(batch, 3)
            if not (isinstance(first, int) and isinstance(last, int) and first <= last):
                raise ValueError(f"LSNs {first!r} to {last!r}")
            intent.add(first, last, _items(entries, None))
    except (ValueError, TypeError) as exc:
        raise IntentDamaged(f"{FILE_NAME} does not hold what it should: {exc}") from exc
    return intent


class IntentLog:
    """``direct.intent`` for a cycle from the manifests at ``since``: opened (or created)
    at the first ``add``, so a cycle that ships nothing leaves the folder as it was
    (blocking calls)."""

    def __init__(self, state_dir: Path, since: int, extent_size: int) -> None:
        self._dir = state_dir
        self._since = since
        self._extent_size = extent_size
        self._fd: int | None = None

    @classmethod
    def open(cls, state_dir: Path, since: int, extent_size: int) -> IntentLog:
        """The log, its file open already."""
        log = cls(state_dir, since, extent_size)
        log._opened()
        return log

    def _opened(self) -> int:
        """Add to the notes of a cycle from the same manifests that was cut short (the
        receiver may hold what it shipped), or start new ones, durably, replacing notes
        made against older manifests (the saved ones hold what those cycles did)."""
        if self._fd is not None:
            return self._fd
        path = self._dir / FILE_NAME
        with contextlib.suppress(IntentDamaged):  # damaged: the basis came from the replica
            kept = load(self._dir, self._extent_size)
            if kept is not None and kept.since == self._since:
                self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                return self._fd
        tmp = self._dir / f".{FILE_NAME}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(tmp)) from exc
        try:
            _write_durably(fd, _frame([self._since, self._extent_size, time.time_ns()]))
            os.replace(tmp, path)
            sync_dir(self._dir)
        except OSError as exc:
            os.close(fd)
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        self._fd = fd
        return fd

    def add(self, first_lsn: int, records: Sequence[Record]) -> None:
        """Note ``records``, to be numbered from ``first_lsn``, before they are shipped."""
        frame = _frame([first_lsn, first_lsn + len(records) - 1, _entries(records)])
        if len(frame) > _MAX_ENTRY:
            raise ValueError("a batch too large to note")
        fd = self._opened()
        try:
            _write_durably(fd, frame)
        except OSError as exc:  # named: the message says which file the disk refused
            raise OSError(exc.errno, exc.strerror, str(self._dir / FILE_NAME)) from exc

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _write_durably(fd: int, frame: bytes) -> None:
    """``frame`` written whole and made durable (a short write ends in the error the next
    write gets: a full disk)."""
    view = memoryview(frame)
    while view:
        view = view[os.write(fd, view) :]
    fdatasync_fd(fd)


def drop(state_dir: Path) -> None:
    """Manifests were saved: the notes against older ones are void (blocking). A crash
    before the unlink is durable leaves notes whose ``since`` no manifests have any more."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(state_dir / FILE_NAME)
