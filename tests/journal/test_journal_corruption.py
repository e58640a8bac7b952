"""Flipped bytes and truncations at every position class, in the last and a sealed segment.

Layout used: 1024-byte segments, 161-byte records (58 header + "vol" + 100 payload), six
to a segment: seg 1 holds LSN 1-6, seg 7 holds 7-12 (sealed), seg 13 holds 13-15 (active).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from replicator.journal import Journal, JournalCorrupt
from replicator.journal.inspect import scan_journal
from replicator.journal.records import encode_record
from replicator.journal.segment import (
    HEADER_BYTES,
    SEAL_BYTES,
    Seal,
    SegmentHeader,
    segment_name,
)
from tests.journal.helpers import check_record, filled, read_all, segment_files, write_for

REC = 161
# offset inside a record -> position class
RECORD_POSITIONS = {
    "record magic": 0,
    "record type": 3,
    "record data_len": 6,
    "record lsn": 12,
    "checksum": 50,
    "name": 59,
    "payload": 120,
}


async def _build(path: Path) -> list[Path]:
    journal = await filled(path, 15, segment_bytes=1024)
    await journal.aclose()
    files = segment_files(path)
    assert [f.name[-8:] for f in files] == ["0001.seg", "0007.seg", "0013.seg"]
    return files


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def _truncate(path: Path, size: int) -> None:
    with path.open("r+b") as f:
        f.truncate(size)


async def _open_and_expect_tail_cut(path: Path, offset: int, last_lsn: int) -> None:
    tail = segment_files(path)[-1]
    before = tail.stat().st_size
    assert scan_journal(path).problem is not None  # inspect sees it, and leaves it alone
    assert tail.stat().st_size == before
    with capture_logs() as logs:
        journal = await Journal.open(path, segment_bytes=1024)
    try:
        cut = [e for e in logs if e["event"] == "journal.tail_truncated"]
        assert len(cut) == 1
        assert cut[0]["segment"] == str(tail)
        assert cut[0]["offset"] == offset
        assert cut[0]["reason"]
        assert journal.last_lsn == last_lsn
        records = await read_all(journal)
        assert [r.lsn for r in records] == list(range(1, last_lsn + 1))
        for r in records:
            check_record(r)
        assert await journal.append(records[0].with_lsn(0)) == last_lsn + 1
        await journal.sync()
    finally:
        await journal.aclose()
    assert scan_journal(path).problem is None


@pytest.mark.parametrize("where", sorted(RECORD_POSITIONS))
async def test_flip_in_the_last_record_cuts_the_tail(tmp_path: Path, where: str) -> None:
    """Nothing intact behind it: indistinguishable from a record torn by a crash."""
    files = await _build(tmp_path)
    bad = HEADER_BYTES + 2 * REC  # the last record of the last segment, LSN 15
    _flip(files[-1], bad + RECORD_POSITIONS[where])
    await _open_and_expect_tail_cut(tmp_path, bad, 14)
    assert files[-1].stat().st_size == bad + REC  # cut at LSN 15, LSN 15 appended again


@pytest.mark.parametrize("where", sorted(RECORD_POSITIONS))
async def test_flip_before_intact_records_is_damage_not_a_torn_tail(
    tmp_path: Path, where: str
) -> None:
    """An intact record behind the bad one proves it was synced once: never cut silently."""
    files = await _build(tmp_path)
    bad = HEADER_BYTES + REC  # LSN 14; LSN 15 behind it is intact
    _flip(files[-1], bad + RECORD_POSITIONS[where])
    problem = scan_journal(tmp_path).problem
    assert problem is not None and problem.fatal
    assert (problem.path, problem.offset) == (files[-1], bad)
    assert "lsn 15" in problem.reason and "not a torn tail" in problem.reason
    before = [p.read_bytes() for p in segment_files(tmp_path)]
    with pytest.raises(JournalCorrupt) as info:
        await Journal.open(tmp_path, segment_bytes=1024)
    assert (info.value.path, info.value.offset) == (str(files[-1]), bad)
    assert [p.read_bytes() for p in segment_files(tmp_path)] == before  # nothing modified


async def test_cut_policy_cuts_damage_in_the_last_segment_and_says_so(tmp_path: Path) -> None:
    files = await _build(tmp_path)
    bad = HEADER_BYTES + REC  # LSN 14
    _flip(files[-1], bad + RECORD_POSITIONS["payload"])
    with capture_logs() as logs:
        journal = await Journal.open(tmp_path, segment_bytes=1024, on_damage="cut")
    try:
        cut = [e for e in logs if e["event"] == "journal.damage_cut"]
        assert len(cut) == 1 and cut[0]["log_level"] == "error"
        assert (cut[0]["segment"], cut[0]["offset"]) == (str(files[-1]), bad)
        assert cut[0]["dropped_bytes"] == 2 * REC
        recovery = journal.recovery
        assert recovery is not None and recovery.kind == "damage"
        assert recovery.next_lsn == 14 and journal.next_lsn == 14
        assert [r.lsn for r in await read_all(journal)] == list(range(1, 14))
    finally:
        await journal.aclose()
    assert scan_journal(tmp_path).problem is None


@pytest.mark.parametrize("case", ["record", "seal", "header", "gap"])
async def test_cut_policy_cuts_at_damage_in_a_sealed_segment(tmp_path: Path, case: str) -> None:
    """Everything from the first damage on goes, later intact segments included (their
    LSNs would no longer follow); what comes before is kept and verified."""
    files = await _build(tmp_path)
    sealed = files[1]  # LSN 7..12
    keep = {"record": 8, "seal": 12, "header": 6, "gap": 6}[case]
    if case == "record":
        _flip(sealed, HEADER_BYTES + 2 * REC + RECORD_POSITIONS["payload"])  # LSN 9
    elif case == "seal":
        _flip(sealed, 1006 + 20)
    elif case == "header":
        _flip(sealed, 9)
    else:
        sealed.unlink()
    async with await Journal.open(tmp_path, segment_bytes=1024, on_damage="cut") as journal:
        assert journal.recovery is not None and journal.recovery.kind == "damage"
        assert journal.last_lsn == keep
        assert [r.lsn for r in await read_all(journal)] == list(range(1, keep + 1))
        assert await journal.append(write_for(keep + 1)) == keep + 1
        await journal.sync()
    report = scan_journal(tmp_path)
    assert report.problem is None and report.last_lsn == keep + 1


async def test_discard_below_drops_old_segments_unread(tmp_path: Path) -> None:
    """Damage in records nobody needs (below discard_below) costs nothing after them."""
    files = await _build(tmp_path)
    _flip(files[0], HEADER_BYTES + 2 * REC)  # LSN 3, in a segment wholly below 7
    async with await Journal.open(
        tmp_path, segment_bytes=1024, on_damage="cut", discard_below=8
    ) as journal:
        assert journal.recovery is None
        assert journal.first_lsn == 7 and journal.last_lsn == 15
    assert not files[0].exists()


@pytest.mark.parametrize("offset", [0, 8, 30])
async def test_flip_in_last_segment_header_drops_that_segment(tmp_path: Path, offset: int) -> None:
    files = await _build(tmp_path)
    _flip(files[-1], offset)
    await _open_and_expect_tail_cut(tmp_path, 0, 12)
    assert [p.name for p in segment_files(tmp_path)] == [p.name for p in files]


@pytest.mark.parametrize(
    ("size", "offset", "last"),
    [
        (20, 0, 12),  # inside the segment header
        (HEADER_BYTES + REC + 30, HEADER_BYTES + REC, 13),  # inside a record header
        (HEADER_BYTES + REC + 50, HEADER_BYTES + REC, 13),  # inside the checksum
        (HEADER_BYTES + REC + 100, HEADER_BYTES + REC, 13),  # inside the payload
    ],
)
async def test_truncated_last_segment_cuts_the_tail(
    tmp_path: Path, size: int, offset: int, last: int
) -> None:
    files = await _build(tmp_path)
    _truncate(files[-1], size)
    await _open_and_expect_tail_cut(tmp_path, offset, last)


async def test_truncation_at_a_record_boundary_is_clean(tmp_path: Path) -> None:
    files = await _build(tmp_path)
    _truncate(files[-1], HEADER_BYTES + REC)
    assert scan_journal(tmp_path).problem is None
    with capture_logs() as logs:
        async with await Journal.open(tmp_path, segment_bytes=1024) as journal:
            assert journal.last_lsn == 13
    assert not [e for e in logs if e["event"] == "journal.tail_truncated"]


@pytest.mark.parametrize("where", sorted(RECORD_POSITIONS))
async def test_flip_in_sealed_segment_record_is_reported_never_skipped(
    tmp_path: Path, where: str
) -> None:
    files = await _build(tmp_path)
    bad = HEADER_BYTES + 2 * REC  # LSN 9 in the sealed segment 7..12
    _flip(files[1], bad + RECORD_POSITIONS[where])
    problem = scan_journal(tmp_path).problem
    assert problem is not None and problem.fatal
    assert (problem.path, problem.offset) == (files[1], bad)
    async with await Journal.open(tmp_path, segment_bytes=1024) as journal:  # lazy check
        got: list[int] = []
        with pytest.raises(JournalCorrupt) as info:
            async for record in journal.read_from(1):
                got.append(record.lsn)
        assert got == list(range(1, 9))  # everything before the bad record, nothing after
        assert info.value.path == str(files[1])
        assert info.value.offset == bad
        message = str(info.value)
        assert str(files[1]) in message
        assert f"offset {bad}" in message
        assert f"replicator journal inspect {tmp_path}" in message
        with pytest.raises(JournalCorrupt):  # a reader starting past it still stops there
            await read_all(journal, 10)
        assert [r.lsn for r in await read_all(journal, 13)] == [13, 14, 15]


@pytest.mark.parametrize(
    ("case", "expect_offset"),
    [
        ("header", 0),
        ("seal", 1006),
        ("truncated", 500),
        ("appended", 1006 + 10),  # the seal is no longer where it must be
    ],
)
async def test_damaged_sealed_segment_refuses_to_open(
    tmp_path: Path, case: str, expect_offset: int
) -> None:
    files = await _build(tmp_path)
    sealed = files[1]
    assert sealed.stat().st_size == 1006 + SEAL_BYTES
    if case == "header":
        _flip(sealed, 9)
    elif case == "seal":
        _flip(sealed, 1006 + 20)
    elif case == "truncated":
        _truncate(sealed, 500 + SEAL_BYTES)
    else:
        with sealed.open("ab") as f:
            f.write(b"\0" * 10)
    problem = scan_journal(tmp_path, verify_sealed=False).problem
    assert problem is not None and problem.fatal
    assert (problem.path, problem.offset) == (sealed, expect_offset)
    before = [p.read_bytes() for p in segment_files(tmp_path)]
    with pytest.raises(JournalCorrupt) as info:
        await Journal.open(tmp_path, segment_bytes=1024)
    assert info.value.path == str(sealed)
    assert info.value.offset == expect_offset
    assert "replicator journal inspect" in str(info.value)
    assert [p.read_bytes() for p in segment_files(tmp_path)] == before  # nothing modified
    # the directory lock was released: inspect-and-retry works
    with pytest.raises(JournalCorrupt):
        await Journal.open(tmp_path, segment_bytes=1024)


async def test_missing_middle_segment_is_a_gap(tmp_path: Path) -> None:
    files = await _build(tmp_path)
    files[1].unlink()
    with pytest.raises(JournalCorrupt, match="gap") as info:
        await Journal.open(tmp_path, segment_bytes=1024)
    assert info.value.path == str(files[2])


async def test_overlapping_segments_are_refused(tmp_path: Path) -> None:
    files = await _build(tmp_path)
    # a copy of segment 7..12 renamed as if it started at 5: name and header disagree
    (tmp_path / f"{5:020d}.seg").write_bytes(files[1].read_bytes())
    with pytest.raises(JournalCorrupt):
        await Journal.open(tmp_path, segment_bytes=1024)


async def test_missing_last_segment_starts_a_new_one(tmp_path: Path) -> None:
    files = await _build(tmp_path)
    files[2].unlink()  # the sealed segment before it now ends the journal
    async with await Journal.open(tmp_path, segment_bytes=1024) as journal:
        assert journal.last_lsn == 12
        assert await journal.append(write_for(13)) == 13
    assert scan_journal(tmp_path).problem is None


async def test_valid_records_out_of_lsn_order_are_corrupt(tmp_path: Path) -> None:
    """Every record checks out on its own; their order does not (e.g. a buggy writer)."""
    records = [write_for(lsn).with_lsn(lsn, 1) for lsn in (1, 3, 2, 4)]
    body = b"".join(encode_record(r) for r in records)
    sealed = SegmentHeader(1, 0).encode() + body + Seal(4, 1, 4, 5, len(body)).encode()
    (tmp_path / segment_name(1)).write_bytes(sealed)
    (tmp_path / segment_name(5)).write_bytes(SegmentHeader(5, 0).encode())
    problem = scan_journal(tmp_path).problem
    assert problem is not None and problem.fatal and "does not follow" in problem.reason
    async with await Journal.open(tmp_path, segment_bytes=1024) as journal:
        got: list[int] = []
        with pytest.raises(JournalCorrupt, match="does not follow"):
            async for record in journal.read_from(1):
                got.append(record.lsn)
        assert got == [1, 3]
