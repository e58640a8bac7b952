"""Read-only examination of a journal directory.

``scan_journal`` walks the segment files in LSN order and reports what it finds and the
first problem. It never modifies anything: ``replicator journal inspect`` prints its report,
and ``Journal.open`` runs the same walk and then acts on it: a torn tail of the last
segment (the unsynced writes of a crash) is cut off; any other problem is damage, which
open refuses, or cuts away when its caller can fetch the lost records again (see
``Journal.open``'s ``on_damage``).

A bad record in the last segment is a torn tail only when no intact record follows it:
an intact record behind it proves the bad bytes were once written and synced.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from replicator.journal.errors import JournalError
from replicator.journal.records import CHECKSUM_NAMES
from replicator.journal.segment import (
    HEADER_BYTES,
    SEAL_BYTES,
    NewerSegmentFormat,
    Seal,
    SegmentFormatError,
    SegmentHeader,
    SegmentReader,
    find_valid_record,
    is_spare_name,
    parse_segment_name,
    read_exact,
    scan_segment,
)


@dataclass(slots=True)
class SegmentInfo:
    """One segment file as found on disk."""

    name: str
    path: Path
    base_lsn: int
    size: int  # file bytes
    sealed: bool = False
    reused: bool = False  # the header's REUSED flag: the file held an earlier segment
    verified: bool = False  # every record was read and checked
    count: int = 0
    first_lsn: int = 0
    last_lsn: int = 0
    records_end: int = HEADER_BYTES  # offset just after the last good record
    by_type: Counter[str] = field(default_factory=Counter)
    by_version: Counter[int] = field(default_factory=Counter)  # record format versions
    last_barrier: int = 0  # the last FLUSH or EPOCH record's LSN, when ``verified`` (0: none)

    @property
    def next_lsn(self) -> int:
        return self.last_lsn + 1 if self.count else self.base_lsn

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.name,
            "base_lsn": self.base_lsn,
            "first_lsn": self.first_lsn if self.count else None,
            "last_lsn": self.last_lsn if self.count else None,
            "records": self.count,
            "bytes": self.size,
            "sealed": self.sealed,
            "reused": self.reused,
            "verified": self.verified,
            "by_type": dict(sorted(self.by_type.items())) if self.verified else None,
            "by_format_version": _versions(self.by_version) if self.verified else None,
        }


@dataclass(frozen=True, slots=True)
class Problem:
    """The first thing found wrong. ``fatal`` False: a torn tail that open would cut off."""

    path: Path
    offset: int
    reason: str
    fatal: bool
    newer: bool = False  # a newer replicator's format: neither read nor cut (upgrade docs)

    def describe(self) -> str:
        if self.newer:
            return (
                f"{self.path} at offset {self.offset}: {self.reason}; this release "
                "neither reads it nor cuts it (run the release that wrote it: going back "
                "is not supported)"
            )
        action = (
            "damage: records are never skipped: open refuses the journal or, where the lost "
            "records can be had again (a receiver asks its sender), cuts it here"
            if self.fatal
            else "torn tail: the next open cuts the segment here (unsynced writes of a crash, "
            "or the earlier contents of a reused file)"
        )
        return f"{self.path} at offset {self.offset}: {self.reason}; {action}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": str(self.path),
            "offset": self.offset,
            "reason": self.reason,
            "fatal": self.fatal,
            "newer": self.newer,
            "description": self.describe(),
        }


@dataclass(slots=True)
class JournalReport:
    path: Path
    segments: list[SegmentInfo] = field(default_factory=list)
    problem: Problem | None = None
    ignored: list[str] = field(default_factory=list)  # files that are not segments
    spares: list[str] = field(default_factory=list)  # trimmed segments kept for reuse

    @property
    def records(self) -> int:
        return sum(s.count for s in self.segments)

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.segments)

    @property
    def by_type(self) -> Counter[str]:
        return sum((s.by_type for s in self.segments), Counter())

    @property
    def by_version(self) -> Counter[int]:
        return sum((s.by_version for s in self.segments), Counter())

    @property
    def last_barrier(self) -> int:
        """The last barrier's LSN among the segments read record by record (0: none)."""
        return max((s.last_barrier for s in self.segments if s.verified), default=0)

    @property
    def trim_floor(self) -> int:
        """Records below this LSN were trimmed (or never existed)."""
        return self.segments[0].base_lsn if self.segments else 1

    @property
    def first_lsn(self) -> int | None:
        return next((s.first_lsn for s in self.segments if s.count), None)

    @property
    def last_lsn(self) -> int | None:
        return next((s.last_lsn for s in reversed(self.segments) if s.count), None)

    @property
    def next_lsn(self) -> int:
        return self.segments[-1].next_lsn if self.segments else 1

    @property
    def clean(self) -> bool:
        return self.problem is None and bool(self.segments)

    def to_dict(self) -> dict[str, Any]:
        all_verified = all(s.verified for s in self.segments)
        return {
            "path": str(self.path),
            "clean": self.clean,
            "segments": [s.to_dict() for s in self.segments],
            "records": self.records,
            "bytes": self.total_bytes,
            "by_type": dict(sorted(self.by_type.items())) if all_verified else None,
            "by_format_version": _versions(self.by_version) if all_verified else None,
            "first_lsn": self.first_lsn,
            "last_lsn": self.last_lsn,
            "next_lsn": self.next_lsn,
            "trim_floor": self.trim_floor,
            "last_segment_sealed": bool(self.segments) and self.segments[-1].sealed,
            "problem": self.problem.to_dict() if self.problem else None,
            "ignored_files": self.ignored,
            "spare_files": self.spares,
        }


def _segment_files(path: Path) -> tuple[list[tuple[int, str]], list[str], list[str]]:
    """(segments as (base LSN, name), spare file names, names of other entries)."""
    found: list[tuple[int, str]] = []
    spares: list[str] = []
    ignored: list[str] = []
    for entry in os.scandir(path):
        base = parse_segment_name(entry.name)
        if not entry.is_file(follow_symlinks=False):
            ignored.append(entry.name)
        elif base is not None:
            found.append((base, entry.name))
        elif is_spare_name(entry.name):
            spares.append(entry.name)
        else:
            ignored.append(entry.name)
    found.sort()
    return found, sorted(spares), sorted(ignored)


def scan_journal(
    path: str | os.PathLike[str], *, verify_sealed: bool = True, verify_after: int | None = None
) -> JournalReport:
    """Walk the journal at ``path`` and report segments and the first problem; read-only.

    With ``verify_sealed`` False only the header and seal of sealed segments are read,
    except those holding records after LSN ``verify_after`` (so ``last_barrier`` knows
    every barrier after it). The last segment is always scanned record by record.
    """
    report = JournalReport(Path(path))
    files, report.spares, report.ignored = _segment_files(report.path)
    expect_base: int | None = None

    def problem(
        info: SegmentInfo, offset: int, reason: str, fatal: bool, newer: bool = False
    ) -> None:
        if report.problem is None:
            report.problem = Problem(info.path, offset, reason, fatal or newer, newer)

    for index, (name_base, name) in enumerate(files):
        last = index == len(files) - 1
        seg_path = report.path / name
        fd = os.open(seg_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            info = SegmentInfo(name, seg_path, name_base, size)
            report.segments.append(info)
            try:
                header = SegmentHeader.decode(read_exact(fd, HEADER_BYTES, 0))
            except NewerSegmentFormat as exc:  # checksum intact: not a torn header
                problem(info, 0, str(exc), fatal=True, newer=True)
                continue
            except SegmentFormatError as exc:
                problem(info, 0, str(exc), fatal=not last)
                continue
            info.reused = header.reused
            if header.base_lsn != name_base:
                problem(info, 0, f"header says base LSN {header.base_lsn}", fatal=True)
            if expect_base is not None and name_base != expect_base:
                what = "gap" if name_base > expect_base else "overlap"
                problem(
                    info,
                    0,
                    f"LSN {what}: segment starts at {name_base}, previous ends before "
                    f"{expect_base}",
                    fatal=True,
                )
            if last:
                _scan_last(fd, info, problem)
            else:
                _check_sealed(fd, info, verify_sealed, problem, verify_after)
            expect_base = info.next_lsn
        finally:
            os.close(fd)
    return report


def add_run(runs: list[tuple[int, int]], first: int, last: int) -> None:
    """Append the LSNs ``first`` to ``last`` to ``runs`` (ascending), joined to the last
    run when they follow it."""
    if runs and runs[-1][1] + 1 == first:
        runs[-1] = (runs[-1][0], last)
    else:
        runs.append((first, last))


def runs_kept(report: JournalReport, after: int) -> tuple[int, list[tuple[int, int]]]:
    """Read-only: what a receiver's ``Journal.open`` (``discard_below=after + 1``,
    ``on_damage="cut"``) would hold of the journal ``report`` describes: its first stored
    LSN (its next LSN when it holds none) and the runs ``(first, last)`` of its LSNs above
    ``after``, as ``Journal.runs_after(after)`` would give them. Segments the open discards
    unread are left out, and so is everything from the first problem on (the open cuts
    there; a record that cannot be read here counts as one). Only a segment whose LSNs
    do not follow each other, or whose records the scan did not check, is read."""
    segments = report.segments
    start = 0  # recovery._discard_below: a segment whose successor starts at or below
    while start + 1 < len(segments) and segments[start + 1].base_lsn <= after + 1:
        start += 1
    problem = report.problem
    first: int | None = None
    runs: list[tuple[int, int]] = []
    for info in segments[start:]:
        cut = problem is not None and info.path == problem.path
        if cut and problem is not None:  # the open keeps the records before it
            lsns = _lsns(info, problem.offset)
        elif not info.verified and info.count:  # the open verifies it: read it all
            lsns = _lsns(info, info.records_end)
            cut = len(lsns) != info.count
        elif info.count and info.last_lsn - info.first_lsn + 1 != info.count:
            lsns = _lsns(info, info.records_end) if info.last_lsn > after else [info.first_lsn]
        else:  # none, or one run
            lsns = []
            if info.count:
                first = info.first_lsn if first is None else first
            if info.count and info.last_lsn > after:
                add_run(runs, max(info.first_lsn, after + 1), info.last_lsn)
        for lsn in lsns:
            first = lsn if first is None else first
            if lsn > after:
                add_run(runs, lsn, lsn)
        if cut:
            break
    return (first if first is not None else report.next_lsn), runs


def _lsns(info: SegmentInfo, end: int) -> list[int]:
    """The LSNs of ``info``'s records up to offset ``end``, those before the first that
    cannot be read."""
    lsns: list[int] = []
    try:
        reader = SegmentReader(info.path, info.base_lsn)
    except OSError:
        return lsns
    try:
        while reader.offset < end:
            batch = reader.read_encoded(end)
            if not batch:
                break
            lsns.extend(record.lsn for record in batch)
    except (JournalError, OSError):
        pass
    finally:
        reader.close()
    return lsns


def _scan_last(fd: int, info: SegmentInfo, problem: Any) -> None:
    scan = scan_segment(fd, info.size, info.base_lsn, allow_seal=True)
    info.count, info.first_lsn, info.last_lsn = scan.count, scan.first_lsn, scan.last_lsn
    info.records_end, info.by_type, info.by_version = scan.end, scan.by_type, scan.by_version
    info.last_barrier = scan.last_barrier
    info.sealed = scan.seal is not None
    info.verified = True
    if scan.problem is not None and scan.problem_offset is not None and scan.newer:
        problem(info, scan.problem_offset, scan.problem, True, True)
    elif scan.problem is not None and scan.problem_offset is not None:
        after = find_valid_record(
            fd, scan.problem_offset, info.size, scan.last_lsn if scan.count else info.base_lsn - 1
        )
        if after is None:
            problem(info, scan.problem_offset, scan.problem, False)
        else:
            offset, lsn = after
            reason = (
                f"{scan.problem}; an intact record (lsn {lsn}) follows at offset {offset}, "
                "so these bytes were synced once: damage, not a torn tail"
            )
            problem(info, scan.problem_offset, reason, True)


def _check_sealed(
    fd: int, info: SegmentInfo, verify: bool, problem: Any, verify_after: int | None = None
) -> None:
    info.sealed = True
    if info.size < HEADER_BYTES + SEAL_BYTES:
        problem(info, info.size, "sealed segment is too short to hold its seal", True)
        return
    seal_at = info.size - SEAL_BYTES
    try:
        seal = Seal.decode(read_exact(fd, SEAL_BYTES, seal_at))
    except SegmentFormatError as exc:
        problem(info, seal_at, f"{exc} (a segment followed by another must be sealed)", True)
        return
    info.count, info.first_lsn, info.last_lsn = seal.count, seal.first_lsn, seal.last_lsn
    info.records_end = seal_at
    if seal.records_bytes != seal_at - HEADER_BYTES:
        problem(info, seal_at, f"seal says {seal.records_bytes} record bytes", True)
    elif seal.next_lsn != info.next_lsn or (seal.count and seal.first_lsn < info.base_lsn):
        problem(info, seal_at, f"seal LSNs {seal} do not fit base {info.base_lsn}", True)
    if not verify and (verify_after is None or not info.count or info.last_lsn <= verify_after):
        return
    scan = scan_segment(fd, seal_at, info.base_lsn, allow_seal=False)
    info.by_type, info.by_version = scan.by_type, scan.by_version
    info.last_barrier = scan.last_barrier
    info.verified = True
    if scan.problem is not None and scan.problem_offset is not None:
        problem(info, scan.problem_offset, scan.problem, True, scan.newer)
    elif (scan.count, scan.first_lsn, scan.last_lsn) != (seal.count, seal.first_lsn, seal.last_lsn):
        problem(
            info,
            seal_at,
            f"records ({scan.count}, lsn {scan.first_lsn}..{scan.last_lsn}) do not match the "
            f"seal ({seal.count}, lsn {seal.first_lsn}..{seal.last_lsn})",
            True,
        )


def _versions(counts: Counter[int]) -> dict[str, int]:
    """JSON's object keys are strings."""
    return {str(version): count for version, count in sorted(counts.items())}


def format_report(report: JournalReport) -> str:
    """Plain-text rendering (the CLI uses it when stdout is not a terminal)."""
    lines = [f"journal {report.path}"]
    lines.append(
        f"{'file':<26} {'first_lsn':>12} {'last_lsn':>12} {'records':>9} {'bytes':>12}  state"
    )
    for s in report.segments:
        first = str(s.first_lsn) if s.count else "-"
        last = str(s.last_lsn) if s.count else "-"
        state = "sealed" if s.sealed else "active"
        lines.append(f"{s.name:<26} {first:>12} {last:>12} {s.count:>9} {s.size:>12}  {state}")
    by_type = ", ".join(f"{k} {v}" for k, v in sorted(report.by_type.items())) or "none"
    lines.append(f"records: {report.records}  bytes: {report.total_bytes}  by type: {by_type}")
    if report.by_version:
        formats = ", ".join(
            f"{version} ({CHECKSUM_NAMES.get(version, '?')}) {count}"
            for version, count in sorted(report.by_version.items())
        )
        lines.append(f"record format versions: {formats}")
    lines.append(
        f"lsn: first {report.first_lsn or '-'}  last {report.last_lsn or '-'}  next "
        f"{report.next_lsn}  trim floor {report.trim_floor}"
    )
    if report.spares:
        lines.append(f"spare files (trimmed, kept for reuse): {', '.join(report.spares)}")
    if report.ignored:
        lines.append(f"ignored files: {', '.join(report.ignored)}")
    if not report.segments:
        lines.append("problem: no segment files: not a journal directory")
    elif report.problem:
        lines.append(f"problem: {report.problem.describe()}")
    else:
        lines.append("problem: none (every record verified)")
    return "\n".join(lines)
