"""Snapshot-diff capture: compare each volume with a basis manifest, journal what changed.

One scan is one EPOCH: RESIZE records first (so the replica has room), then WRITE records
for changed data extents (adjacent ones coalesced up to ``MAX_WRITE``), ZERO records for
extents that became zeros the file keeps allocated and TRIM records for those that became
holes (so the replica's allocation follows the source's: a thick disk stays thick, a
sparse one sparse), FILE records for changed configuration files, and
finally the EPOCH record, the consistency point. Reading and hashing run in a worker
thread, a few MiB per hop, so the event loop keeps shipping while the scan goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field

import structlog

from replicator.engine.extent_hasher import iter_extents_against
from replicator.engine.manifest import UNKNOWN, ExtentManifest, ManifestSet
from replicator.engine.names import file_mode
from replicator.engine.volumes import (
    Extent,
    ExtentState,
    Holes,
    Unchanged,
    VolumeKind,
    VolumeSpec,
    allocated_ranges,
    extent_digest,
    iter_runs,
    open_volume,
    split_by,
    volume_stat,
)
from replicator.journal import Journal, JournalFull, Record

MAX_WRITE = 1024 * 1024  # bytes of data per WRITE record
BATCH_BYTES = 4 * 1024 * 1024  # records handed from the scan thread to the loop per hop
PROGRESS_BYTES = 64 * 1024 * 1024  # the scan thread reports back at least this often
SYNC_EVERY = 64 * 1024 * 1024  # changed bytes the scan may get ahead of a running sync
HOLE_PIECE = 65_536  # hole extents compared at once (1 MiB of digests; chunks' edges)
HOLE_BLOCK = 1024  # of those, compared in blocks this long, one by one inside one that differs
SIZE_PASSES = 3  # scans of a disk whose size changed while it was read, before its point

log = structlog.get_logger()

Progress = Callable[[int, int], None]  # (bytes scanned so far, bytes to scan in all)


@dataclass(slots=True)
class ScanStats:
    bytes_scanned: int = 0
    bytes_changed: int = 0  # data bytes in WRITE/FILE records
    bytes_zeroed: int = 0  # bytes covered by ZERO and TRIM records
    extents_changed: int = 0
    files_changed: int = 0
    records: int = 0
    resized: list[str] = field(default_factory=list)
    bytes_copied: int = 0  # of bytes_changed: copied before a freeze (engine/sender.py)

    def add(self, other: ScanStats) -> None:
        self.bytes_copied += other.bytes_copied
        self.bytes_scanned += other.bytes_scanned
        self.bytes_changed += other.bytes_changed
        self.bytes_zeroed += other.bytes_zeroed
        self.extents_changed += other.extents_changed
        self.files_changed += other.files_changed
        self.records += other.records
        self.resized.extend(other.resized)


def _disk_batches(
    spec: VolumeSpec,
    basis: ExtentManifest,
    new: ExtentManifest,
    stats: ScanStats,
    batch_limit: int,
    grown_from: int | None = None,
) -> Generator[list[Record], None, None]:
    """Yield batches of records for one disk; fills ``new`` with the digests seen.

    ``grown_from``: where this scan's RESIZE grows the replica (0 on a first sync), from
    which it is a hole there. The basis says zeros for those extents, so zeros of the
    source are no change of content; where the source holds them allocated, a ZERO
    record still goes, or the replica of a thick disk would be sparse."""
    fd = open_volume(spec)
    try:
        # the size the RESIZE record and ``new`` were made for: a file that grew since is
        # read up to it (the next scan sees the growth), one that shrank reads as zeros
        size = new.size
        grown = size if grown_from is None else grown_from
        batch: list[Record] = []
        batch_bytes = 0
        write_off = -1
        write_buf = bytearray()
        zero_off = -1
        zero_len = 0
        zero_kept = True  # the run of zeros is allocated (ZERO), or a hole (TRIM)
        since_yield = 0

        def flush_write() -> None:
            nonlocal write_off, batch_bytes
            if write_buf:
                batch.append(Record.write(spec.name, write_off, bytes(write_buf)))
                batch_bytes += len(write_buf)
                stats.bytes_changed += len(write_buf)
                write_buf.clear()
            write_off = -1

        def flush_zero() -> None:
            nonlocal zero_off, zero_len
            if zero_len:
                make = Record.zero if zero_kept else Record.trim
                batch.append(make(spec.name, zero_off, zero_len))
                stats.bytes_zeroed += zero_len
            zero_off, zero_len = -1, 0

        def add_zero(offset: int, length: int, kept: bool) -> None:
            nonlocal zero_off, zero_len, zero_kept
            if zero_len and zero_off + zero_len == offset and zero_kept == kept:
                zero_len += length
            else:
                flush_zero()
                zero_off, zero_len, zero_kept = offset, length, kept

        old_count, extent_size = basis.count, new.extent_size
        put_digest, old_get = new.set, basis.get

        def one_extent(ext: Extent) -> None:
            """An extent that changed, or one as the threads read it (every extent)."""
            nonlocal write_off, write_buf, zero_off, zero_len
            stats.bytes_scanned += ext.length
            put_digest(ext.index, ext.digest)
            # beyond the basis is UNKNOWN, never a digest
            if ext.index < old_count and old_get(ext.index) == ext.digest:
                if write_buf:
                    flush_write()
                if ext.offset >= grown and ext.state is ExtentState.ZERO:
                    add_zero(ext.offset, ext.length, True)  # allocated; a hole there
                elif zero_len:
                    flush_zero()
            elif ext.state is ExtentState.DATA:
                assert ext.data is not None
                flush_zero()
                stats.extents_changed += 1
                if write_buf and (
                    write_off + len(write_buf) != ext.offset or len(write_buf) >= MAX_WRITE
                ):
                    flush_write()
                if not write_buf:
                    write_off = ext.offset
                write_buf += ext.data
            else:  # zeros read: in a range SEEK_DATA calls data, so allocated
                flush_write()
                stats.extents_changed += 1
                add_zero(ext.offset, ext.length, True)

        def holes(run: Holes) -> None:
            """A run of holes as SEEK_DATA sees them: records for the extents the basis
            does not know as zeros, compared a piece at a time (a 2 TiB hole is 512 MiB of
            digests), a whole chunk at once where the basis holds the shared chunk of
            holes (``ExtentManifest.hole_runs``). TRIM where the file has no blocks, ZERO
            where it has unwritten ones (fallocated, ``preallocation=falloc``: holes to
            SEEK_DATA on ext4 and XFS)."""
            piece, end = run.first, run.first + run.count
            while piece < end:
                # pieces end on HOLE_PIECE's edges, which are chunks' edges: the chunks of
                # the manifests inside one are whole, and shared when they are holes
                count = min(HOLE_PIECE - piece % HOLE_PIECE, end - piece)
                new.put_holes(piece, count)
                for lo, hi, same in basis.hole_runs(piece, count, size, HOLE_BLOCK):
                    off = (piece + lo) * extent_size
                    length = min((hi - lo) * extent_size, size - off)
                    stats.bytes_scanned += length
                    flush_write()
                    if same:
                        kept_since(off, off + length)
                        continue
                    stats.extents_changed += hi - lo
                    kept = allocated_ranges(fd, off, off + length)
                    for at, n, inside in split_by(kept, off, off + length):
                        add_zero(at, n, inside)
                piece += count

        def kept_since(start: int, end: int) -> None:
            """Zeros equal to the basis's in ``[start, end)``: where the replica's RESIZE
            made them a hole, a ZERO for the parts the source keeps allocated (fallocated
            blocks are holes to SEEK_DATA); none elsewhere."""
            lo = max(start, grown)
            if end <= lo:
                flush_zero()
                return
            if lo > start:
                flush_zero()
            for at, n, inside in split_by(allocated_ranges(fd, lo, end), lo, end):
                if inside:
                    add_zero(at, n, True)
                else:
                    flush_zero()

        # where helpers hash, the extents that did not change come in runs (Unchanged): a
        # GiB is 16,384 extents, and this loop holds the lock the event loop also wants
        extents = (
            iter_extents_against(fd, size, basis.slice, extent_size)
            if old_count
            else iter_runs(fd, size, extent_size)  # a first sync reads it all anyway
        )
        for ext in extents:
            if isinstance(ext, Unchanged):  # a run whose digests equal the basis's
                new.put(ext.first, ext.digests)
                length = min(ext.count * extent_size, size - ext.first * extent_size)
                stats.bytes_scanned += length
                if write_buf:
                    flush_write()
                start = ext.first * extent_size
                if start + length > grown:  # equal to the basis's zeros: data per SEEK_DATA
                    if start < grown:
                        flush_zero()
                    add_zero(max(start, grown), start + length - max(start, grown), True)
                elif zero_len:
                    flush_zero()
                since_yield += length
            elif isinstance(ext, Holes):
                holes(ext)
                since_yield += min(ext.count * extent_size, size - ext.first * extent_size)
            else:
                one_extent(ext)
                since_yield += ext.length
            if batch_bytes >= batch_limit or since_yield >= PROGRESS_BYTES:
                stats.records += len(batch)
                yield batch  # may be empty: lets the caller report progress
                batch, batch_bytes, since_yield = [], 0, 0
        flush_write()
        flush_zero()
        if batch:
            stats.records += len(batch)
            yield batch
    finally:
        os.close(fd)


def resize_basis(basis: ExtentManifest, size: int) -> None:
    """Grow or shrink the basis as the RESIZE record will do to the replica (zero-filled)."""
    old_size = basis.size
    basis.resize(size)
    if size > old_size:
        first_new = (old_size + basis.extent_size - 1) // basis.extent_size
        if old_size % basis.extent_size:
            first_new -= 1  # the old partial extent grows: its content is unknown here
            basis.set(first_new, UNKNOWN)
            first_new += 1
        # whole chunks share the one of hole digests: made, a TiB of holes was 256 MiB
        basis.put_holes(first_new, basis.count - first_new)


Appender = Callable[[list[Record]], Awaitable[int]]


class BackgroundSync:
    """Makes an epoch's records durable while the scan goes on.

    The shipper sends durable records only. One journal sync at a time runs beside the
    scan; after each batch, when none is running, the next starts for what was appended
    meanwhile. The link gets each part of the epoch as soon as the disk has made it durable,
    and the scan waits for an fsync only when ``limit`` bytes have piled up behind a running
    one (an inline sync used to stop the scan for every fsync, and its growing steps held
    back most of a small epoch until its end).
    """

    def __init__(self, journal: Journal, limit: int) -> None:
        self._journal = journal
        self._limit = limit
        self._running: asyncio.Future[int] | None = None
        self._behind = 0  # bytes appended since the running sync started

    async def appended(self, nbytes: int) -> None:
        self._behind += nbytes
        running = self._running
        if running is not None:
            if not running.done() and self._behind < self._limit:
                return
            await running  # done, or too far behind; a failed sync ends the scan here
        self._running = asyncio.ensure_future(self._journal.sync())
        self._behind = 0

    async def finish(self) -> None:
        """Wait for the running sync; its failure is raised here."""
        running, self._running = self._running, None
        if running is not None:
            await running

    def abandon(self) -> None:
        """The scan failed: stop waiting for the running sync (the journal finishes its
        round on its own) without leaving its result unretrieved."""
        running, self._running = self._running, None
        if running is not None and not running.cancel() and not running.cancelled():
            running.exception()


class CycleStopped(Exception):
    """The sender was asked to stop while a cycle waited for the link: to ship records
    without the journal, or for room in a full journal."""


async def append_waiting(
    journal: Journal,
    records: list[Record],
    space_freed: asyncio.Event,
    check: Callable[[], None],
    relieve: Callable[[], Awaitable[None]],
    stop: asyncio.Event | None = None,
    *,
    wait: bool = True,
) -> int:
    """Append ``records``; while the journal is full, wait for the shipper to free space
    (``wait`` False: JournalFull instead, once what can be freed at once is).

    ``check`` raises when shipping has failed (the link sets ``space_freed`` then, and a
    silent receiver fails the link after its reply timeout), so a full journal never
    waits for acks that cannot come. A link paused by its rate (0, a schedule's office
    hours) is not a failure: the wait lasts until the rate comes back, or until ``stop``
    (CycleStopped; what was journaled stays, synced, for the next run).
    Before waiting, what is in the journal is synced (only durable records ship, so
    nothing would come back otherwise), and ``relieve`` frees what can be freed at once
    (records the receiver holds durably), so an epoch larger than the journal never waits
    on itself.
    """
    while True:
        check()
        try:
            return await journal.append_many(records)
        except JournalFull:
            space_freed.clear()
            await journal.sync()
            await relieve()
            if not wait:
                return await journal.append_many(records)
            with contextlib.suppress(JournalFull):
                return await journal.append_many(records)
            if stop is None:
                await space_freed.wait()
                continue
            waits = {asyncio.ensure_future(space_freed.wait()), asyncio.ensure_future(stop.wait())}
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waits:
                    waiter.cancel()
            if stop.is_set():
                raise CycleStopped("stopped while a full journal waited for the link") from None


def file_volume(spec: VolumeSpec) -> tuple[Record, bytes]:
    """A FILE volume (configuration) as its FILE record and content digest.

    Content and mode come from one open: an editor's rename-over between two opens
    could pair one file's bytes with the other's mode.
    """
    with os.fdopen(open_volume(spec), "rb") as f:
        content = f.read()
        mode = file_mode(os.fstat(f.fileno()).st_mode)
    return Record.file(spec.name, content, mode), extent_digest(content)


async def scan_epoch(
    volumes: list[VolumeSpec],
    journal: Journal,
    basis: ManifestSet,
    *,
    append: Appender,
    sync_every: int = SYNC_EVERY,
    progress: Progress | None = None,
    prelude: list[Record] | None = None,
) -> tuple[ManifestSet, ScanStats, int]:
    """Journal one epoch of changes against ``basis``.

    Records go to the journal in batches of at most BATCH_BYTES (less for a small
    journal: a quarter of its cap, so a batch always fits beside what waits for acks).

    The shipper sends only durable records, so the journal is synced as the scan goes,
    beside it (``BackgroundSync``): the scan gets at most ``sync_every`` bytes of changes
    ahead of a running sync.

    Returns the manifests of the sources as scanned, the statistics and the LSN of the
    EPOCH record (durable when this returns). ``basis`` is not modified: it may share its
    digests with the saved manifests (``sender_state._sharing``).
    """
    new_set, stats = await scan_changes(
        volumes,
        journal,
        basis,
        append=append,
        sync_every=sync_every,
        progress=progress,
        prelude=prelude,
    )
    epoch_lsn = await append([Record.epoch(new_set.epoch)])
    await journal.sync()
    new_set.lsn = epoch_lsn
    stats.records += 1
    return new_set, stats, epoch_lsn


async def scan_changes(
    volumes: list[VolumeSpec],
    journal: Journal,
    basis: ManifestSet,
    *,
    append: Appender,
    sync_every: int = SYNC_EVERY,
    progress: Progress | None = None,
    prelude: list[Record] | None = None,
) -> tuple[ManifestSet, ScanStats]:
    """``scan_epoch`` without its EPOCH: changes shipped that make no consistency point
    (the copy a frozen scan is preceded by, engine/sender.py), the manifests as scanned.

    The last records appended may not be durable yet (a configuration file's, or a batch
    appended while a background sync ran): the caller syncs before it waits for them to
    ship, since only durable records do."""
    syncing = BackgroundSync(journal, sync_every)
    try:
        new_set, stats = await _scan_volumes(
            volumes, journal, basis, append, syncing, progress, prelude
        )
        await syncing.finish()
    except BaseException:
        syncing.abandon()
        raise
    return new_set, stats


async def _scan_volumes(
    volumes: list[VolumeSpec],
    journal: Journal,
    basis: ManifestSet,
    append: Appender,
    syncing: BackgroundSync,
    progress: Progress | None,
    prelude: list[Record] | None,
) -> tuple[ManifestSet, ScanStats]:
    """scan_epoch's walk over the volumes, up to (not including) the EPOCH record."""
    stats = ScanStats()
    new_set = ManifestSet(
        lsn=0, extent_size=basis.extent_size, epoch=basis.epoch + 1, compared=basis.compared
    )
    cap = journal.max_bytes
    batch_limit = BATCH_BYTES if cap is None else max(MAX_WRITE, min(BATCH_BYTES, cap // 4))
    total = sum(volume_stat(spec).st_size for spec in volumes)
    if prelude:  # tree changes (folders, links, deletions) come before file contents
        await append(prelude)
        stats.records += len(prelude)
    for spec in volumes:
        if spec.kind is VolumeKind.FILE:
            record, digest = await asyncio.to_thread(file_volume, spec)
            stats.bytes_scanned += len(record.data)
            new_set.files[spec.name] = digest
            new_set.modes[spec.name] = record.offset  # the FILE record carries the mode
            if basis.files.get(spec.name) != digest:
                await append([record])
                stats.files_changed += 1
                stats.bytes_changed += len(record.data)
                stats.records += 1
            elif basis.modes.get(spec.name) != record.offset:  # only the mode changed
                await append([Record.chmod(spec.name, record.offset)])
                stats.records += 1
            continue
        st = volume_stat(spec)
        size, mode = st.st_size, st.st_mode & 0o777  # no set-id bits (docs/OPERATIONS.md)
        new_set.modes[spec.name] = mode
        old = basis.disks.get(spec.name)
        work = old if old is not None else ExtentManifest(basis.extent_size, 0)
        first: list[Record] = []
        if old is None:
            # new to these manifests, the basis says zeros (the RESIZE's), but the replica may
            # hold an older copy (the volume left the job for a cycle and is back, or a file
            # was left there): emptied first, or its data would stay where this has holes
            first.append(Record.resize(spec.name, 0))
        if work.size != size or old is None:
            first.append(Record.resize(spec.name, size))
            stats.resized.append(spec.name)
            work = work.copy()  # the basis stays as it was; the scan compares with this
            resize_basis(work, size)
        # the replica follows the source's mode: a new one (it is made 0600), one whose
        # mode is unknown here, and after every chmod of the source
        known = basis.modes.get(spec.name)
        if old is None or known is None or known & 0o777 != mode:
            first.append(Record.chmod(spec.name, mode))
        if first:
            await append(first)
            stats.records += len(first)
        # where the RESIZE grows the replica, it is a hole there: 0 on a first sync (a
        # pass after a shrink grows nothing)
        grown_from = 0 if old is None else old.size if old.size < size else None
        for scan_pass in range(1, SIZE_PASSES + 1):
            new = ExtentManifest(basis.extent_size, size)
            gen = _disk_batches(spec, work, new, stats, batch_limit, grown_from)
            try:
                while True:
                    batch = await asyncio.to_thread(next, gen, None)
                    if batch is None:
                        break
                    if progress is not None:
                        progress(stats.bytes_scanned, total)
                    if not batch:
                        continue
                    await append(batch)
                    await syncing.appended(sum(len(r.data) for r in batch))
            finally:  # a scan cut short (the link lost, a stop) closes its walk now
                await asyncio.shield(asyncio.to_thread(_close_walk, gen))
            now = volume_stat(spec).st_size
            if now == size:
                break
            _resized_mid_scan(spec, size, now, scan_pass)
            if now > size or scan_pass == SIZE_PASSES:
                break
            # cut shorter while it was read: what lay past its new end read as zeros, and
            # the replica would keep the old size with them, a state the file never held.
            # Scanned again (what changed since this pass) before the point is taken.
            work, size = new.copy(), now  # this pass's digests: the next pass's basis
            grown_from = None
            resize_basis(work, size)
            await append([Record.resize(spec.name, size)])
            stats.records += 1
            if spec.name not in stats.resized:
                stats.resized.append(spec.name)
            total += size
        new_set.disks[spec.name] = new
    return new_set, stats


def _resized_mid_scan(spec: VolumeSpec, size: int, now: int, scan_pass: int) -> None:
    """Say that ``spec`` went from ``size`` to ``now`` bytes while pass ``scan_pass`` read it."""
    level = "warning"
    if now > size:
        action = (
            "it grew while it was read: this point holds it up to its old size, as it was "
            "read (not a state it held if it was also written meanwhile); the next scan "
            "ships the rest"
        )
    elif scan_pass < SIZE_PASSES:
        action = "scanning it again at its new size before the point"
    else:
        level, action = (
            "error",
            (
                f"it shrank during each of {SIZE_PASSES} scans: this point may hold zeros past "
                "its end that it never held, until the next scan; stop what truncates it "
                "while the sender scans, or freeze it around the scan (--pre-hook)"
            ),
        )
    getattr(log, level)(
        "sender.volume_resized_mid_scan",
        path=str(spec.path),
        size_at_start=size,
        size_at_end=now,
        scan_pass=scan_pass,
        action=action,
    )


def _close_walk(gen: Generator[list[Record], None, None]) -> None:
    """End a walk left part way: its reading threads are joined and its file closed here,
    not whenever the collector finds it. Found by the collector, it ran in whichever
    thread allocated then; once that was a thread being started, inside the lock
    ``threading`` holds while it starts one, and the join waited on that lock: the
    process hung (one run of ``make test``)."""
    with contextlib.suppress(ValueError):  # still in next() in a thread cancelled away
        gen.close()
