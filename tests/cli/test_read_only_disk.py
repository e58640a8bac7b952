"""A disk the kernel remounts read-only under a running side (ext4's errors=remount-ro).

The file system is a real ext4 on a loop device; the error is raised by ext4 itself
(``/sys/fs/ext4/DEV/trigger_fs_error``), which aborts its journal and makes it read-only
at once, as a failing disk would. Each side must say "read-only" and how to get out
(not "check permissions"), acknowledge nothing it could not write, and, once the disk
is checked and mounted read-write again, finish the job with a replica equal to its
source.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator.engine.errors import ExitCode
from tests.tools import (
    LiveNbdSender,
    ReceiverProc,
    b3,
    one_line_error,
    qemu_compare,
    qemu_img,
    qemu_io,
    replicator,
    require_tool,
    send_once,
    sender_errors,
    start_receiver,
    wait_for,
)


class Ext4Disk:
    """An ext4 file system in a file, mounted through a loop device."""

    def __init__(self, image: Path, mountpoint: Path) -> None:
        self.image = image
        self.mountpoint = mountpoint

    def mount(self) -> None:
        subprocess.run(
            ["mount", "-o", "loop,errors=remount-ro", str(self.image), str(self.mountpoint)],
            check=True,
        )

    def fail(self) -> None:
        """ext4 reports an error on itself: journal aborted, remounted read-only."""
        source = subprocess.run(
            ["findmnt", "-n", "-o", "SOURCE", str(self.mountpoint)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        Path(f"/sys/fs/ext4/{Path(source).name}/trigger_fs_error").write_text("1")
        with pytest.raises(OSError, match="Read-only file system"):
            (self.mountpoint / "probe").write_text("x")

    def repair(self) -> None:
        """What an operator does: unmount, check, mount read-write again."""
        subprocess.run(["umount", str(self.mountpoint)], check=True)
        fsck = subprocess.run(["e2fsck", "-fy", str(self.image)], capture_output=True, text=True)
        assert fsck.returncode in (0, 1), fsck.stdout + fsck.stderr  # 1: errors corrected
        self.mount()


@pytest.fixture
def ext4(tmp_path: Path) -> Iterator[Ext4Disk]:
    require_tool("mkfs.ext4")
    image = tmp_path / "ext4.img"
    with image.open("wb") as f:
        f.truncate(128 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)
    mountpoint = tmp_path / "ext4"
    mountpoint.mkdir()
    disk = Ext4Disk(image, mountpoint)
    disk.mount()
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def _vhd(path: Path) -> Path:
    qemu_img("create", "-q", "-f", "vpc", str(path), "32M")
    qemu_io("vpc", path, "write -P 0x11 0 8M", "write -P 0x22 20M 4M")
    return path


def _send_fails(receiver: ReceiverProc, state: Path, source: Path, code: ExitCode) -> str:
    """``send --once`` of job vm1, which must fail with ``code``: its one error line."""
    out = replicator(
        "send", "--to", receiver.address, "--job", "vm1", "--state-dir", str(state),
        "--once", "--insecure", str(source),
    )  # fmt: skip
    assert out.returncode == code, out.stderr
    return one_line_error(out.stderr)


def test_a_receivers_disk_made_read_only_is_named_and_the_job_resumes_once_repaired(
    tmp_path: Path, ext4: Ext4Disk
) -> None:
    source = _vhd(tmp_path / "vm.vhd")
    state = tmp_path / "state"
    target = ext4.mountpoint / "replicas"
    log = tmp_path / "receiver.log"
    receiver = start_receiver(target, log=log)
    try:
        send_once(receiver, "vm1", state, source)
        ext4.fail()
        qemu_io("vpc", source, "write -P 0x33 4M 8M")
        line = _send_fails(receiver, state, source, ExitCode.REFUSED)
        assert "read-only" in line and "remount it read-write" in line, line
        assert receiver.proc.poll() is None, log.read_text()[-3000:]  # still serving
    finally:
        receiver.stop()
    ext4.repair()
    receiver = start_receiver(target, log=log)
    try:
        send_once(receiver, "vm1", state, source)
    finally:
        assert receiver.stop() == 0, log.read_text()[-3000:]
    replica = target / "vm1" / "vm.vhd"
    compared = qemu_compare("vpc", source, replica)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    assert b3(replica) == b3(source)


def test_a_senders_state_disk_made_read_only_is_named_and_the_job_resumes_once_repaired(
    tmp_path: Path, ext4: Ext4Disk
) -> None:
    source = _vhd(tmp_path / "vm.vhd")
    state = ext4.mountpoint / "state"
    receiver = start_receiver(tmp_path / "target", log=tmp_path / "receiver.log")
    try:
        send_once(receiver, "vm1", state, source)
        ext4.fail()
        qemu_io("vpc", source, "write -P 0x44 4M 8M")
        line = _send_fails(receiver, state, source, ExitCode.STORAGE)
        assert "read-only" in line.lower() and "remount it read-write" in line, line
        assert "permissions" not in line, line
        ext4.repair()
        send_once(receiver, "vm1", state, source)
        replica = tmp_path / "target" / "vm1" / "vm.vhd"
        compared = qemu_compare("vpc", source, replica)
        assert compared.returncode == 0, compared.stdout + compared.stderr
        assert b3(replica) == b3(source)
    finally:
        receiver.stop()


def test_a_live_sender_keeps_serving_its_vm_while_the_targets_disk_is_read_only(
    tmp_path: Path, ext4: Ext4Disk
) -> None:
    """The NBD export stays up and takes the VM's writes while the target's disk is
    read-only, through the target's repair (receiver stopped, e2fsck, mounted again,
    receiver started); then the replica catches up, with nothing restarted here."""
    target, log = ext4.mountpoint / "replicas", tmp_path / "r.log"
    receiver = start_receiver(target, log=log)
    sender = LiveNbdSender(tmp_path, receiver)
    try:
        sender.write("write -P 0x11 0 16M")
        wait_for(sender.caught_up, sender.proc, "the first writes to reach the replica")
        ext4.fail()
        sender.write("write -P 0x22 16M 16M")  # the VM goes on
        wait_for(lambda: "storage" in sender_errors(sender.state), sender.proc, "the refusal")
        receiver.stop()
        ext4.repair()
        sender.write("write -P 0x33 40M 4M")  # and on, the target away
        receiver = start_receiver(target, receiver.port, log=log)
        wait_for(sender.caught_up, sender.proc, "the replica to catch up after the repair")
        assert b3(sender.replica) == b3(sender.source)
    finally:
        rc, err = sender.stop()
        receiver.stop()
    assert rc == 0, err[-3000:]


def test_images_on_a_read_only_mount_replicate(tmp_path: Path, receiver: ReceiverProc) -> None:
    """A snapshot or a backup mounted read-only is a fair source. The sender's image lock
    opened it for writing, and the mount's EROFS was taken for a failed disk ("a disk that
    had errors is often remounted read-only: check it (dmesg)"), exit 9."""
    src, ro = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    qemu_img("create", "-f", "qcow2", str(src / "disk.qcow2"), "16M")
    qemu_io("qcow2", src / "disk.qcow2", "write -P 0x5a 1M 3M")
    subprocess.run(["mount", "--bind", str(src), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True)
        send_once(receiver, "vm", tmp_path / "state", ro / "disk.qcow2")
        same = qemu_compare("qcow2", src / "disk.qcow2", receiver.dir / "vm" / "disk.qcow2")
        assert same.returncode == 0, same.stdout + same.stderr
    finally:
        subprocess.run(["umount", str(ro)], check=True)
