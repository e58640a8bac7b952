"""File-system operations through a real mount, checked by replaying the journal."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

from replicator.journal import Record, RecordType
from tests.fuse.helpers import FILTER, FuseProc, assert_same_tree, read_journal, replay
from tests.tools import allocated, require_tool, tmpfs

OLD_XML = b"<domain type='kvm'>\n  <name>vm1</name>\n  <memory>1024</memory>\n</domain>\n"
NEW_XML = b"<domain type='kvm'>\n  <name>vm1</name>\n  <memory>4096</memory>\n</domain>\n" * 50


def _initial(fuse: FuseProc, tmp_path: Path) -> Path:
    initial = tmp_path / "initial"
    shutil.copytree(fuse.source, initial, symlinks=True)
    return initial


def test_metadata_operations_replay(fuse: FuseProc, tmp_path: Path) -> None:
    (fuse.source / "keep.txt").write_bytes(b"keep")
    (fuse.source / "gone.txt").write_bytes(b"gone")
    (fuse.source / "olddir").mkdir()
    initial = _initial(fuse, tmp_path)
    fuse.start()
    m = fuse.mnt
    (m / "vm1").mkdir()
    (m / "vm1" / "disks").mkdir(mode=0o750)
    (m / "vm1" / "disks" / "a.raw").write_bytes(os.urandom(300_000))
    os.symlink("disks/a.raw", m / "vm1" / "current")
    os.symlink("/nonexistent/abs", m / "dangling")
    os.chmod(m / "keep.txt", 0o600)
    os.unlink(m / "gone.txt")
    os.rmdir(m / "olddir")
    (m / "tmpdir").mkdir()
    (m / "tmpdir" / "f").write_bytes(b"x" * 5000)
    os.rename(m / "tmpdir", m / "vm1" / "moved")  # a directory with content
    with open(m / "vm1" / "moved" / "f", "r+b") as f:
        f.truncate(100)
        f.seek(0, os.SEEK_END)
        f.write(b"tail")
    os.truncate(m / "vm1" / "disks" / "a.raw", 1 << 20)  # path-based, grows
    assert sorted(os.listdir(m)) == ["dangling", "keep.txt", "vm1"]
    assert fuse.stop() == 0
    assert_same_tree(fuse.source, replay(initial, read_journal(fuse.journal), tmp_path / "rep"))
    assert (fuse.source / "vm1" / "moved" / "f").read_bytes() == b"x" * 100 + b"tail"
    assert (os.stat(fuse.source / "vm1" / "disks").st_mode & 0o777) == 0o750


def test_editor_style_save_is_atomic(fuse: FuseProc, tmp_path: Path) -> None:
    (fuse.source / "vm1.xml").write_bytes(OLD_XML)
    initial = _initial(fuse, tmp_path)
    fuse.start()
    tmp = fuse.mnt / ".vm1.xml.swp"
    with open(tmp, "wb") as f:
        for pos in range(0, len(NEW_XML), 1000):  # several WRITE records
            f.write(NEW_XML[pos : pos + 1000])
            f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, fuse.mnt / "vm1.xml")
    assert fuse.stop() == 0
    records = [r for r in read_journal(fuse.journal) if r.type is not RecordType.FLUSH]
    kinds = [r.type for r in records]
    assert kinds[0] is RecordType.CREATE and records[0].volume == ".vm1.xml.swp"
    assert kinds[-1] is RecordType.RENAME and records[-1].target == "vm1.xml"
    assert set(kinds[1:-1]) == {RecordType.WRITE}
    # every prefix of the stream shows the old or the new file, never a mix or nothing
    all_records = read_journal(fuse.journal)
    renamed_at = next(i for i, r in enumerate(all_records) if r.type is RecordType.RENAME)
    for n in range(len(all_records) + 1):
        rep = replay(initial, all_records[:n], tmp_path / f"rep{n}")
        assert (rep / "vm1.xml").read_bytes() == (NEW_XML if n > renamed_at else OLD_XML)
        shutil.rmtree(rep)


def test_sparse_file_stays_sparse(fuse: FuseProc, tmp_path: Path) -> None:
    initial = _initial(fuse, tmp_path)
    fuse.start()
    path = fuse.mnt / "thin.img"
    size = 256 << 20
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(0)
        f.write(b"\x01" * 4096)
        f.seek(128 << 20)
        f.write(b"\x02" * 65536)
        os.fsync(f.fileno())
    assert fuse.stop() == 0
    rep = replay(initial, read_journal(fuse.journal), tmp_path / "rep")
    assert_same_tree(fuse.source, rep)
    for p in (fuse.source / "thin.img", rep / "thin.img"):
        st = p.stat()
        assert st.st_size == size
        assert st.st_blocks * 512 < 1 << 20, (p, st.st_blocks)


def _is_hole(path: Path, offset: int, length: int) -> bool:
    """No data in ``[offset, offset+length)`` (SEEK_DATA lands past it, or there is none)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
    except OSError as exc:  # ENXIO: no data after offset
        return exc.errno == errno.ENXIO
    finally:
        os.close(fd)


def test_fallocate_punch_zero_and_grow_replay(fuse: FuseProc, tmp_path: Path) -> None:
    require_tool("fallocate")  # util-linux, a real client of fallocate(2)
    initial = _initial(fuse, tmp_path)
    fuse.start()
    path = fuse.mnt / "disk.raw"
    mib = 1 << 20
    path.write_bytes(os.urandom(8 * mib))

    def falloc(*args: str) -> None:
        subprocess.run(["fallocate", *args, str(path)], check=True, capture_output=True)

    falloc("--punch-hole", "--offset", str(1 * mib), "--length", str(2 * mib))
    falloc("--zero-range", "--keep-size", "--offset", str(4 * mib), "--length", str(mib))
    falloc("--keep-size", "--offset", str(2 * mib), "--length", str(2 * mib))  # half a hole
    falloc("--punch-hole", "--offset", str(7 * mib), "--length", str(4 * mib))  # past EOF
    falloc("--offset", str(8 * mib), "--length", str(8 * mib))  # grows the file
    falloc("--keep-size", "--offset", str(20 * mib), "--length", str(mib))  # past EOF
    assert fuse.stop() == 0
    skip = {RecordType.CREATE, RecordType.WRITE, RecordType.FLUSH}
    changes = [
        (r.type, r.offset, r.length) for r in read_journal(fuse.journal) if r.type not in skip
    ]
    assert changes == [
        (RecordType.TRIM, 1 * mib, 2 * mib),
        (RecordType.ZERO, 4 * mib, mib),
        (RecordType.ZERO, 2 * mib, mib),  # the hole it filled: allocated, reads as zeros
        (RecordType.TRIM, 7 * mib, mib),  # clipped to the file's size
        (RecordType.RESIZE, 0, 16 * mib),
        (RecordType.ZERO, 8 * mib, 8 * mib),  # the growth: allocated too
    ], changes
    rep = replay(initial, read_journal(fuse.journal), tmp_path / "rep")
    assert_same_tree(fuse.source, rep)
    for image in (fuse.source / "disk.raw", rep / "disk.raw"):
        assert image.stat().st_size == 16 * mib
        assert _is_hole(image, 1 * mib, mib), image
        assert _is_hole(image, 7 * mib, mib), image
    # the replica holds the blocks the source holds (FIEMAP: fallocated ones included)
    assert allocated(rep / "disk.raw") == allocated(fuse.source / "disk.raw")
    assert allocated(rep / "disk.raw") == [(0, mib), (2 * mib, 7 * mib), (8 * mib, 16 * mib)]
    with open(rep / "disk.raw", "rb") as f:
        f.seek(4 * mib)
        assert f.read(mib) == bytes(mib)


def test_writes_through_an_unlinked_file_do_not_reach_its_successor(
    fuse: FuseProc, tmp_path: Path
) -> None:
    initial = _initial(fuse, tmp_path)
    fuse.start()
    old = open(fuse.mnt / "f", "wb")  # noqa: SIM115 - kept open across the unlink
    try:
        old.write(b"first")
        old.flush()
        os.unlink(fuse.mnt / "f")
        (fuse.mnt / "f").write_bytes(b"second")
        old.write(b"late bytes of the unlinked file")
        old.flush()
        os.fsync(old.fileno())
    finally:
        old.close()
    assert fuse.stop() == 0
    rep = replay(initial, read_journal(fuse.journal), tmp_path / "rep")
    assert (rep / "f").read_bytes() == b"second"
    assert_same_tree(fuse.source, rep)


def test_open_file_keeps_journaling_after_its_directory_is_renamed(
    fuse: FuseProc, tmp_path: Path
) -> None:
    initial = _initial(fuse, tmp_path)
    fuse.start()
    (fuse.mnt / "a").mkdir()
    with open(fuse.mnt / "a" / "disk", "wb") as f:
        f.write(b"1" * 4096)
        f.flush()
        os.rename(fuse.mnt / "a", fuse.mnt / "b")
        f.write(b"2" * 4096)
        f.flush()
        os.fsync(f.fileno())
    assert fuse.stop() == 0
    records = read_journal(fuse.journal)
    writes = [r.volume for r in records if r.type is RecordType.WRITE]
    assert writes == ["a/disk", "b/disk"]
    rep = replay(initial, records, tmp_path / "rep")
    assert_same_tree(fuse.source, rep)
    assert (rep / "b" / "disk").read_bytes() == b"1" * 4096 + b"2" * 4096


def test_o_trunc_and_rename_over_replay(fuse: FuseProc, tmp_path: Path) -> None:
    (fuse.source / "cfg").write_bytes(b"A" * 10000)
    (fuse.source / "other").write_bytes(b"B" * 100)
    initial = _initial(fuse, tmp_path)
    fuse.start()
    (fuse.mnt / "cfg").write_bytes(b"short")  # open(O_TRUNC) on an existing file
    os.rename(fuse.mnt / "other", fuse.mnt / "cfg")
    assert fuse.stop() == 0
    records = read_journal(fuse.journal)
    assert Record.resize("cfg", 0).type in {r.type for r in records}
    rep = replay(initial, records, tmp_path / "rep")
    assert_same_tree(fuse.source, rep)
    assert (rep / "cfg").read_bytes() == b"B" * 100


def test_a_read_only_open_with_o_trunc_truncates_as_on_a_local_file_system(
    fuse: FuseProc, tmp_path: Path
) -> None:
    """open(O_RDONLY|O_TRUNC) empties the file on ext4 (the kernel asks the caller for
    write access first); through the mount it answered success and left the file whole."""
    (fuse.source / "cfg").write_bytes(b"A" * 10_000)
    (tmp_path / "local").write_bytes(b"A" * 10_000)  # outside the mount
    initial = _initial(fuse, tmp_path)
    fuse.start()
    for path in (tmp_path / "local", fuse.mnt / "cfg"):
        fd = os.open(path, os.O_RDONLY | os.O_TRUNC)
        try:
            assert os.fstat(fd).st_size == 0, path
        finally:
            os.close(fd)
    assert fuse.stop() == 0
    assert (fuse.source / "cfg").read_bytes() == b""
    assert_same_tree(fuse.source, replay(initial, read_journal(fuse.journal), tmp_path / "rep"))


def test_unreplicable_operations_are_refused(fuse: FuseProc, tmp_path: Path) -> None:
    """Each with its errno and a log line naming the operation and the path (hard links,
    fifos, exchanges and xattrs were refused with nothing in the log, and setxattr only
    by the kernel, which took pyfuse3's ENOSYS for "never ask again")."""
    (fuse.source / "f").write_bytes(b"x")
    (fuse.source / "g").write_bytes(b"y")
    fuse.start()
    m = fuse.mnt
    for code, call in (
        (errno.EPERM, lambda: os.link(m / "f", m / "hard")),
        (errno.EPERM, lambda: os.mkfifo(m / "fifo")),
        (errno.EINVAL, lambda: (m / "bad\x01name").write_bytes(b"")),
        (errno.EOPNOTSUPP, lambda: os.setxattr(m / "f", "user.a", b"1")),
        (errno.EOPNOTSUPP, lambda: os.setxattr(m / "g", "user.a", b"1")),
        (errno.EINVAL, lambda: _rename_exchange(m / "f", m / "g")),
        (errno.EPERM, lambda: os.chmod(m, 0o750)),  # EINVAL "empty path" before
    ):
        try:
            call()
        except OSError as exc:
            assert exc.errno == code, exc
        else:
            raise AssertionError("operation should have been refused")
    assert sorted(os.listdir(m)) == ["f", "g"]
    assert fuse.stop() == 0
    types = {r.type for r in read_journal(fuse.journal)}
    assert types <= {RecordType.FLUSH}
    refused = [
        (e["op"], e["path"], e["errno"])
        for e in fuse.events()
        if e.get("event") == "fuse.operation_refused"
    ]
    assert refused == [  # the second setxattr within a minute: counted, not logged
        ("link", "hard", "EPERM"),
        ("mknod", "fifo", "EPERM"),
        ("setxattr", "f", errno.errorcode[errno.EOPNOTSUPP]),
        ("rename_exchange", "f", "EINVAL"),
        ("chmod", "", "EPERM"),
    ]
    assert "fuse.unreplicable_name" in [e.get("event") for e in fuse.events()]


def _rename_exchange(a: Path, b: Path) -> None:
    """renameat2(RENAME_EXCHANGE), which Python has no call for."""
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def test_sigterm_unmounts_and_exits_zero(fuse: FuseProc) -> None:
    fuse.start()
    (fuse.mnt / "x").write_bytes(b"data")
    assert fuse.stop() == 0
    assert not os.path.ismount(fuse.mnt)
    events = [e["event"] for e in fuse.events()]
    assert events[-1] == "fuse.unmounted", events


def _run_filter(*args: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FILTER, *map(str, args)], capture_output=True, text=True, timeout=60)


def test_clear_errors(tmp_path: Path) -> None:
    src, mnt, jr = tmp_path / "src", tmp_path / "mnt", tmp_path / "jr"
    src.mkdir()
    res = _run_filter(tmp_path / "missing", mnt, jr)
    assert res.returncode == 3 and "does not exist" in res.stderr
    res = _run_filter(src, mnt, jr)
    assert res.returncode == 3 and f"mount point {mnt} does not exist" in res.stderr
    mnt.mkdir()
    (mnt / "file").write_bytes(b"")
    res = _run_filter(src, mnt, jr)
    assert res.returncode == 3 and "is not empty" in res.stderr
    res = _run_filter(src, src / "inner", jr)
    assert res.returncode == 3 and "overlap" in res.stderr
    assert sys.executable  # the child ran under this interpreter


def _largest_size(folder: Path) -> int:
    """The largest file size the file system of ``folder`` allows, found with ftruncate."""
    probe = folder.parent / "size-probe"
    fd = os.open(probe, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        low, high = 0, 1 << 63
        while high - low > 1:
            mid = (low + high) // 2
            try:
                os.ftruncate(fd, mid)
            except OSError:
                high = mid
            else:
                low = mid
    finally:
        os.close(fd)
        probe.unlink()
    return low


def test_changes_past_the_largest_file_size_are_refused_before_journaling(
    fuse: FuseProc, tmp_path: Path
) -> None:
    """`fallocate -l 100T` on ext4 (16 TiB at most) journaled RESIZE 100T, then failed
    with EFBIG: the receiver failed to apply that record the same way and refused every
    record after it, for good. A write, truncate or fallocate past the limit now gets
    the errno the file system gives (EFBIG, a short write) before anything is journaled."""
    (fuse.source / "disk").write_bytes(b"d" * 8192)
    initial = _initial(fuse, tmp_path)
    limit = _largest_size(fuse.source)
    fuse.start()
    disk = fuse.mnt / "disk"
    fd = os.open(disk, os.O_RDWR)
    try:
        for call in (
            lambda: os.posix_fallocate(fd, 0, limit + 4096),
            lambda: os.truncate(disk, limit + 1),
            lambda: os.ftruncate(fd, limit + 1),
            lambda: os.pwrite(fd, b"x", limit),
        ):
            try:
                call()
            except OSError as exc:
                assert exc.errno == errno.EFBIG, exc
            else:
                raise AssertionError("a change past the largest file size succeeded")
        assert os.pwrite(fd, b"y" * 100, limit - 10) == 10  # a short write, as ext4's
        assert os.fstat(fd).st_size == limit
        os.ftruncate(fd, 16384)  # not a file of 16 TiB to compare
        os.fsync(fd)
    finally:
        os.close(fd)
    assert fuse.stop() == 0
    assert_same_tree(fuse.source, replay(initial, read_journal(fuse.journal), tmp_path / "rep"))


def test_a_full_source_disk_answers_enospc_and_the_folder_goes_on(
    fuse: FuseProc, tmp_path: Path
) -> None:
    """`dd` (a write-only open) filling the source's disk got ENOSPC, and then the filter
    read the range back to journal what the file held: EBADF on the write-only real
    file, so the whole folder diverged and every change after it, anywhere in the VM
    folder, failed with EIO until the sender restarted."""
    with tmpfs(fuse.source, "4m"):
        (fuse.source / "vm.xml").write_bytes(OLD_XML)
        initial = _initial(fuse, tmp_path)
        fuse.start()
        dd = subprocess.run(
            ["dd", "if=/dev/urandom", f"of={fuse.mnt / 'big'}", "bs=1M", "count=8"],
            capture_output=True,
            text=True,
        )
        assert dd.returncode != 0 and "No space left on device" in dd.stderr, dd.stderr
        os.unlink(fuse.mnt / "big")  # EIO here before: the folder had diverged
        with open(fuse.mnt / "vm.xml", "wb") as f:
            f.write(NEW_XML)
            os.fsync(f.fileno())
        assert fuse.stop() == 0
        assert "fuse.replica_diverged" not in [e.get("event") for e in fuse.events()]
        rep = replay(initial, read_journal(fuse.journal), tmp_path / "rep")
        assert_same_tree(fuse.source, rep)
