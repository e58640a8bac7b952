"""The write-order journal: append, group commit, replay, follow, trim, recovery.

Concurrency model (one event loop, one Journal object per directory):

* ``append`` assigns LSNs, encodes records and stages them in memory; staged bytes go to
  the active segment with one ``pwritev`` once 1 MiB has gathered, and whenever a sync
  starts. Writes into the page cache run in the loop; fsyncs never do.
* ``sync`` is a group commit. A sync round flushes the staged bytes and runs ``fdatasync``
  in a worker thread; it covers every caller waiting when it started. At most two rounds
  are in flight (a second overlaps the first, which ext4 serves nearly in parallel); callers
  arriving while both run share the next one.
* A segment is rolled when an append would take it past ``segment_bytes`` (one append never
  spans two segments). Rolling waits for running sync rounds, then seals the old segment,
  fdatasyncs it, creates the new one and syncs the directory, in one worker-thread hop;
  only then can a byte be written into the new segment, so every segment but the last is
  complete on disk. Meanwhile appends keep being staged in memory (up to STAGE_LIMIT).
* Readers (``read_from``/``follow``) only ever see bytes below the durable end, i.e. records
  covered by a finished sync round (or roll), so a crash can never take back a record
  that a reader has already handed on.
* ``trim`` deletes whole sealed segments, oldest first, with a directory sync after each
  (a crash leaves a contiguous suffix). The active segment is never deleted, so the LSN
  floor survives a reopen even when everything was trimmed. Up to MAX_SPARES trimmed files
  are renamed to spares instead and a roll writes the next segment over one: overwriting
  allocated blocks spares the file system an allocation, a journal commit per fdatasync and
  (on a ``discard`` mount) a trim of 64 MiB per segment. A file a reader still has open is
  never reused (the reader would read the next segment's records through it), and spares
  count against ``max_bytes``: they are deleted before an append would fail for room.

The directory is locked with ``flock`` while open: a second writer is refused.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import functools
import os
import time
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Coroutine,
    Sequence,
)
from pathlib import Path
from typing import Any, cast

import structlog

from replicator.journal import durable
from replicator.journal.errors import (
    READ_ONLY_HINT,
    ConfigError,
    JournalCorrupt,
    JournalError,
    JournalFull,
    JournalIOError,
)
from replicator.journal.inspect import add_run
from replicator.journal.records import (
    HEADER_SIZE,
    EncodedRecord,
    Record,
    RecordHead,
    encode_parts,
    record_heads,
    run_from,
)
from replicator.journal.recovery import (
    MAX_SPARES,
    OnDamage,
    Recovery,
    SegmentFile,
    Spare,
    cut_to_end,
    lock_dir,
    log_safely,
    prepare_dir,
    recover,
    retire_segments,
    seal_and_create,
    spare_path,
    write_all,
)
from replicator.journal.segment import (
    HEADER_BYTES,
    SEAL_BYTES,
    ReadItem,
    Seal,
    SegmentReader,
    segment_name,
)

FLUSH_BYTES = 1024 * 1024  # staged bytes that trigger a write before the next sync
STAGE_LIMIT = 32 * 1024 * 1024  # staged bytes appends may pile up while a roll runs
MAX_INFLIGHT_SYNCS = 2
MIN_SEGMENT_BYTES = 256
MAX_LSN = 2**63 - 1
_IOV_MAX = 1024
_log = structlog.get_logger()


class Journal:
    """A segmented, append-only, write-order log of records in one directory.

    Open with ``await Journal.open(path)``; close with ``await journal.aclose()``. The
    on-disk format is in ``docs/FORMATS.md`` and in ``segment.py``.
    """

    def __init__(
        self,
        directory: Path,
        segments: list[SegmentFile],
        fd: int,
        lock_fd: int,
        segment_bytes: int,
        max_bytes: int | None,
        recovery: Recovery | None = None,
        spares: Sequence[Spare] = (),
        on_damage: OnDamage = "refuse",
    ) -> None:
        self._dir = directory
        self._on_damage = on_damage  # what the next open does with damage a reader finds
        self.recovery = recovery  # what open-time recovery cut away, if anything
        self._segments = segments
        self._fd = fd  # writable fd of ``_fd_seg``
        self._fd_seg = segments[-1]  # is ``_segments[-1]`` except while a roll runs
        self._lock_fd = lock_fd
        self._segment_bytes = segment_bytes
        self._max_bytes = max_bytes
        # sees every record appended, in order, once staged (a live sender's checkpoint,
        # engine/checkpoint.py); None on the hot paths that need nothing of it
        self.observer: Callable[[Sequence[Record] | Sequence[RecordHead]], None] | None = None
        # awaited before a trim drops segments (the journal's lock held): what must outlive
        # their records is made durable first (the observer's marks); False keeps them
        self.before_trim: Callable[[], Awaitable[bool]] | None = None
        self._next_lsn = segments[-1].next_lsn
        self._durable_lsn = self._next_lsn - 1
        self._last_record_lsn = self._next_lsn - 1  # below ``skip_to``'s LSNs
        self._file_bytes = sum(s.file_bytes for s in segments)
        self._spares = list(spares)  # trimmed files the next rolls write over
        self._spare_bytes = sum(s.size for s in self._spares)
        self._drop_spares = False  # an append needs the room the spares take
        # encoded records of the active segment, unwritten (views only of buffers nothing
        # changes: bytes, or handed over read-only, see Record)
        self._staged: list[bytes | memoryview] = []
        self._staged_bytes = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []  # (lsn, sync caller)
        self._inflight = 0  # sync rounds running
        self._round_size = 1  # callers per round, moving average (see _kick)
        self._idle = asyncio.Event()  # set while no sync round runs
        self._idle.set()
        self._io_lock = asyncio.Lock()  # roll, trim and close, one at a time
        self._roll_task: asyncio.Task[None] | None = None
        self._rolling: asyncio.Future[None] | None = None
        self._advanced = asyncio.Event()  # replaced each time the durable end moves
        self._closing = False
        self._closed = False
        self._close_task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None

    # ------------------------------------------------------------------ open / close
    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        segment_bytes: int = 64 * 1024**2,
        max_bytes: int | None = None,
        on_damage: OnDamage = "refuse",
        discard_below: int = 0,
    ) -> Journal:
        """Open (creating if missing) the journal in ``path`` and recover it.

        A torn tail of the last segment is cut off and logged. Damage (a bad record with
        intact ones behind it, a bad sealed segment, segments that do not chain up)
        raises JournalCorrupt with ``on_damage="refuse"``; with ``"cut"`` every record is
        verified and the journal is cut at the first damage (logged as
        ``journal.damage_cut``, and described in ``recovery``): for journals whose
        records can be had again, such as a receiver's, which its sender resends.
        ``discard_below``: segments holding only records below this LSN are deleted
        unread first (a receiver passes its applied LSN + 1).
        """
        if segment_bytes < MIN_SEGMENT_BYTES:
            raise ConfigError(f"segment_bytes must be at least {MIN_SEGMENT_BYTES}")
        if max_bytes is not None and max_bytes < 2 * segment_bytes:
            raise ConfigError(
                f"journal max_bytes ({max_bytes}) must be at least twice segment_bytes "
                f"({segment_bytes}), or trimming could never make room"
            )
        directory = Path(path)
        await asyncio.to_thread(prepare_dir, directory)
        lock_fd = lock_dir(directory)
        try:
            found = await asyncio.to_thread(recover, directory, on_damage, discard_below)
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(
            directory,
            found.segments,
            found.fd,
            lock_fd,
            segment_bytes,
            max_bytes,
            found.recovery,
            found.spares,
            on_damage,
        )

    async def aclose(self) -> None:
        """Sync what was appended, close files and end followers. Idempotent.

        Raises (on the first call only) when the final sync fails; files are closed anyway.
        """
        first = self._close_task is None
        if self._close_task is None:
            self._closing = True
            self._close_task = _spawn(self._close())
        try:
            await asyncio.shield(self._close_task)
        except JournalError:
            if first:
                raise

    async def _close(self) -> None:
        try:
            if self._failure is None:
                await self._sync_to(self._next_lsn - 1)
                active = self._segments[-1]
                if active.size > active.end:  # a reused file: its old bytes go now
                    async with self._io_lock:
                        while self._inflight:
                            await self._idle.wait()
                        await self._cut_active(active)
        finally:
            async with self._io_lock:
                while self._inflight:  # a round may still hold the fd
                    await self._idle.wait()
                self._closed = True
                os.close(self._fd)
                os.close(self._lock_fd)
                self._reject_waiters(JournalError(f"journal {self._dir} is closed"))
                self._notify()

    async def _cut_active(self, active: SegmentFile) -> None:
        try:
            await asyncio.to_thread(cut_to_end, self._fd, active.end)
        except OSError as exc:
            raise self._fail(exc, f"journal could not truncate {active.path}: {exc}") from exc
        self._file_bytes -= active.size - active.end
        active.size = active.end

    async def __aenter__(self) -> Journal:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ properties
    @property
    def failed(self) -> bool:
        """True after a write or fsync error: every call fails until the journal is reopened."""
        return self._failure is not None

    @property
    def path(self) -> Path:
        return self._dir

    @property
    def first_lsn(self) -> int:
        """Lowest LSN still stored (``next_lsn`` when the journal holds no record)."""
        for seg in self._segments:
            if seg.count:
                return seg.first_lsn
        return self._next_lsn

    @property
    def last_lsn(self) -> int:
        """Highest LSN appended (0 when none ever was)."""
        return self._next_lsn - 1

    @property
    def last_record_lsn(self) -> int:
        """LSN of the last record stored (``last_lsn`` also counts LSNs ``skip_to`` passed
        over)."""
        return self._last_record_lsn

    @property
    def next_lsn(self) -> int:
        return self._next_lsn

    @property
    def durable_lsn(self) -> int:
        return self._durable_lsn

    @property
    def bytes_used(self) -> int:
        """Bytes the journal's contents take: its segments up to their last record (and
        seal), plus the records staged for the active one. What the records in it weigh."""
        seg = self._segments[-1]
        return self._file_bytes - (seg.size - seg.end) + self._staged_bytes

    @property
    def disk_bytes(self) -> int:
        """Bytes of the journal's files on disk, once the staged records are written: the
        segments, a reused active segment's file at its full size, the spares. What
        ``max_bytes`` caps."""
        return self._file_bytes + self._spare_bytes + self._growth(0)

    def _growth(self, extra: int) -> int:
        """Bytes the active segment's file grows by when the staged records and ``extra``
        more are written (a reused file grows only past its old size)."""
        seg = self._segments[-1]
        return max(0, seg.end + self._staged_bytes + extra - seg.size)

    @property
    def spare_count(self) -> int:
        """Trimmed segment files kept for the next rolls to write over."""
        return len(self._spares)

    @property
    def max_bytes(self) -> int | None:
        return self._max_bytes

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    def trimmable(self, upto_lsn: int) -> bool:
        """True when ``trim(upto_lsn)`` would drop a sealed segment (cheap: no I/O)."""
        return bool(self._victims(upto_lsn))

    def _victims(self, upto_lsn: int) -> list[SegmentFile]:
        """The sealed segments, oldest first, whose records are all below ``upto_lsn``:
        what a trim drops (never the active one)."""
        victims: list[SegmentFile] = []
        for seg in self._segments[:-1]:
            if not seg.sealed or seg.next_lsn > upto_lsn:
                break
            victims.append(seg)
        return victims

    # ------------------------------------------------------------------ append
    async def append(self, record: Record) -> int:
        """Append one record; returns its LSN. Durable only after ``sync``.

        ``record.lsn`` 0 takes the next LSN; otherwise it is kept and must be above
        ``last_lsn``. ``ts_ns`` 0 takes the current time.
        """
        size = record.encoded_size
        while not self._admit(size):
            await self._make_room()
        lsn = self._check_lsn(record.lsn or self._next_lsn)
        head, data = encode_parts(record, lsn, record.ts_ns or time.time_ns())
        self._stage(lsn, lsn, (head, data) if data else (head,), size)
        if self.observer is not None:
            self.observer((record,))
        return lsn

    async def append_many(
        self, records: Sequence[Record], *, encoded: bytes | memoryview | None = None
    ) -> int:
        """Append records in order with one write; returns the last LSN. All or nothing.

        ``encoded``: the records' exact encoding, already checked (a receiver's RECORDS
        payload, every record carrying its LSN and timestamp); staged as it is, not
        encoded and hashed a second time.
        """
        if encoded is None and len(records) == 1:
            return await self.append(records[0])  # nothing to validate as a batch or join
        self._check_usable()
        if not records:
            return self.last_lsn
        size = sum(r.encoded_size for r in records)
        if encoded is not None and (
            len(encoded) != size or not all(r.lsn and r.ts_ns for r in records)
        ):
            raise JournalError("pre-encoded records must carry their LSNs, timestamps and bytes")
        while not self._admit(size):
            await self._make_room()
        lsns: list[int] = []
        nxt = self._next_lsn
        for record in records:  # validate the whole batch before anything changes
            lsn = self._check_lsn(record.lsn or nxt, nxt)
            lsns.append(lsn)
            nxt = lsn + 1
        parts: list[bytes | memoryview] = []  # complete before anything is staged
        if encoded is not None:
            parts.append(encoded)
        else:
            now = time.time_ns()
            for record, lsn in zip(records, lsns, strict=True):
                head, data = encode_parts(record, lsn, record.ts_ns or now)
                parts.append(head)
                if data:
                    parts.append(data)
        self._stage(lsns[0], lsns[-1], parts, size, count=len(lsns))
        if self.observer is not None:
            self.observer(records)
        return lsns[-1]

    def append_encoded_now(
        self, count: int, size: int, encode: Callable[[int, int], bytes]
    ) -> int | None:
        """Append ``count`` records (``size`` bytes in all) that ``encode(lsn, ts_ns)`` makes
        now, numbered from the next LSN and stamped with the current time; the first LSN.
        Without waiting: None (nothing appended, ``encode`` not called) when a segment roll
        or room must come first, which ``append`` awaits. Raises JournalFull at the cap.

        For a batch of captured writes encoded in one call (``engine/nbd/native.py``): the
        LSNs are read and taken with no await between, so nothing else appends meanwhile.
        ``encode`` must return exactly ``size`` bytes of ``count`` records carrying those
        LSNs; what it returns is staged as it is.
        """
        if not self._admit(size):
            return None
        first = self._next_lsn
        last = first + count - 1
        if count <= 0 or last > MAX_LSN:
            raise JournalError(f"records {first}..{last} are out of range")
        blob = encode(first, time.time_ns())
        if len(blob) != size:
            raise JournalError(f"encoded records of {len(blob)} bytes, {size} announced")
        self._stage(first, last, (blob,), size)
        if self.observer is not None:
            self.observer(record_heads(blob))  # encoded just now: their heads suffice
        return first

    def _stage(
        self,
        first: int,
        last: int,
        parts: Sequence[bytes | memoryview],
        size: int,
        *,
        count: int = 0,
    ) -> None:
        """Take LSNs ``first``..``last`` for records whose encoding is ``parts`` (``size``
        bytes in all; ``count`` records, every LSN between by default; explicit LSNs may
        skip) into the active segment, staged; written out at ``FLUSH_BYTES``."""
        seg = self._segments[-1]
        if not seg.count:
            seg.first_lsn = first
        seg.count += count or last - first + 1
        seg.last_lsn = last
        self._next_lsn = last + 1
        self._last_record_lsn = last
        self._staged.extend(parts)
        self._staged_bytes += size
        if self._staged_bytes >= FLUSH_BYTES:
            self._flush()

    def skip_to(self, next_lsn: int) -> None:
        """Number the next record ``next_lsn`` at least, storing nothing for the LSNs passed
        over: they belong to records that travel without the journal (a first sync's,
        ``Link.ship_direct``). Not persistent: after a restart the journal numbers on
        from its last record (the sender then numbers past what the receiver holds)."""
        self._check_usable()
        if next_lsn > MAX_LSN:
            raise JournalError(f"record lsn {next_lsn} is out of range")
        self._next_lsn = max(self._next_lsn, next_lsn)

    def _check_lsn(self, lsn: int, nxt: int = 0) -> int:
        nxt = nxt or self._next_lsn
        if lsn < nxt:
            raise JournalError(
                f"record lsn {lsn} is not after the journal's last lsn {nxt - 1}",
                hint="explicit LSNs must strictly increase",
            )
        if lsn > MAX_LSN:
            raise JournalError(f"record lsn {lsn} is out of range")
        return lsn

    def _admit(self, size: int) -> bool:
        """True when ``size`` bytes may be staged for the active segment now.

        False: a roll must happen (or finish) first. Raises JournalFull at the cap.
        """
        self._check_usable()
        seg = self._segments[-1]
        roll = seg.count > 0 and seg.end + self._staged_bytes + size > self._segment_bytes
        if self._rolling is not None and (roll or self._staged_bytes + size > STAGE_LIMIT):
            return False
        if self._max_bytes is not None:
            if HEADER_BYTES + size + SEAL_BYTES > self._max_bytes:
                raise JournalError(
                    f"an append of {size} bytes can never fit in a journal capped at "
                    f"{self._max_bytes} bytes"
                )
            # the active segment's seal is reserved so sealing never breaks the cap; a roll
            # adds a new file, or writes over the spare it takes (counted already)
            if not roll and (
                self._file_bytes + self._spare_bytes + self._growth(size) + SEAL_BYTES
                <= self._max_bytes
            ):
                return True  # the usual case, once per captured write: the sum below
            used = self.disk_bytes
            if roll:
                spare = self._free_spare()
                reuse = spare.size if spare is not None else 0
                needed = SEAL_BYTES + max(0, HEADER_BYTES + size - reuse)
            else:
                needed = self._growth(size) - self._growth(0)
            if used + needed + SEAL_BYTES > self._max_bytes:
                if self._spares:
                    self._drop_spares = True  # _make_room deletes them; then try again
                    return False
                raise JournalFull(used, self._max_bytes, needed)
        return not roll

    async def _make_room(self) -> None:
        if self._drop_spares:
            await asyncio.shield(_spawn(self._delete_spares()))
            return
        if self._rolling is not None:
            await asyncio.shield(self._rolling)
            return
        # The roll runs in a task of its own so a cancelled appender cannot interrupt it
        # between the worker thread's file operations and the bookkeeping that follows.
        task = self._roll_task
        if task is None or task.done():
            task = self._roll_task = _spawn(self._roll(self._segments[-1]))
        await asyncio.shield(task)

    async def _roll(self, seg: SegmentFile) -> None:
        async with self._io_lock:
            self._check_usable()
            if self._segments[-1] is seg and self._rolling is None:
                await self._roll_locked()

    async def _delete_spares(self) -> None:
        async with self._io_lock:
            self._check_usable()
            self._drop_spares = False
            spares, self._spares = self._spares, []
            self._spare_bytes = 0
            if spares:
                try:
                    paths = [spare.path for spare in spares]
                    await asyncio.to_thread(retire_segments, self._dir, paths, [])
                except OSError as exc:
                    raise self._fail(exc, f"journal could not delete spare files: {exc}") from exc

    def _flush(self) -> None:
        """Write staged records to the active segment (page cache; no fsync)."""
        seg = self._fd_seg
        if not self._staged or seg is not self._segments[-1]:
            return  # nothing staged, or a roll is still creating the file they belong in
        staged, self._staged = self._staged, []
        size, self._staged_bytes = self._staged_bytes, 0
        try:
            write_all(self._fd, staged, seg.end)
        except OSError as exc:
            raise self._fail(exc, f"journal write to {seg.path} failed: {exc}") from exc
        seg.end += size
        if seg.end > seg.size:
            self._file_bytes += seg.end - seg.size
            seg.size = seg.end

    async def write_out(self) -> None:
        """Hand every appended record to the kernel now (a write, no fsync).

        Appends are staged in memory until a sync or 1 MiB; a process killed meanwhile
        takes them along. A caller about to make a change that nothing else can tell about
        later (a FUSE rename or unlink: a rescan sees content, not what was removed) makes
        its record survive a crash of this process first. A crash of the machine still
        needs ``sync``.
        """
        self._check_usable()
        while self._rolling is not None:  # the records belong in the file a roll creates
            await asyncio.shield(self._rolling)
        self._flush()

    # ------------------------------------------------------------------ sync
    async def sync(self) -> int:
        """Make everything appended before the call durable; returns ``durable_lsn``."""
        self._check_usable()
        target = self._next_lsn - 1
        if self._durable_lsn >= target:
            return self._durable_lsn
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((target, waiter))
        if len(self._waiters) == 1 or len(self._waiters) >= self._round_size:
            self._kick()
        await waiter
        return self._durable_lsn

    async def _sync_to(self, target: int) -> int:
        """``sync`` without the closing check (aclose uses it)."""
        if self._durable_lsn >= target:
            return self._durable_lsn
        if self._failure is not None:
            self._check_usable()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((target, waiter))
        self._kick()
        await waiter
        return self._durable_lsn

    def _kick(self) -> None:
        """Start a sync round for the waiting callers, when one may start.

        With no round running, one starts at once. A second one starts only once as many
        callers wait as a round typically covers: then the callers split into two groups
        whose fdatasyncs and appends overlap, instead of one group of one caller and one of
        all the others.
        """
        if (
            not self._waiters
            or self._inflight >= MAX_INFLIGHT_SYNCS
            or (self._inflight and len(self._waiters) < self._round_size)
            or self._rolling is not None
            or self._failure is not None
            or self._closed
        ):
            return
        try:
            self._flush()
        except JournalError:
            return  # _fail has rejected the waiters
        waiters, self._waiters = self._waiters, []
        self._round_size = (3 * self._round_size + len(waiters) + 3) // 4
        seg = self._fd_seg
        self._inflight += 1
        self._idle.clear()
        # submitted right away (not from a task's first step), so the fdatasync overlaps
        # with the appends of the callers the previous round just released
        future = asyncio.get_running_loop().run_in_executor(None, durable.fdatasync_fd, self._fd)
        future.add_done_callback(
            functools.partial(self._round_done, seg, seg.end, self._next_lsn - 1, waiters)
        )

    def _round_done(
        self,
        seg: SegmentFile,
        end: int,
        lsn: int,
        waiters: list[tuple[int, asyncio.Future[None]]],
        future: asyncio.Future[None],
    ) -> None:
        self._inflight -= 1
        if not self._inflight:
            self._idle.set()
        exc = asyncio.CancelledError() if future.cancelled() else future.exception()
        if exc is None:
            seg.durable_end = max(seg.durable_end, end)
            self._advance(lsn)
            for _, waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        else:
            error = self._fail(exc, f"journal fdatasync of {seg.path} failed: {exc}")
            for _, waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(error)
        self._kick()

    def _advance(self, lsn: int) -> None:
        if lsn > self._durable_lsn:
            self._durable_lsn = lsn
            self._notify()
            # callers queued behind a running round may already be covered by this one
            if self._waiters and self._waiters[0][0] <= lsn:
                keep: list[tuple[int, asyncio.Future[None]]] = []
                for target, waiter in self._waiters:
                    if target > lsn:
                        keep.append((target, waiter))
                    elif not waiter.done():
                        waiter.set_result(None)
                self._waiters = keep

    def _notify(self) -> None:
        old, self._advanced = self._advanced, asyncio.Event()
        old.set()

    # ------------------------------------------------------------------ roll
    async def _roll_locked(self, *, reuse_spare: bool = True) -> None:
        """Seal the active segment and start the next one (over a spare file unless
        ``reuse_spare`` is False).

        The caller holds the io lock and runs in a journal-owned task (never cancelled by
        a caller). Appends go on meanwhile: they are staged for the new segment, which is
        already the active one in ``_segments`` but has no file until the roll is done.
        """
        done = asyncio.get_running_loop().create_future()
        self._rolling = done
        old_fd = self._fd
        try:
            self._flush()
            seg = self._segments[-1]
            records_bytes = seg.end - HEADER_BYTES
            seal = Seal(seg.count, seg.first_lsn, seg.last_lsn, seg.next_lsn, records_bytes)
            new = SegmentFile(
                self._dir / segment_name(seal.next_lsn),
                seal.next_lsn,
                0,
                0,
                0,
                HEADER_BYTES,
                HEADER_BYTES,
                sealed=False,
                created=False,
            )
            self._segments.append(new)
            # counted as sealed (a reused file is cut after its seal) and a fresh new file
            self._file_bytes += seg.end + SEAL_BYTES - seg.size + HEADER_BYTES
            while self._inflight:  # no sync round may use the old fd any more
                await self._idle.wait()
            spare = self._free_spare() if reuse_spare else None
            if spare is not None:
                self._spares.remove(spare)
                self._spare_bytes -= spare.size
            try:
                fd, _, size = await asyncio.to_thread(
                    seal_and_create, self._dir, old_fd, seg.end, seal, spare
                )
            except OSError as exc:
                raise self._fail(exc, f"journal could not start a new segment: {exc}") from exc
            self._fd, self._fd_seg = fd, new
            os.close(old_fd)
            new.created = True
            self._file_bytes += size - new.size
            new.size = size
            seg.sealed = True
            seg.durable_end = seg.end
            seg.size = seg.end + SEAL_BYTES
            self._advance(seg.last_lsn)
        finally:
            self._rolling = None
            done.set_result(None)
        if self._staged_bytes >= FLUSH_BYTES:
            self._flush()
        self._kick()

    # ------------------------------------------------------------------ trim
    async def trim(self, upto_lsn: int, *, retire_active: bool = False) -> None:
        """Drop whole sealed segments whose records are all below ``upto_lsn``; durable.

        An active segment that is full and entirely below ``upto_lsn`` is sealed first, so a
        journal at its cap can always be emptied down to one segment. With
        ``retire_active`` it is sealed and dropped whenever its records are all below
        ``upto_lsn``, full or not: for a writer about to close with nothing left to ship,
        so that the next open has no records to read and verify (recovery reads every
        record of the active segment to find where they end), and for one whose journal
        has no room for an append (a journal reopened with a smaller cap). Its successor
        is a new file, not a spare: the close would cut a spare's blocks away, which the
        rolls of a writer that goes on are spared allocating.
        """
        self._check_usable()
        await asyncio.shield(_spawn(self._trim(upto_lsn, retire_active)))

    async def _trim(self, upto_lsn: int, retire_active: bool) -> None:
        async with self._io_lock:
            self._check_usable()
            active = self._segments[-1]
            full = active.end + self._staged_bytes + HEADER_SIZE > self._segment_bytes
            if (full or retire_active) and active.count and active.last_lsn < upto_lsn:
                await self._roll_locked(reuse_spare=not retire_active)
            victims = self._victims(upto_lsn)
            if not victims:
                return
            if self.before_trim is not None and not await self.before_trim():
                return
            del self._segments[: len(victims)]
            for seg in victims:
                seg.retired = True  # from here on no reader may open it
            self._file_bytes -= sum(s.file_bytes for s in victims)
            keep = self._spares_from(victims)
            try:
                await asyncio.to_thread(
                    retire_segments, self._dir, [s.path for s in victims], [s.path for s in keep]
                )
            except OSError as exc:
                raise self._fail(exc, f"journal trim failed: {exc}") from exc
            for seg in keep:
                read_by = seg if seg.readers else None
                self._spares.append(Spare(spare_path(seg.path), seg.file_bytes, read_by))
                self._spare_bytes += seg.file_bytes

    def _spares_from(self, victims: list[SegmentFile]) -> list[SegmentFile]:
        """The trimmed segments to keep as spares: the newest, up to MAX_SPARES, each about
        a segment long, and only while the cap (without one: the file system's free space,
        which a spare's blocks are kept from) leaves room for two more segments beside
        them. One a reader still has open is kept too (the follower that shipped its last
        records may not have moved on when their ack trims it): rolls pass it over until
        the reader closes it (``Spare.free``)."""
        keep: list[SegmentFile] = []
        used = self.disk_bytes
        if self._max_bytes is None:  # free space once every victim is deleted
            free = self._free_bytes() + sum(seg.file_bytes for seg in victims)
        for seg in reversed(victims):
            if len(self._spares) + len(keep) >= MAX_SPARES:
                break
            if seg.file_bytes < self._segment_bytes // 2:
                continue
            if self._max_bytes is None:
                room = free - seg.file_bytes >= 2 * self._segment_bytes
                free -= seg.file_bytes
            else:
                room = used + seg.file_bytes + 2 * self._segment_bytes <= self._max_bytes
            if not room:
                break
            keep.append(seg)
            used += seg.file_bytes
        return keep

    def _free_bytes(self) -> int:
        """Free bytes on the journal's file system (for an unprivileged writer)."""
        try:
            fs = os.statvfs(self._dir)
        except OSError:
            return 0  # keep no spares when we cannot tell
        return fs.f_bavail * fs.f_frsize

    def _free_spare(self) -> Spare | None:
        """The spare the next roll writes over: the newest that no reader has open."""
        return next((spare for spare in reversed(self._spares) if spare.free), None)

    # ------------------------------------------------------------------ read
    async def runs_after(self, lsn: int) -> list[tuple[int, int]]:
        """The LSN runs ``(first, last)`` of the durable records above ``lsn``, ascending
        (call ``sync`` first to count every record appended). LSNs that ``skip_to``
        passed over end a run. Only a segment whose LSNs do not follow each other is read."""
        runs: list[tuple[int, int]] = []
        for seg in list(self._segments):
            if not seg.count or seg.last_lsn <= lsn:
                continue
            start = max(seg.first_lsn, lsn + 1)
            if seg.last_lsn - seg.first_lsn + 1 == seg.count:
                add_run(runs, start, seg.last_lsn)
                continue
            async with contextlib.aclosing(self._records(start, follow=False)) as records:
                async for record in records:
                    if record.lsn > seg.last_lsn:
                        break
                    add_run(runs, record.lsn, record.lsn)
        return runs

    def read_from(self, lsn: int) -> AsyncGenerator[Record, None]:
        """Durable records with ``record.lsn >= lsn`` in order, up to the durable end.

        Raises JournalError when ``lsn`` is below the first stored segment (those records
        were trimmed), JournalCorrupt when a stored record fails its checks.
        """
        return self._records(lsn, follow=False)

    def follow(self, lsn: int) -> AsyncGenerator[Record, None]:
        """Like ``read_from``, then waits for newly synced records until ``aclose``."""
        return self._records(lsn, follow=True)

    def follow_encoded(
        self, lsn: int, *, check_through: int | None = None
    ) -> AsyncGenerator[list[EncodedRecord], None]:
        """``follow`` in batches as read (about ``READ_CHUNK`` bytes each), each record's
        bytes as stored: what the shipper packs into frames.

        Every record is checked (lengths, LSN order, checksum), except that with
        ``check_through`` set the checksums of records past it are left to the consumer:
        a sender shipping to a receiver that verifies every record on arrival (see
        ``engine/link.py``) hashes each byte once fewer. Records read back to back may
        come as runs (``EncodedRecord.count``).
        """
        read = functools.partial(SegmentReader.read_encoded, check_through=check_through)
        return self._batches(lsn, follow=True, read=read)

    async def _records(self, lsn: int, *, follow: bool) -> AsyncGenerator[Record, None]:
        """``_batches`` one record at a time. Closing this closes the batches at once, so
        the segment file being read is released then, not when the collector finds the
        inner generator (a spare is not written over while it is read)."""
        async with contextlib.aclosing(
            self._batches(lsn, follow=follow, read=SegmentReader.read)
        ) as batches:
            async for batch in batches:
                for record in batch:
                    yield record

    async def _batches(
        self,
        lsn: int,
        *,
        follow: bool,
        read: Callable[[SegmentReader, int], list[ReadItem]],
    ) -> AsyncGenerator[list[ReadItem], None]:
        """Non-empty lists of the records with ``record.lsn >= lsn``, in order."""
        self._check_usable()
        seg = self._locate(lsn)
        reader: SegmentReader | None = None
        reader_seg = seg  # the segment ``reader`` reads
        try:
            while not self._closed:
                if self._failure is not None:
                    self._check_usable()
                end = seg.end if seg.sealed else seg.durable_end
                if reader is None and end > HEADER_BYTES:
                    reader = self._reader(seg)
                    reader_seg = seg
                if reader is not None and reader.offset < end:
                    try:
                        batch = read(reader, end)
                    except JournalCorrupt as exc:
                        if self._on_damage != "cut":
                            raise
                        raise JournalCorrupt(
                            exc.path, exc.offset, exc.reason, cut_at_open=True
                        ) from exc
                    if batch and batch[0].lsn < lsn:  # the segment's start: before ``lsn``
                        batch = _from_lsn(batch, lsn)
                    if batch:
                        yield batch
                    await asyncio.sleep(0)  # a long replay must not starve the loop
                    continue
                if seg.sealed:
                    seg = self._segment_at(seg.next_lsn)
                    if reader is not None:
                        reader.close()
                        reader = None
                        reader_seg.readers -= 1
                    continue
                if not follow:
                    return
                await self._advanced.wait()
        finally:
            if reader is not None:
                reader.close()
                reader_seg.readers -= 1

    def _reader(self, seg: SegmentFile) -> SegmentReader:
        """A reader of ``seg``'s file, counted in ``seg.readers`` (the caller uncounts it
        when it closes the reader): no roll writes over a file that is being read."""
        if seg.retired:
            raise self._trimmed_error(seg.base_lsn)
        try:
            reader = SegmentReader(seg.path, seg.base_lsn)
        except FileNotFoundError:
            raise self._trimmed_error(seg.base_lsn) from None
        seg.readers += 1
        return reader

    def _trimmed_error(self, lsn: int) -> JournalError:
        return JournalError(
            f"journal records from lsn {lsn} were trimmed (lowest stored: {self.first_lsn})",
            hint="trim only below what every reader has consumed",
        )

    def _locate(self, lsn: int) -> SegmentFile:
        """The segment where records with LSN >= ``lsn`` start."""
        segs = self._segments
        lsn = max(lsn, 1)
        if lsn < segs[0].base_lsn:
            raise self._trimmed_error(lsn)
        index = bisect.bisect_right(segs, lsn, key=lambda s: s.base_lsn) - 1
        return segs[index]

    def _segment_at(self, base_lsn: int) -> SegmentFile:
        segs = self._segments
        index = bisect.bisect_left(segs, base_lsn, key=lambda s: s.base_lsn)
        if index < len(segs) and segs[index].base_lsn == base_lsn:
            return segs[index]
        raise self._trimmed_error(base_lsn)

    # ------------------------------------------------------------------ state
    def _check_usable(self) -> None:
        if self._failure is not None:  # a storage problem (exit 9), as when it happened
            raise JournalIOError(
                f"journal {self._dir} failed earlier ({self._failure}) and takes nothing "
                "more until it is opened again",
                hint=_io_hint(self._failure, self._dir),
            ) from self._failure
        if self._closing:
            raise JournalError(f"journal {self._dir} is closed")

    def _fail(self, exc: BaseException, message: str) -> JournalError:
        """Enter the failed state and return the error to raise.

        After a failed write or fsync nothing about the file can be assumed (the kernel
        may have dropped the dirty pages), so the journal refuses all further work; a
        reopen recovers from what is on disk.
        """
        error = JournalIOError(message, hint=_io_hint(exc, self._dir))
        error.__cause__ = exc
        if self._failure is None:
            self._failure = exc
            log_safely("error", "journal.failed", path=str(self._dir), error=str(exc))
            if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
                self._release_spares()
            self._reject_waiters(error)
            self._notify()
        return error

    def _release_spares(self) -> None:
        """The file system is full: give back the blocks the spares keep, so the reopen
        that follows finds the room (else it would meet the same "full", held by our own
        spare files, until someone deleted them by hand). Best effort; a crash before the
        deletions reach the disk brings back spares, which the next failure releases."""
        spares, self._spares = self._spares, []
        self._spare_bytes = 0
        freed = 0
        for spare in spares:
            with contextlib.suppress(OSError):
                os.unlink(spare.path)
                freed += spare.size
        if freed:
            log_safely("warning", "journal.spares_released", path=str(self._dir), bytes=freed)

    def _reject_waiters(self, error: JournalError) -> None:
        waiters, self._waiters = self._waiters, []
        for _, waiter in waiters:
            if not waiter.done():
                waiter.set_exception(error)


def _io_hint(exc: BaseException, folder: Path) -> str:
    """What to do about a journal write or sync that failed with ``exc``."""
    recovered = "what was synced before is recovered when the journal is opened again"
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"the file system holding {folder} is full: free space there, or move the state "
            f"folder to a larger one (--state-dir), then run again; {recovered}"
        )
    if code == errno.EROFS:
        return (
            f"the file system holding {folder} is read-only; {READ_ONLY_HINT}, then run "
            f"again; {recovered}"
        )
    if code == errno.EIO:
        return (
            f"the disk under {folder} reported an I/O error: check it (dmesg), then run "
            f"again; {recovered}"
        )
    return f"check the file system holding {folder}, then run again; {recovered}"


def _spawn(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """A journal-owned task; its exception is retrieved even when every waiter went away."""
    task = asyncio.create_task(coro)
    task.add_done_callback(_consume_exception)
    return task


def _consume_exception(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


def _from_lsn(batch: list[ReadItem], lsn: int) -> list[ReadItem]:
    """The items of ``batch`` from ``lsn`` on; a run (``EncodedRecord.count``) that starts
    before ``lsn`` and reaches it is cut there (``run_from``), not dropped whole."""
    out: list[ReadItem] = []
    for item in batch:
        if isinstance(item, EncodedRecord):
            kept = run_from(item, lsn)
            if kept is not None:
                out.append(cast(ReadItem, kept))
        elif item.lsn >= lsn:
            out.append(item)
    return out
