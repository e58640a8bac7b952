"""The fault-injecting FUSE passthrough (server side of ``python -m tests.faultfs``).

``FaultyPassthrough`` serves SOURCE_DIR's tree at the mount point with real syscalls on
real files (``os.pread``/``os.pwrite`` on one real descriptor per open handle), and
consults a :class:`Faults` rule table before every operation a test may want to break.
When a rule fires the operation is *not* performed and the caller's syscall fails with
the rule's errno, exactly as if the disk below had refused it.

Why these choices:

* No writeback cache, and attribute/entry timeouts of zero. With the writeback cache the
  kernel would acknowledge ``write(2)`` from its page cache and send the data later, so an
  injected ENOSPC would surface at some later fsync or close instead of at the write a
  test aimed at. Zero timeouts keep the kernel's idea of sizes in step with SOURCE_DIR
  after a failed or partial write, and when a test looks at or changes SOURCE_DIR
  directly.
* Inodes are our own nodes, one per path, so every request can be matched against the
  rules by its *current* relative path (renames move the node, an unlinked file keeps its
  last name). A node takes the real file's inode number when no live node has it (else
  one above any real one), so what ``stat`` shows stays the same across a remount, as on
  a disk after a reboot: the code under test may recognise its files by inode.
* Everything runs on one event loop (pyfuse3's asyncio mode) with the control server, so
  the rule table needs no locks: a rule added through the socket applies to the very next
  request. Only fsync/fsyncdir go to a thread, so a slow disk flush does not stall other
  requests.
* Any exception that is not an OSError is a bug of this harness, not an injected fault: it
  is logged, counted (``internal_errors`` in the stats, which the client checks on exit)
  and answered with EIO, because pyfuse3 would otherwise end its main loop and take the
  mount down.

This module does not import the code under test; it only needs pyfuse3 (the project's
patched build, for the fallocate handler) and the standard library.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import json
import logging
import os
import random
import signal
import stat
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Final, TypeVar, cast

import pyfuse3
import pyfuse3.asyncio

from replicator.engine.fuse.capture import end_main_loop
from tests.faultfs import OPS, is_mounted
from tests.faultfs.volatile import VolatileWrites
from tests.faultfs.volatile_names import VolatileNames

log = logging.getLogger("faultfs")

ROOT_INO: Final = 1  # pyfuse3.ROOT_INODE
_OWN_INOS: Final = 1 << 60  # numbers of our own start here, above real ones
MAX_TASKS: Final = 32  # concurrent requests
STOP_TIMEOUT: Final = 10.0  # for requests still running when asked to stop

FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02
_AT_FDCWD: Final = -100

# open(2) flags handled here or by the kernel rather than passed to the real open:
# O_DIRECT payload buffers are not aligned (the handle gets direct_io instead); with
# O_APPEND Linux pwrite ignores its offset, while the kernel already sends the offset of
# the end of the file.
_OPEN_STRIP: Final = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECT | os.O_APPEND
_CREATE_STRIP: Final = os.O_NOCTTY | os.O_DIRECT | os.O_APPEND
_WRITABLE: Final = os.O_WRONLY | os.O_RDWR

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.renameat2.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
]


def _check(ret: int) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its mode flags (os.posix_fallocate has none)."""
    _check(_libc.fallocate(fd, mode, offset, length))


def renameat2(old: str, new: str, flags: int) -> None:
    """renameat2(2), for RENAME_NOREPLACE / RENAME_EXCHANGE (os.rename has no flags)."""
    _check(_libc.renameat2(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), flags))


def _exchange(a: str, b: str) -> None:
    renameat2(a, b, pyfuse3.RENAME_EXCHANGE)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (pwrite may write less than asked)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, "pwrite wrote nothing")
        view = view[n:]
        offset += n


# ---------------------------------------------------------------------------- rules


@dataclass(slots=True)
class Rule:
    """Fail ``op`` on paths matching ``path`` with ``errno``, after ``after`` passed."""

    id: int
    op: str
    errno: int
    path: str = "*"
    after: int = 0
    times: int | None = None
    partial: bool = False
    seen: int = 0  # matching ops let through while counting down ``after``
    hits: int = 0  # times it fired

    def exhausted(self) -> bool:
        return self.times is not None and self.hits >= self.times

    def matches(self, op: str, paths: Sequence[str]) -> bool:
        if self.op not in ("*", op):
            return False
        return any(fnmatchcase(p, self.path) for p in paths)


class Faults:
    """The rule table, the op counters and the space budget (one event loop, no locks).

    Rules are consulted in the order they were added. Every live rule that matches an op
    and is still counting down its ``after`` lets the op through and counts it; the first
    matching rule that is due fires, and later rules do not see that op. A rule stops
    firing after ``times`` hits but keeps its hit count, also after ``remove``/``clear``,
    so a test can assert on it afterwards.
    """

    def __init__(self) -> None:
        self._rules: dict[int, Rule] = {}  # live, in creation order
        self._hits: dict[int, Rule] = {}  # every rule ever added
        self._next_id = 1
        self._seen: Counter[tuple[str, tuple[str, ...]]] = Counter()
        self.budget_left: int | None = None
        self.budget_refusals = 0

    def add(
        self,
        op: str,
        err: int,
        *,
        path: str = "*",
        after: int = 0,
        times: int | None = None,
        partial: bool = False,
    ) -> Rule:
        if op not in OPS and op != "*":
            raise ValueError(f"unknown op {op!r}; one of {', '.join(sorted(OPS))} or '*'")
        if isinstance(err, bool) or not isinstance(err, int) or not 0 < err < 512:
            # the kernel turns anything outside 1..511 into EIO
            raise ValueError(f"errno must be an integer in 1..511, not {err!r}")
        if err == errno.ENOSYS:
            # to the kernel ENOSYS means "not implemented": it would stop sending that op
            # for the rest of the mount and let fsync, flush, fallocate... succeed silently
            raise ValueError("ENOSYS cannot be injected (FUSE takes it as 'op not implemented')")
        if not isinstance(path, str):
            raise ValueError("path must be a glob string")
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise ValueError("after must be an integer >= 0")
        if times is not None and (
            isinstance(times, bool) or not isinstance(times, int) or times < 1
        ):
            raise ValueError("times must be None or an integer >= 1")
        if partial and op != "write":
            raise ValueError("partial applies to write rules only")
        rule = Rule(self._next_id, op, err, path, after, times, bool(partial))
        self._next_id += 1
        self._rules[rule.id] = rule
        self._hits[rule.id] = rule
        return rule

    def remove(self, rule_id: int) -> bool:
        return self._rules.pop(rule_id, None) is not None

    def clear(self) -> None:
        """Back to a plain passthrough: no rules, no budget (hit counts are kept)."""
        self._rules.clear()
        self.budget_left = None

    def check(self, op: str, *paths: str) -> Rule | None:
        """Count one ``op`` on ``paths``; the rule that fires for it, if any."""
        self._seen[op, paths] += 1
        for rule in self._rules.values():
            if rule.exhausted() or not rule.matches(op, paths):
                continue
            if rule.seen < rule.after:
                rule.seen += 1
                continue
            rule.hits += 1
            return rule
        return None

    def hits(self) -> dict[str, int]:
        return {str(rule_id): rule.hits for rule_id, rule in self._hits.items()}

    def count(self, path: str = "*") -> dict[str, int]:
        """Ops seen by kind, only those on a path matching ``path`` (either, for rename)."""
        out: Counter[str] = Counter()
        for (op, paths), n in self._seen.items():
            if any(fnmatchcase(p, path) for p in paths):
                out[op] += n
        return dict(out)

    def set_budget(self, nbytes: int | None) -> None:
        if nbytes is not None and (
            isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0
        ):
            raise ValueError("budget must be None or an integer >= 0")
        self.budget_left = nbytes

    def take(self, nbytes: int) -> int:
        """How many of ``nbytes`` may still be written (all of them without a budget)."""
        if self.budget_left is None:
            return nbytes
        n = min(nbytes, self.budget_left)
        self.budget_left -= n
        if n < nbytes:
            self.budget_refusals += 1
        return n

    def take_all(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` at once, or nothing (for fallocate)."""
        if self.budget_left is None:
            return True
        if nbytes > self.budget_left:
            self.budget_refusals += 1
            return False
        self.budget_left -= nbytes
        return True


# ---------------------------------------------------------------------------- inodes


@dataclass(eq=False, slots=True)
class Node:
    """One path the kernel knows by our inode number ``ino``."""

    ino: int
    path: str | None  # relative, "" for the root, None once unlinked or replaced
    name: str  # the current path, or the last one once detached (for rule matching)
    lookups: int = 0
    fds: set[int] = field(default_factory=set)

    def child(self, name: str) -> str:
        if self.path is None:
            raise pyfuse3.FUSEError(errno.ENOENT)  # the directory itself is gone
        return f"{self.path}/{name}" if self.path else name


class NodeTable:
    """Inode numbers <-> current relative paths, kept right across renames.

    A node lives while the kernel holds a lookup reference or a handle is open on it;
    hard links are refused by the file system, so a path is one node and vice versa.
    """

    def __init__(self) -> None:
        root = Node(ROOT_INO, "", "", lookups=1)
        self._by_ino: dict[int, Node] = {ROOT_INO: root}
        self._by_path: dict[str, Node] = {"": root}
        self._next_ino = _OWN_INOS  # when a real file's number is taken by a live node

    def __len__(self) -> int:
        return len(self._by_ino)

    def get(self, ino: int) -> Node:
        return self._by_ino[ino]

    def lookup(self, path: str, real_ino: int) -> Node:
        """The node at ``path`` (created if needed, numbered ``real_ino`` when free) with
        its lookup count raised by one."""
        node = self._by_path.get(path)
        if node is None:
            ino = real_ino
            if ino in self._by_ino or ino <= ROOT_INO or ino >= _OWN_INOS:
                ino = self._next_ino
                self._next_ino += 1
            node = Node(ino, path, path)
            self._by_ino[node.ino] = node
            self._by_path[path] = node
        node.lookups += 1
        return node

    def forget(self, ino: int, count: int) -> None:
        node = self._by_ino.get(ino)
        if node is None or node.ino == ROOT_INO:
            return
        node.lookups = max(0, node.lookups - count)
        self._maybe_drop(node)

    def opened(self, node: Node, fd: int) -> None:
        node.fds.add(fd)

    def closed(self, node: Node, fd: int) -> None:
        node.fds.discard(fd)
        self._maybe_drop(node)

    def removed(self, path: str) -> None:
        """``path`` is gone from the namespace: its node (if any) is detached."""
        node = self._by_path.pop(path, None)
        if node is not None:
            node.path = None
            self._maybe_drop(node)

    def _take_subtree(self, top: str) -> list[tuple[str, Node]]:
        prefix = top + "/"
        out = [(p, n) for p, n in self._by_path.items() if p == top or p.startswith(prefix)]
        for p, _ in out:
            del self._by_path[p]
        return out

    def _place(self, nodes: list[tuple[str, Node]], old: str, new: str) -> None:
        for p, n in nodes:
            n.path = n.name = new + p[len(old) :]
            self._by_path[n.path] = n

    def moved(self, old: str, new: str) -> None:
        """``old`` was renamed to ``new``, replacing whatever was there."""
        if old == new:
            return
        self.removed(new)
        self._place(self._take_subtree(old), old, new)

    def exchanged(self, a: str, b: str) -> None:
        """``a`` and ``b`` swapped places (RENAME_EXCHANGE)."""
        if a == b:
            return
        under_a, under_b = self._take_subtree(a), self._take_subtree(b)
        self._place(under_a, a, b)
        self._place(under_b, b, a)

    def _maybe_drop(self, node: Node) -> None:
        if node.lookups or node.fds or node.ino == ROOT_INO:
            return
        self._by_ino.pop(node.ino, None)
        if node.path is not None and self._by_path.get(node.path) is node:
            del self._by_path[node.path]


# ---------------------------------------------------------------------------- file system

_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])


def _handler(fn: _F) -> _F:
    """Answer every failure of a handler with a FUSE error; count harness bugs.

    OSErrors are the real file system's answers and pass on as they are. Anything else
    would end pyfuse3's main loop, so it becomes EIO and is counted as an internal error.
    """

    @functools.wraps(fn)
    async def wrapper(self: FaultyPassthrough, *args: Any) -> Any:
        if self.powered_off:
            raise pyfuse3.FUSEError(errno.EIO)  # after a power cut nothing reaches the disk
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            self.stats.internal_errors += 1
            log.exception("handler %s failed (a bug in faultfs)", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return cast(_F, wrapper)


def _entry(st: os.stat_result, ino: int) -> pyfuse3.EntryAttributes:
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = pyfuse3.InodeT(ino)
    entry.generation = 0
    entry.entry_timeout = 0  # see the module docstring
    entry.attr_timeout = 0
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
class _File:
    fd: int
    node: Node


@dataclass(eq=False, slots=True)
class _Dir:
    node: Node
    names: list[bytes] | None = None  # snapshot taken when a listing starts


@dataclass(slots=True)
class Stats:
    writes: int = 0
    bytes_written: int = 0  # what reached the source through write()
    max_write: int = 0  # largest write request (shows the negotiated max_write)
    reads: int = 0
    internal_errors: int = 0


class FaultyPassthrough(pyfuse3.Operations):
    """pyfuse3 operations: a passthrough of ``source`` that fails ops on cue."""

    enable_writeback_cache = False  # see the module docstring
    supports_dot_lookup = False

    def __init__(self, source: Path, faults: Faults) -> None:
        super().__init__()
        self.source = str(source)
        self.faults = faults
        self.stats = Stats()
        self._nodes = NodeTable()
        self._files: dict[int, _File] = {}
        self._dirs: dict[int, _Dir] = {}
        self._next_dir_fh = 1
        self._chown = os.geteuid() == 0
        self.volatile = VolatileWrites()  # what a power cut takes back, once armed
        self.names = VolatileNames(self.source, _exchange)
        self.powered_off = False

    # ------------------------------------------------------------------ helpers
    def _real(self, path: str) -> str:
        return f"{self.source}/{path}" if path else self.source

    def _fault(self, op: str, *paths: str) -> Rule | None:
        """Count ``op``; raise the errno of a rule that fires (write handles its own)."""
        rule = self.faults.check(op, *paths)
        if rule is not None:
            log.info(
                "rule %d fired: %s %s -> %s",
                rule.id,
                op,
                " -> ".join(paths),
                errno.errorcode.get(rule.errno, rule.errno),
            )
            if not rule.partial:
                raise pyfuse3.FUSEError(rule.errno)
        return rule

    def _child(self, parent: int, name: bytes) -> str:
        return self._nodes.get(parent).child(os.fsdecode(name))

    def _path(self, node: Node) -> str:
        if node.path is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node.path

    def _stat(self, node: Node) -> os.stat_result:
        if node.path is not None:
            try:
                return os.lstat(self._real(node.path))
            except FileNotFoundError:
                if not node.fds:
                    raise
        if node.fds:
            return os.fstat(next(iter(node.fds)))
        raise pyfuse3.FUSEError(errno.ENOENT)

    def _own(self, real: str, ctx: pyfuse3.RequestContext) -> None:
        """Give a new entry to the caller, as a kernel file system would."""
        if self._chown and (ctx.uid, ctx.gid) != (0, 0):
            os.lchown(real, ctx.uid, ctx.gid)

    def _new_entry(self, path: str) -> pyfuse3.EntryAttributes:
        st = os.lstat(self._real(path))
        return _entry(st, self._nodes.lookup(path, st.st_ino).ino)

    def _open_handle(self, node: Node, fd: int, flags: int) -> pyfuse3.FileInfo:
        self._files[fd] = _File(fd, node)
        self._nodes.opened(node, fd)
        return pyfuse3.FileInfo(
            fh=pyfuse3.FileHandleT(fd), direct_io=bool(flags & os.O_DIRECT), keep_cache=False
        )

    def _open_real(self, real: str, flags: int, mode: int = 0o777) -> int:
        """os.open, with an O_TRUNC the power-cut model sees (it saves what it cuts)."""
        if not (self.volatile.armed and flags & os.O_TRUNC):
            return os.open(real, flags, mode)
        fd = os.open(real, flags & ~os.O_TRUNC, mode)
        try:
            self.volatile.before_truncate(fd, 0)
            os.ftruncate(fd, 0)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def close_all(self) -> None:
        for f in self._files.values():
            with contextlib.suppress(OSError):
                os.close(f.fd)
        self._files.clear()
        self._dirs.clear()

    # ------------------------------------------------------------------ lookups
    @_handler
    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        return self._new_entry(path)

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        for ino, count in inode_list:
            self._nodes.forget(ino, count)

    @_handler
    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return _entry(self._stat(self._nodes.get(inode)), inode)

    @_handler
    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._nodes.get(inode)
        f = self._files.get(fh) if fh is not None else None
        fd = f.fd if f is not None else None
        # a detached node (unlinked, still open) is only reachable through a handle
        real = self._real(self._path(node)) if fd is None else ""
        if fields.update_size:
            self._fault("truncate", node.name)
            if fd is not None:
                self.volatile.before_truncate(fd, attr.st_size)
                os.ftruncate(fd, attr.st_size)
            else:
                tfd = os.open(real, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    self.volatile.before_truncate(tfd, attr.st_size)
                    os.ftruncate(tfd, attr.st_size)
                finally:
                    os.close(tfd)
        if fields.update_mode:
            self._fault("chmod", node.name)
            mode = attr.st_mode & 0o7777
            if fd is not None:
                os.fchmod(fd, mode)
            elif stat.S_ISLNK(os.lstat(real).st_mode):
                raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
            else:
                os.chmod(real, mode)
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            if fd is not None:
                os.fchown(fd, uid, gid)
            else:
                os.lchown(real, uid, gid)
        if fields.update_atime or fields.update_mtime:
            old = os.fstat(fd) if fd is not None else os.lstat(real)
            times = (
                attr.st_atime_ns if fields.update_atime else old.st_atime_ns,
                attr.st_mtime_ns if fields.update_mtime else old.st_mtime_ns,
            )
            if fd is not None:
                os.utime(fd, ns=times)
            else:
                os.utime(real, ns=times, follow_symlinks=False)
        return _entry(self._stat(node), inode)

    @_handler
    async def readlink(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> bytes:
        path = self._path(self._nodes.get(inode))
        return os.readlink(os.fsencode(self._real(path)))

    @_handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        """The source's numbers; with a budget, free space is what the budget has left."""
        self._fault("statfs", "")
        sv = os.statvfs(self.source)
        out = pyfuse3.StatvfsData()
        out.f_bsize = sv.f_bsize
        out.f_frsize = sv.f_frsize
        out.f_blocks = sv.f_blocks
        out.f_bfree = sv.f_bfree
        out.f_bavail = sv.f_bavail
        left = self.faults.budget_left
        if left is not None:
            blocks = left // max(1, sv.f_frsize)
            out.f_bfree = min(sv.f_bfree, blocks)
            out.f_bavail = min(sv.f_bavail, blocks)
        out.f_files = sv.f_files
        out.f_ffree = sv.f_ffree
        out.f_favail = sv.f_favail
        out.f_namemax = sv.f_namemax
        return out

    # ------------------------------------------------------------------ directories
    @_handler
    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        node = self._nodes.get(inode)
        if not stat.S_ISDIR(os.lstat(self._real(self._path(node))).st_mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self._dirs[fh] = _Dir(node)
        return pyfuse3.FileHandleT(fh)

    @_handler
    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        handle = self._dirs[fh]
        if start_id == 0 or handle.names is None:
            real = self._real(self._path(handle.node))
            with os.scandir(os.fsencode(real)) as it:
                handle.names = sorted(entry.name for entry in it)
        for index in range(start_id, len(handle.names)):
            name = handle.names[index]
            path = handle.node.child(os.fsdecode(name))
            try:
                st = os.lstat(self._real(path))
            except FileNotFoundError:
                continue  # removed since the snapshot
            node = self._nodes.lookup(path, st.st_ino)  # readdirplus entries are lookups
            if not pyfuse3.readdir_reply(token, name, _entry(st, node.ino), index + 1):
                self._nodes.forget(node.ino, 1)
                break

    @_handler
    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        self._dirs.pop(fh, None)

    @_handler
    async def fsyncdir(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        node = self._dirs[fh].node
        self._fault("fsyncdir", node.name)
        real = self._real(self._path(node))
        fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        covered = self.names.sync_starts()
        try:
            await asyncio.to_thread(os.fsync, fd)
        finally:
            os.close(fd)
        if self.powered_off:  # see fsync
            raise pyfuse3.FUSEError(errno.EIO)
        self.names.folder_synced(real, covered)

    @_handler
    async def mkdir(
        self, parent_inode: pyfuse3.InodeT, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        self._fault("mkdir", path)
        real = self._real(path)
        os.mkdir(real, mode & 0o7777)  # the kernel applied the caller's umask; ours is 0
        self.names.created(real, folder=True)
        self._own(real, ctx)
        return self._new_entry(path)

    @_handler
    async def rmdir(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        path = self._child(parent_inode, name)
        self._fault("rmdir", path)
        real = self._real(path)
        mode = os.lstat(real).st_mode & 0o7777
        os.rmdir(real)
        self.names.removed_folder(real, mode)
        self._nodes.removed(path)

    # ------------------------------------------------------------------ names
    @_handler
    async def mknod(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        mode: int,
        rdev: int,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        self._fault("create", path)
        real = self._real(path)
        os.mknod(real, mode, rdev)
        self.names.created(real)
        self._own(real, ctx)
        return self._new_entry(path)

    @_handler
    async def symlink(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        target: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        self._fault("symlink", path)
        real = self._real(path)
        os.symlink(target, os.fsencode(real))
        self.names.created(real)
        self._own(real, ctx)
        return self._new_entry(path)

    @_handler
    async def unlink(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        path = self._child(parent_inode, name)
        self._fault("unlink", path)
        real = self._real(path)
        stash = self.names.before_unlink(real)
        try:
            os.unlink(real)
        except BaseException:
            if stash:
                os.unlink(stash)
            raise
        self.names.unlinked(real, stash)
        self._nodes.removed(path)

    @_handler
    async def rename(
        self,
        parent_inode_old: pyfuse3.InodeT,
        name_old: bytes,
        parent_inode_new: pyfuse3.InodeT,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        if flags not in (0, pyfuse3.RENAME_NOREPLACE, pyfuse3.RENAME_EXCHANGE):
            raise pyfuse3.FUSEError(errno.EINVAL)  # e.g. RENAME_WHITEOUT
        self._fault("rename", old, new)
        real_old, real_new = self._real(old), self._real(new)
        stash = self.names.before_rename(real_new, flags)
        try:
            if flags == 0:
                os.rename(real_old, real_new)
            else:
                renameat2(real_old, real_new, flags)
        except BaseException:
            if stash:
                os.unlink(stash)
            raise
        self.names.renamed(real_old, real_new, stash, flags)
        if flags == pyfuse3.RENAME_EXCHANGE:
            self._nodes.exchanged(old, new)
        else:
            self._nodes.moved(old, new)

    @_handler
    async def link(
        self,
        inode: pyfuse3.InodeT,
        new_parent_inode: pyfuse3.InodeT,
        new_name: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)  # one path per node keeps rule matching simple

    # ------------------------------------------------------------------ files
    @_handler
    async def open(
        self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        node = self._nodes.get(inode)
        path = self._path(node)
        self._fault("open", path)
        if flags & os.O_TRUNC and flags & _WRITABLE:
            self._fault("truncate", path)
        real_flags = (flags & ~_OPEN_STRIP) | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = self._open_real(self._real(path), real_flags)
        return self._open_handle(node, fd, flags)

    @_handler
    async def create(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = self._child(parent_inode, name)
        self._fault("create", path)
        real = self._real(path)
        real_flags = (flags & ~_CREATE_STRIP) | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = self._open_real(real, real_flags, mode & 0o7777)
        try:
            self.names.created(real)
            self._own(real, ctx)
            node = self._nodes.lookup(path, os.fstat(fd).st_ino)
        except BaseException:
            os.close(fd)
            raise
        return self._open_handle(node, fd, flags), _entry(os.fstat(fd), node.ino)

    @_handler
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        f = self._files[fh]
        self._fault("read", f.node.name)
        self.stats.reads += 1
        return os.pread(f.fd, size, off)

    @_handler
    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        """Write through, or fail on cue; a budget short of space makes a short write.

        A partial rule writes the first half of the request and then fails with its
        errno (a torn write the caller is told about). Without a rule, a budget that
        covers only part of the request writes that part and answers the short count,
        and the next write gets ENOSPC, as a nearly full disk does.
        """
        f = self._files[fh]
        stats = self.stats
        stats.writes += 1
        stats.max_write = max(stats.max_write, len(buf))
        rule = self._fault("write", f.node.name)
        if rule is not None:  # a partial rule (others raised already)
            half = self.faults.take(len(buf) // 2)
            self.volatile.before_change(f.fd, off, half)
            pwrite_all(f.fd, memoryview(buf)[:half], off)
            stats.bytes_written += half
            raise pyfuse3.FUSEError(rule.errno)
        n = self.faults.take(len(buf))
        if n == 0 and buf:
            log.info("budget exhausted: write %s refused with ENOSPC", f.node.name)
            raise pyfuse3.FUSEError(errno.ENOSPC)
        self.volatile.before_change(f.fd, off, n)
        pwrite_all(f.fd, memoryview(buf)[:n], off)
        stats.bytes_written += n
        return n

    @_handler
    async def fallocate(self, fh: pyfuse3.FileHandleT, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on the real file; every mode but punch hole spends the budget."""
        f = self._files[fh]
        self._fault("fallocate", f.node.name)
        if not mode & FALLOC_FL_PUNCH_HOLE and not self.faults.take_all(length):
            log.info("budget exhausted: fallocate %s refused with ENOSPC", f.node.name)
            raise pyfuse3.FUSEError(errno.ENOSPC)
        self.volatile.before_change(f.fd, offset, length)
        fallocate(f.fd, mode, offset, length)

    @_handler
    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        self._fault("flush", self._files[fh].node.name)

    @_handler
    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        f = self._files[fh]
        try:
            self._fault("fsync", f.node.name)
        except pyfuse3.FUSEError:  # a writeback error: what it would have covered is lost
            self.volatile.sync_failed(self.volatile.sync_starts(f.fd))
            raise
        covered = self.volatile.sync_starts(f.fd)
        await asyncio.to_thread(os.fdatasync if datasync else os.fsync, f.fd)
        if self.powered_off:  # the power went while the disk flushed: not known durable
            raise pyfuse3.FUSEError(errno.EIO)
        self.volatile.synced(covered)

    @_handler
    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        f = self._files.pop(fh)
        self._nodes.closed(f.node, f.fd)
        os.close(f.fd)


# ---------------------------------------------------------------------------- control


def handle_command(fs: FaultyPassthrough, req: Any) -> dict[str, Any]:
    """Answer one control request (a JSON object with "cmd"); errors become ok=false."""
    faults = fs.faults
    try:
        if not isinstance(req, dict):
            raise ValueError("a request is a JSON object")
        cmd = req.get("cmd")
        if cmd == "ping":
            return {"ok": True, "pid": os.getpid()}
        if cmd == "add":
            rule = faults.add(
                req.get("op", ""),
                req.get("errno", 0),
                path=req.get("path", "*"),
                after=req.get("after", 0),
                times=req.get("times"),
                partial=bool(req.get("partial", False)),
            )
            log.info("rule %d added: %s", rule.id, rule)
            return {"ok": True, "id": rule.id}
        if cmd == "remove":
            return {"ok": True, "removed": faults.remove(int(req["id"]))}
        if cmd == "clear":
            faults.clear()
            log.info("rules and budget cleared")
            return {"ok": True}
        if cmd == "hits":
            return {"ok": True, "hits": faults.hits()}
        if cmd == "count":
            return {"ok": True, "count": faults.count(str(req.get("path", "*")))}
        if cmd == "budget":
            faults.set_budget(req.get("bytes"))
            log.info("budget set to %s bytes", faults.budget_left)
            return {"ok": True}
        if cmd == "track_unsynced":
            fs.volatile.arm()
            fs.names.arm()
            log.info("tracking unsynced changes for a power cut")
            return {"ok": True}
        if cmd == "power_cut":
            fs.powered_off = True
            seed = req.get("seed")
            rng = None if seed is None else random.Random(int(seed))
            # data by inode first, then names
            undone = fs.volatile.cut(rng) | fs.names.cut(rng)
            log.info("power cut: %s", undone)
            return {"ok": True, "undone": undone}
        if cmd == "stats":
            return {
                "ok": True,
                "stats": {
                    "writes": fs.stats.writes,
                    "bytes_written": fs.stats.bytes_written,
                    "max_write": fs.stats.max_write,
                    "reads": fs.stats.reads,
                    "internal_errors": fs.stats.internal_errors,
                    "budget_left": faults.budget_left,
                    "budget_refusals": faults.budget_refusals,
                },
            }
        raise ValueError(f"unknown command {cmd!r}")
    except (ValueError, KeyError, TypeError) as exc:
        return {"ok": False, "error": str(exc)}


async def _serve_client(
    fs: FaultyPassthrough, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while line := await reader.readline():
            try:
                req = json.loads(line)
            except ValueError as exc:
                reply: dict[str, Any] = {"ok": False, "error": f"bad JSON: {exc}"}
            else:
                reply = handle_command(fs, req)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


def _control_address(control: str) -> str:
    """A leading "@" names an abstract socket (no file, no length worries)."""
    return "\0" + control[1:] if control.startswith("@") else control


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    """Stop once process ``parent`` is gone, so a killed test run leaves no mount behind.

    Waits on a pidfd rather than using PR_SET_PDEATHSIG, which fires when the parent
    *thread* ends: a test that started the mount from a worker thread would lose it.
    """
    try:
        pidfd = os.pidfd_open(parent)
    except ProcessLookupError:
        pidfd = -1
    try:
        # getppid() after pidfd_open: the parent was still ours when the fd was taken
        if pidfd >= 0 and os.getppid() == parent:
            gone = asyncio.Event()
            loop = asyncio.get_running_loop()
            loop.add_reader(pidfd, gone.set)
            try:
                await gone.wait()
            finally:
                loop.remove_reader(pidfd)
    finally:
        if pidfd >= 0:
            os.close(pidfd)
    log.warning("parent process %d is gone; stopping", parent)
    stop.set()


async def serve(
    source: Path,
    mountpoint: str,
    control: str,
    ready: Callable[[], None] | None = None,
    *,
    parent: int | None = None,
) -> None:
    """Mount, serve the file system and the control socket until stopped or unmounted.

    SIGTERM/SIGINT stop it, so does the end of process ``parent`` when given; an
    external unmount (``fusermount3 -u``) ends it too. It unmounts (lazily, as root) only
    if the mount is still there. ``mountpoint`` must be resolved (no symlinks): it is
    compared with the mount table.
    """
    mnt = mountpoint
    fs = FaultyPassthrough(source, Faults())
    options = set(pyfuse3.default_options)
    options |= {f"fsname=faultfs:{source}", "subtype=faultfs"}
    if os.geteuid() == 0:
        options.add("allow_other")  # the processes under test may run as another user
    address = _control_address(control)
    if not control.startswith("@"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before mounting: no signal may skip cleanup
        loop.add_signal_handler(sig, stop.set)
    pyfuse3.asyncio.enable()
    pyfuse3.init(fs, mnt, options)
    server: asyncio.Server | None = None
    watcher = None if parent is None else asyncio.ensure_future(_watch_parent(parent, stop))
    main = asyncio.ensure_future(pyfuse3.main(min_tasks=1, max_tasks=MAX_TASKS))
    stopper = asyncio.ensure_future(stop.wait())
    try:
        server = await asyncio.start_unix_server(functools.partial(_serve_client, fs), path=address)
        log.info("mounted %s at %s, control %s", source, mnt, control)
        if ready is not None:
            ready()
        await asyncio.wait({main, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if main.done():
            log.info("unmounted externally")
    finally:
        stopper.cancel()
        if watcher is not None:
            watcher.cancel()
        if server is not None:
            server.close()
        if not control.startswith("@"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(control)
        try:
            await end_main_loop(main, STOP_TIMEOUT)  # no worker may outlive the session
        finally:
            fs.close_all()
            pyfuse3.close(unmount=is_mounted(mnt))
            log.info(
                "stopped: %d writes, %d bytes written, max write %d, %d internal errors",
                fs.stats.writes,
                fs.stats.bytes_written,
                fs.stats.max_write,
                fs.stats.internal_errors,
            )
    if not main.cancelled():
        main.result()  # the loop's own failure
