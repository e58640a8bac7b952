"""The NBD shim's batch path for small WRITEs: the C extension, or its Python reference.

A run of plain WRITE requests that arrived together (no flags, small, inside the file) is
journaled and written as one batch instead of one coroutine chain per request: the records
of all of them are encoded in one call, staged with one append, their payloads written
into the volume in one call and their replies joined (``JournaledFileExport.write_batch``,
``_Connection`` in ``server.py``). The per-request Python it removes (parsing, the
request's coroutines, the record, its encoding, the journal's bookkeeping) was most of a
4 KiB write's CPU (bench/RESULTS.md, "2026-12-07, forty-fourth session").

Three functions do the per-request work (their contracts are in ``_native.c``):

* ``scan_writes(buf, pos, end, max_length, file_size, max_count) -> (count, consumed,
  payload)``: how many requests from ``pos`` qualify;
* ``encode_writes(batch, count, name, lsn, ts_ns) -> (records, replies)``: their journal
  records, byte for byte what ``journal.records.encode_parts`` makes, and their replies;
* ``pwrite_records(fd, records, count, name_len) -> [(index, errno), ...]``: each record's
  payload written into the volume; the ones that failed.

``_native`` (C, built by ``pip install`` when a compiler, Python's headers and
``xxhash.h`` are there, as ``make install`` has them) is used when it was built; the
Python functions below are the reference the tests hold it to (byte-identical output),
and what runs without it. ``REPLICATOR_PURE_PYTHON=1`` in the environment turns the whole
batch path off (every request takes the per-request path, as before the batch path
existed), for a comparison or a suspicion.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Final

from replicator.journal.native import PURE_PYTHON_ENV as PURE_PYTHON_ENV  # the tests read it here
from replicator.journal.native import pure_python
from replicator.journal.records import RECORD_HEADER, Record, encode_parts

_REQUEST: Final = struct.Struct(">IHHQQI")
_REPLY: Final = struct.Struct(">IIQ")
_RECORD: Final = RECORD_HEADER  # the header's fields, to find a record's offset and length
REQUEST_MAGIC: Final = 0x25609513
REPLY_MAGIC: Final = 0x67446698
REQUEST_SIZE: Final = _REQUEST.size
_WRITE: Final = 1
MAX_BATCH: Final = 256  # requests in one batch at most

Buffer = bytes | bytearray | memoryview
ScanWrites = Callable[[Buffer, int, int, int, int, int], tuple[int, int, int]]
EncodeWrites = Callable[[bytes | memoryview, int, bytes, int, int], tuple[bytes, bytes]]
PwriteRecords = Callable[[int, bytes | memoryview, int, int], list[tuple[int, int]]]


def py_scan_writes(
    buf: bytes | bytearray | memoryview,
    pos: int,
    end: int,
    max_length: int,
    file_size: int,
    max_count: int,
) -> tuple[int, int, int]:
    """Python reference of ``_native.scan_writes``."""
    if pos < 0 or end < pos or end > len(buf):
        raise ValueError("scan_writes: pos and end must lie within the buffer")
    at, count, payload = pos, 0, 0
    while count < max_count and end - at >= REQUEST_SIZE:
        magic, flags, cmd, _, offset, length = _REQUEST.unpack_from(buf, at)
        if magic != REQUEST_MAGIC or flags or cmd != _WRITE:
            break
        if not 0 < length <= max_length or length > end - at - REQUEST_SIZE:
            break
        if length > file_size or offset > file_size - length:
            break
        at += REQUEST_SIZE + length
        payload += length
        count += 1
    return count, at - pos, payload


def py_encode_writes(
    batch: bytes | memoryview, count: int, name: bytes, lsn: int, ts_ns: int
) -> tuple[bytes, bytes]:
    """Python reference of ``_native.encode_writes``: ``encode_parts`` of each request's
    WRITE record (the record format's one encoder), and its reply."""
    if count < 0 or not 0 < len(name) <= 4096:
        raise ValueError("encode_writes: a count and a volume name of 1..4096 bytes")
    view = memoryview(batch)
    volume = name.decode()
    records: list[bytes | memoryview] = []
    replies: list[bytes] = []
    at = 0
    for i in range(count):
        if len(view) - at < REQUEST_SIZE:
            raise ValueError(f"encode_writes: request {i} is not a plain WRITE")
        magic, flags, cmd, handle, offset, length = _REQUEST.unpack_from(view, at)
        if magic != REQUEST_MAGIC or flags or cmd != _WRITE or not length > 0:
            raise ValueError(f"encode_writes: request {i} is not a plain WRITE")
        if length > len(view) - at - REQUEST_SIZE:
            raise ValueError(f"encode_writes: request {i} is not a plain WRITE")
        data = bytes(view[at + REQUEST_SIZE : at + REQUEST_SIZE + length])
        head, payload = encode_parts(Record.write(volume, offset, data), lsn + i, ts_ns)
        records += (head, payload)
        replies.append(_REPLY.pack(REPLY_MAGIC, 0, handle))
        at += REQUEST_SIZE + length
    return b"".join(records), b"".join(replies)


def py_pwrite_records(
    fd: int, records: bytes | memoryview, count: int, name_len: int
) -> list[tuple[int, int]]:
    """Python reference of ``_native.pwrite_records``."""
    view = memoryview(records)
    failed: list[tuple[int, int]] = []
    at = 0
    head = _RECORD.size
    for i in range(count):
        if len(view) - at < head + name_len:
            raise ValueError("pwrite_records: records shorter than their count")
        fields = _RECORD.unpack_from(view, at)
        length, offset = fields[4], fields[7]
        if len(view) - at - head - name_len < length:
            raise ValueError("pwrite_records: records shorter than their count")
        data = view[at + head + name_len : at + head + name_len + length]
        done = 0
        while done < length:
            try:
                n = os.pwrite(fd, data[done:], offset + done)
            except OSError as exc:
                failed.append((i, exc.errno or 5))
                break
            if n <= 0:
                failed.append((i, 5))  # EIO, as pwrite_all says
                break
            done += n
        at += head + name_len + length
    return failed


def _load() -> tuple[ScanWrites, EncodeWrites, PwriteRecords, bool]:
    if pure_python():
        return py_scan_writes, py_encode_writes, py_pwrite_records, False
    try:
        from replicator.engine.nbd import _native  # optional: built by pip when it can be
    except ImportError:
        return py_scan_writes, py_encode_writes, py_pwrite_records, False
    return _native.scan_writes, _native.encode_writes, _native.pwrite_records, True


scan_writes, encode_writes, pwrite_records, NATIVE = _load()
"""``NATIVE``: the C extension is loaded, and the server takes the batch path."""
