"""Journal first, then the source file, then the reply: the policy NBD and FUSE capture share.

Live capture (the NBD exports in ``engine/nbd``, the FUSE filter in ``engine/fuse``)
promises that whatever a writer was told is done is in the write-order journal, in the
order the changes reached the source files, and that every barrier (FLUSH record) it
journals describes a state the sources really passed through. Both front ends keep that
promise with the same rules, held here once; each adds only what is its own (NBD's error
codes and image growth, FUSE's paths, namespace records and undo records).

One :class:`JournalFirst` per journal (every NBD export of a journal shares it):

* **Order.** A FIFO lock, held from building a change's records until the change has
  been made to the source file, with the records appended first. So the journal order is
  the order in which changes reached the files, across every file of the journal, and a
  FLUSH record appended under the lock has every earlier record in the files and no later
  one.
* **Journal before acknowledge.** ``append`` (lock held), then the change, then the lock
  is released, then the front end replies. A change that fails after its records were
  journaled is corrected with ``reconcile``: what the file really holds now is journaled
  after the record of what failed, so the replica converges to the source again.
* **Barriers.** ``unflushed`` is set by every journaled change; ``barrier`` appends a
  FLUSH record only when it is set, and only while ``barriers_allowed``.
* **A full journal** (with an ``overflow`` tracker factory): the writer is not failed.
  From the first change that does not fit, changes go to the files unjournaled and the
  tracker (``DirtyMap`` for NBD, ``FolderOverflow`` for FUSE) absorbs the records that
  were not written. From then until a resync has journaled all of it (``resync_start``,
  ``resync_step``, ``resync_close``) no barrier may be journaled, so the replica stays at
  its last consistency point instead of reaching a state the sources never had. Without
  a factory the writer gets the journal's JournalFull.
* **Diverged.** A change that failed after journaling and can be neither reconciled nor
  undone, or an fsync of a source file that failed (the kernel may have dropped pages
  whose records are journaled): the source no longer matches its journal. ``diverge``
  records why for that scope (an NBD volume, the FUSE folder) and logs it (critical); the
  front end refuses every further change in that scope with EIO. Only a full resync (a
  restart, whose initial sync compares everything) repairs it.

The lock's uncontended acquire (``acquire_nowait``) is a plain call: the NBD write path
takes it that way because with ``asyncio.Lock`` the coroutines of ``async with`` cost ~5%
of a 4 KiB write. ``async with`` works too, for the paths where that does not matter.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, NamedTuple, Protocol, TypeVar

import structlog

from replicator.engine.reconcile import truth_records
from replicator.journal import Journal, JournalError, JournalFull, Record, RecordType

DIVERGED_ACTION = (
    "every further change is refused with EIO; stop the capture and resync (a restart "
    "compares everything)"
)
OVERFLOW_ACTION = (
    "changes continue unjournaled and are tracked; the replica stays at its last "
    "consistency point until they are resynced"
)


class Tracker(Protocol):
    """Where changes go while the journal is full (see the module docstring)."""

    def absorb(self, record: Record) -> None:
        """Remember the change ``record`` describes, which was made but not journaled."""
        ...


T = TypeVar("T", bound=Tracker)
W = TypeVar("W")


class Events(NamedTuple):
    """How a front end logs the shared events (the names operators and tests look for)."""

    logger: str  # e.g. "replicator.nbd"
    overflow: str  # the journal filled up: changes are tracked from now on
    diverged: str  # a source no longer matches its journal


class JournalFirst(Generic[T]):
    """The journal-first state of one journal; see the module docstring."""

    def __init__(
        self,
        journal: Journal,
        events: Events,
        *,
        overflow: Callable[[], Awaitable[T]] | None = None,
    ) -> None:
        """``overflow``: makes the tracker when the journal fills up (awaited with the lock
        held, before the change is made). None: a full journal fails the change."""
        self.journal = journal
        self.events = events
        self._log = structlog.get_logger(events.logger)
        self._new_tracker = overflow
        # a change above this never fits beside the records awaiting acks: with a tracker,
        # it is tracked, not journaled (None: no cap, or no tracker to take it)
        cap = journal.max_bytes  # fixed when the journal opened
        self._largest = cap // 2 if overflow is not None and cap is not None else None
        self._locked = False
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.unflushed = False  # a change was journaled since the last FLUSH record
        self.overflow: T | None = None  # set while changes go unjournaled (journal full)
        self.resyncing = False  # a resync epoch is being journaled
        self.diverged: dict[str, str] = {}  # scope -> why it no longer matches its journal
        self.journaled = 0  # records appended through this object
        # monotonic time of the first change tracked outside the journal, until the barrier
        # closing its resync is journaled: the oldest change the replica may lack
        self.tracked_since: float | None = None
        # told (that time, the closing barrier's LSN) as the resync closes: the change is
        # in the journal from then on, but its age counts until that barrier is applied
        self.on_resynced: Callable[[float, int], None] | None = None

    @property
    def overflows(self) -> bool:
        """True when a full journal is absorbed by a tracker instead of failing changes."""
        return self._new_tracker is not None

    @property
    def barriers_allowed(self) -> bool:
        """False from the first unjournaled change until its resync's closing barrier: a
        barrier meanwhile would make the receiver apply a state the sources never had."""
        return self.overflow is None and not self.resyncing

    # -- the FIFO lock ---------------------------------------------------------------

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

    async def __aenter__(self) -> None:
        if not self.acquire_nowait():
            await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    # -- journal first -----------------------------------------------------------------

    async def append(self, records: Sequence[Record]) -> bool:
        """Journal ``records`` in order, all or nothing (lock held, before the change).

        False: the journal is full and overflow is on; the tracker has absorbed the
        records and the caller makes the change unjournaled. Without overflow the
        journal's errors (JournalFull, JournalError) reach the caller.
        """
        tracker = self.overflow
        if tracker is not None:
            for record in records:
                tracker.absorb(record)
            return False
        journal = self.journal
        try:
            largest = self._largest
            if largest is not None:
                size = records[0].encoded_size if len(records) == 1 else _size(records)
                if size > largest:
                    raise JournalFull(journal.bytes_used, journal.max_bytes or 0, size)
            if len(records) == 1:  # a captured write: one coroutine fewer per write
                await journal.append(records[0])
            else:
                await journal.append_many(records)
        except JournalFull as exc:
            if self._new_tracker is None:
                raise
            tracker = self.overflow = await self._new_tracker()
            if self.tracked_since is None:
                self.tracked_since = time.monotonic()
            self._log.warning(
                self.events.overflow, journal_bytes=exc.used, cap=exc.cap, action=OVERFLOW_ACTION
            )
            for record in records:
                tracker.absorb(record)
            return False
        self.unflushed = True
        self.journaled += len(records)
        return True

    def append_encoded_now(
        self, count: int, size: int, largest: int, encode: Callable[[int, int], bytes]
    ) -> bool:
        """``append`` for ``count`` records that ``encode(lsn, ts_ns)`` makes in one call
        (``size`` bytes in all, none above ``largest``; lock held, before the changes), when
        it can be done without waiting (``Journal.append_encoded_now``). False: nothing was
        journaled, and the changes take ``append`` (overflow is on, a record may be too
        large for the cap, a roll is due, the journal is full or failed: ``append`` knows
        what each of those means for the writer)."""
        if self.overflow is not None or (self._largest is not None and largest > self._largest):
            return False
        try:
            if self.journal.append_encoded_now(count, size, encode) is None:
                return False
        except JournalError:  # full (nothing staged), or failed: each request then hears it
            return False
        self.unflushed = True
        self.journaled += count
        return True

    async def barrier(self) -> bool:
        """Journal a FLUSH record if a change was journaled since the last one and
        barriers are allowed (takes the lock). True when one was journaled."""
        if not (self.unflushed and self.barriers_allowed):
            return False
        async with self:
            if self.unflushed and self.barriers_allowed and await self.append([Record.flush()]):
                self.unflushed = False
                return True
        return False

    async def barrier_now(self) -> int | None:
        """Journal a FLUSH record now, whatever was journaled since the last one (the live
        ticker: configuration files are journaled beside the capture); its LSN, or None
        while barriers are not allowed. Raises JournalFull.

        Under the lock, like every change: a change holds it from its journal append until
        it is made at its source, so no barrier ever follows a change its source has not
        had yet. Without the lock, a sender killed between the two left a consistency
        point the source never passed through (the replica held the change, the source
        did not, until the restarted sender compared them).
        """
        async with self:
            if not self.barriers_allowed:
                return None
            lsn = await self.journal.append(Record.flush())
            self.unflushed = False
            return lsn

    async def reconcile(
        self,
        scope: str,
        fd: int,
        name: str,
        offset: int,
        length: int,
        failure: BaseException,
        *,
        known_size: int | None = None,
    ) -> int | None:
        """A journaled change of ``[offset, offset+length)`` of ``name`` failed with
        ``failure``: journal what the file holds now (lock held). Returns the size a
        journaled RESIZE gave it, if any (``known_size``: the size the journal already
        says; no RESIZE then unless it differs).

        The records from ``truth_records`` (its real size, the range's real bytes) come
        after the record of the failed change and override it. If they cannot be read or
        journaled, ``scope`` diverges.
        """
        size: int | None = None
        try:
            for record in truth_records(fd, name, offset, length, known_size):
                if await self.append([record]) and record.type is RecordType.RESIZE:
                    size = record.size
        except Exception as again:
            self.diverge(
                scope,
                f"{name} may differ from its journal after a failed change ({failure}) and "
                f"a failed recovery ({again}); a full resync is needed",
            )
        return size

    def diverge(self, scope: str, reason: str) -> None:
        """``scope`` no longer matches its journal: the front end refuses its changes."""
        if scope in self.diverged:
            return
        self.diverged[scope] = reason
        self._log.critical(self.events.diverged, scope=scope, reason=reason, action=DIVERGED_ACTION)

    # -- resync after an overflow ------------------------------------------------------

    async def resync_start(
        self,
        plan: Callable[[T], Awaitable[tuple[list[Record], W]]],
        make_room: Callable[[], Awaitable[bool]],
    ) -> W | None:
        """Step 1 of a resync: under the lock, ``plan`` turns the tracker into records
        journaled now (all in one append) and the work left, which is returned; journaling
        resumes for new changes, barriers stay off. None when nothing is tracked.

        While the journal has no room for the plan, ``make_room`` is awaited outside the
        lock and the tracker keeps absorbing changes meanwhile.
        """
        while True:
            async with self:
                tracker = self.overflow
                if tracker is None:
                    return None
                records, work = await plan(tracker)
                try:
                    if records:
                        await self.journal.append_many(records)
                except JournalFull:
                    pass
                else:
                    self.journaled += len(records)
                    self.overflow, self.resyncing = None, True
                    return work
            await self._room(make_room)

    async def resync_step(
        self,
        read: Callable[[], Awaitable[list[Record] | None]],
        make_room: Callable[[], Awaitable[bool]],
    ) -> list[Record] | None:
        """Step 2, once per run of content: ``read`` it and journal it in one hold of the
        lock, so a change of the same bytes is journaled wholly before or after it."""
        while True:
            async with self:
                self._check_resyncing()
                records = await read()
                try:
                    if records:
                        await self.journal.append_many(records)
                except JournalFull:
                    pass
                else:
                    self.journaled += len(records or ())
                    return records
            await self._room(make_room)

    async def resync_close(self, make_room: Callable[[], Awaitable[bool]]) -> None:
        """Step 3: the FLUSH barrier that makes the whole resync one epoch."""
        while True:
            async with self:
                self._check_resyncing()
                try:
                    closing = await self.journal.append(Record.flush())
                except JournalFull:
                    pass
                else:
                    self.journaled += 1
                    self.resyncing = self.unflushed = False
                    since, self.tracked_since = self.tracked_since, None
                    if since is not None and self.on_resynced is not None:
                        self.on_resynced(since, closing)
                    return
            await self._room(make_room)

    async def resync_requeue(self, merge: Callable[[T], None]) -> None:
        """A resync ran out of room: ``merge`` what it did not journal into the tracker
        (a fresh one if none began meanwhile). Barriers stay off until a later resync
        completes the epoch."""
        assert self._new_tracker is not None
        async with self:
            if self.overflow is None:
                self.overflow = await self._new_tracker()
            merge(self.overflow)

    def _check_resyncing(self) -> None:
        """The journal filled up again under the writers' own changes during the resync:
        no barrier may close this epoch now; the rest goes into that new overflow."""
        if self.overflow is not None:
            raise JournalFull(self.journal.bytes_used, self.journal.max_bytes or 0, 0)

    async def _room(self, make_room: Callable[[], Awaitable[bool]]) -> None:
        if not await make_room():
            raise JournalFull(self.journal.bytes_used, self.journal.max_bytes or 0, 0)


def _size(records: Sequence[Record]) -> int:
    return sum(record.encoded_size for record in records)
