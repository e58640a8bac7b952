"""Checks before mounting, and recovery of a stale mount left by a crashed filter.

A FUSE mount whose daemon died stays in the mount table; every access to it fails with
ENOTCONN ("Transport endpoint is not connected") until it is unmounted. A restart would
then fail on the mount point, so :func:`prepare_mountpoint` detaches such a mount lazily
(``fusermount3 -u -z``, or ``umount -l`` when that is missing) and logs that it did.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
from pathlib import Path

import structlog

from replicator.engine.errors import ConfigError

log = structlog.get_logger("replicator.fuse")

_UNMOUNT_TIMEOUT = 30.0


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_paths(source: Path, mountpoint: Path, journal_dir: Path | None = None) -> Path:
    """Validate the source folder and the relation of the three paths; returns the source.

    The mount point must not lie inside the source (the filter would see itself) nor the
    source inside the mount point, and the journal must not be written through the mount
    (the filter would wait on itself).
    """
    if not source.exists():
        raise ConfigError(f"source folder {source} does not exist")
    if not source.is_dir():
        raise ConfigError(f"source {source} is not a directory")
    src = source.resolve()
    mnt = Path(os.path.abspath(mountpoint))
    if _inside(mnt, src) or _inside(src, mnt):
        raise ConfigError(
            f"mount point {mountpoint} and source folder {source} overlap",
            hint="mount the folder somewhere outside it",
        )
    if journal_dir is not None and _inside(Path(os.path.abspath(journal_dir)), mnt):
        raise ConfigError(f"journal directory {journal_dir} is inside the mount point {mnt}")
    return src


def _unescape_mountinfo(field: str) -> str:
    """Undo the kernel's octal escapes (``\\040`` for a space) in a mountinfo path."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def is_mount_point(path: Path) -> bool:
    """True when something is mounted on ``path``.

    ``os.path.ismount`` compares device numbers with the parent's, so it misses a bind mount
    of a folder of the same file system; the kernel's table of this process's mounts does
    not. ``os.path.ismount`` stays as the answer where ``/proc`` is not mounted.
    """
    if os.path.ismount(path):
        return True
    target = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as table:
            return any(
                len(fields) > 4 and _unescape_mountinfo(fields[4]) == target
                for fields in (line.split(" ") for line in table)
            )
    except OSError:
        return False


def is_stale_mount(mountpoint: Path) -> bool:
    """True when a FUSE mount whose daemon died sits at ``mountpoint``.

    ``stat`` alone is not enough: for up to the attribute timeout after the daemon's
    death the kernel answers it from its cache. Opening the folder always asks the
    daemon, and a dead one's connection answers ENOTCONN.
    """
    try:
        os.stat(mountpoint)
        if is_mount_point(mountpoint):
            with os.scandir(mountpoint):
                pass
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def lazy_unmount(mountpoint: Path) -> None:
    """Detach the mount at ``mountpoint`` now; the kernel finishes when it is no longer busy."""
    tool = shutil.which("fusermount3")
    cmd = [tool, "-u", "-z", str(mountpoint)] if tool else ["umount", "-l", str(mountpoint)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=_UNMOUNT_TIMEOUT)
    if res.returncode != 0 and tool:  # fusermount3 refuses some mounts umount handles
        res = subprocess.run(
            ["umount", "-l", str(mountpoint)],
            capture_output=True,
            text=True,
            timeout=_UNMOUNT_TIMEOUT,
        )
    if res.returncode != 0:
        raise ConfigError(
            f"cannot unmount the stale FUSE mount at {mountpoint}: {res.stderr.strip()}",
            hint=f"run `umount -l {mountpoint}` as root",
        )


def prepare_mountpoint(mountpoint: Path) -> None:
    """Make sure ``mountpoint`` is an empty directory that is not mounted on.

    A stale FUSE mount (its daemon is gone) is unmounted lazily and logged; a live mount,
    a missing path, a file or a non-empty directory are errors.
    """
    if is_stale_mount(mountpoint):
        log.warning(
            "fuse.stale_mount_unmounted",
            mountpoint=str(mountpoint),
            reason="Transport endpoint is not connected (a previous filter died)",
        )
        lazy_unmount(mountpoint)
        if is_stale_mount(mountpoint):
            raise ConfigError(f"mount point {mountpoint} is still a stale FUSE mount")
    check_mountpoint(mountpoint)


def check_mountpoint(mountpoint: Path) -> None:
    """What ``prepare_mountpoint`` requires, checked without changing anything: done when
    the command starts, so a bad ``--mount`` fails before the initial sync. A stale mount
    passes (the mount unmounts it)."""
    if is_stale_mount(mountpoint):
        return
    if not mountpoint.exists():
        raise ConfigError(f"mount point {mountpoint} does not exist", hint="create the directory")
    if not mountpoint.is_dir():
        raise ConfigError(f"mount point {mountpoint} is not a directory")
    if is_mount_point(mountpoint):
        raise ConfigError(
            f"{mountpoint} is already a mount point",
            hint="another filter may be running; unmount it first",
        )
    if any(os.scandir(mountpoint)):
        raise ConfigError(
            f"mount point {mountpoint} is not empty",
            hint="files under it would be hidden by the mount; use an empty directory",
        )
