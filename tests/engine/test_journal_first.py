"""JournalFirst: the journal-first policy NBD exports and the FUSE filter share."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from replicator.engine.journal_first import Events, JournalFirst
from replicator.journal import Journal, JournalFull, Record, RecordType

KiB = 1024
EVENTS = Events("replicator.test", overflow="test.journal_overflow", diverged="test.diverged")


@dataclass
class Tracker:
    absorbed: list[Record] = field(default_factory=list)

    def absorb(self, record: Record) -> None:
        self.absorbed.append(record)

    def merge(self, other: list[Record]) -> None:
        self.absorbed.extend(other)


async def new_tracker() -> Tracker:
    return Tracker()


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    j = await Journal.open(tmp_path / "journal")
    yield j
    await j.aclose()


@pytest.fixture
async def small(tmp_path: Path) -> AsyncIterator[Journal]:
    """A journal capped at 64 KiB."""
    j = await Journal.open(tmp_path / "small", segment_bytes=16 * KiB, max_bytes=64 * KiB)
    yield j
    await j.aclose()


async def records_of(journal: Journal) -> list[Record]:
    await journal.sync()
    return [r async for r in journal.read_from(journal.first_lsn)]


def write(n: int, offset: int = 0) -> Record:
    return Record.write("v", offset, b"x" * n)


def allowed(seq: JournalFirst[Tracker]) -> bool:
    """Read afresh (mypy would keep a narrowed property value)."""
    return seq.barriers_allowed


def tracker_of(seq: JournalFirst[Tracker]) -> Tracker | None:
    """Read afresh, like ``allowed``."""
    return seq.overflow


async def fill(seq: JournalFirst[Tracker]) -> int:
    """Append 4 KiB writes until one does not fit; returns how many did."""
    n = 0
    while await seq.append([write(4 * KiB, n * 4 * KiB)]):
        n += 1
    return n


async def test_lock_is_fifo_and_survives_cancelled_waiters(journal: Journal) -> None:
    seq: JournalFirst[Tracker] = JournalFirst(journal, EVENTS)
    assert seq.acquire_nowait()
    order: list[str] = []

    async def take(name: str) -> None:
        await seq.acquire()
        order.append(name)
        await asyncio.sleep(0)
        seq.release()

    b = asyncio.ensure_future(take("b"))
    c = asyncio.ensure_future(take("c"))
    d = asyncio.ensure_future(take("d"))
    await asyncio.sleep(0)
    b.cancel()  # cancelled while waiting
    await asyncio.sleep(0)
    seq.release()  # hands the lock to c
    e = asyncio.ensure_future(take("e"))
    await asyncio.gather(c, d, e)
    assert b.cancelled()
    assert order == ["c", "d", "e"]
    # a waiter cancelled right after the lock was handed to it passes the lock on
    assert seq.acquire_nowait()
    f = asyncio.ensure_future(take("f"))
    g = asyncio.ensure_future(take("g"))
    await asyncio.sleep(0)
    seq.release()  # f now owns the lock but has not run yet
    f.cancel()
    await g
    assert order[-1] == "g" and f.cancelled()
    assert seq.acquire_nowait()
    seq.release()
    async with seq:  # the slow path's context manager takes the same lock
        assert not seq.acquire_nowait()
    assert seq.acquire_nowait()


async def test_barrier_only_after_a_journaled_change(journal: Journal) -> None:
    seq: JournalFirst[Tracker] = JournalFirst(journal, EVENTS)
    assert not await seq.barrier()  # nothing changed yet
    async with seq:
        assert await seq.append([write(10)])
    assert seq.unflushed
    assert await seq.barrier()
    assert not await seq.barrier()
    assert [r.type for r in await records_of(journal)] == [RecordType.WRITE, RecordType.FLUSH]
    assert seq.journaled == 2


async def test_barrier_now_waits_for_a_change_journaled_but_not_yet_made(
    journal: Journal,
) -> None:
    """The live ticker's barrier: never between a change's journal append and the change
    itself (a sender killed there left a consistency point its source never had)."""
    seq: JournalFirst[Tracker] = JournalFirst(journal, EVENTS)
    await journal.append(Record.file("vm.xml", b"<domain/>"))  # journaled beside the capture
    async with seq:  # a change: journaled, then made at its source, under the lock
        assert await seq.append([write(10)])
        ticker = asyncio.ensure_future(seq.barrier_now())
        await asyncio.sleep(0.05)
        assert not ticker.done()  # the change is not made yet: no barrier after it
        assert [r.type for r in await records_of(journal)] == [RecordType.FILE, RecordType.WRITE]
    lsn = await ticker
    assert lsn == journal.last_lsn and not seq.unflushed
    types = [r.type for r in await records_of(journal)]
    assert types == [RecordType.FILE, RecordType.WRITE, RecordType.FLUSH]
    assert await seq.barrier_now() == journal.last_lsn  # a FLUSH whatever came before


async def test_barrier_now_on_a_full_journal_fails_cleanly(small: Journal) -> None:
    """The ticker's barrier when no record fits: JournalFull (the ticker lets the capture
    track what follows), no barrier counted, and the lock free for the next change."""
    seq: JournalFirst[Tracker] = JournalFirst(small, EVENTS)
    with pytest.raises(JournalFull):
        await fill(seq)
    with pytest.raises(JournalFull):  # then even the smallest change
        while True:
            await seq.append([write(1)])
    assert seq.unflushed
    with pytest.raises(JournalFull):
        await seq.barrier_now()
    assert seq.unflushed  # still owed: the next barrier that fits closes these changes
    assert seq.acquire_nowait()  # the failed barrier released the lock
    seq.release()
    assert not any(r.is_barrier for r in await records_of(small))
    await small.trim(small.last_lsn + 1)  # the receiver holds everything
    assert await seq.barrier_now() == small.last_lsn and not seq.unflushed


async def test_without_overflow_a_full_journal_fails_the_change(small: Journal) -> None:
    seq: JournalFirst[Tracker] = JournalFirst(small, EVENTS)
    with pytest.raises(JournalFull):
        await fill(seq)
    assert seq.overflow is None and allowed(seq)


async def test_full_journal_hands_over_to_the_tracker_and_stops_barriers(small: Journal) -> None:
    seq = JournalFirst(small, EVENTS, overflow=new_tracker)
    with capture_logs() as logs:
        journaled = await fill(seq)
    assert journaled > 0
    assert [e["event"] for e in logs] == ["test.journal_overflow"]
    assert logs[0]["log_level"] == "warning" and logs[0]["cap"] == 64 * KiB
    tracker = seq.overflow
    assert tracker is not None and [r.offset for r in tracker.absorbed] == [journaled * 4 * KiB]
    assert not allowed(seq)
    # from now on every change is absorbed, even one that would fit after a trim
    await small.trim(small.last_lsn + 1)
    assert not await seq.append([write(1)])
    assert len(tracker.absorbed) == 2
    last = small.last_lsn
    assert not await seq.barrier()  # unflushed, but no barrier may be journaled now
    assert small.last_lsn == last


async def test_a_change_larger_than_half_the_cap_overflows_at_once(small: Journal) -> None:
    seq = JournalFirst(small, EVENTS, overflow=new_tracker)
    assert not await seq.append([write(40 * KiB)])  # would never fit beside unacked records
    assert seq.overflow is not None and small.last_lsn == 0
    # a change of several records counts them all (a write that grows its file, 2 x 17 KiB)
    seq = JournalFirst(small, EVENTS, overflow=new_tracker)
    assert await seq.append([write(17 * KiB)])  # fits
    assert not await seq.append([write(17 * KiB), write(17 * KiB, 17 * KiB)])
    assert seq.overflow is not None and small.last_lsn == 1


async def test_diverge_keeps_the_first_reason_per_scope_and_logs_it_once(
    journal: Journal,
) -> None:
    seq: JournalFirst[Tracker] = JournalFirst(journal, EVENTS)
    with capture_logs() as logs:
        seq.diverge("a", "first")
        seq.diverge("a", "second")
        seq.diverge("b", "other")
    assert seq.diverged == {"a": "first", "b": "other"}
    assert [(e["event"], e["log_level"], e["scope"]) for e in logs] == [
        ("test.diverged", "critical", "a"),
        ("test.diverged", "critical", "b"),
    ]


async def test_reconcile_journals_what_the_file_holds(tmp_path: Path, journal: Journal) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"a" * 8 * KiB)
    fd = os.open(path, os.O_RDWR)
    try:
        seq: JournalFirst[Tracker] = JournalFirst(journal, EVENTS)
        failure = OSError(errno.ENOSPC, "No space left on device")
        async with seq:
            assert await seq.append([Record.write("f", 4 * KiB, b"b" * 8 * KiB)])
            os.pwrite(fd, b"b" * 2 * KiB, 4 * KiB)  # the change stopped short
            size = await seq.reconcile("f", fd, "f", 4 * KiB, 8 * KiB, failure, known_size=12 * KiB)
        assert size == 8 * KiB and not seq.diverged
        truth = (await records_of(journal))[1:]
        assert [r.type for r in truth] == [RecordType.RESIZE, RecordType.WRITE]
        assert truth[1].offset == 4 * KiB and truth[1].data == b"b" * 2 * KiB + b"a" * 2 * KiB
    finally:
        os.close(fd)


async def test_reconcile_that_cannot_read_the_file_diverges(journal: Journal) -> None:
    seq: JournalFirst[Tracker] = JournalFirst(journal, EVENTS)
    r, w = os.pipe()
    os.close(r)
    os.close(w)  # a closed descriptor: the truth cannot be read
    with capture_logs() as logs:
        async with seq:
            size = await seq.reconcile("vol", r, "f", 0, 10, OSError(errno.EIO, "I/O"))
    assert size is None
    assert "a full resync is needed" in seq.diverged["vol"]
    assert [e["event"] for e in logs] == ["test.diverged"]


async def test_resync_is_one_epoch_and_a_new_overflow_keeps_it_open(small: Journal) -> None:
    seq = JournalFirst(small, EVENTS, overflow=new_tracker)
    await fill(seq)
    await small.trim(small.last_lsn + 1)

    async def plan(tracker: Tracker) -> tuple[list[Record], list[Record]]:
        return [Record.resize("v", 1)], list(tracker.absorbed)

    async def room() -> bool:
        await small.trim(small.last_lsn + 1)  # the receiver acknowledged everything
        return True

    work = await seq.resync_start(plan, room)
    assert work is not None and len(work) == 1
    assert tracker_of(seq) is None and seq.resyncing and not allowed(seq)
    start = small.last_lsn
    # the writers' own changes fill the journal again in the middle of the resync
    await fill(seq)
    assert tracker_of(seq) is not None

    async def read() -> list[Record] | None:
        return [write(100)]

    with pytest.raises(JournalFull):  # no barrier may close this epoch now
        await seq.resync_step(read, room)
    await seq.resync_requeue(lambda tracker: tracker.merge(work))
    tracker = tracker_of(seq)
    assert tracker is not None and work[0] in tracker.absorbed
    assert not any(r.is_barrier for r in await records_of(small) if r.lsn > start)
    # a later resync completes the epoch
    await small.trim(small.last_lsn + 1)
    assert await seq.resync_start(plan, room) is not None
    assert await seq.resync_step(read, room) == [write(100)]
    await seq.resync_close(room)
    assert allowed(seq) and not seq.unflushed
    assert (await records_of(small))[-1].is_barrier


async def test_resync_gives_up_when_no_room_can_be_made(small: Journal) -> None:
    seq = JournalFirst(small, EVENTS, overflow=new_tracker)
    await fill(seq)  # the journal is full and stays full

    async def plan(tracker: Tracker) -> tuple[list[Record], None]:
        return [write(8 * KiB)], None

    async def no_room() -> bool:
        return False

    with pytest.raises(JournalFull):
        await seq.resync_start(plan, no_room)
    assert seq.overflow is not None and not seq.resyncing  # still tracking, nothing lost
