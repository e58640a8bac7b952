"""A disk's scan covers the size its RESIZE record and new manifest were made for."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from replicator.engine import scan
from replicator.engine.manifest import ExtentManifest, ManifestSet
from replicator.engine.scan import (
    BATCH_BYTES,
    CycleStopped,
    ScanStats,
    _disk_batches,
    append_waiting,
)
from replicator.engine.volumes import VolumeKind, VolumeSpec
from replicator.journal import Journal, JournalFull, Record
from replicator.journal.errors import JournalIOError
from replicator.journal.journal import MIN_SEGMENT_BYTES
from replicator.transport.messages import DIGEST_SIZE

EXT = 64 * 1024
MiB = 1024 * 1024


def test_a_disk_that_grew_since_its_size_was_taken_is_scanned_to_that_size(
    tmp_path: Path,
) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(3 * EXT))  # grew from 2 extents after the scan took its size
    spec = VolumeSpec(path, "disk.img", VolumeKind.DISK)
    new = ExtentManifest(EXT, 2 * EXT)
    records = [
        r
        for batch in _disk_batches(
            spec, ExtentManifest(EXT, 2 * EXT), new, ScanStats(), BATCH_BYTES
        )
        for r in batch
    ]
    assert len(new.digests) == 2 * DIGEST_SIZE
    assert max(r.offset + len(r.data) for r in records) == 2 * EXT


async def _scan_with_sync(
    tmp_path: Path, sync: Callable[[Callable[[], Awaitable[int]], int], Awaitable[int]]
) -> tuple[asyncio.Task[tuple[ManifestSet, ScanStats, int]], Journal, Callable[[], int]]:
    """scan_epoch of a 24 MiB random disk (every extent changed: 4 MiB batches) in a task,
    with ``journal.sync`` replaced by ``sync(real_sync, bytes appended so far)``."""
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(24 * 1024 * 1024))
    spec = VolumeSpec(path, "disk.img", VolumeKind.DISK)
    journal = await Journal.open(tmp_path / "journal")
    appended = 0

    async def append(records: list[Record]) -> int:
        nonlocal appended
        appended += sum(len(r.data) for r in records)
        return await journal.append_many(records)

    real_sync = journal.sync

    async def patched() -> int:
        return await sync(real_sync, appended)

    journal.sync = patched  # type: ignore[method-assign]
    task = asyncio.ensure_future(
        scan.scan_epoch([spec], journal, ManifestSet(0, EXT), append=append, sync_every=8 * MiB)
    )
    return task, journal, lambda: appended


async def test_the_scan_goes_on_while_its_journal_sync_runs(tmp_path: Path) -> None:
    """The shipper sends durable records only; a sync runs beside the scan from its first
    batch on, and the scan gets at most ``sync_every`` ahead of a running sync."""
    release = asyncio.Event()
    started_at: list[int] = []

    async def held_first(real_sync: Callable[[], Awaitable[int]], appended: int) -> int:
        started_at.append(appended)
        if len(started_at) == 1:
            await release.wait()
        return await real_sync()

    task, journal, appended = await _scan_with_sync(tmp_path, held_first)
    try:
        async with asyncio.timeout(20):
            while len(started_at) < 1 or appended() < started_at[0] + 8 * MiB:  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # the scan goes on while the first sync is held
        assert started_at == [BATCH_BYTES]  # from the first batch on, one at a time
        reached = appended()
        await asyncio.sleep(0.3)
        assert appended() == reached <= BATCH_BYTES + 8 * MiB + BATCH_BYTES  # then it waits
        assert not task.done()
        release.set()
        _, stats, epoch_lsn = await asyncio.wait_for(task, 20)
        assert stats.bytes_changed == 24 * MiB
        assert journal.durable_lsn >= epoch_lsn
        assert len(started_at) >= 2  # later parts of the epoch were synced as they came
    finally:
        release.set()
        await journal.aclose()


async def test_a_failed_journal_sync_ends_the_scan_with_its_error(tmp_path: Path) -> None:
    """Even a sync that ran beside the scan: the scan may not go on to its EPOCH."""
    calls = 0

    async def first_fails(real_sync: Callable[[], Awaitable[int]], appended: int) -> int:
        nonlocal calls
        calls += 1
        if calls > 1:
            return await real_sync()
        await asyncio.sleep(0.05)
        raise JournalIOError("fdatasync failed: EIO")

    task, journal, _ = await _scan_with_sync(tmp_path, first_fails)
    try:
        with pytest.raises(JournalIOError, match="EIO"):
            await asyncio.wait_for(task, 20)
    finally:
        await journal.aclose()


async def test_a_scan_cut_short_closes_its_walk_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The link lost mid-scan: the walk's generator is closed then (its reading threads
    joined, its file closed), never left for the collector to finalize in whatever thread
    it runs in (once a thread being started: the process hung)."""
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(24 * 1024 * 1024))
    spec = VolumeSpec(path, "disk.img", VolumeKind.DISK)
    closed: list[bool] = []
    real = scan._disk_batches

    def watched(*args: object) -> object:
        walk = real(*args)  # type: ignore[arg-type]
        try:
            yield from walk
        finally:
            closed.append(True)

    monkeypatch.setattr(scan, "_disk_batches", watched)

    async def lost(records: list[Record]) -> int:
        if any(r.data for r in records):  # the walk's first batch: the disk's RESIZE went
            raise ConnectionError("the link went")
        return await journal.append_many(records)

    journal = await Journal.open(tmp_path / "journal")
    try:
        with pytest.raises(ConnectionError):
            await scan.scan_epoch([spec], journal, ManifestSet(0, EXT), append=lost)
        assert closed == [True]
    finally:
        await journal.aclose()


async def test_a_full_journal_waits_for_room_until_a_stop_or_not_at_all(tmp_path: Path) -> None:
    """``append_waiting``: room frees the wait; a stop ends it (CycleStopped) with what
    was journaled kept; ``wait=False`` (a frozen scan) raises JournalFull instead."""
    journal = await Journal.open(
        tmp_path / "journal", segment_bytes=MIN_SEGMENT_BYTES, max_bytes=2 * MIN_SEGMENT_BYTES
    )
    freed, stop = asyncio.Event(), asyncio.Event()

    async def nothing() -> None:
        return None

    def fine() -> None:
        return None

    big = [Record.write("d", 0, b"x" * (MIN_SEGMENT_BYTES // 2))]
    try:
        with pytest.raises(JournalFull):
            for _ in range(8):
                await journal.append_many(big)
        kept = journal.last_lsn
        with pytest.raises(JournalFull):
            await append_waiting(journal, big, freed, fine, nothing, stop, wait=False)
        waiting = asyncio.ensure_future(append_waiting(journal, big, freed, fine, nothing, stop))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        freed.set()  # woken with still no room: waits again
        await asyncio.sleep(0.2)
        assert not waiting.done()
        stop.set()
        with pytest.raises(CycleStopped):
            await asyncio.wait_for(waiting, 5)
        assert journal.last_lsn == kept
        await journal.trim(kept + 1)
        stop.clear()
        assert await append_waiting(journal, big, freed, fine, nothing, stop) == kept + 1
    finally:
        await journal.aclose()
