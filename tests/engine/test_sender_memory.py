"""A scan's memory over a raw disk follows its virtual size (16 bytes of digest per 64 KiB
extent, holes included: 256 MiB per TiB), so how many such copies of a disk's digests a
cycle holds at once is what a sender of a large sparse raw disk costs. Measured with
tracemalloc over a sparse file of 64 GiB (16 MiB of digests a copy), beside the saved
manifests the sender holds anyway (allocated before tracing starts)."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

from replicator.engine.manifest import ManifestSet
from replicator.engine.scan import scan_epoch
from replicator.engine.sender_state import SenderConfig, SenderState
from replicator.engine.volumes import DEFAULT_EXTENT, resolve_volumes
from replicator.journal import RecordType
from replicator.transport.messages import DIGEST_SIZE

SIZE = 64 << 30
COPY = SIZE // DEFAULT_EXTENT * DIGEST_SIZE  # one manifest's digests: 16 MiB


def _sparse_disk(path: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for offset in (0, 1 << 30, SIZE - (1 << 20)):
            f.seek(offset)
            f.write(os.urandom(1 << 20))


async def test_a_first_sync_holds_two_copies(tmp_path: Path) -> None:
    """A first sync compares with the zeros a RESIZE leaves (a copy) and makes the new
    manifest (another); the zeros' digests were made whole first, twice over (the holes'
    digests, then joined with the last extent's): three copies at once."""
    disk = tmp_path / "disk.img"
    _sparse_disk(disk)
    config = SenderConfig("127.0.0.1", 1, "vm1", resolve_volumes([disk]), tmp_path / "state")
    async with SenderState(config) as state:
        journal = state.journal
        assert journal is not None
        tracemalloc.start()
        try:
            new, stats, lsn = await scan_epoch(
                config.volumes, journal, ManifestSet(0, DEFAULT_EXTENT), append=journal.append_many
            )
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert stats.bytes_changed == 3 << 20
        assert new.disks["disk.img"].count == SIZE // DEFAULT_EXTENT
        types = [r.type async for r in journal.read_from(journal.first_lsn)]
        assert types[-1] is RecordType.EPOCH and lsn == journal.last_lsn
        assert peak < 2.5 * COPY, f"{peak / COPY:.2f} copies of the digests at once"
