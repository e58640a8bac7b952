"""Trimmed segment files kept as spares and written over by later rolls.

What reuse must never do: let a reader see another segment's records through a file it has
open, let a stale byte of the file's earlier life pass for a record after a crash, or cost
room under ``max_bytes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from replicator.journal import Journal, JournalError, JournalFull
from replicator.journal.inspect import format_report, scan_journal
from replicator.journal.segment import (
    HEADER_BYTES,
    SPARE_SUFFIX,
    SegmentHeader,
    spare_name,
)
from tests.journal.helpers import (
    check_record,
    dir_bytes,
    read_all,
    segment_files,
    segments_bytes,
    write_for,
)

SEG = 4096


def _spares(path: Path) -> list[Path]:
    return sorted(path.glob(f"*{SPARE_SUFFIX}"))


def _spare_bytes(path: Path) -> int:
    return sum(_size(p) for p in _spares(path))


def _size(path: Path) -> int:
    return path.stat().st_size


def _header(path: Path) -> SegmentHeader:
    return SegmentHeader.decode(path.read_bytes()[:HEADER_BYTES])


async def _fill(j: Journal, upto: int, size: int = 300) -> None:
    for lsn in range(j.next_lsn, upto + 1):
        await j.append(write_for(lsn, size))
    await j.sync()


async def test_a_trimmed_segment_becomes_the_next_one_in_place(tmp_path: Path) -> None:
    async with await Journal.open(tmp_path, segment_bytes=SEG) as j:
        await _fill(j, 40, size=300)
        await j.trim(j.last_lsn)  # every sealed segment goes
        spares = _spares(tmp_path)
        assert j.spare_count == len(spares) == 2
        reusable = {p.stat().st_ino: p.stat().st_size for p in spares}
        await _fill(j, 80, size=1500)  # rolls write over the spares, and seal them
        assert j.spare_count == 0 and not _spares(tmp_path)
        reused = [p for p in segment_files(tmp_path) if p.stat().st_ino in reusable]
        assert len(reused) == 2 and all(_header(p).reused for p in reused)
        assert all(not _header(p).reused for p in segment_files(tmp_path) if p not in reused)
        # sealed, each is cut after its seal, shorter than in its earlier life
        assert all(p.stat().st_size < reusable[p.stat().st_ino] for p in reused)
        assert scan_journal(tmp_path).segments[-1].path not in reused
        records = await read_all(j, j.first_lsn)
        assert [r.lsn for r in records] == list(range(j.first_lsn, 81))
        for record in records:
            check_record(record)
        assert j.disk_bytes == dir_bytes(tmp_path)
    # a clean close cuts the active file to its records: the reopen finds nothing to cut
    report = scan_journal(tmp_path)
    assert report.problem is None, report.problem
    async with await Journal.open(tmp_path, segment_bytes=SEG) as j:
        assert j.recovery is None
        assert j.last_lsn == 80


async def test_a_crash_in_a_reused_file_keeps_every_synced_record(tmp_path: Path) -> None:
    """The files as a SIGKILL leaves them (copied while open): the reused active segment
    holds its records and then the bytes of its earlier life; recovery cuts those, quietly,
    and every synced record is there, none of the old ones."""
    live, crashed = tmp_path / "live", tmp_path / "crashed"
    async with await Journal.open(live, segment_bytes=SEG) as j:
        await _fill(j, 60, size=700)
        await j.trim(j.last_lsn)
        await _fill(j, 66, size=200)  # a roll into a spare, and a few short records in it
        active = segment_files(live)[-1]
        assert _header(active).reused
        end = scan_journal(live).segments[-1].records_end
        assert active.stat().st_size > end + 1000  # the old life's bytes after the records
        shutil.copytree(live, crashed)
        first = j.first_lsn
    with capture_logs() as logs:
        async with await Journal.open(crashed, segment_bytes=SEG) as j:
            assert j.recovery is not None and j.recovery.kind == "torn_tail"
            records = await read_all(j, first)
            assert [r.lsn for r in records] == list(range(first, 67))
            for record in records:
                check_record(record)
    events = [e["event"] for e in logs]
    assert "journal.reused_tail_cut" in events
    assert "journal.tail_truncated" not in events  # no warning for what every crash leaves


async def test_records_ending_where_the_old_seal_was_are_not_damage(tmp_path: Path) -> None:
    """Equal records fill a reused file exactly as far as its earlier life did, so the
    file's last bytes are where that life's seal was. Reuse zeroes them: a crash here must
    open cleanly (``refuse`` raises on damage) with every record."""
    live, crashed = tmp_path / "live", tmp_path / "crashed"
    async with await Journal.open(live, segment_bytes=SEG) as j:
        await _fill(j, 40, size=500)
        sealed = [s for s in scan_journal(live).segments if s.sealed]
        per_segment = {s.count for s in sealed}
        sizes = {s.size for s in sealed}
        assert len(per_segment) == len(sizes) == 1  # equal records: equal segments
        await j.trim(j.last_lsn)
        segments = j.segment_count
        while j.segment_count == segments:  # up to the roll into a spare
            await _fill(j, j.next_lsn, size=500)
        await _fill(j, j.next_lsn + per_segment.pop() - 2, size=500)  # as full as the old one
        active = segment_files(live)[-1]
        assert _header(active).reused
        size = sizes.pop()
        assert active.stat().st_size == size
        assert scan_journal(live).segments[-1].records_end == size - 64  # the seal's place
        shutil.copytree(live, crashed)
        last = j.last_lsn
    with (crashed / active.name).open("rb") as f:
        f.seek(size - 64)
        assert f.read(64) == bytes(64)  # the old seal is gone
    async with await Journal.open(crashed, segment_bytes=SEG, on_damage="refuse") as j:
        assert j.last_lsn == last
        for record in await read_all(j, j.first_lsn):
            check_record(record)


async def test_a_file_being_read_is_never_reused(tmp_path: Path) -> None:
    """A reader part way through a segment that trim keeps as a spare: its next reads go to
    the same file, which must still hold that segment's records however many rolls come
    first (segments larger than a read batch, so the reader goes back to the file after
    the trim). Once the reader has closed it, the next roll writes over it."""
    seg = 12 * 1024 * 1024
    async with await Journal.open(tmp_path, segment_bytes=seg) as j:
        await _fill(j, 400, size=64 * 1024)
        reader = j.read_from(1)
        got = [await anext(reader) for _ in range(3)]
        second = scan_journal(tmp_path).segments[1].base_lsn
        await j.trim(second)  # the first segment: trimmed while read
        assert j.spare_count == 1 and len(_spares(tmp_path)) == 1  # kept, not deleted
        read = _spares(tmp_path)[0].stat().st_ino
        await _fill(j, 800, size=64 * 1024)  # rolls: none may write over the spare
        assert [p.stat().st_ino for p in _spares(tmp_path)] == [read]
        async for record in reader:
            got.append(record)
            if record.lsn == second - 1:
                break
        assert [r.lsn for r in got] == list(range(1, second))
        for record in got:
            check_record(record)
        await reader.aclose()
        await _fill(j, 1000, size=64 * 1024)  # nobody reads it now: a roll writes over it
        assert j.spare_count == 0 and not _spares(tmp_path)
        assert read in {p.stat().st_ino for p in segment_files(tmp_path)}


async def test_a_follower_left_on_the_segment_its_ack_trims_keeps_the_file_a_spare(
    tmp_path: Path,
) -> None:
    """How a run ends: the follower has shipped the last records of a full segment and waits
    for more; their ack trims the journal, which seals that segment (it is full) and drops
    it while the follower still has it open. Its file is kept as a spare all the same: a
    journal on a full file system starts its next run within the files it has (it used
    to be deleted, depending on whether the follower had moved on first)."""
    async with await Journal.open(tmp_path, segment_bytes=SEG) as j:
        await _fill(j, 5, size=300)
        assert j.segment_count == 1  # so bytes_used is where the next record goes
        filler = write_for(6, 1)
        room = SEG - j.bytes_used - filler.encoded_size + 1
        await j.append(write_for(6, room))  # the segment is full to its last byte
        await j.sync()
        assert j.segment_count == 1 and j.bytes_used == SEG
        follower = j.follow(1)
        assert [(await anext(follower)).lsn for _ in range(6)] == [1, 2, 3, 4, 5, 6]
        waiting = asyncio.ensure_future(anext(follower))
        await asyncio.sleep(0)  # the follower waits in the full active segment
        await j.trim(j.last_lsn + 1)
        assert j.segment_count == 1 and j.spare_count == 1
        assert len(_spares(tmp_path)) == 1
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        await follower.aclose()


async def test_bytes_used_weighs_the_records_and_disk_bytes_the_files(tmp_path: Path) -> None:
    """``bytes_used`` (the backlog estimate, a trim that frees room) counts neither spares nor
    a reused file's old bytes; ``disk_bytes`` (what the cap bounds) counts both."""
    async with await Journal.open(tmp_path, segment_bytes=SEG) as j:
        await _fill(j, 60, size=700)
        before = j.bytes_used
        await j.trim(j.last_lsn)
        assert j.spare_count == 2
        assert j.bytes_used < before  # a trim frees the records' room, spares or not
        assert j.bytes_used == segments_bytes(tmp_path)
        assert j.disk_bytes == dir_bytes(tmp_path) == j.bytes_used + _spare_bytes(tmp_path)
        await _fill(j, 66, size=200)  # into a spare: its old bytes beyond the records
        active = segment_files(tmp_path)[-1]
        assert _header(active).reused
        end = scan_journal(tmp_path).segments[-1].records_end
        assert j.bytes_used == segments_bytes(tmp_path) - (_size(active) - end)
        assert j.disk_bytes == dir_bytes(tmp_path)


async def test_spares_never_take_the_room_of_records(tmp_path: Path) -> None:
    """With a cap that leaves no room beside them, trimmed files are deleted."""
    async with await Journal.open(tmp_path, segment_bytes=SEG, max_bytes=3 * SEG) as j:
        await _fill(j, 20)
        await j.trim(j.last_lsn)
        assert j.spare_count == 0 and not _spares(tmp_path)
        assert j.disk_bytes == dir_bytes(tmp_path) <= 3 * SEG


async def test_spares_found_at_open_give_way_to_records_under_a_cap(tmp_path: Path) -> None:
    """Spares are kept without a cap; opened again with one, they are deleted before an
    append is refused for room."""
    async with await Journal.open(tmp_path, segment_bytes=SEG) as j:
        await _fill(j, 60)
        await j.trim(j.last_lsn)
        assert j.spare_count == 2
    async with await Journal.open(tmp_path, segment_bytes=SEG, max_bytes=3 * SEG) as j:
        assert j.spare_count == 2
        with pytest.raises(JournalFull):
            await _fill(j, 1000)
        await j.sync()
        assert j.spare_count == 0 and not _spares(tmp_path)
        assert j.disk_bytes == dir_bytes(tmp_path) <= 3 * SEG
        assert j.bytes_used > 2 * SEG  # the room the spares held went to records


async def test_open_adopts_spares_and_deletes_what_it_cannot_use(tmp_path: Path) -> None:
    async with await Journal.open(tmp_path, segment_bytes=SEG) as j:
        await _fill(j, 60)
        await j.trim(j.last_lsn)
        kept = j.spare_count
    assert kept == len(_spares(tmp_path)) == 2
    (tmp_path / spare_name(999_999)).write_bytes(b"x" * 50)  # too short to be a segment
    (tmp_path / spare_name(999_998)).write_bytes(os.urandom(SEG))  # one more than kept
    async with await Journal.open(tmp_path, segment_bytes=SEG) as j:
        assert j.recovery is None
        assert j.spare_count == 2
        assert len(_spares(tmp_path)) == 2
        assert j.disk_bytes == dir_bytes(tmp_path)
        await _fill(j, 100)
        assert j.spare_count == 0
        records = await read_all(j, j.first_lsn)
        assert [r.lsn for r in records] == list(range(j.first_lsn, 101))


async def test_inspect_lists_spares_and_reused_segments(tmp_path: Path) -> None:
    async with await Journal.open(tmp_path, segment_bytes=SEG) as j:
        await _fill(j, 60)
        await j.trim(j.last_lsn)
        await _fill(j, 70)
        spares = [p.name for p in _spares(tmp_path)]
        report = scan_journal(tmp_path)
        assert report.spares == spares and not report.ignored
        text = format_report(report)
        assert all(name in text for name in spares)
        flags = {s.name: s.to_dict()["reused"] for s in report.segments}
        assert any(flags.values())
        assert flags == {p.name: _header(p).reused for p in segment_files(tmp_path)}


@pytest.mark.parametrize("fail_at", ["rename", "fdatasync"])
async def test_a_failed_reuse_fails_the_journal_and_the_reopen_keeps_every_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: str
) -> None:
    from replicator.journal import durable as durable_mod

    async with await Journal.open(tmp_path, segment_bytes=SEG) as j:
        await _fill(j, 60)
        await j.trim(j.last_lsn)
        assert j.spare_count
        synced = j.durable_lsn

        def broken(*args: object) -> None:
            raise OSError(28, "No space left on device")

        if fail_at == "rename":
            monkeypatch.setattr(os, "rename", broken)
        else:
            real = durable_mod.fdatasync_fd

            def spare_fails(fd: int) -> None:  # the sync of a spare's new header
                if os.readlink(f"/proc/self/fd/{fd}").endswith(SPARE_SUFFIX):
                    broken()
                real(fd)

            monkeypatch.setattr(durable_mod, "fdatasync_fd", spare_fails)
        with pytest.raises(Exception, match="new segment"):
            await _fill(j, 90)
        monkeypatch.undo()
        assert j.failed
    async with await Journal.open(tmp_path, segment_bytes=SEG) as j:
        assert j.last_lsn >= synced
        records = await read_all(j, j.first_lsn)
        assert [r.lsn for r in records] == list(range(j.first_lsn, j.last_lsn + 1))
        for record in records:
            check_record(record)
        await _fill(j, j.last_lsn + 30)
    assert scan_journal(tmp_path).problem is None


async def test_a_follower_never_opens_a_segment_trimmed_before_it_got_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A follower waiting at an empty active segment wakes after that segment was sealed and
    trimmed in one step (trim seals a full active segment first): it must report the records
    trimmed, not open the file on its way to becoming a spare (slowed here, so that it is
    still in place) and later hand out whatever a roll writes into it."""
    from replicator.journal import journal as journal_mod
    from replicator.journal.recovery import retire_segments as real

    def slow(*args: Any) -> None:
        time.sleep(0.05)
        real(*args)

    monkeypatch.setattr(journal_mod, "retire_segments", slow)
    async with await Journal.open(tmp_path, segment_bytes=SEG) as j:
        follower = j.follow(1)
        waiting = asyncio.ensure_future(anext(follower))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiting.done()
        probe = write_for(1, 100)
        fill = SEG - HEADER_BYTES - 10 - (probe.encoded_size - 100)
        await j.append(write_for(1, fill))  # one record: the segment is full
        await j.trim(2)  # seals it, then trims it: no sync round ran before
        with pytest.raises(JournalError, match="trimmed"):
            await waiting
        assert j.spare_count == 1
        await follower.aclose()


@pytest.mark.parametrize("step", ["trim_rename", "trim_rename_while_read", "close_cut"])
async def test_a_failed_spare_step_fails_the_journal_and_loses_no_synced_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """EIO where trim renames a segment to a spare (also one a reader still has open, which
    is kept a spare since f142e78), or where a clean close cuts a reused file to its
    records: the journal says so, a reader on it gets the error instead of more records,
    and the reopen has every synced record."""

    def broken(*args: object) -> None:
        raise OSError(5, "Input/output error")

    j = await Journal.open(tmp_path, segment_bytes=SEG)
    await _fill(j, 60)
    if step.startswith("trim_rename"):
        reader = j.read_from(1) if step == "trim_rename_while_read" else None
        if reader is not None:
            assert [(await anext(reader)).lsn for _ in range(3)] == [1, 2, 3]
        monkeypatch.setattr(os, "rename", broken)
        with pytest.raises(JournalError, match="trim failed"):
            await j.trim(j.last_lsn)
        monkeypatch.undo()
        assert j.failed
        if reader is not None:
            with pytest.raises(JournalError):
                async for record in reader:  # what it had read ahead may still come
                    check_record(record)
            await reader.aclose()
        await j.aclose()
    else:
        await j.trim(j.last_lsn)
        await _fill(j, 75)  # rolls into a spare: old bytes after the records
        assert _header(segment_files(tmp_path)[-1]).reused
        monkeypatch.setattr(os, "ftruncate", broken)
        with pytest.raises(JournalError, match="truncate"):
            await j.aclose()
        monkeypatch.undo()
    synced = 75 if step == "close_cut" else 60
    async with await Journal.open(tmp_path, segment_bytes=SEG) as j:
        assert j.last_lsn == synced
        records = await read_all(j, j.first_lsn)
        assert [r.lsn for r in records] == list(range(j.first_lsn, synced + 1))
        for record in records:
            check_record(record)
    assert scan_journal(tmp_path).problem is None


async def test_retiring_the_active_segment_leaves_nothing_to_read_at_the_next_open(
    tmp_path: Path,
) -> None:
    # a writer that closes with every record acknowledged (`send --once`) drops the active
    # segment too, in a new file (the spares stay spares), so recovery reads no records
    j = await Journal.open(tmp_path, segment_bytes=SEG)
    await _fill(j, 40)  # several segments
    await j.trim(30)  # the sealed ones below 30 become spares
    spares = {p.name: _size(p) for p in _spares(tmp_path)}
    assert spares
    await _fill(j, 44)
    active = segment_files(tmp_path)[-1]
    assert j.last_lsn == 44 and _size(active) > HEADER_BYTES
    await j.trim(44, retire_active=True)  # LSN 44 is not below 44: nothing is retired
    assert segment_files(tmp_path)[-1] == active and (await read_all(j, 44))[0].lsn == 44
    await j.trim(45, retire_active=True)
    (new,) = segment_files(tmp_path)
    assert new.name == f"{45:020d}.seg" and _size(new) == HEADER_BYTES
    assert not _header(new).reused
    assert {p.name: _size(p) for p in _spares(tmp_path)} == spares
    assert (j.first_lsn, j.last_lsn, j.next_lsn) == (45, 44, 45)
    await j.trim(45, retire_active=True)  # an empty active segment stays as it is
    assert segment_files(tmp_path) == [new]
    await j.aclose()
    assert _size(new) == HEADER_BYTES
    report = scan_journal(tmp_path)
    assert report.problem is None and [s.count for s in report.segments] == [0]
    async with await Journal.open(tmp_path, segment_bytes=SEG) as j:
        assert (j.first_lsn, j.last_lsn, j.next_lsn) == (45, 44, 45)
        with pytest.raises(JournalError, match="trimmed"):
            await read_all(j, 44)
        assert await j.append(write_for(45)) == 45
        await j.sync()
        (record,) = await read_all(j, 45)
        assert record.lsn == 45
        check_record(record)
