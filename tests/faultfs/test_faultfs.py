"""The fault-injection file system: an honest passthrough, and faults exactly on cue.

Real mounts under tmp_path, driven the way the replicator tests drive it: syscalls on
the mount from this process and from a child process, rules over the control socket.
Every test also checks that no mount or faultfs process outlives it.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faultfs import FaultControl, FaultFS, FaultFSError, is_mounted
from tests.faultfs.fs import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    Faults,
    fallocate,
    renameat2,
)
from tests.tools import processes

pytestmark = pytest.mark.timeout(60)

FALLOC_FL_ZERO_RANGE = 0x10
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]


def _faultfs_procs(marker: str) -> list[int]:
    """Live faultfs processes whose command line names ``marker`` (zombies excluded)."""
    return [
        p.pid
        for p in processes()
        if b"tests.faultfs" in p.argv
        and any(marker.encode() in a for a in p.argv)
        and p.state != "Z"
    ]


def _mounts_under(root: Path) -> list[str]:
    with open("/proc/mounts") as f:
        return [line for line in f if str(root) in line.split()[1]]


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path: Path) -> Iterator[None]:
    """After each test (and its other fixtures): no mount and no faultfs process left."""
    assert os.path.exists("/dev/fuse"), "/dev/fuse is missing"
    yield
    assert _mounts_under(tmp_path) == []
    assert _faultfs_procs(str(tmp_path)) == []


@pytest.fixture
def ffs(tmp_path: Path) -> Iterator[FaultFS]:
    with FaultFS(tmp_path / "src", tmp_path / "mnt") as fs:
        yield fs


def _write(path: Path, data: bytes, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> None:
    fd = os.open(path, flags, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- passthrough


def test_passthrough_files_and_names(ffs: FaultFS) -> None:
    m, s = ffs.mountpoint, ffs.source
    (s / "pre").write_bytes(b"made in the source")
    assert (m / "pre").read_bytes() == b"made in the source"  # seen at once (no caching)

    data = os.urandom(3 * MiB + 123)
    _write(m / "f", data)
    assert (m / "f").read_bytes() == data == (s / "f").read_bytes()
    assert os.stat(m / "f").st_size == len(data)
    # the real inode numbers, as a remount (a reboot) would show them again
    assert os.stat(m / "f").st_ino == os.stat(s / "f").st_ino
    assert os.stat(m / "pre").st_ino == os.stat(s / "pre").st_ino

    fd = os.open(m / "f", os.O_RDWR)
    try:
        assert os.pwrite(fd, b"tail", 5 * MiB) == 4  # past the end: sparse
        assert os.pread(fd, 4, 5 * MiB) == b"tail"
        assert os.fstat(fd).st_size == 5 * MiB + 4
        os.ftruncate(fd, 10)
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    assert (s / "f").read_bytes() == data[:10]
    os.truncate(m / "f", 20)
    assert (s / "f").read_bytes() == data[:10] + bytes(10)
    _write(m / "f", b"ab", os.O_WRONLY | os.O_APPEND)
    assert (s / "f").read_bytes() == data[:10] + bytes(10) + b"ab"
    _write(m / "f", b"new")  # O_TRUNC
    assert (s / "f").read_bytes() == b"new"
    with pytest.raises(FileExistsError):
        os.open(m / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL)

    os.chmod(m / "f", 0o640)
    assert stat.S_IMODE(os.stat(s / "f").st_mode) == 0o640
    os.utime(m / "f", ns=(1_000_000_000, 2_000_000_000))
    assert os.stat(s / "f").st_mtime_ns == 2_000_000_000

    os.mkdir(m / "d", 0o750)
    assert stat.S_IMODE(os.stat(s / "d").st_mode) == 0o750
    os.rename(m / "f", m / "d" / "g")
    assert sorted(os.listdir(m)) == ["d", "pre"]
    assert (s / "d" / "g").read_bytes() == b"new"
    with pytest.raises(OSError) as e:
        os.rmdir(m / "d")
    assert e.value.errno == errno.ENOTEMPTY
    os.symlink("d/g", m / "link")
    assert os.readlink(m / "link") == "d/g" == os.readlink(s / "link")
    assert (m / "link").read_bytes() == b"new"
    with pytest.raises(PermissionError):
        os.link(m / "pre", m / "hard")
    os.unlink(m / "link")
    os.unlink(m / "d" / "g")
    os.rmdir(m / "d")
    assert sorted(os.listdir(s)) == ["pre"]

    dfd = os.open(m, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    assert os.statvfs(m).f_bsize > 0


def test_rename_flags_and_open_handles_follow_renames(ffs: FaultFS) -> None:
    m, s = ffs.mountpoint, ffs.source
    (s / "a").write_bytes(b"A")
    (s / "b").write_bytes(b"B")
    with pytest.raises(FileExistsError):
        renameat2(str(m / "a"), str(m / "b"), RENAME_NOREPLACE)
    renameat2(str(m / "a"), str(m / "b"), RENAME_EXCHANGE)
    assert (s / "a").read_bytes() == b"B" and (s / "b").read_bytes() == b"A"
    renameat2(str(m / "a"), str(m / "c"), RENAME_NOREPLACE)
    assert sorted(os.listdir(s)) == ["b", "c"]

    # a handle opened before its directory moves writes the file at its new place, and
    # rules match the new path
    os.makedirs(m / "old" / "sub")
    fd = os.open(m / "old" / "sub" / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.rename(m / "old", m / "new")
        rule = ffs.add("write", errno.EIO, path="new/sub/f", times=1)
        with pytest.raises(OSError) as e:
            os.write(fd, b"x")
        assert e.value.errno == errno.EIO
        assert os.write(fd, b"moved") == 5
    finally:
        os.close(fd)
    assert ffs.hits()[str(rule)] == 1
    assert (s / "new" / "sub" / "f").read_bytes() == b"moved"

    # an unlinked file stays writable through its open handle
    fd = os.open(m / "c", os.O_RDWR)
    try:
        os.unlink(m / "c")
        assert os.pwrite(fd, b"still", 0) == 5
        assert os.pread(fd, 5, 0) == b"still"
    finally:
        os.close(fd)
    assert not (s / "c").exists()


def test_fallocate_punch_hole_zero_range_and_allocate(ffs: FaultFS) -> None:
    m, s = ffs.mountpoint, ffs.source
    data = os.urandom(MiB)
    _write(m / "disk.img", data)
    fd = os.open(m / "disk.img", os.O_RDWR)
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 256 * 1024, 256 * 1024)
        fallocate(fd, FALLOC_FL_ZERO_RANGE, 768 * 1024, 4096)
        fallocate(fd, 0, MiB, MiB)  # allocate and grow
        os.fsync(fd)
        assert os.fstat(fd).st_size == 2 * MiB
        assert os.pread(fd, 256 * 1024, 256 * 1024) == bytes(256 * 1024)
    finally:
        os.close(fd)
    want = bytearray(data)
    want[256 * 1024 : 512 * 1024] = bytes(256 * 1024)
    want[768 * 1024 : 768 * 1024 + 4096] = bytes(4096)
    assert (s / "disk.img").read_bytes() == bytes(want) + bytes(MiB)
    sfd = os.open(s / "disk.img", os.O_RDONLY)
    try:
        assert os.lseek(sfd, 0, os.SEEK_HOLE) == 256 * 1024  # a real hole in the source
        assert os.lseek(sfd, 256 * 1024, os.SEEK_DATA) == 512 * 1024
    finally:
        os.close(sfd)


# ---------------------------------------------------------------------------- rules


def test_write_rule_fails_only_matching_files_and_writes_nothing(ffs: FaultFS) -> None:
    m, s = ffs.mountpoint, ffs.source
    rule = ffs.add("write", errno.ENOSPC, path="*.dat")
    for name in ("a.dat", "sub/b.dat"):
        (m / name).parent.mkdir(exist_ok=True)
        fd = os.open(m / name, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            with pytest.raises(OSError) as e:
                os.write(fd, b"x" * 10_000)
            assert e.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        assert (s / name).stat().st_size == 0
    _write(m / "c.txt", b"fine")
    assert (s / "c.txt").read_bytes() == b"fine"
    assert ffs.hits() == {str(rule): 2}

    ffs.clear()
    _write(m / "a.dat", b"works again")
    assert (s / "a.dat").read_bytes() == b"works again"
    assert ffs.hits() == {str(rule): 2}  # kept after clear


def test_partial_write_writes_half_then_fails(ffs: FaultFS) -> None:
    m, s = ffs.mountpoint, ffs.source
    ffs.add("write", errno.EIO, path="p.bin", partial=True, times=1)
    data = os.urandom(64 * 1024)
    fd = os.open(m / "p.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with pytest.raises(OSError) as e:
            os.pwrite(fd, data, 0)
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert (s / "p.bin").read_bytes() == data[: 32 * 1024]  # torn
    assert os.stat(m / "p.bin").st_size == 32 * 1024


def test_fsync_rule_after_and_times(ffs: FaultFS) -> None:
    m = ffs.mountpoint
    rule = ffs.add("fsync", errno.EIO, path="*journal*", after=2, times=2)
    fd = os.open(m / "journal.seg", os.O_WRONLY | os.O_CREAT, 0o644)
    other = os.open(m / "state", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        results: list[int] = []
        for i in range(5):
            os.write(fd, b"r")
            os.fsync(other)  # not matching: neither counted by the rule nor failed
            try:
                (os.fsync if i % 2 else os.fdatasync)(fd)
                results.append(0)
            except OSError as exc:
                results.append(exc.errno or -1)
    finally:
        os.close(fd)
        os.close(other)
    assert results == [0, 0, errno.EIO, errno.EIO, 0]
    assert ffs.hits() == {str(rule): 2}
    assert ffs.count()["fsync"] == 10
    assert ffs.count("*journal*")["fsync"] == 5


def test_rename_rule_matches_old_or_new_path(ffs: FaultFS) -> None:
    m, s = ffs.mountpoint, ffs.source
    for name in ("x.tmp", "y", "z", ".applied.state.tmp"):
        (s / name).write_bytes(name.encode())
    tmp_rule = ffs.add("rename", errno.EIO, path="*.tmp", times=2)
    with pytest.raises(OSError):
        os.rename(m / "x.tmp", m / "x")  # old path matches
    with pytest.raises(OSError):
        os.rename(m / "y", m / "y.tmp")  # new path matches
    assert ffs.hits()[str(tmp_rule)] == 2
    os.rename(m / "z", m / "w")
    state_rule = ffs.add("rename", errno.ENOSPC, path="*applied.state")
    with pytest.raises(OSError) as e:
        os.replace(m / ".applied.state.tmp", m / "applied.state")  # an atomic write's rename
    assert e.value.errno == errno.ENOSPC
    assert sorted(os.listdir(s)) == [".applied.state.tmp", "w", "x.tmp", "y"]
    assert ffs.hits() == {str(tmp_rule): 2, str(state_rule): 1}
    assert ffs.count("applied.state") == {"rename": 1}


def test_every_op_kind_fails_without_taking_effect(ffs: FaultFS) -> None:
    m, s = ffs.mountpoint, ffs.source

    def fails(op: str, err: int, action: object, path: str = "*") -> None:
        assert callable(action)
        ffs.add(op, err, path=path)
        with pytest.raises(OSError) as e:
            action()
        assert e.value.errno == err, (op, e.value)
        ffs.clear()

    (s / "f").write_bytes(b"content")
    (s / "d").mkdir()
    fails("create", errno.EDQUOT, lambda: os.open(m / "n.seg", os.O_CREAT | os.O_WRONLY, 0o600))
    assert not (s / "n.seg").exists()
    fails("open", errno.EACCES, lambda: os.open(m / "f", os.O_RDONLY))
    fails("truncate", errno.EFBIG, lambda: os.truncate(m / "f", 1))
    fails("truncate", errno.EROFS, lambda: os.open(m / "f", os.O_WRONLY | os.O_TRUNC))
    fails("chmod", errno.EPERM, lambda: os.chmod(m / "f", 0o600))
    fails("mkdir", errno.EDQUOT, lambda: os.mkdir(m / "e"))
    fails("rmdir", errno.EBUSY, lambda: os.rmdir(m / "d"))
    fails("unlink", errno.EIO, lambda: os.unlink(m / "f"))
    fails("symlink", errno.ENOSPC, lambda: os.symlink("f", m / "l"))
    fails("statfs", errno.EIO, lambda: os.statvfs(m))
    assert (s / "f").read_bytes() == b"content"
    assert stat.S_IMODE((s / "f").stat().st_mode) != 0o600
    assert sorted(os.listdir(s)) == ["d", "f"]

    fd = os.open(m / "f", os.O_RDWR)
    try:
        fails("read", errno.EIO, lambda: os.pread(fd, 7, 0))
        fails("fallocate", errno.ENOSPC, lambda: fallocate(fd, 0, 0, MiB))
        fails("*", errno.EIO, lambda: os.fsync(fd))
        assert os.fstat(fd).st_size == 7
    finally:
        os.close(fd)
    fd = os.open(m / "f", os.O_RDONLY)
    fails("flush", errno.EIO, lambda: os.close(fd))  # close reports it; fd is closed anyway
    with pytest.raises(OSError):
        os.fstat(fd)
    dfd = os.open(m / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fails("fsyncdir", errno.EIO, lambda: os.fsync(dfd), path="d")
    finally:
        os.close(dfd)
    with pytest.raises(ValueError, match="unknown op"):
        ffs.add("frobnicate", errno.EIO)
    with pytest.raises(ValueError, match="ENOSYS"):
        ffs.add("fsync", errno.ENOSYS)
    with pytest.raises(ValueError, match="partial"):
        ffs.add("fsync", errno.EIO, partial=True)
    assert ffs.stats()["internal_errors"] == 0


def test_budget_is_a_small_disk(ffs: FaultFS) -> None:
    m, s = ffs.mountpoint, ffs.source
    ffs.budget(3 * MiB)
    assert os.statvfs(m).f_bavail * os.statvfs(m).f_frsize == 3 * MiB
    fd = os.open(m / "big", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert os.write(fd, bytes(2 * MiB)) == 2 * MiB
        assert os.write(fd, bytes(2 * MiB)) == MiB  # cut short, like a filling disk
        with pytest.raises(OSError) as e:
            os.write(fd, b"x")
        assert e.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as e:
            fallocate(fd, 0, 0, 8 * MiB)
        assert e.value.errno == errno.ENOSPC
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, MiB)  # frees, costs nothing
        assert os.statvfs(m).f_bavail == 0
        ffs.budget(None)
        assert os.write(fd, b"room again") == 10
    finally:
        os.close(fd)
    assert (s / "big").stat().st_size == 3 * MiB + 10
    assert ffs.stats()["budget_refusals"] == 3


# ---------------------------------------------------------------------------- power cut


def _sync_folder(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def test_power_cut_takes_back_what_no_fsync_covered(ffs: FaultFS) -> None:
    """Each file holds what its last fsync covered: later writes, growth, truncates, punched
    holes and an O_TRUNC are taken back; an atomic write renamed into place without an
    fsync comes back empty; an fsync through another descriptor covers the file."""
    m, s = ffs.mountpoint, ffs.source
    _write(m / "kept", b"a" * 8192)
    _write(m / "old", b"o" * 100)
    ffs.track_unsynced()
    fd = os.open(m / "data", os.O_RDWR | os.O_CREAT, 0o644)
    other = os.open(m / "data", os.O_RDONLY)
    try:
        os.pwrite(fd, b"1" * 8192, 0)
        os.fsync(other)  # any descriptor of the file: the write above is durable
        os.pwrite(fd, b"2" * 4096, 4096)  # after the sync: taken back
        os.pwrite(fd, b"3" * 4096, 16384)  # grows the file: cut off again
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096)
    finally:
        os.close(other)
        os.close(fd)
    fd = os.open(m / "kept", os.O_RDWR)
    try:
        os.ftruncate(fd, 100)
        os.fdatasync(fd)  # the truncate is durable
        os.pwrite(fd, b"b" * 50, 50)
    finally:
        os.close(fd)
    _write(m / "new.tmp", b"n" * 300)
    os.rename(m / "new.tmp", m / "old")  # over "old", never synced
    _write(m / "kept2", b"z")  # O_TRUNC of a new file, never synced
    _sync_folder(m)  # every name is durable: only data is taken back
    undone = ffs.power_cut()
    with pytest.raises(OSError) as e:
        os.stat(m / "kept")
    assert e.value.errno == errno.EIO  # the machine is off
    assert (s / "data").read_bytes() == b"1" * 8192
    assert (s / "kept").read_bytes() == b"a" * 100
    assert (s / "old").read_bytes() == b""
    assert (s / "kept2").read_bytes() == b""
    assert undone["files"] == 4 and undone["changes_undone"] == 8  # O_TRUNC counts too


def test_what_a_failed_fsync_covered_is_lost_until_written_and_synced_again(
    ffs: FaultFS,
) -> None:
    """fsyncgate: after an fsync failed, a later one that succeeds does not make the bytes
    the failed one covered durable (the kernel dropped them); writing them again does."""
    m, s = ffs.mountpoint, ffs.source
    _write(m / "a", b"0" * 8192)
    _write(m / "b", b"0" * 8192)
    ffs.track_unsynced()
    for name in ("a", "b"):
        fd = os.open(m / name, os.O_RDWR)
        try:
            os.pwrite(fd, b"1" * 8192, 0)
            rule = ffs.add("fsync", errno.EIO, path=name, times=1)
            with pytest.raises(OSError) as e:
                os.fsync(fd)
            assert e.value.errno == errno.EIO
            ffs.remove(rule)
            if name == "b":  # rewritten in two parts, then synced: durable
                os.pwrite(fd, os.pread(fd, 4096, 0), 0)
                os.pwrite(fd, os.pread(fd, 4096, 4096), 4096)
            os.fsync(fd)  # succeeds
        finally:
            os.close(fd)
    ffs.power_cut()
    assert (s / "a").read_bytes() == b"0" * 8192  # the successful fsync did not save it
    assert (s / "b").read_bytes() == b"1" * 8192


def test_power_cut_takes_back_names_no_folder_fsync_covered(ffs: FaultFS) -> None:
    """A new file, a rename over another, an unlink, a new folder: each stays only if the
    folders it changed were fsynced after it; the file's own fsync is not enough."""
    m, s = ffs.mountpoint, ffs.source
    (m / "d").mkdir()
    _write(m / "d" / "gone", b"g")
    _write(m / "d" / "target", b"t")
    ffs.track_unsynced()

    def write_synced(path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    write_synced(m / "kept", b"k")
    _sync_folder(m)  # "kept" is durable
    write_synced(m / "lost", b"l")  # its data synced, its name never
    write_synced(m / "d" / "new", b"n")
    os.rename(m / "d" / "new", m / "d" / "target")  # replaces "target"
    os.unlink(m / "d" / "gone")
    (m / "e").mkdir()
    write_synced(m / "e" / "inner", b"i")
    _sync_folder(m / "e")  # durable in "e", but "e" itself is not
    undone = ffs.power_cut()
    assert sorted(p.name for p in s.iterdir()) == ["d", "kept"]
    assert (s / "kept").read_bytes() == b"k"
    assert sorted(p.name for p in (s / "d").iterdir()) == ["gone", "target"]
    assert (s / "d" / "target").read_bytes() == b"t"  # the old file, back in its place
    assert (s / "d" / "gone").read_bytes() == b"g"
    assert undone["names_undone"] == 5  # e/inner was durable in e
    assert not Path(f"{s}.stash").exists()


def test_random_writeback_leaves_each_page_at_one_of_its_versions(tmp_path: Path) -> None:
    """With a seed the cut keeps, page by page, some of the unsynced changes: every page
    is one of the versions it passed through, and a two-page write can come back torn."""
    import random

    from tests.faultfs.volatile import PAGE, VolatileWrites

    path = tmp_path / "f"
    seen: set[bytes] = set()
    for seed in range(60):
        path.write_bytes(b"0" * (3 * PAGE))
        model = VolatileWrites()
        model.arm()
        fd = os.open(path, os.O_RDWR)
        try:
            for offset, data in ((0, b"a" * PAGE), (0, b"b" * 2 * PAGE), (2 * PAGE, b"c" * PAGE)):
                model.before_change(fd, offset, len(data))
                os.pwrite(fd, data, offset)
            model.cut(random.Random(seed))
        finally:
            os.close(fd)
        content = path.read_bytes()
        pages = [content[i : i + PAGE][:1] for i in range(0, 3 * PAGE, PAGE)]
        assert pages[0] in (b"0", b"a", b"b") and pages[1] in (b"0", b"b")
        assert pages[2] in (b"0", b"c") and len(content) == 3 * PAGE
        assert all(
            content[i : i + PAGE] == pages[i // PAGE] * PAGE for i in range(0, len(content), PAGE)
        )
        seen.add(b"".join(pages))
    assert b"b0c" in seen or b"0b0" in seen or b"0bc" in seen  # torn: one page of the two
    assert b"000" in seen and b"bbc" in seen  # and the extremes


def test_a_sync_covers_only_changes_made_before_it_started(tmp_path: Path) -> None:
    """The model's bookkeeping on its own: a sync mark taken before later changes drops
    only the earlier ones, and marks that end out of order are both honoured."""
    from tests.faultfs.volatile import VolatileWrites

    path = tmp_path / "f"
    path.write_bytes(b"0" * 30)
    model = VolatileWrites()
    model.arm()
    fd = os.open(path, os.O_RDWR)
    try:
        for i, byte in enumerate(b"abc"):
            if i == 1:
                first = model.sync_starts(fd)  # covers change 0
            if i == 2:
                second = model.sync_starts(fd)  # covers changes 0 and 1
            model.before_change(fd, 10 * i, 10)
            os.pwrite(fd, bytes([byte]) * 10, 10 * i)
        model.synced(second)
        model.synced(first)  # ended later: covers nothing new
        assert model.cut()["changes_undone"] == 1
    finally:
        os.close(fd)
    assert path.read_bytes() == b"a" * 10 + b"b" * 10 + b"0" * 10


# ---------------------------------------------------------------------------- control


def test_other_processes_use_the_mount_and_the_control_socket(ffs: FaultFS) -> None:
    """A child arms a rule through its own control connection and meets it in write(2)."""
    child = f"""
import errno, os
from tests.faultfs import FaultControl
ctl = FaultControl({ffs.control!r})
rule = ctl.add("write", errno.EDQUOT, path="*.seg", times=1)
fd = os.open({str(ffs.mountpoint / "j.seg")!r}, os.O_WRONLY | os.O_CREAT, 0o644)
try:
    os.write(fd, b"a")
except OSError as e:
    print(rule, errno.errorcode[e.errno])
os.write(fd, b"b")
os.close(fd)
ctl.close()
"""
    out = subprocess.run(
        [sys.executable, "-c", child],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        check=True,
    )
    rule, name = out.stdout.split()
    assert name == "EDQUOT"
    assert ffs.hits()[rule] == 1
    assert (ffs.source / "j.seg").read_bytes() == b"b"


def test_control_protocol_is_json_lines(ffs: FaultFS, tmp_path: Path) -> None:
    import json
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect("\0" + ffs.control[1:])
        f = sock.makefile("rwb")
        f.write(b'{"cmd": "add", "op": "write", "errno": 28, "path": "*.dat"}\nnot json\n')
        f.write(b'{"cmd": "remove", "id": 1}\n{"cmd": "nope"}\n')
        f.flush()
        replies = [json.loads(f.readline()) for _ in range(4)]
        f.close()
    assert replies[0] == {"ok": True, "id": 1}
    assert replies[1]["ok"] is False and "JSON" in replies[1]["error"]
    assert replies[2] == {"ok": True, "removed": True}
    assert replies[3]["ok"] is False
    with pytest.raises(ValueError, match="errno"):
        ffs.add("write", 0)


def test_counts_by_kind_and_path(ffs: FaultFS) -> None:
    m = ffs.mountpoint
    before = ffs.count()
    _write(m / "a.seg", b"1")
    _write(m / "b.state", b"2")
    after = ffs.count()
    assert after["create"] - before.get("create", 0) == 2
    assert ffs.count("*.seg") == {"create": 1, "write": 1, "flush": 1}
    assert ffs.count("nothing*") == {}


# ---------------------------------------------------------------------------- lifecycle


def test_cleanup_when_the_block_raises_with_the_mount_busy(tmp_path: Path) -> None:
    fs = FaultFS(tmp_path / "src", tmp_path / "mnt")
    fd = -1
    with pytest.raises(RuntimeError, match="test failed"), fs:
        pid = fs.pid
        fd = os.open(fs.mountpoint / "held", os.O_WRONLY | os.O_CREAT, 0o644)
        fs.add("*", errno.EIO)
        raise RuntimeError("test failed")
    assert fs.proc is None and pid is not None
    assert not is_mounted(tmp_path / "mnt")
    assert _mounts_under(tmp_path) == []  # (other runs may have mounts of their own)
    assert not Path(f"/proc/{pid}").exists()
    try:
        os.close(fd)  # the connection is gone; closing may report it
    except OSError as exc:
        assert exc.errno in (errno.ENOTCONN, errno.EIO), exc
    fs.stop()  # idempotent


_FAILING_TEST = """
import errno, os, pytest
from tests.faultfs import FaultFS

@pytest.fixture
def fs(tmp_path):
    with FaultFS(tmp_path / "src", tmp_path / "mnt") as fs:
        yield fs

def test_fails_with_the_mount_busy(fs):
    os.open(fs.mountpoint / "held", os.O_WRONLY | os.O_CREAT, 0o644)  # never closed
    fs.add("fsync", errno.EIO)
    assert False, "boom"
"""


def test_fixture_teardown_cleans_up_after_a_failing_test(tmp_path: Path) -> None:
    """The documented fixture, in a pytest run of its own whose test fails."""
    (tmp_path / "test_inner.py").write_text(_FAILING_TEST)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
         str(tmp_path / "inner"), "test_inner.py"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    assert "1 failed" in out.stdout and "boom" in out.stdout, out.stdout
    assert _mounts_under(tmp_path) == []
    assert _faultfs_procs(str(tmp_path)) == []


def test_killed_server_is_detected_and_cleaned_up(tmp_path: Path) -> None:
    fs = FaultFS(tmp_path / "src", tmp_path / "mnt")
    with pytest.raises(FaultFSError, match="exited with -9"), fs:
        assert fs.pid is not None
        os.kill(fs.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while fs.proc is not None and fs.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(OSError) as e:
            os.stat(fs.mountpoint / "x")
        assert e.value.errno == errno.ENOTCONN  # what a stale mount answers
    assert _mounts_under(tmp_path) == []


def test_server_unmounts_when_the_test_process_is_killed(tmp_path: Path) -> None:
    """A test run killed with SIGKILL (no teardown) leaves no mount and no server."""
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from tests.faultfs import FaultFS\n"
        f"fs = FaultFS(Path({str(src)!r}), Path({str(mnt)!r}))\n"
        "fs.start()\n"
        "print(fs.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert child.stdout is not None
        server = int(child.stdout.readline())
        assert is_mounted(mnt)
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    deadline = time.monotonic() + 10
    while (is_mounted(mnt) or _faultfs_procs(str(tmp_path))) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not is_mounted(mnt)
    assert server not in _faultfs_procs(str(tmp_path))


def test_detached_mode_and_a_socket_file(tmp_path: Path) -> None:
    src, mnt, sock = tmp_path / "src", tmp_path / "mnt", tmp_path / "ctl.sock"
    src.mkdir()
    mnt.mkdir()
    out = subprocess.run(
        [sys.executable, "-m", "tests.faultfs", str(src), str(mnt), "--control", str(sock)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout)
    try:
        assert is_mounted(mnt)
        ctl = FaultControl(sock)
        try:
            assert ctl.ping() == pid
            ctl.add("mkdir", errno.EROFS)
            with pytest.raises(OSError):
                os.mkdir(mnt / "d")
        finally:
            ctl.close()
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True, timeout=30)
        deadline = time.monotonic() + 10
        while _faultfs_procs(str(tmp_path)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not sock.exists()
    finally:
        if _faultfs_procs(str(tmp_path)):
            os.kill(pid, signal.SIGTERM)
            time.sleep(0.5)
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
    bad = subprocess.run(
        [sys.executable, "-m", "tests.faultfs", str(src), str(src / "in"), "--control", "x"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert bad.returncode == 2 and "not a directory" in bad.stderr


def test_throughput_of_1mib_writes(ffs: FaultFS, capsys: pytest.CaptureFixture[str]) -> None:
    size = 32 * MiB
    chunk = os.urandom(MiB)
    fd = os.open(ffs.mountpoint / "disk.img", os.O_WRONLY | os.O_CREAT, 0o644)
    start = time.perf_counter()
    try:
        for _ in range(size // MiB):
            assert os.write(fd, chunk) == MiB
        os.fsync(fd)
    finally:
        os.close(fd)
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    with open(ffs.mountpoint / "disk.img", "rb", buffering=0) as f:
        while f.read(MiB):
            pass
    read_s = time.perf_counter() - start
    stats = ffs.stats()
    assert stats["max_write"] == MiB  # one FUSE request per 1 MiB write
    assert stats["bytes_written"] == size
    with capsys.disabled():
        print(f"\nfaultfs: write {size / MiB / write_s:.0f} MiB/s, ", end="")
        print(f"read {size / MiB / read_s:.0f} MiB/s")
    assert size / MiB / write_s > 20  # not pathologically slow


# ---------------------------------------------------------------------------- rule table


def test_rule_table_order_after_times_and_validation() -> None:
    faults = Faults()
    first = faults.add("write", errno.EIO, path="a*", after=1, times=1)
    second = faults.add("*", errno.ENOSPC, path="a/b")
    assert faults.check("write", "a/b") is second  # counted by `first`, fired by `second`
    assert second.hits == 1 and first.seen == 1
    assert faults.check("write", "a/b") is first  # first is due now and comes first
    assert faults.check("write", "a/b") is second  # first exhausted
    assert faults.check("fsync", "x") is None
    assert faults.check("rename", "x", "a/b") is second
    assert faults.remove(second.id) and not faults.remove(second.id)
    assert faults.hits() == {str(first.id): 1, str(second.id): 3}
    assert faults.count("a*") == {"write": 3, "rename": 1}
    faults.set_budget(10)
    assert faults.take(4) == 4 and faults.take(10) == 6 and faults.take(1) == 0
    assert not faults.take_all(1)
    faults.clear()
    assert faults.budget_left is None and faults.check("write", "a") is None
    with pytest.raises(ValueError):
        faults.add("nope", errno.EIO)
    with pytest.raises(ValueError):
        faults.add("write", 0)
    with pytest.raises(ValueError):
        faults.add("write", 600)
    with pytest.raises(ValueError):
        faults.add("write", errno.EIO, times=0)
    with pytest.raises(ValueError):
        faults.add("write", errno.EIO, after=-1)
