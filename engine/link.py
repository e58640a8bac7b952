"""The sender's end of one connection: handshake, shipping from the journal, acknowledgements.

``Link`` owns two tasks while connected: the *shipper* tails the journal (durable
records only) and packs records into RECORDS frames of about ``FRAME_TARGET`` bytes,
never exceeding the credit the receiver granted; the *reader* handles what the
receiver says (acks, credit, manifests, pongs, errors). On every *applied* ack the
journal is trimmed below it. Records the receiver has only *received* are kept: if its
journal is damaged before it applies them, it asks for them again. Only when our journal
is full are they given up early (``relieve``); a receiver that then loses them gets a
comparison against its replica instead (basis "remote").
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import structlog

from replicator.engine.errors import (
    BusyError,
    ConnectError,
    PeerProtocolError,
    RefusedError,
    ReplicatorError,
    VersionMismatch,
    as_user_error,
)
from replicator.engine.manifest import ExtentManifest
from replicator.engine.volumes import VolumeSpec
from replicator.journal import EncodedRecord, Journal
from replicator.transport import (
    PROTOCOL_VERSION,
    Ack,
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
    Tree,
    TreeEntry,
    TreeRequest,
    VolumeInfo,
    Welcome,
)
from replicator.transport.messages import MAX_VOLUMES

log = structlog.get_logger()

FRAME_TARGET = 2 * 1024 * 1024
HANDSHAKE_TIMEOUT = 30.0
PING_INTERVAL = 15.0
REPLY_TIMEOUT = 120.0  # a silent receiver is declared gone after this long


class SessionPurpose(enum.Enum):
    """What a session does with the replica, announced as Hello capabilities.

    REPLICATE: build on the replica; files changed outside replication are refused.
    RESYNC (``send --resync``, ``verify --repair``): compare with the replica as it is and
    send what differs; the receiver takes its files as they are.
    VERIFY: only compare; nothing is refused or taken over, differences are reported.
    """

    REPLICATE = ()
    RESYNC = ("resync",)
    VERIFY = ("verify",)

    @property
    def capabilities(self) -> tuple[str, ...]:
        return tuple(self.value)


def refusal_error(code: str, message: str) -> ReplicatorError:
    if code == "version":
        return VersionMismatch(f"protocol version mismatch: {message}")
    if code == "protocol":
        return PeerProtocolError(f"receiver reported a protocol error: {message}")
    if code == "diverged":
        return RefusedError(
            f"receiver refused (diverged): {message}; nothing was written",
            hint="the replica was changed on the target outside replication: run send again "
            "with --resync to compare with the replica as it is now and send what differs",
        )
    if code == "busy":
        return BusyError(f"receiver refused (busy): {message}")
    return RefusedError(f"receiver refused ({code}): {message}")


class Link:
    def __init__(self, conn: FramedConnection, journal: Journal) -> None:
        self.conn = conn
        self.journal = journal
        self.received_lsn = 0
        self.applied_lsn = 0
        self.credit = 0
        self.window = 0
        self.space_freed = asyncio.Event()
        self._changed = asyncio.Condition()
        # answers to ManifestRequests and TreeRequests (one id space), by request id
        self._manifests: dict[int, asyncio.Queue[Manifest | Tree | None]] = {}
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self._failure: BaseException | None = None
        self._closed = False
        # (last lsn, source ts of first record, payload bytes) of frames not yet applied
        self._in_flight: collections.deque[tuple[int, int, int]] = collections.deque()
        self._oldest_queued_ts = 0

    async def handshake(
        self,
        job: str,
        volumes: list[VolumeSpec],
        sizes: dict[str, int],
        *,
        purpose: SessionPurpose = SessionPurpose.REPLICATE,
    ) -> Welcome:
        """``purpose`` tells the receiver how to treat replica files changed outside
        replication (see ``SessionPurpose``)."""
        hello = Hello(
            protocol_version=PROTOCOL_VERSION,
            job=job,
            # a courtesy list for early name checks (records are checked on arrival anyway),
            # so a big VM folder is announced only in part, and files gone since the start
            # (a FUSE folder changes while it is served) are left out
            volumes=tuple(
                VolumeInfo(v.name, sizes[v.name], v.kind.value)
                for v in [v for v in volumes if v.name in sizes][:MAX_VOLUMES]
            ),
            capabilities=("lz4", "manifest", *purpose.capabilities),
            generation=0,
            session=uuid.uuid4().hex,
        )
        await self.conn.send(hello)
        reply = await self.conn.recv(timeout=HANDSHAKE_TIMEOUT)  # callers map errors
        if isinstance(reply, Refuse | Error):
            raise refusal_error(reply.code, reply.message)
        if not isinstance(reply, Welcome):
            raise PeerProtocolError(f"receiver answered Hello with {type(reply).__name__}")
        self.received_lsn = reply.received_lsn
        self.applied_lsn = reply.applied_lsn
        self.credit = self.window = reply.window
        return reply

    def start_reader(self) -> None:
        """Start handling what the receiver says (acks, credit, manifests) and heartbeats."""
        self._tasks += [
            asyncio.create_task(self._guard(self._reader()), name="link-reader"),
            asyncio.create_task(self._guard(self._pinger()), name="link-pinger"),
        ]

    def start_shipper(self, ship_from: int) -> None:
        """Start shipping journal records with lsn >= ship_from.

        Started only after the basis is chosen: records shipped and acknowledged are
        trimmed, and basis selection must still see every record after ``received_lsn``.
        """
        self._tasks.append(
            asyncio.create_task(self._guard(self._shipper(ship_from)), name="link-shipper")
        )

    async def _guard(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if self._failure is None:
                self._failure = as_user_error(exc)
            self.space_freed.set()
            async with self._changed:
                self._changed.notify_all()
            for q in self._manifests.values():
                q.put_nowait(None)  # wakes request_manifest, which re-raises

    def _check(self) -> None:
        if self._failure is not None:
            raise self._failure

    @property
    def failed(self) -> bool:
        """True once the link's tasks ended with an error (the connection is unusable)."""
        return self._failure is not None

    def raise_if_failed(self) -> None:
        """Raise the error that ended the link's tasks, if any."""
        self._check()

    async def _reader(self) -> None:
        while not self._closed:
            msg = await self.conn.recv(timeout=REPLY_TIMEOUT)
            if isinstance(msg, Ack):
                async with self._changed:
                    self.received_lsn = max(self.received_lsn, msg.received_lsn)
                    self.applied_lsn = max(self.applied_lsn, msg.applied_lsn)
                    while self._in_flight and self._in_flight[0][0] <= self.applied_lsn:
                        self._in_flight.popleft()
                    self._changed.notify_all()
                await self.journal.trim(self.applied_lsn + 1)
                self.space_freed.set()
            elif isinstance(msg, Credit):
                async with self._changed:
                    self.credit += msg.window_bytes
                    self._changed.notify_all()
            elif isinstance(msg, Manifest | Tree):
                queue = self._manifests.get(msg.request_id)
                if queue is None:
                    raise PeerProtocolError(f"answer for unknown request {msg.request_id}")
                queue.put_nowait(msg)
            elif isinstance(msg, Ping):
                await self.conn.send(Pong(msg.nonce, msg.ts_ns))
            elif isinstance(msg, Pong):
                continue
            elif isinstance(msg, Error):
                raise refusal_error(msg.code, msg.message)
            elif isinstance(msg, Goodbye):
                raise ConnectError(f"receiver closed the session: {msg.reason}")
            else:
                raise PeerProtocolError(f"unexpected {type(msg).__name__} from the receiver")

    async def _pinger(self) -> None:
        nonce = itertools.count(1)
        while not self._closed:
            await asyncio.sleep(PING_INTERVAL)
            await self.conn.send(Ping(next(nonce), time.time_ns()))

    async def _shipper(self, ship_from: int) -> None:
        # batches as the journal reads them (about READ_CHUNK bytes): a frame fills up to
        # FRAME_TARGET from several small records without an await per record
        queue: asyncio.Queue[list[EncodedRecord]] = asyncio.Queue(maxsize=2)

        async def tail() -> None:
            async for batch in self.journal.follow_encoded(ship_from):
                await queue.put(batch)  # checked bytes as stored: shipped without re-encoding

        tailer = asyncio.create_task(tail(), name="link-tail")
        pending: collections.deque[EncodedRecord] = collections.deque()
        try:
            while True:
                if not pending:
                    self._oldest_queued_ts = 0
                    pending.extend(await _get_or_fail(queue, tailer))
                first = last = pending.popleft()
                self._oldest_queued_ts = first.ts_ns
                parts = [first.raw]
                size = len(first.raw)
                # pack records up to FRAME_TARGET, never beyond what the window can cover
                while size < FRAME_TARGET:
                    if not pending:
                        if queue.empty():
                            break
                        pending.extend(queue.get_nowait())
                    if size + len(pending[0].raw) > self.window:
                        break
                    last = pending.popleft()
                    parts.append(last.raw)
                    size += len(last.raw)
                await self._wait_credit(size)
                payload = b"".join(parts)
                async with self._changed:
                    self.credit -= len(payload)
                self._in_flight.append((last.lsn, first.ts_ns, len(payload)))
                await self.conn.send(Records(first.lsn, last.lsn, len(parts), first.ts_ns, payload))
        finally:
            tailer.cancel()
            with contextlib.suppress(BaseException):
                await tailer

    async def _wait_credit(self, size: int) -> None:
        async with self._changed:
            while self.credit < size:
                self._check()
                await self._changed.wait()
            self._check()

    async def relieve(self) -> None:
        """Our journal is full: drop records the receiver holds durably but has not applied
        yet (a whole epoch being received, say), instead of waiting for an apply that
        waits for the rest of the epoch."""
        if self.received_lsn > self.applied_lsn:
            log.info("sender.journal_pressure", trim_below=self.received_lsn + 1)
            await self.journal.trim(self.received_lsn + 1)

    async def request_manifest(self, volume: str, extent_size: int) -> ExtentManifest | None:
        """The receiver's manifest of a replica, or None when the replica does not exist."""
        digests = bytearray()
        last: Manifest | None = None
        async for part in self._answers(
            ManifestRequest(next(self._ids), volume, extent_size, True)
        ):
            assert isinstance(part, Manifest)
            digests += part.digests  # the protocol checked order and coverage
            last = part
        assert last is not None
        if not last.exists:
            return None
        return ExtentManifest(extent_size, last.size, digests)

    async def request_tree(self) -> list[TreeEntry]:
        """What the job's replica folder holds (the receiver applies what it has first)."""
        entries: list[TreeEntry] = []
        async for part in self._answers(TreeRequest(next(self._ids))):
            assert isinstance(part, Tree)
            entries.extend(part.entries())
        return entries

    async def _answers(
        self, request: ManifestRequest | TreeRequest
    ) -> AsyncIterator[Manifest | Tree]:
        """Send ``request`` and yield its answer's parts up to the one marked done."""
        rid = request.request_id
        queue: asyncio.Queue[Manifest | Tree | None] = asyncio.Queue()
        self._manifests[rid] = queue
        try:
            await self.conn.send(request)
            while True:
                async with asyncio.timeout(REPLY_TIMEOUT * 10):
                    part = await queue.get()
                self._check()
                if part is None:
                    raise ConnectError("connection failed while waiting for the receiver's answer")
                yield part
                if part.done:
                    return
        finally:
            del self._manifests[rid]

    async def wait_applied(self, lsn: int, timeout: float | None = None) -> None:
        async with asyncio.timeout(timeout), self._changed:
            while self.applied_lsn < lsn:
                self._check()
                await self._changed.wait()
            self._check()

    def lag(self) -> dict[str, float]:
        """What the receiver has not applied yet: records, bytes shipped, age in seconds.

        The age is measured from the source timestamp of the oldest record not yet
        applied (shipped or still queued), so it is the replica's RPO right now.
        """
        oldest = self._in_flight[0][1] if self._in_flight else self._oldest_queued_ts
        age = max(0.0, (time.time_ns() - oldest) / 1e9) if oldest else 0.0
        return {
            "records": max(0, self.journal.last_lsn - self.applied_lsn),
            "bytes": sum(size for _, _, size in self._in_flight),
            "seconds": round(age, 3) if self.journal.last_lsn > self.applied_lsn else 0.0,
        }

    async def goodbye(self, reason: str = "done") -> None:
        with contextlib.suppress(Exception):
            await self.conn.send(Goodbye(reason))

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        await self.conn.aclose()


async def _get_or_fail(
    queue: asyncio.Queue[list[EncodedRecord]], tailer: asyncio.Task[None]
) -> list[EncodedRecord]:
    getter = asyncio.ensure_future(queue.get())
    done, _ = await asyncio.wait({getter, tailer}, return_when=asyncio.FIRST_COMPLETED)
    if getter in done:
        return getter.result()
    getter.cancel()
    tailer.result()  # raises the tailer's error
    raise ConnectError("journal follower ended")
