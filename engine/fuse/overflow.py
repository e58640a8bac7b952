"""When the journal is full under the FUSE filter: keep the VM's folder working, resync later.

The same promise as the NBD shim's (``engine/nbd/overflow.py``): a full journal never fails
the VM's writes. While the journal is full the filter performs every operation on the
source folder unjournaled and ``FolderOverflow.absorb``s the record it would have written:
data records mark 64 KiB extents of their file, size and mode changes mark the file,
renames move the marks, removals drop them. The folder's layout as it was when the overflow
began (``snapshot``, taken before the operation that found the journal full) is what the
replica's layout will be once the journaled records are applied.

The hand-off itself (the tracker made under the sequencer when an append finds the journal
full, no barrier until the resync is complete) is the policy shared with NBD capture,
``engine/journal_first.py``.

:func:`resync_folder` (``JournalingFilter.resync``) then brings the replica forward, with no
barrier journaled from the first unjournaled change to its end, so the replica stays at its
last consistency point meanwhile:

1. under the filter's sequencer: the layout now against the snapshot (``tree_records``:
   removals, folders, symlinks), and for every file marked, new, or no longer the same
   inode under its name, a RESIZE to its size and its mode; such new or replaced files
   are resent whole. Journaling resumes for the VM's operations;
2. the marked extents, a run at a time under the sequencer, found by inode (a file renamed
   since step 1 is read under its new name; one removed since is skipped: its UNLINK is
   journaled);
3. a FLUSH barrier under the sequencer.

When the journal fills up during a resync (for lack of acks, or under the VM's own changes),
what is left is marked again in a fresh overflow whose snapshot is the layout at that moment
(everything up to then is journaled), and a later resync completes the same epoch.
"""

from __future__ import annotations

import asyncio
import functools
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from replicator.engine.journal_first import JournalFirst
from replicator.engine.names import path_problem
from replicator.engine.reconcile import range_records
from replicator.engine.tree import Tree, tree_records
from replicator.journal import JournalFull, Record, RecordType

EXTENT = 64 * 1024
RESYNC_RUN = 16  # extents read and journaled per hold of the sequencer

Work = dict[int, tuple[str, set[int]]]  # inode -> (path now, extents still to send)


@dataclass(frozen=True, slots=True)
class Entry:
    kind: str  # "f", "d", "l"
    mode: int
    ino: int
    target: str = ""
    size: int = 0


def snapshot(source: Path) -> dict[str, Entry]:
    """The folder's layout, with inode numbers and sizes (blocking; a walk of the folder)."""
    out: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(source):
        rel = os.path.relpath(dirpath, source)
        for name in [*dirnames, *filenames]:
            path = name if rel == "." else f"{rel}/{name}"
            if path_problem(path) is not None:
                continue
            try:
                st = os.lstat(os.path.join(dirpath, name))
                if stat.S_ISLNK(st.st_mode):
                    target = os.readlink(os.path.join(dirpath, name))
                    out[path] = Entry("l", 0, st.st_ino, target)
                elif stat.S_ISDIR(st.st_mode):
                    out[path] = Entry("d", st.st_mode & 0o7777, st.st_ino)
                elif stat.S_ISREG(st.st_mode):
                    out[path] = Entry("f", st.st_mode & 0o7777, st.st_ino, size=st.st_size)
            except OSError:
                continue
    return out


def as_tree(layout: dict[str, Entry]) -> Tree:
    tree = Tree()
    for path, e in layout.items():
        if e.kind == "f":
            tree.files[path] = e.mode
        elif e.kind == "d":
            tree.dirs[path] = e.mode
        else:
            tree.links[path] = e.target
    return tree


@dataclass(slots=True)
class FolderOverflow:
    """What changed in the folder without a journal record (see the module docstring)."""

    layout: dict[str, Entry]  # the replica's layout to be: the folder when this began
    extents: dict[str, set[int]] = field(default_factory=dict)
    touched: set[str] = field(default_factory=set)  # size or mode changed
    whole: set[str] = field(default_factory=set)  # content replaced as a whole (FILE)

    def absorb(self, record: Record) -> None:
        path, kind = record.volume, record.type
        if kind in (RecordType.WRITE, RecordType.ZERO, RecordType.TRIM):
            end = record.offset + record.length
            if end > record.offset:
                marks = self.extents.setdefault(path, set())
                marks.update(range(record.offset // EXTENT, (end - 1) // EXTENT + 1))
        elif kind in (RecordType.RESIZE, RecordType.CREATE, RecordType.CHMOD):
            self.touched.add(path)
        elif kind is RecordType.FILE:
            self.whole.add(path)
        elif kind in (RecordType.UNLINK, RecordType.RMDIR, RecordType.SYMLINK):
            self._drop(path)
        elif kind is RecordType.RENAME:
            self._drop(record.target)
            for name in [n for n in self.extents if n == path or n.startswith(path + "/")]:
                self.extents[record.target + name[len(path) :]] = self.extents.pop(name)
            for names in (self.touched, self.whole):
                for name in [n for n in names if n == path or n.startswith(path + "/")]:
                    names.discard(name)
                    names.add(record.target + name[len(path) :])

    def _drop(self, path: str) -> None:
        for name in [n for n in self.extents if n == path or n.startswith(path + "/")]:
            del self.extents[name]
        for names in (self.touched, self.whole):
            names -= {n for n in names if n == path or n.startswith(path + "/")}

    def plan(self, now: dict[str, Entry]) -> tuple[list[Record], Work]:
        """Step 1 of the resync: the records that bring the replica's layout (and sizes and
        modes) to ``now``, and the content still to send, by inode: (path now, extents)."""
        records = tree_records(as_tree(self.layout), as_tree(now))
        work: Work = {}
        for path, entry in sorted(now.items()):
            if entry.kind != "f":
                continue
            before = self.layout.get(path)
            replaced = (
                before is None
                or before.kind != "f"
                or before.ino != entry.ino
                or path in self.whole
            )
            marks = set(range(-(-entry.size // EXTENT))) if replaced else self.extents.get(path)
            if not (replaced or marks or path in self.touched):
                continue
            records.append(Record.resize(path, entry.size))  # creates it if need be
            if replaced or before is None or before.mode != entry.mode or path in self.touched:
                records.append(Record.chmod(path, entry.mode))
            if marks:
                work[entry.ino] = (path, {m for m in marks if m * EXTENT < entry.size})
        return records, work

    def merge_work(self, work: Work) -> None:
        """Extents a resync could not send go back into a (fresh) overflow, under the
        name their file has now (found by inode in this overflow's snapshot)."""
        names = {e.ino: p for p, e in self.layout.items() if e.kind == "f"}
        for ino, (path, marks) in work.items():
            current = names.get(ino, path)
            if marks:
                self.extents.setdefault(current, set()).update(marks)


async def track_folder(source: Path) -> FolderOverflow:
    """A tracker for a folder whose journal just filled up: its layout now (taken before
    the change that did not fit) is what the replica's layout will be."""
    return FolderOverflow(await asyncio.to_thread(snapshot, source))


async def resync_folder(
    capture: JournalFirst[FolderOverflow], source: Path, make_room: Callable[[], Awaitable[bool]]
) -> int:
    """Journal what changed while the journal was full, then a barrier (the module
    docstring). Returns the bytes of content sent; JournalFull when ``make_room`` gives up
    (the rest is tracked again)."""

    async def plan(overflow: FolderOverflow) -> tuple[list[Record], Work]:
        return overflow.plan(await asyncio.to_thread(snapshot, source))

    async def read(path: str, ino: int, run: list[int]) -> list[Record] | None:
        return await asyncio.to_thread(read_records, source, path, ino, run)

    work = await capture.resync_start(plan, make_room)  # step 1: layout, sizes and modes
    if work is None:
        return 0
    sent = 0
    try:
        for ino in list(work):  # step 2: content, by inode, a run at a time
            path, marks = work[ino]
            ordered = sorted(marks)
            while ordered:
                run = ordered[:RESYNC_RUN]
                step = functools.partial(read, path, ino, run)
                batch = await capture.resync_step(step, make_room)
                sent += sum(len(r.data) for r in batch or ())
                ordered = ordered[RESYNC_RUN:]
                marks.difference_update(run)
                if batch is None:
                    break  # removed since: its UNLINK is journaled
            work.pop(ino)
        await capture.resync_close(make_room)  # step 3: the consistency point
    except JournalFull:
        await capture.resync_requeue(lambda overflow: overflow.merge_work(work))
        raise
    await capture.journal.sync()
    return sent


def read_records(source: Path, path: str, ino: int, extents: list[int]) -> list[Record] | None:
    """WRITE (or ZERO or TRIM: allocated zeros or a hole) records of ``extents`` of the
    file with inode ``ino`` (``reconcile.range_records``), looked up under ``path`` and,
    when it moved, anywhere in the folder; None when it is gone."""
    located = _locate(source, path, ino)
    if located is None:
        return None
    records: list[Record] = []
    fd = os.open(source / located, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        for index in extents:
            records += range_records(fd, located, index * EXTENT, EXTENT, EXTENT, size)
    finally:
        os.close(fd)
    return records


def _locate(source: Path, path: str, ino: int) -> str | None:
    try:
        st = os.lstat(source / path)
        if st.st_ino == ino and stat.S_ISREG(st.st_mode):
            return path
    except OSError:
        pass
    for found, entry in snapshot(source).items():
        if entry.ino == ino and entry.kind == "f":
            return found
    return None
