"""Records travel as stored: read as checked bytes, appended without re-encoding."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator.journal import (
    EncodedRecord,
    Journal,
    JournalCorrupt,
    JournalError,
    Record,
    RecordError,
    check_record,
    decode_records,
    encode_record,
)
from replicator.journal.records import record_heads
from replicator.journal.recovery import OnDamage
from replicator.journal.segment import HEADER_BYTES
from tests.journal.helpers import each_record
from tests.journal.strategies import RECORDS


def _stamped() -> list[Record]:
    return [
        Record.write("d.img", 4096, b"x" * 5000).with_lsn(7, 111),
        Record.zero("d.img", 0, 4096).with_lsn(9, 112),
        Record.flush().with_lsn(10, 113),
    ]


async def _followed(journal: Journal, first: int, last: int) -> list[EncodedRecord]:
    """What the shipper's follower yields from ``first`` until it has ``last``."""
    got: list[EncodedRecord] = []

    async def take() -> None:
        async for batch in journal.follow_encoded(first):
            got.extend(batch)
            if got[-1].lsn == last:
                return

    await asyncio.wait_for(take(), 10)
    return got


async def test_follow_encoded_yields_the_bytes_as_encoded(tmp_path: Path) -> None:
    records = _stamped()
    async with await Journal.open(tmp_path / "j") as journal:
        await journal.append_many(records)
        await journal.sync()
        got = await _followed(journal, 8, 10)
    assert [(e.lsn, e.ts_ns) for e in got] == [(9, 112), (10, 113)]
    assert [e.raw for e in got] == [encode_record(r) for r in records[1:]]


async def test_pre_encoded_append_stores_what_a_normal_append_would(tmp_path: Path) -> None:
    records = _stamped()
    payload = b"".join(encode_record(r) for r in records)
    async with await Journal.open(tmp_path / "a") as plain:
        await plain.append_many(records)
        await plain.sync()
    async with await Journal.open(tmp_path / "b") as pre:
        await pre.append_many(decode_records(payload), encoded=payload)
        await pre.sync()
        assert [r async for r in pre.read_from(1)] == records
        with pytest.raises(JournalError):  # bytes that do not match the records
            await pre.append_many([Record.flush().with_lsn(11, 1)], encoded=b"short")
    a = sorted((tmp_path / "a").glob("*.seg"))
    b = sorted((tmp_path / "b").glob("*.seg"))
    # segment headers differ by design; the records must be the same bytes
    assert [p.read_bytes()[HEADER_BYTES:] for p in a] == [p.read_bytes()[HEADER_BYTES:] for p in b]


def test_check_record_refuses_a_flipped_bit() -> None:
    raw = bytearray(encode_record(_stamped()[0]))
    assert check_record(bytes(raw))[0].raw == bytes(raw)
    raw[100] ^= 1
    with pytest.raises(ValueError, match="checksum"):
        check_record(bytes(raw))


async def test_records_read_back_are_views_of_their_read_chunk(tmp_path: Path) -> None:
    """The shipper's read-back copies nothing out of the chunk it reads (records larger and
    smaller than a chunk, crossing its end), and every record is still checked."""
    sizes = [3000, 1_500_000, 17, 4 * 1024 * 1024 + 5, 900_000, 2_000_000, 0, 1_800_000]
    records = [
        Record.write("d.img", 0, bytes([i + 1]) * size).with_lsn(i + 1, 100 + i)
        for i, size in enumerate(sizes)
    ]
    async with await Journal.open(tmp_path / "j") as journal:
        await journal.append_many(records)
        await journal.sync()
        got = await _followed(journal, 1, len(records))
        decoded = [r async for r in journal.read_from(1)]  # as a receiver applies them
    assert decoded == records
    assert all(isinstance(r.data, memoryview) for r in decoded if r.data)
    assert [bytes(e.raw) for e in got] == [encode_record(r) for r in records]
    assert all(e.chunk is not None and e.payload == b"" for e in got)
    chunks = [e.chunk for e in got]
    assert len({id(c) for c in chunks}) > 1  # more than one chunk was read
    for e in got:  # each is where ``at`` says in its chunk
        assert e.chunk is not None
        assert e.chunk[e.at : e.at + e.size] == bytes(e.raw)


FIVE = [Record.write("d.img", 0, bytes([i + 1]) * 70_000).with_lsn(i + 1, 1) for i in range(5)]


@contextlib.asynccontextmanager
async def _third_damaged(folder: Path) -> AsyncIterator[Journal]:
    """A running journal holding FIVE, a bit of the third record's payload flipped on
    disk after the append (what the journal checked from memory then)."""
    async with await Journal.open(folder) as journal:
        await journal.append_many(FIVE)
        await journal.sync()
        _flip_a_bit_of_the_third(folder)
        yield journal


def _flip_a_bit_of_the_third(folder: Path) -> None:
    (segment,) = folder.glob("*.seg")
    at = HEADER_BYTES + 2 * len(encode_record(FIVE[0])) + 1000
    with segment.open("r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x10]))


async def test_a_record_damaged_after_its_append_is_not_read_back(tmp_path: Path) -> None:
    """A byte flipped on disk under a running journal: the records before it are read
    back, the damaged one raises (the chunk holds a copy of the file, checked as read)."""
    async with _third_damaged(tmp_path / "j") as journal:
        got: list[int] = []
        with pytest.raises(JournalCorrupt, match="checksum"):
            async for batch in journal.follow_encoded(1):
                got.extend(e.lsn for e in batch)
    assert got == [1, 2]


@pytest.mark.parametrize(
    ("on_damage", "hint"),
    [("refuse", "restore the journal directory"), ("cut", "start it again")],
)
async def test_damage_found_while_reading_says_what_the_next_open_does(
    tmp_path: Path, on_damage: OnDamage, hint: str
) -> None:
    """A journal opened with damage cut (every sender's and receiver's) recovers at its
    next open; one opened to refuse does not: the error's hint says which."""
    records = [Record.write("d.img", 0, b"x" * 70_000).with_lsn(i + 1, 1) for i in range(3)]
    async with await Journal.open(tmp_path / "j", on_damage=on_damage) as journal:
        await journal.append_many(records)
        await journal.sync()
        (segment,) = (tmp_path / "j").glob("*.seg")
        with segment.open("r+b") as f:
            f.seek(HEADER_BYTES + len(encode_record(records[0])) + 1000)
            f.write(b"y")
        with pytest.raises(JournalCorrupt) as caught:
            async for _ in journal.follow_encoded(1):
                pass
    assert hint in (caught.value.hint or ""), caught.value.hint
    assert "journal inspect" in (caught.value.hint or "")


@pytest.mark.parametrize(
    ("check_through", "raises"),
    [(None, True), (3, True), (5, True), (2, False), (0, False)],
)
async def test_follow_encoded_checks_checksums_up_to_check_through_only(
    tmp_path: Path, check_through: int | None, raises: bool
) -> None:
    """Past ``check_through`` a record is only found whole: its checksum is left to the
    consumer (a receiver that checks every record), so the damaged third is handed over."""
    async with _third_damaged(tmp_path / "j") as journal:
        got: list[EncodedRecord] = []
        follow = journal.follow_encoded(1, check_through=check_through)
        try:
            async for batch in follow:
                got.extend(each_record(batch))
                if got[-1].lsn == 5:
                    break
        except JournalCorrupt as exc:
            assert raises, exc
            assert [e.lsn for e in got] == [1, 2]
        else:
            assert not raises
            assert [e.lsn for e in got] == [1, 2, 3, 4, 5]
            with pytest.raises(RecordError, match="checksum mismatch"):
                check_record(bytes(got[2].raw))  # handed over as stored, damage and all
            assert bytes(got[3].raw) == encode_record(FIVE[3])
        finally:
            await follow.aclose()


@given(st.lists(RECORDS, max_size=12), st.integers(0, 2**40))
def test_record_heads_are_what_decoding_finds(records: list[Record], lsn: int) -> None:
    """The journal observer's cheap view of a staged batch (``record_heads``) is each
    record's type, volume, offset and length as the format's decoder reads them, and a
    batch cut short anywhere is refused, never read as fewer records."""
    blob = b"".join(encode_record(r.with_lsn(lsn + i, 7)) for i, r in enumerate(records))
    decoded = decode_records(blob)
    assert record_heads(blob) == [(r.type, r.volume, r.offset, r.length) for r in decoded]
    assert [h.volume for h in record_heads(blob)] == [r.volume for r in records]
    if blob:
        with pytest.raises(RecordError, match=r"truncated record header|not a whole record"):
            record_heads(blob[:-1])
