"""A disk's scan covers the size its RESIZE record and new manifest were made for."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import structlog.testing

from replicator.engine import scan
from replicator.engine.manifest import CHUNK, UNKNOWN, ExtentManifest, ManifestSet
from replicator.engine.scan import (
    BATCH_BYTES,
    CycleStopped,
    ScanStats,
    _disk_batches,
    append_waiting,
)
from replicator.engine.volumes import (
    Holes,
    VolumeKind,
    VolumeSpec,
    hole_digests,
    iter_runs,
    zero_digest,
)
from replicator.journal import Journal, JournalFull, Record, RecordType
from replicator.journal.errors import JournalIOError
from replicator.journal.journal import MIN_SEGMENT_BYTES
from replicator.transport.messages import DIGEST_SIZE

EXT = 64 * 1024
MiB = 1024 * 1024
Zero = tuple[int, int]  # offset, length


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
    assert len(new.slice(0, new.count)) == 2 * DIGEST_SIZE
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


def _records(spec: VolumeSpec, basis: ExtentManifest, size: int) -> tuple[list[Record], bytes]:
    new = ExtentManifest(EXT, size)
    batches = _disk_batches(spec, basis, new, ScanStats(), BATCH_BYTES)
    return [r for batch in batches for r in batch], new.slice(0, new.count)


def _expected_zeros(basis: ExtentManifest, truth: ExtentManifest, holes: set[int]) -> list[Zero]:
    """The TRIM records a scan owes, found one extent at a time: every hole extent whose
    digest in the basis is not the one of zeros, adjacent ones merged."""
    zeros: list[Zero] = []
    for index in range(truth.count):
        if index not in holes or basis.get(index) == truth.get(index):
            continue
        off, length = index * EXT, min(EXT, truth.size - index * EXT)
        if zeros and sum(zeros[-1]) == off:
            zeros[-1] = (zeros[-1][0], zeros[-1][1] + length)
        else:
            zeros.append((off, length))
    return zeros


@pytest.mark.parametrize("size_mib", [64, 4608])  # threads only; helpers (and long holes)
def test_holes_give_trim_records_exactly_where_the_basis_did_not_know_zeros(
    tmp_path: Path, size_mib: int
) -> None:
    """Holes come as runs, not extents; what they owe is still found extent by extent:
    across the blocks and pieces they are compared in, at the short last extent, past the
    basis's end, and on a first sync (no basis)."""
    size = size_mib * MiB + 100
    data_at = [5, 1030 % (size // EXT), 70_000 % (size // EXT)]
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(size)
        for index in data_at:
            f.seek(index * EXT)
            f.write(os.urandom(EXT))
    spec = VolumeSpec(path, "disk.img", VolumeKind.DISK)
    truth = ExtentManifest.of_file(path, EXT)
    holes = set(range(truth.count)) - set(data_at)
    count = truth.count
    moved = [0, 1, scan.HOLE_BLOCK - 1, scan.HOLE_BLOCK, scan.HOLE_BLOCK + 1, count - 2, count - 1]
    if count > scan.HOLE_PIECE + 1:
        moved += [scan.HOLE_PIECE - 1, scan.HOLE_PIECE]
    stale = truth.copy()
    for index in moved:
        if index < count:  # past the end there is no digest to set
            stale.set(index, b"\x01" * DIGEST_SIZE)
    shorter = ExtentManifest(EXT, 1000 * EXT, truth.slice(0, 1000))
    for basis in (truth, stale, shorter, ExtentManifest(EXT, 0)):
        records, digests = _records(spec, basis, size)
        assert digests == truth.slice(0, truth.count)
        zeros = [(r.offset, r.length) for r in records if r.type is RecordType.TRIM]
        assert zeros == _expected_zeros(basis, truth, holes)
        assert not [r for r in records if r.type is RecordType.ZERO]  # nothing allocated
        written = {
            index
            for r in records
            if r.type is RecordType.WRITE
            for index in range(r.offset // EXT, (r.offset + r.length) // EXT)
        }
        assert written == {i for i in data_at if basis.get(i) != truth.get(i)}


def test_a_huge_sparse_image_is_walked_in_runs_of_holes(tmp_path: Path) -> None:
    """256 GiB with one extent of data: a few runs, one TRIM record on each side of it."""
    path = tmp_path / "huge.img"
    size = 256 << 30
    with path.open("wb") as f:
        f.truncate(size)
        f.seek(size // 2)
        f.write(os.urandom(EXT))
    fd = os.open(path, os.O_RDONLY)
    try:
        runs = list(iter_runs(fd, size, EXT))
    finally:
        os.close(fd)
    assert len(runs) == 3 and isinstance(runs[0], Holes) and isinstance(runs[2], Holes)
    spec = VolumeSpec(path, "huge.img", VolumeKind.DISK)
    records, _ = _records(spec, ExtentManifest(EXT, 0), size)
    assert [(r.type, r.offset, r.length) for r in records] == [
        (RecordType.TRIM, 0, size // 2),
        (RecordType.WRITE, size // 2, EXT),
        (RecordType.TRIM, size // 2 + EXT, size // 2 - EXT),
    ]


def _thick_and_thin(path: Path) -> int:
    """64 extents: data in 0, zeros written in 8-11, fallocated (unwritten: a hole to
    SEEK_DATA) 16-23, holes elsewhere."""
    size = 64 * EXT
    with path.open("wb") as f:
        f.truncate(size)
        f.write(os.urandom(EXT))
        f.seek(8 * EXT)
        f.write(bytes(4 * EXT))
        f.flush()
        os.posix_fallocate(f.fileno(), 16 * EXT, 8 * EXT)
    return size


def test_zeros_go_as_the_source_holds_them_allocated_or_a_hole(tmp_path: Path) -> None:
    """Where the basis knew other content: zeros the file holds allocated (written, or
    fallocated, which SEEK_DATA calls a hole) as ZERO, holes as TRIM (journal/records.py)."""
    path = tmp_path / "disk.img"
    size = _thick_and_thin(path)
    spec = VolumeSpec(path, "disk.img", VolumeKind.DISK)
    stale = ExtentManifest(EXT, size, bytearray(b"\x01" * DIGEST_SIZE * 64))
    records, _ = _records(spec, stale, size)
    assert [(r.type, r.offset // EXT, r.length // EXT) for r in records] == [
        (RecordType.WRITE, 0, 1),
        (RecordType.TRIM, 1, 7),
        (RecordType.ZERO, 8, 4),
        (RecordType.TRIM, 12, 4),
        (RecordType.ZERO, 16, 8),
        (RecordType.TRIM, 24, 40),
    ]


def test_a_first_sync_zeroes_what_the_source_holds_allocated(tmp_path: Path) -> None:
    """On a first sync the basis says zeros (the RESIZE's), and the RESIZE leaves the
    replica a hole: zeros are no change of content, but allocated ones go as ZERO."""
    path = tmp_path / "disk.img"
    size = _thick_and_thin(path)
    spec = VolumeSpec(path, "disk.img", VolumeKind.DISK)
    basis = ExtentManifest(EXT, 0)
    scan.resize_basis(basis, size)
    new = ExtentManifest(EXT, size)
    batches = _disk_batches(spec, basis, new, ScanStats(), BATCH_BYTES, grown_from=0)
    records = [r for batch in batches for r in batch]
    assert [(r.type, r.offset // EXT, r.length // EXT) for r in records] == [
        (RecordType.WRITE, 0, 1),
        (RecordType.ZERO, 8, 4),
        (RecordType.ZERO, 16, 8),
    ]
    grown = _disk_batches(
        spec, basis, ExtentManifest(EXT, size), ScanStats(), BATCH_BYTES, 12 * EXT
    )
    assert [(r.type, r.offset // EXT) for batch in grown for r in batch] == [
        (RecordType.WRITE, 0),
        (RecordType.ZERO, 16),  # below where the replica grew, zeros are as the basis says
    ]


@pytest.mark.parametrize("old_size", [0, EXT, 3 * EXT + 17, 70_000 * EXT + 1])
def test_a_grown_basis_knows_the_new_extents_as_zeros(old_size: int) -> None:
    basis = ExtentManifest(EXT, old_size, bytearray(b"\x07" * DIGEST_SIZE * -(-old_size // EXT)))
    new_size = 140_000 * EXT + 5
    scan.resize_basis(basis, new_size)
    partial = old_size % EXT != 0
    for index in range(basis.count):
        length = min(EXT, new_size - index * EXT)
        if index * EXT < old_size and not (partial and index == old_size // EXT):
            assert basis.get(index) == b"\x07" * DIGEST_SIZE
        elif partial and index == old_size // EXT:
            assert basis.get(index) == UNKNOWN  # the old short extent grew: unknown
        else:
            assert basis.get(index) == zero_digest(length), index


@pytest.mark.parametrize("change", ["shrank", "grew"])
async def test_a_disk_resized_mid_scan_is_said_and_scanned_again_when_it_shrank(
    tmp_path: Path, change: str
) -> None:
    """Cut shorter while read, the part past its new end read as zeros and the point kept
    the old size (a state it never held): scanned again at the new size. Grown, the point
    holds it up to its old size, as read; said, and left to the next scan."""
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(24 * MiB))
    spec = VolumeSpec(path, "disk.img", VolumeKind.DISK)
    journal = await Journal.open(tmp_path / "journal")
    records: list[Record] = []

    async def append(batch: list[Record]) -> int:
        if not any(r.type is RecordType.WRITE for r in records):  # the first data batch
            os.truncate(path, 8 * MiB if change == "shrank" else 32 * MiB)
        records.extend(batch)
        return await journal.append_many(batch)

    try:
        with structlog.testing.capture_logs() as logs:
            manifests, stats, _ = await scan.scan_epoch(
                [spec], journal, ManifestSet(0, EXT), append=append
            )
    finally:
        await journal.aclose()
    said = [e for e in logs if e["event"] == "sender.volume_resized_mid_scan"]
    assert len(said) == 1, logs
    assert said[0]["size_at_start"] == 24 * MiB and said[0]["path"] == str(path)
    resizes = [r.length for r in records if r.type is RecordType.RESIZE]
    if change == "shrank":
        assert said[0]["log_level"] == "warning" and "scanning it again" in said[0]["action"]
        assert resizes == [0, 24 * MiB, 8 * MiB]  # the replica is cut as the source was
        assert manifests.disks["disk.img"].size == 8 * MiB
    else:
        assert said[0]["log_level"] == "warning" and "it grew" in said[0]["action"]
        assert resizes == [0, 24 * MiB]
        assert manifests.disks["disk.img"].size == 24 * MiB  # the next scan sees the rest
    assert stats.resized == ["disk.img"]


def test_holes_the_basis_knows_as_holes_are_compared_a_chunk_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A no-change scan of a 1 TiB sparse image: the basis holds its holes as the shared
    chunk of hole digests, so they are the same at once. They were made (16 bytes per
    extent: 256 MiB per TiB) and compared with the basis's, a MiB at a time, every cycle."""
    size = (1 << 40) + 100  # the short last extent: its digest is not in a shared chunk
    path = tmp_path / "sparse.img"
    with path.open("wb") as f:
        f.truncate(size)
        f.seek(5 << 30)
        f.write(os.urandom(EXT))
    basis = ExtentManifest.of_file(path, EXT)
    made = [0]

    def counted(size: int, extent_size: int, first: int, count: int) -> bytes:
        made[0] += max(0, count)
        return hole_digests(size, extent_size, first, count)

    for module in ("replicator.engine.scan", "replicator.engine.manifest"):
        monkeypatch.setattr(f"{module}.hole_digests", counted, raising=False)
    spec = VolumeSpec(path, "sparse.img", VolumeKind.DISK)
    records, _ = _records(spec, basis, size)
    assert records == []
    assert made[0] < 3 * CHUNK  # the chunks at the data extent and the end only
