"""A power cut on real ext4: copy the disk as it stands, boot from the copy.

Each file system lives in an image file, loop-mounted. ``crash_image`` copies the image
while it is mounted: what its loop device (the "disk") has been given so far, and nothing
of the page cache or of the inodes the kernel still holds. ``boot`` unmounts the original,
puts the copy in its place, runs ``e2fsck`` (which replays the ext4 journal, as a mount
after a crash does) and mounts it: the machine after the power came back. ``commit=600``
keeps ext4's periodic journal commit (every 5 s by default) out of the few seconds a test
takes between what it makes durable and the cut, so the copy holds only what the code under
test made durable itself (fsync of a file or folder on that file system).

Unlike faultfs's model (``tests/faultfs/volatile.py``), this is one real file system's
behaviour, metadata included: the ctime an ``fdatasync`` leaves behind, what a journal
commit on one file system does not carry to another.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.tools import require_tool

MiB = 1 << 20


@dataclass
class Ext4:
    """An ext4 file system in an image file, loop-mounted at ``mountpoint``."""

    image: Path
    mountpoint: Path
    options: str = "relatime"

    def make(self, size: int = 128 * MiB) -> None:
        require_tool("mkfs.ext4")
        with self.image.open("wb") as f:
            f.truncate(size)
        subprocess.run(["mkfs.ext4", "-q", str(self.image)], check=True)
        self.mountpoint.mkdir()
        self._mount()

    def _mount(self) -> None:
        opts = f"loop,commit=600,{self.options}"
        subprocess.run(["mount", "-o", opts, str(self.image), str(self.mountpoint)], check=True)

    def crash_image(self) -> Path:
        """What the disk holds now."""
        copy = self.image.with_suffix(".crashed")
        subprocess.run(["cp", "--sparse=always", str(self.image), str(copy)], check=True)
        return copy

    def boot(self, crashed: Path) -> None:
        """The machine comes back with ``crashed`` as its disk (nothing may hold the
        mount open: stop the processes first)."""
        subprocess.run(["umount", str(self.mountpoint)], check=True)
        os.replace(crashed, self.image)
        fsck = subprocess.run(["e2fsck", "-fy", str(self.image)], capture_output=True, text=True)
        assert fsck.returncode in (0, 1), fsck.stdout + fsck.stderr  # 1: errors corrected
        self._mount()

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.mountpoint)], check=False)


def ext4_pair(tmp_path: Path, options: str) -> Iterator[tuple[Ext4, Ext4]]:
    """Two ext4 file systems, ``replicas`` and ``states``, mounted with ``options``
    (the ``ext4_disks`` fixture of tests/conftest.py)."""
    made: list[Ext4] = []
    try:
        for name in ("replicas", "states"):
            disk = Ext4(tmp_path / f"{name}.img", tmp_path / name, options)
            disk.make()
            made.append(disk)
        yield made[0], made[1]
    finally:
        for disk in made:
            disk.unmount()


def power_cut(*disks: Ext4) -> None:
    """Every disk as it stands (nothing may write to them meanwhile: stop the processes
    first), then each booted from it."""
    crashed = [disk.crash_image() for disk in disks]
    for disk, image in zip(disks, crashed, strict=True):
        disk.boot(image)
