"""`send --capture fuse` keeps programs from writing the source folder behind the filter.

Before, the sender checked QEMU's locks at its start only: a VM started by mistake on the
folder's own images, or a `qemu-io`/`qemu-img` run on them, wrote behind the filter once
the mount was up, none of it reached the journal, and the replica silently differed from
the source. Now the sender holds QEMU's deny-write locks on every image of the folder for
the capture's life (engine/folder_guard.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.tools import (
    ReceiverProc,
    b3,
    fuse_folder,  # noqa: F401  (the fixture `folder`)
    idle_qemu_writer,
    is_mounted,
    qemu_compare,
    qemu_img,
    qemu_io,
    require_tool,
    start_fuse_sender,
    wait_for,
)

pytestmark = pytest.mark.tools

LOCKED = 'Failed to get "write" lock'


def _write(path: Path, fmt: str = "qcow2") -> subprocess.CompletedProcess[str]:
    """``qemu-io`` writing 64 KiB at offset 0 of image ``path``."""
    require_tool("qemu-io")
    return subprocess.run(
        ["qemu-io", "-f", fmt, "-c", "write -P 0x66 0 64k", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _refused(path: Path, fmt: str = "qcow2") -> None:
    out = _write(path, fmt)
    assert out.returncode != 0, f"{path} was written behind the filter: {out.stdout}"
    assert LOCKED in out.stdout + out.stderr, out.stdout + out.stderr


def _same(source: Path, replica: Path) -> bool:
    return replica.exists() and b3(replica) == b3(source)


def _stopped(proc: subprocess.Popen[str], sig: int, mnt: Path) -> int:
    proc.send_signal(sig)
    rc = proc.wait(timeout=60)
    if is_mounted(mnt):  # a killed sender leaves its mount behind ("not connected")
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    return rc


def test_the_source_images_are_written_through_the_mount_only(
    tmp_path: Path, receiver: ReceiverProc, folder: tuple[Path, Path]
) -> None:
    source, mnt = folder
    disk = source / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(disk), "16M")
    qemu_io("qcow2", disk, "write -P 0x11 0 1M")
    qemu_img("create", "-q", "-f", "qcow2", str(source / "old.qcow2"), "16M")
    replica = receiver.dir / "fvm" / "disk.qcow2"
    proc = start_fuse_sender(receiver, tmp_path, source, mnt)
    try:
        _refused(disk)  # the folder's own image, behind the filter
        qemu_io("qcow2", mnt / "disk.qcow2", "write -P 0x22 64k 1M", "flush")
        wait_for(lambda: _same(disk, replica), proc, "the replica of disk.qcow2")
        assert qemu_compare("qcow2", disk, replica).returncode == 0
        # an image made through the mount, renamed, removed and made again there
        qemu_img("create", "-q", "-f", "qcow2", str(mnt / "new.qcow2"), "8M")
        _refused(source / "new.qcow2")
        (mnt / "new.qcow2").rename(mnt / "renamed.qcow2")
        _refused(source / "renamed.qcow2")
        (mnt / "renamed.qcow2").unlink()  # let go, or its space stays taken
        wait_for(lambda: not _deleted_open(proc.pid, source), proc, "the removed image let go")
        qemu_img("create", "-q", "-f", "qcow2", str(mnt / "renamed.qcow2"), "8M")
        _refused(source / "renamed.qcow2")
        # a file that becomes an image while open: guarded by the close(2) that made it
        fd = os.open(mnt / "grown", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, 2 * 1024 * 1024)  # larger than a configuration file may be
            os.close(os.dup(fd))  # the kernel's flush, with the file still open
            _refused(source / "grown", "raw")
        finally:
            os.close(fd)
        # an image by its content only (no image suffix), as qemu-img convert writes it
        qemu_img("convert", "-O", "qcow2", str(mnt / "disk.qcow2"), str(mnt / "copy"))
        _refused(source / "copy")
        qemu_io("qcow2", mnt / "copy", "write -P 0x33 2M 64k", "flush")
        wait_for(lambda: _same(source / "copy", receiver.dir / "fvm" / "copy"), proc, "copy")
        assert qemu_compare("qcow2", source / "copy", receiver.dir / "fvm" / "copy").returncode == 0
        assert qemu_compare("qcow2", disk, replica).returncode == 0  # nothing got behind it
        (mnt / "old.qcow2").unlink()  # an image of the start: its space is given back
        wait_for(lambda: not _deleted_open(proc.pid, source), proc, "old.qcow2 let go")
    finally:
        rc = _stopped(proc, signal.SIGTERM, mnt)
    assert rc == 0, proc.stderr.read() if proc.stderr else rc
    for path in (disk, source / "renamed.qcow2", source / "copy"):  # let go at the stop
        out = _write(path)
        assert out.returncode == 0, out.stdout + out.stderr


def test_a_killed_sender_leaves_no_lock_behind(
    tmp_path: Path, receiver: ReceiverProc, folder: tuple[Path, Path]
) -> None:
    """OFD locks go with the process: SIGKILL leaves the images writable."""
    source, mnt = folder
    disk = source / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(disk), "16M")
    proc = start_fuse_sender(receiver, tmp_path, source, mnt)
    try:
        _refused(disk)
        qemu_img("create", "-q", "-f", "qcow2", str(mnt / "later.qcow2"), "8M")
        _refused(source / "later.qcow2")
    finally:
        rc = _stopped(proc, signal.SIGKILL, mnt)
    assert rc == -signal.SIGKILL
    for path in (disk, source / "later.qcow2"):
        out = _write(path)
        assert out.returncode == 0, out.stdout + out.stderr


def test_a_writer_the_guard_came_too_late_for_is_named(
    tmp_path: Path, receiver: ReceiverProc, folder: tuple[Path, Path]
) -> None:
    """A file becomes a disk image (here by its size) while a program already writes it
    in the source folder itself: the guard cannot stop that one, and the log says so."""
    source, mnt = folder
    proc = start_fuse_sender(receiver, tmp_path, source, mnt)
    try:
        (mnt / "data").write_bytes(b"")  # a small file of no image format: not guarded
        writer = idle_qemu_writer("raw", source / "data")
        try:
            with (mnt / "data").open("r+b") as f:  # past a configuration file's size
                f.truncate(2 * 1024 * 1024)
        finally:
            writer.kill()
            writer.wait()
    finally:
        rc = _stopped(proc, signal.SIGTERM, mnt)
    err = proc.stderr.read() if proc.stderr else ""
    assert rc == 0, err
    assert "fuse.written_behind_filter" in err and str(source / "data") in err, err


def _deleted_open(pid: int, folder: Path) -> list[str]:
    """Files of ``folder`` that process ``pid`` still has open after they were deleted."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(f"{folder}/") and target.endswith(" (deleted)"):
            found.append(target)
    return found


def test_qemu_locks_through_the_mount_are_the_mounts_own(
    tmp_path: Path, receiver: ReceiverProc, folder: tuple[Path, Path]
) -> None:
    """The filter has no lock handlers: the kernel keeps QEMU's locks on the mount's inode.
    A VM on the mount and a second writer there conflict as on a local file, and the
    guard on the real file neither stops the VM nor tells a reader of the real file.
    (Not changed by the guard: what its design relies on.)"""
    source, mnt = folder
    disk = source / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(disk), "16M")
    proc = start_fuse_sender(receiver, tmp_path, source, mnt)
    try:
        vm = idle_qemu_writer("qcow2", mnt / "disk.qcow2")  # takes its locks: not refused
        try:
            _refused(mnt / "disk.qcow2")  # a second writer on the mount, as on a local file
            _refused(disk)
            info = subprocess.run(["qemu-img", "info", str(disk)], capture_output=True)
            assert info.returncode == 0, info.stderr  # no -U needed on the real file
        finally:
            vm.kill()
            vm.wait()
    finally:
        rc = _stopped(proc, signal.SIGTERM, mnt)
    assert rc == 0, proc.stderr.read() if proc.stderr else rc
