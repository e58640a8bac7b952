"""NBD exports: what a request does to a volume, and the journal-before-ack write path.

``JournaledFileExport`` serves one volume file. Every change is appended to the
write-order journal *before* it touches the file, and the client is answered after
both; FLUSH and FUA are answered only once the journal and the file are durable.

The journal-first rules themselves (one FIFO order from the append until the file has
changed, FLUSH barriers only after a change, the hand-off to ``overflow.py`` when the
journal is full, a volume that *diverged* from its journal) are shared with the FUSE
filter: ``engine/journal_first.py``. All exports of one journal share one
:class:`~replicator.engine.journal_first.JournalFirst`, so the journal order is the
order in which changes reached the files, for overlapping writes and across volumes,
and the sources really passed through the state each FLUSH barrier describes.

Growable images (dynamic VHD, qcow2) are exported larger than the file (see
``images.py``). Reads past the real end return zeros; a write past it extends the
file, preceded in the journal by ``Record.resize(volume, new_size)`` so the replica
grows the same way; zeroing and trimming past the end are clipped and never extend.

If changing the file fails after the record was journaled (disk full, I/O error), the
journal is reconciled: the file's real size and the range's real content are appended
as RESIZE/WRITE records, so the replica still ends up equal to the source. If even
that fails, or fdatasync fails (after which the page cache may have dropped writes),
the volume has diverged: the export refuses further changes with EIO and logs
``nbd.volume_diverged`` (the volume needs a resync).

Record semantics the applier must mirror (journal/records.py): ZERO and TRIM both mean
"the range reads as zeros afterwards"; ZERO keeps it allocated (``NO_HOLE``, a punch the
file system refused: zeroed in place), TRIM deallocates it (a hole was punched); RESIZE
truncates or extends the file to the new size.
"""

from __future__ import annotations

import asyncio
import errno
import os
import weakref
from pathlib import Path
from typing import Final, Protocol

import structlog

from replicator.engine.errors import ConfigError
from replicator.engine.journal_first import Events, JournalFirst
from replicator.engine.nbd.images import ImageInfo, export_size_for, probe_fd
from replicator.engine.nbd.native import encode_writes
from replicator.engine.nbd.native import pwrite_records as pwrite_records  # tests patch it
from replicator.engine.nbd.overflow import EXTENT, DirtyMap
from replicator.engine.nbd.overflow import resync_overflow as resync_overflow  # engine/live.py
from replicator.engine.nbd.proto import Errno, TransmissionFlag
from replicator.engine.reconcile import range_records
from replicator.engine.volumes import Zeroing
from replicator.engine.volumes import pwrite_all as pwrite_all  # tests patch it
from replicator.journal import Journal, JournalFull, Record
from replicator.journal.durable import fdatasync_async as fdatasync_async  # tests patch it
from replicator.journal.records import HEADER_SIZE, decode_records

log = structlog.get_logger("replicator.nbd")

# File I/O at least this large goes to a worker thread, so one huge request does not
# stall the loop. Smaller writes stay in the loop: the sequencer lock serialises them
# anyway, and the thread hop measured slower for 1 MiB sequential writes.
THREAD_MIN: Final = 2 * 1024 * 1024
_ZERO_CHUNK: Final = 1024 * 1024

EVENTS: Final = Events(
    "replicator.nbd", overflow="nbd.journal_overflow", diverged="nbd.volume_diverged"
)


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
    async def write(self, offset: int, data: bytes | memoryview, *, fua: bool) -> None: ...
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


async def _new_dirty_map() -> DirtyMap:
    return DirtyMap()


# the capture of each journal some export serves, by the journal's id: weak values, so an
# entry lives as long as the exports holding its capture (and the capture holds its journal,
# so the id is not reused meanwhile). Weak keys kept every entry for good, the capture
# holding its key: a process that served many runs (an embedding's start()s, each with a
# journal of its own) kept every journal and capture it ever had.
_captures: weakref.WeakValueDictionary[int, JournalFirst[DirtyMap]] = weakref.WeakValueDictionary()


def capture_for(journal: Journal, overflow: bool) -> JournalFirst[DirtyMap]:
    """The journal-first state every export of ``journal`` shares (made by the first).

    Overflow is a property of the journal's capture, not of one export: a full journal
    switches every export of it to tracking at once.
    """
    capture = _captures.get(id(journal))
    if capture is None or capture.journal is not journal:
        capture = JournalFirst(journal, EVENTS, overflow=_new_dirty_map if overflow else None)
        _captures[id(journal)] = capture
    elif capture.overflows != overflow:
        raise ConfigError(
            f"the exports of journal {journal.path} disagree about overflow "
            f"(an earlier one has overflow={capture.overflows})"
        )
    return capture


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
        writes (see ``overflow.py``) instead of answering ENOSPC. Every export of one
        journal must say the same."""
        self.path = Path(path)
        self.volume = volume
        self._name = name if name is not None else self.path.name
        self._journal = journal
        self._seq = capture_for(journal, overflow)
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
        self._zeroing = Zeroing()  # what the file system can do, learnt once
        self._closing = False
        self._closed = False
        self._ops = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._name_bytes = volume.encode()  # the records' volume name (the batch path)
        self._failed_batch = b""  # the records of a batch whose writes failed in part

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
    def capture(self) -> JournalFirst[DirtyMap]:
        """The journal-first state shared by every export of this journal."""
        return self._seq

    @property
    def barriers_allowed(self) -> bool:
        """See ``JournalFirst.barriers_allowed`` (shared by every export of the journal)."""
        return self._seq.barriers_allowed

    @property
    def diverged(self) -> str | None:
        """Why this volume no longer matches its journal (None while all is well)."""
        return self._seq.diverged.get(self.volume)

    # -- bookkeeping ------------------------------------------------------------------

    # Every public operation runs between _enter and _leave (a plain try/finally: an
    # async context manager costs measurable time per 4 KiB request), so aclose can
    # wait for running operations before it closes the file.
    def _enter(self, *, modifies: bool) -> None:
        if self._closing:
            raise NbdIOError(Errno.ESHUTDOWN, f"export {self._name} is closing")
        if modifies and self._seq.diverged:
            reason = self._seq.diverged.get(self.volume)
            if reason is not None:
                raise NbdIOError(Errno.EIO, reason)
        self._ops += 1
        if self._ops == 1:
            self._idle.clear()

    def _leave(self) -> None:
        self._ops -= 1
        if not self._ops:
            self._idle.set()

    def _journal_error(self, exc: Exception) -> NbdIOError:
        """The reply for a journal that could not take a change (nothing was changed)."""
        if isinstance(exc, JournalFull):
            return NbdIOError(Errno.ENOSPC, f"journal full: {exc}")
        log.error("nbd.journal_append_failed", export=self._name, error=str(exc))
        return NbdIOError(Errno.EIO, f"journal append failed: {exc}")

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

    async def write(self, offset: int, data: bytes | memoryview, *, fua: bool) -> None:
        self._enter(modifies=True)
        try:
            end = offset + len(data)
            seq = self._seq
            if not seq.acquire_nowait():
                await seq.acquire()
            try:
                record = Record.write(self.volume, offset, data)
                try:
                    if end > self._file_size:
                        journaled = await seq.append([Record.resize(self.volume, end), record])
                    else:
                        journaled = await seq.append([record])
                except Exception as exc:
                    raise self._journal_error(exc) from exc
                self._file_size = max(self._file_size, end)
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

    def write_batch(
        self, batch: bytes, count: int, payload: int
    ) -> tuple[bytes, list[tuple[int, int]]] | None:
        """The batch path (``native.py``): ``count`` plain WRITEs as received (no flags,
        each inside the file: ``ServerConnection.take_writes``), journaled in one append,
        then written into the file in order, all without waiting, exactly as ``write``
        does one by one. Returns their replies (in order, all successes) and the writes
        that failed as (index, errno); when any failed, the sequencer stays held and the
        caller must ``await finish_batch`` before sending their replies. None: nothing was
        done, the requests take ``write`` (the lock is busy, the journal must roll or is
        full, the export is closing or diverged: ``write`` knows what each means)."""
        seq = self._seq
        if self._closing or (seq.diverged and self.volume in seq.diverged):
            return None
        if not seq.acquire_nowait():
            return None
        name = self._name_bytes
        size = count * (HEADER_SIZE + len(name)) + payload
        encoded: list[bytes] = []

        def encode(lsn: int, ts_ns: int) -> bytes:
            records, replies = encode_writes(batch, count, name, lsn, ts_ns)
            encoded.append(replies)
            encoded.append(records)
            return records

        try:
            if not seq.append_encoded_now(count, size, HEADER_SIZE + len(name) + payload, encode):
                seq.release()
                return None
            replies, records = encoded
            try:
                failed = pwrite_records(self._fd, records, count, len(name))
            finally:
                self._gen += count
        except BaseException:
            seq.release()
            raise
        if failed:
            self._ops += 1  # until finish_batch: aclose waits for it
            self._idle.clear()
            self._failed_batch = records
        else:
            seq.release()
        return replies, failed

    async def finish_batch(self, failed: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """After ``write_batch`` reported failed writes (sequencer held): journal what the
        file really holds in each failed range, as ``write`` does for one, then release
        the sequencer. Returns (index, NBD error) for each. The ranges are read once every
        write of the batch is done, so the truth journaled is the file's final state."""
        records, self._failed_batch = self._failed_batch, b""
        errors: list[tuple[int, int]] = []
        try:
            ranges = [(r.offset, r.length) for r in decode_records(records, verify=False)]
            for index, err in failed:
                offset, length = ranges[index]
                try:
                    await self._reconcile(offset, length, OSError(err, os.strerror(err)), True)
                except NbdIOError as exc:
                    errors.append((index, exc.errno))
        finally:
            self._seq.release()
            self._leave()
        return errors

    async def write_zeroes(self, offset: int, length: int, *, fua: bool, may_trim: bool) -> None:
        await self._zero(offset, length, fua=fua, punch=may_trim)

    async def trim(self, offset: int, length: int, *, fua: bool) -> None:
        await self._zero(offset, length, fua=fua, punch=True)

    async def _zero(self, offset: int, length: int, *, fua: bool, punch: bool) -> None:
        """Make a range read as zeros: a hole where ``punch`` allows and the file system
        can (journaled as TRIM), else zeros kept allocated (ZERO; ``NO_HOLE``), so the
        replica keeps the allocation this file has (journal/records.py)."""
        self._enter(modifies=True)
        try:
            async with self._seq:
                end = min(offset + length, self._file_size)  # never extend the file
                if end <= offset:
                    return
                punch = punch and self._zeroing.can_punch
                make = Record.trim if punch else Record.zero
                try:
                    journaled = await self._seq.append([make(self.volume, offset, end - offset)])
                except Exception as exc:
                    raise self._journal_error(exc) from exc
                try:
                    if end - offset > _ZERO_CHUNK:
                        punched = await asyncio.to_thread(
                            self._zero_range, offset, end - offset, punch
                        )
                    else:
                        punched = self._zero_range(offset, end - offset, punch)
                except OSError as exc:
                    await self._reconcile(offset, end - offset, exc, journaled)
                finally:
                    self._gen += 1
                if punch and not punched and journaled:
                    await self._refused_punch(offset, end - offset)
            if fua:
                await self._commit()
        finally:
            self._leave()

    def _zero_range(self, offset: int, length: int, punch: bool) -> bool:
        """Punch a hole, or zero the range in place keeping it allocated (``Zeroing``);
        whether a hole was punched."""
        if punch:
            return self._zeroing.punch(self._fd, offset, length)
        self._zeroing.zero(self._fd, offset, length)
        return False

    async def _refused_punch(self, offset: int, length: int) -> None:
        """The file system refused a punch journaled as TRIM (learnt once; later ones are
        journaled as ZERO): the range was zeroed in place, and a ZERO says so."""
        try:
            await self._seq.append([Record.zero(self.volume, offset, length)])
        except Exception as exc:
            self._seq.diverge(
                self.volume,
                f"{self.volume} keeps zeros allocated where its journal says a hole ({exc}); "
                "a full resync is needed",
            )
            raise self._journal_error(exc) from exc

    async def _reconcile(self, offset: int, length: int, exc: OSError, journaled: bool) -> None:
        """Journal what the file really holds after a failed change, then raise.

        An unjournaled change (overflow) is already tracked: its resync reads the truth.
        """
        log.error(
            "nbd.write_failed", export=self._name, offset=offset, length=length, error=str(exc)
        )
        if journaled:
            size = await self._seq.reconcile(
                self.volume, self._fd, self.volume, offset, length, exc, known_size=self._file_size
            )
            if size is not None:
                self._file_size = size
        raise NbdIOError(nbd_errno(exc), str(exc)) from exc

    def extent_records(self, offset: int, length: int) -> list[Record]:
        """Records that give the replica this range's current bytes and allocation: WRITE
        per extent of data, ZERO for zeros the file holds allocated, TRIM for its holes
        (``range_records``). Clipped to the file; sequencer held."""
        return list(range_records(self._fd, self.volume, offset, length, EXTENT, self._file_size))

    # -- durability -------------------------------------------------------------------

    async def flush(self) -> None:
        self._enter(modifies=True)
        try:
            try:
                await self._seq.barrier()
            except Exception as exc:
                raise self._journal_error(exc) from exc
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
            reason = (
                f"fdatasync of {self.path} failed ({exc}); acknowledged writes may be lost "
                "from the source file, a full resync is needed"
            )
            self._seq.diverge(self.volume, reason)
            raise NbdIOError(Errno.EIO, reason) from exc
        finally:
            self._sync_task = None
        self._synced_gen = max(self._synced_gen, gen)

    async def aclose(self) -> None:
        """Refuse new requests, wait for running ones, flush, close the file. Idempotent."""
        if self._closed:
            return
        try:
            if not self._closing and self.diverged is None:
                await self.flush()
        finally:
            self._closing = True
            await self._idle.wait()
            if not self._closed:
                self._closed = True
                os.close(self._fd)


def _retrieve(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()  # each waiter gets it through shield; silence "never retrieved"
