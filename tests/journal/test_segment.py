"""Segment header and seal encodings, file names."""

from __future__ import annotations

import struct
from collections.abc import Callable

import blake3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator.journal.records import (
    MAX_NAME,
    Record,
    RecordType,
    decode_record,
    encode_parts,
)
from replicator.journal.segment import (
    HEADER_BYTES,
    SEAL_BYTES,
    SEGMENT_HEADER,
    Seal,
    SegmentFormatError,
    SegmentHeader,
    parse_segment_name,
    segment_name,
)


@given(st.integers(1, 2**63 - 1), st.integers(-(2**63), 2**63 - 1))
def test_header_round_trip(base: int, created: int) -> None:
    raw = SegmentHeader(base, created).encode()
    assert len(raw) == HEADER_BYTES
    assert SegmentHeader.decode(raw) == SegmentHeader(base, created)


@given(st.integers(0, HEADER_BYTES - 1), st.integers(1, 255))
def test_any_header_byte_flip_is_caught(position: int, mask: int) -> None:
    raw = bytearray(SegmentHeader(42, 7).encode())
    raw[position] ^= mask
    with pytest.raises(SegmentFormatError):
        SegmentHeader.decode(bytes(raw))


def test_header_from_a_newer_version_says_so() -> None:
    head = bytearray(SEGMENT_HEADER.pack(b"RJSG", 2, 0, 1, 0, b"\0" * 16))
    head[24:] = blake3.blake3(bytes(head[:24])).digest(16)
    with pytest.raises(SegmentFormatError, match="version 2 is not supported"):
        SegmentHeader.decode(bytes(head))


def test_seal_round_trip_and_flips() -> None:
    seal = Seal(count=3, first_lsn=10, last_lsn=14, next_lsn=15, records_bytes=500)
    raw = seal.encode()
    assert len(raw) == SEAL_BYTES
    assert Seal.decode(raw) == seal
    for position in range(SEAL_BYTES):
        bad = bytearray(raw)
        bad[position] ^= 0x01
        with pytest.raises(SegmentFormatError):
            Seal.decode(bytes(bad))


@pytest.mark.parametrize(
    "fields",
    [
        (0, 1, 0, 1, 0),  # no records but a first LSN
        (2, 5, 5, 6, 100),  # two records cannot share one LSN
        (1, 5, 5, 5, 100),  # next must be after last
    ],
)
def test_inconsistent_seal_fields_are_refused(fields: tuple[int, int, int, int, int]) -> None:
    with pytest.raises(SegmentFormatError, match="inconsistent"):
        Seal.decode(Seal(*fields).encode())


def test_truncated_structures() -> None:
    with pytest.raises(SegmentFormatError, match="truncated"):
        SegmentHeader.decode(b"RJSG")
    with pytest.raises(SegmentFormatError, match="truncated"):
        Seal.decode(b"SEAL" + struct.pack("<H", 1))


def test_names() -> None:
    assert segment_name(1) == "00000000000000000001.seg"
    assert parse_segment_name(segment_name(123456789)) == 123456789
    for name in ("1.seg", "00000000000000000001.seg.tmp", ".00000000000000000001.seg", "x"):
        assert parse_segment_name(name) is None


@st.composite
def records(draw: st.DrawFn) -> Record:
    """A valid record of any type, through the constructors that name each type's fields."""
    kind = draw(st.sampled_from(list(RecordType)))
    name = draw(st.text(min_size=1, max_size=20))
    number = draw(st.integers(0, 2**63))
    data = draw(st.one_of(st.binary(max_size=300), st.just(b"\x07" * (70 * 1024))))
    other = draw(st.text(min_size=1, max_size=20))
    build: dict[RecordType, Callable[[], Record]] = {
        RecordType.WRITE: lambda: Record.write(name, number, data),
        RecordType.ZERO: lambda: Record.zero(name, number, len(data)),
        RecordType.TRIM: lambda: Record.trim(name, number, len(data)),
        RecordType.FLUSH: Record.flush,
        RecordType.FILE: lambda: Record.file(name, data),
        RecordType.EPOCH: lambda: Record.epoch(number),
        RecordType.RESIZE: lambda: Record.resize(name, number),
        RecordType.CREATE: lambda: Record.create(name, 0o644),
        RecordType.UNLINK: lambda: Record.unlink(name),
        RecordType.RENAME: lambda: Record.rename(name, other),
        RecordType.MKDIR: lambda: Record.mkdir(name, 0o755),
        RecordType.RMDIR: lambda: Record.rmdir(name),
        RecordType.SYMLINK: lambda: Record.symlink(name, other),
        RecordType.CHMOD: lambda: Record.chmod(name, 0o600),
    }
    return build[kind]()


@given(records(), st.integers(1, 2**63 - 1), st.integers(-(2**63), 2**63 - 1))
def test_encoded_parts_decode_to_the_stamped_record(record: Record, lsn: int, ts: int) -> None:
    head, data = encode_parts(record, lsn, ts)
    decoded, end = decode_record(head + data)
    assert decoded == record.with_lsn(lsn, ts) and end == len(head) + len(data)


@pytest.mark.parametrize(
    ("name", "length", "payload"), [(b"", 4, b"abcd"), (b"d", 5, b"abcd"), (b"d", 0, b"abcd")]
)
def test_a_decoded_write_whose_fields_disagree_is_refused(
    name: bytes, length: int, payload: bytes
) -> None:
    """A WRITE with a valid checksum but no volume, or a length that is not its payload's,
    is refused as the dataclass refuses it (the decoder's fast path must not keep it)."""
    head = struct.pack(
        "<2sBBHIQqQQ", b"RJ", 1, int(RecordType.WRITE), len(name), len(payload), 9, 1, 0, length
    )
    raw = head + blake3.blake3(head + name + payload).digest(16) + name + payload
    with pytest.raises(ValueError, match="record fields invalid"):
        decode_record(raw)


@given(records(), st.booleans())
def test_a_decoded_record_views_immutable_bytes_and_copies_out_of_anything_else(
    record: Record, immutable: bool
) -> None:
    """Records decoded from a frame payload or a read chunk (bytes) keep their data there;
    from a buffer that may change (a reused one) they copy it out, and later changes to
    that buffer do not reach them."""
    head, data = encode_parts(record, 5, 6)
    raw = head + bytes(data)
    buf: bytes | memoryview = raw if immutable else memoryview(bytearray(raw))
    decoded, _ = decode_record(buf)
    viewed = isinstance(decoded.data, memoryview)
    assert viewed == (immutable and len(record.data) > 0)
    if isinstance(decoded.data, memoryview):
        assert decoded.data.obj is buf
    if isinstance(buf, memoryview):
        buf[len(buf) - 1] ^= 0xFF  # the reused buffer is written over
    assert decoded == record.with_lsn(5, 6)
    assert hash(decoded) == hash(record.with_lsn(5, 6))


@given(records())
def test_a_decoded_record_views_a_handed_over_buffer(record: Record) -> None:
    """A read-only view (a large Records frame's own buffer, handed over by the frame
    decoder) is kept as immutable bytes are: nothing writes into it again."""
    head, data = encode_parts(record, 5, 6)
    backing = bytearray(head + bytes(data))
    decoded, _ = decode_record(memoryview(backing).toreadonly())
    if record.data:
        assert isinstance(decoded.data, memoryview) and decoded.data.obj is backing
    assert decoded == record.with_lsn(5, 6)


def test_a_record_refuses_a_view_of_a_buffer_that_may_change() -> None:
    with pytest.raises(ValueError, match="read-only"):
        Record(RecordType.WRITE, "d", 0, 1, memoryview(bytearray(b"x")))
    assert Record(RecordType.WRITE, "d", 0, 1, memoryview(b"x")).data == b"x"


def test_a_write_record_keeps_a_handed_over_buffer_and_copies_one_that_may_change() -> None:
    """The NBD codec hands a large payload over read-only: kept, not copied. A writable
    buffer is copied, so later changes to it do not reach the record."""
    buf = bytearray(b"abcd")
    handed = Record.write("d", 4096, memoryview(buf).toreadonly())
    assert isinstance(handed.data, memoryview) and handed.data.obj is buf
    assert handed == Record(RecordType.WRITE, "d", 4096, 4, b"abcd")
    copied = Record.write("d", 0, buf)
    buf[0] = ord("z")
    assert copied.data == b"abcd" and type(copied.data) is bytes
    kept = b"wxyz"
    assert Record.write("d", 0, kept).data is kept
    for bad in (memoryview(bytearray(4)), memoryview(b"abcd").cast("I")):
        with pytest.raises(ValueError, match="read-only byte view"):
            Record(RecordType.WRITE, "d", 0, len(bad), bad)


@pytest.mark.parametrize(
    ("volume", "offset", "size"),
    [("", 0, 1), ("d", -1, 1), ("x" * (MAX_NAME + 1), 0, 1), ("é" * 2049, 0, 1), ("\udcff", 0, 1)],
)
def test_the_fast_write_constructor_refuses_what_the_dataclass_refuses(
    volume: str, offset: int, size: int
) -> None:
    """``Record.write`` builds valid records without the dataclass's checks; whatever
    those checks refuse must still reach them."""
    with pytest.raises(ValueError):
        Record.write(volume, offset, bytes(size))


@given(
    st.text(st.characters(blacklist_categories=()), min_size=1, max_size=1100),
    st.integers(min_value=0, max_value=2**63 - 1),
    st.binary(max_size=64),
)
def test_the_fast_write_constructor_builds_what_the_dataclass_builds(
    volume: str, offset: int, data: bytes
) -> None:
    try:
        expected = Record(RecordType.WRITE, volume, offset, len(data), data)
    except ValueError:
        with pytest.raises(ValueError):
            Record.write(volume, offset, data)
        return
    got = Record.write(volume, offset, data)
    assert got == expected and hash(got) == hash(expected)
    assert encode_parts(got, 7, 8) == encode_parts(expected, 7, 8)
