"""The journaling FUSE passthrough: every content change is journaled before it is answered.

``JournalingFilter`` serves SOURCE_DIR's tree (the real bytes stay there) and appends a
record for every change to the shared write-order journal:

* WRITE for ``write``; RESIZE for truncate/ftruncate and ``open(O_TRUNC)``; TRIM and
  ZERO for fallocate's punch hole and zero range; CREATE,
  UNLINK, RENAME (incl. rename-over), MKDIR, RMDIR, SYMLINK, CHMOD for the metadata
  operations. Reads, getattr, readdir and statfs cost no journal work.
* Order. One FIFO lock (the *sequencer*) is held from resolving the record's path until
  the real file system has been changed, and the record is appended *before* the change
  (journal first, then the file, then the reply). So the journal order is exactly the
  order in which changes reached SOURCE_DIR, across all files of the folder, and a path
  can never change between being written into a record and the change it names.
* Durability. ``fsync``/``fdatasync`` of a file, and ``flush`` (close) of a file changed
  through it, are answered once a FLUSH barrier record is appended, ``journal.sync()``
  (group commit: concurrent callers share one round) and the real file's fsync/fdatasync
  are done. ``fsyncdir`` syncs the journal and the real directory.
* Failures after journaling. A failed metadata change is undone in the journal by the
  inverse record where one exists (CREATE -> UNLINK, MKDIR -> RMDIR, SYMLINK -> UNLINK,
  CHMOD -> CHMOD old mode, RMDIR of an empty dir -> MKDIR). A failed write or truncate is
  reconciled: the file's real size and the range's real content are journaled again.
  When that is impossible (UNLINK/RENAME failing after passing every check, fsync of a
  real file failing) the filter *diverges*: it logs that the folder needs a resync and
  refuses every further change with EIO rather than let the replica drift silently.
  Obvious errors (EEXIST, ENOENT, ENOTEMPTY, ...) are found by checks before anything is
  journaled; only this process changes SOURCE_DIR, so the checks stay true.

O_DIRECT opens get ``direct_io`` on their handle (the kernel bypasses its page cache and
sends the writes as issued); the real file is opened without O_DIRECT, since the payload
buffers are not aligned, which changes nothing for durability (O_DIRECT never implied it).
The writeback cache stays off: with it the kernel would merge and reorder dirty pages
and send them whenever it likes, so the journal would record the kernel's flush order
instead of the order writes were acknowledged to the application.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar, cast

import pyfuse3
import structlog

from replicator.engine.fuse.nodes import Node, NodeTable
from replicator.engine.fuse.overflow import FolderOverflow, read_records, snapshot
from replicator.engine.names import path_problem
from replicator.engine.reconcile import truth_records
from replicator.engine.volumes import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    fallocate,
    pwrite_all,
)
from replicator.journal import durable
from replicator.journal.errors import JournalError, JournalFull
from replicator.journal.journal import Journal
from replicator.journal.records import MAX_DATA, Record, RecordType

log = structlog.get_logger("replicator.fuse")
_NAMESPACE: Final = frozenset(
    {
        RecordType.CREATE,
        RecordType.UNLINK,
        RecordType.RENAME,
        RecordType.MKDIR,
        RecordType.RMDIR,
        RecordType.SYMLINK,
    }
)

ATTR_TIMEOUT: Final = 1.0  # only this process changes SOURCE_DIR, so attributes may be cached
# flags handled here rather than passed to the real open
_OPEN_STRIP: Final = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_TRUNC | os.O_DIRECT
_WRITABLE: Final = os.O_WRONLY | os.O_RDWR
# the fallocate(2) modes FUSE passes on; anything else gets EOPNOTSUPP
_FALLOC_MODES: Final = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE

_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])


def _fuse_errors(fn: _F) -> _F:
    """Turn every failure of a handler into a FUSE error reply.

    pyfuse3 ends its main loop on any exception that is not a FUSEError, which would
    take the whole mount down for one failed request.
    """

    @functools.wraps(fn)
    async def wrapper(*args: Any) -> Any:
        try:
            return await fn(*args)
        except pyfuse3.FUSEError:
            raise
        except JournalFull as exc:
            log.error("fuse.journal_full", op=fn.__name__, error=str(exc))
            raise pyfuse3.FUSEError(errno.ENOSPC) from None
        except JournalError as exc:
            log.error("fuse.journal_failed", op=fn.__name__, error=str(exc))
            raise pyfuse3.FUSEError(errno.EIO) from None
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except KeyError:  # an inode or handle number we never gave out
            raise pyfuse3.FUSEError(errno.EBADF) from None
        except Exception:
            log.exception("fuse.handler_failed", op=fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return cast(_F, wrapper)


def _err(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


def _exists(path: str) -> bool:
    """lstat-based existence (a dangling symlink exists)."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    return True


def entry_attributes(st: os.stat_result, ino: int) -> pyfuse3.EntryAttributes:
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = pyfuse3.InodeT(ino)
    entry.generation = 0
    entry.entry_timeout = ATTR_TIMEOUT
    entry.attr_timeout = ATTR_TIMEOUT
    entry.st_mode = pyfuse3.ModeT(st.st_mode)
    entry.st_nlink = st.st_nlink
    entry.st_uid = st.st_uid
    entry.st_gid = st.st_gid
    entry.st_rdev = st.st_rdev
    entry.st_size = st.st_size
    entry.st_blksize = st.st_blksize
    entry.st_blocks = st.st_blocks
    entry.st_atime_ns = st.st_atime_ns
    entry.st_mtime_ns = st.st_mtime_ns
    entry.st_ctime_ns = st.st_ctime_ns
    return entry


@dataclass(eq=False, slots=True)
class _Handle:
    fd: int
    node: Node


@dataclass(eq=False, slots=True)
class _DirHandle:
    node: Node
    names: list[bytes] | None = None  # snapshot taken when a listing starts


@dataclass(slots=True)
class FilterStats:
    writes: int = 0
    bytes_written: int = 0
    max_write: int = 0  # largest single write request seen (shows the kernel's max_write)
    records: int = 0
    syncs: int = 0


class JournalingFilter(pyfuse3.Operations):
    """pyfuse3 operations: a passthrough of ``source`` that journals every change first."""

    enable_writeback_cache = False  # see the module docstring
    supports_dot_lookup = False

    def __init__(self, source: Path, journal: Journal, *, overflow: bool = False) -> None:
        """``overflow``: at a full journal keep serving and track changes (overflow.py)
        instead of answering ENOSPC."""
        super().__init__()
        self.source = source
        self.journal = journal
        self.overflow_ok = overflow
        self._overflow: FolderOverflow | None = None
        self._resyncing = False
        self.stats = FilterStats()
        self._nodes = NodeTable()
        self._handles: dict[int, _Handle] = {}
        self._dirs: dict[int, _DirHandle] = {}
        self._next_dir_fh = 1
        self._seq = asyncio.Lock()  # FIFO; see "Order" in the module docstring
        self._unflushed = False  # a record was appended since the last FLUSH record
        self._diverged: str | None = None
        self._chown = os.geteuid() == 0

    # ------------------------------------------------------------------ helpers
    @property
    def diverged(self) -> str | None:
        """Why the replica can no longer follow the source (None while all is well)."""
        return self._diverged

    def _real(self, path: str) -> str:
        return f"{self.source}/{path}" if path else str(self.source)

    def _node_path(self, node: Node) -> str:
        if node.path is None:
            raise _err(errno.ENOENT)
        return node.path

    def _child(self, parent_ino: int, name: bytes) -> str:
        try:
            return self._nodes.get(parent_ino).child(os.fsdecode(name))
        except LookupError:
            raise _err(errno.ENOENT) from None

    def _recordable(self, path: str) -> str:
        """``path`` when a record may carry it; EINVAL for names the replica cannot hold."""
        problem = path_problem(path)
        if problem is not None:
            log.warning("fuse.unreplicable_name", path=path, problem=problem)
            raise _err(errno.EINVAL)
        return path

    def _check_healthy(self) -> None:
        if self._diverged is not None:
            raise _err(errno.EIO)

    def _diverge(self, reason: str) -> None:
        if self._diverged is None:
            self._diverged = reason
            log.error(
                "fuse.replica_diverged",
                reason=reason,
                action="every further change is refused with EIO; restart the filter and "
                "resync the folder",
            )

    async def _append(self, *records: Record) -> None:
        """Journal ``records`` in order (call with the sequencer held).

        A namespace change is written out to the kernel before it is made: a rescan after
        this process dies finds changed content in the files, but never what was removed
        or renamed, so that record must not die with the process.
        """
        self._check_healthy()
        if self._overflow is None:
            try:
                await self.journal.append_many(records)
            except JournalFull as exc:
                if not self.overflow_ok:
                    raise
                # before the operation is made: the folder now is the replica's layout to be
                self._overflow = FolderOverflow(await asyncio.to_thread(snapshot, self.source))
                log.warning(
                    "fuse.journal_overflow",
                    journal_bytes=exc.used,
                    cap=exc.cap,
                    action="changes continue unjournaled and are tracked; the replica stays "
                    "at its last consistency point until they are resynced",
                )
        if self._overflow is not None:
            for record in records:
                self._overflow.absorb(record)
            return
        if any(r.type in _NAMESPACE for r in records):
            await self.journal.write_out()
        self._unflushed = True
        self.stats.records += len(records)

    async def _undo(self, record: Record, what: str) -> None:
        """Journal the inverse of a change that failed after its record was appended."""
        try:
            await self._append(record)
        except Exception as exc:
            self._diverge(f"{what} failed and its journal record could not be undone: {exc}")

    async def _reconcile(self, fd: int, name: str, offset: int, length: int) -> None:
        """A change of ``[offset, offset+length)`` failed after journaling: journal the truth.

        Appends the file's real size and the range's real content, so the replica ends up
        equal to the source whatever part of the change happened.
        """
        try:
            for record in truth_records(fd, name, offset, length):
                await self._append(record)
        except Exception as exc:
            self._diverge(f"a change of {name} failed and could not be reconciled: {exc}")

    def _attrs_of(self, node: Node) -> pyfuse3.EntryAttributes:
        if node.path is not None:
            st = os.lstat(self._real(node.path))
        elif node.fds:
            st = os.fstat(next(iter(node.fds)))
        else:
            raise _err(errno.ENOENT)
        return entry_attributes(st, node.ino)

    def _own(self, real: str, ctx: pyfuse3.RequestContext) -> None:
        """Give a new entry to the caller, as a kernel file system would (not replicated)."""
        if self._chown:
            try:
                os.lchown(real, ctx.uid, ctx.gid)
            except OSError as exc:
                log.warning("fuse.chown_failed", path=real, error=exc.strerror)

    def _open_handle(self, node: Node, fd: int, flags: int) -> pyfuse3.FileInfo:
        self._handles[fd] = _Handle(fd, node)
        self._nodes.opened(node, fd)
        return pyfuse3.FileInfo(
            fh=pyfuse3.FileHandleT(fd),
            direct_io=bool(flags & os.O_DIRECT),
            keep_cache=False,
        )

    # ------------------------------------------------------------------ lookups
    @_fuse_errors
    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        st = os.lstat(self._real(path))
        return entry_attributes(st, self._nodes.lookup(path).ino)

    @_fuse_errors
    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        for ino, count in inode_list:
            self._nodes.forget(ino, count)

    @_fuse_errors
    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._attrs_of(self._nodes.get(inode))

    @_fuse_errors
    async def readlink(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> bytes:
        path = self._node_path(self._nodes.get(inode))
        return os.fsencode(os.readlink(self._real(path)))

    @_fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = os.statvfs(self.source)
        out = pyfuse3.StatvfsData()
        out.f_bsize = sv.f_bsize
        out.f_frsize = sv.f_frsize
        out.f_blocks = sv.f_blocks
        out.f_bfree = sv.f_bfree
        out.f_bavail = sv.f_bavail
        out.f_files = sv.f_files
        out.f_ffree = sv.f_ffree
        out.f_favail = sv.f_favail
        out.f_namemax = sv.f_namemax
        return out

    # ------------------------------------------------------------------ directories
    @_fuse_errors
    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        node = self._nodes.get(inode)
        if not stat.S_ISDIR(os.lstat(self._real(self._node_path(node))).st_mode):
            raise _err(errno.ENOTDIR)
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self._dirs[fh] = _DirHandle(node)
        return pyfuse3.FileHandleT(fh)

    @_fuse_errors
    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        handle = self._dirs[fh]
        dir_path = self._node_path(handle.node)
        if start_id == 0 or handle.names is None:
            with os.scandir(os.fsencode(self._real(dir_path))) as it:
                handle.names = sorted(entry.name for entry in it)
        for index in range(start_id, len(handle.names)):
            name = handle.names[index]
            path = handle.node.child(os.fsdecode(name))
            try:
                st = os.lstat(self._real(path))
            except FileNotFoundError:
                continue  # removed since the snapshot
            node = self._nodes.lookup(path)
            if not pyfuse3.readdir_reply(token, name, entry_attributes(st, node.ino), index + 1):
                self._nodes.forget(node.ino, 1)
                break

    @_fuse_errors
    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        self._dirs.pop(fh, None)

    @_fuse_errors
    async def fsyncdir(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        handle = self._dirs[fh]
        real = self._real(self._node_path(handle.node))
        await self._barrier()
        await asyncio.gather(self.journal.sync(), asyncio.to_thread(durable.sync_dir, real))
        self.stats.syncs += 1

    @_fuse_errors
    async def mkdir(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        mode: int,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        path = self._recordable(self._child(parent_inode, name))
        real = self._real(path)
        perm = mode & 0o7777
        async with self._seq:
            if _exists(real):
                raise _err(errno.EEXIST)
            await self._append(Record.mkdir(path, perm))
            try:
                os.mkdir(real, perm)
                os.chmod(real, perm)  # the process umask must not change the mode
            except OSError:
                await self._undo(Record.rmdir(path), f"mkdir {path}")
                raise
        self._own(real, ctx)
        return entry_attributes(os.lstat(real), self._nodes.lookup(path).ino)

    @_fuse_errors
    async def rmdir(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        path = self._recordable(self._child(parent_inode, name))
        real = self._real(path)
        async with self._seq:
            st = os.lstat(real)
            if not stat.S_ISDIR(st.st_mode):
                raise _err(errno.ENOTDIR)
            with os.scandir(real) as it:
                if any(True for _ in it):
                    raise _err(errno.ENOTEMPTY)
            await self._append(Record.rmdir(path))
            try:
                os.rmdir(real)
            except OSError:
                await self._undo(Record.mkdir(path, st.st_mode & 0o7777), f"rmdir {path}")
                raise
            self._nodes.removed(path)

    # ------------------------------------------------------------------ names
    @_fuse_errors
    async def symlink(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        target: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        path = self._recordable(self._child(parent_inode, name))
        real = self._real(path)
        try:
            link_target = target.decode()
        except UnicodeDecodeError:
            raise _err(errno.EINVAL) from None
        async with self._seq:
            if _exists(real):
                raise _err(errno.EEXIST)
            await self._append(Record.symlink(path, link_target))
            try:
                os.symlink(link_target, real)
            except OSError:
                await self._undo(Record.unlink(path), f"symlink {path}")
                raise
        self._own(real, ctx)
        return entry_attributes(os.lstat(real), self._nodes.lookup(path).ino)

    @_fuse_errors
    async def unlink(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        path = self._recordable(self._child(parent_inode, name))
        real = self._real(path)
        async with self._seq:
            if stat.S_ISDIR(os.lstat(real).st_mode):
                raise _err(errno.EISDIR)
            await self._append(Record.unlink(path))
            try:
                os.unlink(real)
            except OSError as exc:
                self._diverge(f"unlink {path} failed after it was journaled: {exc.strerror}")
                raise
            self._nodes.removed(path)

    @_fuse_errors
    async def rename(
        self,
        parent_inode_old: pyfuse3.InodeT,
        name_old: bytes,
        parent_inode_new: pyfuse3.InodeT,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise _err(errno.EINVAL)  # no record expresses an atomic exchange
        old = self._recordable(self._child(parent_inode_old, name_old))
        new = self._recordable(self._child(parent_inode_new, name_new))
        real_old, real_new = self._real(old), self._real(new)
        async with self._seq:
            st_old = os.lstat(real_old)
            if new.startswith(old + "/"):
                raise _err(errno.EINVAL)  # into its own subtree
            try:
                st_new: os.stat_result | None = os.lstat(real_new)
            except FileNotFoundError:
                st_new = None
            if st_new is not None:
                if flags & pyfuse3.RENAME_NOREPLACE:
                    raise _err(errno.EEXIST)
                if os.path.samestat(st_old, st_new):
                    return  # same file: rename(2) does nothing
                if stat.S_ISDIR(st_new.st_mode):
                    if not stat.S_ISDIR(st_old.st_mode):
                        raise _err(errno.EISDIR)
                    with os.scandir(real_new) as it:
                        if any(True for _ in it):
                            raise _err(errno.ENOTEMPTY)
                elif stat.S_ISDIR(st_old.st_mode):
                    raise _err(errno.ENOTDIR)
            await self._append(Record.rename(old, new))
            try:
                os.rename(real_old, real_new)
            except OSError as exc:
                self._diverge(f"rename {old} -> {new} failed after it was journaled: {exc}")
                raise
            self._nodes.moved(old, new)

    @_fuse_errors
    async def link(
        self,
        inode: pyfuse3.InodeT,
        new_parent_inode: pyfuse3.InodeT,
        new_name: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        raise _err(errno.EPERM)  # hard links cannot be replicated (no record type)

    @_fuse_errors
    async def mknod(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        mode: int,
        rdev: int,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        raise _err(errno.EPERM)  # devices, fifos and sockets are not replicated

    # ------------------------------------------------------------------ attributes
    @_fuse_errors
    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._nodes.get(inode)
        handle = self._handles.get(fh) if fh is not None else None
        if fields.update_size:
            await self._truncate(node, handle, attr.st_size)
        if fields.update_mode:
            await self._chmod(node, handle, attr.st_mode & 0o7777)
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            if handle is not None:
                os.fchown(handle.fd, uid, gid)
            else:
                os.lchown(self._real(self._node_path(node)), uid, gid)
        if fields.update_atime or fields.update_mtime:
            old = os.fstat(handle.fd) if handle else os.lstat(self._real(self._node_path(node)))
            times = (
                attr.st_atime_ns if fields.update_atime else old.st_atime_ns,
                attr.st_mtime_ns if fields.update_mtime else old.st_mtime_ns,
            )
            if handle is not None:
                os.utime(handle.fd, ns=times)
            else:
                os.utime(self._real(self._node_path(node)), ns=times, follow_symlinks=False)
        return self._attrs_of(node)

    async def _truncate(self, node: Node, handle: _Handle | None, size: int) -> None:
        async with self._seq:
            if node.path is None:  # detached: nothing in the namespace to replicate
                if handle is None:
                    raise _err(errno.ENOENT)
                os.ftruncate(handle.fd, size)
                return
            name = self._recordable(node.path)
            fd = handle.fd if handle else os.open(self._real(name), os.O_RDWR | os.O_CLOEXEC)
            try:
                await self._resize(node, fd, name, size)
            finally:
                if handle is None:
                    os.close(fd)

    async def _resize(self, node: Node, fd: int, name: str, size: int) -> None:
        """Journal RESIZE then ftruncate (sequencer held)."""
        old = os.fstat(fd).st_size
        await self._append(Record.resize(name, size))
        try:
            os.ftruncate(fd, size)
        except OSError:
            lo, hi = min(old, size), max(old, size)
            await self._reconcile(fd, name, lo, hi - lo)
            raise
        node.dirty = True

    async def _chmod(self, node: Node, handle: _Handle | None, mode: int) -> None:
        async with self._seq:
            path = self._node_path(node)
            real = self._real(path)
            st = os.fstat(handle.fd) if handle else os.lstat(real)
            if stat.S_ISLNK(st.st_mode):
                raise _err(errno.EOPNOTSUPP)
            name = self._recordable(path)
            await self._append(Record.chmod(name, mode))
            try:
                if handle is not None:
                    os.fchmod(handle.fd, mode)
                else:
                    os.chmod(real, mode, follow_symlinks=False)
            except OSError:
                await self._undo(Record.chmod(name, st.st_mode & 0o7777), f"chmod {name}")
                raise

    # ------------------------------------------------------------------ files
    @_fuse_errors
    async def open(
        self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        node = self._nodes.get(inode)
        path = self._node_path(node)
        fd = os.open(self._real(path), (flags & ~_OPEN_STRIP) | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            if flags & os.O_TRUNC and flags & _WRITABLE:
                async with self._seq:
                    if node.path is not None:
                        await self._resize(node, fd, self._recordable(node.path), 0)
        except BaseException:
            os.close(fd)
            raise
        return self._open_handle(node, fd, flags)

    @_fuse_errors
    async def create(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = self._recordable(self._child(parent_inode, name))
        real = self._real(path)
        perm = mode & 0o7777
        open_flags = (flags & ~_OPEN_STRIP) | os.O_CLOEXEC | os.O_NOFOLLOW
        async with self._seq:
            if _exists(real):
                # the kernel believed the name free; it is not: behave like open(O_CREAT)
                if flags & os.O_EXCL:
                    raise _err(errno.EEXIST)
                node = self._nodes.lookup(path)
                fd = os.open(real, open_flags)
                try:
                    if flags & os.O_TRUNC and flags & _WRITABLE:
                        await self._resize(node, fd, path, 0)
                except BaseException:
                    os.close(fd)
                    self._nodes.forget(node.ino, 1)
                    raise
            else:
                await self._append(Record.create(path, perm))
                try:
                    fd = os.open(real, open_flags | os.O_CREAT | os.O_EXCL, perm)
                except OSError:
                    await self._undo(Record.unlink(path), f"create {path}")
                    raise
                try:
                    os.fchmod(fd, perm)  # the process umask must not change the mode
                except OSError as exc:
                    log.warning("fuse.chmod_failed", path=path, error=exc.strerror)
                node = self._nodes.lookup(path)
                node.dirty = True
                self._own(real, ctx)
        info = self._open_handle(node, fd, flags)
        return info, entry_attributes(os.fstat(fd), node.ino)

    @_fuse_errors
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        return os.pread(self._handles[fh].fd, size, off)

    @_fuse_errors
    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        handle = self._handles[fh]
        node = handle.node
        stats = self.stats
        stats.writes += 1
        stats.bytes_written += len(buf)
        stats.max_write = max(stats.max_write, len(buf))
        async with self._seq:
            if node.path is None:  # unlinked but open: unreachable, nothing to replicate
                pwrite_all(handle.fd, buf, off)
                return len(buf)
            name = self._recordable(node.path)
            if len(buf) <= MAX_DATA:
                await self._append(Record.write(name, off, buf))
            else:
                view = memoryview(buf)
                await self._append(
                    *(
                        Record.write(name, off + pos, view[pos : pos + MAX_DATA].tobytes())
                        for pos in range(0, len(buf), MAX_DATA)
                    )
                )
            try:
                pwrite_all(handle.fd, buf, off)
            except OSError:
                await self._reconcile(handle.fd, name, off, len(buf))
                raise
            node.dirty = True
        return len(buf)

    @_fuse_errors
    async def fallocate(self, fh: pyfuse3.FileHandleT, mode: int, offset: int, length: int) -> None:
        """fallocate(2) through the mount, so holes and zeroed ranges replicate as such.

        PUNCH_HOLE journals TRIM and ZERO_RANGE journals ZERO, clipped to the file's size
        (past it there is nothing to zero); a call that grows the file (no KEEP_SIZE)
        journals RESIZE first. Plain allocation changes no content and costs no record:
        the replica allocates its blocks when they are written. Needs pyfuse3 with a
        fallocate handler (``make install`` builds it); without one the kernel gets ENOSYS
        and writers fall back to writing zeros, which replicate as writes.
        """
        handle = self._handles[fh]
        node = handle.node
        if mode & ~_FALLOC_MODES:
            raise _err(errno.EOPNOTSUPP)
        punch = bool(mode & FALLOC_FL_PUNCH_HOLE)
        if (
            offset < 0
            or length <= 0
            or (punch and mode != FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
        ):
            raise _err(errno.EINVAL)  # what fallocate(2) says for these, before journaling
        async with self._seq:
            if node.path is None:  # unlinked but open: nothing to replicate
                fallocate(handle.fd, mode, offset, length)
                return
            name = self._recordable(node.path)
            size = os.fstat(handle.fd).st_size
            end = offset + length
            records: list[Record] = []
            if not mode & FALLOC_FL_KEEP_SIZE and end > size:
                records.append(Record.resize(name, end))
            zero_end = min(end, size)
            if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) and zero_end > offset:
                make = Record.trim if punch else Record.zero
                records.append(make(name, offset, zero_end - offset))
            if records:
                await self._append(*records)
            try:
                fallocate(handle.fd, mode, offset, length)
            except OSError:
                if records:
                    await self._reconcile(handle.fd, name, offset, length)
                raise
            if records:
                node.dirty = True

    @property
    def barriers_allowed(self) -> bool:
        """False from the first unjournaled change until its resync ends (overflow.py)."""
        return self._overflow is None and not self._resyncing

    async def _barrier(self) -> None:
        """Append a FLUSH record when anything was journaled since the last one."""
        if self._unflushed and self.barriers_allowed:
            async with self._seq:
                if self._unflushed and self.barriers_allowed:
                    await self._append(Record.flush())
                    self._unflushed = False

    async def _sync_file(self, handle: _Handle, datasync: bool) -> None:
        handle.node.dirty = False
        await self._barrier()
        sync_file = durable.fdatasync_async if datasync else durable.fsync_async
        results = await asyncio.gather(
            self.journal.sync(), sync_file(handle.fd), return_exceptions=True
        )
        self.stats.syncs += 1
        file_result = results[1]
        if isinstance(file_result, OSError):
            # after a failed fsync the page cache may have dropped writes we journaled
            handle.node.dirty = True
            self._diverge(f"fsync of a source file failed: {file_result.strerror}")
            raise file_result
        for result in results:
            if isinstance(result, BaseException):
                handle.node.dirty = True
                raise result

    @_fuse_errors
    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        await self._sync_file(self._handles[fh], datasync)

    @_fuse_errors
    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        handle = self._handles[fh]
        if handle.node.dirty:
            await self._sync_file(handle, True)

    @_fuse_errors
    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        handle = self._handles.pop(fh)
        self._nodes.closed(handle.node, handle.fd)
        os.close(handle.fd)

    # ------------------------------------------------------------------ shutdown
    async def resync(self, make_room: Callable[[], Awaitable[bool]]) -> int:
        """Journal what changed while the journal was full, then a barrier (overflow.py).
        Returns the bytes of content sent; JournalFull when ``make_room`` gives up (the
        rest is tracked again)."""
        work: dict[int, tuple[str, set[int]]] = {}
        sent = 0
        while True:  # step 1: layout, sizes and modes, from one look, all or nothing
            async with self._seq:
                overflow = self._overflow
                if overflow is None:
                    return 0
                now = await asyncio.to_thread(snapshot, self.source)
                records, work = overflow.plan(now)
                try:
                    if records:
                        await self.journal.append_many(records)
                    self._overflow, self._resyncing = None, True  # journaling resumes
                    break
                except JournalFull:
                    pass  # still in overflow: the VM's changes keep being tracked
            if not await make_room():
                raise JournalFull(self.journal.bytes_used, self.journal.max_bytes or 0, 0)
        try:
            for ino in list(work):  # step 2: content, by inode, a run at a time
                path, marks = work[ino]
                ordered = sorted(marks)
                while ordered:
                    run = ordered[:16]
                    async with self._seq:
                        self._resync_still_valid()
                        batch = await asyncio.to_thread(read_records, self.source, path, ino, run)
                        try:
                            if batch:
                                await self.journal.append_many(batch)
                            done = True
                        except JournalFull:
                            done = False
                    if not done:
                        if not await make_room():
                            raise JournalFull(
                                self.journal.bytes_used, self.journal.max_bytes or 0, 0
                            )
                        continue
                    sent += sum(len(r.data) for r in batch or ())
                    ordered = ordered[16:]
                    marks.difference_update(run)
                    if batch is None:
                        break  # removed since: its UNLINK is journaled
                work.pop(ino)
            while True:  # step 3: the consistency point
                async with self._seq:
                    self._resync_still_valid()
                    try:
                        await self.journal.append(Record.flush())
                        self._resyncing = False
                        self._unflushed = False
                        break
                    except JournalFull:
                        pass
                if not await make_room():
                    raise JournalFull(self.journal.bytes_used, self.journal.max_bytes or 0, 0)
        except JournalFull:
            async with self._seq:  # everything journaled so far stands: track the rest
                if self._overflow is None:
                    self._overflow = FolderOverflow(await asyncio.to_thread(snapshot, self.source))
                self._overflow.merge_work(work)
            raise
        await self.journal.sync()
        return sent

    def _resync_still_valid(self) -> None:
        """A new overflow began during the resync (the journal filled up under the VM's own
        changes): no barrier may close this epoch now; the rest goes into that overflow."""
        if self._overflow is not None:
            raise JournalFull(self.journal.bytes_used, self.journal.max_bytes or 0, 0)

    async def aclose(self) -> None:
        """Make everything journaled durable and close the real files. Idempotent."""
        try:
            if self._diverged is None:
                await self._barrier()
            await self.journal.sync()
        finally:
            for handle in list(self._handles.values()):
                self._nodes.closed(handle.node, handle.fd)
                os.close(handle.fd)
            self._handles.clear()
            self._dirs.clear()
