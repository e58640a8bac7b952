"""``checkpoint_manifests``: the manifests a clean stop saves equal a full scan's."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st

from replicator.engine.checkpoint import TouchedExtents, checkpoint_manifests
from replicator.engine.manifest import ExtentManifest, ManifestSet
from replicator.engine.volumes import VolumeKind, VolumeSpec, extent_digest
from replicator.journal import Record

EXT = 512  # small extents, so a few KiB of writes cross many of them


def scanned(path: Path) -> ExtentManifest:
    """Every extent read and hashed, as a scan's manifest has it."""
    data = path.read_bytes()
    disk = ExtentManifest(EXT, len(data))
    for i in range(disk.count):
        disk.set(i, extent_digest(data[i * EXT : (i + 1) * EXT]))
    return disk


OPS = st.lists(
    st.one_of(  # (what, offset, length, fill byte): lengths drawn evenly, so writes
        # cross extent boundaries as often as not (random binaries are mostly tiny)
        st.tuples(
            st.just("write"), st.integers(0, 40_000), st.integers(1, 9_000), st.integers(1, 255)
        ),
        st.tuples(st.just("zero"), st.integers(0, 40_000), st.integers(1, 9_000), st.just(0)),
        st.tuples(st.just("resize"), st.integers(0, 50_000), st.just(0), st.just(0)),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@example(initial=bytes(20_000), ops=[("write", 100, 9_000, 0x78)])
@given(initial=st.binary(min_size=0, max_size=30_000), ops=OPS)
def test_a_checkpoint_equals_a_scan_of_the_image(
    initial: bytes, ops: list[tuple[str, int, int, int]]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "disk.raw"
        path.write_bytes(initial)
        before = ManifestSet(7, EXT, 1)
        before.disks["disk.raw"] = scanned(path)
        touched = TouchedExtents(EXT)
        fd = os.open(path, os.O_RDWR)
        try:
            for op, offset, length, fill in ops:  # as the NBD export does: journal, then file
                if op == "write":
                    arg = bytes([fill]) * length
                    size = os.fstat(fd).st_size
                    if offset + len(arg) > size:
                        touched([Record.resize("disk.raw", offset + len(arg))])
                    touched([Record.write("disk.raw", offset, arg)])
                    os.pwrite(fd, arg, offset)
                elif op == "zero":
                    size = os.fstat(fd).st_size
                    if offset >= size:
                        continue
                    length = min(length, size - offset)
                    touched([Record.zero("disk.raw", offset, length)])
                    os.pwrite(fd, bytes(length), offset)
                else:
                    touched([Record.resize("disk.raw", offset)])
                    os.ftruncate(fd, offset)
        finally:
            os.close(fd)
        spec = VolumeSpec(path, "disk.raw", VolumeKind.DISK)
        after, read = checkpoint_manifests(before, touched, [spec], 42)
        assert after.lsn == 42 and after.epoch == 1
        assert after.disks["disk.raw"].size == path.stat().st_size
        assert after.disks["disk.raw"].digests == scanned(path).digests
        assert read <= touched.bytes + EXT


def test_a_folder_namespace_change_makes_the_tracker_give_up() -> None:
    touched = TouchedExtents(EXT)
    touched([Record.write("a", 0, b"x")])
    assert touched.valid and touched.bytes == EXT
    touched([Record.unlink("a")])
    assert not touched.valid
