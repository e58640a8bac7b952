"""QEMU's "nobody else may write" image locks on the disk images of a FUSE-captured folder.

FUSE capture journals the writes that come through the mount; a program that opens an
image under SOURCE_DIR itself (a VM started by mistake on the folder instead of the
mount, ``qemu-io`` or ``qemu-img`` on the real path) writes behind the filter, and the
replica silently differs from the source. The sender checks at start that no program
has an image open for writing there (``FuseFolderCapture.check``); :class:`FolderGuard`
keeps it so for the capture's life, as the NBD shim keeps its images: it holds QEMU's
deny-write and deny-resize lock bytes (``imagelock.deny_writers``, shared OFD locks) on
every disk image of the folder, so such a program fails with QEMU's own 'Failed to get
"write" lock' and writes nothing. Readers open the images as before (``qemu-img info``,
``compare``, without ``-U``).

* **Through the mount** nothing changes: the filter registers no lock handlers, so the
  kernel keeps the locks a QEMU takes through the mount on the mount's inode, apart from
  SOURCE_DIR's (two QEMUs on the mounted path conflict as on any file), and the filter's
  own writes to SOURCE_DIR take no locks.
* **Which files**: the disk images, by the rule that makes a file replicate by extent
  (``volumes.is_disk_image``: an image's suffix or header, or larger than a configuration
  file may be), up to ``MAX_FILES`` (one descriptor each; past it ``fuse.guard_full`` is
  logged once). Configuration files are not guarded: the programs that write them
  (editors, libvirt) take no QEMU locks, so a lock would stop none of them, and a VM
  started on the folder itself fails at its first guarded disk, before its guest runs.
* **Names change through the mount** (the filter tells the guard): a file created with
  an image's name is guarded at once; one that becomes an image by its content (written
  with no image suffix) or its name (renamed to ``disk.qcow2``) when it is closed or
  renamed; a renamed image keeps its guard under its new name (the descriptor follows
  the file); an unlinked image, or one renamed over, is let go at once (a descriptor
  kept would keep a deleted image's space; the sender's own lock on it goes too, through
  ``gone``).
* **Released** by ``release`` when the capture stops (after the unmount) and, whatever
  ends the run, with the sender's other locks; OFD locks go with the last descriptor of
  their file description, so a SIGKILLed sender leaves none behind.

Blocking calls (one ``open``, ``fstat``, two ``pread`` and two ``fcntl`` per image held):
the filter calls them on its loop at a create, rename or close, the sender at start in a
thread. A failure to guard a file is logged and never fails the operation that asked.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final

import structlog

from replicator.engine.imagelock import deny_writers, used_for_writing
from replicator.engine.volumes import is_disk_image

log = structlog.get_logger("replicator.fuse")

_OPEN_FLAGS: Final = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY


class FolderGuard:
    """The guard of one folder's disk images, by path relative to it (module docstring)."""

    MAX_FILES: Final = 256  # one descriptor each, beside the sender lock's and the filter's

    def __init__(
        self,
        source: Path,
        max_files: int = MAX_FILES,
        gone: Callable[[os.stat_result], None] | None = None,
    ) -> None:
        """``gone``: told of each guarded file unlinked or renamed over (the sender lets go
        of its own lock on it: ``ImageLocks.let_go``)."""
        self.source = source
        self.max_files = max_files
        self.gone = gone
        self._held: dict[str, int] = {}  # relative path -> descriptor holding the locks
        self._full_told = False

    def __contains__(self, path: str) -> bool:
        return path in self._held

    def __len__(self) -> int:
        return len(self._held)

    def hold_all(self, paths: Iterable[str]) -> None:
        """Guard each of ``paths`` that is a disk image (the folder's files at start)."""
        for path in paths:
            self.hold(path)

    def hold(self, path: str, fd: int | None = None) -> bool:
        """Guard ``path`` if it is a regular file and a disk image; whether it is guarded
        now. ``fd``: a descriptor of it to tell an image by (the caller's handle), so a file
        that is not one costs no ``open``."""
        if path in self._held:
            return True
        if fd is not None:
            try:
                if not _is_image(path, fd):
                    return False
            except OSError:
                pass  # a handle not open for reading: tell by a descriptor of our own
        if len(self._held) >= self.max_files:
            self._tell_full(path)
            return False
        try:
            own = os.open(f"{self.source}/{path}", _OPEN_FLAGS)
        except FileNotFoundError:
            return False
        except OSError as exc:  # EMFILE, a symlink (ELOOP), no access
            if exc.errno != errno.ELOOP:
                _not_guarded(path, exc)
            return False
        try:
            if not _is_image(path, own):
                os.close(own)
                return False
            deny_writers(own)
        except OSError as exc:
            os.close(own)
            _not_guarded(path, exc)
            return False
        self._held[path] = own
        if used_for_writing(own):  # opened on SOURCE_DIR before the guard: say so
            log.error(
                "fuse.written_behind_filter",
                path=str(self.source / path),
                problem="another program has this image open for writing in the source "
                "folder itself (QEMU's write lock): its writes bypass the filter and are "
                "not replicated",
                hint="stop that program and use the file under the mount; restart the "
                "sender afterwards so that its initial sync compares the folder",
            )
        return True

    def follow(self) -> None:
        """Drop what is no longer at its path (changed in SOURCE_DIR before the mount, while
        the initial sync ran) and guard the file now there."""
        for path, fd in list(self._held.items()):
            try:
                now = os.stat(f"{self.source}/{path}", follow_symlinks=False)
                same = os.path.samestat(now, os.fstat(fd))
            except OSError:
                same = False
            if not same:  # maybe renamed, not removed: nobody else is told
                os.close(self._held.pop(path))
                self.hold(path)

    def moved(self, old: str, new: str) -> None:
        """``old`` was renamed to ``new`` (over whatever was there), a folder with all its
        files: their guards follow (each descriptor is of the file, not of its name)."""
        if old == new:
            return
        self.removed(new)
        prefix = old + "/"
        for path in [p for p in self._held if p == old or p.startswith(prefix)]:
            self._held[new + path[len(old) :]] = self._held.pop(path)

    def removed(self, path: str) -> None:
        """``path`` was unlinked (or renamed over): let go of it, and of its space."""
        fd = self._held.pop(path, None)
        if fd is None:
            return
        try:
            if self.gone is not None:
                self.gone(os.fstat(fd))
        finally:
            os.close(fd)

    def release(self) -> None:
        """Let go of every image (idempotent)."""
        held, self._held = self._held, {}
        for fd in held.values():
            os.close(fd)

    def _tell_full(self, path: str) -> None:
        if not self._full_told:
            self._full_told = True
            log.warning(
                "fuse.guard_full",
                path=str(self.source / path),
                most=self.max_files,
                problem=f"only the first {self.max_files} disk images of the folder are "
                "locked against writers in the source folder itself",
                hint="run VMs and tools on the files under the mount only",
            )


def _is_image(path: str, fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode) and is_disk_image(path.rsplit("/", 1)[-1], fd)


def _not_guarded(path: str, exc: OSError) -> None:
    log.warning(
        "fuse.guard_failed",
        path=path,
        error=exc.strerror or str(exc),
        problem="this image is not locked against writers in the source folder itself",
    )
