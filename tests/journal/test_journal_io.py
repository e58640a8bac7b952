"""Write-path details: short writes, appends staged while a roll runs."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from pathlib import Path

import pytest

from replicator.journal import Journal, Record
from replicator.journal import durable as durable_mod
from replicator.journal.inspect import scan_journal
from replicator.journal.recovery import write_all as _write_all
from replicator.journal.segment import SEGMENT_SUFFIX, SPARE_SUFFIX
from tests.journal.helpers import check_record, read_all, segment_files, spare_files, write_for


@pytest.mark.parametrize("limit", [5, 333, 1 << 20])
def test_write_all_resumes_short_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int
) -> None:
    real = os.pwritev
    calls = 0

    def short(fd: int, buffers: list[bytes | memoryview], offset: int) -> int:
        nonlocal calls
        calls += 1
        assert len(buffers) <= 1024  # IOV_MAX
        out = bytearray()
        for b in buffers:
            out += bytes(b)[: limit - len(out)]
            if len(out) >= limit:
                break
        return real(fd, [bytes(out)], offset)

    parts = [bytes([i % 251]) * (i % 37) for i in range(3000)]  # some empty, >1024 of them
    monkeypatch.setattr(os, "pwritev", short)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        assert _write_all(fd, parts, 5) == sum(len(p) for p in parts)
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"\0" * 5 + b"".join(parts)
    assert calls >= 3


async def test_appends_go_on_while_a_roll_syncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = durable_mod.fdatasync_fd

    def slow(fd: int) -> None:
        time.sleep(0.02)
        real(fd)

    monkeypatch.setattr(durable_mod, "fdatasync_fd", slow)
    async with await Journal.open(tmp_path, segment_bytes=2048) as j:

        async def writer(first: int) -> None:
            for k in range(40):
                await j.append(write_for(first + k, 150))
                if k % 7 == 0:
                    await j.sync()

        await asyncio.gather(*(writer(1000 * w) for w in range(1, 5)))
        await j.sync()
        got = await read_all(j)
        assert len(got) == 160
        assert [r.lsn for r in got] == list(range(1, 161))
        assert j.segment_count > 10
    report = scan_journal(tmp_path)
    assert report.problem is None
    assert report.records == 160
    # each writer's records kept their own order
    for w in range(1, 5):
        mine = [r.offset // 512 for r in got if 1000 * w <= r.offset // 512 < 1000 * (w + 1)]
        assert mine == sorted(mine) and len(mine) == 40


async def test_records_survive_many_rolls_and_reopen(tmp_path: Path) -> None:
    async with await Journal.open(tmp_path, segment_bytes=512) as j:
        for lsn in range(1, 101):
            await j.append(write_for(lsn, 10 + lsn * 3))
    async with await Journal.open(tmp_path, segment_bytes=512) as j:
        got = await read_all(j)
        assert [r.lsn for r in got] == list(range(1, 101))
        for r in got:
            check_record(r)


async def test_durability_order_of_rolls_and_syncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write/fsync sequence itself: what a power cut at any point would leave.

    * sync() returns only after every byte written so far was fdatasynced after its write;
    * a new segment gets records only after the old one's seal was fdatasynced and the new
      one's header and directory entry were synced.
    """
    events: list[tuple[str, str, int]] = []
    real_pwritev, real_fdatasync, real_sync_dir = (
        os.pwritev,
        durable_mod.fdatasync_fd,
        durable_mod.sync_dir,
    )

    def name(fd: int) -> str:
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))

    def pwritev(fd: int, buffers: list[bytes | memoryview], offset: int) -> int:
        events.append(("write", name(fd), offset))
        return real_pwritev(fd, buffers, offset)

    def fdatasync(fd: int) -> None:
        events.append(("fdatasync", name(fd), 0))
        real_fdatasync(fd)

    def sync_dir(path: str | os.PathLike[str]) -> None:
        events.append(("sync_dir", os.fspath(path), 0))
        real_sync_dir(path)

    monkeypatch.setattr(os, "pwritev", pwritev)
    monkeypatch.setattr(durable_mod, "fdatasync_fd", fdatasync)
    monkeypatch.setattr(durable_mod, "sync_dir", sync_dir)
    async with await Journal.open(tmp_path, segment_bytes=1024) as j:
        for lsn in range(1, 41):
            await j.append(write_for(lsn, 150))
            if lsn % 3 == 0:
                await j.sync()
                last_write: dict[str, int] = {}
                last_sync: dict[str, int] = {}
                for i, (kind, file, _) in enumerate(events):
                    if kind == "write":
                        last_write[file] = i
                    elif kind == "fdatasync":
                        last_sync[file] = i
                for file, i in last_write.items():
                    assert last_sync.get(file, -1) > i, f"{file} written after its last sync"
        segments = sorted({file for kind, file, _ in events if file.endswith(".seg")})
    assert len(segments) > 5
    for old, new in itertools.pairwise(segments):
        seal = max(i for i, e in enumerate(events) if e[:2] == ("write", old))
        old_synced = next(
            i for i, e in enumerate(events) if i > seal and e[:2] == ("fdatasync", old)
        )
        header = next(i for i, e in enumerate(events) if e == ("write", new, 0))
        new_synced = next(
            i for i, e in enumerate(events) if i > header and e[:2] == ("fdatasync", new)
        )
        dir_synced = next(i for i, e in enumerate(events) if i > new_synced and e[0] == "sync_dir")
        records = [i for i, e in enumerate(events) if e[:2] == ("write", new) and e[2] > 0]
        assert seal < old_synced < header < new_synced < dir_synced
        assert not records or records[0] > dir_synced


async def test_trim_syncs_the_directory_after_each_unlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Oldest first, each deletion (or rename to a spare) durable before the next: a crash
    leaves a suffix."""
    async with await Journal.open(tmp_path, segment_bytes=1024) as j:
        for lsn in range(1, 41):
            await j.append(write_for(lsn, 150))
        await j.sync()
        before = [p.name for p in segment_files(tmp_path)]
        events: list[str] = []
        real_unlink, real_rename, real_sync_dir = os.unlink, os.rename, durable_mod.sync_dir

        def unlink(path: str | os.PathLike[str]) -> None:
            events.append(f"unlink {os.path.basename(path)}")
            real_unlink(path)

        def rename(path: str | os.PathLike[str], to: str | os.PathLike[str]) -> None:
            events.append(f"rename {os.path.basename(path)}")
            real_rename(path, to)

        def sync_dir(path: str | os.PathLike[str]) -> None:
            events.append("sync_dir")
            real_sync_dir(path)

        monkeypatch.setattr(os, "unlink", unlink)
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(durable_mod, "sync_dir", sync_dir)
        await j.trim(25)
        monkeypatch.undo()
        after = {p.name for p in segment_files(tmp_path)}
        spares = {p.name.removesuffix(SPARE_SUFFIX) for p in spare_files(tmp_path)}
        dropped = [n for n in before if n not in after]
        assert len(dropped) >= 2
        assert 0 < len(spares) < len(dropped)  # some kept for reuse, the rest deleted
        actions = [
            "rename" if n.removesuffix(SEGMENT_SUFFIX) in spares else "unlink" for n in dropped
        ]
        expected = [
            e for a, n in zip(actions, dropped, strict=True) for e in (f"{a} {n}", "sync_dir")
        ]
        assert events == expected


def test_atomic_write_sets_the_mode_before_the_bytes_are_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    modes: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        modes.append(os.fstat(fd).st_mode & 0o7777)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    durable_mod.atomic_write(tmp_path / "vm.xml", b"<domain/>", 0o640)
    assert modes[0] == 0o640  # the temp file's fsync covers the mode too
    assert (tmp_path / "vm.xml").stat().st_mode & 0o7777 == 0o640
    assert (tmp_path / "vm.xml").read_bytes() == b"<domain/>"


def test_makedirs_durable_refuses_a_file_in_the_way(tmp_path: Path) -> None:
    """A file where a folder (or one of its parents) should be is an error naming it, not
    a folder taken as made: callers would fail later with a less helpful error."""
    (tmp_path / "afile").write_bytes(b"")
    for path in (tmp_path / "afile", tmp_path / "afile" / "below"):
        with pytest.raises(NotADirectoryError) as err:
            durable_mod.makedirs_durable(path)
        assert err.value.filename == str(tmp_path / "afile")
    durable_mod.makedirs_durable(tmp_path / "a" / "b")  # the normal case still works
    durable_mod.makedirs_durable(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()


async def test_the_last_barrier_is_known_past_a_given_lsn_in_sealed_segments(
    tmp_path: Path,
) -> None:
    """``scan_journal(verify_sealed=False, verify_after=N)`` reads record by record the
    sealed segments holding records after N, so ``last_barrier`` knows every barrier after
    it (a receiver's status at rest: the epoch its start would apply)."""
    async with await Journal.open(tmp_path, segment_bytes=512) as j:
        for lsn in range(1, 41):
            record = Record.epoch(lsn) if lsn in (5, 22) else write_for(lsn, 100)
            await j.append(record)
        await j.sync()
    sealed = [s for s in scan_journal(tmp_path, verify_sealed=False).segments if s.sealed]
    holding = next(s for s in sealed if s.first_lsn <= 22 <= s.last_lsn)
    assert holding is not scan_journal(tmp_path).segments[-1]  # 22 is in a sealed one
    assert scan_journal(tmp_path, verify_sealed=False).last_barrier < 22  # not read
    assert scan_journal(tmp_path, verify_sealed=False, verify_after=21).last_barrier == 22
    assert scan_journal(tmp_path).last_barrier == 22
    quick = scan_journal(tmp_path, verify_sealed=False, verify_after=30)
    assert quick.last_barrier == 0  # nothing after 30 is a barrier; earlier ones not read
    assert sum(s.verified for s in quick.segments) < len(quick.segments)
