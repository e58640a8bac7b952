"""engine/unapplied.py: a replica file's manifest as unapplied records will leave it equals
the manifest of the file once the applier has applied them; a listing gets their modes;
records it does not work out are named."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.engine.applier import Applier
from replicator.engine.manifest import digest_chunks
from replicator.engine.unapplied import NotComparable, manifest, of_file, tree
from replicator.journal import Record
from replicator.transport.messages import TreeEntry

EXTENT = 4096
CHUNK = 3  # extents per manifest part: several parts, cut anywhere
SPAN = 8 * EXTENT  # offsets and sizes stay within this, so records overlap


def _digests(parts: list[tuple[bool, int, bytes]]) -> tuple[bool, int, bytes]:
    exists, size = parts[-1][0], parts[-1][1]
    assert all(part[:2] == (exists, size) for part in parts)
    return exists, size, b"".join(part[2] for part in parts)


def _as_is(path: Path) -> tuple[bool, int, bytes]:
    """What JobReplica.replica_manifest answers for the file as it is."""
    if not path.exists():
        return False, 0, b""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return True, size, b"".join(digest_chunks(fd, size, EXTENT, CHUNK))
    finally:
        os.close(fd)


def _worked_out(path: Path, records: list[Record]) -> tuple[bool, int, bytes]:
    fd = os.open(path, os.O_RDONLY) if path.exists() else None
    try:
        return _digests(list(manifest(fd, records, EXTENT, CHUNK)))
    finally:
        if fd is not None:
            os.close(fd)


_offset = st.integers(0, SPAN)
_data = st.binary(min_size=0, max_size=3 * EXTENT).map(lambda b: b.replace(b"\0", b"\1"))
_record = st.one_of(
    st.builds(lambda o, d: Record.write("disk", o, d), _offset, _data),
    st.builds(lambda o, n: Record.zero("disk", o, n), _offset, _offset),
    st.builds(lambda o, n: Record.trim("disk", o, n), _offset, _offset),
    st.builds(lambda n: Record.resize("disk", n), _offset),
    st.builds(lambda d: Record.file("disk", d, 0o640), _data),
    st.just(Record.chmod("disk", 0o600)),
)


@settings(max_examples=200, deadline=None)
@given(
    base=st.none() | st.binary(max_size=SPAN).map(lambda b: b.replace(b"\0", b"\2")),
    records=st.lists(_record, max_size=8),
)
def test_a_manifest_worked_out_equals_the_file_applied(
    base: bytes | None, records: list[Record]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp, "job")
        job.mkdir()
        replica = job / "disk"
        if base is not None:
            replica.write_bytes(base)
        worked_out = _worked_out(replica, of_file(records, "disk"))
        applier = Applier(job)
        try:
            applier.apply_many(records)
            applier.barrier()
        finally:
            applier.close()
        assert worked_out == _as_is(replica)


def test_records_of_other_files_change_nothing_and_a_rename_anywhere_is_named() -> None:
    assert of_file([Record.write("other", 0, b"x"), Record.chmod("disk", 0o600)], "disk") == [
        Record.chmod("disk", 0o600)
    ]
    with pytest.raises(NotComparable, match=r"RENAME 'a.tmp'"):
        of_file([Record.write("disk", 0, b"x"), Record.rename("a.tmp", "a")], "disk")


def test_a_write_into_a_folder_name_is_not_worked_out(tmp_path: Path) -> None:
    (tmp_path / "disk").mkdir()
    fd = os.open(tmp_path / "disk", os.O_RDONLY)
    try:
        with pytest.raises(NotComparable, match="not a file"):
            next(manifest(fd, [Record.write("disk", 0, b"x")], EXTENT, CHUNK))
    finally:
        os.close(fd)


def test_a_listing_is_folded_and_what_it_cannot_show_is_named() -> None:
    listed = [
        TreeEntry("d", "d", 0o755, ""),
        TreeEntry("d/a.txt", "f", 0o644, ""),
        TreeEntry("link", "l", 0, "d/a.txt"),
    ]
    after = tree(
        listed,
        [
            Record.write("d/a.txt", 0, b"x"),
            Record.chmod("d", 0o2750),  # a folder keeps its set-id bits, a file not
            Record.file("d/a.txt", b"y", 0o4600),
            Record.chmod("link", 0o600),  # a symlink has no mode of its own
            Record.write("d/new.img", 0, b"z"),  # the applier makes it, 0600
        ],
    )
    assert after == [
        TreeEntry("d", "d", 0o2750, ""),
        TreeEntry("d/a.txt", "f", 0o600, ""),
        TreeEntry("d/new.img", "f", 0o600, ""),
        TreeEntry("link", "l", 0, "d/a.txt"),
    ]
    with pytest.raises(NotComparable, match="into a folder the replica lacks"):
        tree(listed, [Record.write("e/new.img", 0, b"x")])
    with pytest.raises(NotComparable, match="not a file"):
        tree(listed, [Record.file("link", b"x", 0o644)])
    with pytest.raises(NotComparable, match="changes the names"):
        tree(listed, [Record.unlink("d/a.txt")])
