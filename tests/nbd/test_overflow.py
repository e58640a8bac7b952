"""A full journal does not fail the guest's writes; the tracked extents resync in one epoch."""

from __future__ import annotations

import os
import random
from pathlib import Path

from replicator.engine.nbd.backend import JournaledFileExport, resync_overflow
from replicator.engine.nbd.overflow import EXTENT, DirtyMap
from replicator.journal import Journal, JournalFull, Record, RecordType
from tests.nbd.helpers import apply_record, replay

KiB = 1024
MiB = 1024 * KiB
CAP = 4 * MiB


async def _records(journal: Journal, start: int) -> list[Record]:
    await journal.sync()
    return [r async for r in journal.read_from(start)]


async def test_writes_past_the_cap_succeed_and_resync_in_one_epoch(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(8 * MiB))
    journal = await Journal.open(tmp_path / "j", segment_bytes=MiB, max_bytes=CAP)
    export = JournaledFileExport(journal, disk, "disk.img", overflow=True)
    rng = random.Random(7)
    try:
        for _ in range(200):  # ~13 MiB of 64 KiB writes into a 4 MiB journal, on 2 MiB
            offset = rng.randrange(0, 2 * MiB - 64 * KiB, 4096)
            await export.write(offset, rng.randbytes(64 * KiB), fua=False)
            await export.flush()
        assert not _allowed(export)  # overflow: no consistency point may be claimed
        before = journal.last_lsn
        # the receiver applied and acked everything journaled: the sender trims
        await journal.trim(journal.last_lsn + 1)
        await export.write(0, b"\x77" * 4096, fua=False)  # writes keep coming meanwhile
        sent = await resync_overflow([export], _no_room)
        assert sent > 0 and _allowed(export)
        after = await _records(journal, before + 1)
        barriers = [r for r in after if r.is_barrier]
        assert len(barriers) == 1 and after[-1].is_barrier  # one epoch, closed at the end
        # every extent the overflow touched is in the epoch (the byte check is below)
        assert len({r.offset // EXTENT for r in after if r.type is RecordType.WRITE}) > 25
    finally:
        await export.aclose()
        await journal.aclose()


async def test_resync_reproduces_the_source_from_the_last_consistency_point(
    tmp_path: Path,
) -> None:
    """Replay everything journaled (nothing trimmed here) onto a blank copy: equal bytes."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(6 * MiB))
    journal = await Journal.open(tmp_path / "j", segment_bytes=MiB, max_bytes=CAP)
    export = JournaledFileExport(journal, disk, "disk.img", overflow=True)
    rng = random.Random(11)
    replica = tmp_path / "replica.img"
    replica.write_bytes(bytes(6 * MiB))
    try:
        for _ in range(120):
            offset = rng.randrange(0, 6 * MiB - 64 * KiB, 512)
            await export.write(offset, rng.randbytes(rng.choice((4096, 65536))), fua=False)
        await export.write_zeroes(MiB, 2 * EXTENT, fua=False, may_trim=True)
        applied = await replay(journal, "disk.img", replica)  # the receiver's copy so far
        assert applied > 0
        start = journal.last_lsn + 1
        await journal.trim(start)
        assert await resync_overflow([export], _no_room) > 0
        for record in await _records(journal, start):
            if record.volume == "disk.img":
                fd = os.open(replica, os.O_RDWR)
                try:
                    if record.type is RecordType.WRITE:
                        os.pwrite(fd, record.data, record.offset)
                    elif record.type in (RecordType.ZERO, RecordType.TRIM):
                        os.pwrite(fd, bytes(record.length), record.offset)
                finally:
                    os.close(fd)
        assert replica.read_bytes() == disk.read_bytes()
    finally:
        await export.aclose()
        await journal.aclose()


async def test_a_resync_that_fills_the_journal_again_keeps_the_epoch_open(
    tmp_path: Path,
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(8 * MiB))
    journal = await Journal.open(tmp_path / "j", segment_bytes=MiB, max_bytes=CAP)
    export = JournaledFileExport(journal, disk, "disk.img", overflow=True)
    try:
        for i in range(8 * MiB // (64 * KiB)):  # every extent dirty: 8 MiB > the cap
            await export.write(i * 64 * KiB, os.urandom(64 * KiB), fua=False)
        await journal.trim(journal.last_lsn + 1)
        try:
            await resync_overflow([export], _no_room)
            raise AssertionError("8 MiB cannot fit in a 4 MiB journal")
        except JournalFull:
            pass
        assert not _allowed(export)  # still no barrier: the epoch is not complete
        flushed = journal.last_lsn
        await export.flush()  # a guest FLUSH is honoured, but journals no barrier
        assert journal.last_lsn == flushed

        rooms = 0

        async def acked() -> bool:  # the receiver durably took what was shipped
            nonlocal rooms
            rooms += 1
            await journal.trim(journal.last_lsn + 1)
            return True

        assert await resync_overflow([export], acked) > 0  # larger than the journal
        assert rooms >= 1
        assert _allowed(export)
    finally:
        await export.aclose()
        await journal.aclose()


async def test_guest_writes_that_fill_the_journal_during_a_resync_keep_the_epoch_open(
    tmp_path: Path,
) -> None:
    """No barrier may close a resync once new writes go unjournaled again: it would make
    the receiver apply extents read after those writes without the others they touched."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(8 * MiB))
    replica = tmp_path / "replica.img"
    replica.write_bytes(bytes(8 * MiB))
    journal = await Journal.open(tmp_path / "j", segment_bytes=MiB, max_bytes=CAP)
    export = JournaledFileExport(journal, disk, "disk.img", overflow=True)
    rng = random.Random(5)
    barriers: list[int] = []

    async def ship() -> None:  # the receiver applies and acknowledges what is journaled
        records = await _records(journal, journal.first_lsn)
        barriers.extend(r.lsn for r in records if r.is_barrier)
        fd = os.open(replica, os.O_RDWR)
        try:
            for record in records:
                apply_record(fd, record)
        finally:
            os.close(fd)
        await journal.trim(journal.last_lsn + 1)

    async def guest_writes(count: int) -> None:
        for _ in range(count):
            offset = rng.randrange(0, 8 * MiB - 64 * KiB, 4096)
            await export.write(offset, rng.randbytes(64 * KiB), fua=False)

    try:
        await guest_writes(128)  # ~8 MiB into a 4 MiB journal
        await ship()
        busy = True

        async def busy_guest() -> bool:  # acks come, but the guest fills the journal again
            nonlocal busy
            await ship()
            if busy:
                busy = False
                await guest_writes(100)
            return True

        try:
            await resync_overflow([export], busy_guest)
            raise AssertionError("the resync must not close its epoch")
        except JournalFull:
            pass
        await ship()
        assert not _allowed(export) and barriers == []

        async def acked() -> bool:
            await ship()
            return True

        assert await resync_overflow([export], acked) > 0
        assert _allowed(export)
        await ship()
        assert len(barriers) == 1
        assert replica.read_bytes() == disk.read_bytes()
    finally:
        await export.aclose()
        await journal.aclose()


def _allowed(export: JournaledFileExport) -> bool:
    """Read afresh (a property the resync flips; mypy would keep the narrowed value)."""
    return export.barriers_allowed


async def _no_room() -> bool:
    return False


def test_dirty_runs_are_contiguous_and_bounded() -> None:
    dirt = DirtyMap()
    dirt.mark("v", 0, 1, 0)
    dirt.mark("v", EXTENT * 3, EXTENT * 40, 0)
    runs = list(dirt.runs("v", limit=16 * EXTENT))
    assert runs[0] == (0, EXTENT)
    assert all(length <= 16 * EXTENT for _, length in runs)
    assert sum(length for _, length in runs[1:]) == 40 * EXTENT
    assert dirt.bytes == 41 * EXTENT
