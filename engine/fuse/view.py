"""The folder as the kernel sees it through the mount, mapped back to SOURCE_DIR.

The kernel names files by our inode numbers (``nodes.NodeTable``: inode <-> current
relative path) and by the handle numbers we gave out when it opened them. A journal
record needs the file's *current* relative path and a real change needs its path under
SOURCE_DIR; :class:`SourceView` answers both, and holds the open file and directory
handles. It changes nothing and journals nothing: the handlers do that, journal first.

A name the replica cannot hold (not UTF-8, control characters, too long) is refused
with EINVAL by :meth:`SourceView.recordable` before any record is built.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import structlog

from replicator.engine.fuse.nodes import Node, NodeTable
from replicator.engine.fuse.replies import entry_attributes, err
from replicator.engine.names import path_problem

log = structlog.get_logger("replicator.fuse")


@dataclass(eq=False, slots=True)
class Handle:
    """An open file: the real file's descriptor (also the handle number) and its node.

    ``sync_writes``: opened O_DSYNC/O_SYNC with ``direct_io``, whose writes the kernel
    answers without an fsync request (it sends one after each write only through its
    page cache): the filter syncs the journal before it answers each of them itself.
    ``datasync`` is False for O_SYNC (the file's metadata too). ``max_size``: the largest
    size the source's file system allows the file (:meth:`SourceView.size_limit`).
    ``writable``: opened for writing (or truncating) through the mount."""

    fd: int
    node: Node
    sync_writes: bool = False
    datasync: bool = True
    max_size: int = 1 << 63
    writable: bool = False


@dataclass(eq=False, slots=True)
class DirHandle:
    node: Node
    names: list[bytes] | None = None  # snapshot taken when a listing starts


def exists(path: str) -> bool:
    """lstat-based existence (a dangling symlink exists)."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    return True


class SourceView:
    """Inodes, handles and paths of the mounted folder (see the module docstring)."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.nodes = NodeTable()
        self.handles: dict[int, Handle] = {}
        self.dirs: dict[int, DirHandle] = {}
        self._next_dir_fh = 1
        self._size_limits: dict[int, int] = {}  # st_dev -> largest file size allowed

    def real(self, path: str) -> str:
        """The path under SOURCE_DIR of the relative ``path``."""
        return f"{self.source}/{path}" if path else str(self.source)

    def path_of(self, node: Node) -> str:
        """``node``'s current relative path; ENOENT once no name reaches it."""
        if node.path is None:
            raise err(errno.ENOENT)
        return node.path

    def child(self, parent_ino: int, name: bytes) -> str:
        """The relative path of ``name`` in the directory ``parent_ino``."""
        try:
            return self.nodes.get(parent_ino).child(os.fsdecode(name))
        except LookupError:
            raise err(errno.ENOENT) from None

    def recordable(self, path: str) -> str:
        """``path`` when a record may carry it; EINVAL for names the replica cannot hold."""
        problem = path_problem(path)
        if problem is not None:
            log.warning("fuse.unreplicable_name", path=path, problem=problem)
            raise err(errno.EINVAL)
        return path

    def attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        """Attributes of ``node``: by its path, or (detached) through an open handle."""
        if node.path is not None:
            st = os.lstat(self.real(node.path))
        elif node.fds:
            st = os.fstat(next(iter(node.fds)))
        else:
            raise err(errno.ENOENT)
        return entry_attributes(st, node.ino)

    def open_file(self, node: Node, fd: int, flags: int) -> pyfuse3.FileInfo:
        """Give the kernel a handle for the real file ``fd``. O_DIRECT opens get
        ``direct_io``: the kernel then sends the writes as issued, bypassing its cache."""
        direct = bool(flags & os.O_DIRECT)
        self.handles[fd] = Handle(
            fd,
            node,
            sync_writes=direct and bool(flags & os.O_DSYNC),
            datasync=flags & os.O_SYNC != os.O_SYNC,
            max_size=self.size_limit(fd),
            writable=flags & os.O_ACCMODE != os.O_RDONLY or bool(flags & os.O_TRUNC),
        )
        self.nodes.opened(node, fd)
        return pyfuse3.FileInfo(
            fh=pyfuse3.FileHandleT(fd),
            direct_io=direct,
            keep_cache=False,
        )

    def size_limit(self, fd: int) -> int:
        """The largest size the file system of the real file ``fd`` allows a file.

        A write, truncate or fallocate past it must be refused (EFBIG) before it is
        journaled: the record of a change the source could not make would reach the
        replica first, where applying it fails the same way and stops the job for good.
        The limit (the file system's s_maxbytes, 16 TiB on ext4 with 4 KiB blocks) is
        also the bound of lseek(2), so a binary search of lseeks finds it; once per
        file system. Moves ``fd``'s file position, which the filter never uses.
        """
        dev = os.fstat(fd).st_dev
        limit = self._size_limits.get(dev)
        if limit is None:
            low, high = 0, 1 << 63  # lseek(low) succeeds, lseek(high) cannot
            while high - low > 1:
                mid = (low + high) // 2
                try:
                    os.lseek(fd, mid, os.SEEK_SET)
                except OSError:
                    high = mid
                else:
                    low = mid
            os.lseek(fd, 0, os.SEEK_SET)
            self._size_limits[dev] = limit = low
        return limit

    def close_file(self, fh: int) -> None:
        handle = self.handles.pop(fh)
        self.nodes.closed(handle.node, handle.fd)
        os.close(handle.fd)

    def open_dir(self, node: Node) -> pyfuse3.FileHandleT:
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self.dirs[fh] = DirHandle(node)
        return pyfuse3.FileHandleT(fh)

    def close_all(self) -> None:
        """Close every real file still open (at unmount)."""
        for fh in list(self.handles):
            self.close_file(fh)
        self.dirs.clear()
