"""A disk's scan covers the size its RESIZE record and new manifest were made for."""

from __future__ import annotations

import itertools
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


async def test_an_epoch_is_made_durable_early_then_in_growing_steps(tmp_path: Path) -> None:
    """The shipper sends durable records only: a big epoch's first sync comes after about
    FIRST_SYNC bytes, not after SYNC_EVERY, and the steps then double."""
    from replicator.engine import scan
    from replicator.engine.manifest import ManifestSet
    from replicator.journal import Journal, Record

    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(24 * 1024 * 1024))
    spec = VolumeSpec(path, "disk.img", VolumeKind.DISK)
    journal = await Journal.open(tmp_path / "journal")
    appended = 0
    at_sync: list[int] = []

    async def append(records: list[Record]) -> int:
        nonlocal appended
        appended += sum(len(r.data) for r in records)
        return await journal.append_many(records)

    real_sync = journal.sync

    async def sync() -> int:
        at_sync.append(appended)
        return await real_sync()

    journal.sync = sync  # type: ignore[method-assign]
    try:
        await scan.scan_epoch(
            [spec], journal, ManifestSet(0, EXT), append=append, sync_every=16 * 1024 * 1024
        )
    finally:
        await journal.aclose()
    first = at_sync[0]
    assert scan.FIRST_SYNC <= first <= scan.FIRST_SYNC + BATCH_BYTES
    steps = [b - a for a, b in itertools.pairwise(at_sync[:-1])]  # the last: the EPOCH
    assert steps == sorted(steps) and max(steps) <= 16 * 1024 * 1024 + BATCH_BYTES
    assert len(at_sync) <= 8  # 24 MiB in 1, 2, 4, 8 ... MiB steps, then the final sync
