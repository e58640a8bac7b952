"""Record format versions: 2 (XXH3-128) is written, 1 (blake3-128) is still read.

A journal written before the upgrade must replay, ship and apply after it: records
travel as they are stored, so the receiver checks each with its own version's checksum.
"""

from __future__ import annotations

import os
from pathlib import Path

import blake3
import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from replicator.journal import Journal, Record, RecordError, decode_records, encode_record
from replicator.journal import records as records_module
from replicator.journal.errors import JournalNewer
from replicator.journal.inspect import format_report, scan_journal
from replicator.journal.records import (
    CHECKED_HEADER_SIZE,
    HEADER_SIZE,
    RECORD_VERSION,
    NewerRecordFormat,
    check_record,
    decode_record,
)
from replicator.journal.segment import HEADER_BYTES, SegmentHeader, find_valid_record


def _blake3_digest(head: bytes | memoryview, body: bytes | memoryview, more: object = b"") -> bytes:
    """What version 1 wrote: blake3-128 over the header, the name and the payload."""
    assert isinstance(more, bytes | memoryview)
    return blake3.blake3(bytes(head) + bytes(body) + bytes(more)).digest(16)


def _as_version_1(encoded: bytes) -> bytes:
    """A version 2 record's bytes as version 1 wrote them (same layout, blake3-128)."""
    head = encoded[:2] + b"\x01" + encoded[3:CHECKED_HEADER_SIZE]
    return head + _blake3_digest(head, encoded[HEADER_SIZE:]) + encoded[HEADER_SIZE:]


@given(
    st.binary(max_size=70_000),
    st.integers(0, 2**40),
    st.sampled_from(["d.img", "vm/disk.qcow2", "é"]),
)
def test_version_2_is_xxh3_128_and_version_1_still_checks(
    data: bytes, offset: int, name: str
) -> None:
    record = (
        Record.write(name, offset, data).with_lsn(3, 4) if data else Record.flush().with_lsn(3, 4)
    )
    encoded = encode_record(record)
    assert encoded[2] == RECORD_VERSION == 2
    body = encoded[:CHECKED_HEADER_SIZE] + encoded[HEADER_SIZE:]
    assert encoded[CHECKED_HEADER_SIZE:HEADER_SIZE] == xxhash.xxh3_128_digest(body)
    old = _as_version_1(encoded)
    assert decode_record(old)[0] == record == decode_record(encoded)[0]
    assert check_record(old)[0].raw == old


def test_each_version_is_checked_with_its_own_checksum() -> None:
    encoded = encode_record(Record.write("d", 0, os.urandom(4096)).with_lsn(1, 1))
    old = _as_version_1(encoded)
    # the version byte is checked with the rest: swapping it makes the checksum wrong
    swapped = [encoded[:2] + b"\x01" + encoded[3:], old[:2] + b"\x02" + old[3:]]
    for bad in swapped:
        with pytest.raises(RecordError, match="checksum mismatch"):
            decode_record(bad)
    for good in (encoded, old):
        flipped = bytearray(good)
        flipped[HEADER_SIZE + 100] ^= 0x01
        with pytest.raises(RecordError, match="checksum mismatch"):
            check_record(bytes(flipped))
    with pytest.raises(NewerRecordFormat, match="version 3 is newer than this build reads"):
        decode_record(encoded[:2] + b"\x03" + encoded[3:])
    with pytest.raises(RecordError, match="version 0 not supported"):
        decode_record(encoded[:2] + b"\x00" + encoded[3:])


async def test_a_journal_written_before_the_upgrade_replays_and_grows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 1 records in a segment (the code before the upgrade wrote them), then
    version 2 records appended behind them: both read back, in order, checked."""
    old = [Record.write("d", i * 4096, os.urandom(4096)) for i in range(5)] + [Record.flush()]
    new = [Record.write("d", 0, os.urandom(70_000)), Record.epoch(7)]
    monkeypatch.setattr(records_module, "RECORD_VERSION", 1)
    monkeypatch.setattr(records_module, "record_digest", _blake3_digest)
    async with await Journal.open(tmp_path / "j") as journal:
        await journal.append_many(old)
        await journal.sync()
    monkeypatch.undo()
    (segment,) = (tmp_path / "j").glob("*.seg")
    assert segment.read_bytes()[HEADER_BYTES + 2] == 1  # really written as version 1
    async with await Journal.open(tmp_path / "j") as journal:
        assert journal.recovery is None or journal.recovery.kind != "damage"
        await journal.append_many(new)
        await journal.sync()
    async with await Journal.open(tmp_path / "j") as journal:
        got = [r async for r in journal.read_from(1)]
    assert [r.with_lsn(0, 0) for r in got] == [r.with_lsn(0, 0) for r in old + new]
    assert [r.lsn for r in got] == list(range(1, 9))
    # a Records frame's payload may mix them (a sender ships its old journal as it is)
    mixed = _as_version_1(encode_record(got[0])) + encode_record(got[-2])
    assert decode_records(mixed) == [got[0], got[-2]]
    # `journal inspect` says which records are which
    report = scan_journal(tmp_path / "j")
    assert report.clean and report.by_version == {1: 6, 2: 2}
    assert "record format versions: 1 (blake3) 6, 2 (XXH3-128) 2" in format_report(report)
    assert report.to_dict()["by_format_version"] == {"1": 6, "2": 2}


def test_recovery_finds_an_intact_record_of_either_version_behind_damage(
    tmp_path: Path,
) -> None:
    first = encode_record(Record.write("d", 0, os.urandom(4096)).with_lsn(1, 1))
    second = _as_version_1(encode_record(Record.write("d", 4096, b"x" * 4096).with_lsn(2, 1)))
    third = encode_record(Record.flush().with_lsn(3, 1))
    path = tmp_path / "seg"
    path.write_bytes(first + second + third)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert find_valid_record(fd, 0, len(first + second + third), 0) == (len(first), 2)
        assert find_valid_record(fd, len(first), len(first + second + third), 0) == (
            len(first + second),
            3,
        )
    finally:
        os.close(fd)


def _as_version_3(encoded: bytes) -> bytes:
    """A record as a release writing a format 3 might: the same layout, its checksum made
    with the version byte it says (it no longer checks as version 2)."""
    head = encoded[:2] + b"\x03" + encoded[3:CHECKED_HEADER_SIZE]
    body = encoded[HEADER_SIZE:]
    return head + xxhash.xxh3_128_digest(head + body) + body


async def test_a_flipped_version_byte_is_damage_cut_not_a_newer_release(tmp_path: Path) -> None:
    """One bit flipped at rest in the last record's version byte (2 -> 3) must not wedge
    the journal as "a newer release's": the record still checks with version 2 there, so
    it is damage, and the open cuts it as before (a receiver asks its sender again)."""
    records = [Record.write("d", i * 4096, os.urandom(4096)) for i in range(3)]
    segment = await _journal_of(tmp_path / "j", records)
    data = bytearray(segment.read_bytes())
    last = HEADER_BYTES + 2 * len(encode_record(records[0].with_lsn(1, 1)))
    data[last + 2] ^= 0x01
    segment.write_bytes(data)
    report = scan_journal(tmp_path / "j")
    assert report.problem is not None and not report.problem.newer
    assert "a damaged byte" in report.problem.reason
    async with await Journal.open(tmp_path / "j") as journal:
        assert journal.recovery is not None and journal.last_lsn == 2


async def _journal_of(path: Path, records: list[Record]) -> Path:
    async with await Journal.open(path) as journal:
        await journal.append_many(records)
        await journal.sync()
    (segment,) = path.glob("*.seg")  # noqa: ASYNC240 (a test's file, after the journal)
    return segment


@pytest.mark.parametrize("where", ["last record", "every record"])
async def test_records_of_a_newer_format_are_refused_not_cut_as_a_torn_tail(
    tmp_path: Path, where: str
) -> None:
    """A journal a newer release wrote (a downgrade), its last records of a format this
    build cannot check: the open took them for a torn tail and cut them, saying "torn
    tail"; records gone that a newer sender had acknowledged or a newer receiver received.
    Now the open refuses, naming the newer release, and leaves every byte as it was."""
    records = [Record.write("d", i * 4096, os.urandom(4096)) for i in range(3)]
    segment = await _journal_of(tmp_path / "j", [*records, Record.flush()])
    data = bytearray(segment.read_bytes())
    starts = [HEADER_BYTES + i * len(encode_record(records[0].with_lsn(1, 1))) for i in range(3)]
    size = starts[1] - starts[0]
    for at in starts[-1:] if where == "last record" else starts:
        assert data[at : at + 3] == b"RJ\x02"
        data[at : at + size] = _as_version_3(bytes(data[at : at + size]))
    segment.write_bytes(data)
    before = segment.read_bytes()
    with pytest.raises(JournalNewer, match="newer replicator") as raised:
        await Journal.open(tmp_path / "j")
    assert "going back to an older release is not supported" in str(raised.value)
    assert segment.read_bytes() == before  # nothing cut
    report = scan_journal(tmp_path / "j")
    assert report.problem is not None and report.problem.newer
    assert "this release neither reads it nor cuts it" in format_report(report)


async def test_a_segment_header_of_a_newer_format_is_refused_not_cut(tmp_path: Path) -> None:
    """The last segment's header, its checksum intact, saying a newer segment format: the
    open took it for a header torn by a crash and dropped the whole segment."""
    segment = await _journal_of(tmp_path / "j", [Record.write("d", 0, b"x" * 4096)])
    data = bytearray(segment.read_bytes())
    header = SegmentHeader.decode(bytes(data[:HEADER_BYTES]))
    newer = bytearray(header.encode())
    newer[4] = 2  # the version field (little endian, 2 bytes), then the checksum again
    newer[24:40] = blake3.blake3(bytes(newer[:24])).digest(16)
    data[:HEADER_BYTES] = newer
    segment.write_bytes(data)
    with pytest.raises(JournalNewer, match="segment format version 2"):
        await Journal.open(tmp_path / "j")
    assert segment.read_bytes() == bytes(data)
