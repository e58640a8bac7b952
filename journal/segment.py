"""Segment files: the on-disk container of journal records.

A journal directory holds segment files named ``{base_lsn:020d}.seg``. Each one is::

    header   40 bytes (SEGMENT_HEADER)
    records  encode_record() bytes, back to back, LSNs strictly increasing, all >= base_lsn
    seal     64 bytes (SEAL), present only once the segment is sealed

Header (little endian)::

    offset size field
    0      4    magic       b"RJSG"
    4      2    version     1
    6      2    flags       bit 0 REUSED: the file held an earlier segment (see below);
                            other bits 0
    8      8    base_lsn    every record in the segment has lsn >= base_lsn; equals the
                            journal's next LSN when the segment was created
    16     8    created_ns  wall clock at creation (informational)
    24     16   checksum    blake3-128 over bytes 0..24

Seal (written when the journal moves on to a new segment, and made durable before the
next segment exists, so every segment but the last is complete)::

    offset size field
    0      4    magic         b"SEAL"
    4      2    version       1
    6      2    reserved      0
    8      8    count         number of records
    16     8    first_lsn     LSN of the first record (0 when count is 0)
    24     8    last_lsn      LSN of the last record (0 when count is 0)
    32     8    next_lsn      the journal's next LSN after this segment: the next segment's
                              base_lsn must equal it (gap and overlap checks)
    40     8    records_bytes bytes of records between header and seal
    48     16   checksum      blake3-128 over bytes 0..48

Segment files are reused: a trimmed segment may be kept as a spare (``{n:020d}.spare``)
and become a later segment, its blocks overwritten in place (an overwrite needs no block
allocation, and its fdatasync no file-system journal commit). Such a segment's header has
REUSED set and its file may hold, after the last record, bytes of its earlier life: whole
records with LSNs below ``base_lsn`` or parts of them, never a seal (the last 64 bytes are
zeroed before reuse). Recovery cuts them like a torn tail: every record of the earlier life
is below ``base_lsn``, so none can pass for a record of this one. A sealed segment and the
active one at a clean close are truncated to their end.

This module is the format and the byte-level readers. It does no fsync and keeps no
journal state; ``journal.py`` drives it and ``inspect.py`` walks a directory with it.
"""

from __future__ import annotations

import os
import re
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import blake3

from replicator.journal.errors import JournalCorrupt
from replicator.journal.records import (
    HEADER_SIZE,
    MAX_DATA,
    MAX_NAME,
    RECORD_MAGIC,
    RECORD_VERSIONS,
    VERSION_AT,
    EncodedRecord,
    NewerRecordFormat,
    Record,
    RecordError,
    check_record,
    decode_record,
    frame_record,
    framed_run,
    peek_length,
    peek_lsn,
)


class _HasLsn(Protocol):
    @property
    def lsn(self) -> int: ...


ReadItem = TypeVar("ReadItem", bound=_HasLsn)  # what a SegmentReader yields: decoded or as stored

SEGMENT_MAGIC = b"RJSG"
SEGMENT_VERSION = 1
SEGMENT_HEADER = struct.Struct("<4sHHQq16s")
HEADER_BYTES = SEGMENT_HEADER.size  # 40
SEAL_MAGIC = b"SEAL"
SEAL_VERSION = 1
SEAL = struct.Struct("<4sHHQQQQQ16s")
SEAL_BYTES = SEAL.size  # 64
SEGMENT_SUFFIX = ".seg"
SPARE_SUFFIX = ".spare"
FLAG_REUSED = 1
_NAME = re.compile(r"^(\d{20})\.seg$")
_SPARE_NAME = re.compile(r"^(\d{20})\.spare$")
READ_CHUNK = 4 * 1024 * 1024  # bytes per pread when scanning or replaying


class SegmentFormatError(ValueError):
    """A segment header or seal that is not valid; the caller adds file and offset."""


class NewerSegmentFormat(SegmentFormatError):
    """A segment header, its checksum intact, of a format version above this build's: a
    newer replicator wrote the segment."""


def segment_name(base_lsn: int) -> str:
    return f"{base_lsn:020d}{SEGMENT_SUFFIX}"


def parse_segment_name(name: str) -> int | None:
    """Base LSN encoded in a segment file name, or None when the name is not a segment's."""
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def spare_name(base_lsn: int) -> str:
    """The name a trimmed segment takes while it waits to be reused."""
    return f"{base_lsn:020d}{SPARE_SUFFIX}"


def is_spare_name(name: str) -> bool:
    return _SPARE_NAME.match(name) is not None


def _digest(data: bytes | memoryview) -> bytes:
    return blake3.blake3(data).digest(16)


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    base_lsn: int
    created_ns: int
    flags: int = 0

    @property
    def reused(self) -> bool:
        """The file held an earlier segment: bytes after the last record may be its."""
        return bool(self.flags & FLAG_REUSED)

    def encode(self) -> bytes:
        head = SEGMENT_HEADER.pack(
            SEGMENT_MAGIC,
            SEGMENT_VERSION,
            self.flags,
            self.base_lsn,
            self.created_ns,
            b"\0" * 16,
        )
        return head[:24] + _digest(head[:24])

    @classmethod
    def decode(cls, buf: bytes | memoryview) -> SegmentHeader:
        if len(buf) < HEADER_BYTES:
            raise SegmentFormatError(f"segment header truncated ({len(buf)} of {HEADER_BYTES})")
        magic, version, flags, base, created, digest = SEGMENT_HEADER.unpack_from(buf)
        if magic != SEGMENT_MAGIC:
            raise SegmentFormatError(f"not a journal segment (magic {bytes(magic)!r})")
        if _digest(memoryview(buf)[:24]) != digest:
            raise SegmentFormatError("segment header checksum mismatch")
        if version != SEGMENT_VERSION:
            raise (NewerSegmentFormat if version > SEGMENT_VERSION else SegmentFormatError)(
                f"segment format version {version} is not supported (this build reads "
                f"{SEGMENT_VERSION}); use a matching replicator version"
            )
        if base < 1:
            raise SegmentFormatError(f"segment base LSN {base} is invalid")
        return cls(int(base), int(created), int(flags))


@dataclass(frozen=True, slots=True)
class Seal:
    count: int
    first_lsn: int
    last_lsn: int
    next_lsn: int
    records_bytes: int

    def encode(self) -> bytes:
        body = SEAL.pack(
            SEAL_MAGIC,
            SEAL_VERSION,
            0,
            self.count,
            self.first_lsn,
            self.last_lsn,
            self.next_lsn,
            self.records_bytes,
            b"\0" * 16,
        )
        return body[:48] + _digest(body[:48])

    @classmethod
    def decode(cls, buf: bytes | memoryview) -> Seal:
        if len(buf) < SEAL_BYTES:
            raise SegmentFormatError(f"segment seal truncated ({len(buf)} of {SEAL_BYTES})")
        magic, version, _, count, first, last, nxt, nbytes, digest = SEAL.unpack_from(buf)
        if magic != SEAL_MAGIC:
            raise SegmentFormatError(f"segment seal missing (found {bytes(magic)!r})")
        if _digest(memoryview(buf)[:48]) != digest:
            raise SegmentFormatError("segment seal checksum mismatch")
        if version != SEAL_VERSION:
            raise SegmentFormatError(f"segment seal version {version} is not supported")
        seal = cls(int(count), int(first), int(last), int(nxt), int(nbytes))
        if count == 0:
            ok = first == 0 and last == 0
        else:
            ok = 0 < first <= last < nxt and last - first + 1 >= count
        if not ok:
            raise SegmentFormatError(f"segment seal fields inconsistent: {seal}")
        return seal


def read_exact(fd: int, size: int, offset: int) -> bytes:
    """pread until ``size`` bytes or end of file (the result is shorter at EOF)."""
    parts: list[bytes] = []
    got = 0
    while got < size:
        chunk = os.pread(fd, size - got, offset + got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


class _Window:
    """A reusable read buffer over one file; avoids a fresh multi-MiB allocation per read."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buf = bytearray(0)
        self._start = 0
        self._len = 0

    def get(self, pos: int, size: int, limit: int) -> memoryview | None:
        """``size`` bytes at ``pos`` (reading ahead up to ``limit``), None when the file is short.

        The view is valid until the next call.
        """
        if self._start <= pos and pos + size <= self._start + self._len:
            off = pos - self._start
            return memoryview(self._buf)[off : off + size]
        want = max(size, min(READ_CHUNK, limit - pos))
        if len(self._buf) < want:
            self._buf = bytearray(max(want, min(READ_CHUNK, 2 * len(self._buf))))
        view = memoryview(self._buf)
        got = 0
        while got < want:
            n = os.preadv(self._fd, [view[got:want]], pos + got)
            if n == 0:
                break
            got += n
        self._start, self._len = pos, got
        if got < size:
            return None
        return view[:size]


class _Chunks:
    """Reads ahead into immutable chunks, a new one each time: a record checked or decoded
    in one keeps views of it (``check_record``, ``decode_record``) instead of copying its
    bytes out (a chunk lives while any of its records does)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._chunk = b""
        self._start = 0

    def get(self, pos: int, size: int, limit: int) -> tuple[bytes, int] | None:
        """The chunk holding the ``size`` bytes at ``pos`` and their offset in it (reading
        ahead up to ``limit``), None when the file is short."""
        off = pos - self._start
        if off < 0 or off + size > len(self._chunk):
            self._chunk = read_exact(self._fd, max(size, min(READ_CHUNK, limit - pos)), pos)
            self._start, off = pos, 0
        if len(self._chunk) < off + size:
            return None
        return self._chunk, off


@dataclass(slots=True)
class ScanResult:
    """What a scan of a segment's record area found."""

    count: int = 0
    first_lsn: int = 0
    last_lsn: int = 0
    end: int = HEADER_BYTES  # offset just after the last good record
    by_type: Counter[str] = field(default_factory=Counter)
    by_version: Counter[int] = field(default_factory=Counter)  # record format versions
    seal: Seal | None = None  # a valid seal found right after the records
    last_barrier: int = 0  # the LSN of the last FLUSH or EPOCH record (0: none)
    problem_offset: int | None = None
    problem: str | None = None
    newer: bool = False  # the problem is a record of a newer format (NewerRecordFormat)


def scan_segment(fd: int, size: int, base_lsn: int, *, allow_seal: bool = True) -> ScanResult:
    """Verify every record from the header to ``size``; stop at the first bad one.

    Read-only. A seal is accepted only as the final ``SEAL_BYTES`` of the file and only
    when it agrees with the records scanned before it.
    """
    result = ScanResult()
    window = _Window(fd)
    pos = HEADER_BYTES
    prev = base_lsn - 1

    def fail(reason: str) -> ScanResult:
        result.problem_offset, result.problem = pos, reason
        return result

    while pos < size:
        remaining = size - pos
        if allow_seal and remaining == SEAL_BYTES:
            view = window.get(pos, SEAL_BYTES, size)
            if view is not None and bytes(view[:4]) == SEAL_MAGIC:
                try:
                    seal = Seal.decode(view)
                except SegmentFormatError as exc:
                    return fail(str(exc))
                expected = Seal(
                    result.count,
                    result.first_lsn,
                    result.last_lsn,
                    prev + 1,
                    pos - HEADER_BYTES,
                )
                if seal != expected:
                    return fail(f"segment seal {seal} does not match the records {expected}")
                result.seal = seal
                return result
        if remaining < HEADER_SIZE:
            return fail(f"truncated record header ({remaining} bytes left)")
        head = window.get(pos, HEADER_SIZE, size)
        if head is None:
            return fail("file shorter than its size")
        try:
            total = peek_length(head)
        except NewerRecordFormat as exc:
            if _checks_as_known_version(window, pos, size):
                return fail(f"{exc}, but the record checks with a known version: a damaged byte")
            result.newer = True
            return fail(str(exc))
        except RecordError as exc:
            return fail(str(exc))
        if total > remaining:
            return fail(f"truncated record: needs {total} bytes, {remaining} left")
        view = window.get(pos, total, size)
        if view is None:
            return fail("file shorter than its size")
        try:
            record, _ = decode_record(view)
        except RecordError as exc:
            return fail(str(exc))
        if record.lsn <= prev:
            return fail(f"record lsn {record.lsn} does not follow lsn {prev}")
        if result.count == 0:
            result.first_lsn = record.lsn
        result.count += 1
        result.last_lsn = prev = record.lsn
        result.by_type[record.type.name] += 1
        result.by_version[view[VERSION_AT]] += 1
        if record.is_barrier:
            result.last_barrier = record.lsn
        pos += total
        result.end = pos
    return result


def _checks_as_known_version(window: _Window, pos: int, size: int) -> bool:
    """Whether the record at ``pos``, whose version byte says a newer format, passes its
    checksum with a version this build reads in that byte: then one damaged byte (the
    checksum covers it) made it look newer, and it is damage, not a newer release's
    record. A newer format's record fails this (another checksum or layout)."""
    head = window.get(pos, HEADER_SIZE, size)
    if head is None:
        return False
    name_len, data_len = struct.unpack_from("<HI", head, VERSION_AT + 2)
    if name_len > MAX_NAME or data_len > MAX_DATA or HEADER_SIZE + name_len + data_len > size - pos:
        return False
    view = window.get(pos, HEADER_SIZE + name_len + data_len, size)
    if view is None:
        return False
    raw = bytearray(view)
    for version in RECORD_VERSIONS:
        raw[VERSION_AT] = version
        try:
            check_record(bytes(raw))
        except RecordError:
            continue
        return True
    return False


# every record version's start: the magic (peek_length then checks the version)
_RECORD_START = RECORD_MAGIC


def find_valid_record(fd: int, start: int, end: int, after_lsn: int) -> tuple[int, int] | None:
    """(offset, lsn) of the first intact record in ``[start, end)`` with an LSN above
    ``after_lsn``, or None. Read-only.

    Recovery asks this after the first bad record of the last segment. A crash tears
    only what was written after the last sync, and the writer appends in order, so an
    intact record *behind* a bad one means the bad bytes were written and synced once:
    damage at rest, not a torn tail. (A file system that persisted a later unsynced
    page before an earlier one would look the same; calling that damage is the safe
    mistake, since damage is never silently cut.) Candidates are found by the record
    magic and then fully checked, so random bytes are never taken for a record.
    """
    pos = start + 1
    carry = len(_RECORD_START) - 1
    while pos < end:
        chunk = read_exact(fd, min(READ_CHUNK, end - pos), pos)
        if not chunk:
            return None
        at = chunk.find(_RECORD_START)
        while at >= 0:
            found = _intact_record_at(fd, pos + at, end)
            if found is not None and found > after_lsn:
                return pos + at, found
            at = chunk.find(_RECORD_START, at + 1)
        if len(chunk) <= carry:
            return None
        pos += len(chunk) - carry  # a magic split across two chunks is seen in the next
    return None


def _intact_record_at(fd: int, pos: int, end: int) -> int | None:
    """The LSN of a record at ``pos`` that passes every check, else None."""
    head = read_exact(fd, HEADER_SIZE, pos)
    if len(head) < HEADER_SIZE:
        return None
    try:
        total = peek_length(head)
    except RecordError:
        return None
    if total > end - pos:
        return None
    try:
        record, _ = check_record(read_exact(fd, total, pos))
    except RecordError:
        return None
    return record.lsn


class SegmentReader:
    """Sequential, verifying reader of one segment's records, for replay and follow.

    Every record is checksum-verified and its LSN checked to increase; any failure raises
    JournalCorrupt naming the file and offset. The caller says how far the bytes are
    trustworthy (``end``): the durable end of the active segment, the seal of a sealed one.
    """

    def __init__(self, path: Path, base_lsn: int, offset: int = HEADER_BYTES) -> None:
        self.path = path
        self.offset = offset
        self.prev_lsn = base_lsn - 1
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._chunks = _Chunks(self._fd)

    def read(self, end: int, budget: int = READ_CHUNK) -> list[Record]:
        """Records from the current offset up to ``end``, about ``budget`` bytes of them;
        their data are views of the chunk they were read in (``_Chunks``)."""
        return self._read(end, budget, decode_record)

    def read_encoded(
        self, end: int, budget: int = READ_CHUNK, check_through: int | None = None
    ) -> list[EncodedRecord]:
        """Like ``read``, checked but not decoded: the bytes as stored (for shipping).

        ``check_through``: only records with an LSN up to it have their checksums verified
        here; later ones are only found whole (``frame_record``). None: all are verified.
        """
        if check_through is None:
            return self._read(end, budget, check_record)
        if check_through <= self.prev_lsn:
            return self._read_runs(end, budget)
        limit = check_through

        def convert(chunk: bytes, at: int) -> tuple[EncodedRecord, int]:
            if peek_lsn(chunk, at) <= limit:
                return check_record(chunk, at)
            return frame_record(chunk, at)

        return self._read(end, budget, convert)

    def _read_runs(self, end: int, budget: int) -> list[EncodedRecord]:
        """``read_encoded`` with no checksum to verify: the records found whole as runs,
        each a slice of one read chunk (``framed_run``), instead of one by one. Where a
        run stops short (a record past what was read ahead, past the budget, or not
        well-formed), one record is read as ``_read`` reads it, which names any damage;
        the records before it are handed over first, as ``_read`` does."""
        get = self._chunks.get
        out: list[EncodedRecord] = []
        start = pos = self.offset
        while pos < end and pos - start < budget:
            found = get(pos, HEADER_SIZE, end) if end - pos >= HEADER_SIZE else None
            if found is not None:
                chunk, off = found
                stop = min(len(chunk), off + (end - pos))
                run = framed_run(chunk, off, stop, self.prev_lsn, budget - (pos - start))
                if run.records:
                    out.append(EncodedRecord.of_run(chunk, off, run))
                    self.prev_lsn = run.last_lsn
                    pos += run.end - off
                    self.offset = pos
                    continue
            try:
                out += self._read(end, 1, frame_record)  # exactly one record
            except JournalCorrupt:
                if out:  # the next call raises at ``pos``
                    return out
                raise
            pos = self.offset
        return out

    def _read(
        self,
        end: int,
        budget: int,
        convert: Callable[[bytes, int], tuple[ReadItem, int]],
    ) -> list[ReadItem]:
        get = self._chunks.get  # immutable chunks: what ``convert`` returns may keep views
        out: list[ReadItem] = []
        start = self.offset
        pos = start
        try:
            while pos < end and pos - start < budget:
                if end - pos < HEADER_SIZE:
                    raise RecordError(f"truncated record header ({end - pos} bytes left)")
                found = get(pos, HEADER_SIZE, end)
                if found is None:
                    raise RecordError("segment file is shorter than its durable size")
                chunk, off = found
                total = peek_length(chunk, off)
                if total > end - pos:
                    raise RecordError(f"record of {total} bytes runs past the end ({end})")
                if off + total > len(chunk):  # the record runs past what was read ahead
                    found = get(pos, total, end)
                    if found is None:
                        raise RecordError("segment file is shorter than its durable size")
                    chunk, off = found
                item, _ = convert(chunk, off)
                if item.lsn <= self.prev_lsn:
                    raise RecordError(f"record lsn {item.lsn} does not follow {self.prev_lsn}")
                self.prev_lsn = item.lsn
                out.append(item)
                pos += total
                self.offset = pos
        except RecordError as exc:
            if out:  # hand over the good records first; the next call raises at ``pos``
                return out
            raise JournalCorrupt(self.path, pos, str(exc)) from exc
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
