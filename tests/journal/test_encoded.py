"""Records travel as stored: read as checked bytes, appended without re-encoding."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from replicator.journal import (
    EncodedRecord,
    Journal,
    JournalError,
    Record,
    check_record,
    decode_records,
    encode_record,
)
from replicator.journal.segment import HEADER_BYTES


def _stamped() -> list[Record]:
    return [
        Record.write("d.img", 4096, b"x" * 5000).with_lsn(7, 111),
        Record.zero("d.img", 0, 4096).with_lsn(9, 112),
        Record.flush().with_lsn(10, 113),
    ]


async def test_follow_encoded_yields_the_bytes_as_encoded(tmp_path: Path) -> None:
    records = _stamped()
    async with await Journal.open(tmp_path / "j") as journal:
        await journal.append_many(records)
        await journal.sync()
        got: list[EncodedRecord] = []

        async def take() -> None:
            async for batch in journal.follow_encoded(8):
                got.extend(batch)
                if got[-1].lsn == 10:
                    return

        await asyncio.wait_for(take(), 10)
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
