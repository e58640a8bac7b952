"""Apply journal records to a replica folder, in LSN order, durably at barriers.

Every operation is idempotent (a WRITE writes the same bytes again, a ZERO zeroes the
same range in place, a TRIM punches the same hole, a RESIZE sets the same size, a FILE
replaces the whole file, a RENAME whose source is gone and whose target exists is done),
so re-applying records after a crash is always safe. ``barrier()`` makes everything
applied so far durable: file data of every touched file and the directory entries that
changed.

Paths in records are relative to the replica folder. They are checked (no absolute
paths, no '..') and resolved one component at a time with O_NOFOLLOW from a descriptor
of the replica folder, so a replicated symlink can never redirect a write outside it.

Before a file is changed for the first time in an apply round, it is compared with the
stamp replication left on it (``replica_files.py``): a file changed, replaced or removed
behind the receiver raises ``ReplicaDiverged`` before anything is written. ``barrier()``
stamps every regular file the round changed.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import stat
from pathlib import Path

from replicator.engine.direct_writes import DirectWrites
from replicator.engine.names import file_mode, node_kind, path_problem
from replicator.engine.replica_files import ReplicaDiverged, ReplicaFiles
from replicator.engine.volumes import Zeroing, pwrite_all
from replicator.journal import Record, RecordType
from replicator.journal.durable import atomic_write, fsync_fd, makedirs_durable
from replicator.journal.locking import held_elsewhere

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


MAX_OPEN_FILES = 256  # replica files kept open between records
# records that change an existing file in place: checked against its stamp first
_CHANGES_IN_PLACE = frozenset(
    {RecordType.WRITE, RecordType.ZERO, RecordType.TRIM, RecordType.RESIZE, RecordType.CHMOD}
)


class ApplyError(Exception):
    """A record cannot be applied (unsafe path, I/O error); the applied LSN does not advance."""


def _checked(path: str) -> str:
    problem = path_problem(path)
    if problem is not None:
        raise ApplyError(f"refusing record: {problem}")
    return path


def _open_planted(leaf: str, dfd: int, path: str) -> int:
    """Open the existing replica file ``leaf``; refuse anything but a regular file planted
    under its name: a FIFO would fail the first write obscurely, a device node would take
    the bytes, a hard link would carry the writes to a file outside the replica folder.
    O_NONBLOCK and O_NOCTTY: opening it neither waits nor takes a terminal."""
    try:
        fd = os.open(leaf, _FILE_FLAGS | os.O_NONBLOCK | os.O_NOCTTY, 0o600, dir_fd=dfd)
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.ELOOP):  # a socket or driverless device; a symlink
            _refuse_unless_regular(os.stat(leaf, dir_fd=dfd, follow_symlinks=False).st_mode, path)
        raise
    try:
        st = os.fstat(fd)
        _refuse_unless_regular(st.st_mode, path)
        if st.st_nlink > 1:
            raise ApplyError(
                f"refusing record: {path} has {st.st_nlink - 1} other hard link(s), which "
                "a write would change too, wherever they are (replication never makes hard "
                "links; remove the other names, or copy the file to a name of its own)"
            )
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _what_is(path: str | Path, dir_fd: int | None = None) -> str:
    """``path``'s kind in an error message: "a symlink", "a FIFO", ... (not followed)."""
    try:
        mode = os.stat(path, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError:  # gone meanwhile
        return "missing"
    return f"a {node_kind(mode)}"


def _refuse_unless_regular(mode: int, path: str) -> None:
    if not stat.S_ISREG(mode):
        raise ApplyError(
            f"refusing record: {path} is a {node_kind(mode)}, not a regular file (remove "
            "or rename it: replication writes only regular files in a replica folder)"
        )


def _parent_of(path: str) -> str:
    return path.rpartition("/")[0]


def _fsync_named(fd: int) -> None:
    """``fsync_fd``, whose error names the file (an fsync's OSError names none: "receiver
    cannot apply: [Errno 5] Input/output error" said nothing of which disk to check)."""
    try:
        fsync_fd(fd)
    except OSError as exc:
        if exc.filename is not None:
            raise
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            raise exc from None
        raise OSError(exc.errno, exc.strerror, name) from exc


class PendingSync:
    """Descriptors to sync (files, then folders), then close. Blocking.

    Files get ``fsync``, not ``fdatasync``: the barrier stamps each file with its ctime
    (``replica_files.py``), and an overwrite's new ctime is metadata ``fdatasync`` leaves
    behind. With the state folder on another file system (``--state-dir``), or a
    ``lazytime`` mount, the stamp in ``files.state`` would outlive the ctime on disk after
    a power cut, and the receiver would refuse its own replica as changed outside
    replication until a ``send --resync`` (tests/cli/test_power_cut_stamps.py). A file
    that only changed its name is fsynced too: a rename moves the ctime, and btrfs's
    fsync of the folder logs the new name without it (tests/engine/test_applier_power_cut.py).
    """

    def __init__(self, files: list[int], dirs: list[int], *, drop_cache: bool = False) -> None:
        self.files = files
        self.dirs = dirs
        self.drop_cache = drop_cache

    def sync(self) -> None:
        try:
            for fd in self.files:
                _fsync_named(fd)
                if self.drop_cache:
                    _drop_clean_pages(fd)
            for fd in self.dirs:
                _fsync_named(fd)
        finally:
            self.close()

    def close(self) -> None:
        for fd in (*self.files, *self.dirs):
            os.close(fd)
        self.files, self.dirs = [], []


def _drop_clean_pages(fd: int) -> None:
    """Take a replica file's clean pages out of the page cache (after its ``fsync``).

    A first sync written through the page cache (``engine/write_path.py``) left the replica
    cached, in large folios: nothing reads it on the target, the memory is the host's, and
    each later 4 KiB write into such a folio cost the receiver 24-26 us of CPU against 17
    for one into an uncached file (bench/RESULTS.md, "2026-12-06"). Pages dirtied since the
    ``fsync`` began are not dropped (the kernel skips dirty pages); a failure costs only
    the memory, so it is ignored.
    """
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _refuse_if_held(fd: int, rel: str) -> None:
    """A folder another replicator process holds (a receiver's ``--dir``, a state folder:
    each is flocked by its owner) is never written into, renamed or removed: receivers
    nested in one tree would otherwise overwrite or delete each other's replicas and
    journals (a folder job's first sync removes what its source lacks)."""
    if held_elsewhere(fd):
        where = f"the job folder's {rel!r}" if rel else "the job folder"
        raise ApplyError(
            f"refusing record: {where} is held by another replicator process (another "
            "receiver's --dir, or a state folder), whose files replication would overwrite "
            "or delete; give that one a folder outside this receiver's --dir"
        )


class Applier:
    """Writes records into the replica folder of one job. Blocking: run it in a worker thread."""

    def __init__(self, replica_dir: Path, files: ReplicaFiles | None = None) -> None:
        self.replica_dir = replica_dir
        self.files = files if files is not None else ReplicaFiles()
        try:
            makedirs_durable(replica_dir)
            self._root = os.open(replica_dir, _DIR_FLAGS)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EEXIST):
                raise
            raise ApplyError(
                f"{replica_dir} is {_what_is(replica_dir)}, not a folder: refusing to write "
                "replicas there, since they must stay inside the receiver's --dir; remove it "
                "on the target (the receiver creates the folder itself)"
            ) from exc
        try:
            _refuse_if_held(self._root, "")
        except BaseException:
            os.close(self._root)
            raise
        self._fds: collections.OrderedDict[str, int] = collections.OrderedDict()  # LRU
        self._direct = DirectWrites()  # large writes past the page cache (direct_writes.py)
        self._dirty: set[str] = set()
        self._dirty_dirs: set[str] = set()
        self._touched: set[str] = set()  # checked or changed by us in this round
        self._changed: set[str] = set()  # to stamp at the barrier
        # given a new name (RENAME, a FILE's rename into place) and no write since: the
        # name change moved the file's ctime, which no descriptor in _dirty carries
        self._moved: set[str] = set()

    # -- path resolution ---------------------------------------------------------------
    def _open_dir(self, rel: str, *, create: bool) -> int:
        """A new descriptor of directory ``rel`` ('' = the replica folder), never via symlinks."""
        fd = os.dup(self._root)
        if not rel:
            return fd
        walked = ""
        for part in rel.split("/"):
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    os.close(fd)
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
                self._dirty_dirs.add(walked)
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                try:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        what = _what_is(part, dir_fd=fd)
                        where = f"{self.replica_dir}/{walked}" if walked else self.replica_dir
                        raise ApplyError(
                            f"refusing record: {rel!r} passes through {part!r}, {what}, in "
                            f"{where} (remove or rename it there: replication makes its own "
                            "folders)"
                        ) from exc
                    raise
                finally:
                    os.close(fd)
            os.close(fd)
            fd = nxt
            walked = f"{walked}/{part}" if walked else part
            try:
                _refuse_if_held(fd, walked)
            except BaseException:
                os.close(fd)
                raise
        return fd

    def _refuse_held_entry(self, dfd: int, leaf: str, rel: str) -> None:
        """Before a folder entry is removed or renamed: when it is a folder, it is not
        another replicator process's (see ``_refuse_if_held``)."""
        try:
            fd = os.open(leaf, _DIR_FLAGS, dir_fd=dfd)
        except OSError:
            return  # missing, a file or a symlink: nobody's folder
        try:
            _refuse_if_held(fd, rel)
        finally:
            os.close(fd)

    def open_readonly(self, path: str) -> int | None:
        """A read-only descriptor of replica file ``path``, or None when there is no such
        file under the replica folder (missing, unsafe path, or reached through a symlink).
        Thread-safe: it creates nothing."""
        if path_problem(path) is not None:
            return None
        parent, _, leaf = path.rpartition("/")
        try:
            dfd = self._open_dir(parent, create=False)
        except (OSError, ApplyError):
            return None
        try:
            # O_NONBLOCK: a FIFO planted under the name must not hang the open
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
            return os.open(leaf, flags, dir_fd=dfd)
        except OSError:
            return None
        finally:
            os.close(dfd)

    def lstat(self, path: str) -> os.stat_result | None:
        """lstat of replica file ``path`` without following symlinks on the way; None when
        it (or a folder on the way) is missing."""
        _checked(path)
        parent, _, leaf = path.rpartition("/")
        try:
            dfd = self._open_dir(parent, create=False)
        except FileNotFoundError:
            return None
        try:
            return os.stat(leaf, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        finally:
            os.close(dfd)

    def _guard(self, path: str) -> None:
        """Before the first change to ``path`` in this round: is it as replication left it?"""
        if path in self._touched:
            return
        st = self.lstat(path)
        cached = self._fds.get(path)
        if cached is not None and (st is None or os.fstat(cached).st_ino != st.st_ino):
            self._close(path)  # the name no longer leads to the file we hold open
            raise ReplicaDiverged(path, "was replaced or removed outside replication")
        self.files.check(path, st)
        self._touched.add(path)

    def _mine(self, path: str) -> None:
        """``path`` was changed (or replaced) by this round: stamp it at the barrier."""
        self._touched.add(path)
        self._changed.add(path)

    @property
    def unstamped(self) -> set[str]:
        """Files this round changed that the barrier has not stamped yet."""
        return set(self._changed)

    def adopt(self, path: str) -> None:
        """Take ``path`` as it is now (the sender compares with it): stamp it afresh, once
        its bytes and ctime are on disk, as a barrier's stamps are (whoever changed it
        last may not have synced it)."""
        self._close(path)
        st = self.lstat(path)
        if st is None or not stat.S_ISREG(st.st_mode):
            self.files.forget(path)
            return
        fd = self.open_readonly(path)
        if fd is not None:
            try:
                _fsync_named(fd)
                st = os.fstat(fd)
            finally:
                os.close(fd)
        self.files.stamp(path, st)

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is not None:
            self._fds.move_to_end(path)
        else:
            while len(self._fds) >= MAX_OPEN_FILES:  # bounded, however many files a peer names
                self._close(next(iter(self._fds)))
            _checked(path)
            parent, _, leaf = path.rpartition("/")
            dfd = self._open_dir(parent, create=True)
            try:
                fd = os.open(leaf, _FILE_FLAGS | os.O_EXCL, 0o600, dir_fd=dfd)
                self._dirty_dirs.add(parent)
            except FileExistsError:  # a symlink under the name too: O_EXCL does not follow
                fd = _open_planted(leaf, dfd, f"{self.replica_dir}/{path}")
            finally:
                os.close(dfd)
            self._fds[path] = fd
        return fd

    def at_its_path(self) -> bool:
        """Whether the replica folder this applier writes is still the one at its path."""
        try:
            now = os.stat(self.replica_dir, follow_symlinks=False)
        except OSError:
            return False
        held = os.fstat(self._root)
        return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)

    def let_go(self, path: str) -> None:
        """Close any descriptor of ``path`` (found deleted or replaced outside replication:
        a descriptor kept would keep the deleted file's space)."""
        self._close(path)

    def _close(self, path: str) -> None:
        """Close the cached descriptor of ``path``, if any (synced first when dirty)."""
        fd = self._fds.pop(path, None)
        if fd is None:
            return
        self._direct.close(path)
        if path in self._dirty:
            _fsync_named(fd)  # data and ctime, as PendingSync
            self._dirty.discard(path)
        os.close(fd)

    def _forget(self, path: str) -> None:
        """Close cached descriptors of ``path`` and of everything below it (a folder)."""
        prefix = path + "/"
        for name in [n for n in self._fds if n == path or n.startswith(prefix)]:
            self._close(name)

    # -- records -----------------------------------------------------------------------
    def apply(self, record: Record, *, past_cache: bool = False) -> None:
        """Apply one record; with ``past_cache``, a large aligned WRITE goes past the page
        cache (direct_writes.py says when that is worth it)."""
        kind = record.type
        path = record.volume
        if kind in _CHANGES_IN_PLACE:
            self._guard(path)
            self._mine(path)
        if kind is RecordType.WRITE:
            fd = self._fd(path)
            if not (past_cache and self._direct.write(path, fd, record.data, record.offset)):
                pwrite_all(fd, record.data, record.offset)
            self._dirty.add(path)
        elif kind in (RecordType.ZERO, RecordType.TRIM):
            # the source's allocation: a ZERO's range stays allocated (a thick disk's
            # promise to its guest holds after a failover), a TRIM's is punched
            fd = self._fd(path)
            end = min(os.fstat(fd).st_size, record.offset + record.length)
            if end > record.offset:
                # asked afresh each time (a refused mode costs a system call): the
                # replica folder may span file systems that can do different things
                if kind is RecordType.ZERO:
                    Zeroing().zero(fd, record.offset, end - record.offset)
                else:
                    Zeroing().punch(fd, record.offset, end - record.offset)
                self._dirty.add(path)
        elif kind is RecordType.RESIZE:
            fd = self._fd(path)
            if os.fstat(fd).st_size != record.size:
                os.ftruncate(fd, record.size)
                self._dirty.add(path)
        elif kind is RecordType.FILE:
            _checked(path)
            self._close(path)
            dfd = self._open_dir(_parent_of(path), create=True)
            os.close(dfd)  # the walk proved the parent is a real directory inside the replica
            target = self.replica_dir / path
            atomic_write(target, record.data, file_mode(record.offset), shared_folder=True)
            self._mine(path)
            self._moved.add(path)
        elif kind is RecordType.CREATE:
            self._close(path)
            fd = self._fd(path)
            os.ftruncate(fd, 0)
            os.fchmod(fd, file_mode(record.offset))
            self._dirty.add(path)
            self._dirty_dirs.add(_parent_of(path))
            self._mine(path)
        elif kind is RecordType.CHMOD:
            self._chmod(path, record.offset & 0o7777)
        elif kind in (RecordType.UNLINK, RecordType.RMDIR, RecordType.MKDIR, RecordType.SYMLINK):
            self._entry_op(record)
            if kind is not RecordType.MKDIR:
                self.files.forget(path)
        elif kind is RecordType.RENAME:
            self._rename(path, record.target)
            self.files.move(path, record.target)
            self._mine(record.target)
            self._moved.add(record.target)
        # FLUSH and EPOCH carry no data: the caller calls barrier() for them.

    def _chmod(self, path: str, mode: int) -> None:
        _checked(path)
        parent, _, leaf = path.rpartition("/")
        try:
            dfd = self._open_dir(parent, create=False)
        except FileNotFoundError:
            return  # its folder was removed later: so was the file
        try:  # O_NONBLOCK: a FIFO under the name must not hang the open
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
            fd = os.open(leaf, flags, dir_fd=dfd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOENT):
                return  # symlinks have no mode of their own; a vanished file was unlinked later
            raise
        finally:
            os.close(dfd)
        try:
            kind = stat.S_IFMT(os.fstat(fd).st_mode)
            os.fchmod(fd, mode if kind == stat.S_IFDIR else file_mode(mode))
            # durable now, with the ctime the barrier stamps: a mode change is no data, so
            # no descriptor in the barrier's files would carry it (chmods are rare)
            if kind in (stat.S_IFREG, stat.S_IFDIR):  # a FIFO or a device has no fsync
                _fsync_named(fd)
        finally:
            os.close(fd)

    def _entry_op(self, record: Record) -> None:
        path = _checked(record.volume)
        parent, _, leaf = path.rpartition("/")
        kind = record.type
        try:
            dfd = self._open_dir(parent, create=kind in (RecordType.MKDIR, RecordType.SYMLINK))
        except FileNotFoundError:
            if kind in (RecordType.UNLINK, RecordType.RMDIR):
                self._forget(path)
                return  # the folder is gone, so is what it held: the end state holds
            raise
        try:
            if kind is RecordType.UNLINK:
                self._close(path)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leaf, dir_fd=dfd)
            elif kind is RecordType.RMDIR:
                self._forget(path)
                self._refuse_held_entry(dfd, leaf, path)
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(leaf, dir_fd=dfd)
            elif kind is RecordType.MKDIR:
                mode = record.offset & 0o7777
                with contextlib.suppress(FileExistsError):
                    os.mkdir(leaf, mode, dir_fd=dfd)
                # the mode as the source has it: not as this process's umask and the parent's
                # setgid bit made it (mkdir applies both), nor as an earlier walk made it.
                # By name (a folder without read permission cannot be opened but by root),
                # once it is known to be a folder: never a link's target
                if not stat.S_ISDIR(os.stat(leaf, dir_fd=dfd, follow_symlinks=False).st_mode):
                    raise ApplyError(f"cannot make folder {path!r}: something else is there")
                os.chmod(leaf, mode, dir_fd=dfd)
                # its inode durable at the barrier, as the walk's new folders are: the
                # parent's fsync need not carry a chmod logged after the mkdir (XFS)
                self._dirty_dirs.add(path)
            else:  # SYMLINK: replace whatever is there (idempotent re-apply)
                self._close(path)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leaf, dir_fd=dfd)
                os.symlink(record.target, leaf, dir_fd=dfd)
        finally:
            os.close(dfd)
        self._dirty_dirs.add(parent)

    def _rename(self, old: str, new: str) -> None:
        _checked(old)
        _checked(new)
        old_parent, _, old_leaf = old.rpartition("/")
        new_parent, _, new_leaf = new.rpartition("/")
        self._forget(old)
        self._forget(new)
        try:
            src = self._open_dir(old_parent, create=False)
        except FileNotFoundError:
            if self.lstat(new) is not None:
                return  # redone after a crash: it happened (and its old folder went later)
            raise ApplyError(f"cannot rename {old!r}: it does not exist") from None
        try:
            dst = self._open_dir(new_parent, create=True)
            try:
                self._refuse_held_entry(src, old_leaf, old)
                self._refuse_held_entry(dst, new_leaf, new)
                os.rename(old_leaf, new_leaf, src_dir_fd=src, dst_dir_fd=dst)
            except FileNotFoundError:
                # re-applied after a crash: the rename happened if the target is there
                try:
                    os.stat(new_leaf, dir_fd=dst, follow_symlinks=False)
                except FileNotFoundError:
                    raise ApplyError(f"cannot rename {old!r}: it does not exist") from None
            finally:
                os.close(dst)
        finally:
            os.close(src)
        self._dirty_dirs.update((old_parent, new_parent))

    def apply_many(self, records: list[Record], *, past_cache: bool = False) -> None:
        """Apply ``records`` in order; ``past_cache`` as for ``apply``."""
        for record in records:
            try:
                self.apply(record, past_cache=past_cache)
            except OSError as exc:
                raise ApplyError(
                    f"cannot apply lsn {record.lsn} ({record.type.name}) to "
                    f"{self.replica_dir / record.volume}: {exc.strerror or exc}"
                ) from exc

    def barrier(self) -> None:
        """Make every applied record durable, then stamp the files this round changed."""
        self.detach_dirty().sync()
        self.stamp_changed()

    def detach_dirty(self, *, drop_cache: bool = False) -> PendingSync:
        """What makes the records applied so far durable, as descriptors of its own: the
        caller may sync them in another thread while this applier goes on writing (the
        fsync of a file covers every write done to it before the fsync began).
        ``drop_cache``: the files' clean pages leave the page cache once synced (a first
        sync's bulk, which nothing on the target reads)."""
        files = [os.dup(self._fds[name]) for name in sorted(self._dirty)]
        dirs: list[int] = []
        try:
            for name in sorted(self._moved - self._dirty):
                fd = self.open_readonly(name)  # None: removed by a later record
                if fd is not None and not stat.S_ISREG(os.fstat(fd).st_mode):
                    os.close(fd)  # a folder moved: its files keep their ctimes
                elif fd is not None:
                    files.append(fd)
            for rel in sorted(self._dirty_dirs):
                try:
                    dirs.append(self._open_dir(rel, create=False))
                except FileNotFoundError:
                    continue  # removed by a later record
        except BaseException:
            PendingSync(files, dirs).close()
            raise
        self._dirty.clear()
        self._moved.clear()
        self._dirty_dirs.clear()
        return PendingSync(files, dirs, drop_cache=drop_cache)

    def stamp_changed(self) -> None:
        """Stamp the files changed since the last stamping as they are now; the next
        change to any of them is checked against that stamp first."""
        for path in sorted(self._changed):
            st = self.lstat(path)
            if st is not None and stat.S_ISREG(st.st_mode):
                self.files.stamp(path, st)
            elif st is None or not stat.S_ISDIR(st.st_mode):
                self.files.forget(path)
            # a folder renamed: its files' stamps moved with it (files.move) and stand
        self._changed.clear()
        self._touched.clear()

    def close(self) -> None:
        self._direct.close_all()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._root >= 0:
            os.close(self._root)
            self._root = -1
