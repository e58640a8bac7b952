"""The filter's handlers for names and directories: lookups, listings and the namespace.

Every change here follows the journal-first order (``journaled.py``): under the
sequencer, the checks that find the obvious errors (EEXIST, ENOENT, ENOTEMPTY, EISDIR,
...) run first, so nothing is journaled for a change that cannot happen (only this
process changes SOURCE_DIR, so the checks stay true); then the record, then the real
change, then the inode table is told (``nodes.py``: renames move open files and whole
directories to their new path, removals detach them).

Not replicated, so refused: hard links (``link``, no record type for them), devices,
fifos and sockets (``mknod``), ``RENAME_EXCHANGE`` (no record for an atomic swap).
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Sequence
from typing import Final

import pyfuse3
import structlog

from replicator.engine.fuse.journaled import JournaledOps
from replicator.engine.fuse.replies import entry_attributes, err, fuse_errors, statfs_reply
from replicator.engine.fuse.view import exists
from replicator.journal.records import Record

log = structlog.get_logger("replicator.fuse")

UNSUPPORTED_LOG_EVERY: Final = 60.0  # seconds between two log lines of one refused op


class TreeOps(JournaledOps):
    """Lookups, directories and names (see the module docstring)."""

    def _refuse(self, op: str, path: str, code: int, why: str) -> pyfuse3.FUSEError:
        """The error for an operation the replica cannot follow, and a log line saying so
        (at most one a minute per operation, with how many were refused meanwhile)."""
        logged = self.refused_logged
        now = time.monotonic()
        last, count = logged.get(op, (-UNSUPPORTED_LOG_EVERY, 0))
        if now - last >= UNSUPPORTED_LOG_EVERY:
            log.warning(
                "fuse.operation_refused",
                op=op,
                path=path,
                errno=errno.errorcode.get(code, str(code)),
                why=why,
                refused_since_last_line=count,
            )
            logged[op] = (now, 0)
        else:
            logged[op] = (last, count + 1)
        return err(code)

    def _name_of(self, parent_inode: pyfuse3.InodeT, name: bytes) -> str:
        """For a log line: the path ``name`` would have (best effort)."""
        try:
            return self.view.child(parent_inode, name)
        except pyfuse3.FUSEError:
            return os.fsdecode(name)

    # ------------------------------------------------------------------ lookups
    @fuse_errors
    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        view = self.view
        path = view.child(parent_inode, name)
        st = os.lstat(view.real(path))
        return entry_attributes(st, view.nodes.lookup(path).ino)

    @fuse_errors
    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        for ino, count in inode_list:
            self.view.nodes.forget(ino, count)

    @fuse_errors
    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self.view.attrs(self.view.nodes.get(inode))

    @fuse_errors
    async def readlink(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> bytes:
        path = self.view.path_of(self.view.nodes.get(inode))
        return os.fsencode(os.readlink(self.view.real(path)))

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        return statfs_reply(os.statvfs(self.source))

    # ------------------------------------------------------------------ directories
    @fuse_errors
    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        node = self.view.nodes.get(inode)
        if not stat.S_ISDIR(os.lstat(self.view.real(self.view.path_of(node))).st_mode):
            raise err(errno.ENOTDIR)
        return self.view.open_dir(node)

    @fuse_errors
    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        view = self.view
        handle = view.dirs[fh]
        dir_path = view.path_of(handle.node)
        if start_id == 0 or handle.names is None:
            with os.scandir(os.fsencode(view.real(dir_path))) as it:
                handle.names = sorted(entry.name for entry in it)
        for index in range(start_id, len(handle.names)):
            name = handle.names[index]
            path = handle.node.child(os.fsdecode(name))
            try:
                st = os.lstat(view.real(path))
            except FileNotFoundError:
                continue  # removed since the snapshot
            node = view.nodes.lookup(path)
            if not pyfuse3.readdir_reply(token, name, entry_attributes(st, node.ino), index + 1):
                view.nodes.forget(node.ino, 1)
                break

    @fuse_errors
    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        self.view.dirs.pop(fh, None)

    @fuse_errors
    async def fsyncdir(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        handle = self.view.dirs[fh]
        await self._sync_dir(self.view.real(self.view.path_of(handle.node)))

    @fuse_errors
    async def mkdir(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        mode: int,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        view = self.view
        path = view.recordable(view.child(parent_inode, name))
        real = view.real(path)
        perm = mode & 0o7777
        async with self._seq:
            if exists(real):
                raise err(errno.EEXIST)
            await self._append(Record.mkdir(path, perm))
            try:
                os.mkdir(real, perm)
                os.chmod(real, perm)  # the process umask must not change the mode
            except OSError:
                await self._undo(Record.rmdir(path), f"mkdir {path}")
                raise
        self._own(real, ctx)
        return entry_attributes(os.lstat(real), view.nodes.lookup(path).ino)

    @fuse_errors
    async def rmdir(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        view = self.view
        path = view.recordable(view.child(parent_inode, name))
        real = view.real(path)
        async with self._seq:
            st = os.lstat(real)
            if not stat.S_ISDIR(st.st_mode):
                raise err(errno.ENOTDIR)
            with os.scandir(real) as it:
                if any(True for _ in it):
                    raise err(errno.ENOTEMPTY)
            await self._append(Record.rmdir(path))
            try:
                os.rmdir(real)
            except OSError:
                await self._undo(Record.mkdir(path, st.st_mode & 0o7777), f"rmdir {path}")
                raise
            view.nodes.removed(path)

    # ------------------------------------------------------------------ names
    @fuse_errors
    async def symlink(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        target: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        view = self.view
        path = view.recordable(view.child(parent_inode, name))
        real = view.real(path)
        try:
            link_target = target.decode()
        except UnicodeDecodeError:
            raise err(errno.EINVAL) from None
        async with self._seq:
            if exists(real):
                raise err(errno.EEXIST)
            await self._append(Record.symlink(path, link_target))
            try:
                os.symlink(link_target, real)
            except OSError:
                await self._undo(Record.unlink(path), f"symlink {path}")
                raise
        self._own(real, ctx)
        return entry_attributes(os.lstat(real), view.nodes.lookup(path).ino)

    @fuse_errors
    async def unlink(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        view = self.view
        path = view.recordable(view.child(parent_inode, name))
        real = view.real(path)
        async with self._seq:
            if stat.S_ISDIR(os.lstat(real).st_mode):
                raise err(errno.EISDIR)
            await self._append(Record.unlink(path))
            try:
                os.unlink(real)
            except OSError as exc:
                self._diverge(f"unlink {path} failed after it was journaled: {exc.strerror}")
                raise
            view.nodes.removed(path)
            if self.guard is not None:
                self.guard.removed(path)  # its space goes with the filter's last handle

    @fuse_errors
    async def rename(
        self,
        parent_inode_old: pyfuse3.InodeT,
        name_old: bytes,
        parent_inode_new: pyfuse3.InodeT,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if flags & pyfuse3.RENAME_EXCHANGE:  # no record expresses an atomic exchange
            raise self._refuse(
                "rename_exchange",
                self._name_of(parent_inode_old, name_old),
                errno.EINVAL,
                "an atomic exchange of two names is not replicated",
            )
        view = self.view
        old = view.recordable(view.child(parent_inode_old, name_old))
        new = view.recordable(view.child(parent_inode_new, name_new))
        real_old, real_new = view.real(old), view.real(new)
        async with self._seq:
            st_old = os.lstat(real_old)
            if new.startswith(old + "/"):
                raise err(errno.EINVAL)  # into its own subtree
            try:
                st_new: os.stat_result | None = os.lstat(real_new)
            except FileNotFoundError:
                st_new = None
            if st_new is not None:
                if flags & pyfuse3.RENAME_NOREPLACE:
                    raise err(errno.EEXIST)
                if os.path.samestat(st_old, st_new):
                    return  # same file: rename(2) does nothing
                if stat.S_ISDIR(st_new.st_mode):
                    if not stat.S_ISDIR(st_old.st_mode):
                        raise err(errno.EISDIR)
                    with os.scandir(real_new) as it:
                        if any(True for _ in it):
                            raise err(errno.ENOTEMPTY)
                elif stat.S_ISDIR(st_old.st_mode):
                    raise err(errno.ENOTDIR)
            await self._append(Record.rename(old, new))
            try:
                os.rename(real_old, real_new)
            except OSError as exc:
                self._diverge(f"rename {old} -> {new} failed after it was journaled: {exc}")
                raise
            view.nodes.moved(old, new)
            if self.guard is not None:
                self.guard.moved(old, new)
                if stat.S_ISREG(st_old.st_mode):  # renamed to an image's name?
                    self.guard.hold(new)

    @fuse_errors
    async def link(
        self,
        inode: pyfuse3.InodeT,
        new_parent_inode: pyfuse3.InodeT,
        new_name: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        raise self._refuse(
            "link",
            self._name_of(new_parent_inode, new_name),
            errno.EPERM,
            "hard links are not replicated (make a copy or a symlink)",
        )

    @fuse_errors
    async def mknod(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        mode: int,
        rdev: int,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        raise self._refuse(
            "mknod",
            self._name_of(parent_inode, name),
            errno.EPERM,
            "devices, FIFOs and sockets are not replicated (make them outside the folder)",
        )

    @fuse_errors
    async def setxattr(
        self,
        inode: pyfuse3.InodeT,
        name: bytes,
        value: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        raise self._refuse(
            "setxattr",
            self.view.nodes.get(inode).path or "",
            errno.EOPNOTSUPP,
            f"extended attributes ({os.fsdecode(name)}) are not replicated",
        )
