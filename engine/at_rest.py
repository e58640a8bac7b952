"""Status read from the files at rest: what ``replicator status`` says when nothing runs.

Nothing here locks, creates or repairs anything: journals are walked read-only
(``journal/inspect.py``), state files are only read. The dicts use the keys of the live
snapshots (engine/status.py) where the figure exists at rest, plus ``"source": "files"``.

* a sender's state folder: the job (``sender.json``, else the folder's name), the
  journal's LSN range and size, the last epoch (``manifests.state``). Whether the receiver
  applied what the journal holds is not known without it: ``lag.at_most`` says how much
  it can be at most (every record still in the journal, since the oldest one's time);
* a receiver's state folder: per job, what ``applied.state`` says (applied LSN,
  consistency point and its source time, generation, an apply left unfinished), the
  receive journal's last LSN, and ``promoted.state`` (a failover made the replica the
  primary copy: state ``promoted``, when and at which generation, and the way back).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from replicator.engine import direct_intent, lost_records, replica_state
from replicator.engine.control import SENDER_CLAIM, SOCKET_NAME, read_claim
from replicator.engine.errors import ConfigError
from replicator.engine.failback_state import describe, load_marker
from replicator.engine.generations import PEER_FILE, load_promotion
from replicator.engine.manifest import ManifestSet
from replicator.engine.names import check_job_name
from replicator.engine.peer_applied import PeerApplied, load_peer_applied
from replicator.engine.replica_files import FILE_NAME as REPLICA_FILES_NAME
from replicator.engine.replica_files import ReplicaFiles
from replicator.engine.served_alone import load_served_alone
from replicator.engine.source_clock import lag_seconds
from replicator.engine.status import ReceiverPhase, iso_time, promotion_fields
from replicator.journal.durable import StateFileError
from replicator.journal.inspect import JournalReport, SegmentInfo, runs_kept, scan_journal
from replicator.journal.records import EncodedRecord
from replicator.journal.segment import HEADER_BYTES, SegmentReader

NOT_RUNNING = "not_running"


def is_sender_state(folder: Path) -> bool:
    """Whether ``folder`` is a sender's --state-dir: it holds what every sender that ran
    there leaves (at rest, any other folder would read as a job with nothing to replicate,
    a lag of 0)."""
    marks = (SENDER_CLAIM, "journal", "manifests.state", PEER_FILE, SOCKET_NAME)
    return (
        folder.is_dir()
        and not is_receiver_job_state(folder)  # it has a journal too
        and not is_receiver_state(folder)  # and a control socket
        and any((folder / mark).exists() for mark in marks)
    )


def is_receiver_job_state(folder: Path) -> bool:
    """Whether ``folder`` is one job's folder in a receiver's state folder."""
    return any((folder / mark).exists() for mark in (replica_state.FILE_NAME, REPLICA_FILES_NAME))


def is_receiver_state(folder: Path) -> bool:
    """Whether ``folder`` is a receiver's state folder: a job folder in it holds what the
    receiver keeps for every job it applied to (``applied.state``, ``files.state``)."""
    marks = (replica_state.FILE_NAME, REPLICA_FILES_NAME)
    try:
        jobs = [p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        return False
    return any((job / mark).exists() for job in jobs for mark in marks)


def sender_at_rest(state_dir: Path) -> dict[str, Any]:
    """A sender's status (one job) from its state folder."""
    now = time.time()
    claim = read_claim(state_dir) or {}
    job = claim.get("job") if isinstance(claim.get("job"), str) else None
    report = _journal(state_dir / "journal")
    manifests, manifest_problem = _manifests(state_dir / "manifests.state")
    heard = load_peer_applied(state_dir)
    first = report.first_lsn if report is not None else None
    last = report.last_lsn if report is not None else None
    records = report.records if report is not None else 0
    used = report.total_bytes if report is not None else 0
    pending = _unapplied(report, heard) if report is not None else Unapplied(0, 0, None)
    if manifests is not None:  # and what a cycle shipped without the journal
        pending = _with_notes(pending, state_dir, manifests.lsn, manifests.extent_size, heard)
    trimmed_below = first if first is not None else (report.next_lsn if report else 1)
    # received and trimmed here, but not applied when last heard: their age is gone with
    # them, so no bound is known (it said "at most 6 records, 3.3 s" with 54 such records
    # and a point 20 s old on the receiver)
    unknown = (
        f"the receiver held LSN {heard.lsn + 1} to {trimmed_below - 1} unapplied when this "
        "sender last heard from it, and this journal no longer holds them (it had received "
        "them)"
        if heard is not None and trimmed_below > heard.lsn + 1
        else None
    )
    entry: dict[str, Any] = {
        "job": job or state_dir.name,
        "job_from": "sender.json" if job else "folder name",
        "role": "sender",
        "source": "files",
        "state": NOT_RUNNING,
        "capture": claim.get("capture"),
        "peer": claim.get("peer"),
        "volumes": claim.get("volumes"),
        "connected": False,
        "last_pid": claim.get("pid"),
        "last_run": last_run(claim),
        "lsn": {
            "journaled": last if last is not None else (report.next_lsn - 1 if report else 0),
            # records below the journal's first were trimmed: the receiver had them
            "trimmed_below": trimmed_below,
        },
        "lag": {
            "records": None,
            "bytes": None,
            "seconds": None,
            # the receiver may have applied any of these since this sender last heard;
            # None before any sync from this folder completed: the replica may lack anything;
            # and while records it had not applied are no longer here (``not_known``)
            "at_most": None
            if manifests is None or unknown is not None
            else {
                "records": pending.records,
                "bytes": pending.bytes,
                "seconds": (
                    round(max(0.0, now - pending.oldest_ts / 1e9), 3) if pending.oldest_ts else 0.0
                ),
            },
            "not_known": unknown,
        },
        # what the receiver had applied when this sender last heard from it
        "applied_heard": (
            None if heard is None else {"lsn": heard.lsn, "at": iso_time(heard.at_ns)}
        ),
        "journal": {
            "bytes": used,
            "records": records,
            "problem": report.problem.describe() if report and report.problem else None,
        },
        "last_epoch": manifests.epoch if manifests is not None else 0,
        "manifests": (
            {
                "lsn": manifests.lsn,
                "epoch": manifests.epoch,
                "extent_size": manifests.extent_size,
                "disks": sorted(manifests.disks),
                "files": sorted(manifests.files),
            }
            if manifests is not None
            else None
        ),
        "manifests_problem": manifest_problem,
    }
    if entry["last_run"] is not None and entry["last_run"]["error"]:
        entry["last_error"] = entry["last_run"]["error"]
    alone = load_served_alone(state_dir)  # the next session checks the receiver against it
    entry["served_alone"] = None if alone is None else {"since_lsn": alone}
    entry["compare_pending"] = lost_records.load(state_dir)  # the next cycle compares
    marker = load_marker(state_dir)  # a planned failover or a failback (failback_state.py)
    if marker is not None:
        entry["state"] = "handed_over" if marker.phase == "handed-over" else "failback_incomplete"
        entry["role_change"] = {
            "phase": marker.phase,
            "note": describe(marker),
            "next": "replicator failback --from HOST:PORT --job JOB VOLUME... (send refuses "
            "until it has run)",
        }
    return {"role": "sender", "running": False, "state_dir": str(state_dir), "jobs": [entry]}


def last_run(claim: dict[str, Any]) -> dict[str, Any] | None:
    """How the last sender of a state folder ended, from its claim (``sender.json``,
    ``SenderClaim.record_end``): ``ok``, ``failed`` (with its error and exit code),
    ``unrecorded`` (killed, or the machine stopped, before it could say) or ``unknown``
    (a release from before 2026-12-07 ran it: it never said, however it ended). None
    before any."""
    started = claim.get("started")
    if not isinstance(started, int | float):
        return None
    ended = claim.get("ended")
    error = claim.get("error")
    said = isinstance(ended, int | float)
    return {
        "started": iso_time(int(started * 1e9)),
        "ended": iso_time(int(ended * 1e9)) if isinstance(ended, int | float) else None,
        "outcome": ("failed" if error else "ok")
        if said
        else ("unrecorded" if claim.get("records_end") else "unknown"),
        "error": str(error) if error else None,
        "exit_code": claim.get("exit_code") if error else None,
    }


def receiver_jobs_at_rest(
    state_root: Path, skip: set[str] | None = None, replica_root: Path | None = None
) -> list[dict[str, Any]]:
    """Each job's status from ``state_root/JOB`` (those named in ``skip`` left out); with
    ``replica_root`` (the receiver's --dir), its replica files are compared with their
    stamps too, as a failover would."""
    now = time.time()
    jobs: list[dict[str, Any]] = []
    try:
        entries = sorted(p for p in state_root.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError as exc:
        raise ConfigError(
            f"cannot read receiver state folder {state_root}: {exc.strerror}",
            hint="check the path and its permissions",
        ) from exc
    for folder in entries:
        job = folder.name
        try:
            check_job_name(job)
        except ConfigError:
            continue
        if skip and job in skip:
            continue
        has_state = (folder / replica_state.FILE_NAME).exists()
        if not has_state and not (folder / "journal").is_dir():
            continue
        saved = replica_state.load(folder, job) if has_state else None
        files = ReplicaFiles.load(folder, job)
        diverged = dict(files.diverged)
        if replica_root is not None:
            diverged.update(changed_behind(replica_root / job, files))
        # every barrier past the applied LSN is read: the job's opening applies up to it
        report = _journal(folder / "journal", verify_after=saved.applied_lsn if saved else 0)
        last = report.last_lsn if report is not None and report.last_lsn is not None else 0
        older = ""
        if saved is not None and report is not None:  # put back from an older copy?
            first, runs = runs_kept(report, saved.applied_lsn)
            saved, older = replica_state.against_journal(folder, saved, first, runs)
        point = replica_state.recovered(  # as JobReplica.open will take it
            folder,
            saved,
            files_damaged=replica_state.files_loss(
                folder, saved, damaged=files.damaged, found=files.found, lost=files.lost
            ),
            first_lsn=report.trim_floor if report is not None else 1,
            next_lsn=last + 1,
        )
        applied = point.applied_lsn
        received = max(applied, last)
        finished = point.consistent and not point.applying
        consistent = finished and not diverged  # a file changed behind it holds no point
        promotion = load_promotion(folder)  # failover: the replica is the primary copy now
        # a complete epoch durable past the applied point (the receiver stopped before it
        # applied it): its start, or a failover at rest, applies up to it first
        pending = _pending_barrier(report, applied) if promotion is None and not diverged else 0
        # on this target's clock, and never negative (engine/source_clock.py)
        age = lag_seconds(int(now * 1e9), point.point_ts_ns, point.point_target_ns)
        # promoted.state is written before applied.state's generation (a crash between
        # them is finished when the job is opened): the promotion's is the one that counts
        generation = max(point.generation, promotion.generation if promotion else 0)
        jobs.append(
            {
                "job": job,
                "role": "receiver",
                "source": "files",
                "state": str(ReceiverPhase.PROMOTED) if promotion is not None else NOT_RUNNING,
                "connected": False,
                "generation": generation,
                **promotion_fields(job, promotion),
                "lsn": {"received": received, "applied": applied},
                "lag": {
                    "records": max(0, received - applied),
                    "seconds": round(age, 3) if age is not None else None,
                },
                "source_clock_offset_seconds": None,  # only a session's Pings tell it
                "consistency_point": {
                    "lsn": point.point_lsn,
                    "source_time": iso_time(point.point_ts_ns),
                    "consistent": consistent,
                    "floor_lsn": point.floor_ahead,
                    "unknown": point.unknown or None,
                    "pending_lsn": pending or None,
                },
                "diverged": diverged,
                # an apply was cut short, or one is due: the receiver does it when it starts
                "recovery_pending": not finished or bool(pending),
                "state_file": (
                    "ok" if saved is not None and not older else ("damaged" if has_state else None)
                ),
                "journal": {
                    "bytes": report.total_bytes if report is not None else 0,
                    "problem": report.problem.describe() if report and report.problem else None,
                },
            }
        )
    return jobs


def receiver_at_rest(state_root: Path, replica_root: Path | None = None) -> dict[str, Any]:
    return {
        "role": "receiver",
        "running": False,
        "state_dir": str(state_root),
        "jobs": receiver_jobs_at_rest(state_root, replica_root=replica_root),
    }


def changed_behind(replica_dir: Path, files: ReplicaFiles) -> dict[str, str]:
    """The stamped files of ``replica_dir`` that are not as replication left them: path ->
    what happened (``ReplicaFiles.changed``). Read only; a file that cannot be looked at
    counts as missing."""

    def lstat(path: str) -> os.stat_result | None:
        try:
            return os.lstat(replica_dir / path)
        except OSError:
            return None

    return files.changed(lstat)


def _journal(path: Path, verify_after: int | None = None) -> JournalReport | None:
    if not path.is_dir():
        return None
    try:
        return scan_journal(path, verify_sealed=False, verify_after=verify_after)
    except OSError:
        return None


def _pending_barrier(report: JournalReport | None, applied: int) -> int:
    """The last barrier a receiver's journal holds past ``applied`` (0: none, or a damaged
    journal, which the job's opening reports instead of applying)."""
    if report is None or (report.problem is not None and report.problem.fatal):
        return 0
    barrier = report.last_barrier
    return barrier if barrier > applied else 0


def _manifests(path: Path) -> tuple[ManifestSet | None, str | None]:
    try:
        return ManifestSet.load(path), None
    except (StateFileError, OSError) as exc:
        return None, str(exc)


@dataclass(frozen=True, slots=True)
class Unapplied:
    """Journaled records the receiver may not have applied: count, record bytes, and the
    source time (ns) of the oldest (None: none, or unreadable)."""

    records: int
    bytes: int
    oldest_ts: int | None


def _with_notes(
    pending: Unapplied, state_dir: Path, since: int, extent_size: int, heard: PeerApplied | None
) -> Unapplied:
    """``pending`` with what ``direct.intent`` notes past ``heard``: records shipped without
    the journal that the receiver may not have applied, sent again by the next cycle. Notes
    that cannot be read count nothing here (the next cycle compares with the replica)."""
    try:
        notes = direct_intent.load(state_dir, extent_size)
    except direct_intent.IntentDamaged:
        return pending
    if notes is None or notes.since != since:
        return pending
    applied = heard.lsn if heard is not None else 0
    records = sum(
        last - max(first, applied + 1) + 1 for first, last in notes.lsns if last > applied
    )
    if not records:
        return pending
    oldest = min(notes.created_ns, pending.oldest_ts or notes.created_ns)
    return Unapplied(pending.records + records, pending.bytes + notes.touched.bytes, oldest)


def _unapplied(report: JournalReport, heard: PeerApplied | None) -> Unapplied:
    """What is journaled past ``heard`` (everything when None). A record counts as applied
    when its LSN is at most the one heard and it was journaled before it was heard: a
    segment wholly below that LSN is judged by its first record alone, the segment holding
    the LSN record by record, and one that cannot be read counts whole."""
    records = size = 0
    oldest: int | None = None
    for info in report.segments:
        if not info.count:
            continue
        first: list[EncodedRecord] = []
        counted: list[EncodedRecord] | None = None  # None: the whole segment counts
        if heard is not None and info.last_lsn <= heard.lsn:
            first = _read_encoded(info, budget=1)
            if first and first[0].ts_ns <= heard.at_ns:
                continue  # applied (a newer first record: a journal begun again)
        elif heard is not None and info.first_lsn <= heard.lsn:
            stored = _read_encoded(info, budget=info.records_end)
            if len(stored) == info.count:
                counted = [r for r in stored if r.lsn > heard.lsn or r.ts_ns > heard.at_ns]
        if counted is not None:
            records += len(counted)
            size += sum(len(r.raw) + len(r.payload) for r in counted)
            first = counted[:1]
        else:
            records += info.count
            size += info.records_end - HEADER_BYTES
            if oldest is None and not first:
                first = _read_encoded(info, budget=1)
        if oldest is None and first:
            oldest = first[0].ts_ns
    return Unapplied(records, size, oldest)


def _read_encoded(info: SegmentInfo, *, budget: int) -> list[EncodedRecord]:
    """Up to ``budget`` bytes of ``info``'s records from its start; [] when unreadable (a
    damaged journal gives no figure rather than no status)."""
    try:
        reader = SegmentReader(info.path, info.base_lsn)
    except OSError:
        return []
    try:
        return reader.read_encoded(info.records_end, budget=budget)
    except Exception:
        return []
    finally:
        reader.close()
