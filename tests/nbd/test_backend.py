"""JournaledFileExport: journal-before-write, growth, durability, failure reconciliation."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import shutil
from pathlib import Path

import pytest

from replicator.engine import volumes
from replicator.engine.errors import ConfigError
from replicator.engine.nbd import backend
from replicator.engine.nbd.backend import JournaledFileExport, NbdIOError
from replicator.engine.nbd.images import ImageError
from replicator.engine.nbd.proto import Errno
from replicator.journal import Journal, Record, RecordType
from tests.nbd.helpers import journal_records, replay
from tests.tools import allocated

KiB = 1024


def make_file(path: Path, size: int, fill: int = 0) -> Path:
    path.write_bytes(bytes([fill]) * size)
    return path


def types(records: list[Record]) -> list[str]:
    return [r.type.name for r in records]


class SyncCounter:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = backend.fdatasync_async

        async def counting(fd: int) -> None:
            self.calls += 1
            await real(fd)

        monkeypatch.setattr(backend, "fdatasync_async", counting)


async def test_write_then_read_and_exactly_one_record(tmp_path: Path, journal: Journal) -> None:
    path = make_file(tmp_path / "disk.img", 64 * KiB)
    exp = JournaledFileExport(journal, path, "disk0")
    assert (exp.name, exp.size) == ("disk.img", 64 * KiB)
    await exp.write(4096, b"\xab" * 8192, fua=False)
    assert await exp.read(4096, 8192) == b"\xab" * 8192
    assert path.read_bytes()[4096 : 4096 + 8192] == b"\xab" * 8192
    (rec,) = await journal_records(journal)
    assert (rec.type, rec.volume, rec.offset, rec.data) == (
        RecordType.WRITE,
        "disk0",
        4096,
        b"\xab" * 8192,
    )
    await exp.aclose()


async def test_growth_reads_zeros_and_journals_resize_first(
    tmp_path: Path, journal: Journal
) -> None:
    path = make_file(tmp_path / "grow.img", 4 * KiB, fill=1)
    exp = JournaledFileExport(journal, path, "g", export_size=1024 * KiB)
    assert exp.size == 1024 * KiB and exp.file_size == 4 * KiB
    assert await exp.read(2 * KiB, 4 * KiB) == b"\x01" * 2048 + bytes(2048)
    assert await exp.read(512 * KiB, 4 * KiB) == bytes(4096)
    await exp.write(100 * KiB, b"z" * 1000, fua=False)
    assert path.stat().st_size == 100 * KiB + 1000  # extended to the write, not padded
    # zeroing and trimming past the end are clipped and never extend the file
    await exp.write_zeroes(100 * KiB + 500, 64 * KiB, fua=False, may_trim=False)
    await exp.trim(200 * KiB, 4 * KiB, fua=False)
    assert path.stat().st_size == 100 * KiB + 1000
    records = await journal_records(journal)
    assert types(records) == ["RESIZE", "WRITE", "ZERO"]
    assert records[0].size == 100 * KiB + 1000
    assert (records[2].offset, records[2].length) == (100 * KiB + 500, 500)
    assert await exp.read(100 * KiB, 1000) == b"z" * 500 + bytes(500)
    await exp.aclose()


async def test_flush_appends_one_barrier_and_syncs_everything(
    tmp_path: Path, journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = SyncCounter(monkeypatch)
    exp = JournaledFileExport(journal, make_file(tmp_path / "d.img", 64 * KiB), "d")
    await exp.write(0, b"a" * 512, fua=False)
    assert journal.durable_lsn < journal.last_lsn
    await exp.flush()
    assert journal.durable_lsn == journal.last_lsn
    assert counter.calls == 1
    await exp.flush()  # nothing new: no second barrier, no second fdatasync
    assert counter.calls == 1
    assert types(await journal_records(journal)) == ["WRITE", "FLUSH"]
    await exp.aclose()


async def test_concurrent_flushes_share_one_sync(
    tmp_path: Path, journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = SyncCounter(monkeypatch)
    exp = JournaledFileExport(journal, make_file(tmp_path / "d.img", 1024 * KiB), "d")
    await asyncio.gather(*(exp.write(i * 4096, b"w" * 4096, fua=False) for i in range(50)))
    await asyncio.gather(*(exp.flush() for _ in range(50)))
    assert counter.calls <= 2
    assert types(await journal_records(journal)).count("FLUSH") == 1
    await exp.aclose()


async def test_fua_write_is_durable_on_return(
    tmp_path: Path, journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = SyncCounter(monkeypatch)
    exp = JournaledFileExport(journal, make_file(tmp_path / "d.img", 64 * KiB), "d")
    await exp.write(0, b"f" * 4096, fua=True)
    assert journal.durable_lsn == journal.last_lsn == 1
    assert counter.calls == 1
    assert types(await journal_records(journal)) == ["WRITE"]  # FUA is not a barrier
    await exp.aclose()


async def test_concurrent_overlapping_writes_keep_journal_and_file_in_the_same_order(
    tmp_path: Path, journal: Journal
) -> None:
    size = 256 * KiB
    path = make_file(tmp_path / "d.img", size)
    original = tmp_path / "original.img"
    shutil.copyfile(path, original)
    # thread_min=1 sends every write through a worker thread, maximising overlap
    exp = JournaledFileExport(journal, path, "d", thread_min=1)
    rng = random.Random(7)

    async def one(i: int) -> None:
        offset = rng.randrange(0, size - 8192)
        length = rng.randrange(1, 8192)
        if i % 7 == 0:
            await exp.write_zeroes(offset, length, fua=False, may_trim=i % 2 == 0)
        else:
            await exp.write(offset, bytes([i % 251]) * length, fua=i % 5 == 0)

    await asyncio.gather(*(one(i) for i in range(300)))
    await exp.flush()
    assert await exp.read(0, size) == path.read_bytes()  # a read through the thread too
    await replay(journal, "d", original)
    assert original.read_bytes() == path.read_bytes()
    await exp.aclose()


async def test_two_volumes_share_one_order_and_one_barrier(
    tmp_path: Path, journal: Journal
) -> None:
    a = JournaledFileExport(journal, make_file(tmp_path / "a.img", 64 * KiB), "a")
    b = JournaledFileExport(journal, make_file(tmp_path / "b.img", 64 * KiB), "b")
    await a.write(0, b"1" * 512, fua=False)
    await b.write(0, b"2" * 512, fua=False)
    await b.flush()
    await a.flush()  # already covered by b's barrier: no new record
    records = await journal_records(journal)
    assert [(r.type.name, r.volume) for r in records] == [
        ("WRITE", "a"),
        ("WRITE", "b"),
        ("FLUSH", ""),
    ]
    await a.aclose()
    await b.aclose()


async def test_trim_and_zero_read_back_as_zeros_with_and_without_fallocate(
    tmp_path: Path, journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_file(tmp_path / "d.img", 256 * KiB, fill=0xFF)
    exp = JournaledFileExport(journal, path, "d")
    await exp.trim(4096, 8192, fua=False)
    await exp.write_zeroes(65536, 3000, fua=True, may_trim=False)

    def no_fallocate(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "not here")

    monkeypatch.setattr(volumes, "fallocate", no_fallocate)
    await exp.trim(131072, 100_000, fua=False)
    await exp.write_zeroes(10, 20, fua=False, may_trim=True)
    data = path.read_bytes()
    for offset, length in ((4096, 8192), (65536, 3000), (131072, 100_000), (10, 20)):
        assert data[offset : offset + length] == bytes(length)
    assert data[30:4096] == b"\xff" * (4096 - 30)
    # a punch refused is zeros written: its TRIM is followed by a ZERO saying so, and
    # later ones are journaled as ZERO at once (the file keeps those blocks)
    records = await journal_records(journal)
    assert types(records) == ["TRIM", "ZERO", "TRIM", "ZERO", "ZERO"]
    assert [(r.offset, r.length) for r in records[2:4]] == [(131072, 100_000)] * 2
    await exp.aclose()


async def test_zeroes_journal_the_allocation_they_leave(tmp_path: Path, journal: Journal) -> None:
    """WRITE_ZEROES with NO_HOLE keeps the range allocated and journals ZERO; one that may
    trim, and TRIM, punch it and journal TRIM (journal/records.py). A range read back
    (resync, ``extent_records``) says the same of it."""
    path = make_file(tmp_path / "d.img", 1024 * KiB, fill=0xEE)
    exp = JournaledFileExport(journal, path, "d")
    await exp.write_zeroes(0, 256 * KiB, fua=False, may_trim=False)
    await exp.write_zeroes(256 * KiB, 256 * KiB, fua=False, may_trim=True)
    await exp.trim(512 * KiB, 256 * KiB, fua=False)
    assert types(await journal_records(journal)) == ["ZERO", "TRIM", "TRIM"]
    assert allocated(path) == [(0, 256 * KiB), (768 * KiB, 1024 * KiB)]
    back = [(r.type.name, r.offset // KiB, r.length // KiB) for r in exp.extent_records(0, 1 << 20)]
    assert back == [("ZERO", k, 64) for k in range(0, 256, 64)] + [("TRIM", 256, 512)] + [
        ("WRITE", k, 64) for k in range(768, 1024, 64)
    ]
    await exp.aclose()


async def test_failed_partial_write_is_reconciled_in_the_journal(
    tmp_path: Path, journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_file(tmp_path / "d.img", 16 * KiB, fill=7)
    original = tmp_path / "orig.img"
    shutil.copyfile(path, original)
    exp = JournaledFileExport(journal, path, "d", export_size=1024 * KiB)
    real = backend.pwrite_all

    def half_then_enospc(fd: int, data: bytes | memoryview, offset: int) -> None:
        real(fd, memoryview(data)[: len(data) // 2], offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(backend, "pwrite_all", half_then_enospc)
    with pytest.raises(NbdIOError) as err:
        await exp.write(8 * KiB, b"n" * 32 * KiB, fua=False)  # grows the file, fails halfway
    assert err.value.errno == Errno.ENOSPC
    monkeypatch.setattr(backend, "pwrite_all", real)
    # the failed write left 16 KiB written from 8 KiB: the file is 24 KiB now
    assert path.stat().st_size == 24 * KiB
    await exp.write(0, b"after" * 100, fua=False)  # the export still works
    await exp.flush()
    records = await journal_records(journal)
    assert types(records) == ["RESIZE", "WRITE", "RESIZE", "WRITE", "WRITE", "FLUSH"]
    await replay(journal, "d", original)
    assert original.read_bytes() == path.read_bytes()
    await exp.aclose()


async def test_unrecoverable_failure_stops_changes_but_not_reads(
    tmp_path: Path, journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_file(tmp_path / "d.img", 16 * KiB, fill=3)
    exp = JournaledFileExport(journal, path, "d")

    def eio(*args: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(backend, "pwrite_all", eio)
    monkeypatch.setattr(os, "pread", eio)
    with pytest.raises(NbdIOError) as err:
        await exp.write(0, b"x" * 512, fua=False)
    assert err.value.errno == Errno.EIO
    monkeypatch.undo()
    for op in (
        exp.write(0, b"y", fua=False),
        exp.trim(0, 512, fua=False),
        exp.flush(),
    ):
        with pytest.raises(NbdIOError, match="full resync is needed") as err:
            await op
        assert err.value.errno == Errno.EIO
    assert await exp.read(0, 4) == b"\x03" * 4
    await exp.aclose()


async def test_journal_full_refuses_the_write_and_leaves_the_file_alone(
    tmp_path: Path,
) -> None:
    journal = await Journal.open(tmp_path / "j", segment_bytes=4096, max_bytes=8192)
    path = make_file(tmp_path / "d.img", 64 * KiB)
    exp = JournaledFileExport(journal, path, "d")
    with pytest.raises(NbdIOError) as err:
        for i in range(64):
            await exp.write(i * 1024, b"q" * 1024, fua=False)
    assert err.value.errno == Errno.ENOSPC
    records = await journal_records(journal)
    written = sum(r.length for r in records)
    assert path.read_bytes().count(b"q") == written  # only what the journal holds
    await exp.aclose()
    await journal.aclose()


async def test_aclose_waits_for_running_requests_and_refuses_new_ones(
    tmp_path: Path, journal: Journal
) -> None:
    path = make_file(tmp_path / "d.img", 4096 * KiB)
    exp = JournaledFileExport(journal, path, "d", thread_min=1)
    writes = [
        asyncio.ensure_future(exp.write(i * 1024 * KiB, b"b" * 1024 * KiB, fua=False))
        for i in range(4)
    ]
    await asyncio.sleep(0)
    await exp.aclose()
    await asyncio.gather(*writes)
    assert path.read_bytes() == b"b" * 4096 * KiB
    with pytest.raises(NbdIOError) as err:
        await exp.read(0, 1)
    assert err.value.errno == Errno.ESHUTDOWN
    await exp.aclose()  # idempotent
    assert types(await journal_records(journal)) == ["WRITE"] * 4 + ["FLUSH"]


async def test_vhdx_is_refused_at_export_creation(tmp_path: Path, journal: Journal) -> None:
    path = tmp_path / "d.vhdx"
    path.write_bytes(b"vhdxfile" + bytes(4096))
    with pytest.raises(ImageError, match="--capture fuse"):
        JournaledFileExport(journal, path, "d")


async def test_unopenable_volume_is_a_config_error(tmp_path: Path, journal: Journal) -> None:
    with pytest.raises(ConfigError, match="cannot open the volume"):
        JournaledFileExport(journal, tmp_path / "missing.img", "m")
