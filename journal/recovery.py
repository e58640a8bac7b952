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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import structlog

from replicator.journal import durable
from replicator.journal.errors import ConfigError, JournalCorrupt, JournalError
from replicator.journal.inspect import JournalReport, Problem, SegmentInfo, scan_journal
from replicator.journal.locking import lock_directory
from replicator.journal.segment import (
    HEADER_BYTES,
    SEAL_BYTES,
    Seal,
    SegmentHeader,
    parse_segment_name,
    segment_name,
)

_IOV_MAX = 1024
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

    @property
    def next_lsn(self) -> int:
        return self.last_lsn + 1 if self.count else self.base_lsn

    @property
    def file_bytes(self) -> int:
        return self.end + (SEAL_BYTES if self.sealed else 0)

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
        )


def write_all(fd: int, parts: Sequence[bytes], offset: int) -> int:
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


def seal_and_create(directory: Path, old_fd: int, seg_end: int, seal: Seal) -> tuple[int, Path]:
    """Worker-thread half of a roll: seal + fdatasync the old segment, then create the next.

    The old fd stays open (the caller closes it once the roll succeeded).
    """
    write_all(old_fd, [seal.encode()], seg_end)
    durable.fdatasync_fd(old_fd)
    return create_segment(directory, seal.next_lsn)


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


def recover(
    directory: Path, on_damage: OnDamage, discard_below: int
) -> tuple[list[SegmentFile], int, Recovery | None]:
    """Open-time recovery (worker thread): verify, cut a torn tail (and, with ``on_damage``
    "cut", damage), make everything durable.

    Returns the segments (the last one active), a writable fd of the active segment and
    what was cut.
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
        if problem.fatal:
            log_safely(
                "error",
                "journal.damage_cut",
                segment=str(problem.path),
                offset=problem.offset,
                reason=problem.reason,
                dropped_bytes=dropped,
                dropped_segments=files,
                next_lsn=next_base,
            )
        else:
            log_safely(
                "warning",
                "journal.tail_truncated",
                segment=str(problem.path),
                offset=problem.offset,
                reason=problem.reason,
                dropped_bytes=dropped,
            )
    segments = [SegmentFile.from_info(info) for info in report.segments]
    if segments and not segments[-1].sealed:
        active = segments[-1]
        fd = os.open(active.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            durable.fdatasync_fd(fd)  # whatever a dead writer left in the page cache
        except BaseException:
            os.close(fd)
            raise
        return segments, fd, recovery
    base = segments[-1].next_lsn if segments else next_base
    fd, path = create_segment(directory, base)
    segments.append(SegmentFile(path, base, 0, 0, 0, HEADER_BYTES, HEADER_BYTES, False))
    return segments, fd, recovery


def log_safely(level: str, event: str, **fields: Any) -> None:
    """Log, but never let a broken log sink (closed stderr) stop recovery or error handling."""
    with contextlib.suppress(OSError, ValueError):
        getattr(_log, level)(event, **fields)
