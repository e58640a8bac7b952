"""The filter's handlers called directly, without a mount: the journal-first policy.

pyfuse3 allows one mount per process, so the mount tests run the filter in a child; the
rules that need a failure injected at a precise point (a real change failing after its
record was journaled, a journal filling up) are easier to reach in-process, by calling
the handlers the way pyfuse3 would.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
from structlog.testing import capture_logs

from replicator.engine.fuse.filter import JournalingFilter
from replicator.journal import Journal, Record, RecordType
from tests.fuse.helpers import replay, tree

KiB = 1024
MiB = 1024 * KiB
ROOT = pyfuse3.InodeT(pyfuse3.ROOT_INODE)
CTX = pyfuse3.RequestContext()


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    j = await Journal.open(tmp_path / "journal")
    yield j
    await j.aclose()


def make_src(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    return src


async def records_of(journal: Journal, start: int | None = None) -> list[Record]:
    await journal.sync()
    first = journal.first_lsn if start is None else start
    return [r async for r in journal.read_from(first)]


def types(records: list[Record]) -> list[str]:
    return [r.type.name for r in records]


async def create(filt: JournalingFilter, name: str) -> pyfuse3.FileHandleT:
    info, _ = await filt.create(ROOT, name.encode(), 0o644, os.O_RDWR, CTX)
    return info.fh


def allowed(filt: JournalingFilter) -> bool:
    """Read afresh (a property the resync flips; mypy would keep the narrowed value)."""
    return filt.barriers_allowed


async def fuse_errno(call: Awaitable[Any]) -> int:
    with pytest.raises(pyfuse3.FUSEError) as err:
        await call
    return err.value.errno


async def test_barrier_only_after_a_change_and_fsync_makes_it_durable(
    tmp_path: Path, journal: Journal
) -> None:
    filt = JournalingFilter(make_src(tmp_path), journal)
    fh = await create(filt, "disk.img")
    assert await filt.write(fh, 0, b"a" * 4096) == 4096
    await filt.fsync(fh, True)
    assert journal.durable_lsn == journal.last_lsn
    await filt.fsync(fh, True)  # nothing changed since: no second barrier
    await filt.flush(fh)  # close of a file synced since its last change: no barrier
    await filt.write(fh, 4096, b"b" * 10)
    await filt.flush(fh)  # close of a changed file: barrier and sync
    await filt.release(fh)
    assert types(await records_of(journal)) == ["CREATE", "WRITE", "FLUSH", "WRITE", "FLUSH"]
    assert filt.stats.records == 5 and filt.stats.syncs == 3
    await filt.aclose()
    assert types(await records_of(journal))[-1] == "FLUSH"  # nothing new: none added


async def test_failed_write_is_reconciled_and_the_filter_stays_healthy(
    tmp_path: Path, journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_src(tmp_path)
    (src / "d.img").write_bytes(b"\x07" * 16 * KiB)
    before = tmp_path / "before"
    shutil.copytree(src, before)
    filt = JournalingFilter(src, journal)
    entry = await filt.lookup(ROOT, b"d.img", CTX)
    info = await filt.open(entry.st_ino, os.O_RDWR, CTX)
    real = os.pwrite

    def half_then_enospc(fd: int, data: Any, offset: int) -> int:
        real(fd, memoryview(data)[: len(data) // 2], offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", half_then_enospc)
    assert await fuse_errno(filt.write(info.fh, 8 * KiB, b"n" * 32 * KiB)) == errno.ENOSPC
    monkeypatch.undo()
    assert filt.diverged is None
    await filt.write(info.fh, 0, b"after")
    await filt.fsync(info.fh, False)
    await filt.release(info.fh)
    records = await records_of(journal)
    # the failed WRITE, then what the file really holds: its size, the range's bytes
    assert types(records) == ["WRITE", "RESIZE", "WRITE", "WRITE", "FLUSH"]
    assert records[1].size == 24 * KiB
    replayed = replay(before, records, tmp_path / "replayed")
    assert tree(replayed) == tree(src)
    await filt.aclose()


async def test_a_change_that_cannot_be_undone_diverges_and_refuses_further_changes(
    tmp_path: Path, journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_src(tmp_path)
    filt = JournalingFilter(src, journal)
    fh = await create(filt, "a")
    await filt.write(fh, 0, b"data")
    real_unlink = os.unlink

    def failing_unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        if str(path).endswith("/a"):
            raise OSError(errno.EIO, "Input/output error")
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", failing_unlink)
    with capture_logs() as logs:
        assert await fuse_errno(filt.unlink(ROOT, b"a", CTX)) == errno.EIO
    monkeypatch.undo()
    diverged = [e for e in logs if e["event"] == "fuse.replica_diverged"]
    assert len(diverged) == 1 and "unlink a" in diverged[0]["reason"]
    assert filt.diverged is not None and "unlink a" in filt.diverged
    assert types(await records_of(journal)) == ["CREATE", "WRITE", "UNLINK"]
    # every further change is refused, before anything is journaled; reads still work
    last = journal.last_lsn
    assert await fuse_errno(filt.write(fh, 0, b"more")) == errno.EIO
    assert await fuse_errno(filt.mkdir(ROOT, b"d", 0o755, CTX)) == errno.EIO
    assert await fuse_errno(filt.fsync(fh, True)) == errno.EIO
    assert await filt.read(fh, 0, 4) == b"data"
    assert journal.last_lsn == last
    assert not (src / "d").exists()
    await filt.release(fh)
    await filt.aclose()  # no barrier after a divergence
    assert journal.last_lsn == last


async def test_failed_create_is_undone_in_the_journal(
    tmp_path: Path, journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_src(tmp_path)
    filt = JournalingFilter(src, journal)
    real_open = os.open

    def failing_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_CREAT:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing_open)
    assert await fuse_errno(filt.create(ROOT, b"f", 0o644, os.O_RDWR, CTX)) == errno.EDQUOT
    monkeypatch.undo()
    assert types(await records_of(journal)) == ["CREATE", "UNLINK"]
    assert filt.diverged is None
    await filt.aclose()


async def test_full_journal_without_overflow_refuses_and_changes_nothing(
    tmp_path: Path,
) -> None:
    src = make_src(tmp_path)
    journal = await Journal.open(tmp_path / "j", segment_bytes=4096, max_bytes=8192)
    filt = JournalingFilter(src, journal)
    try:
        fh = await create(filt, "f")
        with capture_logs() as logs:
            code = 0
            for i in range(64):
                try:
                    await filt.write(fh, i * KiB, b"q" * KiB)
                except pyfuse3.FUSEError as exc:
                    code = exc.errno
                    break
        assert code == errno.ENOSPC
        assert any(e["event"] == "fuse.journal_full" for e in logs)
        written = sum(r.length for r in await records_of(journal) if r.type is RecordType.WRITE)
        assert (src / "f").read_bytes().count(b"q") == written  # only what is journaled
        await filt.release(fh)
    finally:
        await filt.aclose()
        await journal.aclose()


async def test_full_journal_with_overflow_keeps_serving_then_resyncs_one_epoch(
    tmp_path: Path,
) -> None:
    src = make_src(tmp_path)
    (src / "old").write_bytes(b"o" * 100 * KiB)
    before = tmp_path / "before"
    shutil.copytree(src, before)
    journal = await Journal.open(tmp_path / "j", segment_bytes=MiB, max_bytes=4 * MiB)
    filt = JournalingFilter(src, journal, overflow=True)
    try:
        fh = await create(filt, "disk.img")
        with capture_logs() as logs:
            for i in range(96):  # 6 MiB through a 4 MiB journal
                await filt.write(fh, i * 64 * KiB, os.urandom(64 * KiB))
                await filt.fsync(fh, True)
        assert any(e["event"] == "fuse.journal_overflow" for e in logs)
        assert not allowed(filt)
        # changes of every kind go on, unjournaled
        await filt.rename(ROOT, b"old", ROOT, b"new", 0, CTX)
        await filt.mkdir(ROOT, b"dir", 0o750, CTX)
        last = journal.last_lsn
        await filt.fsync(fh, True)
        assert journal.last_lsn == last  # no barrier while changes are untracked
        # the receiver took everything so far: the replica is at the last barrier
        journaled = await records_of(journal)
        cut = max(i for i, r in enumerate(journaled) if r.is_barrier)
        replica = replay(before, journaled[: cut + 1], tmp_path / "replica")
        await journal.trim(journal.last_lsn + 1)

        async def no_room() -> bool:
            return False

        start = journal.last_lsn + 1
        assert await filt.resync(no_room) > 0
        assert allowed(filt)
        epoch = await records_of(journal, start)
        assert epoch[-1].is_barrier and sum(r.is_barrier for r in epoch) == 1
        await filt.release(fh)
        replica = replay(replica, epoch, tmp_path / "replica2")
        assert tree(replica) == tree(src)
    finally:
        await filt.aclose()
        await journal.aclose()
