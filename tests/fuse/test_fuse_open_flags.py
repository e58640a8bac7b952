"""Open flags the filter must honour itself."""

from __future__ import annotations

import fcntl
import mmap
import os
import shutil
from pathlib import Path

from tests.fuse.helpers import FuseProc, assert_same_tree, read_journal, replay


def _initial(fuse: FuseProc, tmp_path: Path) -> Path:
    initial = tmp_path / "initial"
    shutil.copytree(fuse.source, initial, symlinks=True)
    return initial


def test_writes_at_an_offset_through_an_appending_handle_land_there(
    fuse: FuseProc, tmp_path: Path
) -> None:
    """The real file was opened with the caller's O_APPEND, so pwrite(2) appended whatever
    offset the kernel sent: a handle that dropped O_APPEND (fcntl) wrote its bytes at the
    end of the source, and an mmap of an appending handle had its page written back at
    the end (the file grew by a page), while the journal said where they belonged."""
    (fuse.source / "log").write_bytes(b"A" * 10_000)
    (fuse.source / "map").write_bytes(b"B" * 16_384)
    initial = _initial(fuse, tmp_path)
    fuse.start()
    fd = os.open(fuse.mnt / "log", os.O_RDWR | os.O_APPEND)
    try:
        os.write(fd, b"tail")  # appended, as asked
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_APPEND)
        os.pwrite(fd, b"MIDDLE", 100)
        os.fsync(fd)
    finally:
        os.close(fd)
    fd = os.open(fuse.mnt / "map", os.O_RDWR | os.O_APPEND)
    try:
        with mmap.mmap(fd, 16_384) as m:
            m[5000:5010] = b"0123456789"
            m.flush()  # msync: the page goes out through the appending handle
    finally:
        os.close(fd)
    assert fuse.stop() == 0
    log = b"A" * 100 + b"MIDDLE" + b"A" * 9_894 + b"tail"
    assert (fuse.source / "log").read_bytes() == log
    assert (fuse.source / "map").read_bytes() == b"B" * 5000 + b"0123456789" + b"B" * 11_374
    assert_same_tree(fuse.source, replay(initial, read_journal(fuse.journal), tmp_path / "rep"))
