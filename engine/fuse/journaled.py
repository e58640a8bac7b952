"""The filter's side of the journal-first policy: how a handler journals a change.

The rules themselves (one FIFO order from the record until the change, barriers only
after a change, the overflow hand-off when the journal is full, divergence) are shared
with the NBD exports in ``engine/journal_first.py``; :class:`JournaledOps` holds the
filter's :class:`~replicator.engine.journal_first.JournalFirst` (the *sequencer*, one
for the whole folder) and adds what is the filter's own:

* a namespace record (CREATE, UNLINK, RENAME, MKDIR, RMDIR, SYMLINK) is written out to
  the kernel before its change is made: a rescan after this process dies finds changed
  content in the files, never what was removed or renamed, so that record must not die
  with the process;
* a metadata change that fails after its record was appended is *undone* by journaling
  the inverse record (CREATE -> UNLINK, MKDIR -> RMDIR, ...); where there is none
  (UNLINK, RENAME), or an fsync of a real file fails, the folder *diverges*: every
  further change is refused with EIO and ``fuse.replica_diverged`` is logged;
* fsync, fdatasync and a close of a changed file answer after a FLUSH barrier,
  ``journal.sync()`` (group commit) and the real file's fsync.

The handlers themselves are in ``tree_ops.py`` (names and directories) and ``filter.py``
(file contents and attributes).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pyfuse3
import structlog

from replicator.engine.folder_guard import FolderGuard
from replicator.engine.fuse.overflow import FolderOverflow, resync_folder, track_folder
from replicator.engine.fuse.replies import err
from replicator.engine.fuse.view import Handle, SourceView
from replicator.engine.journal_first import Events, JournalFirst
from replicator.journal import durable
from replicator.journal.journal import Journal
from replicator.journal.records import NAMESPACE_TYPES, Record

log = structlog.get_logger("replicator.fuse")

EVENTS: Final = Events(
    "replicator.fuse", overflow="fuse.journal_overflow", diverged="fuse.replica_diverged"
)


@dataclass(slots=True)
class FilterStats:
    writes: int = 0
    bytes_written: int = 0
    max_write: int = 0  # largest single write request seen (shows the kernel's max_write)
    syncs: int = 0
    journal_first: JournalFirst[FolderOverflow] | None = field(default=None, repr=False)

    @property
    def records(self) -> int:
        """Records journaled through the filter (changes, corrections, barriers)."""
        return self.journal_first.journaled if self.journal_first is not None else 0


class JournaledOps(pyfuse3.Operations):
    """State and journal-first steps shared by every handler (see the module docstring)."""

    def __init__(
        self,
        source: Path,
        journal: Journal,
        *,
        overflow: bool = False,
        guard: FolderGuard | None = None,
    ) -> None:
        """``overflow``: at a full journal keep serving and track changes (overflow.py)
        instead of answering ENOSPC. ``guard``: QEMU's deny-write locks on SOURCE_DIR's
        disk images, told of every name the filter creates, renames or removes (the
        sender's; engine/folder_guard.py)."""
        super().__init__()
        self.source = source
        self.journal = journal
        self.guard = guard
        self.overflow_ok = overflow
        self._seq: JournalFirst[FolderOverflow] = JournalFirst(
            journal,
            EVENTS,
            overflow=functools.partial(track_folder, source) if overflow else None,
        )
        self._scope = str(source)  # the whole folder diverges at once
        self.view = SourceView(source)
        self.stats = FilterStats(journal_first=self._seq)
        self._chown = os.geteuid() == 0
        # operations the replica cannot follow: op -> (last log line, refused since then)
        self.refused_logged: dict[str, tuple[float, int]] = {}

    @property
    def journal_first(self) -> JournalFirst[FolderOverflow]:
        """The lock and state that order every change with the journal (see barrier_now)."""
        return self._seq

    @property
    def diverged(self) -> str | None:
        """Why the replica can no longer follow the source (None while all is well)."""
        return self._seq.diverged.get(self._scope)

    @property
    def barriers_allowed(self) -> bool:
        """False from the first unjournaled change until its resync ends (overflow.py)."""
        return self._seq.barriers_allowed

    def _own(self, real: str, ctx: pyfuse3.RequestContext) -> None:
        """Give a new entry to the caller, as a kernel file system would (not replicated)."""
        if self._chown:
            try:
                os.lchown(real, ctx.uid, ctx.gid)
            except OSError as exc:
                log.warning("fuse.chown_failed", path=real, error=exc.strerror)

    def _check_healthy(self) -> None:
        if self._seq.diverged:
            raise err(errno.EIO)

    def _diverge(self, reason: str) -> None:
        self._seq.diverge(self._scope, reason)

    async def _append(self, *records: Record) -> None:
        """Journal ``records`` in order, before the change (call with the sequencer held).

        At a full journal with overflow on, the change is tracked instead and is made
        unjournaled. A namespace record is written out to the kernel first.
        """
        self._check_healthy()
        if await self._seq.append(records) and any(r.type in NAMESPACE_TYPES for r in records):
            await self.journal.write_out()

    async def _undo(self, record: Record, what: str) -> None:
        """Journal the inverse of a change that failed after its record was appended."""
        try:
            await self._append(record)
        except Exception as exc:
            self._diverge(f"{what} failed and its journal record could not be undone: {exc}")

    async def _reconcile(
        self, fd: int, name: str, offset: int, length: int, failure: BaseException
    ) -> None:
        """A change of ``[offset, offset+length)`` failed after journaling: journal what the
        file really holds (its size, the range's bytes), whatever part of it happened."""
        await self._seq.reconcile(self._scope, fd, name, offset, length, failure)

    async def _sync_file(self, handle: Handle, datasync: bool) -> None:
        """Barrier, then the journal and the real file durable (fsync, fdatasync, flush)."""
        self._check_healthy()
        handle.node.dirty = False
        await self._seq.barrier()
        sync_file = durable.fdatasync_async if datasync else durable.fsync_async
        results = await asyncio.gather(
            self.journal.sync(), sync_file(handle.fd), return_exceptions=True
        )
        self.stats.syncs += 1
        file_result = results[1]
        if isinstance(file_result, OSError):
            # after a failed fsync the page cache may have dropped writes we journaled
            handle.node.dirty = True
            self._diverge(f"fsync of a source file failed: {file_result.strerror}")
            raise file_result
        for result in results:
            if isinstance(result, BaseException):
                handle.node.dirty = True
                raise result

    async def _sync_dir(self, real: str) -> None:
        """Barrier, then the journal and the real directory durable (fsyncdir)."""
        self._check_healthy()
        await self._seq.barrier()
        await asyncio.gather(self.journal.sync(), asyncio.to_thread(durable.sync_dir, real))
        self.stats.syncs += 1

    async def resync(self, make_room: Callable[[], Awaitable[bool]]) -> int:
        """Journal what changed while the journal was full, then a barrier (overflow.py).
        Returns the bytes of content sent; JournalFull when ``make_room`` gives up (the
        rest is tracked again)."""
        return await resync_folder(self._seq, self.source, make_room)

    async def aclose(self) -> None:
        """Make everything journaled durable and close the real files. Idempotent."""
        try:
            if not self._seq.diverged:
                await self._seq.barrier()
            await self.journal.sync()
        finally:
            self.view.close_all()
