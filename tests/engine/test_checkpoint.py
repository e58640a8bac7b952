"""``checkpoint_manifests``: the manifests a clean stop saves equal a full scan's."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st

from replicator.engine.checkpoint import (
    TOUCHED_FILE,
    TouchedExtents,
    checkpoint_manifests,
    drop_touched,
    load_touched,
    save_touched,
)
from replicator.engine.manifest import UNKNOWN, ExtentManifest, ManifestSet
from replicator.engine.sender_state import unknown_where_journaled
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
        assert after.disks["disk.raw"] == scanned(path)
        assert read <= touched.bytes + EXT


def test_a_folder_namespace_change_makes_the_tracker_give_up() -> None:
    touched = TouchedExtents(EXT)
    touched([Record.write("a", 0, b"x")])
    assert touched.valid and touched.bytes == EXT
    touched([Record.unlink("a")])
    assert not touched.valid


@given(st.lists(st.tuples(st.integers(0, 5_000), st.integers(1, 40_000)), max_size=30))
def test_the_bitmap_marks_exactly_the_extents_written(writes: list[tuple[int, int]]) -> None:
    touched = TouchedExtents(EXT)
    model: set[int] = set()
    for offset, length in writes:
        touched([Record.zero("v", offset * 97, length)])
        model.update(range(offset * 97 // EXT, (offset * 97 + length - 1) // EXT + 1))
    assert list(touched.indices("v")) == sorted(model)
    assert touched.bytes == len(model) * EXT


def test_the_marks_persist_for_the_manifests_they_were_made_against(tmp_path: Path) -> None:
    touched = TouchedExtents(EXT)
    touched([Record.write("v", 0, b"x"), Record.write("v", 10 * EXT, b"y")])
    touched([Record.resize("v", 20 * EXT)])
    save_touched(tmp_path, 41, touched)
    loaded = load_touched(tmp_path, 41, EXT)
    assert loaded is not None
    assert list(loaded.indices("v")) == [0, 10] and loaded.resized == {"v"}
    assert load_touched(tmp_path, 40, EXT) is None  # other manifests: says nothing
    assert load_touched(tmp_path, 41, 2 * EXT) is None
    path = tmp_path / TOUCHED_FILE
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert load_touched(tmp_path, 41, EXT) is None  # damaged: only the receiver can tell
    drop_touched(tmp_path)
    drop_touched(tmp_path)
    assert load_touched(tmp_path, 41, EXT) is None


def test_a_disk_resized_since_its_manifests_gets_a_resize_and_no_assumed_zeros(
    tmp_path: Path,
) -> None:
    """Records since trimmed grew the disk and wrote past the manifests' end: the basis
    must make the scan send a RESIZE and every extent past that end, zeros included (the
    replica may hold the trimmed writes' data there, the image zeros)."""
    from replicator.engine.manifest import UNKNOWN
    from replicator.engine.sender_state import _unknown_where_touched

    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(3 * EXT))  # the image now: 3 extents of zeros
    basis = ManifestSet(5, EXT, 1)
    basis.disks["disk.raw"] = ExtentManifest(EXT, EXT)  # the manifests: 1 extent
    basis.disks["disk.raw"].set(0, extent_digest(bytes(EXT)))
    touched = TouchedExtents(EXT)
    touched([Record.resize("disk.raw", 3 * EXT), Record.write("disk.raw", 2 * EXT, b"d")])
    _unknown_where_touched(basis, touched, [VolumeSpec(disk, "disk.raw", VolumeKind.DISK)])
    manifest = basis.disks["disk.raw"]
    assert manifest.size == 3 * EXT + 1  # != the image's: the scan journals a RESIZE
    assert manifest.get(0) == extent_digest(bytes(EXT))  # untouched, known
    assert manifest.get(1) == UNKNOWN and manifest.get(2) == UNKNOWN


def test_what_a_released_freeze_journaled_is_unknown_in_the_next_basis(tmp_path: Path) -> None:
    """``unknown_where_journaled``: every extent, file and mode the records touched is sent
    again; the rest of the basis is kept; the basis given is not changed."""
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(8 * EXT))
    basis = ManifestSet(lsn=7, extent_size=EXT, epoch=3)
    basis.disks["disk.raw"] = scanned(image)
    basis.files["vm.xml"], basis.modes["vm.xml"] = extent_digest(b"<domain/>"), 0o644
    basis.files["notes"], basis.modes["notes"] = extent_digest(b"n"), 0o600
    volumes = [
        VolumeSpec(image, "disk.raw", VolumeKind.DISK),
        VolumeSpec(tmp_path / "vm.xml", "vm.xml", VolumeKind.FILE),
        VolumeSpec(tmp_path / "notes", "notes", VolumeKind.FILE),
    ]
    touched = TouchedExtents(EXT)
    touched([Record.write("disk.raw", EXT + 10, b"x" * EXT), Record.file("vm.xml", b"<x/>")])
    before = basis.disks["disk.raw"].slice(0, basis.disks["disk.raw"].count)
    marked = unknown_where_journaled(basis, touched, volumes)
    disk = marked.disks["disk.raw"]
    assert [disk.get(i) == UNKNOWN for i in range(8)] == [False, True, True] + [False] * 5
    assert "vm.xml" not in marked.files and "vm.xml" not in marked.modes
    assert marked.files["notes"] == basis.files["notes"] and marked.modes["notes"] == 0o600
    assert (marked.lsn, marked.epoch) == (7, 3)
    assert basis.disks["disk.raw"].slice(0, 8) == before and "vm.xml" in basis.files
    touched([Record.unlink("notes")])  # a record the marks cannot follow: all unknown
    marked = unknown_where_journaled(basis, touched, volumes)
    assert all(marked.disks["disk.raw"].get(i) == UNKNOWN for i in range(8))
    assert not marked.files and not marked.modes
