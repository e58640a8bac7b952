"""`replicator send --capture fuse`: the VM folder mounted through the filter, replicated live."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from replicator.engine.errors import ExitCode
from tests.tools import (
    ReceiverProc,
    b3,
    fuse_folder,  # noqa: F401  (the fixture `folder`)
    idle_qemu_writer,
    is_mounted,
    one_line_error,
    qemu_compare,
    qemu_img,
    qemu_io,
    replicator,
    start_fuse_sender,
)


def _stop(proc: subprocess.Popen[str], mnt: Path) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    if is_mounted(mnt):
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    assert rc in (0, -signal.SIGKILL), proc.stderr.read() if proc.stderr else rc


def _wait_same(source: Path, replica: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not (replica.exists() and b3(replica) == b3(source)):
        assert time.monotonic() < deadline, f"{replica} did not converge"
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("fmt", "name"), [("vhdx", "d.vhdx"), ("vpc", "d.vhd"), ("qcow2", "d.qcow2")]
)
def test_images_created_and_written_under_the_mount(
    tmp_path: Path, receiver: ReceiverProc, folder: tuple[Path, Path], fmt: str, name: str
) -> None:
    source, mnt = folder
    proc = start_fuse_sender(receiver, tmp_path, source, mnt)
    try:
        qemu_img("create", "-q", "-f", fmt, str(mnt / name), "128M")
        qemu_io(fmt, mnt / name, "write -P 0x31 0 3M", "write -P 0x32 90M 1M", "flush")
        replica = receiver.dir / "fvm" / name
        _wait_same(source / name, replica)
        assert qemu_compare(fmt, source / name, replica).returncode == 0
        if fmt != "vpc":  # qemu-img has no check for vpc
            qemu_img("check", "-q", "-f", fmt, str(replica))
    finally:
        _stop(proc, mnt)
    assert not is_mounted(mnt)


def test_a_vm_folder_with_a_comma_and_a_backslash_in_its_name_is_mounted(
    tmp_path: Path, receiver: ReceiverProc, folder: tuple[Path, Path]
) -> None:
    """libfuse splits its options at commas (and escapes with a backslash): the folder's
    name in fsname= made a folder "web,db" fail to mount, "fuse_session_new() failed"."""
    plain, mnt = folder
    source = plain.rename(tmp_path / "web,db \\ 'x'")
    proc = start_fuse_sender(receiver, tmp_path, source, mnt)
    try:
        (mnt / "new.conf").write_text("x=1\n")
        _wait_same(source / "new.conf", receiver.dir / "fvm" / "new.conf")
        mounts = Path("/proc/mounts").read_text().splitlines()
        assert any(
            line.startswith("replicator:") and " fuse.replicator " in line for line in mounts
        )
    finally:
        _stop(proc, mnt)


def test_editor_save_and_folder_changes(
    tmp_path: Path, receiver: ReceiverProc, folder: tuple[Path, Path]
) -> None:
    source, mnt = folder
    proc = start_fuse_sender(receiver, tmp_path, source, mnt)
    try:
        tmp = mnt / ".vm.xml.swp"
        with tmp.open("w") as f:
            f.write("<domain><name>vm</name><memory>4096</memory></domain>\n")
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, mnt / "vm.xml")  # how editors save
        (mnt / "snapshots").mkdir()
        (mnt / "snapshots" / "s1.xml").write_text("<snapshot/>")
        os.symlink("vm.xml", mnt / "current.xml")
        target = receiver.dir / "fvm"
        _wait_same(source / "vm.xml", target / "vm.xml")
        _wait_same(source / "snapshots" / "s1.xml", target / "snapshots" / "s1.xml")
        deadline = time.monotonic() + 30
        while not (target / "current.xml").is_symlink():  # journaled after s1.xml
            assert time.monotonic() < deadline, "the symlink did not replicate"
            time.sleep(0.05)
        assert os.readlink(target / "current.xml") == "vm.xml"
        assert not (target / ".vm.xml.swp").exists()
    finally:
        _stop(proc, mnt)


def _data_ranges(path: Path) -> list[tuple[int, int]]:
    """The allocated ranges of a file, from SEEK_DATA/SEEK_HOLE."""
    out, fd = [], os.open(path, os.O_RDONLY)
    try:
        pos, size = 0, os.fstat(fd).st_size
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, pos))
    finally:
        os.close(fd)
    return out


def test_guest_discard_replicates_as_a_hole(
    tmp_path: Path, receiver: ReceiverProc, folder: tuple[Path, Path]
) -> None:
    source, mnt = folder
    proc = start_fuse_sender(receiver, tmp_path, source, mnt)
    mib = 1 << 20
    try:
        qemu_img("create", "-q", "-f", "raw", str(mnt / "d.raw"), "8M")
        qemu_io("raw", mnt / "d.raw", "write -P 0x61 0 8M", "flush")
        replica = receiver.dir / "fvm" / "d.raw"
        _wait_same(source / "d.raw", replica)
        qemu_io("raw", mnt / "d.raw", "discard 2M 3M", "flush")  # fallocate(PUNCH_HOLE)
        _wait_same(source / "d.raw", replica)
        assert qemu_compare("raw", source / "d.raw", replica).returncode == 0
        for image in (source / "d.raw", replica):
            assert _data_ranges(image) == [(0, 2 * mib), (5 * mib, 8 * mib)], image
    finally:
        _stop(proc, mnt)


def test_sigkill_under_load_then_restart_loses_nothing_fsynced(
    tmp_path: Path, receiver: ReceiverProc, folder: tuple[Path, Path]
) -> None:
    source, mnt = folder
    proc = start_fuse_sender(receiver, tmp_path, source, mnt)
    synced = 0
    with (mnt / "log.bin").open("wb") as f:
        for i in range(200):
            f.write(bytes([i % 251]) * 65536)
            f.flush()
            os.fsync(f.fileno())
            synced = f.tell()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(["umount", "-l", str(mnt)], check=False)
    proc = start_fuse_sender(receiver, tmp_path, source, mnt)  # remount, resync what the crash left
    try:
        replica = receiver.dir / "fvm" / "log.bin"
        _wait_same(source / "log.bin", replica)
        assert replica.stat().st_size >= synced
    finally:
        _stop(proc, mnt)


def test_a_small_file_written_back_before_a_kill_converges_after_the_restart(
    tmp_path: Path, receiver: ReceiverProc, folder: tuple[Path, Path]
) -> None:
    """A small file is known to the sender's manifests by its whole-file digest. Written
    (shipped, applied), then written back to its old content without an fsync and the
    sender SIGKILLed: the restart's basis, the manifests with the journal's records folded
    in, kept the old digest past the applied write, saw no change, and the replica kept
    the intermediate content while both sides said it was caught up."""
    source, mnt = folder
    (source / "f.txt").write_bytes(b"XXXXXXXX")
    proc = start_fuse_sender(receiver, tmp_path, source, mnt)
    replica = receiver.dir / "fvm" / "f.txt"
    try:
        _wait_same(source / "f.txt", replica)
        fd = os.open(mnt / "f.txt", os.O_RDWR)
        try:
            os.pwrite(fd, b"YYYYYYYY", 0)
            os.fsync(fd)
            _wait_same(source / "f.txt", replica)
            os.pwrite(fd, b"XXXXXXXX", 0)  # back to what the manifests say, not fsynced
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            with contextlib.suppress(OSError):  # the filter is gone: ENOTCONN
                os.close(fd)
    finally:
        _stop(proc, mnt)
    assert (source / "f.txt").read_bytes() == b"XXXXXXXX"
    proc = start_fuse_sender(receiver, tmp_path, source, mnt)
    try:
        _wait_same(source / "f.txt", replica)
    finally:
        _stop(proc, mnt)


def _tree(root: Path) -> set[str]:
    """The paths under ``root``; a path no tree has when a folder went away mid-walk (the
    receiver removing it), so the caller looks again."""
    try:
        return {str(p.relative_to(root)) for p in root.rglob("*")}
    except FileNotFoundError:
        return {"\0 changed during the walk"}


def test_lost_state_and_damaged_journal_leave_no_stale_files(
    tmp_path: Path, receiver: ReceiverProc, folder: tuple[Path, Path]
) -> None:
    """The sender's layout used to live in its state folder: with it gone (or its journal
    damaged, which used to be refused) files deleted at the source stayed on the replica.
    The replica folder is listed by the receiver at every start now."""
    source, mnt = folder
    proc = start_fuse_sender(receiver, tmp_path, source, mnt)
    try:
        (mnt / "old").mkdir()
        (mnt / "old" / "a.img").write_bytes(os.urandom(65536))
        (mnt / "b.xml").write_text("<b/>")
        target = receiver.dir / "fvm"
        _wait_same(source / "b.xml", target / "b.xml")
        _wait_same(source / "old" / "a.img", target / "old" / "a.img")
    finally:
        _stop(proc, mnt)
    # behind the sender's back, while it is stopped; then its state is lost
    (source / "old" / "a.img").unlink()
    (source / "old").rmdir()
    (source / "c.xml").write_text("<c/>")
    shutil.rmtree(tmp_path / "state")
    proc = start_fuse_sender(receiver, tmp_path, source, mnt)
    try:
        deadline = time.monotonic() + 30
        while _tree(receiver.dir / "fvm") != _tree(source):
            assert time.monotonic() < deadline, (_tree(receiver.dir / "fvm"), _tree(source))
            time.sleep(0.1)
    finally:
        _stop(proc, mnt)
    # a damaged journal: cut, compared, nothing stale either
    (source / "b.xml").unlink()
    (segment,) = sorted((tmp_path / "state" / "journal").glob("*.seg"))
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0x10
    segment.write_bytes(bytes(data))
    proc = start_fuse_sender(receiver, tmp_path, source, mnt)
    try:
        deadline = time.monotonic() + 30
        while _tree(receiver.dir / "fvm") != _tree(source):
            assert time.monotonic() < deadline, (_tree(receiver.dir / "fvm"), _tree(source))
            time.sleep(0.1)
        assert b3(target / "c.xml") == b3(source / "c.xml")
    finally:
        _stop(proc, mnt)


def test_an_image_whose_backing_file_is_outside_the_folder_is_told(
    tmp_path: Path, receiver: ReceiverProc, folder: tuple[Path, Path]
) -> None:
    """A VM folder holding an overlay of a golden image kept elsewhere: the folder job
    cannot carry the golden image, and the sender says so at its start."""
    source, mnt = folder
    golden = tmp_path / "golden.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(golden), "16M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(golden), "-F", "qcow2",
             str(source / "vm.qcow2"))  # fmt: skip
    proc = start_fuse_sender(receiver, tmp_path, source, mnt)
    _stop(proc, mnt)
    stderr = proc.stderr.read() if proc.stderr else ""
    assert "send.image_dependency" in stderr
    assert f"backing file '{golden}' is not replicated" in stderr
    assert "Move it into the replicated folder" in stderr


def test_a_state_folder_inside_the_vm_folder_is_refused(
    tmp_path: Path, receiver: ReceiverProc, folder: tuple[Path, Path]
) -> None:
    """It used to run: the sender's own journal went to the replica with the VM's files
    and showed through the mount, where the VM could write into it."""
    source, mnt = folder
    before = sorted(os.listdir(source))
    out = replicator("send", "--to", receiver.address, "--job", "vm1", "--state-dir",
                     str(source / ".replicator-state"), "--capture", "fuse", "--mount",
                     str(mnt), "--insecure", str(source))  # fmt: skip
    assert out.returncode == ExitCode.CONFIG, out.stderr
    assert "is inside the VM folder" in out.stderr and "--state-dir" in out.stderr
    assert sorted(os.listdir(source)) == before and not is_mounted(mnt)
    assert not (receiver.dir / "vm1").exists()


def test_a_vm_still_running_on_the_folder_itself_is_refused_before_any_sync(
    tmp_path: Path, receiver: ReceiverProc, folder: tuple[Path, Path]
) -> None:
    """The VM not yet moved to the mount writes the source folder behind the filter: the
    sender mounted and served anyway, and none of those writes reached the replica (its
    log said only `sender.scanning_a_running_vm`, advising --capture fuse)."""
    source, mnt = folder
    disk = source / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(disk), "16M")
    vm = idle_qemu_writer("qcow2", disk)
    try:
        out = replicator("send", "--to", receiver.address, "--job", "vm1", "--state-dir",
                         str(tmp_path / "s"), "--capture", "fuse", "--mount", str(mnt),
                         "--insecure", str(source), timeout=20)  # fmt: skip
    finally:
        vm.kill()
        vm.wait()
    assert out.returncode == ExitCode.CONFIG, out.stderr
    error = one_line_error(out.stderr)
    assert f"{disk} is open for writing by another program" in error, error
    assert f"start the VM on the files under {mnt}" in error, error
    assert not is_mounted(mnt) and not (receiver.dir / "vm1").exists()
    assert "sender.scanning_a_running_vm" not in out.stderr


def test_a_file_given_for_the_vm_folder_is_named(
    tmp_path: Path, receiver: ReceiverProc, folder: tuple[Path, Path]
) -> None:
    """One VOLUME that is a file was told "takes exactly one VOLUME", which it had."""
    source, mnt = folder
    disk = source / "disk.img"
    disk.write_bytes(b"x" * 4096)
    out = replicator("send", "--to", receiver.address, "--job", "vm1", "--state-dir",
                     str(tmp_path / "s"), "--capture", "fuse", "--mount", str(mnt),
                     "--insecure", str(disk))  # fmt: skip
    assert out.returncode == ExitCode.CONFIG, out.stderr
    error = one_line_error(out.stderr)
    assert f"{disk} is a file" in error and "give the folder that holds" in error, error
    both = replicator("send", "--to", receiver.address, "--job", "vm1", "--state-dir",
                      str(tmp_path / "s"), "--capture", "fuse", "--mount", str(mnt),
                      "--insecure", str(source), str(tmp_path))  # fmt: skip
    assert both.returncode == ExitCode.CONFIG
    assert "exactly one VOLUME: the VM's folder (given 2)" in one_line_error(both.stderr)
    assert not is_mounted(mnt)


def test_verify_compares_a_folder_whole_and_repairs_it(
    tmp_path: Path, receiver: ReceiverProc, folder: tuple[Path, Path]
) -> None:
    """A FUSE job's folder, given to verify as its one VOLUME, is compared whole: every
    file's content, and the layout (what is on the replica only, a missing file, a folder's
    or a file's mode, a symlink's target); --repair makes them the same through the job's
    own journal, and the live sender goes on from there."""
    source, mnt = folder
    (source / "snapshots").mkdir()
    (source / "snapshots" / "s1.xml").write_text("<snapshot/>")
    os.symlink("vm.xml", source / "current.xml")
    qemu_img("create", "-q", "-f", "qcow2", str(source / "d.qcow2"), "16M")
    qemu_io("qcow2", source / "d.qcow2", "write -P 0x21 0 1M")
    proc = start_fuse_sender(receiver, tmp_path, source, mnt)
    _stop(proc, mnt)
    args = ("--to", receiver.address, "--job", "fvm", "--state-dir", str(tmp_path / "state"))
    same = replicator("verify", *args, "--insecure", "--json", str(source))
    assert same.returncode == 0, same.stdout + same.stderr
    assert json.loads(same.stdout)["layout"] == []

    replica = receiver.dir / "fvm"
    (replica / "snapshots" / "s1.xml").unlink()
    (replica / "stale.txt").write_text("left over")
    (replica / "old").mkdir()
    (replica / "snapshots").chmod(0o700)
    (replica / "vm.xml").chmod(0o600)
    (replica / "current.xml").unlink()
    os.symlink("d.qcow2", replica / "current.xml")
    with (replica / "d.qcow2").open("r+b") as f:  # bit rot (the receiver locks the image)
        f.seek(5 * 65536 + 17)
        f.write(b"\xff\x00\xff")
    found = replicator("verify", *args, "--insecure", str(source))
    assert found.returncode == ExitCode.DIFFERENT, found.stdout + found.stderr
    lines = found.stdout.splitlines()
    for line in (
        "stale.txt: a file on the replica only",
        "old/: a folder on the replica only",
        "snapshots/: mode 0755, replica 0700",
        "current.xml: symlink -> vm.xml, replica -> d.qcow2",
        "vm.xml: mode 0644, replica 0600",
        "snapshots/s1.xml: replica missing",
    ):
        assert line in lines, found.stdout
    assert [line for line in lines if line.startswith("d.qcow2: 1 differing ranges")]

    fixed = replicator("verify", *args, "--insecure", "--repair", "--json", str(source))
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert json.loads(fixed.stdout)["layout"] == []
    assert qemu_compare("qcow2", source / "d.qcow2", replica / "d.qcow2").returncode == 0
    assert not (replica / "stale.txt").exists() and not (replica / "old").exists()
    assert os.readlink(replica / "current.xml") == "vm.xml"
    assert (replica / "vm.xml").stat().st_mode & 0o777 == 0o644
    proc = start_fuse_sender(receiver, tmp_path, source, mnt)  # the job goes on from here
    try:
        (mnt / "snapshots" / "s2.xml").write_text("<snapshot n='2'/>")
        _wait_same(source / "snapshots" / "s2.xml", replica / "snapshots" / "s2.xml")
    finally:
        _stop(proc, mnt)


def test_two_names_of_one_file_in_the_folder_stop_send_at_start(
    tmp_path: Path, receiver: ReceiverProc, folder: tuple[Path, Path]
) -> None:
    """A write through `mnt/a` of a hard-linked pair changed `b` on the source too, but was
    journaled as `a` only: the replica's `b` kept the old bytes while both sides said
    they were caught up. The folder is refused before anything moves."""
    source, mnt = folder
    (source / "a").write_bytes(b"x" * 10_000)
    os.link(source / "a", source / "b")
    out = replicator("send", "--to", receiver.address, "--job", "vm1", "--state-dir",
                     str(tmp_path / "state"), "--capture", "fuse", "--mount", str(mnt),
                     "--insecure", str(source))  # fmt: skip
    assert out.returncode == ExitCode.CONFIG, out.stderr
    assert "two names (hard links) of one file" in out.stderr, out.stderr
    assert "cp --remove-destination" in out.stderr
    assert not is_mounted(mnt) and not (receiver.dir / "vm1").exists()
