"""A power cut of the receiver's machine on real ext4 and XFS, its state on another file system.

The receiver stamps every replica file it wrote with its inode number and ctime
(``engine/replica_files.py``) and refuses a file whose ctime moved as changed outside
replication. The stamp must then never be on disk without the ctime it names: an
overwrite's new ctime is inode metadata, which ``fdatasync`` does not write, and with
``--state-dir`` on another file system (journals on a fast disk, replicas on a big one)
the fsync of ``files.state`` commits nothing of the replicas' file system. A receiver that
``fdatasync``ed its replica files came back from a power cut refusing its own replica
until a ``send --resync``.

No faultfs here: the power cut is ``tests/crashdisk.py``'s, real file systems whose disk
is copied as it stands and booted again (btrfs is left to the applier's test: its
``fdatasync`` logs the ctime, so it would not tell).
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from tests.crashdisk import CrashDisk, power_cut
from tests.tools import (
    ENV,
    REPLICATOR,
    free_port,
    qemu_img,
    qemu_io,
    replicator,
    wait_port,
)


def _receiver(target: Path, state: Path, port: int, log: Path) -> subprocess.Popen[str]:
    with log.open("a") as err:
        proc = subprocess.Popen(
            [*REPLICATOR, "receive", "--listen", f"127.0.0.1:{port}", "--dir", str(target),
             "--state-dir", str(state), "--insecure"],
            stdout=subprocess.DEVNULL, stderr=err, text=True, env=ENV,
        )  # fmt: skip
    wait_port(port, proc)
    return proc


def _send(port: int, state: Path, source: Path) -> subprocess.CompletedProcess[str]:
    return replicator(
        "send", "--to", f"127.0.0.1:{port}", "--job", "vm1", "--state-dir", str(state),
        "--once", "--insecure", str(source),
    )  # fmt: skip


@pytest.mark.tools
@pytest.mark.parametrize("crash_disks", ["ext4-relatime", "ext4-lazytime", "xfs"], indirect=True)
def test_the_replica_comes_back_from_a_power_cut_as_its_stamps_say(
    tmp_path: Path, crash_disks: tuple[CrashDisk, CrashDisk]
) -> None:
    replicas, states = crash_disks
    source = tmp_path / "vm.vhd"
    qemu_img("create", "-q", "-f", "vpc", str(source), "32M")
    qemu_io("vpc", source, "write -P 0x11 0 16M")
    sender_state, log, port = tmp_path / "sender", tmp_path / "receiver.log", free_port()
    target, state = replicas.mountpoint / "target", states.mountpoint / "state"
    receiver = _receiver(target, state, port, log)
    try:
        first = _send(port, sender_state, source)
        assert first.returncode == 0, first.stderr
        # overwrites in place: the replica's size and blocks stay as they are, so the
        # only metadata the apply changes is the ctime (and mtime) its stamp names
        qemu_io("vpc", source, "write -P 0x22 1M 2M", "write -P 0x33 9M 1M")
        second = _send(port, sender_state, source)
        assert second.returncode == 0, second.stderr
        receiver.send_signal(signal.SIGKILL)  # the power goes: nothing more reaches a disk
        receiver.wait(timeout=30)
        power_cut(replicas, states)
        receiver = _receiver(target, state, port, log)
        # a plain send: no --resync, the replica is as the receiver left it
        third = _send(port, sender_state, source)
        assert third.returncode == 0, (
            f"the receiver refused its own replica after a power cut: {third.stderr[-2000:]}"
        )
        replica = target / "vm1" / "vm.vhd"
        qemu_img("compare", "-q", "-f", "vpc", "-F", "vpc", str(source), str(replica))
    except BaseException:
        print(log.read_text(errors="replace")[-4000:])
        raise
    finally:
        receiver.kill()
        receiver.wait(timeout=30)
