"""A scan's memory over a raw disk follows its virtual size (16 bytes of digest per 64 KiB
extent, holes included: 256 MiB per TiB), so how many such copies of a disk's digests a
cycle holds at once is what a sender of a large sparse raw disk costs. Measured with
tracemalloc over a sparse file of 64 GiB (16 MiB of digests a copy), beside the saved
manifests the sender holds anyway (allocated before tracing starts)."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

from replicator.engine.manifest import ExtentManifest, ManifestSet
from replicator.engine.scan import scan_epoch
from replicator.engine.sender_state import SenderConfig, SenderState, basis_alone
from replicator.engine.volumes import DEFAULT_EXTENT, extent_digest, resolve_volumes
from replicator.journal import Record, RecordType
from replicator.transport.messages import DIGEST_SIZE
from tests.tools import peak_traced

SIZE = 64 << 30
COPY = SIZE // DEFAULT_EXTENT * DIGEST_SIZE  # one manifest's digests: 16 MiB


def _flat(manifest: ExtentManifest) -> bytes:
    """All of a manifest's digests, one after the other."""
    return manifest.slice(0, manifest.count)


def _sparse_disk(path: Path, size: int = SIZE) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in (0, 1 << 30, size - (1 << 20)):
            f.seek(offset)
            f.write(os.urandom(1 << 20))


def _write(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


async def test_a_cycle_from_the_saved_manifests_holds_one_more_copy(tmp_path: Path) -> None:
    """The basis of a cycle is the saved manifests with the journal folded in: it shares
    their digests (copied only where a record changes them), so a cycle adds the new
    manifest alone. It made a full copy of them first: three copies at once."""
    disk = tmp_path / "disk.img"
    _sparse_disk(disk)
    config = SenderConfig("127.0.0.1", 1, "vm1", resolve_volumes([disk]), tmp_path / "state")
    async with SenderState(config) as state:
        journal = state.journal
        assert journal is not None
        first, _, _ = await scan_epoch(
            config.volumes, journal, ManifestSet(0, DEFAULT_EXTENT), append=journal.append_many
        )
        await state.save(first)
        saved = _flat(first.disks["disk.img"])
        del first
        _write(disk, 2 << 30, os.urandom(1 << 20))  # a change the next cycle finds
        tracemalloc.start()
        try:
            basis = await basis_alone(state)
            assert isinstance(basis, ManifestSet)
            new, stats, _ = await scan_epoch(
                config.volumes, journal, basis, append=journal.append_many
            )
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert stats.bytes_changed == 1 << 20
        assert _flat(new.disks["disk.img"]) != saved
        assert state.manifests is not None  # what was saved is as it was
        assert _flat(state.manifests.disks["disk.img"]) == saved
        assert peak < 1.5 * COPY, f"{peak / COPY:.2f} copies of the digests at once"


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


async def test_records_folded_into_a_basis_leave_the_saved_manifests_as_they_are(
    tmp_path: Path,
) -> None:
    """The basis shares the saved manifests' digests: what records journaled after them
    change is changed in a copy. Changed in place, a cycle cut short would leave the
    sender comparing with digests the replica was never sent."""
    disk = tmp_path / "disk.img"
    disk.touch()
    os.truncate(disk, 4 * DEFAULT_EXTENT)
    config = SenderConfig("127.0.0.1", 1, "vm1", resolve_volumes([disk]), tmp_path / "state")
    async with SenderState(config) as state:
        journal = state.journal
        assert journal is not None
        first, _, _ = await scan_epoch(
            config.volumes, journal, ManifestSet(0, DEFAULT_EXTENT), append=journal.append_many
        )
        await state.save(first)
        saved = _flat(first.disks["disk.img"])
        data = os.urandom(DEFAULT_EXTENT)
        await journal.append_many(
            [
                Record.write("disk.img", DEFAULT_EXTENT, data),
                Record.resize("disk.img", 6 * DEFAULT_EXTENT),
            ]
        )
        await journal.sync()
        basis = await basis_alone(state)
        assert isinstance(basis, ManifestSet)
        folded = basis.disks["disk.img"]
        assert folded.size == 6 * DEFAULT_EXTENT
        assert folded.get(1) == extent_digest(data)
        assert state.manifests is first
        assert first.disks["disk.img"].size == 4 * DEFAULT_EXTENT
        assert _flat(first.disks["disk.img"]) == saved


def test_extents_marked_unknown_in_a_basis_leave_the_saved_manifests_as_they_are(
    tmp_path: Path,
) -> None:
    """So for what records since trimmed or shipped without the journal touched
    (``touched.state``, ``direct.intent``): marked unknown in a copy."""
    from replicator.engine.checkpoint import TouchedExtents
    from replicator.engine.manifest import UNKNOWN, ExtentManifest
    from replicator.engine.sender_state import _sharing, _unknown_where_touched
    from replicator.engine.volumes import VolumeKind, VolumeSpec

    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(2 * DEFAULT_EXTENT))
    saved = ManifestSet(5, DEFAULT_EXTENT, 1)
    saved.disks["disk.raw"] = ExtentManifest(DEFAULT_EXTENT, 2 * DEFAULT_EXTENT)
    saved.disks["disk.raw"].set(0, extent_digest(bytes(DEFAULT_EXTENT)))
    saved.disks["disk.raw"].set(1, extent_digest(bytes(DEFAULT_EXTENT)))
    before = _flat(saved.disks["disk.raw"])
    touched = TouchedExtents(DEFAULT_EXTENT)
    touched([Record.write("disk.raw", DEFAULT_EXTENT, b"d")])
    basis, shared = _sharing(saved)
    _unknown_where_touched(basis, touched, [VolumeSpec(disk, "disk.raw", VolumeKind.DISK)], shared)
    assert basis.disks["disk.raw"].get(1) == UNKNOWN
    assert basis.disks["disk.raw"].get(0) == extent_digest(bytes(DEFAULT_EXTENT))
    assert _flat(saved.disks["disk.raw"]) == before


def test_saving_and_loading_manifests_hold_at_most_one_more_copy(tmp_path: Path) -> None:
    """``manifests.state`` is written and read while the sender holds the saved manifests
    and the new ones. A sparse disk's digests are compressed a MiB at a time (whole, lz4
    took a buffer of their size: one more copy); a dense disk's are packed and written
    with no copy of the packer's buffer nor one joined to the header (three more copies
    while saving, three while loading)."""
    count = COPY // DIGEST_SIZE
    dense = bytearray(os.urandom(COPY))
    sparse = bytearray(extent_digest(bytes(DEFAULT_EXTENT)) * count)
    for digests, most in ((sparse, 0.5), (dense, 2.5)):
        manifests = ManifestSet(5, DEFAULT_EXTENT, 1)
        manifests.disks["disk.img"] = ExtentManifest(DEFAULT_EXTENT, SIZE, digests)
        path = tmp_path / "manifests.state"
        saved = peak_traced(lambda: manifests.save(path))  # noqa: B023 (called at once)
        loaded: list[ManifestSet | None] = []
        read = peak_traced(lambda: loaded.append(ManifestSet.load(path)))  # noqa: B023
        assert loaded[0] is not None and _flat(loaded[0].disks["disk.img"]) == digests
        assert saved < most * COPY, f"{saved / COPY:.2f} copies to save"
        assert read < 2.5 * COPY, f"{read / COPY:.2f} copies to load"


async def test_cycles_of_a_sparse_terabyte_hold_its_data_not_its_size(tmp_path: Path) -> None:
    """A 1 TiB sparse raw disk with 3 MiB of data: its first sync, a cycle with no change
    and one with a few writes, each saved. A flat manifest was 256 MiB a copy, and a cycle
    held two or three; chunks of holes are one shared object now, whatever the size."""
    disk = tmp_path / "disk.img"
    _sparse_disk(disk, 1 << 40)
    config = SenderConfig("127.0.0.1", 1, "vm1", resolve_volumes([disk]), tmp_path / "state")
    async with SenderState(config) as state:
        journal = state.journal
        assert journal is not None
        peaks: list[int] = []
        basis: ManifestSet | str = ManifestSet(0, DEFAULT_EXTENT)
        for change in (None, None, 2 << 30):
            if change is not None:
                _write(disk, change, os.urandom(DEFAULT_EXTENT))
            tracemalloc.start()
            try:
                assert isinstance(basis, ManifestSet)
                new, stats, _ = await scan_epoch(
                    config.volumes, journal, basis, append=journal.append_many
                )
                await state.save(new)
                del new
                basis = await basis_alone(state)
                peaks.append(tracemalloc.get_traced_memory()[1])
            finally:
                tracemalloc.stop()
        assert stats.bytes_changed == DEFAULT_EXTENT  # the last cycle: the one write
        assert max(peaks) < 16 << 20, [f"{p / (1 << 20):.0f} MiB" for p in peaks]
