"""A run of records found whole at once (``framed_run``, in C and its Python twin), cut to
fit (``split_run``), and a sender's shipping read made of such runs: the same records, in
the same order, and the same errors, as reading them one by one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.journal import (
    EncodedRecord,
    Journal,
    JournalCorrupt,
    Record,
    decode_record,
    encode_record,
    native,
    records,
)
from replicator.journal.records import Run, framed_run, peek_length, split_run
from replicator.journal.segment import HEADER_BYTES, READ_CHUNK, SegmentReader
from tests.journal.helpers import each_record
from tests.journal.strategies import RECORDS

# records, each with an LSN step (0 or less: out of order) and whether it was written as
# version 1 (framing takes both versions)
_ITEMS = st.lists(st.tuples(RECORDS, st.integers(-2, 3)), max_size=10)


def _packed(items: list[tuple[Record, int]], first: int = 100) -> bytes:
    out, lsn = [], first
    for record, step in items:
        out.append(encode_record(record.with_lsn(max(lsn, 0), lsn * 10)))
        lsn += step
    return b"".join(out)


@contextlib.contextmanager
def _python_twin() -> Iterator[None]:
    saved = vars(records)["_framed_run_c"]
    setattr(records, "_framed_run_c", None)  # noqa: B010 (private: the twin's switch)
    try:
        yield
    finally:
        setattr(records, "_framed_run_c", saved)  # noqa: B010


def test_make_install_built_framed_run() -> None:
    assert native.framed_run is not None or native.pure_python(), (
        "journal/_verify.c was not built: run `make install` (see test_verify_native.py)"
    )
    if not native.pure_python():
        assert vars(records)["_framed_run_c"] is native.framed_run


@settings(max_examples=400, deadline=None)
@given(
    items=_ITEMS,
    damage=st.one_of(st.none(), st.tuples(st.integers(0, 10**6), st.integers(1, 255))),
    cut=st.integers(0, 10**6),
    start_at=st.integers(0, 3),
    prev=st.one_of(st.none(), st.integers(0, 120)),
    limit=st.integers(0, 40_000),
)
def test_c_and_python_find_the_same_run(
    items: list[tuple[Record, int]],
    damage: tuple[int, int] | None,
    cut: int,
    start_at: int,
    prev: int | None,
    limit: int,
) -> None:
    """On intact, damaged (a byte changed anywhere, headers included) and cut runs, with
    any previous LSN and byte limit, C and Python stop at the same record with the same
    count, LSNs and time."""
    assert native.framed_run is not None, "journal/_verify.c was not built: `make install`"
    buf = bytearray(_packed(items))
    if damage is not None and buf:
        at, xor = damage
        buf[at % len(buf)] ^= xor
    data = bytes(buf[: cut % (len(buf) + 1)])
    bounds = [0]
    with contextlib.suppress(Exception):
        while bounds[-1] < len(data):
            bounds.append(bounds[-1] + peek_length(data, bounds[-1]))
    start = bounds[min(start_at, len(bounds) - 1)] if bounds[-1] <= len(data) else 0
    start = min(start, len(data))
    got_c = framed_run(data, start, len(data), prev, limit)
    with _python_twin():
        got_py = framed_run(data, start, len(data), prev, limit)
    assert got_c == got_py
    assert got_c.end - start <= limit


@given(items=st.lists(RECORDS, min_size=1, max_size=12))
def test_an_intact_run_is_found_whole(items: list[Record]) -> None:
    data = b"".join(encode_record(r.with_lsn(10 + 2 * i, 5 + i)) for i, r in enumerate(items))
    for twin in (False, True):
        with _python_twin() if twin else contextlib.nullcontext():
            run = framed_run(data, 0, len(data), 9, len(data))
            assert run == Run(len(data), len(items), 10, 10 + 2 * (len(items) - 1), 5)
            # an LSN not above the previous one ends it; so does a limit one byte short
            assert framed_run(data, 0, len(data), 10, len(data)).records == 0
            assert framed_run(data, 0, len(data), None, len(data) - 1).records == len(items) - 1


@given(
    sizes=st.lists(st.integers(0, 9000), min_size=1, max_size=20),
    limits=st.lists(st.integers(0, 30_000), min_size=1, max_size=20),
)
def test_split_runs_cut_at_record_bounds(sizes: list[int], limits: list[int]) -> None:
    """Cut again and again, a run's pieces hold each record once, in order, each piece
    within its limit (or a lone record, when at least one was asked for)."""
    raws = [
        encode_record(Record.write("v", 0, b"z" * n).with_lsn(i + 1, 1000 + i))
        for i, n in enumerate(sizes)
    ]
    chunk = b"".join(raws)
    run = framed_run(chunk, 0, len(chunk), None, len(chunk))
    rest: EncodedRecord | None = EncodedRecord.of_run(chunk, 0, run)
    pieces: list[EncodedRecord] = []
    turn = 0
    while rest is not None:
        limit = limits[turn % len(limits)]
        turn += 1
        taken = split_run(rest, limit, at_least_one=turn % 3 == 0)
        if taken is None:
            assert len(raws[rest.lsn - 1]) > limit  # not even its first record fits
            continue
        piece, rest = taken
        assert piece.size <= limit or piece.count == 1
        assert piece.chunk is chunk and bytes(piece.raw) == chunk[piece.at : piece.at + piece.size]
        assert piece.ts_ns == 1000 + piece.lsn - 1
        assert piece.last_lsn == piece.lsn + piece.count - 1
        pieces.append(piece)
    assert b"".join(bytes(p.raw) for p in pieces) == chunk
    assert [bytes(r.raw) for r in each_record(pieces)] == raws


def _stamped(n: int, size: int) -> list[Record]:
    return [Record.write("d.img", i * size, bytes([i % 251]) * size) for i in range(n)]


def _shipping_read(folder: Path, budget: int) -> tuple[list[EncodedRecord], str | None]:
    """Everything one segment's shipping read yields (no checksums: past check_through),
    call after call, and the error it ends with."""
    (segment,) = folder.glob("*.seg")
    reader = SegmentReader(segment, 1)
    got: list[EncodedRecord] = []
    end = segment.stat().st_size
    try:
        while reader.offset < end:
            got += reader.read_encoded(end, budget, check_through=0)
    except JournalCorrupt as exc:
        return got, f"{exc.offset}: {exc.reason}"
    finally:
        reader.close()
    return got, None


@pytest.mark.parametrize(("count", "size"), [(300, 4096), (9, 1_500_000), (40, 300_000)])
async def test_the_shipping_read_yields_what_reading_record_by_record_does(
    tmp_path: Path, count: int, size: int
) -> None:
    """Runs across read chunks (records cut by READ_CHUNK's bounds), with budgets small
    and large: the same records' bytes as the record-by-record read, in order."""
    folder = tmp_path / "j"
    async with await Journal.open(folder, segment_bytes=1 << 30) as journal:
        await journal.append_many(_stamped(count, size))
        await journal.sync()
    wanted = [encode_record(r) for r in await _records(folder)]
    for budget in (1, 64 * 1024, READ_CHUNK):
        got, error = _shipping_read(folder, budget)
        assert error is None
        assert [bytes(r.raw) for r in each_record(got)] == wanted
        if size == 4096 and budget == READ_CHUNK:
            assert len(got) < count / 50  # found as runs, not one by one


async def _records(folder: Path) -> list[Record]:
    async with await Journal.open(folder) as journal:
        out = []
        async for record in journal.read_from(1):
            out.append(record)
        return out


@pytest.mark.parametrize(
    ("field_at", "value"),
    [(0, ord("X")), (2, 9), (3, 99), (5, 0xFF), (9, 0x7F), (10, 20)],
    ids=["magic", "version", "type", "name length", "data length", "lsn not above"],
)
async def test_a_damaged_header_ends_the_shipping_read_as_it_ends_a_record_read(
    tmp_path: Path, field_at: int, value: int
) -> None:
    """A header damaged on disk (magic, version, type, a length, the LSN): the records
    before it are handed over first, then the read fails at its offset naming the same
    fault as reading record by record."""
    folder = tmp_path / "j"
    records_ = _stamped(50, 4096)
    async with await Journal.open(folder, segment_bytes=1 << 30) as journal:
        await journal.append_many(records_)
        await journal.sync()
    (segment,) = folder.glob("*.seg")
    size = len(encode_record(records_[0].with_lsn(1, 0)))
    at = HEADER_BYTES + 20 * size + field_at
    with segment.open("r+b") as f:
        f.seek(at)
        f.write(bytes([value]))
    got, error = _shipping_read(folder, READ_CHUNK)
    reader = SegmentReader(segment, 1)
    one_by_one: list[EncodedRecord] = []
    try:
        while True:
            one_by_one += reader._read(segment.stat().st_size, READ_CHUNK, records.frame_record)
    except JournalCorrupt as exc:
        expected = f"{exc.offset}: {exc.reason}"
    finally:
        reader.close()
    assert [e.lsn for e in each_record(got)] == list(range(1, 21))
    assert [e.lsn for e in one_by_one] == list(range(1, 21))
    assert error == expected
    assert error.startswith(f"{HEADER_BYTES + 20 * size}: ")


@pytest.mark.parametrize("start", [1, 2, 150, 299, 300])
async def test_following_from_inside_a_run_yields_the_records_from_there(
    tmp_path: Path, start: int
) -> None:
    """A shipper that starts mid-segment (a reconnect, the receiver holding the rest) gets
    every record from ``start`` on and none before it, though the chunk it reads them in
    begins with the segment's first."""
    async with await Journal.open(tmp_path / "j") as journal:
        stamped = _stamped(300, 4096)
        await journal.append_many(stamped)
        await journal.sync()
        got: list[EncodedRecord] = []
        follow = journal.follow_encoded(start, check_through=0)
        try:
            async for batch in follow:
                got += batch
                if got[-1].last_lsn == 300:
                    break
        finally:
            await follow.aclose()
    assert got[0].lsn == start and len(got) < 5  # runs, not records
    each = [decode_record(bytes(r.raw))[0] for r in each_record(got)]
    assert [(r.lsn, r.offset, r.data) for r in each] == [
        (i, r.offset, r.data) for i, r in enumerate(stamped, 1) if i >= start
    ]
