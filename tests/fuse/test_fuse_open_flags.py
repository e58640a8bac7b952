"""Open flags the filter must honour itself: O_APPEND, O_DSYNC/O_SYNC with O_DIRECT, and
the attributes of a file unlinked while open."""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import shutil
import signal
from pathlib import Path

from replicator.journal import RecordType
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


def test_an_o_dsync_direct_write_is_journaled_durably_before_it_returns(
    fuse: FuseProc, tmp_path: Path
) -> None:
    """The kernel answers a write through a direct_io handle without an fsync request,
    whatever O_DSYNC says (it sends one only after writes through its page cache): the
    filter answered O_DIRECT|O_DSYNC writes (qemu's cache=directsync) with their records
    still staged in memory, so a SIGKILL after the write returned lost them."""
    fuse.start()
    block = mmap.mmap(-1, 4096)  # O_DIRECT wants an aligned buffer
    fds = [
        os.open(fuse.mnt / name, os.O_CREAT | os.O_RDWR | os.O_DIRECT | flag, 0o644)
        for name, flag in (("dsync", os.O_DSYNC), ("sync", os.O_SYNC))
    ]
    try:
        for i in range(8):
            block[:] = bytes([0x41 + i]) * 4096
            for fd in fds:
                os.pwrite(fd, block, i * 4096)
        assert fuse.stop(signal.SIGKILL) == -signal.SIGKILL  # with the files still open
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):  # ENOTCONN: the daemon is gone
                os.close(fd)
    records = read_journal(fuse.journal)
    writes = [(r.volume, r.offset) for r in records if r.type is RecordType.WRITE]
    assert sorted(writes) == sorted((n, i * 4096) for n in ("dsync", "sync") for i in range(8))


def test_attributes_of_a_file_unlinked_while_open_can_still_be_set(
    fuse: FuseProc, tmp_path: Path
) -> None:
    """fchmod and futimens of a file unlinked while open answered ENOENT (the kernel sends
    no handle with them and the filter looked the file up by its name); on a local file
    system both succeed. Nothing is journaled for them: no name reaches the file."""
    (fuse.source / "keep").write_bytes(b"k")
    initial = _initial(fuse, tmp_path)
    fuse.start()
    fd = os.open(fuse.mnt / "scratch", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"x" * 5000)
        os.unlink(fuse.mnt / "scratch")
        os.fchmod(fd, 0o600)
        os.utime(fd, ns=(10**18, 10**18))
        os.fchown(fd, os.getuid(), os.getgid())
        st = os.fstat(fd)
        assert (st.st_mode & 0o777, st.st_mtime_ns) == (0o600, 10**18)
    finally:
        os.close(fd)
    assert fuse.stop() == 0
    records = read_journal(fuse.journal)
    assert RecordType.CHMOD not in {r.type for r in records}
    assert_same_tree(fuse.source, replay(initial, records, tmp_path / "rep"))
