"""truth_records: what a file really holds (bytes and allocation), journaled after a change
of it failed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from replicator.engine import reconcile, volumes
from replicator.engine.reconcile import truth_records
from replicator.journal import Record


def test_real_size_then_the_range_clipped_to_it_in_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reconcile, "CHUNK", 4096)
    data = os.urandom(10_000)
    path = tmp_path / "disk.img"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        # a write of [3000, 15000) failed: the file holds 10_000 bytes
        assert list(truth_records(fd, "disk.img", 3000, 12_000)) == [
            Record.resize("disk.img", 10_000),
            Record.write("disk.img", 3000, data[3000:7096]),
            Record.write("disk.img", 7096, data[7096:10_000]),
        ]
        # the size the caller knows is right: no RESIZE
        assert list(truth_records(fd, "disk.img", 0, 100, known_size=10_000)) == [
            Record.write("disk.img", 0, data[:100])
        ]
        assert list(truth_records(fd, "disk.img", 20_000, 10, known_size=10_000)) == []
    finally:
        os.close(fd)


def test_zeros_come_back_as_held_and_holes_are_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a failed change the range's zeros are journaled as the file holds them: ZERO
    where allocated (fallocated included), TRIM where a hole, which is never read (a
    failed allocation of a large sparse range costs no data records)."""
    mib = 1 << 20
    monkeypatch.setattr(reconcile, "CHUNK", mib)
    path = tmp_path / "disk.img"
    data = os.urandom(mib)
    with path.open("wb") as f:
        f.truncate(64 * mib)
        f.seek(mib)
        f.write(data)
        os.posix_fallocate(f.fileno(), 2 * mib, 2 * mib)
    reads: list[int] = []
    real = volumes.pread_all

    def counting(fd: int, length: int, offset: int) -> bytes:
        reads.append(length)
        return real(fd, length, offset)

    monkeypatch.setattr(reconcile, "pread_all", counting)
    fd = os.open(path, os.O_RDONLY)
    try:
        got = list(truth_records(fd, "disk.img", 0, 64 * mib, known_size=64 * mib))
    finally:
        os.close(fd)
    assert got == [
        Record.trim("disk.img", 0, mib),
        Record.write("disk.img", mib, data),
        Record.zero("disk.img", 2 * mib, mib),
        Record.zero("disk.img", 3 * mib, mib),
        Record.trim("disk.img", 4 * mib, 60 * mib),  # one for the run of holes
    ]
    assert sum(reads) == 3 * mib  # the data and the fallocated range, no hole
