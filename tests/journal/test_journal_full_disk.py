"""A journal whose file system fills up, on a real (small, loop-mounted) ext4.

Spares (trimmed segments kept for reuse: ``journal/journal.py``) hold blocks a deleted
segment would give back. Without a cap (the receiver's journal has none) the file system's
free space is the limit: a trim keeps a spare only while two segments more still fit, and a
write that meets a full file system gives the spares' blocks back, so the reopen that
follows finds the room instead of meeting "full" again, held by its own spare files.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator.journal import Journal
from replicator.journal.errors import JournalIOError
from replicator.journal.segment import SPARE_SUFFIX
from tests.crashdisk import CrashDisk
from tests.journal.helpers import write_for

MiB = 1 << 20
SEG = 4 * MiB
RECORD = 64 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = CrashDisk(tmp_path / "disk.img", tmp_path / "disk")
    disk.make(64 * MiB)
    try:
        yield disk.mountpoint
    finally:
        disk.unmount()


def _fill_up(path: Path, leave: int) -> None:
    """A file that takes the file system's free space but ``leave`` bytes."""
    fs = os.statvfs(path.parent)
    size = fs.f_bavail * fs.f_frsize - leave
    with path.open("wb") as f:
        f.write(bytes(max(0, size)))
        f.flush()
        os.fsync(f.fileno())


def _spares(journal_dir: Path) -> list[Path]:
    return sorted(journal_dir.glob(f"*{SPARE_SUFFIX}"))


async def _append_segments(j: Journal, segments: int) -> None:
    for _ in range(segments * SEG // RECORD):
        await j.append(write_for(j.next_lsn, RECORD))
    await j.sync()


async def test_a_trim_keeps_no_spare_the_file_system_has_no_room_for(small_disk: Path) -> None:
    journal_dir = small_disk / "journal"
    _fill_up(small_disk / "filler", leave=5 * SEG // 2)
    j = await Journal.open(journal_dir, segment_bytes=SEG)
    try:
        await _append_segments(j, 2)
        await j.trim(j.next_lsn)
        # a spare would leave less than two segments of room beside the active one
        assert j.spare_count == 0 and not _spares(journal_dir)
    finally:
        await j.aclose()


async def test_a_full_file_system_gets_back_the_room_of_the_spares(small_disk: Path) -> None:
    journal_dir = small_disk / "journal"
    j = await Journal.open(journal_dir, segment_bytes=SEG)
    try:
        await _append_segments(j, 3)
        await j.trim(j.next_lsn)
        assert j.spare_count >= 1  # room enough, at the time of the trim
        _fill_up(small_disk / "filler", leave=0)  # then something else filled the disk
        with pytest.raises(JournalIOError) as failed:
            await _append_segments(j, 2)
        assert isinstance(failed.value.__cause__, OSError)
        assert failed.value.__cause__.errno == errno.ENOSPC
        assert not _spares(journal_dir)  # their blocks given back
    finally:
        await j.aclose()
    j = await Journal.open(journal_dir, segment_bytes=SEG)  # the reopen goes on
    try:
        await _append_segments(j, 1)
    finally:
        await j.aclose()
