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
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from replicator.engine.applier import Applier, ApplyError
from replicator.engine.errors import ConfigError, first_error
from replicator.engine.manifest import digest_chunks
from replicator.engine.names import check_job_name, path_problem
from replicator.engine.volumes import DIGEST_SIZE
from replicator.journal import (
    Journal,
    JournalError,
    JournalFull,
    Record,
    RecordType,
    decode_records,
)
from replicator.journal.durable import makedirs_durable, read_state, write_state_async
from replicator.transport import (
    PROTOCOL_VERSION,
    Ack,
    ConnectionClosedError,
    Credit,
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

log = structlog.get_logger()

APPLY_BATCH_BYTES = 8 * 1024 * 1024
MEM_APPLY_BYTES = 48 * 1024 * 1024  # durable records kept in memory for the applier
MANIFEST_CHUNK = 64 * 1024  # digests per Manifest message (1 MiB)
HELLO_TIMEOUT = 30.0
IDLE_TIMEOUT = 120.0


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
    """Receiver-side state of one job: journal, applied LSN, the applier."""

    def __init__(self, job: str, config: ReceiverConfig, journal: Journal, applied: int) -> None:
        self.job = job
        self.config = config
        self.journal = journal
        self.applied_lsn = applied
        self.replica_dir = config.replica_root / job
        self.state_dir = config.state_root / job
        self.session_lock = asyncio.Lock()
        self.last_barrier = applied
        # Records made durable by a session, kept so the applier need not read them back
        # from the journal. Valid only while it holds *every* durable record after the
        # applied LSN; dropped (and the journal read instead) when it would grow too big.
        self._mem: collections.deque[Record] = collections.deque()
        self._mem_bytes = 0
        self._mem_ok = journal.durable_lsn == applied
        self._noted = applied  # highest LSN handed to note_durable (or applied)
        self._applier = Applier(self.replica_dir)
        self._wake = asyncio.Event()
        self.applied_changed = asyncio.Condition()
        self._apply_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.failure: BaseException | None = None
        self._closed = False

    @classmethod
    async def open(cls, job: str, config: ReceiverConfig) -> JobReplica:
        state_dir = config.state_root / job
        await asyncio.to_thread(makedirs_durable, state_dir)
        state = await asyncio.to_thread(read_state, state_dir / "applied.state")
        applied = int(state["applied_lsn"]) if state else 0
        journal = await Journal.open(
            state_dir / "journal",
            segment_bytes=config.segment_bytes,
            max_bytes=config.journal_max_bytes,
        )
        self = cls(job, config, journal, applied)
        # find the last complete barrier already received (a crash may have cut an apply short)
        async for record in journal.read_from(max(applied + 1, journal.first_lsn)):
            if record.is_barrier:
                self.last_barrier = record.lsn
        if self.last_barrier > applied:
            log.info("receiver.recover", job=job, applied=applied, upto=self.last_barrier)
            await self.apply_pending()
        self._task = asyncio.create_task(self._apply_loop(), name=f"apply-{job}")
        return self

    @property
    def broken(self) -> bool:
        return self.failure is not None or self.journal.failed

    @property
    def received_lsn(self) -> int:
        return self.journal.durable_lsn

    async def ingest(self, records: list[Record], encoded: bytes | None = None) -> None:
        """Append records (already checksum-verified) to the receive journal.

        ``encoded`` is their exact encoding (the RECORDS payload they were decoded from).
        """
        for record in records:
            paths = [record.volume] if record.volume else []
            if record.type is RecordType.RENAME:
                paths.append(record.target)
            for path in paths:
                problem = path_problem(path)
                if problem is not None:
                    raise ApplyError(f"refusing record lsn {record.lsn}: {problem}")
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
                self._mem.clear()
                self._mem_bytes = 0
                self._mem_ok = False
        self._wake.set()

    def session_started(self) -> None:
        """A new session begins: records an earlier one made durable without handing them
        over (it ended between its append and its sync) exist only in the journal."""
        if self.journal.durable_lsn > self._noted:
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
        start = max(self.applied_lsn + 1, self.journal.first_lsn)
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
        """Apply records up to the last durable barrier (or all durable ones when ``force``)."""
        async with self._apply_lock:
            t0 = time.perf_counter()
            target = self.journal.durable_lsn if force else self.last_barrier
            if target <= self.applied_lsn:
                return self.applied_lsn
            batch: list[Record] = []
            size = 0
            async for record in self._records_upto(target):
                batch.append(record)
                size += record.encoded_size
                if size >= APPLY_BATCH_BYTES:
                    await asyncio.to_thread(self._applier.apply_many, batch)
                    batch, size = [], 0
            if batch:
                await asyncio.to_thread(self._applier.apply_many, batch)
            t1 = time.perf_counter()
            await asyncio.to_thread(self._applier.barrier)
            t2 = time.perf_counter()
            await write_state_async(
                self.state_dir / "applied.state", {"applied_lsn": target, "job": self.job}
            )
            self.applied_lsn = target
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
                apply_ms=round((t1 - t0) * 1000, 1),
                fsync_ms=round((t2 - t1) * 1000, 1),
                total_ms=round((time.perf_counter() - t0) * 1000, 1),
            )
            return target

    def replica_manifest(self, volume: str, extent_size: int) -> Iterator[tuple[bool, int, bytes]]:
        """(exists, size, digests of up to MANIFEST_CHUNK extents) of a replica, read afresh.

        A generator, so a huge replica is hashed and sent a chunk at a time, never held
        whole in memory. Blocking: drive it from a worker thread.
        """
        fd = self._applier.open_readonly(volume)  # never reads outside the replica folder
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
        with contextlib.suppress(Exception):
            await self.apply_pending()
        self._applier.close()
        await self.journal.aclose()


class Receiver:
    """Serves many senders at once, one session per job at a time."""

    def __init__(self, config: ReceiverConfig) -> None:
        self.config = config
        self._jobs: dict[str, JobReplica] = {}
        self._jobs_lock = asyncio.Lock()
        self._sessions: set[asyncio.Task[Any]] = set()
        self._closing = False

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
            return replica

    async def handle(self, conn: FramedConnection) -> None:
        """Run one sender session to its end; never raises (errors are logged and sent)."""
        task = asyncio.current_task()
        if task is not None:
            self._sessions.add(task)
        try:
            try:
                await self._handle(conn)
            except BaseExceptionGroup as group:
                raise first_error(group) from group
        except (ConnectionClosedError, ConnectionError, TimeoutError) as exc:
            log.info("receiver.session_lost", peer=conn.peer, reason=str(exc) or type(exc).__name__)
        except StorageFailed as exc:
            log.warning("receiver.session_ended", peer=conn.peer, reason=str(exc))
        except RemoteProtocolError as exc:
            log.warning("receiver.protocol_error", peer=conn.peer, error=str(exc))
            await _send_quietly(conn, Error("protocol", str(exc)))
        except Exception as exc:
            log.exception("receiver.session_failed", peer=conn.peer)
            await _send_quietly(conn, Error("internal", f"receiver failed: {exc}"))
        finally:
            await conn.aclose()
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
        except OSError as exc:
            await conn.send(Refuse("storage", f"receiver cannot open job state: {exc}"))
            return
        if replica.session_lock.locked():
            await conn.send(
                Refuse("busy", f"job {hello.job!r} already has a sender connected to this receiver")
            )
            return
        async with replica.session_lock:
            log.info("receiver.session", job=hello.job, peer=conn.peer, session=hello.session)
            await Session(conn, replica, self.config).run()

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
    """One connected sender: ingest, sync, acknowledge, answer manifest requests."""

    def __init__(self, conn: FramedConnection, replica: JobReplica, config: ReceiverConfig) -> None:
        self.conn = conn
        self.replica = replica
        self.config = config
        self._unsynced: list[Record] = []
        self._unsynced_bytes = 0
        self._sync_wake = asyncio.Event()
        self._sync_lock = asyncio.Lock()

    async def run(self) -> None:
        replica = self.replica
        # records a previous session appended but did not sync yet are valid (checksummed):
        # make them durable so the resume point we announce covers them
        await replica.journal.sync()
        replica.session_started()
        await self.conn.send(
            Welcome(
                protocol_version=PROTOCOL_VERSION,
                received_lsn=replica.received_lsn,
                applied_lsn=replica.applied_lsn,
                window=self.config.window,
                capabilities=("lz4", "manifest"),
                generation=0,
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

    async def _reader(self, tg: asyncio.TaskGroup) -> None:
        while True:
            msg = await self.conn.recv(timeout=IDLE_TIMEOUT)
            if isinstance(msg, Records):
                records = decode_records(msg.payload)  # count and LSN order: see Records
                if records[0].lsn <= self.replica.journal.last_lsn:
                    raise RemoteProtocolError(
                        f"records lsn {records[0].lsn} not after {self.replica.journal.last_lsn}"
                    )
                try:
                    await self.replica.ingest(records, msg.payload)
                except (JournalError, OSError) as exc:
                    reason = _storage_reason(exc)
                    log.error("receiver.storage", job=self.replica.job, error=reason)
                    await self.conn.send(Error("storage", reason))
                    return
                except ApplyError as exc:
                    await self.conn.send(Error("name", str(exc)))
                    return
                self._unsynced.extend(records)
                self._unsynced_bytes += len(msg.payload)
                self._sync_wake.set()
            elif isinstance(msg, ManifestRequest):
                tg.create_task(self._answer_manifest(msg))
            elif isinstance(msg, Ping):
                await self.conn.send(Pong(msg.nonce, msg.ts_ns))
            elif isinstance(msg, Pong):
                continue
            elif isinstance(msg, Goodbye):
                await self._flush_sync()
                return
            elif isinstance(msg, Error):
                log.warning("receiver.peer_error", code=msg.code, message=msg.message)
                return
            else:
                raise RemoteProtocolError(f"unexpected {type(msg).__name__} from a sender")

    async def _flush_sync(self) -> None:
        if self._unsynced_bytes or self._unsynced:
            await self._sync_once()

    async def _sync_once(self) -> None:
        async with self._sync_lock:  # hand records over in LSN order
            await self._sync_locked()

    async def _sync_locked(self) -> None:
        records, self._unsynced = self._unsynced, []
        granted, self._unsynced_bytes = self._unsynced_bytes, 0
        try:
            await self.replica.journal.sync()
        except (JournalError, OSError) as exc:
            reason = _storage_reason(exc)
            log.error("receiver.storage", job=self.replica.job, error=reason)
            await self.conn.send(Error("storage", reason))
            raise StorageFailed(reason) from exc
        self.replica.note_durable(records)
        await self.conn.send(Ack(self.replica.received_lsn, self.replica.applied_lsn))
        if granted:
            await self.conn.send(Credit(granted))

    async def _syncer(self) -> None:
        """Runs until the session's TaskGroup cancels it when the reader ends."""
        while True:
            await self._sync_wake.wait()
            self._sync_wake.clear()
            await self._sync_once()

    async def _applied_acker(self) -> None:
        last = self.replica.applied_lsn
        while True:
            async with self.replica.applied_changed:
                await self.replica.applied_changed.wait()
            if self.replica.failure is not None:
                reason = f"receiver cannot apply: {self.replica.failure}"
                await self.conn.send(Error("storage", reason))
                raise ConnectionClosedError("apply failed")
            if self.replica.applied_lsn != last:
                last = self.replica.applied_lsn
                await self.conn.send(Ack(self.replica.received_lsn, last))

    async def _answer_manifest(self, req: ManifestRequest) -> None:
        problem = path_problem(req.volume)
        if problem is not None:
            await self.conn.send(Error("name", problem))
            return
        # Everything received is applied first, so the manifest and the sender's view of
        # "what the receiver has" agree (see docs/ARCHITECTURE.md, differential sync).
        await self.replica.apply_pending(force=True)
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
