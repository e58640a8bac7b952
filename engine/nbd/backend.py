"""NBD exports: what a request does to a volume, and the journal-before-ack write path.

``JournaledFileExport`` serves one volume file. Every change is appended to the
write-order journal *before* it touches the file, and the client is answered after
both; FLUSH and FUA are answered only once the journal and the file are durable.

Ordering. All exports sharing one journal share one :class:`_Sequencer` lock, held
from the journal append until the file has been changed. So the journal order is the
order in which changes reached the files, for overlapping writes too, and when a FLUSH
record is appended every earlier record is already in the files and no later one is:
the sources really passed through the state each FLUSH barrier describes.

Growable images (dynamic VHD, qcow2) are exported larger than the file (see
``images.py``). Reads past the real end return zeros; a write past it extends the
file, preceded in the journal by ``Record.resize(volume, new_size)`` so the replica
grows the same way; zeroing and trimming past the end are clipped and never extend.

If changing the file fails after the record was journaled (disk full, I/O error), the
journal is reconciled: the file's real size and the range's real content are appended
as RESIZE/WRITE records, so the replica still ends up equal to the source. If even
that fails, or fdatasync fails (after which the page cache may have dropped writes),
the export refuses further changes with EIO and logs that the volume needs a resync.

Record semantics the applier must mirror: ZERO and TRIM both mean "the range reads as
zeros afterwards" (the source punches a hole or writes zeros); RESIZE truncates or
extends the file to the new size.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import os
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Final, Protocol

import structlog

from replicator.engine.errors import ConfigError
from replicator.engine.nbd.images import ImageInfo, export_size_for, probe_fd
from replicator.engine.nbd.overflow import EXTENT, DirtyMap
from replicator.engine.nbd.proto import Errno, TransmissionFlag
from replicator.engine.reconcile import truth_records
from replicator.engine.volumes import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    NO_FALLOCATE,
    fallocate,
    write_zeros,
)
from replicator.engine.volumes import pwrite_all as pwrite_all  # tests patch it
from replicator.journal import Journal, JournalFull, Record, RecordType
from replicator.journal.durable import fdatasync_async as fdatasync_async  # tests patch it

log = structlog.get_logger("replicator.nbd")

# File I/O at least this large goes to a worker thread, so one huge request does not
# stall the loop. Smaller writes stay in the loop: the sequencer lock serialises them
# anyway, and the thread hop measured slower for 1 MiB sequential writes.
THREAD_MIN: Final = 2 * 1024 * 1024
_ZERO_CHUNK: Final = 1024 * 1024


class NbdIOError(Exception):
    """An export operation failed; ``errno`` is the NBD error value to reply with."""

    def __init__(self, errno_value: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno_value


class Export(Protocol):
    """What the server needs from an export. ``flags``: the TransmissionFlags honoured."""

    @property
    def name(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def flags(self) -> int: ...

    async def read(self, offset: int, length: int) -> bytes: ...
    async def write(self, offset: int, data: bytes, *, fua: bool) -> None: ...
    async def write_zeroes(
        self, offset: int, length: int, *, fua: bool, may_trim: bool
    ) -> None: ...
    async def trim(self, offset: int, length: int, *, fua: bool) -> None: ...
    async def flush(self) -> None: ...
    async def aclose(self) -> None: ...


def nbd_errno(exc: OSError) -> int:
    """Map an OS error to the few values the NBD protocol allows."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return Errno.ENOSPC
    if exc.errno in (errno.EPERM, errno.EACCES, errno.EROFS):
        return Errno.EPERM
    return Errno.EIO


class _Sequencer:
    """Shared by every export of one journal: see "Ordering" in the module docstring.

    A FIFO lock whose uncontended acquire (``acquire_nowait``) is a plain call: with
    ``asyncio.Lock`` the three coroutines of ``async with`` cost ~5% of a 4 KiB write.
    """

    def __init__(self) -> None:
        self._locked = False
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.dirty = False  # a change was journaled since the last FLUSH record
        # the journal was full: changes go unjournaled and are marked here (overflow.py)
        self.overflow: DirtyMap | None = None
        self.resyncing = False  # a resync epoch is being journaled

    @property
    def barriers_allowed(self) -> bool:
        """False from the first unjournaled change until its resync's closing barrier:
        a barrier meanwhile would make the receiver apply a state the volumes never had."""
        return self.overflow is None and not self.resyncing

    def acquire_nowait(self) -> bool:
        if self._locked:
            return False
        self._locked = True
        return True

    async def acquire(self) -> None:
        if self.acquire_nowait():
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut  # release() hands the lock straight to the first waiter
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # handed over just as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # stays locked, now owned by that waiter
                return
        self._locked = False

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """For the paths where speed does not matter (flush, zeroing)."""
        await self.acquire()
        try:
            yield
        finally:
            self.release()


_sequencers: weakref.WeakKeyDictionary[Journal, _Sequencer] = weakref.WeakKeyDictionary()


def _sequencer_for(journal: Journal) -> _Sequencer:
    seq = _sequencers.get(journal)
    if seq is None:
        seq = _sequencers[journal] = _Sequencer()
    return seq


class JournaledFileExport:
    """A volume file served over NBD, every change journaled before it is acknowledged.

    ``export_size`` overrides the size computed from the image header; it may not be
    smaller than the file. The export owns its file descriptor, not the journal.
    """

    FLAGS: Final = (
        TransmissionFlag.SEND_FLUSH
        | TransmissionFlag.SEND_FUA
        | TransmissionFlag.SEND_TRIM
        | TransmissionFlag.SEND_WRITE_ZEROES
        # FLUSH syncs the journal and the file, shared by all connections
        | TransmissionFlag.CAN_MULTI_CONN
    )

    def __init__(
        self,
        journal: Journal,
        path: str | os.PathLike[str],
        volume: str,
        export_size: int | None = None,
        *,
        name: str | None = None,
        thread_min: int = THREAD_MIN,
        overflow: bool = False,
    ) -> None:
        """``overflow``: when the journal is full, track changed extents and keep serving
        writes (see ``overflow.py``) instead of answering ENOSPC."""
        self.path = Path(path)
        self._overflow_ok = overflow
        self.volume = volume
        self._name = name if name is not None else self.path.name
        self._journal = journal
        self._seq = _sequencer_for(journal)
        self._thread_min = thread_min
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(
                f"{self.path}: cannot open the volume for reading and writing: {exc.strerror}"
            ) from exc
        try:
            self.image: ImageInfo = probe_fd(self._fd, name=str(self.path))
            self._size = export_size_for(self.image, str(self.path), export_size)
        except BaseException:
            os.close(self._fd)
            raise
        self._file_size = self.image.file_size
        self._gen = 0  # changes whose file write completed
        self._synced_gen = 0  # changes covered by a completed fdatasync
        self._sync_task: asyncio.Future[None] | None = None
        self._can_punch = True
        self._can_zero_range = True
        self._broken: str | None = None
        self._closing = False
        self._closed = False
        self._ops = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # -- Export protocol properties -------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def size(self) -> int:
        return self._size

    @property
    def flags(self) -> int:
        return int(self.FLAGS)

    @property
    def file_size(self) -> int:
        """The real size of the volume file (grows as a growable image allocates)."""
        return self._file_size

    @property
    def barriers_allowed(self) -> bool:
        """See ``_Sequencer.barriers_allowed`` (shared by every export of the journal)."""
        return self._seq.barriers_allowed

    # -- bookkeeping ------------------------------------------------------------------

    # Every public operation runs between _enter and _leave (a plain try/finally: an
    # async context manager costs measurable time per 4 KiB request), so aclose can
    # wait for running operations before it closes the file.
    def _enter(self, *, modifies: bool) -> None:
        if self._closing:
            raise NbdIOError(Errno.ESHUTDOWN, f"export {self._name} is closing")
        if modifies and self._broken is not None:
            raise NbdIOError(Errno.EIO, self._broken)
        self._ops += 1
        if self._ops == 1:
            self._idle.clear()

    def _leave(self) -> None:
        self._ops -= 1
        if not self._ops:
            self._idle.set()

    async def _append(self, records: list[Record]) -> bool:
        """Journal ``records`` (sequencer held); False when the journal is full and the
        change is tracked in the overflow map instead (the caller marks it)."""
        if self._seq.overflow is not None:
            return False
        cap = self._journal.max_bytes
        try:
            if self._overflow_ok and cap is not None:
                size = sum(r.encoded_size for r in records)
                if size > cap // 2:  # could never fit beside the records waiting for acks
                    raise JournalFull(self._journal.bytes_used, cap, size)
            await self._journal.append_many(records)
        except JournalFull as exc:
            if not self._overflow_ok:
                raise NbdIOError(Errno.ENOSPC, f"journal full: {exc}") from exc
            self._seq.overflow = DirtyMap()
            log.warning(
                "nbd.journal_overflow",
                export=self._name,
                journal_bytes=exc.used,
                cap=exc.cap,
                action="writes continue unjournaled and their extents are tracked; the "
                "replica stays at its last consistency point until they are resynced",
            )
            return False
        except Exception as exc:
            log.error("nbd.journal_append_failed", export=self._name, error=str(exc))
            raise NbdIOError(Errno.EIO, f"journal append failed: {exc}") from exc
        return True

    def _mark(self, offset: int, length: int) -> None:
        overflow = self._seq.overflow
        assert overflow is not None
        overflow.mark(self.volume, offset, length, self._file_size)

    # -- reads ------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        self._enter(modifies=False)
        try:
            n = min(length, self._file_size - offset)
            if n <= 0:
                return bytes(length)
            try:
                if n >= self._thread_min:
                    data = await asyncio.to_thread(os.pread, self._fd, n, offset)
                else:
                    data = os.pread(self._fd, n, offset)
            except OSError as exc:
                log.error("nbd.read_failed", export=self._name, offset=offset, error=str(exc))
                raise NbdIOError(nbd_errno(exc), str(exc)) from exc
            if len(data) < length:
                data += bytes(length - len(data))
            return data
        finally:
            self._leave()

    # -- changes ----------------------------------------------------------------------

    async def write(self, offset: int, data: bytes, *, fua: bool) -> None:
        self._enter(modifies=True)
        try:
            end = offset + len(data)
            seq = self._seq
            if not seq.acquire_nowait():
                await seq.acquire()
            try:
                record = Record.write(self.volume, offset, data)
                if end > self._file_size:
                    journaled = await self._append([Record.resize(self.volume, end), record])
                else:
                    journaled = await self._append([record])
                seq.dirty |= journaled
                self._file_size = max(self._file_size, end)
                if not journaled:
                    self._mark(offset, len(data))  # before the file: a failure is marked too
                try:
                    if len(data) >= self._thread_min:
                        await asyncio.to_thread(pwrite_all, self._fd, data, offset)
                    else:
                        pwrite_all(self._fd, data, offset)
                except OSError as exc:
                    await self._reconcile(offset, len(data), exc, journaled)
                finally:
                    self._gen += 1
            finally:
                seq.release()
            if fua:
                await self._commit()
        finally:
            self._leave()

    async def write_zeroes(self, offset: int, length: int, *, fua: bool, may_trim: bool) -> None:
        await self._zero(Record.zero, offset, length, fua=fua, punch=may_trim)

    async def trim(self, offset: int, length: int, *, fua: bool) -> None:
        await self._zero(Record.trim, offset, length, fua=fua, punch=True)

    async def _zero(
        self, make: _RangeRecord, offset: int, length: int, *, fua: bool, punch: bool
    ) -> None:
        self._enter(modifies=True)
        try:
            async with self._seq.held():
                end = min(offset + length, self._file_size)  # never extend the file
                if end <= offset:
                    return
                journaled = await self._append([make(self.volume, offset, end - offset)])
                self._seq.dirty |= journaled
                if not journaled:
                    self._mark(offset, end - offset)
                try:
                    if end - offset > _ZERO_CHUNK:
                        await asyncio.to_thread(self._zero_range, offset, end - offset, punch)
                    else:
                        self._zero_range(offset, end - offset, punch)
                except OSError as exc:
                    await self._reconcile(offset, end - offset, exc, journaled)
                finally:
                    self._gen += 1
            if fua:
                await self._commit()
        finally:
            self._leave()

    def _zero_range(self, offset: int, length: int, punch: bool) -> None:
        """Make the range read as zeros: punch a hole, zero it in place, or write zeros."""
        if punch and self._can_punch:
            try:
                fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as exc:
                if exc.errno not in NO_FALLOCATE:
                    raise
                self._can_punch = False
        if self._can_zero_range:
            try:
                fallocate(self._fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as exc:
                if exc.errno not in NO_FALLOCATE:
                    raise
                self._can_zero_range = False
        write_zeros(self._fd, offset, length)

    async def _reconcile(self, offset: int, length: int, exc: OSError, journaled: bool) -> None:
        """Journal what the file really holds after a failed change, then raise.

        The record of the failed change is already in the journal; the records
        appended here override it, so the replica converges to the source again. An
        unjournaled change (overflow) is already marked: its resync reads the truth.
        """
        log.error(
            "nbd.write_failed", export=self._name, offset=offset, length=length, error=str(exc)
        )
        if not journaled:
            raise NbdIOError(nbd_errno(exc), str(exc)) from exc
        try:
            for record in truth_records(self._fd, self.volume, offset, length, self._file_size):
                if not await self._append([record]):  # the journal filled up meanwhile
                    self._mark(offset, length)
                    break
                if record.type is RecordType.RESIZE:
                    self._file_size = record.size
        except (OSError, NbdIOError) as again:
            self._broken = (
                f"volume {self.volume} ({self.path}) may differ from its journal after a "
                f"failed write ({exc}) and a failed recovery ({again}); a full resync is needed"
            )
            log.critical("nbd.volume_diverged", export=self._name, reason=self._broken)
        raise NbdIOError(nbd_errno(exc), str(exc)) from exc

    def extent_records(self, offset: int, length: int) -> list[Record]:
        """Records that give the replica this range's current bytes: WRITE per extent,
        ZERO for extents of zeros (holes stay holes). Clipped to the file; sequencer held."""
        end = min(offset + length, self._file_size)
        records: list[Record] = []
        for start in range(offset, end, EXTENT):
            n = min(EXTENT, end - start)
            data = os.pread(self._fd, n, start)
            if data.count(0) == len(data):
                records.append(Record.zero(self.volume, start, n))
            else:
                records.append(Record.write(self.volume, start, data))
        return records

    # -- durability -------------------------------------------------------------------

    async def flush(self) -> None:
        self._enter(modifies=True)
        try:
            seq = self._seq
            if seq.dirty and seq.barriers_allowed:
                async with seq.held():
                    if seq.dirty and seq.barriers_allowed and await self._append([Record.flush()]):
                        seq.dirty = False
            await self._commit()
        finally:
            self._leave()

    async def _commit(self) -> None:
        """Journal and file durable for every change completed before this call."""
        results = await asyncio.gather(
            self._journal.sync(), self._datasync(), return_exceptions=True
        )
        for result in results:
            if isinstance(result, NbdIOError):
                raise result
            if isinstance(result, BaseException):
                log.error("nbd.sync_failed", export=self._name, error=str(result))
                raise NbdIOError(Errno.EIO, f"sync failed: {result}") from result

    async def _datasync(self) -> None:
        """fdatasync of the file, shared by concurrent callers (group commit)."""
        target = self._gen
        while self._synced_gen < target:
            task = self._sync_task
            if task is None:
                task = self._sync_task = asyncio.ensure_future(self._run_datasync())
                task.add_done_callback(_retrieve)
            await asyncio.shield(task)

    async def _run_datasync(self) -> None:
        gen = self._gen  # every change counted here has completed its file write
        try:
            await fdatasync_async(self._fd)
        except OSError as exc:
            self._broken = (
                f"fdatasync of {self.path} failed ({exc}); acknowledged writes may be lost "
                "from the source file, a full resync is needed"
            )
            log.critical("nbd.volume_diverged", export=self._name, reason=self._broken)
            raise NbdIOError(Errno.EIO, self._broken) from exc
        finally:
            self._sync_task = None
        self._synced_gen = max(self._synced_gen, gen)

    async def aclose(self) -> None:
        """Refuse new requests, wait for running ones, flush, close the file. Idempotent."""
        if self._closed:
            return
        try:
            if not self._closing and self._broken is None:
                await self.flush()
        finally:
            self._closing = True
            await self._idle.wait()
            if not self._closed:
                self._closed = True
                os.close(self._fd)


class _RangeRecord(Protocol):
    def __call__(self, volume: str, offset: int, length: int, /) -> Record: ...


def _retrieve(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()  # each waiter gets it through shield; silence "never retrieved"


async def resync_overflow(
    exports: list[JournaledFileExport], make_room: Callable[[], Awaitable[bool]]
) -> int:
    """Journal every extent changed while the journal was full, then a barrier (see
    ``overflow.py``). Returns the bytes journaled.

    The epoch can be larger than the journal: when it fills up, ``make_room`` is awaited
    outside the sequencer (the sender drops records the receiver already holds durably,
    then waits for acks) and the run is read again. When it says there is no way
    (``False``: the receiver is gone) the rest goes back into the overflow map, the epoch
    stays open (no barrier), and JournalFull is raised.
    """
    if not exports:
        return 0
    journal = exports[0]._journal
    seq = exports[0]._seq
    by_volume = {e.volume: e for e in exports}
    async with seq.held():
        if seq.overflow is None:
            return 0
        work = seq.overflow.take()
        seq.overflow = None
        seq.resyncing = True
    sent = 0

    async def journaled(read: Callable[[], list[Record]]) -> list[Record]:
        while True:
            async with seq.held():
                records = read()
                try:
                    if records:
                        await journal.append_many(records)
                    return records
                except JournalFull:
                    pass
            if not await make_room():
                raise JournalFull(journal.bytes_used, journal.max_bytes or 0, 0)

    try:
        # grown files first: writes past the old end need the room
        grown = [v for v, dirt in work.volumes.items() if dirt.grown_to]
        await journaled(lambda: [Record.resize(v, by_volume[v]._file_size) for v in grown])
        for v in grown:
            work.volumes[v].grown_to = 0
        for volume in list(work.volumes):
            export = by_volume[volume]
            for offset, length in list(work.runs(volume)):
                records = await journaled(functools.partial(export.extent_records, offset, length))
                work.without(volume, offset, length)
                sent += sum(len(r.data) for r in records)
        await journaled(lambda: [Record.flush()])
        async with seq.held():
            seq.dirty = False
            seq.resyncing = False
    except JournalFull:
        async with seq.held():
            if seq.overflow is None:
                seq.overflow = DirtyMap()
            seq.overflow.merge(work)  # resyncing stays set: no barrier until it is all in
        raise
    await journal.sync()
    return sent
