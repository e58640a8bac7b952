"""The sender's end of one connection: the asyncio driver of ``SenderCore``.

``Link`` owns two tasks while connected: the *shipper* tails the journal (durable records
only) and sends the Records frames the core packs, each once the protocol's credit covers
it; the *reader* hands what the receiver says to the core and carries out its actions (trim
the journal, wake waiters, send a Pong, deliver a Manifest or Tree answer). The rules
themselves (packing, what an ack means, the lag, what a refusal means) are the core's: see
``engine/session_core.py``. Only when our journal is full are records the receiver holds
but has not applied given up early (``relieve``); a receiver that then loses them gets a
comparison against its replica instead (basis "remote").
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import functools
import itertools
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog

from replicator.engine.errors import ConnectError, PeerProtocolError, as_user_error
from replicator.engine.manifest import ExtentManifest
from replicator.engine.session_core import (
    FRAME_TARGET,
    Deliver,
    HandoverStep,
    Send,
    SenderCore,
    Trim,
    refusal_error,
)
from replicator.engine.volumes import VolumeSpec
from replicator.journal import EncodedRecord, Journal, Record
from replicator.journal.records import encode_parts
from replicator.transport import (
    PROTOCOL_VERSION,
    Error,
    FramedConnection,
    Goodbye,
    Handover,
    Hello,
    Manifest,
    ManifestRequest,
    Ping,
    PointFloor,
    ReadData,
    ReadRequest,
    Refuse,
    RemoteProtocolError,
    Tree,
    TreeEntry,
    TreeRequest,
    VersionMismatchError,
    VolumeInfo,
    Welcome,
)
from replicator.transport.frames import NOT_A_PEER
from replicator.transport.messages import (
    CAP_HANDOVER_REFUSAL,
    CAP_WALL_CLOCK,
    MAX_VOLUMES,
    Message,
)

log = structlog.get_logger()


class SilentPeerError(PeerProtocolError):
    """The peer took the connection and answered our Hello with nothing: no replicator
    receiver, or one that is stuck (stopped, overloaded): the caller knows which is
    likelier (``Sender.connect_retrying``)."""


HANDSHAKE_TIMEOUT = 30.0
# a receiver answers a Hello at once, or pings while it opens the job (recovering its
# journal after a crash); something silent for this long is not one (a web server waiting
# for a request line). After a ping, HANDSHAKE_TIMEOUT is the silence allowed.
FIRST_ANSWER_TIMEOUT = 5.0
_NOT_A_RECEIVER_HINT = "check --to: it must be the HOST:PORT `replicator receive --listen` uses"
PING_INTERVAL = 15.0
GOODBYE_TIMEOUT = 2.0  # a Goodbye the receiver does not take by then is not waited for
# a receiver that sent nothing for this long is declared gone: the connection is aborted
# (``FramedConnection.abort_when_silent``), which also wakes a send blocked in drain
REPLY_TIMEOUT = 120.0
# a stopping sender ships on for this long while the receiver applies everything (a stop
# right after a sync cycle ends tidy), then ships nothing more ...
STOP_GRACE = 2.0
# ... and waits this long for what it had sent to be applied (and trimmed from the journal)
STOP_SETTLE = 2.0
# ... but only while the receiver shows it is there: a stopping sender gives up waiting
# once, for this long, the receiver said nothing and took none of our bytes (its window
# stays closed: stopped, stuck; or the network between us holds everything). Records it
# has not applied stay in the journal for the next run; nothing acknowledged is touched.
STOP_STALL = 1.0
_STALL_POLL = 0.1  # how often a stopping sender looks at the connection
STALLED_GOODBYE = 0.2  # a Goodbye to a stalled receiver: into the buffers, if they take it
STALLED_CLOSE = 0.5  # its lingering close (read its last words) is cut after this long


class StopWatch:
    """Whether a receiver is still there while a sender stops: it said something, or its
    side took more of our bytes (``FramedConnection.delivered``), within ``STOP_STALL``
    seconds (counted from the stop's start at first)."""

    def __init__(self, conn: FramedConnection) -> None:
        self.conn = conn
        self.started = self._progress = time.monotonic()
        self._heard = conn.last_received
        self._delivered = conn.delivered()
        self._pinged = -STOP_STALL
        self._ping_bytes = 0
        self.stalled = False

    def check(self) -> bool:
        """True (and ``stalled`` set) once the receiver has shown nothing for STOP_STALL.
        Pings it every half of that: a receiver that is there answers, also while it
        syncs a large tail to its disk and has nothing else to say."""
        now = time.monotonic()
        if now - self._pinged >= STOP_STALL / 2:
            self._pinged = now
            before = self.conn.bytes_sent
            with contextlib.suppress(Exception):  # a failed link is the caller's to see
                self.conn.send_now(Ping(0, time.time_ns()))
            # our pings taken by its kernel are no sign of the receiver: not counted
            self._ping_bytes += self.conn.bytes_sent - before
        heard, delivered = self.conn.last_received, self.conn.delivered()
        if delivered is not None:
            delivered -= self._ping_bytes
        if heard > self._heard:
            self._heard, self._progress = heard, now
        if delivered is not None and (self._delivered is None or delivered > self._delivered):
            self._delivered, self._progress = delivered, now
        self.stalled = self.stalled or now - self._progress >= STOP_STALL
        return self.stalled


class SessionPurpose(enum.Enum):
    """What a session does with the replica, announced as Hello capabilities.

    REPLICATE: build on the replica; files changed outside replication are refused.
    RESYNC (``send --resync``, ``verify --repair``): compare with the replica as it is and
    send what differs; the receiver takes its files as they are.
    VERIFY: only compare; nothing is refused or taken over, differences are reported.
    FAILBACK (``replicator failback``): read a promoted replica, then hand the roles back.
    """

    # Each value is the capability announcing it (REPLICATE announces none). Not tuples:
    # Debian 12's Python 3.11.2 turns an empty-tuple member value into a bare object()
    # (later 3.11 releases do not), and every plain `send` failed there with a TypeError.
    REPLICATE = ""
    RESYNC = "resync"
    VERIFY = "verify"
    FAILBACK = "failback"

    @property
    def capabilities(self) -> tuple[str, ...]:
        return (self.value,) if self.value else ()


@dataclass(slots=True)
class ShippedUnchecked:
    """The last LSN a sender shipped without verifying its checksum itself (0: none).

    To a receiver that checks every record's checksum on arrival (it announces
    ``records-checked``), the shipper leaves checking to it, so each byte of a journaled
    write is hashed twice on the way (capture, receiver) instead of three times, the middle
    one on the sender's busiest thread. Every record was checked once already: at the
    sender's start (a sender's journal is verified whole when opened) or from memory as it
    was appended, so only damage done to the file while the sender runs goes unchecked
    here. The receiver refuses such a record and the session ends; the next session of the
    same sender checks every record up to this LSN itself before shipping it, so the damage
    is found on our side (JournalCorrupt, exit 8; the journal is cut at the next start)
    instead of the same record being shipped and refused again and again.

    One per sender, shared by its sessions' links; raised before a frame is sent, so a
    frame the receiver refused is always counted.
    """

    lsn: int = 0


class Link:
    def __init__(
        self,
        conn: FramedConnection,
        journal: Journal,
        *,
        unchecked: ShippedUnchecked | None = None,
    ) -> None:
        """``unchecked``: ship records the receiver checks without checking them here
        (see ``ShippedUnchecked``); None: check every record before it is shipped."""
        self.conn = conn
        self.journal = journal
        self._unchecked = unchecked
        self.core: SenderCore | None = None  # set by the handshake
        self.space_freed = asyncio.Event()
        self._changed = asyncio.Condition()
        # answers to ManifestRequests and TreeRequests (one id space), by request id
        self._answer_queues: dict[int, asyncio.Queue[Manifest | Tree | ReadData | None]] = {}
        # Handover steps the receiver took (planned failover, failback); None: link failed
        self.handover_steps: asyncio.Queue[Handover | None] = asyncio.Queue()
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self._shipper_task: asyncio.Task[None] | None = None
        self.sent_lsn = 0  # the last LSN of the last Records frame written
        # batches for the shipper: the journal's tail, and records shipped without the
        # journal (``ship_direct``); made by start_shipper
        self._out: asyncio.Queue[list[EncodedRecord]] = asyncio.Queue(maxsize=2)
        self._ship_from = 0
        self.direct_lsn = 0  # the last LSN shipped without the journal (0: none)
        self._direct_batches: collections.deque[tuple[int, int]] = collections.deque()
        self._failure: BaseException | None = None
        self._closed = False
        self._stalled = False  # a stop found the receiver stalled (``goodbye``)

    @property
    def received_lsn(self) -> int:
        return self.core.received_lsn if self.core else 0

    @property
    def applied_lsn(self) -> int:
        return self.core.applied_lsn if self.core else 0

    async def handshake(
        self,
        job: str,
        volumes: list[VolumeSpec],
        sizes: dict[str, int],
        *,
        purpose: SessionPurpose = SessionPurpose.REPLICATE,
        generation: int = 0,
        session: str | None = None,
    ) -> Welcome:
        """``purpose`` tells the receiver how to treat replica files changed outside
        replication (see ``SessionPurpose``); ``generation`` is the history this sender
        last replicated under (0: unknown; see ``engine/generations.py``); ``session`` the
        session id (``ImageLocks.session_id``: it names the sender's lock mark)."""
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
            # wall-clock: our Pings carry our wall clock (the receiver's lag allows for an
            # offset between the two hosts' clocks: engine/source_clock.py)
            capabilities=("lz4", "manifest", CAP_WALL_CLOCK, *purpose.capabilities),
            generation=generation,
            session=session or uuid.uuid4().hex,
        )
        await self.conn.send(hello)
        reply = await self._first_answer()
        if isinstance(reply, Refuse | Error):
            raise refusal_error(reply.code, reply.message)
        if not isinstance(reply, Welcome):
            raise PeerProtocolError(f"receiver answered Hello with {type(reply).__name__}")
        self.core = SenderCore(reply)
        return reply

    async def _first_answer(self) -> Message:
        """The reply to our Hello; a peer whose first bytes are not a frame, or who says
        nothing at all, is "not a replicator receiver" (exit 7), not a lost connection."""
        peer = self.conn.peer
        try:
            try:
                reply = await self.conn.recv(timeout=FIRST_ANSWER_TIMEOUT)
            except TimeoutError:
                if self.conn.bytes_received:  # part of a frame: a receiver, slow to answer
                    return await self.conn.recv(timeout=HANDSHAKE_TIMEOUT)  # callers map errors
                self.conn.abort()  # no goodbye to wait for from something that is not ours
                raise SilentPeerError(
                    f"{peer} is not a replicator receiver: it sent nothing within "
                    f"{FIRST_ANSWER_TIMEOUT:g} s of our Hello (a receiver answers at once, "
                    "or pings while it opens the job)",
                    hint=_NOT_A_RECEIVER_HINT,
                ) from None
            while isinstance(reply, Ping):  # a receiver still opening the job
                reply = await self.conn.recv(timeout=HANDSHAKE_TIMEOUT)  # callers map errors
            return reply
        except RemoteProtocolError as exc:
            if isinstance(exc, VersionMismatchError) or not str(exc).startswith(NOT_A_PEER):
                raise
            self.conn.abort()
            raise PeerProtocolError(
                f"{peer} is not a replicator receiver: {str(exc).removeprefix(NOT_A_PEER)}",
                hint=_NOT_A_RECEIVER_HINT,
            ) from exc

    def _started(self) -> SenderCore:
        if self.core is None:
            raise RuntimeError("Link used before its handshake")
        return self.core

    def start_reader(self) -> None:
        """Start handling what the receiver says (acks, credit, manifests) and heartbeats;
        from now on a receiver silent for REPLY_TIMEOUT is gone."""
        self._started()
        self.conn.abort_when_silent(REPLY_TIMEOUT)
        self._tasks += [
            asyncio.create_task(self._guard(self._reader), name="link-reader"),
            asyncio.create_task(self._guard(self._pinger), name="link-pinger"),
        ]

    def start_shipper(self, ship_from: int) -> None:
        """Start shipping journal records with lsn >= ship_from.

        Started only after the basis is chosen: records shipped and acknowledged are
        trimmed, and basis selection must still see every record after ``received_lsn``.
        """
        self._started()
        self._ship_from = ship_from
        ship = functools.partial(self._shipper, ship_from)
        self._shipper_task = asyncio.create_task(self._guard(ship), name="link-shipper")
        self._tasks.append(self._shipper_task)

    async def stop_shipping(self) -> None:
        """Ship nothing more on this link: the shipper ends, also while a frame waits for
        the shaper (paused at rate 0, say), which then never goes. Records not shipped stay
        in the journal for the next session; nothing acknowledged is undone."""
        task = self._shipper_task
        if task is None or task.done():
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def finish(self, reason: str, grace: float = STOP_GRACE) -> bool:
        """A sender stopping: ship on for up to ``grace`` seconds while the receiver
        applies everything journaled, then stop shipping, give what was sent
        ``STOP_SETTLE`` seconds to be applied, and say Goodbye. Bounded, whatever the rate
        (a low rate, or paused at 0, does not hold the stop for a cycle's worth of bytes),
        and cut short when the receiver stalls (``StopWatch``): what is not applied stays
        in the journal, and the next run ships it. True when the receiver applied all that
        was journaled."""
        last = self.journal.last_lsn
        watch = StopWatch(self.conn)
        await self.wait_applied_while_there(last, grace, watch)
        if self.applied_lsn < last:
            await self.stop_shipping()
            if not watch.stalled:
                await self.wait_applied_while_there(self.sent_lsn, STOP_SETTLE, watch)
        await self.goodbye(reason, stalled=watch.stalled)
        if self.applied_lsn < last:
            self.log_abandoned(last, watch)
        return self.applied_lsn >= last

    async def wait_applied_while_there(self, lsn: int, timeout: float, watch: StopWatch) -> bool:
        """Wait up to ``timeout`` seconds for ``lsn`` to be applied, giving up early once
        ``watch`` finds the receiver stalled, or the link failed. True when applied."""
        deadline = time.monotonic() + timeout
        while self.applied_lsn < lsn and self._failure is None and not watch.check():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, _STALL_POLL)), self._changed:
                    await self._changed.wait()
        return self.applied_lsn >= lsn

    def log_abandoned(self, last: int, watch: StopWatch) -> None:
        """Say what a stop left unapplied, and why it did not wait for it."""
        lag = self.lag()
        waited = time.monotonic() - watch.started
        journaled = self.journal.last_record_lsn
        around = self.direct_lsn > self.applied_lsn or journaled < last  # a first sync's, say
        if self._failure is not None:
            why = f"the link failed: {self._failure}"
        elif watch.stalled:
            why = (
                f"the receiver said nothing and took none of our bytes for {STOP_STALL:g} s "
                "(stopped, stuck, or the network between us holds everything)"
            )
        elif self.applied_lsn >= self.sent_lsn:
            what = "not shipped" if around else "journaled, not shipped"
            why = f"{what} yet: a stop ends the shipping (bounded, at any rate)"
        else:
            why = f"shipped, not applied within {waited:.1f} s"
        after = "they stay in the journal: the next run ships them"
        if around:
            after = (
                "records copied around the journal (a first sync, or the copy of a large "
                "change) are in no journal: the next run sends them again (a first sync "
                "compares with the replica; a later cycle resends what its direct.intent "
                "names)"
            )
            if journaled > self.applied_lsn:
                after += "; the journaled ones stay in the journal and ship with it"
        log.warning(
            "sender.stopped_with_backlog",
            applied_lsn=self.applied_lsn,
            last_lsn=last,
            records=int(lag["records"]),
            bytes=int(lag["bytes"]),
            waited=round(waited, 2),
            why=why,
            next=after,
        )

    async def _guard(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``work`` (made here, so a task cancelled before it starts leaves no
        coroutine behind unawaited), keeping its failure for the link's users."""
        try:
            await work()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if self._failure is None:
                self._failure = as_user_error(exc)
            self.space_freed.set()
            async with self._changed:
                self._changed.notify_all()
            for q in self._answer_queues.values():
                q.put_nowait(None)  # wakes the request, which re-raises
            self.handover_steps.put_nowait(None)

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
        core = self._started()
        while not self._closed:
            msg = await self.conn.recv()  # a silent receiver: see start_reader
            for action in core.receive(msg, credit=self.conn.credit):
                if isinstance(action, Trim):
                    await self.journal.trim(action.upto)
                elif isinstance(action, Send):
                    await self.conn.send(action.message)
                elif isinstance(action, Deliver):
                    queue = self._answer_queues.get(action.message.request_id)
                    if queue is None:
                        raise PeerProtocolError(
                            f"answer for unknown request {action.message.request_id}"
                        )
                    queue.put_nowait(action.message)
                elif isinstance(action, HandoverStep):
                    self.handover_steps.put_nowait(action.message)
                else:  # Woken: credit, or an ack (room in the journal, applied LSN)
                    async with self._changed:
                        self._changed.notify_all()
                    if action.room:
                        self.space_freed.set()

    async def _pinger(self) -> None:
        """A Ping at once, then every PING_INTERVAL: each carries our wall clock, so the
        receiver knows the clocks' offset before the session's first point is applied."""
        nonce = itertools.count(1)
        while not self._closed:
            await self.conn.send(Ping(next(nonce), time.time_ns()))
            await asyncio.sleep(PING_INTERVAL)

    async def _shipper(self, ship_from: int) -> None:
        core = self._started()
        # batches as the journal reads them (about READ_CHUNK bytes): a frame fills up to
        # FRAME_TARGET from several small records without an await per record
        queue = self._out
        unchecked = self._unchecked if self.conn.protocol.records_checked else None
        # None: every record checked here; else what earlier sessions shipped unchecked
        check_through = unchecked.lsn if unchecked is not None else None

        async def tail() -> None:
            # closed at once when the tailer is cancelled: the segment being read is
            # released then (a spare is not written over while it is read), not whenever
            # the collector finds the generator
            follow = self.journal.follow_encoded(ship_from, check_through=check_through)
            async with contextlib.aclosing(follow) as batches:
                async for batch in batches:
                    await queue.put(batch)  # the bytes as stored: shipped without re-encoding

        tailer = asyncio.create_task(tail(), name="link-tail")
        pending: collections.deque[EncodedRecord] = collections.deque()
        # (last LSN, monotonic time read) of the batches in pending: the lag is never less
        # than the time since its oldest record was read (SenderCore.lag)
        read: collections.deque[tuple[int, float]] = collections.deque()
        try:
            queued = 0  # bytes in pending: refill only what one frame can take
            while True:
                if not pending:
                    core.oldest_queued_ts, core.oldest_queued_at = 0, 0.0
                    read.clear()
                    batch = await _get_or_fail(queue, tailer)
                    pending.extend(batch)
                    queued = sum(r.size for r in batch)
                    if batch:
                        read.append((batch[-1].last_lsn, time.monotonic()))
                while queued < FRAME_TARGET and not queue.empty():
                    batch = queue.get_nowait()
                    pending.extend(batch)
                    queued += sum(r.size for r in batch)
                    if batch:
                        read.append((batch[-1].last_lsn, time.monotonic()))
                while len(read) > 1 and read[0][0] < pending[0].lsn:
                    read.popleft()
                read_at = read[0][1] if read else time.monotonic()
                core.oldest_queued_ts, core.oldest_queued_at = pending[0].ts_ns, read_at
                frame = core.pack(pending)
                queued -= len(frame.payload)
                await self._wait_credit(len(frame.payload))
                if unchecked is not None and frame.last_lsn > unchecked.lsn:
                    unchecked.lsn = frame.last_lsn
                core.shipped(frame, read_at)
                await self.conn.send(frame)
                self.sent_lsn = frame.last_lsn
        finally:
            tailer.cancel()
            with contextlib.suppress(BaseException):
                await tailer

    async def ship_direct(self, records: list[Record], floor: int = 0) -> int:
        """Ship ``records`` without journaling them; returns the last LSN.

        For a first sync (docs/ARCHITECTURE.md, "Initial sync"): the bulk of a disk goes
        from the source to the wire without being written and read back here. They are
        numbered after everything journaled (and at least ``floor``), and go after the
        journal's records before them. Until the receiver acknowledges them as received
        they exist nowhere else: a link that fails first loses them, so the caller must
        journal no barrier after them before ``wait_received(direct_lsn)`` (a barrier
        shipped after a gap would make a replica that lacks them a consistency point).
        """
        journal = self.journal
        if not self.direct_lsn:  # the first: everything journaled before ships first
            await journal.sync()
            while max(self.sent_lsn, self._ship_from - 1) < journal.last_record_lsn:
                self._check()
                await asyncio.sleep(0.005)
        first = self.direct_first(floor)
        journal.skip_to(first + len(records))
        now = time.time_ns()
        batch = [
            EncodedRecord(lsn, now, *encode_parts(record, lsn, now))
            for lsn, record in enumerate(records, first)
        ]
        shipper = self._shipper_task
        assert shipper is not None, "start_shipper first"
        put = asyncio.ensure_future(self._out.put(batch))
        await asyncio.wait({put, shipper}, return_when=asyncio.FIRST_COMPLETED)
        if not put.done():
            put.cancel()
            self._check()
            raise ConnectError("the link stopped shipping before a first sync was sent")
        self.direct_lsn = batch[-1].lsn
        self._direct_batches.append((self.direct_lsn, sum(r.size for r in batch)))
        return self.direct_lsn

    def direct_first(self, floor: int = 0) -> int:
        """The LSN ``ship_direct`` numbers its next records from, unless something is
        journaled first."""
        return max(self.journal.next_lsn, floor)

    def direct_backlog(self) -> int:
        """Bytes shipped (or queued) without the journal that the receiver has not applied."""
        batches, applied = self._direct_batches, self.applied_lsn
        while batches and batches[0][0] <= applied:
            batches.popleft()
        return sum(size for _, size in batches)

    async def wait_received(self, lsn: int) -> None:
        """Until the receiver holds every record up to ``lsn`` durably (or the link fails)."""
        async with self._changed:
            while self.received_lsn < lsn:
                self._check()
                await self._changed.wait()
            self._check()

    async def _wait_credit(self, size: int) -> None:
        async with self._changed:
            while self.conn.credit < size:
                self._check()
                await self._changed.wait()
            self._check()

    async def relieve(self) -> None:
        """Our journal is full: drop records the receiver holds durably but has not applied
        yet (a whole epoch being received, say), instead of waiting for an apply that
        waits for the rest of the epoch; and the active segment when the receiver holds all
        of it (a journal reopened with a smaller --journal-max: no ack that trims it is
        coming, and an append would wait for room for ever)."""
        below = self._started().relieve_below()
        if below is not None:
            log.info("sender.journal_pressure", trim_below=below)
        await self.journal.trim(
            below if below is not None else self.applied_lsn + 1, retire_active=True
        )

    async def request_manifest(self, volume: str, extent_size: int) -> ExtentManifest | None:
        """The receiver's manifest of a replica, or None when the replica does not exist."""
        manifest: ExtentManifest | None = None
        request = ManifestRequest(next(self._ids), volume, extent_size, True)
        # closed on leaving, whatever the way: its answer queue is not left behind
        async with contextlib.aclosing(self._answers(request)) as parts:
            async for part in parts:
                assert isinstance(part, Manifest)
                if not part.exists:  # one part, the last
                    return None
                if manifest is None:  # every part says the same size (the protocol checks)
                    manifest = ExtentManifest(extent_size, part.size)
                # the protocol checked their order, and each message that it fits the size
                manifest.put(part.first_extent, part.digests)
        assert manifest is not None
        return manifest

    async def request_tree(self) -> list[TreeEntry]:
        """What the job's replica folder holds (the receiver applies what it has first)."""
        entries: list[TreeEntry] = []
        async for part in self._answers(TreeRequest(next(self._ids))):
            assert isinstance(part, Tree)
            entries.extend(part.entries())
        return entries

    async def read(self, volume: str, offset: int, length: int) -> bytes:
        """``length`` bytes of replica ``volume`` at ``offset`` (fewer where it ends):
        failback sessions only."""
        rid = next(self._ids)
        queue: asyncio.Queue[Manifest | Tree | ReadData | None] = asyncio.Queue()
        self._answer_queues[rid] = queue
        try:
            await self.conn.send(ReadRequest(rid, volume, offset, length))
            async with asyncio.timeout(REPLY_TIMEOUT):
                answer = await queue.get()
            self._check()
            if not isinstance(answer, ReadData):
                raise ConnectError("connection failed while waiting for the receiver's answer")
            return answer.data
        finally:
            del self._answer_queues[rid]

    async def handover(self, timeout: float) -> Handover:
        """The receiver's next Handover step (waits at most ``timeout`` seconds)."""
        async with asyncio.timeout(timeout):
            step = await self.handover_steps.get()
        self._check()
        if step is None:
            raise ConnectError("connection to the receiver was lost during the handover")
        return step

    async def send_handover(self, step: str, lsn: int = 0, generation: int = 0) -> None:
        await self.conn.send(Handover(step, lsn, generation))

    async def refuse_handover(self) -> None:
        """Answer a planned failover's request: no final point can be taken now. A receiver
        too old to read the answer is not sent one: its request times out, as it did."""
        if CAP_HANDOVER_REFUSAL in self._started().capabilities:
            try:
                await self.send_handover("refused")
            except Exception as exc:  # the link is gone: a session failure, retried as one
                raise as_user_error(exc) from exc

    async def send_point_floor(self, lsn: int) -> None:
        """Before shipping anything: no barrier below ``lsn`` ends a consistency point on
        the replica (engine/lost_records.py)."""
        await self.conn.send(PointFloor(lsn))

    async def _answers(
        self, request: ManifestRequest | TreeRequest
    ) -> AsyncGenerator[Manifest | Tree, None]:
        """Send ``request`` and yield its answer's parts up to the one marked done."""
        rid = request.request_id
        queue: asyncio.Queue[Manifest | Tree | ReadData | None] = asyncio.Queue()
        self._answer_queues[rid] = queue
        try:
            await self.conn.send(request)
            while True:
                async with asyncio.timeout(REPLY_TIMEOUT * 10):
                    part = await queue.get()
                self._check()
                if part is None or isinstance(part, ReadData):
                    raise ConnectError("connection failed while waiting for the receiver's answer")
                yield part
                if part.done:
                    return
        finally:
            del self._answer_queues[rid]

    async def wait_applied(self, lsn: int, timeout: float | None = None) -> None:
        async with asyncio.timeout(timeout), self._changed:
            while self.applied_lsn < lsn:
                self._check()
                await self._changed.wait()
            self._check()

    def lag(self) -> dict[str, float]:
        """What the receiver has not applied yet (see ``SenderCore.lag``): the RPO now."""
        if self.core is None:
            return {"records": 0, "bytes": 0, "seconds": 0.0}
        return self.core.lag(self.journal.last_lsn)

    async def goodbye(self, reason: str = "done", *, stalled: bool = False) -> None:
        """Say the session ends (no more records: the shipper stops first, so the Goodbye
        is never stuck behind a frame the shaper holds). ``stalled``: the receiver was
        found stalled (``StopWatch``): the Goodbye is not waited for, and the close that
        follows does not wait for the receiver's side either."""
        await self.stop_shipping()
        self._stalled = self._stalled or stalled
        # bounded: a receiver that reads nothing (stopped, stuck) must not hold a stopping
        # sender: with a full socket buffer the send waited for ever, and SIGTERM with it
        with contextlib.suppress(Exception):
            async with asyncio.timeout(STALLED_GOODBYE if stalled else GOODBYE_TIMEOUT):
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
        if self._stalled:  # its last words cannot come: do not linger for them
            await self.conn.aclose(STALLED_CLOSE)
        else:
            await self.conn.aclose()


async def _get_or_fail(
    queue: asyncio.Queue[list[EncodedRecord]], tailer: asyncio.Task[None]
) -> list[EncodedRecord]:
    getter = asyncio.ensure_future(queue.get())
    try:
        done, _ = await asyncio.wait({getter, tailer}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not getter.done():
            getter.cancel()  # also when we are cancelled: no orphan task left pending
    if getter in done and not getter.cancelled():
        return getter.result()
    tailer.result()  # raises the tailer's error
    raise ConnectError("journal follower ended")
