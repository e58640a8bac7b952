"""The journaling FUSE passthrough: every content change is journaled before it is answered.

``JournalingFilter`` serves SOURCE_DIR's tree (the real bytes stay there) and appends a
record for every change to the shared write-order journal:

* WRITE for ``write``; RESIZE for truncate/ftruncate and ``open(O_TRUNC)``; TRIM and
  ZERO for fallocate's punch hole and zero range, ZERO for the holes a plain allocation
  fills (the replica holds the blocks the source holds); CREATE, UNLINK, RENAME (incl.
  rename-over), MKDIR, RMDIR, SYMLINK, CHMOD for the metadata operations. Reads, getattr,
  readdir and statfs cost no journal work.
* Order. One FIFO lock (the *sequencer*) is held from resolving the record's path until
  the real file system has been changed, and the record is appended *before* the change
  (journal first, then the file, then the reply). So the journal order is exactly the
  order in which changes reached SOURCE_DIR, across all files of the folder, and a path
  can never change between being written into a record and the change it names.
* Durability. ``fsync``/``fdatasync`` of a file, and ``flush`` (close) of a file changed
  through it, are answered once a FLUSH barrier record is appended, ``journal.sync()``
  (group commit: concurrent callers share one round) and the real file's fsync/fdatasync
  are done. ``fsyncdir`` syncs the journal and the real directory.
* Failures after journaling are undone, reconciled, or make the folder *diverge*
  (``journaled.py``); obvious errors are found by checks before anything is journaled.

The filter is built in layers, one job each:

| module | job |
|---|---|
| ``engine/journal_first.py`` | the policy shared with NBD: order, barriers, overflow, divergence |
| ``journaled.py`` | the filter's side of it: namespace write-out, undo, fsync (``JournaledOps``) |
| ``view.py`` | inodes, handles and paths: the mount mapped back to SOURCE_DIR |
| ``replies.py`` | attributes, and every failure as a FUSE error reply |
| ``tree_ops.py`` | handlers for lookups, directories and names (``TreeOps``) |
| this module | handlers for file contents and attributes: the class pyfuse3 gets |

O_DIRECT opens get ``direct_io`` on their handle (the kernel bypasses its page cache and
sends the writes as issued); the real file is opened without O_DIRECT, since the payload
buffers are not aligned, which changes nothing for durability (O_DIRECT never implied it).
The writeback cache stays off: with it the kernel would merge and reorder dirty pages
and send them whenever it likes, so the journal would record the kernel's flush order
instead of the order writes were acknowledged to the application.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Final

import pyfuse3
import structlog

from replicator.engine.fuse.journaled import FilterStats as FilterStats  # engine/fuse/__init__
from replicator.engine.fuse.nodes import Node
from replicator.engine.fuse.replies import entry_attributes as entry_attributes
from replicator.engine.fuse.replies import err, fuse_errors
from replicator.engine.fuse.tree_ops import TreeOps
from replicator.engine.fuse.view import Handle, exists
from replicator.engine.volumes import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    allocated_ranges,
    fallocate,
    pwrite_all,
    split_by,
)
from replicator.journal.records import MAX_DATA, Record

log = structlog.get_logger("replicator.fuse")

# flags handled here rather than passed to the real open. O_APPEND: the kernel gives
# every write its offset (the end of the file for an appending one); on a real fd with
# O_APPEND, pwrite(2) ignores the offset and appends, so a write whose handle dropped
# O_APPEND (fcntl F_SETFL) or a page of an mmap written back through an appending
# handle would land at the end of the source while its record says where it belongs.
_OPEN_STRIP: Final = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_TRUNC | os.O_DIRECT | os.O_APPEND


def _real_flags(flags: int) -> int:
    """The flags to open the real file with for a caller's ``flags``.

    Write-only opens get the real file read-write: when a change fails after its record
    was appended (ENOSPC, EIO), the filter reads the range's real bytes to journal what
    the file holds (``_reconcile``); on a write-only descriptor that read failed with
    EBADF and the whole folder diverged (every change EIO until a restart) over one
    full disk. The kernel still checks the caller's access and sends no reads for it.
    ``O_RDONLY|O_TRUNC`` truncates, as on a local file system (the kernel asked the
    caller for write access), so its real file is opened read-write too.
    """
    truncate = flags & os.O_TRUNC
    flags = (flags & ~_OPEN_STRIP) | os.O_CLOEXEC | os.O_NOFOLLOW
    if flags & os.O_ACCMODE == os.O_WRONLY or truncate:
        flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
    return flags


def _open_real(path: str, flags: int) -> int:
    """Open an existing real file for a caller's ``flags`` (see ``_real_flags``)."""
    try:
        return os.open(path, _real_flags(flags))
    except PermissionError:  # a write-only file and a filter that is not root
        return os.open(path, (flags & ~_OPEN_STRIP) | os.O_CLOEXEC | os.O_NOFOLLOW)


# the fallocate(2) modes FUSE passes on; anything else gets EOPNOTSUPP
_FALLOC_MODES: Final = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE


class JournalingFilter(TreeOps):
    """pyfuse3 operations: a passthrough of ``source`` that journals every change first."""

    enable_writeback_cache = False  # see the module docstring
    supports_dot_lookup = False

    # ------------------------------------------------------------------ attributes
    @fuse_errors
    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        view = self.view
        node = view.nodes.get(inode)
        handle = view.handles.get(fh) if fh is not None else None
        if handle is None and node.path is None and node.fds:
            # fchmod/fchown/futimens of a file unlinked while open: the kernel sends no
            # handle (only ftruncate does) and no name reaches the file any more
            handle = view.handles[min(node.fds)]
        if fields.update_size:
            await self._truncate(node, handle, attr.st_size)
        if fields.update_mode:
            await self._chmod(node, handle, attr.st_mode & 0o7777)
        if fields.update_uid or fields.update_gid:  # not replicated (no record type)
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            if handle is not None:
                os.fchown(handle.fd, uid, gid)
            else:
                os.lchown(view.real(view.path_of(node)), uid, gid)
        if fields.update_atime or fields.update_mtime:  # not replicated either
            old = os.fstat(handle.fd) if handle else os.lstat(view.real(view.path_of(node)))
            times = (
                attr.st_atime_ns if fields.update_atime else old.st_atime_ns,
                attr.st_mtime_ns if fields.update_mtime else old.st_mtime_ns,
            )
            if handle is not None:
                os.utime(handle.fd, ns=times)
            else:
                os.utime(view.real(view.path_of(node)), ns=times, follow_symlinks=False)
        return view.attrs(node)

    async def _truncate(self, node: Node, handle: Handle | None, size: int) -> None:
        async with self._seq:
            if node.path is None:  # detached: nothing in the namespace to replicate
                if handle is None:
                    raise err(errno.ENOENT)
                os.ftruncate(handle.fd, size)
                return
            name = self.view.recordable(node.path)
            real = self.view.real(name)
            fd = handle.fd if handle else os.open(real, os.O_RDWR | os.O_CLOEXEC)
            try:
                if size > (handle.max_size if handle else self.view.size_limit(fd)):
                    raise err(errno.EFBIG)  # what ftruncate(2) says, before journaling
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
        except OSError as exc:
            lo, hi = min(old, size), max(old, size)
            await self._reconcile(fd, name, lo, hi - lo, exc)
            raise
        node.dirty = True

    async def _chmod(self, node: Node, handle: Handle | None, mode: int) -> None:
        async with self._seq:
            if node.path is None and handle is not None:  # detached: nothing to replicate
                os.fchmod(handle.fd, mode)
                return
            path = self.view.path_of(node)
            if not path:  # no record names the folder itself
                raise self._refuse(
                    "chmod",
                    "",
                    errno.EPERM,
                    "the mode of the VM folder itself is not replicated: set it on the "
                    "source folder and the replica's folder by hand",
                )
            real = self.view.real(path)
            st = os.fstat(handle.fd) if handle else os.lstat(real)
            if stat.S_ISLNK(st.st_mode):
                raise err(errno.EOPNOTSUPP)
            name = self.view.recordable(path)
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
    @fuse_errors
    async def open(
        self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        view = self.view
        node = view.nodes.get(inode)
        path = view.path_of(node)
        fd = _open_real(view.real(path), flags)
        try:
            if flags & os.O_TRUNC:  # also O_RDONLY|O_TRUNC: the kernel checked MAY_WRITE
                async with self._seq:
                    if node.path is not None:
                        await self._resize(node, fd, view.recordable(node.path), 0)
        except BaseException:
            os.close(fd)
            raise
        return view.open_file(node, fd, flags)

    @fuse_errors
    async def create(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        view = self.view
        path = view.recordable(view.child(parent_inode, name))
        real = view.real(path)
        perm = mode & 0o7777
        async with self._seq:
            if exists(real):
                # the kernel believed the name free; it is not: behave like open(O_CREAT)
                if flags & os.O_EXCL:
                    raise err(errno.EEXIST)
                node = view.nodes.lookup(path)
                fd = _open_real(real, flags)
                try:
                    if flags & os.O_TRUNC:  # also O_RDONLY|O_TRUNC: the kernel checked MAY_WRITE
                        await self._resize(node, fd, path, 0)
                except BaseException:
                    os.close(fd)
                    view.nodes.forget(node.ino, 1)
                    raise
            else:
                await self._append(Record.create(path, perm))
                try:
                    fd = os.open(real, _real_flags(flags) | os.O_CREAT | os.O_EXCL, perm)
                except OSError:
                    await self._undo(Record.unlink(path), f"create {path}")
                    raise
                try:
                    os.fchmod(fd, perm)  # the process umask must not change the mode
                except OSError as exc:
                    log.warning("fuse.chmod_failed", path=path, error=exc.strerror)
                node = view.nodes.lookup(path)
                node.dirty = True
                self._own(real, ctx)
                if self.guard is not None:  # an image's name: nothing may write it behind us
                    self.guard.hold(path, fd)
        info = view.open_file(node, fd, flags)
        return info, entry_attributes(os.fstat(fd), node.ino)

    @fuse_errors
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        return os.pread(self.view.handles[fh].fd, size, off)

    @fuse_errors
    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        handle = self.view.handles[fh]
        node = handle.node
        stats = self.stats
        stats.writes += 1
        stats.bytes_written += len(buf)
        stats.max_write = max(stats.max_write, len(buf))
        if off + len(buf) > handle.max_size:  # as write(2): short, or EFBIG at the limit
            if off >= handle.max_size:
                raise err(errno.EFBIG)
            buf = buf[: handle.max_size - off]
        async with self._seq:
            if node.path is None:  # unlinked but open: unreachable, nothing to replicate
                pwrite_all(handle.fd, buf, off)
                return len(buf)
            name = self.view.recordable(node.path)
            # self._append without its namespace check: one coroutine less per write
            self._check_healthy()
            if len(buf) <= MAX_DATA:
                await self._seq.append((Record.write(name, off, buf),))
            else:
                view = memoryview(buf)
                await self._seq.append(
                    [
                        Record.write(name, off + pos, view[pos : pos + MAX_DATA].tobytes())
                        for pos in range(0, len(buf), MAX_DATA)
                    ]
                )
            try:
                pwrite_all(handle.fd, buf, off)
            except OSError as exc:
                await self._reconcile(handle.fd, name, off, len(buf), exc)
                raise
            node.dirty = True
        if handle.sync_writes:  # O_DSYNC/O_SYNC with direct_io: the kernel sends no fsync
            await self._sync_file(handle, handle.datasync)
        return len(buf)

    @fuse_errors
    async def fallocate(self, fh: pyfuse3.FileHandleT, mode: int, offset: int, length: int) -> None:
        """fallocate(2) through the mount, so holes and zeroed ranges replicate as such.

        PUNCH_HOLE journals TRIM and ZERO_RANGE journals ZERO, clipped to the file's size
        (past it there is nothing to zero); a call that grows the file (no KEEP_SIZE)
        journals RESIZE first. Plain allocation changes no content, but it fills holes:
        a ZERO for each hole in the range (and for the part it grows the file by), so the
        replica holds the same blocks allocated (a preallocated disk stays preallocated
        there); allocated ranges are left alone (their bytes stay). Needs pyfuse3 with a
        fallocate handler (``make install`` builds it); without one the kernel gets ENOSYS
        and writers fall back to writing zeros, which replicate as writes.
        """
        handle = self.view.handles[fh]
        node = handle.node
        if mode & ~_FALLOC_MODES:
            raise err(errno.EOPNOTSUPP)
        punch = bool(mode & FALLOC_FL_PUNCH_HOLE)
        if (
            offset < 0
            or length <= 0
            or (punch and mode != FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
        ):
            raise err(errno.EINVAL)  # what fallocate(2) says for these, before journaling
        if offset + length > handle.max_size:
            raise err(errno.EFBIG)  # also fallocate(2)'s answer, for every mode
        async with self._seq:
            if node.path is None:  # unlinked but open: nothing to replicate
                fallocate(handle.fd, mode, offset, length)
                return
            name = self.view.recordable(node.path)
            size = os.fstat(handle.fd).st_size
            end = offset + length
            records: list[Record] = []
            if not mode & FALLOC_FL_KEEP_SIZE and end > size:
                records.append(Record.resize(name, end))
            zero_end = min(end, size)
            if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
                if zero_end > offset:
                    make = Record.trim if punch else Record.zero
                    records.append(make(name, offset, zero_end - offset))
            else:
                records += _allocation_records(handle.fd, name, offset, end, size, mode)
            if records:
                await self._append(*records)
            try:
                fallocate(handle.fd, mode, offset, length)
            except OSError as exc:
                if records:
                    await self._reconcile(handle.fd, name, offset, length, exc)
                raise
            if records:
                node.dirty = True

    # ------------------------------------------------------------------ durability
    @fuse_errors
    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        await self._sync_file(self.view.handles[fh], datasync)

    @fuse_errors
    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        handle = self.view.handles[fh]
        if handle.node.dirty:
            await self._sync_file(handle, True)
        self._guard_written(handle)  # close(2) waits for this; the release comes later

    @fuse_errors
    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        handle = self.view.handles[fh]
        if handle.node.dirty:  # written since the close's flush: a shared mmap's pages
            self._guard_written(handle)
        self.view.close_file(fh)

    def _guard_written(self, handle: Handle) -> None:
        """A file written through ``handle`` may be a disk image now (a header, its size):
        then the folder guard keeps other writers out of it (engine/folder_guard.py)."""
        path = handle.node.path
        if self.guard is not None and handle.writable and path is not None:
            self.guard.hold(path, handle.fd)


def _allocation_records(
    fd: int, name: str, offset: int, end: int, size: int, mode: int
) -> list[Record]:
    """ZERO records for what a plain allocation of ``[offset, end)`` fills: the holes in
    it within the file's ``size``, and the part past it the file grows by (no KEEP_SIZE).
    Past the size with KEEP_SIZE, nothing: a replica's file holds no blocks beyond its end."""
    grown = end if not mode & FALLOC_FL_KEEP_SIZE else min(end, size)
    records: list[Record] = []
    within = min(end, size)
    if within > offset:
        holes = split_by(allocated_ranges(fd, offset, within), offset, within)
        records += [Record.zero(name, at, n) for at, n, kept in holes if not kept]
    if grown > max(offset, size):
        start = max(offset, size)
        if records and records[-1].offset + records[-1].length == start:
            start = records.pop().offset  # one record for the hole and the growth
        records.append(Record.zero(name, start, grown - start))
    return records
