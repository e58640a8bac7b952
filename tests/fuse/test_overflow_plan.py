"""The FUSE overflow's bookkeeping: what a resync must send for what happened unjournaled."""

from __future__ import annotations

import os
from pathlib import Path

from replicator.engine.fuse.overflow import EXTENT, FolderOverflow, read_records, snapshot
from replicator.journal import Record, RecordType


def _folder(tmp_path: Path) -> Path:
    src = tmp_path / "vm"
    (src / "d").mkdir(parents=True)
    (src / "d" / "a.img").write_bytes(os.urandom(4 * EXTENT))
    (src / "b.img").write_bytes(os.urandom(2 * EXTENT))
    (src / "vm.xml").write_text("<x/>")
    return src


def test_marked_extents_follow_renames_and_new_files_go_whole(tmp_path: Path) -> None:
    src = _folder(tmp_path)
    ov = FolderOverflow(snapshot(src))
    ov.absorb(Record.write("d/a.img", EXTENT + 10, b"x" * 10))  # extent 1
    os.rename(src / "d" / "a.img", src / "d" / "z.img")
    ov.absorb(Record.rename("d/a.img", "d/z.img"))
    (src / "new.img").write_bytes(os.urandom(3 * EXTENT + 1))
    ov.absorb(Record.create("new.img", 0o644))
    os.unlink(src / "vm.xml")
    ov.absorb(Record.unlink("vm.xml"))
    records, work = ov.plan(snapshot(src))
    kinds = [(r.type, r.volume) for r in records]
    assert (RecordType.UNLINK, "vm.xml") in kinds
    assert (RecordType.UNLINK, "d/a.img") in kinds  # the replica's old name goes
    by_path = {path: sorted(marks) for path, marks in work.values()}
    assert by_path["new.img"] == [0, 1, 2, 3]  # new: whole
    assert by_path["d/z.img"] == [0, 1, 2, 3]  # a new name on the replica: whole too
    assert "b.img" not in by_path  # untouched: nothing to send


def test_a_touched_file_in_place_sends_only_its_marked_extents(tmp_path: Path) -> None:
    src = _folder(tmp_path)
    ov = FolderOverflow(snapshot(src))
    ov.absorb(Record.write("d/a.img", 3 * EXTENT, b"y" * 100))
    os.truncate(src / "b.img", EXTENT)
    ov.absorb(Record.resize("b.img", EXTENT))
    records, work = ov.plan(snapshot(src))
    assert Record.resize("b.img", EXTENT) in records
    assert {path: sorted(m) for path, m in work.values()} == {"d/a.img": [3]}
    ino = next(i for i, (p, _) in work.items() if p == "d/a.img")
    os.rename(src / "d" / "a.img", src / "moved.img")  # renamed during the resync
    found = read_records(src, "d/a.img", ino, [3])
    assert found is not None and {r.volume for r in found} == {"moved.img"}
    os.unlink(src / "moved.img")
    assert read_records(src, "moved.img", ino, [3]) is None  # gone: nothing to send


def test_read_back_zeros_say_whether_the_file_holds_them(tmp_path: Path) -> None:
    """A resync's extents of zeros go as the source holds them: ZERO where allocated
    (written zeros, fallocated), TRIM where a hole; data as WRITE; past the end nothing."""
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(8 * EXTENT)
        f.write(os.urandom(EXTENT))
        f.seek(2 * EXTENT)
        f.write(bytes(EXTENT))
        f.flush()
        os.posix_fallocate(f.fileno(), 4 * EXTENT, EXTENT)
    found = read_records(tmp_path, "disk.img", path.stat().st_ino, [0, 1, 2, 4, 6, 9])
    assert found is not None
    assert [(r.type, r.offset // EXTENT, r.length) for r in found] == [
        (RecordType.WRITE, 0, EXTENT),
        (RecordType.TRIM, 1, EXTENT),
        (RecordType.ZERO, 2, EXTENT),
        (RecordType.ZERO, 4, EXTENT),
        (RecordType.TRIM, 6, EXTENT),
    ]
