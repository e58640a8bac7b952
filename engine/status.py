"""One status object per job and side: what ``replicator status``, the metrics and (later)
failover read.

The engine *pushes* the few facts only it knows when they change (the job's state, the
initial sync's progress, errors by kind, the peer) and the status *pulls* everything else
from the engine's own objects when a snapshot is taken (LSNs from the journal and the link,
byte counters from the connection, journal use, lag). So the write path (NBD requests, FUSE
operations, records applied) pays nothing for it.

A snapshot is a plain JSON-ready dict; its keys are documented in ``docs/OPERATIONS.md``
("Status") and are what ``status --json`` prints and the metrics export.

Pushed facts also tell ``listeners`` (the embedding API's events, ``engine/api.py``): a
listener is called on the event loop, inline, with the job and what changed (one of
``CHANGES``); it must not block, and an error in one is logged, never raised into the engine.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from replicator.engine.source_clock import lag_seconds, missing_seconds

if TYPE_CHECKING:
    from replicator.engine.generations import Promotion
    from replicator.engine.in_flight import InFlightBudget
    from replicator.engine.link import Link
    from replicator.engine.replica_files import ReplicaFiles
    from replicator.engine.replica_state import ReplicaState
    from replicator.engine.tls import TlsIdentity
    from replicator.journal import Journal
    from replicator.transport import FramedConnection
    from replicator.transport.shaper import Shaping


class ReplicaView(Protocol):
    """What a receiver's status reads of a job's replica (``receiver.JobReplica``)."""

    job: str
    state: ReplicaState
    files: ReplicaFiles
    journal: Journal
    failure: BaseException | None
    promotion: Promotion | None  # set while the job is promoted (failover)
    source_offset_ns: int | None  # the source clock's offset, as estimated (source_clock.py)
    point_applied_mono: float | None  # when this process applied the point (monotonic)

    @property
    def received_lsn(self) -> int: ...

    @property
    def applied_lsn(self) -> int: ...


log = structlog.get_logger()

LAGGING_SECONDS = 10.0  # lag above this (with a live link) makes a sender "lagging"
_RATE_WINDOW = 10.0  # seconds of byte-counter history behind the rates


class SenderPhase(StrEnum):
    STARTING = "starting"
    CONNECTING = "connecting"  # no link, retrying
    # the receiver refused the job (diverged, auth, its storage...: ``last_error`` says
    # which); a live capture goes on serving its VM and asks again, backing off
    REFUSED = "refused"
    INITIAL_SYNC = "initial_sync"
    REPLICATING = "replicating"
    LAGGING = "lagging"  # replicating, but the lag is above LAGGING_SECONDS
    # replicating, but the shaper's rate is 0 (`replicator rate 0`, --rate 0 or the
    # schedule's): nothing is shipped until it changes, so the lag only grows
    PAUSED = "paused"
    OVERFLOW = "overflow"  # the journal is full: changes are tracked, resynced later
    # scan capture: the pre hook (freeze) failed at the last cycle, so no consistency point
    # was taken; tried again every interval (``last_error`` says how it failed)
    HOOK_FAILED = "hook_failed"
    # scan capture: a volume was removed or replaced by something not a file during the
    # last cycle, so no point was taken; tried again, backing off (``last_error`` says which)
    VOLUME_GONE = "volume_gone"
    FENCED = "fenced"  # no lease renewal at the witness: writes held (witness_fence.py)
    # live capture: a volume no longer matches its journal (its source's fsync failed, or a
    # failed change could not be reconciled): its VM's writes are refused with EIO until
    # the sender is restarted, whose start compares everything (``last_error`` says which)
    DIVERGED = "diverged"
    STOPPING = "stopping"
    STOPPED = "stopped"


_SHIPPING = (SenderPhase.REPLICATING, SenderPhase.LAGGING)  # what a rate of 0 pauses


class ReceiverPhase(StrEnum):
    PROMOTED = "promoted"  # failover made the replica the primary copy: nothing is applied
    IDLE = "idle"  # no sender connected
    RECEIVING = "receiving"
    # no sender, and not at a consistency point (an interrupted first sync or apply)
    RECOVERING = "recovering"
    DIVERGED = "diverged"  # replica files changed outside replication (needs a --resync)
    # an apply, or the receive journal's write or fsync, failed (disk full...): the next
    # session (or a failover) reopens the job from its files and retries
    FAILED = "failed"


# What a listener is told changed: the job's state (a ``SenderPhase``), a connection that
# came or went, an error counted, the lag (records journaled, or acknowledged as applied),
# a job opened on a receiver (``StatusBoard.add``).
# a connected peer that said nothing for this long is shown as silent: the receiver pings
# every 5 s and the sender answers, so both hear each other at least that often; a link is
# declared gone only after engine/link.py's REPLY_TIMEOUT (120 s)
SILENT_AFTER = 12.0
# how a receiver job's last_error starts while an automatic failover waits (cleared once
# the job is promoted)
AUTO_FAILOVER_WAITS = "automatic failover waits"
CHANGES = ("state", "connected", "disconnected", "error", "lag", "job")
Listener = Callable[[str, str], None]  # (job, what changed)


class Listeners:
    """Who is told about pushed changes (the embedding API); nobody by default."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def add(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(job, what)`` on every change; returns the function that stops it."""
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    def tell(self, job: str, what: str) -> None:
        for listener in tuple(self._listeners):
            try:
                listener(job, what)
            except Exception:  # a listener's bug must not stop replication
                log.exception("status.listener_failed", job=job, change=what)


@dataclass(slots=True)
class _Rate:
    """Bytes per second over the last few seconds, from samples taken at snapshot time
    (``time.monotonic``: a wall clock stepped back read as no progress, forward as none)."""

    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=64))

    def update(self, total: int, now: float) -> float:
        self.samples.append((now, total))
        while len(self.samples) > 2 and now - self.samples[0][0] > _RATE_WINDOW:
            self.samples.popleft()
        t0, b0 = self.samples[0]
        return (total - b0) / (now - t0) if now > t0 else 0.0


@dataclass(slots=True)
class _Totals:
    """Bytes that connections already closed carried (the live one is added at snapshot)."""

    payload: int = 0
    wire: int = 0

    def add(self, conn: FramedConnection, sent: bool) -> None:
        stats = conn.stats
        self.payload += stats.payload_sent if sent else stats.payload_received
        self.wire += stats.payload_sent_wire if sent else stats.payload_received_wire


class SenderJobStatus:
    """A sending job, in one process (``send``)."""

    def __init__(self, job: str, capture: str, peer: str) -> None:
        self.job = job
        self.capture = capture
        self.peer = peer
        self.state = SenderPhase.STARTING
        # monotonic, as every moment this object keeps for a duration: a clock step (NTP
        # setting the wall clock an hour back) must not shrink a lag or an uptime
        self.started = time.monotonic()
        self.journal: Journal | None = None
        self.link: Link | None = None
        self.progress: tuple[int, int] | None = None  # initial sync: bytes scanned, total
        self.errors: dict[str, int] = {}
        self.last_error = ""
        self.generation = 0
        self.shaping: Shaping | None = None  # the rate in force (send --rate/--schedule)
        self.fence: Callable[[], dict[str, Any]] | None = None  # send --witness: fencing state
        self.last_epoch = 0
        # scan capture: (EPOCH LSN, monotonic time its scan began) of the points this run took,
        # newest last. A scanning sender captures nothing between its scans, so its lag
        # counts from the scan of the newest point the receiver applied
        self._points: deque[tuple[int, float]] = deque(maxlen=64)
        self.interval: float | None = None  # a continuous scanning sender's --interval
        # a live sender serving without its receiver: the LSN it began from, until a
        # session finds the receiver at or below it (engine/served_alone.py)
        self.served_alone: int | None = None
        # a live sender that has not served its VM's disks yet and cannot without its
        # receiver (--wait-for-receiver passed): why, until they are served
        self.not_served: str | None = None
        # why every basis is the replica's until a comparison completes (lost_records.py):
        # read from the state folder the sender has open (set at its connects)
        self.compare_pending: Callable[[], str | None] = lambda: None
        self._totals = _Totals()
        self._rate = _Rate()
        self._applied = 0  # the receiver's applied LSN, kept while no link is up
        self._received = 0
        # (since, beyond) when a link went with changes unapplied that are in no journal
        # here (shipped without it: a first sync, a later scan): their age counts in the
        # lag until the receiver has applied up to the LSN ``beyond`` (since: monotonic)
        self._unapplied: tuple[float, int] | None = None
        # a live sender: when the first change it tracks outside its journal (the journal
        # was full) was made (monotonic), until that change's resync is journaled
        # (JournalFirst)
        self.tracked_since: Callable[[], float | None] = lambda: None
        # a live sender: the volumes (or FUSE folder) no longer matching its journal, and
        # why (JournalFirst.diverged)
        self.diverged: Callable[[], dict[str, str]] = dict
        self.listeners = Listeners()

    # -- pushed by the engine ------------------------------------------------------------
    def changed(self, what: str) -> None:
        """Tell the listeners that ``what`` (one of ``CHANGES``) changed."""
        self.listeners.tell(self.job, what)

    def set_state(self, state: SenderPhase) -> None:
        if state is not self.state:
            self.state = state
            self.changed("state")

    def attach(self, link: Link | None) -> None:
        """The link in use (None: disconnected). A link that goes is folded into totals."""
        old = self.link
        if old is not None and old is not link:
            self._totals.add(old.conn, sent=True)
            self._applied = max(self._applied, old.applied_lsn)
            self._received = max(self._received, old.received_lsn)
            lag = old.lag()
            if lag["records"] > 0:
                since = time.monotonic() - float(lag["seconds"])
                if self._unapplied is not None:
                    since = min(since, self._unapplied[0])
                self._unapplied = (since, old.journal.last_lsn)
        self.link = link
        if link is None and self.state not in (SenderPhase.STOPPING, SenderPhase.STOPPED):
            self.state = SenderPhase.CONNECTING
        if link is not old:
            self.changed("disconnected" if link is None else "connected")

    def heard_applied(self, lsn: int) -> None:
        """The receiver applied up to ``lsn`` (as last heard, before any link of this run),
        so it had received that much too (status said "received 0, applied 15")."""
        self._applied = max(self._applied, lsn)
        self._received = max(self._received, lsn)

    def unapplied_until(self, since: float, lsn: int) -> None:
        """A change made at ``since`` (monotonic) reaches the replica only with the record
        at ``lsn`` (the barrier that closes an overflow's resync): its age counts in the
        lag until the receiver has applied that LSN."""
        if self._unapplied is not None:
            since = min(since, self._unapplied[0])
            lsn = max(lsn, self._unapplied[1])
        self._unapplied = (since, lsn)

    def point_taken(self, lsn: int, scan_began: float) -> None:
        """A scanning sender journaled a consistency point at ``lsn``, of a scan that began
        at ``scan_began`` (``time.monotonic``)."""
        self._points.append((lsn, scan_began))

    def _uncaptured_since(self, applied: int) -> float:
        """When the scan of the newest point the receiver has applied began: changes since
        may be on the source only. Before any point of this run is applied, the process's
        start (the receiver's point is older: a lower bound)."""
        points = self._points
        while len(points) > 1 and points[1][0] <= applied:
            points.popleft()
        if points and points[0][0] <= applied:
            return points[0][1]
        return self.started

    def error(self, kind: str, message: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self.last_error = message
        self.changed("error")

    # -- read at snapshot time -----------------------------------------------------------
    async def snapshot(self) -> dict[str, Any]:
        # the wall clock only against the journal's record stamps (kept across processes);
        # every moment this process noted itself is on the monotonic clock
        now, mono = time.time(), time.monotonic()
        journal, link = self.journal, self.link
        applied = max(self._applied, link.applied_lsn if link else 0)
        received = max(self._received, link.received_lsn if link else 0)
        journaled = journal.last_lsn if journal else 0
        payload, wire = self._totals.payload, self._totals.wire
        if link is not None:
            stats = link.conn.stats
            payload += stats.payload_sent
            wire += stats.payload_sent_wire
        lag_seconds = 0.0
        if link is not None:
            lag = link.lag()
            lag_seconds = float(lag["seconds"])
        elif journal is not None and journaled > applied:
            lag_seconds = await _oldest_age(journal, applied, now)
        if (
            self.capture == "scan"
            and self.interval is not None
            and self.state not in (SenderPhase.STOPPING, SenderPhase.STOPPED)
        ):  # a continuous scanning sender captures nothing between its scans: the RPO (this
            # lag plus the interval) counts from the scan of the point the receiver holds,
            # connected or not (a cycle held by a slow hook or a hung read said "lag 0.0 s"
            # while connected, its journal empty, for as long as it was stuck)
            lag_seconds = max(lag_seconds, mono - self._uncaptured_since(applied) - self.interval)
        tracked = self.tracked_since()
        if tracked is not None:  # changes in no journal yet: the replica lacks them
            lag_seconds = max(lag_seconds, mono - tracked)
        # the journal's size bounds what the receiver lacks only while everything it lacks
        # is in the journal: not where data ships around it (a scan's cycles, a first sync,
        # a link lost with such data unapplied, changes an overflow tracks)
        around = (
            self.capture == "scan"
            or self.state is SenderPhase.INITIAL_SYNC
            or self._unapplied is not None
            or tracked is not None
        )
        if self._unapplied is not None:
            since, beyond = self._unapplied
            if applied >= beyond:  # sent again, and applied
                self._unapplied = None
            else:
                lag_seconds = max(lag_seconds, mono - since)
        state = self.state
        if state is SenderPhase.REPLICATING and link is not None and lag_seconds > LAGGING_SECONDS:
            state = SenderPhase.LAGGING
        shaping = self.shaping.status() if self.shaping is not None else None
        if state in _SHIPPING and link is not None and shaping is not None and shaping["paused"]:
            state = SenderPhase.PAUSED
        fence = self.fence() if self.fence is not None else None
        if fence is not None and fence["fenced"]:
            state = SenderPhase.FENCED
        last_error = self.last_error
        diverged = self.diverged()
        if diverged and state not in (SenderPhase.STOPPING, SenderPhase.STOPPED):
            # replicating what was journaled goes on, but the VM can write nothing more
            state = SenderPhase.DIVERGED
            scope, why = next(iter(diverged.items()))
            last_error = (
                f"{scope}: {why}; its writes are refused with EIO: stop this sender and "
                "start it again (its start compares every volume with the replica)"
            )
        return {
            "job": self.job,
            "role": "sender",
            "capture": self.capture,
            "state": str(state),
            "peer": self.peer,
            "connected": link is not None,
            "peer_silent_seconds": _silent(link.conn if link is not None else None),
            "generation": self.generation,
            "lsn": {
                "journaled": journaled,
                "durable": journal.durable_lsn if journal else 0,
                "received": received,
                "applied": applied,
            },
            "lag": {
                "records": max(0, journaled - applied),
                # at most this much (the journal's size: it drops whole segments only);
                # None where data ships around the journal: no bound is known
                "bytes": None
                if around
                else (max(0, _journal_bytes(journal)) if journaled > applied else 0),
                "seconds": round(lag_seconds, 3),
            },
            "initial_sync": _progress(self.progress),
            "bytes": {"payload": payload, "wire": wire},
            "compression_ratio": round(payload / wire, 3) if wire else 1.0,
            "rate_bytes_per_second": round(self._rate.update(wire, mono), 1),
            "journal": {
                "bytes": _journal_bytes(journal),
                "cap": journal.max_bytes if journal else None,
            },
            "shaping": shaping,
            "fence": fence,
            "last_epoch": self.last_epoch,
            "served_alone": (
                None if self.served_alone is None else {"since_lsn": self.served_alone}
            ),
            "compare_pending": self.compare_pending(),
            "not_served": self.not_served,
            "errors": dict(self.errors),
            "last_error": last_error,
            "uptime_seconds": round(mono - self.started, 1),
        }


def _silent(conn: FramedConnection | None) -> float | None:
    """Seconds since the connected peer last sent anything (None: not connected)."""
    return None if conn is None else round(time.monotonic() - conn.last_received, 1)


class ReceiverJobStatus:
    """A job on a receiver (``receive``): its replica and the session feeding it."""

    def __init__(self, replica: ReplicaView) -> None:
        self.replica = replica
        self.conn: FramedConnection | None = None
        self.errors: dict[str, int] = {}
        self.last_error = ""
        self._totals = _Totals()
        self._rate = _Rate()
        self.listeners = Listeners()

    def changed(self, what: str) -> None:
        """Tell the listeners that ``what`` (one of ``CHANGES``) changed."""
        self.listeners.tell(self.replica.job, what)

    def attach(self, conn: FramedConnection | None) -> None:
        old = self.conn
        if old is not None and old is not conn:
            self._totals.add(old, sent=False)
        self.conn = conn
        if conn is not old:
            self.changed("disconnected" if conn is None else "connected")

    def error(self, kind: str, message: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self.last_error = message
        self.changed("error")

    def clear_error(self, prefix: str) -> None:
        """Forget ``last_error`` when it starts with ``prefix`` (a wait that is over; the
        counts in ``errors`` stay)."""
        if self.last_error.startswith(prefix):
            self.last_error = ""
            self.changed("error")

    async def snapshot(self) -> dict[str, Any]:
        replica, conn = self.replica, self.conn
        point = replica.state
        payload, wire = self._totals.payload, self._totals.wire
        if conn is not None:
            payload += conn.stats.payload_received
            wire += conn.stats.payload_received_wire
        if replica.promotion is not None:
            state = ReceiverPhase.PROMOTED
        elif replica.files.diverged:
            state = ReceiverPhase.DIVERGED
        elif replica.failure is not None or replica.journal.failed:
            state = ReceiverPhase.FAILED
        elif conn is not None:  # moving: between points during a round or a first sync
            state = ReceiverPhase.RECEIVING
        elif point.applying or not point.consistent:
            state = ReceiverPhase.RECOVERING
        else:
            state = ReceiverPhase.IDLE
        applied_at = replica.point_applied_mono
        point_age = lag_seconds(
            time.time_ns(),
            point.point_ts_ns,
            point.point_target_ns,
            None if applied_at is None else time.monotonic() - applied_at,
        )
        offset = replica.source_offset_ns
        return {
            "job": replica.job,
            "role": "receiver",
            "state": str(state),
            "peer": conn.peer if conn is not None else None,
            "connected": conn is not None,
            "peer_silent_seconds": _silent(conn),
            "generation": point.generation,
            **promotion_fields(replica.job, replica.promotion),
            "lsn": {"received": replica.received_lsn, "applied": replica.applied_lsn},
            "lag": {
                "records": max(0, replica.received_lsn - replica.applied_lsn),
                # seconds since the consistency point the replica holds, on this target's
                # clock (the source's stamp less its clock's offset), and never less than
                # since it was applied here (engine/source_clock.py)
                "seconds": round(point_age, 3) if point_age is not None else None,
            },
            # the source's clock less this target's, as estimated from the sender's Pings
            # (None: not known, e.g. a sender from before it sent its clock)
            "source_clock_offset_seconds": None if offset is None else round(offset / 1e9, 3),
            "consistency_point": {
                "lsn": point.point_lsn,
                "source_time": iso_time(point.point_ts_ns),
                # a replica file changed outside replication is no point's content
                "consistent": point.consistent
                and not point.applying
                and not replica.files.diverged,
                "floor_lsn": point.floor_ahead,
                "unknown": point.unknown or None,
            },
            "diverged": dict(replica.files.diverged),
            "bytes": {"payload": payload, "wire": wire},
            "compression_ratio": round(payload / wire, 3) if wire else 1.0,
            "rate_bytes_per_second": round(self._rate.update(wire, time.monotonic()), 1),
            "journal": {"bytes": replica.journal.bytes_used, "cap": replica.journal.max_bytes},
            "errors": dict(self.errors),
            "last_error": self.last_error if replica.failure is None else str(replica.failure),
        }


class StatusBoard:
    """The jobs of one process, for the control socket and the metrics."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.started = time.monotonic()  # for the uptime: a clock step does not move it
        self.jobs: dict[str, SenderJobStatus | ReceiverJobStatus] = {}
        self.tls: TlsIdentity | None = None  # its certificate's expiry is shown
        self.listeners = Listeners()  # told (job, "job") when a job is added (or replaced)
        # a server's connections refused before any job's session ran, by reason (a
        # certificate refused, not allowed the job it named, another version, ...)
        self.refused: dict[str, int] = {}
        self.in_flight: InFlightBudget | None = None  # a receiver's (engine/in_flight.py)

    def refused_connection(self, reason: str) -> None:
        """Count a connection refused for ``reason`` (``serve(on_refused=...)`` and the
        receiver's own refusals): monitoring alerts on them, the log says each one."""
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def add(self, job: str, status: SenderJobStatus | ReceiverJobStatus) -> None:
        self.jobs[job] = status
        self.listeners.tell(job, "job")

    async def snapshot(self) -> dict[str, Any]:
        jobs = [await status.snapshot() for _, status in sorted(self.jobs.items())]
        return {
            "role": self.role,
            "pid": _pid(),
            "uptime_seconds": round(time.monotonic() - self.started, 1),
            "tls": None if self.tls is None else self.tls.expiry(),
            "refused_connections": dict(sorted(self.refused.items())),
            "in_flight": None if self.in_flight is None else self.in_flight.status(),
            "jobs": jobs,
        }


async def _oldest_age(journal: Journal, applied: int, now: float) -> float:
    """Seconds since the source time of the oldest record the receiver has not applied."""
    try:
        async for record in journal.read_from(max(applied + 1, journal.first_lsn)):
            return max(0.0, now - record.ts_ns / 1e9)
    except Exception:  # a closed or failed journal: no figure rather than a failed status
        return 0.0
    return 0.0


def _journal_bytes(journal: Journal | None) -> int:
    return journal.bytes_used if journal is not None else 0


def _progress(progress: tuple[int, int] | None) -> dict[str, Any] | None:
    if progress is None:
        return None
    done, total = progress
    return {
        "bytes": done,
        "total": total,
        "percent": round(100 * done / total, 1) if total else 100.0,
    }


def promotion_fields(job: str, promotion: Promotion | None) -> dict[str, Any]:
    """A receiver job's ``promoted``, ``promotion`` and (while promoted) ``role_change``
    keys: the same for a running receiver and for the files at rest (engine/at_rest.py)."""
    if promotion is None:
        return {"promoted": False, "promotion": None}
    back = (
        "stop the VM here, then on the old source: `replicator failback --from THIS_RECEIVER:PORT "
        f"--job {job} VOLUME...` (with `replicator receive` running here); or, to throw away "
        f"what was written here: `replicator demote --dir DIR --job {job} --discard-changes`"
    )
    if promotion.damaged:
        return {
            "promoted": True,
            "promotion": {"damaged": promotion.damaged},
            "role_change": {
                "phase": "promoted",
                "note": f"maybe ({promotion.damaged}): every sender is refused",
                "next": back,
            },
        }
    at = iso_time(promotion.at_ns)
    return {
        "promoted": True,
        "promotion": {
            "generation": promotion.generation,
            "previous_generation": promotion.previous,
            "at": at,
            "point_lsn": promotion.point_lsn,
            "point_time": iso_time(promotion.point_ts_ns),
            "consistent": promotion.consistent,
            # the RPO bound when promoted: what the receiver's lag would have said at that
            # moment (on this target's clock); after it, nothing is missing
            "missing_seconds": _rounded(
                missing_seconds(promotion.at_ns, promotion.point_ts_ns, promotion.point_target_ns)
            ),
        },
        "role_change": {
            "phase": "promoted",
            "note": f"by failover at {at} (generation {promotion.previous} -> "
            f"{promotion.generation}, "
            + (
                f"consistency point lsn {promotion.point_lsn}"
                if promotion.consistent
                else "not at a consistency point: taken as it was, --allow-inconsistent"
            )
            + "); replication writes nothing to it",
            "next": back,
        },
    }


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def iso_time(ts_ns: int) -> str | None:
    if not ts_ns:
        return None
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts_ns / 1e9))
        + f".{ts_ns % 10**9 // 10**6:03d}Z"
    )


def _pid() -> int:
    return os.getpid()
