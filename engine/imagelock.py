"""One writer per image: the advisory locks a sender holds on the disk images it captures,
and those a receiver holds on the replicas it keeps.

All are open-file-description byte-range locks (``fcntl`` ``F_OFD_SETLK``): the kernel
drops them when the process ends, SIGKILL included, so a crash never leaves a stale lock,
and unlike ``flock`` they stay byte-range locks on NFS, where VM images often live.

* **The sender lock**: an exclusive lock on one byte far past any data (offset 2^62),
  taken by every sender (scan, NBD, FUSE) on each disk image for as long as it runs. A
  second sender on the same image, under another job or state folder, is refused at start.
  It overlaps nothing QEMU locks, so a VM running on the image (scan capture) is unaffected.
* **The session mark**: one more byte, ``SESSION_MARK_BASE + mark``, locked with the sender
  lock, where ``mark`` is a random 32-bit number per sender run that also starts every
  session id the sender sends (its first 8 hex digits; ``ImageLocks.session_id``). A
  receiver that finds that byte locked on one of its replicas knows the replica *is* the
  source of the sender it serves (its ``--dir`` holds the sources: the same folder on one
  host, or a datastore both hosts mount), where applying would overwrite the source with
  its own past. Any other sender's mark is another byte, so a replica that a second sender
  reads onward (A to B to C) is not mistaken for it.
* **QEMU's image locks**, while the NBD shim serves an image and writes it. QEMU locks byte
  ``100 + n`` of an image to say "I use permission n" and ``200 + n`` for "nobody else may
  have permission n" (``raw_apply_lock_bytes`` in QEMU's ``block/file-posix.c``; n is 0
  consistent read, 1 write, 3 resize). The shim holds 100, 101, 103 and 201, 203 (shared):
  a QEMU, ``qemu-io`` or ``qemu-img`` that opens the image for writing behind the shim's
  back fails with 'Failed to get "write" lock', and one that already has it open for
  writing makes the shim refuse to start. Readers need QEMU's ``-U`` (``qemu-img info -U``,
  ``compare -U``), as with any image a running VM writes.
* **The folder guard** (``engine/folder_guard.py``), on the disk images of a folder that
  FUSE capture serves, for the capture's life: the same two bytes as the replica guard,
  held on the images under SOURCE_DIR, so a program that opens one there for writing (a
  VM started on the folder instead of the mount) fails with QEMU's 'Failed to get
  "write" lock' instead of writing behind the filter. QEMU on the mount is not
  concerned: the filter has no lock handlers, so the kernel keeps locks taken through
  the mount on the mount's own inodes.
* **The replica guard** (``ReplicaGuard``), on a receiver's replica disk images while it
  keeps them (until a failover promotes them): QEMU's "nobody else may write / resize"
  bytes only, shared. A VM started on a replica by hand, ``qemu-io`` or ``qemu-img rebase``
  fail with QEMU's own 'Failed to get "write" lock', as a DRBD secondary cannot be opened,
  instead of writing under replication; readers (``qemu-img info``, ``compare``, an overlay
  reading it as its backing file) open it as before, without ``-U``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
import string
import struct
import uuid
from collections.abc import Container
from pathlib import Path
from typing import Protocol

from replicator.engine.errors import ConfigError


class ImageTaken(ConfigError):
    """Another replicator sender holds the sender lock of an image (exit 3, as any
    ConfigError): a command that is not a sender (verify) says what to do instead."""


SENDER_LOCK_BYTE = 2**62
MAX_MARKS = 256  # configuration files a sender marks (one descriptor each)
SESSION_MARK_BASE = SENDER_LOCK_BYTE + 1  # + the sender's 32-bit mark
_QEMU_USE = 100  # + permission bit: "I use it"
_QEMU_DENY = 200  # + permission bit: "nobody else may have it"
_CONSISTENT_READ, _WRITE, _RESIZE = 0, 1, 3
_FLOCK = struct.Struct("hhqqi4x")  # struct flock on Linux: type, whence, start, len, pid


def _lock(fd: int, kind: int, start: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, start, 1, 0))


def _holder(fd: int, kind: int, start: int) -> bool:
    """True when another open file description holds a lock that conflicts with ``kind``."""
    got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(kind, os.SEEK_SET, start, 1, 0))
    return bool(_FLOCK.unpack(got)[0] != fcntl.F_UNLCK)


def deny_writers(fd: int) -> None:
    """Lock QEMU's "nobody else may write" and "nobody else may resize" bytes of ``fd``'s
    file, shared (``fd`` open for reading is enough): a QEMU, ``qemu-io`` or ``qemu-img``
    that then opens the file for writing fails with 'Failed to get "write" lock', and
    readers open it as before. OSError (EAGAIN, EACCES) when someone holds one of them
    exclusively, which QEMU never does."""
    for byte in (_QEMU_DENY + _WRITE, _QEMU_DENY + _RESIZE):
        _lock(fd, fcntl.F_RDLCK, byte)


def used_for_writing(fd: int) -> bool:
    """True while another open file description holds QEMU's lock that says it uses the
    file for writing (a running QEMU, ``qemu-io``)."""
    return _holder(fd, fcntl.F_WRLCK, _QEMU_USE + _WRITE)


def session_mark(session: str) -> int | None:
    """The sender's mark a session id starts with, or None when it does not start with
    8 hex digits. An older sender's id (a random uuid) gives a mark no sender holds."""
    head = session[:8]
    if len(head) == 8 and all(c in string.hexdigits for c in head):
        return int(head, 16)
    return None


class ImageLock:
    """The locks of one image; ``release`` (or process exit) drops them. Blocking calls."""

    def __init__(self, path: Path, mark: int | None = None) -> None:
        self.path = path
        self.mark = mark  # the session mark (module docstring), locked with the sender lock
        self._fd = -1
        self.serving = False

    def acquire(self) -> None:
        """Take the sender lock, or raise ConfigError naming the image."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:  # not ours to write, or on a read-only mount (a snapshot's)
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)  # a read lock is all we can
        try:
            kind = fcntl.F_WRLCK if _writable(fd) else fcntl.F_RDLCK
            try:
                _lock(fd, kind, SENDER_LOCK_BYTE)
                if self.mark is not None:
                    _lock(fd, kind, SESSION_MARK_BASE + self.mark)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise ImageTaken(
                    f"{self.path} is already being replicated by another replicator sender",
                    hint="one sender per image: stop the other one, or replicate a copy",
                ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def follow(self) -> bool:
        """The image was replaced at its path (a restore, ``qemu-img convert`` or ``mv``
        over it): lock the file now there and let go of the old one, whose space the
        descriptor kept. True when it moved. Raises ConfigError when another sender has
        the new file; the old lock stays then."""
        if self._fd < 0 or self.serving:
            return False
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return False  # gone: the scan says so
        if not stat.S_ISREG(now.st_mode):
            return False  # not a file any more (a FIFO would hold the open): the scan says so
        held = os.fstat(self._fd)
        if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            return False
        old, self._fd = self._fd, -1
        try:
            self.acquire()
        except ConfigError as exc:
            self._fd = old
            raise ConfigError(
                f"{self.path} was replaced by another file, which another replicator "
                "sender already replicates",
                hint=exc.hint,
            ) from None
        except BaseException:
            self._fd = old
            raise
        os.close(old)
        return True

    def holds(self, gone: os.stat_result) -> bool:
        """Whether this lock is on the file ``gone`` is the ``stat`` of."""
        return self._fd >= 0 and os.path.samestat(os.fstat(self._fd), gone)

    def written_by_another(self) -> bool:
        """True while another program (a running QEMU, ``qemu-io``) holds QEMU's lock that
        says it uses the image for writing; never true of the image's own NBD shim."""
        if self._fd < 0 or self.serving:
            return False
        return used_for_writing(self._fd)

    def check_servable(self) -> None:
        """Raise ConfigError if ``serve`` would refuse now: the image not writable, or
        another program using it for writing. A live sender asks before its initial sync,
        so that a VM left running on the image is named at once, not after a sync of the
        whole disk (and a scan of an image it writes)."""
        if self._fd < 0:
            raise RuntimeError("acquire() first")
        if not _writable(self._fd):
            raise ConfigError(f"{self.path} is not writable: the NBD shim cannot serve it")
        for bit in (_CONSISTENT_READ, _WRITE, _RESIZE):
            # someone holding the deny byte of a permission we need, or using one we deny
            if _holder(self._fd, fcntl.F_WRLCK, _QEMU_DENY + bit) or (
                bit != _CONSISTENT_READ and _holder(self._fd, fcntl.F_WRLCK, _QEMU_USE + bit)
            ):
                raise ConfigError(
                    f"{self.path} is open for writing by another program (QEMU's image lock "
                    "is held)",
                    hint="stop the VM or tool using the image: with --capture nbd it must "
                    "write through the NBD export",
                )

    def serve(self) -> None:
        """Add QEMU's locks for a writer that does not share writing (the NBD shim)."""
        self.check_servable()
        for byte in (_QEMU_USE + _CONSISTENT_READ, _QEMU_USE + _WRITE, _QEMU_USE + _RESIZE):
            _lock(self._fd, fcntl.F_RDLCK, byte)
        for byte in (_QEMU_DENY + _WRITE, _QEMU_DENY + _RESIZE):
            _lock(self._fd, fcntl.F_RDLCK, byte)
        self.serving = True

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the description drops all its OFD locks
            self._fd = -1
            self.serving = False


class FileMark:
    """The session mark alone, as a shared (read) lock, on a configuration file a sender
    reads, or on the folder a folder job replicates: a receiver whose replica of it *is*
    that file, or whose replica folder lies inside that folder or holds it, refuses, as
    for an image (module docstring). No sender lock: two jobs may send one file. Best
    effort: what cannot be opened or locked (a special file, a file system without locks)
    goes unmarked. Blocking calls."""

    def __init__(self, path: Path, mark: int) -> None:
        self.path = path
        self.mark = mark
        self._fd = -1

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
                _lock(fd, fcntl.F_RDLCK, SESSION_MARK_BASE + self.mark)
                self.release()
                self._fd, fd = fd, -1
        except OSError:
            pass
        finally:
            if fd >= 0:
                os.close(fd)

    def follow(self) -> None:
        """The file was replaced at its path (an editor saves by renaming a new file over
        it): mark the file now there."""
        try:
            now = os.stat(self.path)
            if self._fd >= 0:
                held = os.fstat(self._fd)
                if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                    return
        except OSError:
            return
        self.acquire()

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def marked_by(fd: int, mark: int) -> bool:
    """True when the sender with session mark ``mark`` holds it on the file of ``fd``."""
    return _holder(fd, fcntl.F_WRLCK, SESSION_MARK_BASE + mark)


def _writable(fd: int) -> bool:
    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE in (os.O_RDWR, os.O_WRONLY)


class Held(Protocol):
    """Locks a capture takes beside the sender's (``ImageLocks.keep``)."""

    def release(self) -> None: ...


class ImageLocks:
    """The sender locks of a job's disk images, taken together (all or none), and the
    session mark on its configuration ``files`` (``FileMark``)."""

    def __init__(
        self, paths: list[Path], files: list[Path] | None = None, folder: Path | None = None
    ) -> None:
        """``folder``: a folder job's source folder, marked as its files are."""
        self.mark = secrets.randbelow(2**32)
        self.locks = {path: ImageLock(path, self.mark) for path in paths}
        # one descriptor each: a folder job's first MAX_MARKS files only
        marked = ([folder] if folder is not None else []) + (files or [])[:MAX_MARKS]
        self.marks = [FileMark(path, self.mark) for path in marked]
        self._kept: list[Held] = []

    def keep(self, held: Held) -> None:
        """Release ``held`` with these locks (whatever ends the sender's run), if nothing
        released it first: a capture's own locks (FUSE capture's ``FolderGuard``)."""
        self._kept.append(held)

    def session_id(self) -> str:
        """A new session id that starts with this sender's mark (see ``session_mark``)."""
        return f"{self.mark:08x}{uuid.uuid4().hex[8:]}"

    def acquire(self) -> None:
        try:
            for lock in self.locks.values():
                lock.acquire()
            for mark in self.marks:
                mark.acquire()
        except BaseException:
            self.release()
            raise

    def check_servable(self, path: Path) -> None:
        self.locks[path].check_servable()

    def serve(self, path: Path) -> None:
        self.locks[path].serve()

    def follow(self) -> list[Path]:
        """``ImageLock.follow`` for each image: the images that were replaced (and
        ``FileMark.follow`` for each configuration file)."""
        self.follow_files()
        return [path for path, lock in self.locks.items() if lock.follow()]

    def follow_files(self) -> None:
        for mark in self.marks:
            mark.follow()

    def let_go(self, gone: os.stat_result) -> None:
        """Release the locks on the file ``gone`` is the ``stat`` of: it was removed (FUSE
        capture: unlinked or renamed over through the mount), and the descriptor kept its
        space taken until the sender stopped. No name reaches it for another sender."""
        for lock in self.locks.values():
            if lock.holds(gone):
                lock.release()

    def written_by_others(self) -> list[Path]:
        """The images another program has open for writing now (``written_by_another``)."""
        return [path for path, lock in self.locks.items() if lock.written_by_another()]

    def release(self) -> None:
        for lock in self.locks.values():
            with contextlib.suppress(OSError):
                lock.release()
        for mark in self.marks:
            mark.release()
        kept, self._kept = self._kept, []
        for held in kept:
            with contextlib.suppress(OSError):
                held.release()


class ReplicaGuard:
    """The replica guard of one job (see the module docstring): an open descriptor per
    replica disk image, by replica path, holding QEMU's deny-write and deny-resize bytes.

    Blocking calls. ``writers`` names the replicas another program had open for writing
    before the guard was taken (their "I use write" byte is held): a VM already running on
    a replica, which the receiver must not write under.
    """

    MAX_FILES = 256  # per job: a folder job's disk images, never one descriptor per file

    def __init__(self) -> None:
        self._held: dict[str, tuple[int, int]] = {}  # path -> (descriptor, inode)
        self._passed: dict[str, int] = {}  # path -> inode of a file that is not a disk image
        self._refused: set[str] = set()  # paths whose deny bytes someone holds exclusively

    def wants(self, path: str, ino: int | None) -> bool:
        """Whether ``path`` (at inode ``ino``, None: any) is not covered yet."""
        held = self._held.get(path)
        if held is not None and ino in (None, held[1]):
            return False
        passed = self._passed.get(path)
        return passed is None or (ino is not None and passed != ino)

    def holds(self, path: str) -> bool:
        """Whether the guard holds a descriptor of replica ``path`` (a disk image)."""
        return path in self._held

    @property
    def full(self) -> bool:
        return len(self._held) >= self.MAX_FILES

    def hold(self, path: str, fd: int) -> None:
        """Guard replica ``path`` through ``fd`` (read-only is enough; the guard owns it)."""
        self.drop(path)
        ino = os.fstat(fd).st_ino
        try:
            deny_writers(fd)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            self._refused.add(path)  # QEMU never locks these bytes exclusively: not QEMU
            return
        self._held[path] = (fd, ino)

    def pass_over(self, path: str, ino: int) -> None:
        """``path`` is not a disk image: nothing to guard (until it is another file)."""
        self.drop(path)
        self._passed[path] = ino

    def keep_only(self, paths: Container[str]) -> None:
        """Let go of every path not in ``paths`` (removed or renamed away: a descriptor
        kept would keep a deleted image's space)."""
        for path in [p for p in (*self._held, *self._passed, *self._refused) if p not in paths]:
            self.drop(path)

    def drop(self, path: str) -> None:
        held = self._held.pop(path, None)
        if held is not None:
            os.close(held[0])
        self._passed.pop(path, None)
        self._refused.discard(path)

    def sources(self, mark: int) -> list[str]:
        """The guarded replicas on which the sender with session mark ``mark`` holds its
        lock: that sender's own source images, sorted."""
        return sorted(
            p
            for p, (fd, _) in self._held.items()
            if _holder(fd, fcntl.F_WRLCK, SESSION_MARK_BASE + mark)
        )

    def writers(self) -> list[str]:
        """The guarded replicas another program has open for writing, sorted."""
        found = {p for p, (fd, _) in self._held.items() if used_for_writing(fd)}
        return sorted(found | self._refused)

    def release(self) -> None:
        for path in list(self._held):
            with contextlib.suppress(OSError):
                self.drop(path)
        self._passed.clear()
        self._refused.clear()
