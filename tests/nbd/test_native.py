"""The batch path for small NBD WRITEs (engine/nbd/native.py, _native.c).

Both implementations of its three functions (the C extension and the Python reference)
are held to the record format's one encoder (``journal.records.encode_parts``) byte for
byte, over hypothesis-generated requests; then the server's batch path end to end: the
journal it writes is the per-request path's, failed writes are reconciled, a fence that
closed while a batch ran holds its replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.engine.nbd import backend, native, proto
from replicator.engine.nbd import server as server_module
from replicator.engine.nbd.backend import JournaledFileExport
from replicator.engine.nbd.gate import WriteGate, fence_clock
from replicator.engine.nbd.server import NbdServer
from replicator.engine.witness_fence import SourceFence
from replicator.journal import Journal, JournalError, Record, RecordType, recovery
from replicator.journal.records import HEADER_SIZE, RecordHead, decode_records, encode_parts
from tests.nbd.helpers import RawClient, journal_records, replay

REQ = struct.Struct(">IHHQQI")
KiB = 1024


class Impl(NamedTuple):
    name: str
    scan: native.ScanWrites
    encode: native.EncodeWrites
    pwrite: native.PwriteRecords


try:
    from replicator.engine.nbd import _native
except ImportError:  # test_make_install_built_the_extension says what to do
    _native = None  # type: ignore[assignment]

IMPLS = [Impl("Python", native.py_scan_writes, native.py_encode_writes, native.py_pwrite_records)]
if _native is not None:
    IMPLS.insert(0, Impl("C", _native.scan_writes, _native.encode_writes, _native.pwrite_records))


both = pytest.mark.parametrize("impl", IMPLS, ids=[impl.name for impl in IMPLS])


def test_make_install_built_the_extension() -> None:
    # without it the shim takes the slower per-request path, and the C is not tested
    assert _native is not None, (
        "engine/nbd/_native.c was not built: run `make install` (it needs gcc, python3-dev "
        "and libxxhash-dev: `make sysdeps`); pip printed why it could not build it"
    )
    if not os.environ.get(native.PURE_PYTHON_ENV):
        assert native.NATIVE
        assert native.scan_writes is _native.scan_writes


@pytest.mark.parametrize("value", ["1", "yes"])
def test_the_environment_variable_turns_the_batch_path_off(value: str) -> None:
    probe = (
        "from replicator.engine.nbd import native, server; "
        "assert not native.NATIVE and not server.NATIVE; "
        "assert native.scan_writes is native.py_scan_writes"
    )
    env = {**os.environ, native.PURE_PYTHON_ENV: value}
    subprocess.run([sys.executable, "-c", probe], env=env, check=True, timeout=60)
    env[native.PURE_PYTHON_ENV] = "0"  # "0" and unset: the extension when it was built
    probe = "from replicator.engine.nbd import native; assert native.NATIVE"
    subprocess.run([sys.executable, "-c", probe], env=env, check=True, timeout=60)


class Req(NamedTuple):
    magic: int
    flags: int
    cmd: int
    handle: int
    offset: int
    data: bytes

    def wire(self) -> bytes:
        return REQ.pack(self.magic, self.flags, self.cmd, self.handle, self.offset, len(self.data))

    def encoded(self) -> bytes:
        return self.wire() + (self.data if self.cmd == proto.Cmd.WRITE else b"")


plain_writes = st.builds(
    Req,
    st.just(proto.REQUEST_MAGIC),
    st.just(0),
    st.just(int(proto.Cmd.WRITE)),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**40),
    st.binary(min_size=1, max_size=5000),
)
# mostly plain writes, some of what must stop a batch: flags, another command, bad magic
any_requests = st.one_of(
    plain_writes,
    plain_writes,
    plain_writes,
    st.builds(
        Req,
        st.sampled_from([proto.REQUEST_MAGIC, 0x12345678]),
        st.sampled_from([0, 1, 2]),
        st.sampled_from([0, 1, 2, 3, 4]),
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**64 - 1),
        st.binary(min_size=0, max_size=300),
    ),
)


def expected_scan(
    reqs: list[Req], cut: int, max_length: int, file_size: int, max_count: int
) -> tuple[int, int, int]:
    """What scan_writes must say, from the spec of the batch: plain WRITEs, whole, inside."""
    count = consumed = payload = 0
    for req in reqs:
        size = proto.REQUEST_SIZE + len(req.data)
        if count == max_count or consumed + size > cut:
            break
        if (req.magic, req.flags, req.cmd) != (proto.REQUEST_MAGIC, 0, proto.Cmd.WRITE):
            break
        if not 0 < len(req.data) <= max_length or req.offset + len(req.data) > file_size:
            break
        count, consumed, payload = count + 1, consumed + size, payload + len(req.data)
    return count, consumed, payload


@both
@settings(max_examples=300, deadline=None)
@given(
    reqs=st.lists(any_requests, max_size=12),
    lead=st.binary(max_size=40),
    cut=st.integers(0, 80_000),
    max_length=st.integers(1, 6000),
    file_size=st.sampled_from([0, 4096, 1 << 30, 2**40 + 5000, 2**64 - 1]),
    max_count=st.integers(0, 20),
)
def test_scan_writes_takes_exactly_the_plain_writes_received_whole(
    impl: Impl,
    reqs: list[Req],
    lead: bytes,
    cut: int,
    max_length: int,
    file_size: int,
    max_count: int,
) -> None:
    stream = b"".join(req.encoded() for req in reqs)
    buf = bytearray(lead + stream + b"\0" * 7)  # bytes before and after the run
    end = len(lead) + min(cut, len(stream))
    got = impl.scan(buf, len(lead), end, max_length, file_size, max_count)
    assert got == expected_scan(reqs, min(cut, len(stream)), max_length, file_size, max_count)


@both
@settings(max_examples=300, deadline=None)
@given(
    reqs=st.lists(plain_writes, min_size=1, max_size=10),
    name=st.text(min_size=1, max_size=40).filter(lambda s: len(s.encode()) <= 4096),
    lsn=st.integers(1, 2**62),
    ts_ns=st.integers(-(2**63), 2**63 - 1),
)
def test_encode_writes_is_the_record_format_byte_for_byte(
    impl: Impl, reqs: list[Req], name: str, lsn: int, ts_ns: int
) -> None:
    batch = b"".join(req.encoded() for req in reqs) + b"tail: not part of the batch"
    records, replies = impl.encode(batch, len(reqs), name.encode(), lsn, ts_ns)
    want = b""
    for i, req in enumerate(reqs):
        head, data = encode_parts(Record.write(name, req.offset, req.data), lsn + i, ts_ns)
        want += head + data
    assert records == want
    assert replies == b"".join(proto.reply_header(req.handle) for req in reqs)
    back = decode_records(records)  # and it reads back, checksums checked
    assert [(r.lsn, r.offset, bytes(r.data)) for r in back] == [
        (lsn + i, req.offset, req.data) for i, req in enumerate(reqs)
    ]


@both
def test_encode_writes_refuses_what_is_not_a_plain_write(impl: Impl) -> None:
    good = Req(proto.REQUEST_MAGIC, 0, int(proto.Cmd.WRITE), 1, 0, b"x" * 10).encoded()
    fua = Req(proto.REQUEST_MAGIC, 1, int(proto.Cmd.WRITE), 1, 0, b"x" * 10).encoded()
    for batch, count in ((good + fua, 2), (good[:-1], 1), (good, 2)):
        with pytest.raises(ValueError, match="not a plain WRITE"):
            impl.encode(batch, count, b"vol", 1, 0)
    with pytest.raises(ValueError, match="volume name"):
        impl.encode(good, 1, b"", 1, 0)


@both
def test_pwrite_records_writes_every_payload_and_names_the_failures(
    impl: Impl, tmp_path: Path
) -> None:
    path = tmp_path / "vol"
    path.write_bytes(bytes(64 * KiB))
    reqs = [
        Req(proto.REQUEST_MAGIC, 0, 1, i, off, os.urandom(n))
        for i, (off, n) in enumerate([(0, 4096), (10_000, 17), (60 * KiB, 4 * KiB), (5, 3)])
    ]
    records, _ = impl.encode(b"".join(r.encoded() for r in reqs), len(reqs), b"vol", 9, 1)
    fd = os.open(path, os.O_RDWR)
    try:
        assert impl.pwrite(fd, records, len(reqs), 3) == []
    finally:
        os.close(fd)
    want = bytearray(64 * KiB)
    for req in reqs:
        want[req.offset : req.offset + len(req.data)] = req.data
    assert path.read_bytes() == want
    fd = os.open(path, os.O_RDONLY)  # every write fails: EBADF
    try:
        assert impl.pwrite(fd, records, len(reqs), 3) == [(i, errno.EBADF) for i in range(4)]
        with pytest.raises(ValueError, match="shorter than their count"):
            impl.pwrite(fd, records[:-1], len(reqs), 3)
    finally:
        os.close(fd)


# -- the server's batch path -----------------------------------------------------------


def burst(count: int, seed: int, size: int) -> list[tuple[int, int, bytes]]:
    """(handle, offset, data) of pipelined writes, overlapping on purpose."""
    rnd = random.Random(seed)
    out = []
    for i in range(count):
        length = rnd.choice([1, 512, 4096, 4096, 8192, 65536])
        offset = rnd.randrange(0, size - length)
        out.append((1000 + i, offset, rnd.randbytes(length)))
    return out


def send_writes(client: RawClient, writes: list[tuple[int, int, bytes]]) -> None:
    """Pipeline plain WRITEs (handle, offset, data) in one write: a run the batch path takes."""
    client.writer.write(
        b"".join(REQ.pack(proto.REQUEST_MAGIC, 0, 1, h, o, len(d)) + d for h, o, d in writes)
    )


async def write_errors(client: RawClient, count: int) -> dict[int, int]:
    """The next ``count`` replies' errors by handle."""
    errors: dict[int, int] = {}
    for _ in range(count):
        handle, error, _ = await asyncio.wait_for(client.read_reply(), 30)
        errors[handle] = error
    return errors


async def serve_burst(
    tmp_path: Path,
    writes: list[tuple[int, int, bytes]],
    *,
    gate: WriteGate | None = None,
    prepare: Callable[[JournaledFileExport], Any] | None = None,
    between: Callable[[RawClient], Any] | None = None,
    observed: list[Record | RecordHead] | None = None,
) -> tuple[dict[int, int], Journal, Path, bytes]:
    """Send ``writes`` to a fresh export in one go (then a FLUSH); the replies' errors by
    handle, the journal, the volume and the volume's bytes before."""
    disk = tmp_path / "disk.img"
    before = random.Random(1).randbytes(1 << 20)
    disk.write_bytes(before)
    journal = await Journal.open(tmp_path / "journal")
    journal.observer = observed.extend if observed is not None else None
    export = JournaledFileExport(journal, disk, "disk")
    if prepare is not None:
        prepare(export)
    server = NbdServer({"disk": export}, gate=gate)
    sock = str(tmp_path / "nbd.sock")
    await server.start_unix(sock)
    errors: dict[int, int] = {}
    try:
        client = await RawClient.open(sock, "disk")
        send_writes(client, writes)
        if between is not None:
            await between(client)
        errors.update(await write_errors(client, len(writes)))
        assert await client.request(proto.Cmd.FLUSH) == (0, b"")
        await client.disconnect()
    finally:
        await server.aclose()
        await export.aclose()
    return errors, journal, disk, before


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory for unix sockets (pytest's tmp_path can exceed 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="nbdn", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of each batch the export's batch path takes, in order."""
    taken: list[int] = []
    real = JournaledFileExport.write_batch

    def counted(self: JournaledFileExport, batch: bytes, count: int, payload: int) -> Any:
        taken.append(count)
        return real(self, batch, count, payload)

    monkeypatch.setattr(JournaledFileExport, "write_batch", counted)
    return taken


async def test_the_batch_path_journals_what_the_per_request_path_does(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch, batches: list[int]
) -> None:
    writes = burst(120, seed=7, size=1 << 20)
    results = []
    for batched in (True, False):
        monkeypatch.setattr(server_module, "NATIVE", batched)
        work = short_tmp / str(batched)
        work.mkdir()
        observed: list[Record | RecordHead] = []  # what the sender's touched extents see
        errors, journal, disk, before = await serve_burst(work, writes, observed=observed)
        assert errors == {h: 0 for h, _, _ in writes}
        records = await journal_records(journal)
        assert [(r.type, r.volume, r.offset, r.length) for r in observed] == [
            (r.type, r.volume, r.offset, r.length) for r in records
        ]
        copy = work / "copy.img"
        copy.write_bytes(before)
        await replay(journal, "disk", copy)
        assert copy.read_bytes() == disk.read_bytes()  # the journal gives the volume
        await journal.aclose()
        results.append(([(r.type, r.lsn, r.offset, bytes(r.data)) for r in records], disk))
    # requests did go through in batches (not the 64 KiB ones that arrive in pieces)...
    assert max(batches) > 1
    assert sum(batches) > len(writes) // 2
    assert results[0][0] == results[1][0]  # ...and journaled as one by one: same records
    assert results[0][1].read_bytes() == results[1][1].read_bytes()


async def test_a_failed_write_in_a_batch_is_reconciled_and_answered_with_its_error(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # each write overlaps the next: the failed one's truth is read after the later writes
    writes = [(h, 2048 * h, bytes([h]) * 4096) for h in range(1, 9)]
    real = backend.pwrite_records
    failed: list[int] = []

    def first_fails(fd: int, records: bytes, count: int, name_len: int) -> list[tuple[int, int]]:
        if failed:
            return real(fd, records, count, name_len)
        # the first batch's first write "fails" halfway (half of it reached the file),
        # the batch's other writes go through
        first = decode_records(records, verify=False)[0]
        offset, length = first.offset, first.length
        os.pwrite(fd, b"\xee" * (length // 2), offset)
        failed.append(offset)
        rest = HEADER_SIZE + name_len + length
        later = real(fd, records[rest:], count - 1, name_len)
        return [(0, errno.EIO)] + [(i + 1, e) for i, e in later]

    monkeypatch.setattr(backend, "pwrite_records", first_fails)
    errors, journal, disk, before = await serve_burst(short_tmp, writes)
    assert len(failed) == 1
    bad_handle = failed[0] // 2048
    assert errors == {h: (proto.Errno.EIO if h == bad_handle else 0) for h, _, _ in writes}
    copy = short_tmp / "copy.img"
    copy.write_bytes(before)
    await replay(journal, "disk", copy)
    assert copy.read_bytes() == disk.read_bytes()  # the truth was journaled after it
    records = await journal_records(journal)
    assert sum(r.type is RecordType.WRITE and r.offset == failed[0] for r in records) >= 2
    await journal.aclose()


@pytest.mark.parametrize("promoted", [False, True])
async def test_a_batch_that_ran_past_the_fence_deadline_waits_for_the_witness(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch, promoted: bool
) -> None:
    gate = WriteGate()
    fence = SourceFence("vm1", 30.0, gate=gate)
    fence.renewed(fence_clock())
    real = JournaledFileExport.write_batch
    ran: list[int] = []

    def frozen_midway(self: JournaledFileExport, batch: bytes, count: int, payload: int) -> Any:
        done = real(self, batch, count, payload)
        gate.deadline = fence_clock() - 1  # the process froze past the deadline meanwhile
        ran.append(count)
        return done

    monkeypatch.setattr(JournaledFileExport, "write_batch", frozen_midway)
    writes = [(h, 4096 * h, b"w" * 4096) for h in range(1, 5)]
    early: list[bool] = []

    async def held_then_end(client: RawClient) -> None:
        # no reply before the witness's word
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.reader.readexactly(proto.REPLY_SIZE), 0.5)
        early.append(gate.held)
        if promoted:
            fence.demoted()
        else:
            fence.renewed(fence_clock())

    errors, journal, _, _ = await serve_burst(short_tmp, writes, gate=gate, between=held_then_end)
    await journal.aclose()
    assert ran  # the batch path took them
    assert early == [True]
    want = proto.Errno.EIO if promoted else 0
    assert errors == {h: want for h, _, _ in writes}


def mixed_stream(seed: int, size: int) -> list[tuple[int, int, int, int, bytes]]:
    """(cmd, flags, offset, length, data) of a client's pipelined requests: mostly plain
    writes, with what must leave the batch path between them (FUA, reads, flushes, trims,
    zeroing, writes past the end, writes with unknown flags)."""
    rnd = random.Random(seed)
    out = []
    for _ in range(300):
        kind = rnd.random()
        length = rnd.choice([1, 512, 4096, 4096, 4096, 16384])
        offset = rnd.randrange(0, size - length)
        if kind < 0.7:
            out.append((1, 0, offset, length, rnd.randbytes(length)))
        elif kind < 0.75:
            out.append((1, 1, offset, length, rnd.randbytes(length)))  # FUA
        elif kind < 0.8:
            out.append((0, 0, offset, length, b""))  # READ
        elif kind < 0.83:
            out.append((3, 0, 0, 0, b""))  # FLUSH
        elif kind < 0.87:
            out.append((4, 0, offset, length, b""))  # TRIM
        elif kind < 0.91:
            out.append((6, rnd.choice([0, 2]), offset, length, b""))  # WRITE_ZEROES
        elif kind < 0.95:
            out.append((1, 0, size - 10, 4096, rnd.randbytes(4096)))  # past the end: ENOSPC
        else:
            out.append((1, 1 << 7, offset, length, rnd.randbytes(length)))  # EINVAL
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_a_mixed_stream_is_journaled_and_answered_as_request_by_request(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch, batches: list[int], seed: int
) -> None:
    size = 1 << 20
    stream = mixed_stream(seed, size)
    results = []
    for batched in (True, False):
        monkeypatch.setattr(server_module, "NATIVE", batched)
        work = short_tmp / str(batched)
        work.mkdir()
        disk = work / "disk.img"
        before = random.Random(seed).randbytes(size)
        disk.write_bytes(before)
        journal = await Journal.open(work / "journal")
        export = JournaledFileExport(journal, disk, "disk")
        server = NbdServer({"disk": export})
        sock = str(work / "nbd.sock")
        await server.start_unix(sock)
        replies: dict[int, tuple[int, bytes]] = {}
        try:
            client = await RawClient.open(sock, "disk")
            client.writer.write(
                b"".join(
                    REQ.pack(proto.REQUEST_MAGIC, flags, cmd, handle, offset, length) + data
                    for handle, (cmd, flags, offset, length, data) in enumerate(stream)
                )
            )
            reads = {h: r[3] for h, r in enumerate(stream) if r[0] == 0}
            for _ in stream:
                handle, error, data = await asyncio.wait_for(client.read_reply(reads), 30)
                replies[handle] = (error, data)
            await client.disconnect()
        finally:
            await server.aclose()
            await export.aclose()
        records = await journal_records(journal)
        copy = work / "copy.img"
        copy.write_bytes(before)
        await replay(journal, "disk", copy)
        assert copy.read_bytes() == disk.read_bytes()
        await journal.aclose()
        errors = {h: e for h, (e, _) in replies.items()}
        assert {e for e in errors.values()} >= {0, proto.Errno.ENOSPC, proto.Errno.EINVAL}
        fields = [(r.type, r.lsn, r.volume, r.offset, r.length, bytes(r.data)) for r in records]
        results.append((fields, replies, disk.read_bytes()))
    assert max(batches) > 1  # the batch path took runs of writes (the first pass)
    assert results[0][0] == results[1][0]  # the same records in the same order
    assert results[0][1] == results[1][1]  # the same replies, reads included
    assert results[0][2] == results[1][2]


@pytest.mark.parametrize("batched", [True, False])
async def test_a_journal_write_failing_inside_a_batch_fails_it_and_the_flush(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch, batched: bool
) -> None:
    """The journal's write-out (at 1 MiB staged) fails with EIO while a batch is staged:
    the writes from there on are answered EIO, never 0, and the FLUSH after them too (a
    write acknowledged before is not durable until a FLUSH says so). The batch path
    (which stages a whole batch, then falls back request by request) and the per-request
    path end the same way, though the batch path fails the whole batch it was staging."""
    monkeypatch.setattr(server_module, "NATIVE", batched)
    failed: list[int] = []

    def fails_once(fd: int, parts: Any, offset: int) -> int:
        if not failed:
            failed.append(journal.last_lsn)  # the record whose staging wrote them out
            raise OSError(errno.EIO, "Input/output error")
        return recovery.write_all(fd, parts, offset)

    monkeypatch.setattr("replicator.journal.journal.write_all", fails_once)
    writes = [(1000 + i, 4096 * (i % 200), bytes([i % 251]) * 4096) for i in range(400)]
    disk = short_tmp / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    journal = await Journal.open(short_tmp / "journal")
    export = JournaledFileExport(journal, disk, "disk")
    server = NbdServer({"disk": export})
    sock = str(short_tmp / "nbd.sock")
    await server.start_unix(sock)
    errors: dict[int, int] = {}
    try:
        client = await RawClient.open(sock, "disk")
        send_writes(client, writes)
        errors.update(await write_errors(client, len(writes)))
        flushed = await client.request(proto.Cmd.FLUSH)
        await client.disconnect()
    finally:
        await server.aclose()
        with pytest.raises(backend.NbdIOError, match="failed earlier"):
            await export.aclose()  # its last barrier cannot be journaled either: said so
        with contextlib.suppress(JournalError):
            await journal.aclose()
    assert failed  # the journal's write-out was reached, and failed, with records staged
    answers = [errors[h] for h, _, _ in writes]
    acknowledged = answers.index(proto.Errno.EIO)  # a prefix, then EIO for every other
    assert set(answers[:acknowledged]) == {0}
    assert set(answers[acknowledged:]) == {proto.Errno.EIO}, answers
    # one record a write, LSNs from 1: the write whose record was staged when the write-out
    # failed (and its batch's) went into a failed journal, and is not acknowledged
    assert acknowledged < failed[0], (acknowledged, failed)
    assert flushed[0] == proto.Errno.EIO  # nothing claimed durable
