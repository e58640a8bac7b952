"""Every kind of record, applied and stamped, then the power cut: on real ext4, XFS, btrfs.

After a barrier the receiver saves ``files.state`` with each changed file's inode and
ctime (``engine/replica_files.py``), and refuses a file whose ctime is not its stamp as
changed outside replication. So the barrier must make durable not only what a record
wrote but the ctime it left: with the state on another file system (``--state-dir``),
nothing else commits the replica file system's metadata before the power goes. For each
kind of record that changes a file already stamped: apply it, barrier, save the stamps,
cut the power (``tests/crashdisk.py``), and read both back.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from replicator.engine.applier import Applier
from replicator.engine.replica_files import ReplicaFiles
from replicator.journal import Record
from tests.crashdisk import CrashDisk, power_cut

MiB = 1 << 20
KINDS = ["ext4-relatime", "ext4-lazytime", "xfs", "xfs-lazytime", "btrfs"]
BASE = [
    Record.write("disk.img", 0, b"\x11" * MiB),
    Record.file("vm.xml", b"<domain/>", 0o640),
    Record.create("notes.txt", 0o600),
    Record.write("notes.txt", 0, b"notes"),
    Record.mkdir("conf", 0o755),
    Record.file("conf/vm.xml", b"<domain/>", 0o600),
    Record.epoch(1),
]
CHANGES = {
    "overwrite": [Record.write("disk.img", 64 * 1024, b"\x22" * 8192)],
    "zero": [Record.zero("disk.img", 128 * 1024, 64 * 1024)],
    "grow": [Record.resize("disk.img", 2 * MiB)],
    "chmod": [Record.chmod("notes.txt", 0o644)],
    "replace": [Record.file("vm.xml", b"<domain type='kvm'/>", 0o600)],
    "rename": [Record.rename("notes.txt", "notes.old")],
    "rename-folder": [Record.rename("conf", "conf.old")],
}


def _round(applier: Applier, files: ReplicaFiles, state: Path, records: list[Record]) -> None:
    """One apply round as the receiver does it: records, barrier, stamps saved."""
    applier.apply_many([*records, Record.epoch(2)])
    applier.barrier()
    files.save(state)


def _adopted(applier: Applier, files: ReplicaFiles, state: Path) -> None:
    """Changed on the target, not synced, then adopted by a comparing sender
    (``send --resync``), as the receiver does it."""
    with (applier.replica_dir / "disk.img").open("r+b") as f:
        f.seek(4096)
        f.write(b"\x33" * 4096)
    applier.adopt("disk.img")
    files.save(state)


def _as_left(replica: Path) -> dict[str, tuple[bytes, int]]:
    """Each regular file under ``replica`` (by its path there): its bytes and mode."""
    out = {}
    for path in sorted(replica.rglob("*")):
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode):
            out[str(path.relative_to(replica))] = (path.read_bytes(), stat.S_IMODE(st.st_mode))
    return out


@pytest.mark.parametrize("crash_disks", KINDS, indirect=True)
@pytest.mark.parametrize("change", [*sorted(CHANGES), "adopted"])
def test_a_stamped_change_is_on_disk_with_its_stamp(
    crash_disks: tuple[CrashDisk, CrashDisk], change: str
) -> None:
    replicas, states = crash_disks
    replica, state = replicas.mountpoint / "job", states.mountpoint / "job"
    state.mkdir()
    files = ReplicaFiles()
    applier = Applier(replica, files)
    try:
        _round(applier, files, state, BASE)
        os.sync()  # the first round all on disk: only the change is at stake
        if change == "adopted":
            _adopted(applier, files, state)
        else:
            _round(applier, files, state, CHANGES[change])
        expected = _as_left(replica)
    finally:
        applier.close()
    power_cut(replicas, states)
    stamps = ReplicaFiles.load(state, "job")
    assert stamps.stamps.keys() == expected.keys()
    for name in stamps.stamps:  # raises ReplicaDiverged: a stamp its file does not match
        stamps.check(name, os.lstat(replica / name))
    assert _as_left(replica) == expected
