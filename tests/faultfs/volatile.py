"""A power cut for faultfs: what a machine that loses power takes back from a file's data.

Once armed, every change to a file's bytes or size that goes through the mount (write,
truncate, open with O_TRUNC, fallocate in any mode) first saves what it replaces: the old
bytes of the range and the file's size. An ``fsync``/``fdatasync`` of any descriptor of the
file, once it has returned, makes every change made before it started permanent (its
saved bytes are dropped); changes that arrived while it ran stay volatile, as POSIX
allows. ``cut`` then puts back, newest first, every change no sync has covered: the files
hold exactly what a disk that wrote nothing past the last fsync would hold after a reboot,
the worst case a power cut may leave (and a legal one: the kernel may write back nothing
on its own before the power goes).

Keyed by the real file's (device, inode), so a change follows the file through renames,
and a file renamed over another keeps its own history: a temporary file written, renamed
into place and never synced comes back empty under its final name, which is what breaks
an atomic write that forgot its fsync.

A sync that fails (a rule fired on it) is Linux's writeback error ("fsyncgate"): the
kernel may have dropped the dirty pages it could not write, or marked them clean with the
disk never having them, and a later fsync that succeeds does not bring them back. So the
changes that sync would have covered are *lost*: a later sync does not make them durable,
and ``cut`` takes them back, unless the bytes were written again after the failure and a
sync covered that rewrite (each byte of a lost change covered by one: a program that
rewrites what it cannot trust, as recovery may).

The names (creates, renames, unlinks, folders) are ``volatile_names.py``'s, taken back
after the data. Metadata (modes, owners, times) is not taken back.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Final

PAGE: Final = 4096  # what writeback writes, in any order


@dataclass(slots=True)
class _Change:
    offset: int
    old: bytes  # the bytes the change replaced (within the file's old size)
    size_before: int


@dataclass(slots=True)
class _History:
    fd: int  # our own O_RDWR descriptor of the file: reads what a change replaces
    changes: list[_Change] = field(default_factory=list)
    dropped: int = 0  # changes made durable and forgotten; changes[0] is number ``dropped``
    # changes a failed sync would have covered (never durable but by a synced rewrite)
    lost: list[_Change] = field(default_factory=list)
    rewritten: list[tuple[int, int]] = field(default_factory=list)  # synced since, [lo, hi)


class VolatileWrites:
    """The unsynced changes of every file written through the mount since ``arm``."""

    def __init__(self) -> None:
        self.armed = False
        self._files: dict[tuple[int, int], _History] = {}
        self.changes_seen = 0

    def arm(self) -> None:
        self.armed = True

    def _history(self, fd: int) -> _History:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        history = self._files.get(key)
        if history is None:
            # a new descriptor, readable whatever the handle's flags (and for a file
            # already unlinked: /proc's link reaches the inode)
            own = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
            history = self._files[key] = _History(own)
        return history

    def before_change(self, fd: int, offset: int, length: int) -> None:
        """Save what a change of ``length`` bytes at ``offset`` (or of the size) replaces."""
        if not self.armed:
            return
        history = self._history(fd)
        size = os.fstat(history.fd).st_size
        old = os.pread(history.fd, max(0, min(length, size - offset)), offset)
        history.changes.append(_Change(offset, old, size))
        self.changes_seen += 1

    def before_truncate(self, fd: int, new_size: int) -> None:
        if not self.armed:
            return
        size = os.fstat(fd).st_size
        self.before_change(fd, new_size, max(0, size - new_size))

    def sync_starts(self, fd: int) -> tuple[_History, int] | None:
        """What a sync starting now covers, for ``synced`` once it has returned."""
        if not self.armed:
            return None
        history = self._history(fd)
        return history, history.dropped + len(history.changes)

    def synced(self, mark: tuple[_History, int] | None) -> None:
        """A sync returned: the changes made before it started are durable (and so is a
        lost change whose every byte they wrote again)."""
        if mark is None:
            return
        history, upto = mark
        covered = upto - history.dropped
        if covered > 0:
            if history.lost:
                history.rewritten.extend(
                    (c.offset, c.offset + len(c.old)) for c in history.changes[:covered]
                )
                history.rewritten = _merged(history.rewritten)
                history.lost = [c for c in history.lost if not _inside(c, history.rewritten)]
                if not history.lost:
                    history.rewritten = []
            del history.changes[:covered]
            history.dropped = upto

    def sync_failed(self, mark: tuple[_History, int] | None) -> None:
        """A sync failed: the changes it would have covered are lost (module docstring)."""
        if mark is None:
            return
        history, upto = mark
        covered = upto - history.dropped
        if covered > 0:
            history.lost.extend(history.changes[:covered])
            del history.changes[:covered]
            history.dropped = upto

    def cut(self, rng: random.Random | None = None) -> dict[str, int]:
        """Take back every unsynced change, newest first, or with ``rng`` what a random
        writeback had not written: each page keeps a random number of the unsynced changes
        that touched it (all, none or the first few, whichever page its neighbours chose:
        pages reach the disk in any order) and the size one of the sizes it had."""
        files = undone = 0
        for history in self._files.values():
            # the lost changes are older than every unsynced one: undone after them
            history.changes[:0] = history.lost
            history.lost = []
            if history.changes:
                files += 1
            if rng is None:
                for change in reversed(history.changes):
                    undone += 1
                    _put_back(history.fd, change.old, change.offset)
                    os.ftruncate(history.fd, change.size_before)
            elif history.changes:  # (a file with none is left alone: not even its ctime)
                undone += _random_writeback(history, rng)
            os.fsync(history.fd)
            os.close(history.fd)
        self._files.clear()
        self.armed = False
        return {"files": files, "changes_undone": undone, "changes_seen": self.changes_seen}


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _inside(change: _Change, ranges: list[tuple[int, int]]) -> bool:
    """Whether every byte ``change`` replaced lies in one of the (merged) ``ranges``."""
    lo, hi = change.offset, change.offset + len(change.old)
    return any(a <= lo and hi <= b for a, b in ranges)


def _put_back(fd: int, data: bytes | memoryview, offset: int) -> None:
    view, at = memoryview(data), offset
    while view:
        n = os.pwrite(fd, view, at)
        view, at = view[n:], at + n


def _random_writeback(history: _History, rng: random.Random) -> int:
    """Undo, page by page, a random suffix of the changes that touched each page; cut the
    file to a random one of its sizes. Returns how many (change, page) pairs it undid."""
    current = os.fstat(history.fd).st_size  # before any old bytes go back
    pages: dict[int, list[_Change]] = {}
    for change in history.changes:
        first, end = change.offset // PAGE, (change.offset + len(change.old) + PAGE - 1) // PAGE
        for page in range(first, end):
            pages.setdefault(page, []).append(change)
    undone = 0
    for page, changes in pages.items():
        kept = rng.randrange(len(changes) + 1)
        lo, hi = page * PAGE, (page + 1) * PAGE
        for change in reversed(changes[kept:]):
            start, stop = max(lo, change.offset), min(hi, change.offset + len(change.old))
            if start < stop:
                old = memoryview(change.old)[start - change.offset : stop - change.offset]
                _put_back(history.fd, old, start)
                undone += 1
    size = rng.choice([*(c.size_before for c in history.changes), current])
    if size != os.fstat(history.fd).st_size:
        os.ftruncate(history.fd, size)
    return undone
