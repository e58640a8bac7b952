"""The receiving side: journal what arrives, acknowledge what is durable, apply whole epochs.

Per job (``JobReplica``) the receiver keeps its own journal and the applied LSN in a
state folder. A session (one sender connection) appends each RECORDS frame to that
journal; a sync task makes appended records durable, then acknowledges them as
*received* and grants the sender more credit. An applier task applies records to the
replicas only up to the last received barrier (EPOCH or FLUSH): the replica therefore
moves from one consistency point to the next, and an epoch interrupted by a crash is
completed from the journal on restart before anything else happens. After each
barrier it fsyncs the replicas, persists the applied LSN, trims its journal and
acknowledges the LSN as *applied*.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import os
import stat
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from replicator.engine import replica_state
from replicator.engine.applier import Applier, ApplyError
from replicator.engine.errors import ConfigError, ReplicatorError, first_error
from replicator.engine.manifest import digest_chunks
from replicator.engine.names import check_job_name, path_problem
from replicator.engine.replica_files import ReplicaDiverged, ReplicaFiles
from replicator.engine.replica_state import ReplicaState
from replicator.engine.session_core import ReceiverCore, Send
from replicator.engine.status import ReceiverJobStatus, StatusBoard
from replicator.journal import (
    Journal,
    JournalError,
    JournalFull,
    Record,
    RecordType,
)
from replicator.journal.durable import makedirs_durable, sync_dir
from replicator.transport import (
    PROTOCOL_VERSION,
    ConnectionClosedError,
    Error,
    FramedConnection,
    Goodbye,
    Hello,
    Manifest,
    ManifestRequest,
    Ping,
    Pong,
    Records,
    Refuse,
    RemoteProtocolError,
    VersionMismatchError,
    Welcome,
)
from replicator.transport.messages import (
    DIGEST_SIZE,
    MAX_TREE_PART,
    MessageError,
    Tree,
    TreeEntry,
    TreeRequest,
    encode_tree,
)

log = structlog.get_logger()

APPLY_BATCH_BYTES = 8 * 1024 * 1024
MEM_APPLY_BYTES = 48 * 1024 * 1024  # durable records kept in memory for the applier
MANIFEST_CHUNK = 64 * 1024  # digests per Manifest message (1 MiB)
HELLO_TIMEOUT = 30.0
SESSION_WAIT = 3.0  # how long a sender waits for the job's last session to end
IDLE_TIMEOUT = 120.0
# records that change which file a name leads to (see _apply_upto)
_NAMESPACE = frozenset(
    {
        RecordType.CREATE,
        RecordType.UNLINK,
        RecordType.RENAME,
        RecordType.MKDIR,
        RecordType.RMDIR,
        RecordType.SYMLINK,
    }
)


@dataclass(frozen=True, slots=True)
class ReceiverConfig:
    replica_root: Path
    state_root: Path
    window: int = 66 * 1024 * 1024  # >= the largest record (64 MiB) plus framing
    journal_max_bytes: int | None = None
    segment_bytes: int = 64 * 1024 * 1024


def check_receiver_dirs(config: ReceiverConfig) -> None:
    """Fail early, with a message, when the replica or state folder cannot be used."""
    for what, path in (("replica", config.replica_root), ("state", config.state_root)):
        try:
            makedirs_durable(path)
        except OSError as exc:
            raise ConfigError(f"cannot create {what} folder {path}: {exc.strerror}") from exc
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(
                f"{what} folder {path} is not writable", hint="fix its permissions or pick another"
            )


class JobReplica:
    """Receiver-side state of one job: journal, replica state, the applier."""

    def __init__(
        self,
        job: str,
        config: ReceiverConfig,
        journal: Journal,
        state: ReplicaState,
        files: ReplicaFiles | None = None,
    ) -> None:
        self.job = job
        self.config = config
        self.journal = journal
        self.state = state
        self.files = files if files is not None else ReplicaFiles()
        self.status = ReceiverJobStatus(self)
        self.replica_dir = config.replica_root / job
        self.state_dir = config.state_root / job
        self.session_lock = asyncio.Lock()
        self.last_barrier = state.applied_lsn
        # Records made durable by a session, kept so the applier need not read them back
        # from the journal. Valid only while it holds *every* durable record after the
        # applied LSN; dropped (and the journal read instead) when it would grow too big,
        # and after a failed apply (which may have consumed part of it).
        self._mem: collections.deque[Record] = collections.deque()
        self._mem_bytes = 0
        self._mem_ok = journal.durable_lsn <= state.applied_lsn
        self._noted = self.received_lsn  # highest LSN handed to note_durable (or applied)
        self._applier: Applier | None = None
        self._wake = asyncio.Event()
        self.applied_changed = asyncio.Condition()
        self._apply_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.failure: BaseException | None = None
        self._closed = False

    @classmethod
    async def open(cls, job: str, config: ReceiverConfig) -> JobReplica:
        """Open the job's state and bring the replica to its last complete consistency point.

        Recovery, in order: the saved replica state (damaged: rebuilt from the journal);
        the journal, cut at any damage (records above the applied LSN that it loses are
        sent again by the sender, which keeps them until they are applied); then the
        records up to the last complete barrier are applied again (the redo of an apply
        that a crash interrupted), before any session is served.
        """
        state_dir = config.state_root / job
        await asyncio.to_thread(_real_dirs, config.state_root, (job, f"{job}/journal"))
        saved = await asyncio.to_thread(replica_state.load, state_dir, job)
        files = await asyncio.to_thread(ReplicaFiles.load, state_dir, job)
        journal = await Journal.open(
            state_dir / "journal",
            segment_bytes=config.segment_bytes,
            max_bytes=config.journal_max_bytes,
            on_damage="cut",
            discard_below=saved.applied_lsn + 1 if saved is not None else 0,
        )
        lost_track = saved is None or (
            journal.recovery is not None and journal.recovery.kind == "damage"
        )
        if saved is None:
            # Unknown (damaged or missing): everything below the journal's first record
            # was applied (trim follows the state write), the rest is applied again.
            applied = max(0, journal.first_lsn - 1)
            empty = journal.first_lsn >= journal.next_lsn
            saved = ReplicaState(applied, consistent=empty, applying=not empty)
        if journal.recovery is not None and journal.recovery.kind == "damage":
            log.error(
                "receiver.journal_damaged",
                job=job,
                applied=saved.applied_lsn,
                kept_upto=journal.last_lsn,
                action="records after the kept ones are asked from the sender again",
            )
        self = cls(job, config, journal, saved, files)
        try:
            # the last complete barrier already received (a crash may have cut an apply short)
            pending: set[str] = set()
            async for record in journal.read_from(max(saved.applied_lsn + 1, journal.first_lsn)):
                if record.is_barrier:
                    self.last_barrier = record.lsn
                pending.update(_paths(record))
            if saved.applying:
                # the interrupted round may have written any of these past their stamps
                files.unstamp(files.stamps if lost_track else pending)
            if self.last_barrier > saved.applied_lsn:
                log.info(
                    "receiver.recover", job=job, applied=saved.applied_lsn, upto=self.last_barrier
                )
                try:
                    await self.apply_pending()
                except ReplicaDiverged as exc:  # sessions are refused until a --resync
                    log.error("receiver.replica_diverged", job=job, files=[str(exc)])
            elif not saved.consistent:
                log.warning(
                    "receiver.replica_inconsistent",
                    job=job,
                    applied=saved.applied_lsn,
                    why="the records that complete the interrupted epoch are not here yet; "
                    "the replica is not a consistency point until the sender resends them",
                )
        except BaseException:
            await self.aclose()
            raise
        self._task = asyncio.create_task(self._apply_loop(), name=f"apply-{job}")
        return self

    @property
    def broken(self) -> bool:
        return self.failure is not None or self.journal.failed

    @property
    def applied_lsn(self) -> int:
        return self.state.applied_lsn

    @property
    def received_lsn(self) -> int:
        """Highest LSN the replica has durably: in the journal, or already applied (a
        journal cut after damage may end below the applied LSN)."""
        return max(self.journal.durable_lsn, self.state.applied_lsn)

    async def ingest(self, records: list[Record], encoded: bytes | None = None) -> None:
        """Append records (checksum-verified and checked by ``ReceiverCore.records``) to
        the receive journal. ``encoded`` is their exact encoding (the Records payload they
        were decoded from)."""
        await self.journal.append_many(records, encoded=encoded)

    def note_durable(self, records: list[Record]) -> None:
        """Called once records are durable, in LSN order: barriers become applicable."""
        for record in records:
            if record.is_barrier:
                self.last_barrier = max(self.last_barrier, record.lsn)
        if records:
            self._noted = max(self._noted, records[-1].lsn)
        if self._mem_ok:
            self._mem.extend(records)
            self._mem_bytes += sum(r.encoded_size for r in records)
            if self._mem_bytes > MEM_APPLY_BYTES:  # the applier is behind: use the journal
                self._drop_memory()
        self._wake.set()

    def session_started(self) -> None:
        """A new session begins: records an earlier one made durable without handing them
        over (it ended between its append and its sync) exist only in the journal."""
        if self.journal.durable_lsn > self._noted:
            self._drop_memory()

    def _drop_memory(self) -> None:
        self._mem.clear()
        self._mem_bytes = 0
        self._mem_ok = False

    async def _records_upto(self, target: int) -> AsyncIterator[Record]:
        """Durable records after the applied LSN up to ``target``, from memory or the journal."""
        if self._mem_ok:
            while self._mem and self._mem[0].lsn <= target:
                record = self._mem.popleft()
                self._mem_bytes -= record.encoded_size
                yield record
            return
        start = max(self.state.applied_lsn + 1, self.journal.first_lsn)
        async for record in self.journal.read_from(start):
            if record.lsn > target:
                break
            yield record

    async def _apply_loop(self) -> None:
        try:
            while not self._closed:
                await self._wake.wait()
                self._wake.clear()
                await self.apply_pending()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # surfaced to sessions through acks and errors
            self.failure = exc
            log.error("receiver.apply_failed", job=self.job, error=str(exc))
            async with self.applied_changed:
                self.applied_changed.notify_all()

    async def apply_pending(self, *, force: bool = False) -> int:
        """Apply records up to the last durable barrier (or all durable ones when ``force``).

        All or nothing for the applied LSN: it moves only after every record up to the
        target is in the replica files and they are fsynced. When anything fails, it stays
        where it was, the records stay in the journal (never consumed from memory), and
        the next attempt applies them again from the journal.
        """
        async with self._apply_lock:
            t0 = time.perf_counter()
            target = self.journal.durable_lsn if force else self.last_barrier
            if target <= self.state.applied_lsn:
                return self.state.applied_lsn
            try:
                applied, point = await self._apply_upto(target)
            except ReplicaDiverged as exc:
                self._after_failed_apply()
                self.files.mark_diverged(exc.path, exc.why)
                with contextlib.suppress(OSError):  # also refused at the next session start
                    await asyncio.to_thread(self.files.save, self.state_dir)
                raise
            except BaseException:
                self._after_failed_apply()
                raise
            t1 = time.perf_counter()
            consistent = point is not None and point.lsn == target
            new = self.state.replace(applied_lsn=applied, consistent=consistent, applying=False)
            if point is not None:
                new = new.replace(point_lsn=point.lsn, point_ts_ns=point.ts_ns)
            await self._save_state(new)
            if not self._mem_ok and self.journal.durable_lsn == target:
                self._mem_ok = True  # caught up: nothing durable is left unapplied
                self._noted = max(self._noted, target)
            await self.journal.trim(target + 1)
            async with self.applied_changed:
                self.applied_changed.notify_all()
            log.debug(
                "receiver.applied",
                job=self.job,
                lsn=target,
                consistent=consistent,
                apply_ms=round((t1 - t0) * 1000, 1),
                total_ms=round((time.perf_counter() - t0) * 1000, 1),
            )
            return target

    async def _apply_upto(self, target: int) -> tuple[int, Record | None]:
        """Apply and fsync every record after the applied LSN up to ``target``.

        Returns the LSN reached (always ``target``) and the last barrier applied.

        Redo after a crash applies the round's records again over whatever part of them
        reached the files. Writes to a fixed set of files are idempotent that way; a
        namespace change is not (a WRITE redone after the file was renamed away would
        create a fresh, sparse file under the old name). So before each namespace record
        everything applied so far is made durable and the applied LSN saved: a redo window
        then starts at the latest namespace record at most (whose redo is recognised as
        done) and holds only data records after it.
        """
        if not self.state.applying:  # durably "under way" before any replica byte moves
            await self._save_state(self.state.replace(applying=True, consistent=False))
        applier = self._get_applier()
        batch: list[Record] = []
        size = 0
        last = saved = self.state.applied_lsn
        point: Record | None = None
        async for record in self._records_upto(target):
            if record.lsn <= last:
                raise ApplyError(f"record lsn {record.lsn} is not after {last} (internal error)")
            if record.type in _NAMESPACE and last > saved:
                if batch:
                    await asyncio.to_thread(applier.apply_many, batch)
                    batch, size = [], 0
                await asyncio.to_thread(applier.barrier)
                await asyncio.to_thread(self.files.save, self.state_dir)
                await self._save_state(self.state.replace(applied_lsn=last))
                saved = last
            last = record.lsn
            if record.is_barrier:
                point = record
            batch.append(record)
            size += record.encoded_size
            if size >= APPLY_BATCH_BYTES:
                await asyncio.to_thread(applier.apply_many, batch)
                batch, size = [], 0
        if batch:
            await asyncio.to_thread(applier.apply_many, batch)
        if last != target:  # never call "applied" what was not: the records must all be there
            raise ApplyError(
                f"records up to lsn {target} should be durable here, but they end at {last}"
            )
        await asyncio.to_thread(applier.barrier)
        await asyncio.to_thread(self.files.save, self.state_dir)
        return last, point

    async def _save_state(self, state: ReplicaState) -> None:
        await asyncio.to_thread(replica_state.save, self.state_dir, self.job, state)
        self.state = state

    def _get_applier(self) -> Applier:
        if self._applier is None:
            self._applier = Applier(self.replica_dir, self.files)
        return self._applier

    def _after_failed_apply(self) -> None:
        self._drop_memory()
        if self._applier is not None:
            self.files.unstamp(self._applier.unstamped)  # our own writes moved past them
        self._reset_applier()

    async def check_replica(self, *, adopt: bool) -> list[str]:
        """Replica files not as replication left them (see ``replica_files.py``); with
        ``adopt`` (the sender compares with the replica) they are all taken as they are."""
        async with self._apply_lock:
            if adopt:
                self.files.forget_all()
            else:
                applier = self._get_applier()
                for path in list(self.files.stamps):
                    try:
                        self.files.check(path, await asyncio.to_thread(applier.lstat, path))
                    except ReplicaDiverged as exc:
                        self.files.mark_diverged(exc.path, exc.why)
            await asyncio.to_thread(self.files.save, self.state_dir)
            return [f"{path!r} {why}" for path, why in sorted(self.files.diverged.items())]

    async def adopt(self, path: str) -> None:
        """The sender is about to compare with replica file ``path`` as it is now."""
        async with self._apply_lock:
            await asyncio.to_thread(self._get_applier().adopt, path)
            await asyncio.to_thread(self.files.save, self.state_dir)

    def _reset_applier(self) -> None:
        """After a failed write or fsync nothing about the open files can be trusted (the
        kernel may have dropped dirty pages): the next apply starts with fresh ones."""
        if self._applier is not None:
            with contextlib.suppress(OSError):
                self._applier.close()
            self._applier = None

    def replica_manifest(self, volume: str, extent_size: int) -> Iterator[tuple[bool, int, bytes]]:
        """(exists, size, digests of up to MANIFEST_CHUNK extents) of a replica, read afresh.

        A generator, so a huge replica is hashed and sent a chunk at a time, never held
        whole in memory. Blocking: drive it from a worker thread.
        """
        fd = self._get_applier().open_readonly(volume)  # never reads outside the replica
        if fd is None:
            yield False, 0, b""
            return
        try:
            size = os.fstat(fd).st_size
            for digests in digest_chunks(fd, size, extent_size, MANIFEST_CHUNK):
                yield True, size, digests
        finally:
            os.close(fd)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if not self.broken:
            with contextlib.suppress(Exception):
                await self.apply_pending()
        self._reset_applier()
        with contextlib.suppress(JournalError):
            await self.journal.aclose()


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
            await _send_quietly(conn, Error("protocol", str(exc)))
            kind, message = "protocol", str(exc)
        except ReplicaDiverged as exc:
            log.error("receiver.replica_diverged", peer=conn.peer, files=[str(exc)])
            await _send_quietly(conn, Error("diverged", f"receiver cannot apply: {exc}"))
            kind, message = "diverged", str(exc)
        except (ApplyError, JournalError, OSError) as exc:
            log.error("receiver.storage", peer=conn.peer, error=str(exc))
            await _send_quietly(conn, Error("storage", f"receiver cannot apply: {exc}"))
            kind, message = "storage", str(exc)
        except Exception as exc:
            log.exception("receiver.session_failed", peer=conn.peer)
            await _send_quietly(conn, Error("internal", f"receiver failed: {exc}"))
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
            await _send_quietly(
                conn, Refuse("version", f"receiver speaks protocol {PROTOCOL_VERSION}: {exc}")
            )
            return
        if not isinstance(hello, Hello):
            raise RemoteProtocolError(f"expected Hello, got {type(hello).__name__}")
        refusal = self._check_hello(hello)
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


class Session:
    """One connected sender: the asyncio driver of ``ReceiverCore`` (ingest, sync,
    acknowledge) that also answers manifest and tree requests."""

    def __init__(
        self, conn: FramedConnection, replica: JobReplica, config: ReceiverConfig, *, adopt: bool
    ) -> None:
        self.adopt = adopt  # a replica file the sender asks a manifest of is taken as it is
        self.conn = conn
        self.replica = replica
        self.config = config
        self.core = ReceiverCore(replica.received_lsn, replica.applied_lsn)
        self._sync_wake = asyncio.Event()
        self._sync_lock = asyncio.Lock()

    async def run(self) -> None:
        replica = self.replica
        # records a previous session appended but did not sync yet are valid (checksummed):
        # make them durable so the resume point we announce covers them
        await replica.journal.sync()
        replica.session_started()
        self.core = ReceiverCore(replica.received_lsn, replica.applied_lsn)
        await self.conn.send(
            Welcome(
                protocol_version=PROTOCOL_VERSION,
                received_lsn=replica.received_lsn,
                applied_lsn=replica.applied_lsn,
                window=self.config.window,
                capabilities=("lz4", "manifest"),
                generation=replica.state.generation,
            )
        )
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._syncer())
                tg.create_task(self._applied_acker())
                await self._reader(tg)
                raise _SessionOver  # the reader ended the session: cancel syncer and acker
        except* _SessionOver:
            pass

    async def _send_all(self, actions: list[Send]) -> None:
        for action in actions:
            await self.conn.send(action.message)

    async def _reader(self, tg: asyncio.TaskGroup) -> None:
        while True:
            msg = await self.conn.recv(timeout=IDLE_TIMEOUT)
            if isinstance(msg, Records):
                records = self.core.records(msg)  # the protocol checked count and LSN order
                try:
                    await self.replica.ingest(records, msg.payload)
                except (JournalError, OSError) as exc:
                    reason = _storage_reason(exc)
                    log.error("receiver.storage", job=self.replica.job, error=reason)
                    await self.conn.send(Error("storage", reason))
                    return
                self.core.ingested(records, len(msg.payload))
                self._sync_wake.set()
            elif isinstance(msg, ManifestRequest):
                tg.create_task(self._answer_manifest(msg))
            elif isinstance(msg, TreeRequest):
                tg.create_task(self._answer_tree(msg))
            elif isinstance(msg, Goodbye):
                await self._flush_sync()
                return
            elif isinstance(msg, Error):
                log.warning("receiver.peer_error", code=msg.code, message=msg.message)
                return
            elif isinstance(msg, Ping | Pong):
                await self._send_all(self.core.control(msg))
            else:
                raise RemoteProtocolError(f"unexpected {type(msg).__name__} from a sender")

    async def _flush_sync(self) -> None:
        if self.core.unsynced:
            await self._sync_once()

    async def _sync_once(self) -> None:
        async with self._sync_lock:  # hand records over in LSN order
            await self._sync_locked()

    async def _sync_locked(self) -> None:
        records, granted = self.core.take_unsynced()
        try:
            await self.replica.journal.sync()
        except (JournalError, OSError) as exc:
            reason = _storage_reason(exc)
            log.error("receiver.storage", job=self.replica.job, error=reason)
            await self.conn.send(Error("storage", reason))
            raise StorageFailed(reason) from exc
        self.replica.note_durable(records)
        replica = self.replica
        await self._send_all(self.core.synced(replica.received_lsn, replica.applied_lsn, granted))

    async def _syncer(self) -> None:
        """Runs until the session's TaskGroup cancels it when the reader ends."""
        while True:
            await self._sync_wake.wait()
            self._sync_wake.clear()
            await self._sync_once()

    async def _applied_acker(self) -> None:
        replica = self.replica
        while True:
            async with replica.applied_changed:
                await replica.applied_changed.wait()
            failure = replica.failure
            if failure is not None:
                code = "diverged" if isinstance(failure, ReplicaDiverged) else "storage"
                await self.conn.send(Error(code, f"receiver cannot apply: {failure}"))
                raise ConnectionClosedError("apply failed")
            await self._send_all(self.core.applied(replica.received_lsn, replica.applied_lsn))

    async def _answer_manifest(self, req: ManifestRequest) -> None:
        problem = path_problem(req.volume)
        if problem is not None:
            await self.conn.send(Error("name", problem))
            return
        # Everything received is applied first, so the manifest and the sender's view of
        # "what the receiver has" agree (see docs/ARCHITECTURE.md, differential sync).
        await self.replica.apply_pending(force=True)
        if self.adopt:
            await self.replica.adopt(req.volume)
        chunks = self.replica.replica_manifest(req.volume, req.extent_size)
        first = 0
        part = await asyncio.to_thread(next, chunks)
        while True:
            nxt = await asyncio.to_thread(next, chunks, None)
            exists, size, digests = part
            await self.conn.send(
                Manifest(
                    req.request_id,
                    req.volume,
                    exists,
                    size,
                    req.extent_size,
                    first,
                    digests,
                    nxt is None,
                )
            )
            if nxt is None:
                return
            first += len(digests) // DIGEST_SIZE
            part = nxt

    async def _answer_tree(self, req: TreeRequest) -> None:
        # as for manifests: the listing is of the replica with everything received applied
        await self.replica.apply_pending(force=True)
        parts = await asyncio.to_thread(replica_tree_parts, self.replica.replica_dir)
        for i, part in enumerate(parts):
            await self.conn.send(Tree(req.request_id, i == len(parts) - 1, part))


def replica_tree_parts(root: Path, part_bytes: int = MAX_TREE_PART // 2) -> list[bytes]:
    """The replica folder ``root`` as Tree listings of about ``part_bytes`` each (at least
    one, empty when the folder does not exist). Symlinks are listed, never followed; names
    that could not come from a sender are left out (the sender cannot name them either)."""
    entries: list[TreeEntry] = []
    parts: list[bytes] = []
    size = 0
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in sorted([*dirnames, *filenames]):
            path = name if rel == "." else f"{rel}/{name}"
            if path_problem(path) is not None:
                continue
            try:
                st = os.lstat(os.path.join(dirpath, name))
                if stat.S_ISLNK(st.st_mode):
                    entry = TreeEntry(path, "l", 0, os.readlink(os.path.join(dirpath, name)))
                elif stat.S_ISDIR(st.st_mode):
                    entry = TreeEntry(path, "d", st.st_mode & 0o7777, "")
                elif stat.S_ISREG(st.st_mode):
                    entry = TreeEntry(path, "f", st.st_mode & 0o7777, "")
                else:
                    continue
            except (OSError, MessageError):  # gone meanwhile, or a target we cannot carry
                continue
            entries.append(entry)
            size += len(path) + len(entry.target) + 16
            if size >= part_bytes:
                parts.append(encode_tree(entries))
                entries, size = [], 0
    parts.append(encode_tree(entries))
    return parts


def _real_dirs(root: Path, names: tuple[str, ...]) -> None:
    """Create ``root/name`` for each name (in order) as a real folder, never through a
    symlink: a job name comes from the peer, and a symlink planted in the state root
    would put journals and state files outside it. ``root`` itself is the operator's."""
    makedirs_durable(root)
    for name in names:
        path = root / name
        try:
            os.mkdir(path, 0o700)
            sync_dir(path.parent)
        except FileExistsError:
            pass
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(
                f"{path} is not a folder (a symlink?): refusing to keep job state there",
                hint="remove it; the receiver creates the folder itself",
            )


def _paths(record: Record) -> list[str]:
    if not record.volume:
        return []
    return [record.volume, record.target] if record.type is RecordType.RENAME else [record.volume]


class _SessionOver(Exception):
    pass


class StorageFailed(Exception):
    """The receiver could not make records durable; the sender was told why."""


def _storage_reason(exc: BaseException) -> str:
    if isinstance(exc, JournalFull):
        return f"receiver journal is full ({exc}); free space or raise its cap"
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            return "receiver disk is full; free space on the receiver, then send again"
        cause = cause.__cause__
    return f"receiver storage error: {exc}"


async def _send_quietly(conn: FramedConnection, msg: Any) -> None:
    with contextlib.suppress(Exception):
        await conn.send(msg)
