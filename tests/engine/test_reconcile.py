"""truth_records: what a file really holds, journaled after a change of it failed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from replicator.engine import reconcile
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
