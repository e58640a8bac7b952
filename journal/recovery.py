"""The journal's files: segments as the writer keeps them, and open-time recovery.

``Journal`` (journal.py) owns the in-memory side (staging, group commit, readers); this
module owns what happens to the files before it starts and when it rolls: creating and
sealing segments durably, and recovery at open, which verifies the segments, cuts a torn
tail (a crash: records never synced) and, on request, damage (synced bytes that no longer
check out), and tells the caller which it was (``Recovery``). Blocking: called from worker
threads.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import structlog

from replicator.journal import durable
from replicator.journal.errors import ConfigError, JournalCorrupt, JournalError, JournalNewer
from replicator.journal.inspect import JournalReport, Problem, SegmentInfo, scan_journal
from replicator.journal.locking import lock_directory
from replicator.journal.segment import (
    FLAG_REUSED,
    HEADER_BYTES,
    SEAL_BYTES,
    Seal,
    SegmentHeader,
    is_spare_name,
    parse_segment_name,
    segment_name,
    spare_name,
)

_IOV_MAX = 1024
MAX_SPARES = 2  # trimmed segment files kept for reuse (each about segment_bytes)
_log = structlog.get_logger()


@dataclass(slots=True, eq=False)
class SegmentFile:
    path: Path
    base_lsn: int
    count: int
    first_lsn: int
    last_lsn: int
    end: int  # header + records written to the file (staged bytes not included)
    durable_end: int  # bytes below this offset are on stable storage
    sealed: bool
    created: bool = True  # False while a roll is still creating the file
    size: int = 0  # the file's size: at least ``end``; more while a reused file's old bytes last
    readers: int = 0  # SegmentReaders open on the file (no roll writes over it while one is)
    retired: bool = False  # trimmed: no reader may open it any more

    def __post_init__(self) -> None:
        self.size = max(self.size, self.end)

    @property
    def next_lsn(self) -> int:
        return self.last_lsn + 1 if self.count else self.base_lsn

    @property
    def file_bytes(self) -> int:
        return self.end + SEAL_BYTES if self.sealed else self.size

    @classmethod
    def from_info(cls, info: SegmentInfo) -> SegmentFile:
        return cls(
            info.path,
            info.base_lsn,
            info.count,
            info.first_lsn,
            info.last_lsn,
            info.records_end,
            info.records_end,
            info.sealed,
            size=info.size,
        )


@dataclass(frozen=True, slots=True)
class Spare:
    """A trimmed segment's file, renamed, waiting to become a new segment.

    ``read_by`` is the trimmed segment when a reader still had its file open at the trim:
    the file is kept (renaming an open file does not disturb its reader), but no roll
    writes over it until that reader has closed it (``free``).
    """

    path: Path
    size: int
    read_by: SegmentFile | None = field(default=None, compare=False)

    @property
    def free(self) -> bool:
        return self.read_by is None or self.read_by.readers == 0


def write_all(fd: int, parts: Sequence[bytes | memoryview], offset: int) -> int:
    """pwritev ``parts`` at ``offset`` completely (short writes resumed); returns the bytes."""
    total = 0
    index = 0
    carry: list[bytes | memoryview] = []  # what a short write left of the last batch
    while carry or index < len(parts):
        fresh = parts[index : index + _IOV_MAX - len(carry)]
        index += len(fresh)
        batch = [*carry, *fresh]
        want = sum(len(p) for p in batch)
        n = os.pwritev(fd, batch, offset + total)
        if n <= 0 and want:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        total += n
        carry = []
        if n < want:
            for k, part in enumerate(batch):
                if n < len(part):
                    carry = [memoryview(part)[n:], *batch[k + 1 :]]
                    break
                n -= len(part)
    return total


def create_segment(directory: Path, base_lsn: int) -> tuple[int, Path]:
    """Create a segment holding only its header, durably (file and directory entry)."""
    path = directory / segment_name(base_lsn)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        write_all(fd, [SegmentHeader(base_lsn, time.time_ns()).encode()], 0)
        durable.fdatasync_fd(fd)
        durable.sync_dir(directory)
    except BaseException:
        os.close(fd)
        raise
    return fd, path


def reuse_segment(directory: Path, spare: Spare, base_lsn: int) -> tuple[int, Path]:
    """Make ``spare`` the segment starting at ``base_lsn``, durably, keeping its blocks.

    The new header (REUSED set) and the zeroed last ``SEAL_BYTES`` (so the old seal can
    never be read as this segment's) are made durable under the spare's name first; only
    then is the file renamed into the journal. A crash before the rename leaves a spare, one
    after it a segment whose old bytes recovery cuts like a torn tail.
    """
    fd = os.open(spare.path, os.O_RDWR | os.O_CLOEXEC)
    try:
        header = SegmentHeader(base_lsn, time.time_ns(), FLAG_REUSED).encode()
        write_all(fd, [header], 0)
        if spare.size >= HEADER_BYTES + SEAL_BYTES:
            write_all(fd, [bytes(SEAL_BYTES)], spare.size - SEAL_BYTES)
        durable.fdatasync_fd(fd)
        path = directory / segment_name(base_lsn)
        os.rename(spare.path, path)
        durable.sync_dir(directory)
    except BaseException:
        os.close(fd)
        raise
    return fd, path


def seal_and_create(
    directory: Path, old_fd: int, seg_end: int, seal: Seal, spare: Spare | None
) -> tuple[int, Path, int]:
    """Worker-thread half of a roll: seal + fdatasync the old segment, then create the next
    (in ``spare``'s file when given). Returns the new segment's fd, path and file size.

    The old file is cut right after its seal (a reused file may hold more), so that the seal
    is its last bytes. The old fd stays open (the caller closes it once the roll succeeded).
    """
    write_all(old_fd, [seal.encode()], seg_end)
    if os.fstat(old_fd).st_size > seg_end + SEAL_BYTES:
        os.ftruncate(old_fd, seg_end + SEAL_BYTES)
    durable.fdatasync_fd(old_fd)
    if spare is None:
        fd, path = create_segment(directory, seal.next_lsn)
        return fd, path, HEADER_BYTES
    fd, path = reuse_segment(directory, spare, seal.next_lsn)
    return fd, path, spare.size


def retire_segments(directory: Path, paths: list[Path], keep: list[Path]) -> None:
    """Trim's file work: each of ``paths`` (oldest first) is deleted, or renamed to its
    spare name when listed in ``keep``; each made durable before the next, so a crash
    leaves a contiguous suffix of segments."""
    for path in paths:
        if path in keep:
            os.rename(path, spare_path(path))
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        durable.sync_dir(directory)


def spare_path(segment: Path) -> Path:
    """Where a trimmed segment waits for reuse: its name with the spare suffix."""
    base = parse_segment_name(segment.name)
    if base is None:
        raise ValueError(f"{segment} is not a segment file")
    return segment.with_name(spare_name(base))


def cut_to_end(fd: int, end: int) -> None:
    """Cut the active segment's file to its records (a clean close of a reused file), so
    the next open finds nothing after them."""
    if os.fstat(fd).st_size > end:
        os.ftruncate(fd, end)
        durable.fdatasync_fd(fd)


def adopt_spares(directory: Path) -> list[Spare]:
    """The spare files of ``directory`` to reuse, at most MAX_SPARES, largest first; the
    others (more than a journal keeps, or too short to hold a header and a seal) are
    deleted. A spare's contents never matter: reuse rewrites what a reader could see."""
    found: list[Spare] = []
    for entry in os.scandir(directory):
        if is_spare_name(entry.name) and entry.is_file(follow_symlinks=False):
            found.append(Spare(Path(entry.path), entry.stat(follow_symlinks=False).st_size))
    found.sort(key=lambda s: (-s.size, s.path.name))
    keep = [s for s in found if s.size >= HEADER_BYTES + SEAL_BYTES][:MAX_SPARES]
    extra = [s for s in found if s not in keep]
    for spare in extra:
        os.unlink(spare.path)
    if extra:
        durable.sync_dir(directory)
    return keep


def prepare_dir(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"journal path {directory} exists and is not a directory")
    durable.makedirs_durable(directory)


def lock_dir(directory: Path) -> int:
    fd = lock_directory(directory)
    if fd is None:
        raise JournalError(
            f"journal {directory} is already open",
            hint="another replicator process (or Journal object) is using it",
        )
    return fd


OnDamage = Literal["refuse", "cut"]


@dataclass(frozen=True, slots=True)
class Recovery:
    """What open-time recovery cut away; ``Journal.recovery`` (None when nothing was cut).

    ``kind`` "torn_tail": records that were never synced (a crash). "damage": bytes that
    were synced once no longer check out; every record from ``next_lsn`` on is gone, and
    the caller must get them back from somewhere else (a receiver from its sender, a
    sender from its volumes).
    """

    kind: Literal["torn_tail", "damage"]
    path: str
    offset: int
    reason: str
    dropped_bytes: int
    dropped_segments: int
    next_lsn: int


def _discard_below(directory: Path, lsn: int) -> None:
    """Delete segments whose successor starts at or below ``lsn`` (all their records are
    below it), oldest first, without reading them: they are never needed again, so damage
    in them must not cost the records after them."""
    names = sorted(
        (base, entry.name)
        for entry in os.scandir(directory)
        if (base := parse_segment_name(entry.name)) is not None
    )
    for (_, name), (next_base, _) in itertools.pairwise(names):
        if next_base > lsn:
            break
        os.unlink(directory / name)
        durable.sync_dir(directory)


def _cut(directory: Path, report: JournalReport, problem: Problem) -> tuple[int, int]:
    """Remove everything from ``problem`` on: later segments newest first (a crash midway
    leaves a prefix, and the next open finds the same problem and finishes), then the
    problem segment from the bad offset (the whole file when its header is bad).
    Returns (bytes dropped, segment files removed)."""
    index = next(i for i, s in enumerate(report.segments) if s.path == problem.path)
    target, later = report.segments[index], report.segments[index + 1 :]
    dropped = sum(s.size for s in later)
    for seg in reversed(later):
        os.unlink(seg.path)
        durable.sync_dir(directory)
    if problem.offset < HEADER_BYTES:
        os.unlink(target.path)
        durable.sync_dir(directory)
        return dropped + target.size, len(later) + 1
    fd = os.open(target.path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, problem.offset)
        durable.fdatasync_fd(fd)
    finally:
        os.close(fd)
    return dropped + max(0, target.size - problem.offset), len(later)


@dataclass(slots=True)
class Recovered:
    """What ``recover`` hands the journal."""

    segments: list[SegmentFile]  # the last one active
    fd: int  # writable, of the active segment
    recovery: Recovery | None  # what was cut
    spares: list[Spare]


def recover(directory: Path, on_damage: OnDamage, discard_below: int) -> Recovered:
    """Open-time recovery (worker thread): verify, cut a torn tail (and, with ``on_damage``
    "cut", damage), make everything durable, adopt the spare files.
    """
    if discard_below > 1:
        _discard_below(directory, discard_below)
    # "cut" verifies every record now: damage found later, while reading, would end the
    # session that reads it, while at open it costs one cut and a re-fetch
    report = scan_journal(directory, verify_sealed=on_damage == "cut")
    problem = report.problem
    recovery: Recovery | None = None
    next_base = report.segments[0].base_lsn if report.segments else 1
    if problem is not None:
        if problem.newer:  # a newer release's records are not ours to cut
            raise JournalNewer(problem.path, problem.offset, problem.reason)
        if problem.fatal and on_damage == "refuse":
            raise JournalCorrupt(problem.path, problem.offset, problem.reason)
        cut_seg = next(s for s in report.segments if s.path == problem.path)
        next_base = cut_seg.base_lsn
        dropped, files = _cut(directory, report, problem)
        report = scan_journal(directory, verify_sealed=False)
        if report.problem is not None:  # the cut left only checked bytes: never expected
            raise JournalCorrupt(report.problem.path, report.problem.offset, report.problem.reason)
        if report.segments:
            next_base = report.segments[-1].next_lsn
        recovery = Recovery(
            "damage" if problem.fatal else "torn_tail",
            str(problem.path),
            problem.offset,
            problem.reason,
            dropped,
            files,
            next_base,
        )
        where = {
            "segment": str(problem.path),
            "offset": problem.offset,
            "reason": problem.reason,
            "dropped_bytes": dropped,
        }
        if problem.fatal:
            log_safely(
                "error", "journal.damage_cut", **where, dropped_segments=files, next_lsn=next_base
            )
        elif cut_seg.reused:
            # the end of a reused file's records: what follows may be unsynced writes or
            # the file's earlier contents, which are there after every crash
            log_safely("info", "journal.reused_tail_cut", **where)
        else:
            log_safely("warning", "journal.tail_truncated", **where)
    spares = adopt_spares(directory)
    segments = [SegmentFile.from_info(info) for info in report.segments]
    # The segment a writer may not have synced: the last one (a roll syncs the segment
    # it seals before it creates the next). Whatever a dead writer left of it in the
    # page cache is made durable, and written again first: a failed fsync (the writer's,
    # which is why it stopped) may have left clean pages that never reached the disk,
    # and an fdatasync alone would count them (durable.rewrite_durably)
    active_fd: int | None = None
    if segments:
        last = segments[-1]
        fd = os.open(last.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            durable.rewrite_durably(fd, last.end + (SEAL_BYTES if last.sealed else 0))
        except OSError as exc:
            os.close(fd)
            if exc.filename is None:  # an fsync's error names no file: say which it was
                raise OSError(exc.errno, exc.strerror, str(last.path)) from exc
            raise
        except BaseException:
            os.close(fd)
            raise
        if last.sealed:
            os.close(fd)
        else:
            active_fd = fd
    if active_fd is not None:
        return Recovered(segments, active_fd, recovery, spares)
    base = segments[-1].next_lsn if segments else next_base
    fd, path = create_segment(directory, base)
    segments.append(SegmentFile(path, base, 0, 0, 0, HEADER_BYTES, HEADER_BYTES, False))
    return Recovered(segments, fd, recovery, spares)


def log_safely(level: str, event: str, **fields: Any) -> None:
    """Log, but never let a broken log sink (closed stderr) stop recovery or error handling."""
    with contextlib.suppress(OSError, ValueError):
        getattr(_log, level)(event, **fields)
