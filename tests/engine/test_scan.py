"""A disk's scan covers the size its RESIZE record and new manifest were made for."""

from __future__ import annotations

import os
from pathlib import Path

from replicator.engine.manifest import ExtentManifest
from replicator.engine.scan import BATCH_BYTES, ScanStats, _disk_batches
from replicator.engine.volumes import VolumeKind, VolumeSpec
from replicator.transport.messages import DIGEST_SIZE

EXT = 64 * 1024


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
