"""A power cut on a real file system (ext4, XFS, btrfs): copy the disk as it stands, boot
from the copy.

Each file system lives in an image file, loop-mounted. ``crash_image`` copies the image
while it is mounted: what its loop device (the "disk") has been given so far, and nothing
of the page cache or of the inodes the kernel still holds. ``boot`` unmounts the original,
puts the copy in its place and mounts it, which replays the file system's journal (ext4's
jbd2, XFS's log, btrfs's log tree) as a mount after a crash does; the file system's own
checker then has to find it sound (``e2fsck``, ``xfs_repair -n``, ``btrfs check``): the
machine after the power came back. ``commit=600`` (ext4, btrfs) keeps the periodic commit
(every 5 s, 30 s) out of the few seconds a test takes between what it makes durable and the
cut, so the copy holds only what the code under test made durable itself (fsync of a file
or folder on that file system); XFS pushes its log every 30 s, also longer than a test.

Unlike faultfs's model (``tests/faultfs/volatile.py``), this is each real file system's
behaviour, metadata included: the ctime an ``fdatasync`` leaves behind, what a journal
commit on one file system does not carry to another. The three differ where it matters
here: an overwrite's new ctime is on disk after ``fdatasync`` on btrfs (its log tree logs
the inode), not on ext4 or XFS.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.faultfs import FaultFS, powered
from tests.killcycles import tree_digest
from tests.tools import require_tool

MiB = 1 << 20
# the smallest file system each test makes: XFS's mkfs makes none below 300 MB (since
# xfsprogs 5.19); btrfs needs room for a copy on write of every replica it rewrites, whose
# old extents come back only at its next commit (commit=600)
MIN_SIZE = {"ext4": 16 * MiB, "xfs": 300 * MiB, "btrfs": 512 * MiB}
_MKFS = {"ext4": ["mkfs.ext4", "-q"], "xfs": ["mkfs.xfs", "-q"], "btrfs": ["mkfs.btrfs", "-q"]}
_CHECK = {
    "ext4": ["e2fsck", "-fn"],
    "xfs": ["xfs_repair", "-n"],
    "btrfs": ["btrfs", "check", "--readonly"],
}


@dataclass
class CrashDisk:
    """A file system of type ``fstype`` in an image file, loop-mounted at ``mountpoint``."""

    image: Path
    mountpoint: Path
    options: str = "relatime"
    fstype: str = "ext4"

    def make(self, size: int = 320 * MiB) -> None:
        """Sparse: the image holds what is written. The default leaves a receiver's state
        folder room for its journal's backlog (docs/OPERATIONS.md, "Where state lives")."""
        mkfs = _MKFS[self.fstype]
        require_tool(mkfs[0])
        require_tool(_CHECK[self.fstype][0])
        with self.image.open("wb") as f:
            f.truncate(max(size, MIN_SIZE[self.fstype]))
        subprocess.run([*mkfs, str(self.image)], check=True, capture_output=True)
        self.mountpoint.mkdir()
        self._mount()

    def _mount(self) -> None:
        # XFS refuses a second file system with the same UUID while the first lives on,
        # and a process in another mount namespace (a parallel test's `ip netns exec`)
        # keeps the unmounted original alive: nouuid, as for a snapshot (btrfs gives such
        # a clone a temporary fsid by itself; ext4 does not check)
        extra = ",nouuid" if self.fstype == "xfs" else ",commit=600"
        opts = f"loop,{self.options}{extra}"
        subprocess.run(["mount", "-o", opts, str(self.image), str(self.mountpoint)], check=True)

    def crash_image(self) -> Path:
        """What the disk holds now."""
        copy = self.image.with_suffix(".crashed")
        subprocess.run(["cp", "--sparse=always", str(self.image), str(copy)], check=True)
        return copy

    def boot(self, crashed: Path) -> None:
        """The machine comes back with ``crashed`` as its disk (nothing may hold the
        mount open: stop the processes first): mounted, which replays the file system's
        journal, then checked by its own checker, then mounted for use."""
        subprocess.run(["umount", str(self.mountpoint)], check=True)
        os.replace(crashed, self.image)
        self._mount()  # the journal replayed, as after a crash
        subprocess.run(["umount", str(self.mountpoint)], check=True)
        check = subprocess.run(
            [*_CHECK[self.fstype], str(self.image)], capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr
        self._mount()

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.mountpoint)], check=False)


def disk_pair(tmp_path: Path, kind: str) -> Iterator[tuple[CrashDisk, CrashDisk]]:
    """Two file systems, ``replicas`` and ``states``, of ``kind``: "FSTYPE" or
    "FSTYPE-OPTIONS" ("ext4-lazytime"; the ``crash_disks`` fixture of tests/conftest.py),
    or "FSTYPE-small" (relatime, a states file system of 128 MiB)."""
    fstype, _, options = kind.partition("-")
    # "-small": the states file system holds two journal segments, less its own overhead
    # (docs/OPERATIONS.md, "Where state lives": it must work, if an epoch fits)
    small = options == "small"
    made: list[CrashDisk] = []
    try:
        for name in ("replicas", "states"):
            disk = CrashDisk(
                tmp_path / f"{name}.img",
                tmp_path / name,
                "relatime" if small or not options else options,
                fstype,
            )
            disk.make(128 * MiB if small and name == "states" else 320 * MiB)
            made.append(disk)
        yield made[0], made[1]
    finally:
        for disk in made:
            disk.unmount()


def receiver_disks(
    tmp_path: Path, disks: tuple[CrashDisk, CrashDisk] | None
) -> tuple[FaultFS | None, Path, Path | None]:
    """Where a power-cut test's receiver keeps things: (the faultfs mount to cut, its
    ``--dir``, its ``--state-dir``). Without ``disks``, both on one faultfs mount (the
    state in its default place under ``--dir``); with them, the replicas on the first
    real file system and the state on the second, and nothing to cut but the disks."""
    if disks is None:
        fs = powered(tmp_path / "receiver-disk", tmp_path / "mnt")
        return fs, fs.mountpoint / "target", None
    return None, disks[0].mountpoint / "target", disks[1].mountpoint / "state"


def power_cut(*disks: CrashDisk) -> None:
    """Every disk as it stands (nothing may write to them meanwhile: stop the processes
    first), then each booted from it."""
    crashed = [disk.crash_image() for disk in disks]
    for disk, image in zip(disks, crashed, strict=True):
        disk.boot(image)


def cut_took_back(*disks: CrashDisk) -> bool:
    """``power_cut``; whether any disk came back other than its files stood before (what
    the page cache held and no fsync covered was lost)."""
    before = [tree_digest(disk.mountpoint) for disk in disks]
    power_cut(*disks)
    return before != [tree_digest(disk.mountpoint) for disk in disks]
