"""Behaviour of the Journal API: LSNs, sync, replay, follow, trim, cap, close, failure."""

from __future__ import annotations

import asyncio
import errno
import time
from pathlib import Path

import pytest

from replicator.engine.errors import ConfigError, ExitCode
from replicator.journal import (
    Journal,
    JournalError,
    JournalFull,
    Record,
    RecordError,
    RecordType,
)
from replicator.journal import durable as durable_mod
from replicator.journal.segment import HEADER_BYTES, SEAL_BYTES
from tests.journal.helpers import (
    check_record,
    dir_bytes,
    filled,
    read_all,
    segment_files,
    segments_bytes,
    write_for,
)


async def test_open_creates_an_empty_journal(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b"
    async with await Journal.open(path) as j:
        assert (j.first_lsn, j.last_lsn, j.next_lsn, j.durable_lsn) == (1, 0, 1, 0)
        assert [p.name for p in segment_files(path)] == ["00000000000000000001.seg"]
        assert j.bytes_used == HEADER_BYTES
        assert await read_all(j) == []


async def test_append_assigns_consecutive_lsns_and_timestamps(tmp_path: Path) -> None:
    async with await Journal.open(tmp_path) as j:
        before = time.time_ns()
        assert await j.append(Record.flush()) == 1
        assert await j.append(Record.epoch(7)) == 2
        kept = Record(RecordType.ZERO, "vol", 0, 4096, ts_ns=123)
        assert await j.append_many([write_for(3), kept]) == 4
        assert await j.sync() == 4
        got = await read_all(j)
    assert [r.lsn for r in got] == [1, 2, 3, 4]
    assert [r.type for r in got] == [
        RecordType.FLUSH,
        RecordType.EPOCH,
        RecordType.WRITE,
        RecordType.ZERO,
    ]
    assert got[0].ts_ns >= before
    assert got[3].ts_ns == 123
    check_record(got[2])
    assert got[1].epoch_id == 7


async def test_explicit_lsns_are_kept_and_must_increase(tmp_path: Path) -> None:
    async with await Journal.open(tmp_path) as j:
        assert await j.append(write_for(5000).with_lsn(5000)) == 5000
        assert await j.append(write_for(5001)) == 5001  # auto continues after it
        with pytest.raises(JournalError, match="not after"):
            await j.append(write_for(5001).with_lsn(5001))
        # a batch is all or nothing: a bad LSN in the middle appends none of it
        batch = [write_for(6000).with_lsn(6000), write_for(5999).with_lsn(5999)]
        with pytest.raises(JournalError):
            await j.append_many(batch)
        assert j.last_lsn == 5001
        assert await j.append_many([]) == 5001
        await j.sync()
        assert [r.lsn for r in await read_all(j)] == [5000, 5001]
        assert j.first_lsn == 5000


async def test_readers_see_only_synced_records(tmp_path: Path) -> None:
    async with await Journal.open(tmp_path) as j:
        await j.append(write_for(1))
        assert j.durable_lsn == 0
        assert await read_all(j) == []
        await j.sync()
        await j.append(write_for(2))
        assert [r.lsn for r in await read_all(j)] == [1]
        assert await j.sync() == 2
        assert [r.lsn for r in await read_all(j)] == [1, 2]


async def test_written_but_unsynced_records_stay_invisible(tmp_path: Path) -> None:
    async with await Journal.open(tmp_path) as j:
        await j.append(write_for(1))
        await j.sync()
        big = Record.write("vol", 0, b"b" * (3 << 19))  # 1.5 MiB: written at once, not synced
        await j.append(big)
        assert j.bytes_used == dir_bytes(tmp_path)  # it is in the file already
        assert [r.lsn for r in await read_all(j)] == [1]
        seen: list[int] = []
        second = asyncio.Event()

        async def follower() -> None:
            async for record in j.follow(1):
                seen.append(record.lsn)
                if record.lsn == 2:
                    second.set()

        task = asyncio.create_task(follower())
        await asyncio.sleep(0.05)
        assert seen == [1]
        await j.sync()
        await asyncio.wait_for(second.wait(), 2)
        assert seen == [1, 2]
        task.cancel()


async def test_read_from_the_middle_across_segments(tmp_path: Path) -> None:
    j = await filled(tmp_path, 60, segment_bytes=1024)
    try:
        assert j.segment_count > 5
        got = await read_all(j, 17)
        assert [r.lsn for r in got] == list(range(17, 61))
        for r in got:
            check_record(r)
        assert await read_all(j, 61) == []
        assert [r.lsn for r in await read_all(j, 0)] == list(range(1, 61))
    finally:
        await j.aclose()


async def test_reopen_keeps_records_and_continues_lsns(tmp_path: Path) -> None:
    j = await filled(tmp_path, 30)
    await j.append(write_for(31))  # not synced: aclose syncs it
    await j.aclose()
    async with await Journal.open(tmp_path, segment_bytes=1024) as j:
        assert (j.first_lsn, j.last_lsn, j.durable_lsn) == (1, 31, 31)
        assert await j.append(write_for(32)) == 32
        await j.sync()
        assert [r.lsn for r in await read_all(j)] == list(range(1, 33))
        assert j.bytes_used == dir_bytes(tmp_path)


async def test_follow_waits_for_sync_and_ends_on_close(tmp_path: Path) -> None:
    j = await Journal.open(tmp_path, segment_bytes=1024)
    seen: list[int] = []
    got_one = asyncio.Event()
    got_all = asyncio.Event()

    async def follower() -> None:
        async for record in j.follow(1):
            seen.append(record.lsn)
            got_one.set()
            if record.lsn == 39:
                got_all.set()

    task = asyncio.create_task(follower())
    await j.append(write_for(1))
    await asyncio.sleep(0.05)
    assert seen == []  # appended but not synced: not shipped
    await j.sync()
    await asyncio.wait_for(got_one.wait(), 2)
    assert seen == [1]
    for lsn in range(2, 40):  # rolls several segments under the follower
        await j.append(write_for(lsn, 200))
    await j.sync()
    await asyncio.wait_for(got_all.wait(), 2)
    assert seen == list(range(1, 40))
    await j.aclose()
    await asyncio.wait_for(task, 2)  # the follower ended on close


async def test_follow_from_the_middle_then_live(tmp_path: Path) -> None:
    j = await filled(tmp_path, 20)
    got: list[int] = []

    async def follower() -> None:
        async for record in j.follow(15):
            got.append(record.lsn)
            if record.lsn == 25:
                return

    task = asyncio.create_task(follower())
    for lsn in range(21, 26):
        await j.append(write_for(lsn, 100))
        await j.sync()
    await asyncio.wait_for(task, 2)
    assert got == list(range(15, 26))
    await j.aclose()


async def test_group_commit_shares_fdatasync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    real = durable_mod.fdatasync_fd

    def counting(fd: int) -> None:  # runs in a worker thread
        nonlocal calls
        calls += 1
        time.sleep(0.01)  # a slow disk: many callers pile up behind one sync
        real(fd)

    monkeypatch.setattr(durable_mod, "fdatasync_fd", counting)
    async with await Journal.open(tmp_path) as j:

        async def writer(i: int) -> None:
            for _ in range(5):
                lsn = await j.append(write_for(i))
                assert await j.sync() >= lsn
                assert j.durable_lsn >= lsn

        await asyncio.gather(*(writer(i) for i in range(50)))
        assert j.durable_lsn == 250
        assert 5 <= calls < 30, calls  # 250 syncs shared a handful of fdatasyncs


async def test_a_cancelled_sync_waiter_does_not_stop_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = durable_mod.fdatasync_fd

    def slow(fd: int) -> None:
        time.sleep(0.05)
        real(fd)

    monkeypatch.setattr(durable_mod, "fdatasync_fd", slow)
    async with await Journal.open(tmp_path) as j:
        await j.append(write_for(1))
        first = asyncio.create_task(j.sync())
        await asyncio.sleep(0.01)
        second = asyncio.create_task(j.sync())
        await asyncio.sleep(0)
        first.cancel()
        assert await second == 1
        with pytest.raises(asyncio.CancelledError):
            await first


async def test_journal_full_then_trim_frees_space(tmp_path: Path) -> None:
    async with await Journal.open(tmp_path, segment_bytes=1024, max_bytes=4096) as j:
        lsn = 0
        with pytest.raises(JournalFull) as info:
            while True:
                lsn = await j.append(write_for(lsn + 1, 150))
        full = info.value
        assert full.cap == 4096
        assert full.used == j.disk_bytes
        assert full.used + full.needed + SEAL_BYTES > full.cap
        assert full.exit_code == ExitCode.JOURNAL
        assert j.disk_bytes <= 4096
        assert j.last_lsn == lsn  # nothing of the refused append was written
        with pytest.raises(JournalFull):  # still full, still usable
            await j.append(write_for(lsn + 1, 150))
        await j.sync()
        await j.trim(j.last_lsn + 1)  # everything acknowledged
        assert segments_bytes(tmp_path) < 1024 + HEADER_BYTES + SEAL_BYTES
        assert j.bytes_used == segments_bytes(tmp_path)  # what the records weigh
        assert j.disk_bytes == dir_bytes(tmp_path)  # and the spare files kept for reuse
        for n in range(lsn + 1, lsn + 6):
            assert await j.append(write_for(n, 150)) == n
        await j.sync()
        assert [r.lsn for r in await read_all(j, j.first_lsn)][-5:] == list(range(lsn + 1, lsn + 6))
        assert j.disk_bytes == dir_bytes(tmp_path)
        # the spares give their room back: the journal holds as many records as before
        with pytest.raises(JournalFull):
            for n in range(lsn + 6, 3 * lsn):
                await j.append(write_for(n, 150))
        assert j.last_lsn - j.first_lsn + 1 == lsn
        assert j.spare_count == 0
        assert j.bytes_used <= j.disk_bytes <= 4096


async def test_a_record_that_can_never_fit_is_not_journal_full(tmp_path: Path) -> None:
    async with await Journal.open(tmp_path, segment_bytes=1024, max_bytes=2048) as j:
        with pytest.raises(JournalError, match="never fit") as info:
            await j.append(Record.write("vol", 0, b"x" * 4000))
        assert not isinstance(info.value, JournalFull)


async def test_bad_configuration_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="twice"):
        await Journal.open(tmp_path / "j", segment_bytes=1 << 20, max_bytes=1 << 20)
    with pytest.raises(ConfigError):
        await Journal.open(tmp_path / "j", segment_bytes=10)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ConfigError, match="not a directory"):
        await Journal.open(tmp_path / "file")


async def test_trim_drops_sealed_segments_only(tmp_path: Path) -> None:
    j = await filled(tmp_path, 60)
    try:
        files = segment_files(tmp_path)
        await j.trim(1)  # nothing is below LSN 1
        assert segment_files(tmp_path) == files
        await j.trim(30)
        first = j.first_lsn
        assert 1 < first <= 30
        assert [r.lsn for r in await read_all(j, first)] == list(range(first, 61))
        assert segment_files(tmp_path)[0].name == f"{first:020d}.seg"
        with pytest.raises(JournalError, match="trimmed"):
            await read_all(j, 1)
        await j.trim(10**6)  # all records acknowledged; the active segment stays
        assert j.segment_count == 1
        assert j.disk_bytes == dir_bytes(tmp_path)
        assert j.bytes_used == HEADER_BYTES  # an empty segment (its file perhaps a spare's)
    finally:
        await j.aclose()


async def test_trimmable_says_whether_a_trim_would_drop_a_segment(tmp_path: Path) -> None:
    j = await filled(tmp_path, 60)
    try:
        assert j.segment_count > 2
        for upto in range(1, 62):
            count = j.segment_count
            would = j.trimmable(upto)
            await j.trim(upto)
            assert would == (j.segment_count < count), upto
        assert not j.trimmable(10**6)  # one segment left: the active one stays
    finally:
        await j.aclose()


async def test_observer_sees_every_append_and_before_trim_can_hold_a_trim(
    tmp_path: Path,
) -> None:
    j = await filled(tmp_path, 60)
    try:
        seen: list[int] = []
        j.observer = lambda records: seen.extend(r.offset for r in records)
        await j.append(Record.write("d", 7, b"x"))
        await j.append_many([Record.write("d", 8, b"y"), Record.write("d", 9, b"z")])
        assert seen == [7, 8, 9]
        asked: list[bool] = []

        async def hold() -> bool:
            asked.append(True)
            return False

        j.before_trim = hold
        files = segment_files(tmp_path)
        await j.trim(1)  # nothing to drop: not asked
        assert asked == []
        await j.trim(30)  # asked, and held: nothing dropped
        assert asked == [True] and segment_files(tmp_path) == files and j.first_lsn == 1

        async def allow() -> bool:
            asked.append(True)
            return True

        j.before_trim = allow
        await j.trim(30)
        assert len(asked) == 2 and j.first_lsn > 1
    finally:
        await j.aclose()


async def test_lsn_floor_survives_full_trim_and_reopen(tmp_path: Path) -> None:
    j = await filled(tmp_path, 40, segment_bytes=1024)
    await j.trim(41)
    await j.aclose()
    async with await Journal.open(tmp_path, segment_bytes=1024) as j:
        assert j.last_lsn == 40
        assert j.next_lsn == 41
        assert j.first_lsn >= 30  # the full active segment may have been sealed and dropped
        assert await j.append(write_for(41)) == 41


async def test_lsn_floor_with_empty_active_segment(tmp_path: Path) -> None:
    # a full active segment wholly below the trim point is sealed and dropped
    # 161-byte records, 6 to a segment: LSN 7..12 fill the second one up
    j = await filled(tmp_path, 12, segment_bytes=1024)
    await j.trim(13)
    assert j.segment_count == 1
    assert j.first_lsn == j.next_lsn == 13
    await j.aclose()
    async with await Journal.open(tmp_path, segment_bytes=1024) as j:
        assert (j.first_lsn, j.last_lsn, j.next_lsn) == (13, 12, 13)
        assert await read_all(j, 13) == []
        with pytest.raises(JournalError, match="trimmed"):
            await read_all(j, 12)
        assert await j.append(Record.flush()) == 13


async def test_oversized_record_gets_its_own_segment(tmp_path: Path) -> None:
    async with await Journal.open(tmp_path, segment_bytes=1024) as j:
        await j.append(write_for(1, 100))
        await j.append(Record.write("vol", 0, b"z" * 5000))
        await j.append(write_for(3, 100))
        await j.sync()
        assert [len(r.data) for r in await read_all(j)] == [100, 5000, 100]
        assert j.segment_count == 3


async def test_closed_journal_refuses_work_and_close_is_idempotent(tmp_path: Path) -> None:
    j = await Journal.open(tmp_path)
    await j.aclose()
    await j.aclose()
    with pytest.raises(JournalError, match="closed"):
        await j.append(Record.flush())
    with pytest.raises(JournalError, match="closed"):
        await j.sync()
    with pytest.raises(JournalError, match="closed"):
        await read_all(j)


async def test_second_open_of_the_same_directory_is_refused(tmp_path: Path) -> None:
    async with await Journal.open(tmp_path):
        with pytest.raises(JournalError, match="already open"):
            await Journal.open(tmp_path)
    async with await Journal.open(tmp_path):  # the lock went with the close
        pass


async def test_fsync_failure_poisons_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = await filled(tmp_path, 3)

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    follower_error: list[BaseException] = []

    async def follower() -> None:
        try:
            async for _ in j.follow(1):
                pass
        except JournalError as exc:
            follower_error.append(exc)

    task = asyncio.create_task(follower())
    await asyncio.sleep(0.01)
    monkeypatch.setattr(durable_mod, "fdatasync_fd", broken)
    await j.append(write_for(4))
    with pytest.raises(JournalError, match="fdatasync"):
        await j.sync()
    with pytest.raises(JournalError, match="failed earlier") as refused:
        await j.append(write_for(5))
    # what the user reads: the cause, and what to do (no "reopen it": not theirs to do)
    said = str(refused.value)
    assert "Input/output error" in said and "reopen it" not in said
    assert "check it (dmesg), then run again" in said
    await asyncio.wait_for(task, 2)
    assert follower_error
    await j.aclose()  # closes the files without another sync
    monkeypatch.undo()
    async with await Journal.open(tmp_path, segment_bytes=1024) as j:
        assert j.durable_lsn >= 3
        for r in await read_all(j):
            check_record(r)


async def test_a_batch_that_cannot_be_encoded_leaves_no_trace(tmp_path: Path) -> None:
    async with await Journal.open(tmp_path) as j:
        await j.append(write_for(1))
        bad = Record.zero("vol", 2**64, 1)  # offset does not fit the u64 field
        with pytest.raises(RecordError, match="out of range"):
            await j.append_many([write_for(2), bad])
        assert await j.append(write_for(2)) == 2
        await j.sync()
        assert [r.lsn for r in await read_all(j)] == [1, 2]
