"""Source volumes: what a path is (disk image or configuration file) and reading it in extents.

Extents are fixed-size slices of a volume (64 KiB by default). For each one the scanner
needs to know whether it is a hole, all zeros or data, and the blake3 digest of its
content; holes are found with SEEK_DATA/SEEK_HOLE so sparse images are not read where
nothing is allocated.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import fcntl
import functools
import os
import stat
import struct
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Final

import blake3

from replicator.engine.errors import ConfigError
from replicator.engine.names import check_volume_name
from replicator.engine.read_plan import DEFAULT_EXTENT as DEFAULT_EXTENT  # the engine's, here too
from replicator.engine.read_plan import READ_CHUNK, data_ranges, plan_reads
from replicator.transport.messages import DIGEST_SIZE  # one extent digest, on the wire too

CONFIG_FILE_MAX = 1024 * 1024  # files up to this size that are not disk images ship whole
_DISK_SUFFIXES = {".vhd", ".vhdx", ".avhd", ".avhdx", ".qcow2", ".qcow", ".img", ".raw", ".vmdk"}


class VolumeKind(Enum):
    DISK = "disk"
    FILE = "file"


@dataclass(frozen=True, slots=True)
class VolumeSpec:
    path: Path
    name: str
    kind: VolumeKind


class VolumeGone(ConfigError):
    """A volume was removed, renamed, or replaced by something that is not a regular file
    while the sender ran (a restore by ``rm`` and ``cp``, an editor's odd save, a FIFO)."""


def _gone(spec: VolumeSpec, why: str) -> VolumeGone:
    return VolumeGone(
        f"volume {spec.name!r} ({spec.path}) {why} while the sender ran",
        hint="put the file back (a continuous sender tries again, 1 s doubling to 60 s), "
        "or restart the sender without it",
    )


def volume_stat(spec: VolumeSpec) -> os.stat_result:
    """The volume's ``stat``, or VolumeGone when it is missing or not a regular file."""
    try:
        st = os.stat(spec.path)
    except FileNotFoundError:
        raise _gone(spec, "was removed or renamed") from None
    if not stat.S_ISREG(st.st_mode):
        raise _gone(spec, "was replaced by something that is not a regular file")
    return st


def open_volume(spec: VolumeSpec) -> int:
    """A read-only descriptor of the volume. Never blocks in the open: a FIFO put in a
    volume's place held the sender in ``open`` for good, deaf to SIGTERM (its thread
    cannot be interrupted); it is VolumeGone, as a missing file is."""
    try:
        fd = os.open(spec.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise _gone(spec, "was removed or renamed") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _gone(spec, "was replaced by something that is not a regular file")
    return fd


def _has_image_magic(fd: int) -> bool:
    head = os.pread(fd, 8, 0)
    if head[:4] == b"QFI\xfb" or head == b"vhdxfile" or head == b"conectix":
        return True
    size = os.fstat(fd).st_size
    return size >= 512 and os.pread(fd, 8, size - 512) == b"conectix"


def is_disk_image(name: str, fd: int) -> bool:
    """The rule ``classify`` applies, on an open file: a disk image's suffix or header, or
    larger than a configuration file may be."""
    if Path(name).suffix.lower() in _DISK_SUFFIXES or _has_image_magic(fd):
        return True
    return os.fstat(fd).st_size > CONFIG_FILE_MAX


def classify(path: Path) -> VolumeKind:
    """Disk images replicate by extent; small other files replicate whole (FILE records)."""
    if path.suffix.lower() in _DISK_SUFFIXES:
        return VolumeKind.DISK
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return VolumeKind.DISK if is_disk_image(path.name, fd) else VolumeKind.FILE
    finally:
        os.close(fd)


def resolve_volumes(paths: list[Path]) -> list[VolumeSpec]:
    """Check the command line's volumes: they exist, are regular files, have unique safe names."""
    if not paths:
        raise ConfigError("no volumes given", hint="name at least one disk image or file")
    specs: list[VolumeSpec] = []
    seen: dict[str, Path] = {}
    files: dict[tuple[int, int], Path] = {}  # (device, inode) -> the volume that named it
    for path in paths:
        if not path.exists():
            if path.is_symlink():
                raise ConfigError(
                    f"volume {path} is a symbolic link to {os.readlink(path)}, which does not "
                    "exist",
                    hint="point the link at the disk image, or name the image itself",
                )
            raise ConfigError(f"volume {path} does not exist", hint="check the path")
        if not path.is_file():
            raise ConfigError(
                f"volume {path} is not a regular file",
                hint="name the disk images and files to replicate; a whole folder replicates "
                "with --capture fuse --mount MOUNTPOINT"
                if path.is_dir()
                else "replicator replicates disk image files, not block devices: a VM whose "
                "disk is a block device (an LVM volume, a partition) is not supported"
                if path.is_block_device()
                else "name the disk images and files to replicate",
            )
        try:
            with path.open("rb"):
                pass
        except PermissionError as exc:
            raise ConfigError(f"volume {path} is not readable: {exc.strerror}") from exc
        st = path.stat()
        same = files.get((st.st_dev, st.st_ino))
        if same is not None:
            raise ConfigError(
                f"volumes {same} and {path} are the same file (named twice, or through a "
                "hard link or symlink)",
                hint="name each disk once",
            )
        files[(st.st_dev, st.st_ino)] = path
        name = check_volume_name(path.name)
        if name in seen:
            raise ConfigError(
                f"volumes {seen[name]} and {path} share the name {name!r}",
                hint="replicas are named after the file name; use one job per folder",
            )
        seen[name] = path
        specs.append(VolumeSpec(path, name, classify(path)))
    return specs


_ZERO_CACHE: dict[int, bytes] = {}


def zeros(n: int) -> bytes:
    z = _ZERO_CACHE.get(n)
    if z is None:
        z = _ZERO_CACHE[n] = bytes(n)
    return z


@functools.lru_cache(maxsize=64)
def zero_digest(length: int) -> bytes:
    return bytes(blake3.blake3(zeros(length)).digest(DIGEST_SIZE))


def extent_digest(data: bytes | memoryview) -> bytes:
    return blake3.blake3(data).digest(DIGEST_SIZE)


class ExtentState(Enum):
    HOLE = 0
    ZERO = 1
    DATA = 2


@dataclass(slots=True)
class Extent:
    index: int
    offset: int
    length: int
    state: ExtentState
    digest: bytes
    # set for DATA extents (extent_hasher leaves it None where the digest matches the
    # basis); valid until the iterator advances
    data: memoryview | None


@dataclass(slots=True)
class Unchanged:
    """``count`` extents from ``first`` whose digests (``DIGEST_SIZE`` bytes each) equal
    the basis: what a differential scan gives for them instead of an Extent each
    (``extent_hasher.iter_extents_against``). A scan's walk visits every extent of the
    image; as one object each, a GiB costs 16,384 of them and ~15 ms of the scan thread's
    time under the lock the event loop shipping the changes also needs, and a 100 GiB disk
    a second and a half of it per cycle."""

    first: int
    count: int
    digests: bytes


def _read_chunk(
    fd: int, size: int, extent_size: int, first: int, count: int, buf: bytearray
) -> list[Extent]:
    """Read and classify ``count`` extents from ``first`` into ``buf`` (runs in a worker)."""
    view = memoryview(buf)
    off = first * extent_size
    want = min(count * extent_size, size - off)
    got = os.preadv(fd, [view[:want]], off)
    if got < want:  # file shrank under us: the rest reads as zeros
        view[got:want] = zeros(want - got)
    out: list[Extent] = []
    for k in range(count):
        e_off = off + k * extent_size
        e_len = min(extent_size, size - e_off)
        piece = view[k * extent_size : k * extent_size + e_len]
        if buf.startswith(zeros(e_len), k * extent_size):  # memcmp in place, no copy
            out.append(Extent(first + k, e_off, e_len, ExtentState.ZERO, zero_digest(e_len), None))
        else:
            out.append(
                Extent(first + k, e_off, e_len, ExtentState.DATA, extent_digest(piece), piece)
            )
    return out


@dataclass(slots=True)
class Holes:
    """``count`` extents from ``first`` that are holes: never read, all zeros. What a scan
    gives for a hole instead of an Extent each: a 2 TiB sparse image is 33 million
    extents, and a Python object apiece cost its first sync about a minute."""

    first: int
    count: int


def hole_digests(size: int, extent_size: int, first: int, count: int) -> bytes:
    """The digests of ``count`` hole extents from ``first`` of a volume of ``size`` bytes
    (those of zeros; the volume's last extent may be short)."""
    if count <= 0:
        return b""
    tail = min(extent_size, size - (first + count - 1) * extent_size)
    return zero_digest(extent_size) * (count - 1) + zero_digest(tail)


def digest_runs(
    old: bytes | bytearray, new: bytes | bytearray, block: int
) -> Iterator[tuple[int, int, bool]]:
    """(first, end, same) runs of extents, in order and covering all of ``new``: whether
    their digests in ``old`` (``DIGEST_SIZE`` bytes each; shorter where a basis ends, and
    past its end nothing is the same) equal those in ``new``. Compared ``block`` extents at
    a time, one by one only inside a block that differs."""
    count, known = len(new) // DIGEST_SIZE, min(len(old), len(new)) // DIGEST_SIZE
    start, same = 0, True
    for lo in range(0, known, block):
        hi = min(known, lo + block)
        if old[lo * DIGEST_SIZE : hi * DIGEST_SIZE] == new[lo * DIGEST_SIZE : hi * DIGEST_SIZE]:
            if not same:
                yield start, lo, False
                start, same = lo, True
            continue
        for k in range(lo, hi):
            at = k * DIGEST_SIZE
            equal = old[at : at + DIGEST_SIZE] == new[at : at + DIGEST_SIZE]
            if equal != same:
                if k > start:
                    yield start, k, same
                start, same = k, equal
    if known < count and same:  # past the basis nothing is the same
        if known > start:
            yield start, known, True
        start, same = known, False
    if count > start:
        yield start, count, same


def iter_runs(
    fd: int, size: int, extent_size: int = DEFAULT_EXTENT, workers: int = 2, *, first: int = 0
) -> Iterator[Extent | Holes]:
    """Every extent of ``fd`` up to ``size`` (from extent ``first`` on), in order, with its
    state and digest; a run of holes as one ``Holes``.

    Holes are not read. Data is read and hashed a chunk at a time by ``workers`` threads
    (pread and blake3 release the GIL), a couple of chunks ahead of the consumer. An
    extent's ``data`` view is valid until the iterator moves past its chunk.
    """
    jobs = list(plan_reads(data_ranges(fd, size), size, extent_size, first))
    ahead = workers  # chunks being read while the consumer works on one
    buffers = [bytearray(READ_CHUNK) for _ in range(ahead + 2)]
    pending: collections.deque[Future[list[Extent]]] = collections.deque()
    reads = [(k, first, count) for k, (read, first, count) in enumerate(jobs) if read]
    submitted = 0
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scan") as pool:

        def submit_more(limit: int) -> None:
            nonlocal submitted
            while submitted < len(reads) and len(pending) < limit:
                _, first, count = reads[submitted]
                buf = buffers[submitted % len(buffers)]
                pending.append(pool.submit(_read_chunk, fd, size, extent_size, first, count, buf))
                submitted += 1

        submit_more(ahead + 1)
        for read, first, count in jobs:
            if not read:
                yield Holes(first, count)
                continue
            chunk = pending.popleft().result()
            yield from chunk
            submit_more(ahead + 1)  # the buffer of the chunk just consumed is free again


def iter_extents(
    fd: int, size: int, extent_size: int = DEFAULT_EXTENT, workers: int = 2, *, first: int = 0
) -> Iterator[Extent]:
    """``iter_runs`` one extent at a time, holes too (``ExtentState.HOLE``)."""
    for run in iter_runs(fd, size, extent_size, workers, first=first):
        if isinstance(run, Extent):
            yield run
            continue
        for idx in range(run.first, run.first + run.count):
            off = idx * extent_size
            length = min(extent_size, size - off)
            yield Extent(idx, off, length, ExtentState.HOLE, zero_digest(length), None)


# the symbols already loaded into this process (libc among them): find_library("c") would
# run `ldconfig -p` in a subprocess at import, ~20 ms of every command's start
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (pwrite may write less than asked)."""
    n = os.pwrite(fd, data, offset)
    if n == len(data):
        return  # the usual case, without a view (one per captured write)
    if n <= 0:
        raise OSError(errno.EIO, "pwrite wrote nothing")
    view = memoryview(data)[n:]
    offset += n
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, "pwrite wrote nothing")
        view = view[n:]
        offset += n


def pread_all(fd: int, length: int, offset: int) -> bytes:
    """Up to ``length`` bytes at ``offset``; fewer only at the end of the file."""
    parts: list[bytes] = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            break
        parts.append(chunk)
        length -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its mode flags (Python's os.posix_fallocate has none)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# what fallocate(2) answers when a file system lacks a mode: fall back to writing zeros
NO_FALLOCATE = frozenset(
    {errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL, errno.ENODEV}
)


def write_zeros(fd: int, offset: int, length: int) -> None:
    """Write zeros over a range (the fallback where no fallocate mode does it)."""
    end = offset + length
    while offset < end:
        n = min(READ_CHUNK, end - offset)
        pwrite_all(fd, zeros(n), offset)
        offset += n


class Zeroing:
    """Makes ranges of files on one file system read as zeros, deallocated (``punch``) or
    allocated (``zero``), as the journal's TRIM and ZERO records say (journal/records.py).

    What the file system lacks is learnt on its first refusal and not asked again: the
    NBD shim keeps one per export, where a refused ``fallocate`` per small request would
    be a system call wasted each time. The fallbacks only ever keep more allocated than
    asked, never less, and always leave the range reading as zeros.
    """

    __slots__ = ("can_allocate", "can_punch", "can_zero_range")

    def __init__(self) -> None:
        self.can_punch = True
        self.can_zero_range = True
        self.can_allocate = True

    def punch(self, fd: int, offset: int, length: int) -> bool:
        """Deallocate a range (size unchanged). True when it was punched; False when the
        file system cannot, and the range was zeroed in place instead (``zero``)."""
        if length <= 0:
            return True
        if self.can_punch:
            try:
                fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return True
            except OSError as exc:
                if exc.errno not in NO_FALLOCATE:
                    raise
                self.can_punch = False
        self.zero(fd, offset, length)
        return False

    def zero(self, fd: int, offset: int, length: int) -> None:
        """Zero a range and keep it allocated (size unchanged): ``FALLOC_FL_ZERO_RANGE``
        (ext4, XFS: the blocks become unwritten extents, no data is written); else a
        punched hole allocated again (tmpfs); else zeros written (a file system
        with no fallocate modes: as costly as writing the range, as the source did)."""
        if length <= 0:
            return
        if self.can_zero_range:
            try:
                fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as exc:
                if exc.errno not in NO_FALLOCATE:
                    raise
                self.can_zero_range = False
        if self.can_punch and self.can_allocate:
            try:
                fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            except OSError as exc:
                if exc.errno not in NO_FALLOCATE:
                    raise
                self.can_punch = False
            else:
                try:  # a hole now, reading as zeros: allocate it again
                    fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length)
                    return
                except OSError as exc:
                    if exc.errno not in NO_FALLOCATE:
                        raise
                    self.can_allocate = False
        write_zeros(fd, offset, length)


def zero_in_place(fd: int, offset: int, length: int) -> None:
    """Zero a range and keep it allocated (reads as zeros, size unchanged)."""
    Zeroing().zero(fd, offset, length)


# FS_IOC_FIEMAP = _IOWR('f', 11, struct fiemap): the extents a file system holds for a file
_FS_IOC_FIEMAP: Final = 0xC020660B
_FIEMAP_HEAD: Final = struct.Struct("=QQIIII")  # start, length, flags, mapped, count, reserved
_FIEMAP_EXTENT: Final = struct.Struct("=QQQ16xI12x")  # logical, physical, length, flags
_FIEMAP_EXTENT_LAST: Final = 0x1
_FIEMAP_BATCH: Final = 512  # extents asked per call (28 KiB of buffer)
# FIEMAP refused: no such ioctl on this file system (tmpfs, FUSE, NFS)
_NO_FIEMAP: Final = frozenset({errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS, errno.EINVAL})


def allocated_ranges(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The (start, end) ranges within ``[start, end)`` that the file system holds blocks
    for, in order and merged: written data, and also unwritten extents (made by
    ``fallocate``, ``FALLOC_FL_ZERO_RANGE`` or ``preallocation=falloc``) and delayed
    allocations, which SEEK_DATA on ext4 and XFS calls holes. Asked with FIEMAP; where the
    file system has none, SEEK_DATA/SEEK_HOLE answer (tmpfs keeps fallocated pages as
    data); where neither does, all of the range is taken as allocated (a range taken
    as allocated is kept allocated on the replica: more space, never less)."""
    out: list[tuple[int, int]] = []
    pos = start
    buf = bytearray(_FIEMAP_HEAD.size + _FIEMAP_BATCH * _FIEMAP_EXTENT.size)
    while pos < end:
        _FIEMAP_HEAD.pack_into(buf, 0, pos, end - pos, 0, 0, _FIEMAP_BATCH, 0)
        try:
            fcntl.ioctl(fd, _FS_IOC_FIEMAP, buf)
        except OSError as exc:
            if exc.errno not in _NO_FIEMAP:
                raise
            return _seek_data_ranges(fd, start, end)
        mapped = _FIEMAP_HEAD.unpack_from(buf)[3]
        if not mapped:
            break
        flags, was = 0, pos
        for k in range(mapped):
            logical, _, length, flags = _FIEMAP_EXTENT.unpack_from(
                buf, _FIEMAP_HEAD.size + k * _FIEMAP_EXTENT.size
            )
            lo, hi = max(logical, start), min(logical + length, end)
            if hi > lo:
                if out and out[-1][1] >= lo:
                    out[-1] = (out[-1][0], max(out[-1][1], hi))
                else:
                    out.append((lo, hi))
            pos = max(pos, logical + length)
        if flags & _FIEMAP_EXTENT_LAST or pos <= was:
            break
    return out


def _seek_data_ranges(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """``allocated_ranges`` by SEEK_DATA/SEEK_HOLE (all of it where unsupported)."""
    out: list[tuple[int, int]] = []
    pos = start
    try:
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos
                    break
                raise
            if data >= end:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            out.append((data, hole))
            pos = hole
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        return [(start, end)] if end > start else []
    return out


def split_by(
    ranges: list[tuple[int, int]], start: int, end: int
) -> Iterator[tuple[int, int, bool]]:
    """``[start, end)`` as (offset, length, inside) runs in order: whether each lies in
    ``ranges`` (sorted, disjoint (start, end) pairs, as ``allocated_ranges`` gives)."""
    pos = start
    for lo, hi in ranges:
        lo, hi = max(lo, start), min(hi, end)
        if hi <= lo:
            continue
        if lo > pos:
            yield pos, lo - pos, False
        yield lo, hi - lo, True
        pos = hi
    if end > pos:
        yield pos, end - pos, False
