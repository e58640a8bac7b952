"""What the receiver knows durably about one job's replica: ``applied.state``.

A state file (``journal/durable.py`` framing: magic, version, checksum) holding a msgpack
map:

- ``job`` (str): the job name (a sanity check against a moved folder);
- ``applied_lsn`` (int): every record up to it is in the replica files and fsynced;
- ``consistent`` (bool): the replica files are exactly the state at ``point_lsn``. False
  while an apply is under way, and after records past the last barrier were applied
  (``--resync`` comparisons): recovery must roll forward before anyone reads or promotes
  the replica;
- ``applying`` (bool): an apply round was under way: the files may hold writes past
  ``applied_lsn`` and past their stamps in ``files.state``;
- ``point_lsn`` (int): the last consistency point (EPOCH or FLUSH) fully applied;
- ``point_ts_ns`` (int): the source's wall-clock time of that point (0: unknown);
- ``point_target_ns`` (int, absent in files from before it was kept: 0): the same time on
  the target's clock, the stamp less the source clock's offset the session estimated, and
  never later than when the target applied the point (``engine/source_clock.py``). The
  lag counts from it: the source's own stamp is an hour off when its clock is;
- ``generation`` (int): the replica's history generation (failover bumps it; see
  docs/PROTOCOL.md); carried in Welcome;
- ``point_floor`` (int): no barrier below it ends a consistency point. A sender raises it
  (PointFloor, docs/PROTOCOL.md) when this replica lacks records it cannot send again:
  barriers it journaled after them would describe a state the replica never held. The
  next comparing session's floor replaces it (``JobReplica.raise_point_floor``);
- ``unknown`` (str, absent when empty): why what the replica files hold cannot be vouched
  for: this file was found damaged, or missing where the job has a history (see
  ``rebuilt``), or ``files.state`` was (``files_lost``). No barrier ends a consistency
  point while it is set, plain sessions are refused, and the PointFloor of a session that
  compares (``send --resync``) clears it (``JobReplica.raise_point_floor``).

Write order around an apply round: ``applying`` True (and ``consistent`` False) durably
*before* the first replica byte is written; then the records; fsync of the replica files;
``files.state``; and only then this file with the new ``applied_lsn``, ``applying`` False
and ``consistent`` True when the round ended on a barrier. So a crash anywhere in between
leaves ``applying`` set, and the redo of the journal (records after ``applied_lsn`` up to
the next complete barrier) is not optional.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from replicator.journal.durable import StateFileError, read_state, write_state

log = structlog.get_logger()

FILE_NAME = "applied.state"
FILES_STATE = "files.state"  # engine/replica_files.py (which imports nothing of this)


@dataclass(frozen=True, slots=True)
class ReplicaState:
    applied_lsn: int = 0
    consistent: bool = True
    applying: bool = False
    point_lsn: int = 0
    point_ts_ns: int = 0
    generation: int = 0
    point_target_ns: int = 0  # point_ts_ns on the target's clock (0: not known)
    point_floor: int = 0
    unknown: str = ""
    # ``files.state`` existed when this file was saved: without it now, it was lost (a
    # file that was never written, a job without a history, is not missing)
    # (what ``save`` finds on disk, not this object's: left out of comparisons)
    stamped: bool = dataclasses.field(default=False, compare=False)

    def ends_point(self, barrier_lsn: int) -> bool:
        """Whether applying the barrier at ``barrier_lsn`` makes a consistency point."""
        return barrier_lsn >= self.point_floor and not self.unknown

    @property
    def floor_ahead(self) -> int | None:
        """The point floor while it is what keeps the replica from being consistent (no
        barrier at or above it applied yet); None otherwise. For status."""
        return self.point_floor if self.point_floor > self.applied_lsn else None

    def replace(self, **changes: int | bool | str) -> ReplicaState:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def load(state_dir: Path, job: str) -> ReplicaState | None:
    """The saved state, or None when there is none or it cannot be trusted (logged)."""
    path = state_dir / FILE_NAME
    try:
        raw = read_state(path)
    except (StateFileError, OSError) as exc:
        log.error(
            "receiver.state_damaged",
            job=job,
            path=str(path),
            error=str(exc),
            action="recovering from the journal; records it lacks are asked from the sender",
        )
        return None
    if raw is None:
        return None
    try:
        state = ReplicaState(
            applied_lsn=_int(raw, "applied_lsn"),
            consistent=bool(raw.get("consistent", True)),
            applying=bool(raw.get("applying", False)),
            point_lsn=_int(raw, "point_lsn", _int(raw, "applied_lsn")),
            point_ts_ns=_int(raw, "point_ts_ns", 0),
            generation=_int(raw, "generation", 0),
            point_floor=_int(raw, "point_floor", 0),
            unknown=_text(raw, "unknown"),
            point_target_ns=_int(raw, "point_target_ns", 0),
            stamped=raw.get("stamped", False) is True,
        )
    except (TypeError, ValueError) as exc:
        log.error("receiver.state_damaged", job=job, path=str(path), error=str(exc))
        return None
    return state


def rebuilt(state_dir: Path, *, damaged: bool, applied: int, empty: bool) -> ReplicaState:
    """The state to start from when ``load`` had none: ``applied`` is what the journal says
    was applied (everything below its first record: trim follows the state write), and
    ``empty`` whether it holds records to apply again.

    A new job has no file and a journal that starts at lsn 1: exactly known. A damaged
    file, or a missing one where the journal was trimmed already (so the file existed),
    loses what only it held: whether the replica was at a consistency point, its point
    floor, its generation. Claiming a point there could put a VM on a disk that never
    existed (a comparison cut short, records lost), so the replica is *unknown* until a
    sender compares it (DRBD, with its metadata lost, will not call a disk UpToDate either).
    """
    if damaged or applied > 0:
        why = (
            f"its replica state ({state_dir / FILE_NAME}) was damaged"
            if damaged
            else f"its replica state ({state_dir / FILE_NAME}) is missing"
        )
        return ReplicaState(
            applied,
            consistent=False,
            applying=not empty,
            unknown=f"{why}: what the replica holds cannot be vouched for",
        )
    return ReplicaState(applied, consistent=empty, applying=not empty)


def against_journal(
    state_dir: Path, saved: ReplicaState, first_lsn: int, runs: Sequence[tuple[int, int]]
) -> tuple[ReplicaState, str]:
    """``saved`` (``applied.state``) checked against the receive journal: its first stored
    LSN and the runs ``(first, last)`` of its LSNs above ``saved.applied_lsn``
    (``Journal.runs_after``; at rest ``journal.inspect.runs_kept``). Returns the state to
    start from and why ``saved`` is older than the journal (empty: it is not, and the state
    is ``saved``). The one place that says so: ``JobReplica.open`` (and so failover) and
    status at rest both ask it.

    The records past the applied LSN are redone at open, in order: that is exact only when
    the journal holds every one of them. LSNs the journal skips past the applied one were
    written straight into the replica (a first sync, a comparison of a replica that never
    held a point) and ``applied.state`` moved past them as they were: a file that is
    behind them was put back from an older copy, and its redo would write the journal's
    older records over the newer bytes. A gap below the point floor is the records the
    replica lost (PointFloor), not this.

    Such a file is taken as damaged (``older_than_journal``), and the redo starts after
    the last LSNs the journal skips: records go straight into the replica only once the
    journal holds none unapplied (``JobReplica._direct_count``), so every record before
    them was applied before they were written."""
    expected = max(saved.applied_lsn + 1, first_lsn)
    skipped: tuple[int, int] | None = None  # the first LSNs skipped
    after = 0  # the last LSN skipped
    for first, last in runs:
        if last < expected:
            continue
        if first > expected and saved.point_floor <= expected:
            skipped = skipped or (expected, first - 1)
            after = first - 1
        expected = last + 1
    if skipped is None:
        return saved, ""
    why = (
        f"lsn {skipped[0]} to {skipped[1]} were applied without the journal after the lsn "
        f"{saved.applied_lsn} it names"
    )
    return older_than_journal(state_dir, after, why), why


def older_than_journal(state_dir: Path, applied: int, why: str) -> ReplicaState:
    """The state to start from when the saved one is older than the journal (``why``: put
    back from an older copy) and the journal skips LSNs up to ``applied``: as for a
    damaged file, the replica is unknown until a sender compares it, and the records the
    journal holds after ``applied`` are applied again."""
    return ReplicaState(
        applied,
        consistent=False,
        applying=True,
        unknown=f"its replica state ({state_dir / FILE_NAME}) is older than its journal "
        f"({why}: put back from an older copy?): what the replica holds cannot be vouched for",
    )


def files_lost(state: ReplicaState, why: str, *, history: bool) -> ReplicaState:
    """``state`` once ``files.state`` (the stamps that tell an edit of the replica outside
    replication, and the files already found edited) could not be read (``why``): unknown
    as well, unless the job has no history yet (nothing was written to stamp). Saved
    before ``files.state`` is written again, or the evidence would go with the file."""
    if state.unknown or not history:
        return state
    return state.replace(
        consistent=False,
        unknown=f"its replica file stamps were lost ({why}): a change made to the replica "
        "outside replication can no longer be told",
    )


def recovered(
    state_dir: Path,
    saved: ReplicaState | None,
    *,
    files_damaged: str,
    first_lsn: int,
    next_lsn: int,
) -> ReplicaState:
    """The state a job opens with, from what ``load`` gave (``saved``), why ``files.state``
    vouches for nothing (``files_loss``; empty: it does) and its journal's first stored LSN
    and next LSN. The one place that says so: ``JobReplica.open`` and status at rest both
    ask it."""
    state = saved
    if state is None:
        state = rebuilt(
            state_dir,
            damaged=(state_dir / FILE_NAME).exists(),
            applied=max(0, first_lsn - 1),
            empty=first_lsn >= next_lsn,
        )
    if files_damaged:
        history = state.applied_lsn > 0 or state.applying or next_lsn > 1
        state = files_lost(state, files_damaged, history=history)
    return state


def files_loss(
    state_dir: Path, saved: ReplicaState | None, *, damaged: str, found: bool, lost: str
) -> str:
    """Why ``files.state`` cannot tell an edit of the replica (empty: it can), from what
    ``ReplicaFiles.load`` found: it is ``damaged``; or missing (not ``found``) where
    ``applied.state`` says it was saved (deleted, or left out of a restore: as lost as a
    damaged one, not a job that never had stamps); or its stamps were taken after the
    earlier ones were ``lost`` and no sender has compared the replica since (kept in
    ``files.state`` itself, so an older ``applied.state`` put back, without ``unknown``,
    does not make the replica trusted again)."""
    if damaged:
        return damaged
    if lost:
        return lost
    if not found and saved is not None and saved.stamped:
        return f"{state_dir / FILES_STATE} is missing"
    return ""


def save(state_dir: Path, job: str, state: ReplicaState) -> None:
    """Durably replace the state file (blocking: run it in a worker thread)."""
    saved: dict[str, object] = {
        "job": job,
        "applied_lsn": state.applied_lsn,
        "consistent": state.consistent,
        "applying": state.applying,
        "point_lsn": state.point_lsn,
        "point_ts_ns": state.point_ts_ns,
        "generation": state.generation,
        "point_floor": state.point_floor,
    }
    if state.point_target_ns:
        saved["point_target_ns"] = state.point_target_ns
    if state.unknown:
        saved["unknown"] = state.unknown
    # files.state is always saved before this file in an apply round: said here, its loss
    # can be told from a job that never had one (``recovered``)
    if os.path.lexists(state_dir / FILES_STATE):
        saved["stamped"] = True
    write_state(state_dir / FILE_NAME, saved)


def _text(raw: dict[str, object], key: str) -> str:
    value = raw.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"{key} is {value!r}, not a text")
    return value


def _int(raw: dict[str, object], key: str, default: int | None = None) -> int:
    value = raw.get(key, default)
    if type(value) is not int or (value < 0 and key.endswith("_lsn")):
        raise ValueError(f"{key} is {value!r}, not a valid {key}")
    return value
