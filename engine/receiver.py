"""The receiving server: one session per job at a time, jobs opened on demand.

``Receiver.handle`` runs one sender connection: the Hello (checked: version, job name,
announced volumes, who may write the job), the job (``job_replica.JobReplica``, opened and
recovered on first use), then a ``receiver_session.Session``. Errors are logged, sent to
the peer with a code, and kept in the job's status.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog

from replicator.engine.applier import ApplyError
from replicator.engine.errors import ConfigError, ReplicatorError, first_error
from replicator.engine.generations import Promotion, session_refusal
from replicator.engine.job_replica import JobReplica, ReceiverConfig, check_receiver_dirs
from replicator.engine.names import check_job_name, path_problem
from replicator.engine.receiver_session import (
    Session,
    StorageFailed,
    replica_tree_parts,
    send_quietly,
)
from replicator.engine.replica_files import ReplicaDiverged
from replicator.engine.status import StatusBoard
from replicator.journal import (
    JournalError,
)
from replicator.transport import (
    PROTOCOL_VERSION,
    ConnectionClosedError,
    Error,
    FramedConnection,
    Hello,
    Refuse,
    RemoteProtocolError,
    VersionMismatchError,
)

log = structlog.get_logger()

HELLO_TIMEOUT = 30.0
SESSION_WAIT = 3.0  # how long a sender waits for the job's last session to end
FAILOVER_SESSION_WAIT = 60.0  # for an aborted session to let go of its job


class Receiver:
    """Serves many senders at once, one session per job at a time."""

    def __init__(self, config: ReceiverConfig) -> None:
        self.config = config
        self._jobs: dict[str, JobReplica] = {}
        self._jobs_lock = asyncio.Lock()
        self._sessions: set[asyncio.Task[Any]] = set()
        self._serving: dict[FramedConnection, JobReplica] = {}  # sessions past the Hello
        self._closing = False
        self.status = StatusBoard("receiver")

    async def job(self, name: str) -> JobReplica:
        async with self._jobs_lock:
            replica = self._jobs.get(name)
            if replica is not None and replica.broken and not replica.session_lock.locked():
                # a write, fsync or apply failed (disk full?): reopening recovers from disk
                log.warning("receiver.reopen_job", job=name)
                with contextlib.suppress(Exception):
                    await replica.aclose()
                replica = None
            if replica is None:
                replica = self._jobs[name] = await JobReplica.open(name, self.config)
                self.status.add(name, replica.status)
            return replica

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
        except StorageFailed as exc:
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
            await send_quietly(
                conn, Refuse("version", f"receiver speaks protocol {PROTOCOL_VERSION}: {exc}")
            )
            return
        if not isinstance(hello, Hello):
            raise RemoteProtocolError(f"expected Hello, got {type(hello).__name__}")
        refusal = self._check_hello(hello)
        if refusal is None and self.config.authorize is not None:  # --allow (engine/authz.py)
            why = self.config.authorize.refusal(conn, hello.job)
            refusal = None if why is None else Refuse("auth", why)
        if refusal is not None:
            log.warning("receiver.refused", peer=conn.peer, code=refusal.code, why=refusal.message)
            await conn.send(refusal)
            return
        try:
            replica = await self.job(hello.job)
        except (OSError, ReplicatorError) as exc:
            log.error("receiver.job_unusable", job=hello.job, peer=conn.peer, error=str(exc))
            code = "storage" if isinstance(exc, OSError) else "config"
            await conn.send(Refuse(code, f"receiver cannot open job {hello.job!r}: {exc}"))
            return
        try:
            # a sender that reconnects may be here before the end of its last session is
            # (the old connection's EOF is on its way): wait a moment before saying busy
            async with asyncio.timeout(SESSION_WAIT):
                await replica.session_lock.acquire()
        except TimeoutError:
            await conn.send(
                Refuse("busy", f"job {hello.job!r} already has a sender connected to this receiver")
            )
            return
        try:
            await self._serve_job(conn, hello, replica)
        finally:
            replica.session_lock.release()

    async def _serve_job(self, conn: FramedConnection, hello: Hello, replica: JobReplica) -> None:
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
        await Session(conn, replica, self.config, adopt=not verifying).run()

    def _check_hello(self, hello: Hello) -> Refuse | None:
        if self._closing:
            return Refuse("busy", "receiver is shutting down")
        if hello.protocol_version != PROTOCOL_VERSION:
            return Refuse(
                "version",
                f"protocol version mismatch: sender {hello.protocol_version}, "
                f"receiver {PROTOCOL_VERSION}",
            )
        try:
            check_job_name(hello.job)
        except ConfigError as exc:
            return Refuse("name", str(exc))
        for volume in hello.volumes:
            problem = path_problem(volume.name)
            if problem is not None:
                return Refuse("name", problem)
        return None

    async def failover(self, name: str) -> tuple[Promotion, bool]:
        """Promote job ``name`` (``replicator failover`` through the control socket): end
        its session if one is still connected (the source is gone, or must be: promotion
        wins), then ``JobReplica.promote``. Returns the promotion and whether the job was
        promoted already."""
        check_job_name(name)
        if not (self.config.state_root / name).is_dir():
            raise ConfigError(
                f"unknown job {name!r}: no receiver state in {self.config.state_root}",
                hint="check the job name; `replicator status --dir DIR` lists the jobs",
            )
        replica = await self.job(name)
        for conn, serving in list(self._serving.items()):
            if serving is replica:
                log.warning("receiver.failover_ends_session", job=name, peer=conn.peer)
                conn.abort()
        async with asyncio.timeout(FAILOVER_SESSION_WAIT):
            await replica.session_lock.acquire()
        try:
            already = replica.promotion is not None and not replica.promotion.damaged
            return await replica.promote(), already
        finally:
            replica.session_lock.release()

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
