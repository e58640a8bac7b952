"""Journal records: the unit of the write-order stream, on disk and on the wire.

Binary layout of one record (little endian; ``docs/FORMATS.md`` has the table)::

    offset size field
    0      2    magic      b"RJ"
    2      1    version    2 (1: the checksum is blake3-128; still read)
    3      1    type       RecordType
    4      2    name_len   length of the UTF-8 volume name / file path that follows the header
    6      4    data_len   length of the payload that follows the name
    10     8    lsn        log sequence number, strictly increasing in a stream
    18     8    ts_ns      source wall-clock timestamp, ns since the Unix epoch (signed)
    26     8    offset     byte offset (WRITE/ZERO/TRIM), epoch id (EPOCH),
                           mode (FILE/CREATE/MKDIR/CHMOD)
    34     8    length     byte count (ZERO/TRIM), new size (RESIZE), len(data) (WRITE/FILE/
                           RENAME/SYMLINK)
    42     16   checksum   XXH3-128 over bytes 0..42, the name and the payload
    58     -    name, then payload

ZERO and TRIM both say "this range reads as zeros afterwards", and they differ in what
the source holds there, which a replica keeps the same: ZERO = the range stays allocated
(zeros written or zeroed in place: NBD's ``NO_HOLE``, ``FALLOC_FL_ZERO_RANGE``, a plain
fallocate, zeros a scan read from allocated blocks), TRIM = it is deallocated (a hole
punched, or found by a scan). The applier zeroes a ZERO's range in place and punches a
TRIM's. Journals written before this distinction hold ZERO for punched ranges too; the
replica then keeps those ranges allocated: more space, never less than the source.

The same bytes are stored in journal segments and carried in RECORDS frames, so a
receiver checks every record's checksum before it lands in its own journal.

The checksum finds damage (torn writes, flipped bits, a bad frame); it is no defence
against someone who can write the journal or the stream, who could compute any checksum
again (TLS and the file permissions are). XXH3-128 does that job at a tenth of blake3's
cost (4 KiB: 0.08 against 1.9 us; 1 MiB: 10 against 107 us on the benchmark machine),
and blake3's was most of what a 4 KiB write costs the NBD shim beyond our plain server
(bench/RESULTS.md). Version 1 records (blake3-128) written before are still read and
checked as they were, so a journal survives the upgrade; new records are version 2.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple, TypeGuard

import blake3
import xxhash

from replicator.journal.native import framed_run as _framed_run_c
from replicator.journal.native import verified_prefix

RECORD_MAGIC = b"RJ"
RECORD_VERSION = 2  # what is written
BLAKE3_RECORD_VERSION = 1  # read and checked as before
RECORD_VERSIONS = frozenset({BLAKE3_RECORD_VERSION, RECORD_VERSION})
CHECKSUM_NAMES = {BLAKE3_RECORD_VERSION: "blake3", RECORD_VERSION: "XXH3-128"}  # for people
RECORD_HEADER = struct.Struct("<2sBBHIQqQQ16s")
HEADER_SIZE = RECORD_HEADER.size  # 58
CHECKED_HEADER_SIZE = 42  # header bytes covered by the checksum (all but the checksum itself)
_LSN = struct.Struct("<Q")
VERSION_AT = len(RECORD_MAGIC)  # a record's format version: the byte after the magic
_LSN_AT = struct.calcsize("<2sBBHI")  # the lsn follows magic, version, type and two lengths
_JOIN_BELOW = 64 * 1024
_NO_DIGEST = b"\0" * 16
MAX_NAME = 4096
MAX_DATA = 64 * 1024 * 1024  # one record never carries more than 64 MiB


class RecordType(IntEnum):
    WRITE = 1
    ZERO = 2  # the range reads as zeros and stays allocated
    TRIM = 3  # the range reads as zeros and is deallocated (a hole)
    FLUSH = 4
    FILE = 5
    EPOCH = 6
    RESIZE = 7
    # file-system operations captured by the FUSE filter; ``volume`` is a relative path
    CREATE = 8  # offset = mode; creates an empty regular file (or truncates an existing one)
    UNLINK = 9
    RENAME = 10  # data = new path (UTF-8); replaces the target atomically
    MKDIR = 11  # offset = mode
    RMDIR = 12
    SYMLINK = 13  # data = link target (UTF-8)
    CHMOD = 14  # offset = mode


# Records that change which file a name leads to: not idempotent when redone over a later
# state, so appliers and capture treat them as ordering points (see job_replica.py).
NAMESPACE_TYPES = frozenset(
    {
        RecordType.CREATE,
        RecordType.UNLINK,
        RecordType.RENAME,
        RecordType.MKDIR,
        RecordType.RMDIR,
        RecordType.SYMLINK,
    }
)

# the consistency points (``Record.is_barrier``): a set built once, not a tuple of enum
# members looked up on each call (~0.18 us against ~0.02)
_BARRIER_TYPES = frozenset({RecordType.FLUSH, RecordType.EPOCH})

_NAMED = {
    RecordType.WRITE,
    RecordType.ZERO,
    RecordType.TRIM,
    RecordType.FILE,
    RecordType.RESIZE,
    RecordType.CREATE,
    RecordType.UNLINK,
    RecordType.RENAME,
    RecordType.MKDIR,
    RecordType.RMDIR,
    RecordType.SYMLINK,
    RecordType.CHMOD,
}
_WITH_DATA = {RecordType.WRITE, RecordType.FILE, RecordType.RENAME, RecordType.SYMLINK}


class RecordError(ValueError):
    """Bytes that are not a valid record (bad magic, version, type, lengths or checksum)."""


class NewerRecordFormat(RecordError):
    """A record whose format version is above every one this build reads: a newer
    replicator wrote it (its bytes cannot be checked here, so they are neither read nor
    taken for a torn tail)."""

    def __init__(self, version: int) -> None:
        self.version = version
        super().__init__(
            f"record format version {version} is newer than this build reads "
            f"({max(RECORD_VERSIONS)} at most): a newer replicator wrote it"
        )


@dataclass(frozen=True, slots=True)
class Record:
    """One journal record. ``lsn``/``ts_ns`` of 0 mean "assign on append".

    ``data`` is bytes, or a read-only byte view that nothing changes: of immutable bytes
    (a record decoded from a frame or a read chunk keeps its payload there instead of
    copying it out), or of a buffer its owner handed over and never changes again (the
    NBD codec's large WRITE payloads, received into a buffer of their own: copying each
    MiB out cost ~30 us of CPU per request, and half the 1 MiB throughput in a process
    without ``engine/allocator.py``'s settings, where each copy is fresh memory).
    """

    type: RecordType
    volume: str = ""
    offset: int = 0
    length: int = 0
    data: bytes | memoryview = b""
    lsn: int = 0
    ts_ns: int = 0

    def __post_init__(self) -> None:
        # Record.write and decode_record build WRITEs past this (_checked_record) after
        # checks of their own: a rule added here for WRITEs goes there too
        if not isinstance(self.type, RecordType):
            raise RecordError(f"unknown record type {self.type!r}")
        if self.type in _NAMED and not self.volume:
            raise RecordError(f"{self.type.name} record needs a volume name")
        if len(self.volume.encode()) > MAX_NAME:
            raise RecordError(f"volume name longer than {MAX_NAME} bytes")
        if isinstance(self.data, memoryview) and not handed_over(self.data):
            raise RecordError("a record's data may be a read-only byte view only")
        if len(self.data) > MAX_DATA:
            raise RecordError(f"record payload of {len(self.data)} bytes exceeds {MAX_DATA}")
        if self.type in _WITH_DATA and self.length != len(self.data):
            raise RecordError(f"{self.type.name} length {self.length} != payload {len(self.data)}")
        if self.type not in _WITH_DATA and self.data:
            raise RecordError(f"{self.type.name} record carries no payload")
        if self.type in (RecordType.RENAME, RecordType.SYMLINK) and not self.data:
            raise RecordError(f"{self.type.name} record needs a target")
        if self.offset < 0 or self.length < 0 or self.lsn < 0:
            raise RecordError("offset, length and lsn must not be negative")

    # Constructors name the fields each type uses.
    @classmethod
    def write(cls, volume: str, offset: int, data: bytes | bytearray | memoryview) -> Record:
        kept = data if isinstance(data, bytes) or handed_over(data) else bytes(data)
        if (
            cls is Record
            and volume
            and offset >= 0
            and len(kept) <= MAX_DATA
            and len(volume.encode()) <= MAX_NAME  # raises as __post_init__ does
        ):
            return _checked_record(RecordType.WRITE, volume, offset, len(kept), kept, 0, 0)
        return cls(RecordType.WRITE, volume, offset, len(kept), kept)

    @classmethod
    def zero(cls, volume: str, offset: int, length: int) -> Record:
        return cls(RecordType.ZERO, volume, offset, length)

    @classmethod
    def trim(cls, volume: str, offset: int, length: int) -> Record:
        return cls(RecordType.TRIM, volume, offset, length)

    @classmethod
    def flush(cls) -> Record:
        return cls(RecordType.FLUSH)

    @classmethod
    def file(cls, path: str, content: bytes, mode: int = 0o644) -> Record:
        return cls(RecordType.FILE, path, mode, len(content), bytes(content))

    @classmethod
    def epoch(cls, epoch_id: int) -> Record:
        return cls(RecordType.EPOCH, "", epoch_id)

    @classmethod
    def resize(cls, volume: str, size: int) -> Record:
        return cls(RecordType.RESIZE, volume, 0, size)

    @classmethod
    def create(cls, path: str, mode: int) -> Record:
        return cls(RecordType.CREATE, path, mode)

    @classmethod
    def unlink(cls, path: str) -> Record:
        return cls(RecordType.UNLINK, path)

    @classmethod
    def rename(cls, old: str, new: str) -> Record:
        target = new.encode()
        return cls(RecordType.RENAME, old, 0, len(target), target)

    @classmethod
    def mkdir(cls, path: str, mode: int) -> Record:
        return cls(RecordType.MKDIR, path, mode)

    @classmethod
    def rmdir(cls, path: str) -> Record:
        return cls(RecordType.RMDIR, path)

    @classmethod
    def symlink(cls, path: str, target: str) -> Record:
        raw = target.encode()
        return cls(RecordType.SYMLINK, path, 0, len(raw), raw)

    @classmethod
    def chmod(cls, path: str, mode: int) -> Record:
        return cls(RecordType.CHMOD, path, mode)

    @property
    def target(self) -> str:
        """New path of a RENAME, link target of a SYMLINK."""
        return bytes(self.data).decode()

    @property
    def epoch_id(self) -> int:
        return self.offset

    @property
    def size(self) -> int:
        """New size of a RESIZE record."""
        return self.length

    @property
    def is_barrier(self) -> bool:
        """FLUSH and EPOCH are the points where the receiver fsyncs and the replica is whole."""
        return self.type in _BARRIER_TYPES  # asked of every record received, twice

    @property
    def encoded_size(self) -> int:
        return HEADER_SIZE + len(self.volume.encode()) + len(self.data)

    def with_lsn(self, lsn: int, ts_ns: int | None = None) -> Record:
        return Record(
            self.type,
            self.volume,
            self.offset,
            self.length,
            self.data,
            lsn,
            self.ts_ns if ts_ns is None else ts_ns,
        )


def handed_over(data: object) -> TypeGuard[memoryview]:
    """A read-only view of bytes: of immutable ``bytes``, or of a buffer its owner
    handed over and never changes again (``memoryview(buf).toreadonly()``)."""
    return (
        isinstance(data, memoryview) and data.readonly and data.format == "B" and data.c_contiguous
    )


_WRITE = int(RecordType.WRITE)
_SET_FIELDS = tuple(
    getattr(Record, name).__set__
    for name in ("type", "volume", "offset", "length", "data", "lsn", "ts_ns")
)


def _checked_record(
    rtype: RecordType,
    volume: str,
    offset: int,
    length: int,
    data: bytes | memoryview,
    lsn: int,
    ts_ns: int,
) -> Record:
    """A record whose fields the caller has checked as ``__post_init__`` would, built
    without the frozen dataclass's ``__init__`` and ``__post_init__``: one per captured
    or received write, where they took 1.0 us of a 4 KiB write's ~16 us in the NBD
    shim (this takes 0.25)."""
    record = object.__new__(Record)
    set_type, set_volume, set_offset, set_length, set_data, set_lsn, set_ts = _SET_FIELDS
    set_type(record, rtype)
    set_volume(record, volume)
    set_offset(record, offset)
    set_length(record, length)
    set_data(record, data)
    set_lsn(record, lsn)
    set_ts(record, ts_ns)
    return record


def now_ns() -> int:
    return time.time_ns()


def record_digest(
    head: bytes | memoryview,
    body: bytes | memoryview,
    more: bytes | memoryview = b"",
    version: int = RECORD_VERSION,
) -> bytes:
    """The record checksum: over the checked header bytes, then ``body`` and ``more`` (the
    name and the payload, in one part or two); XXH3-128 for ``version`` 2, blake3-128 for
    a version 1 record read back.

    Small records are joined and hashed in one call (one C call instead of a hasher and
    its updates). Large payloads are hashed in parts, without a copy.
    Fixed arguments, no ``*rest``: this runs once per record written and once per record
    read, and a generator over the parts cost a tenth of it at 4 KiB.
    """
    small = len(body) + len(more) <= _JOIN_BELOW
    h: xxhash.xxh3_128 | blake3.blake3
    if version == RECORD_VERSION:
        if small:
            return xxhash.xxh3_128_digest(b"".join((head, body, more)))
        h = xxhash.xxh3_128(head)
    else:
        if small:
            return blake3.blake3(b"".join((head, body, more))).digest(16)
        h = blake3.blake3(head)
    h.update(body)
    if more:
        h.update(more)
    return h.digest()[:16]  # blake3's is an extendable output: its first 16 bytes


def encode_parts(record: Record, lsn: int, ts_ns: int) -> tuple[bytes, bytes | memoryview]:
    """The record format's one encoder: ``record`` stamped with ``lsn`` and ``ts_ns``, as
    (header + checksum + name, payload).

    In two parts so the append path can hand the payload to ``pwritev`` without copying
    it, and without building (and validating again) a stamped Record first.
    """
    name = record.volume.encode()
    data = record.data
    try:
        head = RECORD_HEADER.pack(
            RECORD_MAGIC,
            RECORD_VERSION,
            record.type,
            len(name),
            len(data),
            lsn,
            ts_ns,
            record.offset,
            record.length,
            _NO_DIGEST,
        )[:CHECKED_HEADER_SIZE]
    except struct.error as exc:
        raise RecordError(
            f"record field out of range ({exc}): {record.type.name} "
            f"offset {record.offset} length {record.length}"
        ) from exc
    return head + record_digest(head, name, data) + name, data


def encode_record(record: Record) -> bytes:
    """Serialise a record (its lsn must be assigned) with its checksum."""
    head, data = encode_parts(record, record.lsn, record.ts_ns)
    return head + data


def peek_length(buf: bytes | memoryview, pos: int = 0) -> int:
    """Total encoded length of the record whose header starts at ``pos``.

    Raises RecordError when the header is not a record header; the caller must check
    that ``HEADER_SIZE`` bytes are available first.
    """
    magic, version, rtype, name_len, data_len = struct.unpack_from("<2sBBHI", buf, pos)
    if magic != RECORD_MAGIC:
        raise RecordError(f"bad record magic {bytes(magic)!r}")
    if version not in RECORD_VERSIONS:
        if version > RECORD_VERSION:
            raise NewerRecordFormat(version)
        raise RecordError(f"record format version {version} not supported")
    if rtype not in RecordType._value2member_map_:
        raise RecordError(f"unknown record type {rtype}")
    if name_len > MAX_NAME or data_len > MAX_DATA:
        raise RecordError(f"record lengths out of range (name {name_len}, data {data_len})")
    return int(HEADER_SIZE + name_len + data_len)


def peek_lsn(buf: bytes | memoryview, pos: int = 0) -> int:
    """The LSN in the record header at ``pos`` (checked by ``peek_length`` first)."""
    return int(_LSN.unpack_from(buf, pos + _LSN_AT)[0])


@dataclass(frozen=True, slots=True)
class EncodedRecord:
    """A record as stored and shipped, or a run of them stored back to back (``count``):
    their checked bytes, with the (first) LSN and time read out.

    What the sender ships and the receiver journals: nobody in between needs the
    decoded fields, so the bytes travel as they are instead of being re-encoded.

    The record's bytes are ``raw`` followed by ``payload``: a record read from a journal
    has them all in ``raw``; one encoded to be shipped at once (a first sync's, never
    journaled here) keeps its payload apart, so the megabytes are not copied behind the
    header only to be copied again into a frame.

    A record checked in an immutable read chunk (``bytes``) is not copied out of it:
    ``raw`` is a view of the chunk and ``at`` its offset there (-1 otherwise), so that
    records read back to back can go out as one slice of the chunk (``SenderCore.pack``).
    A run (``count`` > 1, ``last`` its last LSN) is such a slice found whole at once
    (``framed_run``): a sender reading back what it journaled handles a read chunk's
    records as a few runs, not one by one (``split_run`` cuts one to fit a frame).
    """

    lsn: int
    ts_ns: int
    raw: bytes | memoryview
    payload: bytes | memoryview = b""
    at: int = -1
    count: int = 1
    last: int = 0  # the last record's LSN when count > 1

    @property
    def size(self) -> int:
        """Bytes of the whole encoded record (or run)."""
        return len(self.raw) + len(self.payload)

    @property
    def last_lsn(self) -> int:
        return self.last if self.count > 1 else self.lsn

    @classmethod
    def of_run(cls, chunk: bytes, start: int, run: Run) -> EncodedRecord:
        """The records ``framed_run`` found in the read chunk ``chunk`` from ``start``."""
        view = memoryview(chunk)[start : run.end]
        return cls(
            run.first_lsn, run.first_ts_ns, view, at=start, count=run.records, last=run.last_lsn
        )

    @property
    def chunk(self) -> bytes | None:
        """The read chunk ``raw`` is a view of (at ``at``), or None."""
        raw = self.raw
        if self.at >= 0 and isinstance(raw, memoryview) and type(raw.obj) is bytes:
            return raw.obj
        return None


class Run(NamedTuple):
    """What ``framed_run`` found: ``records`` records in ``buf[start:end]``."""

    end: int
    records: int
    first_lsn: int
    last_lsn: int
    first_ts_ns: int


_VERSIONS_TABLE = bytes(v in RECORD_VERSIONS for v in range(256))  # framed_run's tables
_TYPES = {int(t): t for t in RecordType}
_TYPES_TABLE = bytes(v in _TYPES for v in range(256))


def framed_run(
    buf: bytes | memoryview, start: int, end: int, prev_lsn: int | None, limit: int
) -> Run:
    """The longest run of whole, well-formed records in ``buf[start:end]`` from ``start``
    (each header as ``peek_length`` accepts it, each LSN above the one before it, the
    first above ``prev_lsn`` unless None) whose bytes fit in ``limit``; checksums are not
    looked at. It stops at the first record that is not so and says nothing about it:
    the caller frames that one record by record, which names what is wrong.

    In C when ``journal/native.py`` has it (one call per read chunk or frame instead of
    ~6 us a 4 KiB record in Python); this function's loop is its pure-Python twin, held
    to the same answers by ``tests/journal/test_framed_run.py``."""
    if _framed_run_c is not None:
        return Run(
            *_framed_run_c(
                buf, start, end, prev_lsn, limit, MAX_NAME, MAX_DATA, _VERSIONS_TABLE, _TYPES_TABLE
            )
        )
    pos, count, first, last, ts = start, 0, 0, 0, 0
    prev = prev_lsn
    while end - pos >= HEADER_SIZE:
        try:
            total = peek_length(buf, pos)
        except RecordError:
            break
        if total > end - pos or total > limit - (pos - start):
            break
        lsn = peek_lsn(buf, pos)
        if prev is not None and lsn <= prev:
            break
        if not count:
            first, ts = _lsn_ts(buf, pos)
        prev = last = lsn
        count += 1
        pos += total
    return Run(pos, count, first, last, ts)


def split_run(
    item: EncodedRecord, limit: int, *, at_least_one: bool = False
) -> tuple[EncodedRecord, EncodedRecord | None] | None:
    """The first records of ``item`` whose bytes fit in ``limit`` (with ``at_least_one``,
    the first record even when it does not), and the rest (None: nothing left); None
    when not even the first fits. ``item`` is a run found whole by ``framed_run``."""
    if item.size <= limit:  # all of it: no walk
        return item, None
    if item.count == 1 or item.payload:
        return (item, None) if at_least_one else None
    raw = item.raw
    if at_least_one:
        limit = max(limit, peek_length(raw, 0))
    run = framed_run(raw, 0, len(raw), None, limit)
    if run.records == 0:
        return None
    if run.records >= item.count:
        return item, None
    head = EncodedRecord(
        item.lsn, item.ts_ns, raw[: run.end], at=item.at, count=run.records, last=run.last_lsn
    )
    return head, _rest(item, run.end, run.records)


def run_from(item: EncodedRecord, lsn: int) -> EncodedRecord | None:
    """The records of ``item`` (a record or a run) with an LSN of at least ``lsn``, None
    when there are none: a follower starting mid-run (``Journal.follow_encoded``)."""
    if item.last_lsn < lsn:
        return None
    if item.lsn >= lsn:
        return item
    raw, cut, skipped = item.raw, 0, 0
    while peek_lsn(raw, cut) < lsn:
        cut += peek_length(raw, cut)
        skipped += 1
    return _rest(item, cut, skipped)


def _rest(item: EncodedRecord, cut: int, taken: int) -> EncodedRecord:
    """The records of the run ``item`` from byte ``cut`` on, after its first ``taken``."""
    raw = item.raw
    count = item.count - taken
    return EncodedRecord(
        *_lsn_ts(raw, cut),
        raw[cut:],
        at=item.at + cut if item.at >= 0 else -1,
        count=count,
        last=item.last_lsn if count > 1 else 0,
    )


def _lsn_ts(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """The LSN and time of the record whose header starts at ``pos``."""
    fields = RECORD_HEADER.unpack_from(buf, pos)
    return int(fields[5]), int(fields[6])


def _framed(buf: bytes | memoryview, pos: int) -> tuple[int, tuple[Any, ...]]:
    """The record at ``pos`` found whole (header, lengths): its total length and header
    fields. Its checksum is not looked at."""
    if len(buf) - pos < HEADER_SIZE:
        raise RecordError("truncated record header")
    total = peek_length(buf, pos)
    if len(buf) - pos < total:
        raise RecordError(f"truncated record: need {total} bytes, have {len(buf) - pos}")
    return total, RECORD_HEADER.unpack_from(buf, pos)


def _verified(buf: bytes | memoryview, pos: int) -> tuple[int, tuple[Any, ...]]:
    """Check the record at ``pos`` (lengths, checksum); its total length and header fields."""
    total, fields = _framed(buf, pos)
    lsn, digest = fields[5], fields[9]
    view = memoryview(buf)
    checked = view[pos : pos + CHECKED_HEADER_SIZE]
    name_and_data = view[pos + HEADER_SIZE : pos + total]  # contiguous after the header
    if record_digest(checked, name_and_data, version=fields[1]) != digest:
        raise RecordError(f"record checksum mismatch (lsn {lsn})")
    return total, fields


def check_record(buf: bytes | memoryview, pos: int = 0) -> tuple[EncodedRecord, int]:
    """Verify the record at ``pos`` without decoding it; returns it and the position after.

    From ``bytes`` (immutable) the record is a view of ``buf``, which it keeps alive; from
    anything else (a reused buffer) its bytes are copied out.
    """
    return _as_stored(buf, pos, *_verified(buf, pos))


def frame_record(buf: bytes | memoryview, pos: int = 0) -> tuple[EncodedRecord, int]:
    """``check_record`` without the checksum: the record found whole, for a reader whose
    consumer verifies every record's checksum itself (a sender shipping to a receiver that
    checks each record on arrival: see ``Journal.follow_encoded``)."""
    return _as_stored(buf, pos, *_framed(buf, pos))


def _as_stored(
    buf: bytes | memoryview, pos: int, total: int, fields: tuple[Any, ...]
) -> tuple[EncodedRecord, int]:
    if type(buf) is bytes:
        return EncodedRecord(fields[5], fields[6], memoryview(buf)[pos : pos + total], at=pos), (
            pos + total
        )
    return EncodedRecord(
        fields[5], fields[6], bytes(memoryview(buf)[pos : pos + total])
    ), pos + total


def decode_record(buf: bytes | memoryview, pos: int = 0) -> tuple[Record, int]:
    """Decode and verify the record at ``pos``; returns it and the position after it.

    From ``bytes`` (immutable) or a read-only view (a buffer handed over: nothing
    changes it, see ``Record``) the record's data is a view of ``buf``, which it keeps
    alive; from anything else (a reused buffer) it is copied out.
    """
    view = memoryview(buf)
    return _decode(buf, pos, view, type(buf) is bytes or handed_over(view))


def _decode(
    buf: bytes | memoryview, pos: int, view: memoryview, keep: bool, verify: bool = True
) -> tuple[Record, int]:
    """``decode_record``, told once per buffer whether its data may be kept as views."""
    total, fields = _verified(buf, pos) if verify else _framed(buf, pos)
    (_, _, rtype, name_len, data_len, lsn, ts_ns, offset, length, _) = fields
    name_end = pos + HEADER_SIZE + name_len
    data = view[name_end : name_end + data_len]
    try:
        name = bytes(view[pos + HEADER_SIZE : name_end]).decode()
        kept = data if keep and data_len else bytes(data)
        if rtype == _WRITE and name and length == data_len:
            # every other WRITE check passed with the header (peek_length: lengths; the
            # fields are unsigned): one per replicated write, on the receiver's loop
            record = _checked_record(RecordType.WRITE, name, offset, length, kept, lsn, ts_ns)
        else:
            record = Record(RecordType(rtype), name, offset, length, kept, lsn, ts_ns)
    except (UnicodeDecodeError, RecordError) as exc:
        raise RecordError(f"record fields invalid (lsn {lsn}): {exc}") from exc
    return record, pos + total


class RecordHead(NamedTuple):
    """What a record changes, without its data: a journal observer's view of a record
    (``record_heads``; a ``Record`` has the same four fields)."""

    type: RecordType
    volume: str
    offset: int
    length: int


def record_heads(buf: bytes | memoryview) -> list[RecordHead]:
    """The heads of a packed run of records this process has just encoded itself (a
    batch the journal staged, for its observer): each found whole by its header's
    lengths, its checksum, version and data not looked at, so a 4 KiB write costs one
    header's unpacking instead of a whole record's decoding (bench/RESULTS.md)."""
    out: list[RecordHead] = []
    unpack = RECORD_HEADER.unpack_from
    view = memoryview(buf)
    end = len(view)
    names: dict[bytes, str] = {}  # a batch is one volume's: its name decoded once
    pos = 0
    while pos < end:
        if end - pos < HEADER_SIZE:
            raise RecordError("truncated record header")
        magic, _, rtype, name_len, data_len, lsn, _, offset, length, _ = unpack(view, pos)
        kind = _TYPES.get(rtype)
        if magic != RECORD_MAGIC or kind is None or end - pos < HEADER_SIZE + name_len + data_len:
            raise RecordError(f"not a whole record at byte {pos} (lsn {lsn})")
        raw = bytes(view[pos + HEADER_SIZE : pos + HEADER_SIZE + name_len])
        volume = names.get(raw)
        if volume is None:
            volume = names[raw] = raw.decode()
        out.append(RecordHead(kind, volume, offset, length))
        pos += HEADER_SIZE + name_len + data_len
    return out


def decode_records(buf: bytes | memoryview, *, verify: bool = True) -> list[Record]:
    """Decode a packed run of records (as carried in a RECORDS frame); all or nothing.

    ``verify=False``: records this process has just encoded itself (a batch the journal
    staged, decoded for its observer), their checksums not computed again. Checked, the
    records ``journal/native.py``'s C check vouches for are not checked again here; the
    first it does not (a mismatch, a version 1 record, a cut) and all after it are, so
    each error is found and named here as without it."""
    out: list[Record] = []
    pos = 0
    view = memoryview(buf)
    keep = type(buf) is bytes or handed_over(view)  # as decode_record, once per frame
    vouched = verified_prefix(view) if verify and verified_prefix is not None else 0
    while pos < len(buf):
        start = pos
        record, pos = _decode(buf, pos, view, keep, verify and pos >= vouched)
        if pos > vouched > start:  # framed past what was vouched for: check it here
            record, pos = _decode(buf, start, view, keep, True)
        out.append(record)
    return out
