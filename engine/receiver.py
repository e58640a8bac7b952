"""The receiving server: one session per job at a time, jobs opened on demand.

``Receiver.handle`` runs one sender connection: the Hello (checked: version, job name,
announced volumes, who may write the job), the job (``job_replica.JobReplica``, opened and
recovered on first use), then a ``receiver_session.Session``. Errors are logged, sent to
the peer with a code, and kept in the job's status.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import structlog

from replicator.engine import descriptors
from replicator.engine.applier import ApplyError
from replicator.engine.control import requester_gone
from replicator.engine.durable_tail import KeptMemory
from replicator.engine.errors import (
    BusyError,
    ConfigError,
    ConnectError,
    RefusedError,
    ReplicaInconsistent,
    ReplicatorError,
    first_error,
)
from replicator.engine.failback_serve import FailbackSession
from replicator.engine.generations import PromotedUnfinished, Promotion, session_refusal
from replicator.engine.imagelock import session_mark
from replicator.engine.in_flight import InFlightBudget
from replicator.engine.job_replica import (
    IN_USE,
    JobReplica,
    ReceiverConfig,
    check_receiver_dirs,
)
from replicator.engine.names import check_job_name, path_problem
from replicator.engine.receiver_session import (
    HandoverRefused,
    Session,
    SessionTold,
    StorageFailed,
    replica_tree_parts,
    send_quietly,
    storage_reason,
)
from replicator.engine.replica_files import ReplicaDiverged
from replicator.engine.source_clock import SourceClock
from replicator.engine.status import AUTO_FAILOVER_WAITS, StatusBoard
from replicator.journal import (
    JournalError,
)
from replicator.journal.errors import upgrade_hint
from replicator.transport import (
    PROTOCOL_VERSION,
    ConnectionClosedError,
    Error,
    FramedConnection,
    Hello,
    Ping,
    Refuse,
    RemoteProtocolError,
    VersionMismatchError,
)
from replicator.transport.messages import CAP_WALL_CLOCK

log = structlog.get_logger()

IS_THE_SOURCE = (
    "is this sender's own source {what} (its lock is on it): the receiver's --dir holds the "
    "sources themselves (the same folder on one host, or a datastore both hosts mount), and "
    "replicating would overwrite them with their own past, with no second copy anywhere. "
    "Give the receiver a --dir on other storage"
)
IS_THE_SOURCE_FOLDER = (
    "is this sender's own source folder (its lock is on it), and it holds the replica "
    "folder {folder} or lies in it: replicating would copy the source into itself, or "
    "delete it as files the source lacks. Give the receiver a --dir outside the VM folder, "
    "and keep the VM folder out of the receiver's --dir"
)
_T = TypeVar("_T")

HELLO_TIMEOUT = 30.0
# while a job opens (journal recovery, apply), the sender is pinged this often, so that it
# can tell a busy receiver from something that is not a receiver (docs/PROTOCOL.md)
OPENING_PING = 1.0
SESSION_WAIT = 3.0  # how long a sender waits for the job's last session to end
FAILOVER_SESSION_WAIT = 60.0  # for an aborted session to let go of its job
# for a session to let go of a job to demote (only a failback's runs on a promoted job, and
# it is not aborted: within the control request's 10 s the answer is a refusal instead)
DEMOTE_SESSION_WAIT = 5.0
# a job without a session is closed to make room for another (``Receiver._make_room``)
# only once nothing has asked for it for this long: a failover or a session that was
# given the job a moment ago takes its session lock after ``Receiver.job`` returns
IDLE_BEFORE_CLOSE = 60.0


def _clock(when: float) -> str:
    """A wall-clock time for messages, in the receiver's local time zone."""
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(when))


def version_refusal(what: str, theirs: int, ours: int) -> Refuse:
    """Refuse a sender of another release: both versions, and which side to upgrade. The
    words reach senders of every release (they print the text after "protocol version
    mismatch: "), and a sender of today reads the versions back out of its first part
    (engine/errors.py, ``version_refusal``): keep its shape."""
    older, newer = (
        ("the sender", "this receiver") if theirs < ours else ("this receiver", "the sender")
    )
    return Refuse(
        "version",
        f"the sender speaks {what} version {theirs}, this receiver {ours}: "
        f"{upgrade_hint(older, newer)}",
    )


class Receiver:
    """Serves many senders at once, one session per job at a time."""

    def __init__(self, config: ReceiverConfig) -> None:
        self.config = config
        self._jobs: dict[str, JobReplica] = {}
        self._used: dict[str, float] = {}  # job: when ``job`` last returned it (monotonic)
        # jobs open at once: each may come to hold ``descriptors.JOB_DESCRIPTORS`` (a
        # sender naming a new job per connection ran the process out of them)
        self.max_open_jobs = config.max_open_jobs or descriptors.jobs_within(descriptors.limit())
        # past max_open_jobs, more while the files actually open leave room (not when the
        # limit is the configuration's)
        self._measured = config.max_open_jobs is None
        self._kept = KeptMemory(config.kept_max)  # what all jobs' appliers keep, together
        # what all sessions hold before it is durable, together (engine/in_flight.py)
        self.in_flight = InFlightBudget(config.in_flight_max)
        # job: when a demote through this receiver ended its promotion (monotonic): an
        # automatic failover counts its wait from there, as from a restarted receiver's start
        self.demoted: dict[str, float] = {}
        self._jobs_lock = asyncio.Lock()
        self._sessions: set[asyncio.Task[Any]] = set()
        self._serving: dict[FramedConnection, JobReplica] = {}  # sessions past the Hello
        self._holders: dict[str, tuple[str, float]] = {}  # job: (peer, since) of its session
        self._replicating: dict[str, Session] = {}  # writing sessions, by job (handover)
        self._closing = False
        self.status = StatusBoard("receiver")
        self.status.in_flight = self.in_flight  # shown: when the budget holds sessions back

    def has_session(self, job: str) -> bool:
        """True while a sender's session holds ``job`` (automatic failover's "source seen")."""
        return job in self._holders

    async def job(self, name: str) -> JobReplica:
        async with self._jobs_lock:
            replica = self._jobs.get(name)
            if (
                replica is not None
                and not replica.session_lock.locked()
                and (replica.broken or await asyncio.to_thread(replica.moved_away))
            ):
                # a write, fsync or apply failed (disk full?), or its folders were deleted
                # on the target (the job started over): reopening recovers from disk
                log.warning("receiver.reopen_job", job=name, broken=replica.broken)
                with contextlib.suppress(Exception):
                    await replica.aclose()
                replica = None
            if replica is None:
                await self._make_room(name)
                # opened outside the session's log context: the job's apply task outlives
                # the session, and must not name its peer on every line
                opening = asyncio.create_task(
                    JobReplica.open(name, self.config, self._kept), context=contextvars.Context()
                )
                try:
                    replica = await asyncio.shield(opening)
                except asyncio.CancelledError:
                    # the session ends (the receiver closing, say) while the job opens: the
                    # open runs to its end and the job is kept where aclose finds it, so its
                    # journal is closed rather than left open, holding its lock
                    with contextlib.suppress(Exception):
                        self._keep(name, await opening)
                    raise
                self._keep(name, replica)
            self._used[name] = time.monotonic()
            return replica

    async def _make_room(self, name: str) -> None:
        """Before job ``name`` opens: close jobs without a session, the least recently
        used first, until one more fits (``_room``); when none can go, refuse (BusyError,
        "busy": the sender tries again later)."""
        now = time.monotonic()
        idle = sorted(
            (
                (self._used.get(job, 0.0), job)
                for job, replica in self._jobs.items()
                if not replica.session_lock.locked()
                and now - self._used.get(job, 0.0) >= IDLE_BEFORE_CLOSE
            ),
        )
        while not self._room() and idle:
            _, job = idle.pop(0)
            replica = self._jobs.pop(job)
            self._used.pop(job, None)
            log.info("receiver.close_idle_job", job=job, open_jobs=len(self._jobs))
            with contextlib.suppress(Exception):
                await replica.aclose()
        if not self._room():
            log.warning(
                "receiver.too_many_jobs", job=name, open_jobs=len(self._jobs),
                most=self.max_open_jobs, descriptors=descriptors.limit(),
            )  # fmt: skip
            self.status.refused_connection("too_many_jobs")
            raise BusyError(
                f"{len(self._jobs)} jobs are open, as many as this receiver's open files allow "
                f"(each job may come to hold {descriptors.JOB_DESCRIPTORS}; "
                f"{descriptors.open_now()} of its {descriptors.limit()} are open), and none has "
                f"been idle for {IDLE_BEFORE_CLOSE:g} s",
                hint="try again later (a continuous sender does); on the receiver's host raise "
                "its open-file limit (LimitNOFILE= in its systemd unit, `ulimit -n`), or "
                "bind each certificate to its jobs with --allow",
            )

    def _room(self) -> bool:
        """Whether one more job may open now (see ``descriptors``)."""
        if len(self._jobs) < self.max_open_jobs:
            return True
        return self._measured and descriptors.room_for_another_job()

    def _keep(self, name: str, replica: JobReplica) -> None:
        self._jobs[name] = replica
        self.status.add(name, replica.status)

    async def handle(self, conn: FramedConnection) -> None:
        """Run one sender session to its end; never raises (errors are logged and sent)."""
        task = asyncio.current_task()
        if task is not None:
            self._sessions.add(task)
        kind, message = "", ""
        try:
            try:
                await self._handle(conn)
            except BaseExceptionGroup as group:
                raise first_error(group) from group
        except (ConnectionClosedError, ConnectionError, TimeoutError) as exc:
            log.info("receiver.session_lost", peer=conn.peer, reason=str(exc) or type(exc).__name__)
            kind, message = "connection", str(exc) or type(exc).__name__
        except SessionTold as exc:  # logged where it was told; counted once, by its kind
            log.info("receiver.session_ended", peer=conn.peer, reason=str(exc))
            code = exc.error.code
            kind = code if code in ("storage", "diverged") else "protocol"
            message = exc.error.message
        except StorageFailed as exc:  # the connection was gone before it could be told
            log.warning("receiver.session_ended", peer=conn.peer, reason=str(exc))
            kind, message = "storage", str(exc)
        except RemoteProtocolError as exc:
            log.warning("receiver.protocol_error", peer=conn.peer, error=str(exc))
            await send_quietly(conn, Error("protocol", str(exc)))
            kind, message = "protocol", str(exc)
        except ReplicaDiverged as exc:
            log.error("receiver.replica_diverged", peer=conn.peer, files=[str(exc)])
            await send_quietly(conn, Error("diverged", f"receiver cannot apply: {exc}"))
            kind, message = "diverged", str(exc)
        except (ApplyError, JournalError, OSError) as exc:
            log.error("receiver.storage", peer=conn.peer, error=str(exc))
            await send_quietly(conn, Error("storage", f"receiver cannot apply: {exc}"))
            kind, message = "storage", str(exc)
        except Exception as exc:
            log.exception("receiver.session_failed", peer=conn.peer)
            await send_quietly(conn, Error("internal", f"receiver failed: {exc}"))
            kind, message = "internal", str(exc)
        finally:
            await conn.aclose()
            replica = self._serving.pop(conn, None)
            if replica is not None:
                replica.status.attach(None)
                if kind:
                    replica.status.error(kind, message)
            if task is not None:
                self._sessions.discard(task)

    async def _handle(self, conn: FramedConnection) -> None:
        try:
            hello = await conn.recv(timeout=HELLO_TIMEOUT)
        except VersionMismatchError as exc:
            version = version_refusal(exc.what, exc.peer_version, exc.our_version)
            log.warning("receiver.refused", peer=conn.peer, code="version", why=version.message)
            self.status.refused_connection("version")
            await send_quietly(conn, version)
            return
        if not isinstance(hello, Hello):
            raise RemoteProtocolError(f"expected Hello, got {type(hello).__name__}")
        structlog.contextvars.bind_contextvars(job=hello.job, peer=conn.peer)  # this session's
        refusal = self._check_hello(hello)
        if refusal is None and self.config.authorize is not None:  # --allow (engine/authz.py)
            why = self.config.authorize.refusal(conn, hello.job)
            refusal = None if why is None else Refuse("auth", why)
        # only then: an unknown job's refusal lists the jobs here, which a peer not allowed
        # the job it named must not learn
        refusal = refusal or self._unknown_job(hello)
        if refusal is not None:
            log.warning("receiver.refused", peer=conn.peer, code=refusal.code, why=refusal.message)
            self.status.refused_connection(refusal.code)
            await conn.send(refusal)
            return
        try:
            replica = await pinging_meanwhile(conn, self.job(hello.job))
        except (OSError, ReplicatorError) as exc:
            code, why = ("busy" if isinstance(exc, BusyError) else "config"), str(exc)
            if isinstance(exc, OSError):  # a full disk says which, with the room left
                folders = (self.config.replica_root, self.config.state_root)
                code, why = "storage", storage_reason(exc, tuple(f / hello.job for f in folders))
            log.error("receiver.job_unusable", job=hello.job, peer=conn.peer, error=why)
            await conn.send(Refuse(code, f"receiver cannot open job {hello.job!r}: {why}"))
            return
        try:
            # a sender that reconnects may be here before the end of its last session is
            # (the old connection's EOF is on its way): wait a moment before saying busy
            async with asyncio.timeout(SESSION_WAIT):
                await replica.session_lock.acquire()
        except TimeoutError:
            self.status.refused_connection("busy")
            holder = self._holders.get(hello.job)
            who = "" if holder is None else f" ({holder[0]}, connected since {_clock(holder[1])})"
            await conn.send(
                Refuse(
                    "busy",
                    f"job {hello.job!r} already has a sender connected to this receiver{who}",
                )
            )
            return
        self._holders[hello.job] = (conn.peer, time.time())
        try:
            await self._serve_job(conn, hello, replica)
        finally:
            del self._holders[hello.job]
            replica.session_lock.release()

    def _unknown_job(self, hello: Hello) -> Refuse | None:
        """``verify`` compares and writes nothing: a job the receiver has no state for is
        refused before anything is created for it (naming the jobs it has)."""
        if "verify" not in hello.capabilities:
            return None
        root = self.config.state_root
        if (root / hello.job).is_dir():
            return None
        try:
            jobs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.is_symlink())
        except OSError:
            jobs = []
        return Refuse(
            "config",
            f"unknown job {hello.job!r} on the receiver (jobs there: "
            f"{', '.join(jobs) if jobs else 'none'})",
        )

    async def _serve_job(self, conn: FramedConnection, hello: Hello, replica: JobReplica) -> None:
        if "failback" in hello.capabilities:  # reads a promoted replica, then hands it back
            self._serving[conn] = replica
            await FailbackSession(conn, replica, self.config).run()
            return
        purpose = frozenset(hello.capabilities) & {"verify", "resync"}
        refusal = session_refusal(
            hello.job,
            sender_generation=hello.generation,
            replica_generation=replica.state.generation,
            promotion=replica.promotion,
            fresh=replica.fresh,
            purpose=purpose,
        )
        if refusal is not None:  # before anything below changes the job's state
            log.error("receiver.split_brain", job=hello.job, peer=conn.peer, why=refusal[1])
            await conn.send(Refuse(*refusal))
            return
        if "verify" not in purpose:
            sources, writers, what = await replica.replica_conflicts(
                [volume.name for volume in hello.volumes], session_mark(hello.session)
            )
            if sources:
                if what == "folder":
                    why, noun = IS_THE_SOURCE_FOLDER.format(folder=replica.replica_dir), "folder"
                else:
                    why = f"(in {replica.replica_dir}) {IS_THE_SOURCE.format(what=what)}"
                    noun = "replica"
                await self._refuse_replicas(
                    conn, replica, hello.job, sources, "is_the_source", "config", why, noun=noun
                )
                return
            if writers:  # "busy": a continuous sender retries until the program is gone
                await self._refuse_replicas(
                    conn, replica, hello.job, writers, "in_use", "busy", IN_USE
                )
                return
            # one history on both sides: a new replica takes the sender's, a --resync the
            # later of the two (the sender learns it from the Welcome)
            generation = max(hello.generation, replica.state.generation, 1)
            if replica.fresh or replica.state.generation == 0 or "resync" in purpose:
                await replica.set_generation(generation)
        verifying = "verify" in hello.capabilities
        diverged = await replica.check_replica(adopt="resync" in hello.capabilities)
        if diverged and not verifying:
            why = "; ".join(diverged[:3]) + (
                f" (and {len(diverged) - 3} more)" if len(diverged) > 3 else ""
            )
            log.error("receiver.replica_diverged", job=hello.job, peer=conn.peer, files=diverged)
            await conn.send(Refuse("diverged", f"job {hello.job!r}: {why}"))
            return
        log.info("receiver.session", job=hello.job, peer=conn.peer, session=hello.session)
        self._serving[conn] = replica
        replica.status.attach(conn)
        # the source is back: an automatic failover's wait (its last_error, "automatic
        # failover waits: ...") is over; status showed it while the source replicated again
        replica.status.clear_error(AUTO_FAILOVER_WAITS)
        # a sender whose Pings carry its wall clock: the offset of the source's clock is
        # estimated from them, so the lag allows for it (engine/source_clock.py)
        clock = SourceClock(hello.job, conn.peer) if CAP_WALL_CLOCK in hello.capabilities else None
        session = Session(
            conn, replica, self.config, verifying=verifying, in_flight=self.in_flight, clock=clock
        )
        if not verifying:
            self._replicating[hello.job] = session
        try:
            try:
                await session.run()
            except Exception as exc:
                if session.told is None:
                    raise
                raise SessionTold(session.told) from exc
            if session.told is not None:
                raise SessionTold(session.told)
        finally:
            if self._replicating.get(hello.job) is session:
                del self._replicating[hello.job]

    async def _refuse_replicas(
        self,
        conn: FramedConnection,
        replica: JobReplica,
        job: str,
        files: list[str],
        kind: str,
        code: str,
        why: str,
        *,
        noun: str = "replica",
    ) -> None:
        """Refuse a session (Refuse ``code``) over some of the job's replica ``files``:
        the log (``receiver.replica_<kind>``), the job's status on the target (error
        ``kind``) and the sender all say which and ``why``."""
        names = ", ".join(repr(f) for f in files[:3])
        text = f"job {job!r}: {noun} {names} {why}; nothing was written"
        log.error(f"receiver.replica_{kind}", job=job, peer=conn.peer, files=files)
        replica.status.error(kind, text)
        await conn.send(Refuse(code, text))

    def _check_hello(self, hello: Hello) -> Refuse | None:
        if self._closing:
            return Refuse("busy", "receiver is shutting down")
        if hello.protocol_version != PROTOCOL_VERSION:
            return version_refusal("protocol", hello.protocol_version, PROTOCOL_VERSION)
        try:
            check_job_name(hello.job)
        except ConfigError as exc:
            return Refuse("name", str(exc))
        for volume in hello.volumes:
            problem = path_problem(volume.name)
            if problem is not None:
                return Refuse("name", problem)
        return None

    async def failover(
        self, name: str, *, allow_inconsistent: bool = False
    ) -> tuple[Promotion, bool]:
        """Promote job ``name`` (``replicator failover`` through the control socket): end
        its session if one is still connected (the source is gone, or must be: promotion
        wins), then ``JobReplica.promote``. Returns the promotion and whether the job was
        promoted already."""
        replica = await self._known_job(name)
        _still_asked(name)  # before its session is ended
        for conn, serving in list(self._serving.items()):
            if serving is replica:
                log.warning("receiver.failover_ends_session", job=name, peer=conn.peer)
                conn.abort()
        async with asyncio.timeout(FAILOVER_SESSION_WAIT):
            await replica.session_lock.acquire()
        try:
            already = replica.promotion is not None and not replica.promotion.damaged
            _still_asked(name)
            promotion = await replica.promote(allow_inconsistent=allow_inconsistent)
        finally:
            replica.session_lock.release()
        # an automatic failover's wait (its last_error, "automatic failover waits: ...")
        # is over: status showed it still after the promotion
        replica.status.clear_error(AUTO_FAILOVER_WAITS)
        return promotion, already

    async def demote(self, name: str) -> int:
        """``replicator demote`` through the control socket: the promoted job ``name``
        follows replication again (no session runs on a promoted job but a failback's,
        which is waited for). Returns its generation."""
        replica = await self._known_job(name)
        if replica.promotion is None:
            raise ConfigError(f"job {name!r} is not promoted", hint="nothing to demote")
        _still_asked(name, "demote")
        try:
            async with asyncio.timeout(DEMOTE_SESSION_WAIT):
                await replica.session_lock.acquire()
        except TimeoutError:
            raise RefusedError(
                f"job {name!r} has a session (a failback from the source?): nothing demoted",
                hint="let it finish (a failback hands the job back by itself), then demote",
            ) from None
        try:
            _still_asked(name, "demote")
            await replica.demote()
            self.demoted[name] = time.monotonic()
        finally:
            replica.session_lock.release()
        return replica.state.generation

    async def _known_job(self, name: str) -> JobReplica:
        """Job ``name``, which this receiver has state for (an operator's command names it)."""
        check_job_name(name)
        if not (self.config.state_root / name).is_dir():
            raise ConfigError(
                f"unknown job {name!r}: no receiver state in {self.config.state_root}",
                hint="check the job name; `replicator status --dir DIR` lists the jobs",
            )
        return await self.job(name)

    async def failover_planned(self, name: str, timeout: float) -> tuple[Promotion, bool]:
        """Planned failover of job ``name``: its connected sender stops capture, ships
        everything and says its final point; the replica is promoted exactly there (see
        docs/PROTOCOL.md, "Failover and failback"). Never promotes without that point:
        no sender within ``timeout`` seconds, or one that goes away first, is an error
        that leaves the job as it was."""
        replica = await self._known_job(name)
        if replica.promotion is not None and not replica.promotion.damaged:
            return replica.promotion, True
        _still_asked(name)  # before the source is asked to stop its capture
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        session = await self._next_session(name, None, deadline)
        if session is None:
            raise ConnectError(
                f"job {name!r}: no sender is connected for it (waited {timeout:g} s); a "
                "planned failover needs the source's final point, nothing was promoted",
                hint="start `replicator send` on the source and run this again; if the "
                "source is gone, `replicator failover --force` promotes the last complete "
                "consistency point received",
            )
        log.warning("receiver.handover_requested", job=name)
        while True:
            try:
                final = await _handed_over(session, replica, deadline - loop.time())
                break
            except HandoverRefused:
                log.warning("receiver.handover_refused", job=name)
                raise RefusedError(
                    f"job {name!r}: the source refused the planned failover: it cannot take a "
                    "final point now (scan capture: its freeze failed or found no room in its "
                    "journal; NBD or FUSE capture: its journal overflowed); nothing was "
                    "promoted, and replication goes on",
                    hint="see why on the source (`replicator status --state-dir DIR`: "
                    "last_error; its log: sender.handover_refused), fix it and run this "
                    "again; if the source is gone, use --force",
                ) from None
            except (TimeoutError, ConnectionClosedError) as exc:
                session.conn.abort()  # the sender learns at once that nothing was promoted
                # A session that ended before its final point (the link lost, say) may not
                # have passed the request on: the sender's next session is asked, within
                # the same timeout. One that did pass it on has stopped capturing and ends
                # without a next session (engine/handover.py): nothing is promoted.
                again = None
                if isinstance(exc, ConnectionClosedError):
                    again = await self._next_session(name, session, deadline)
                if again is None:
                    raise _handover_failed(name, exc) from exc
                log.warning("receiver.handover_retried", job=name, after=str(exc))
                session = again
        state = replica.state
        if replica.broken or replica.received_lsn != final or state.point_lsn != final:
            raise ReplicaInconsistent(
                f"job {name!r}: the replica is not at the sender's final point (lsn {final}; "
                f"applied {state.applied_lsn}, point {state.point_lsn}, received "
                f"{replica.received_lsn}); nothing was promoted",
                hint="run `replicator failover --planned` again; `replicator status` shows "
                "what failed",
            )
        try:
            _still_asked(name)
        except RefusedError:  # the source stopped its capture and waits: cut, it is told
            session.conn.abort()
            raise
        unfinished: PromotedUnfinished | None = None
        try:
            promotion = await replica.promote()
        except PromotedUnfinished as exc:  # promoted all the same: the sender is told so
            promotion, unfinished = exc.promotion, exc
        try:
            await session.confirm_handover(promotion.generation)
        except Exception as exc:  # promoted all the same: the sender asks (engine/handover.py)
            log.warning("receiver.handover_unconfirmed", job=name, error=str(exc))
        log.warning("receiver.planned_failover", job=name, lsn=final)
        if unfinished is not None:
            raise unfinished
        return promotion, False

    async def _next_session(
        self, name: str, previous: Session | None, deadline: float
    ) -> Session | None:
        """The job's replicating session other than ``previous``, waited for until the
        loop's ``deadline``; None when none came."""
        loop = asyncio.get_running_loop()
        while True:
            session = self._replicating.get(name)
            if session is not None and session is not previous:
                return session
            if loop.time() >= deadline:
                return None
            await asyncio.sleep(0.1)

    async def aclose(self) -> None:
        """Stop sessions, then finish applying whatever complete epochs were received."""
        self._closing = True
        for task in list(self._sessions):
            task.cancel()
        for task in list(self._sessions):
            with contextlib.suppress(BaseException):
                await task
        for replica in list(self._jobs.values()):
            await replica.aclose()
        self._jobs.clear()


__all__ = [
    "JobReplica",
    "Receiver",
    "ReceiverConfig",
    "check_receiver_dirs",
    "replica_tree_parts",
]


async def _handed_over(session: Session, replica: JobReplica, timeout: float) -> int:
    """Ask ``session``'s sender for its final point and wait until the replica has applied
    it; that LSN. TimeoutError after ``timeout`` seconds (at least 0.1); ConnectionClosedError
    when the session ends first."""
    async with asyncio.timeout(max(0.1, timeout)):
        final = await session.request_handover()
        async with replica.applied_changed:
            while replica.applied_lsn < final and not replica.broken:
                await replica.applied_changed.wait()
    return final


def _still_asked(name: str, op: str = "failover") -> None:
    """Raise RefusedError when the requester of ``op`` has gone (``requester_gone``)."""
    if requester_gone():
        log.warning(f"receiver.{op}_abandoned", job=name)
        done = "nothing was promoted" if op == "failover" else "the job is still promoted"
        raise RefusedError(
            f"job {name!r}: the {op} request was given up by its client (interrupted, or it "
            f"stopped waiting: was this receiver stopped or stuck?) before it could be "
            f"carried out; {done}",
            hint=f"run `replicator {op}` again if it is still wanted",
        )


def _handover_failed(name: str, exc: TimeoutError | ConnectionClosedError) -> ConnectError:
    why = "did not finish in time" if isinstance(exc, TimeoutError) else f"failed: {exc}"
    return ConnectError(
        f"job {name!r}: the sender's handover {why}; nothing was promoted",
        hint="run `replicator failover --planned` again (a longer --timeout for a large "
        "backlog); if the source is gone, use --force",
    )


async def pinging_meanwhile(conn: FramedConnection, work: Coroutine[Any, Any, _T]) -> _T:
    """Await ``work``, sending the sender a Ping every ``OPENING_PING`` seconds until it
    ends: a Hello is answered at once or pinged (a receiver recovering a job is slow to
    Welcome; a peer that says nothing is not a receiver at all)."""
    task = asyncio.ensure_future(work)
    nonce = itertools.count(1)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=OPENING_PING)
            if done:
                return task.result()
            try:
                await conn.send(Ping(next(nonce), time.time_ns()))
            except (ConnectionError, ConnectionClosedError, OSError):
                return await task  # the sender went; the job still opens (and is kept)
    except asyncio.CancelledError:
        task.cancel()  # and wait: a job half opened must not outlive the receiver's close
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise
