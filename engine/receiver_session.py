"""One connected sender on the receiving side: the asyncio driver of ``ReceiverCore``.

A session appends each Records frame to its job's receive journal; a sync task makes
appended records durable, then acknowledges them as *received* and grants the sender the
same credit again (what it has not when the session ends, the end makes durable and hands
to the job, unacknowledged); an acker acknowledges the applied LSN when the job's applier
moves it.
It also answers manifest and tree requests: after applying everything received; in a
verify session, after applying up to the last barrier, with the records after it worked
out, not applied (engine/unapplied.py), so the replica keeps its consistency point.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import time
from pathlib import Path
from typing import Any, NoReturn

import structlog

from replicator.engine.applier import ApplyError
from replicator.engine.in_flight import InFlightBudget
from replicator.engine.job_replica import JobReplica, ReceiverConfig
from replicator.engine.names import path_problem, tree_entries
from replicator.engine.pacing import unapplied_bytes
from replicator.engine.replica_files import ReplicaDiverged
from replicator.engine.replica_id import capability
from replicator.engine.session_core import ReceiverCore, Send
from replicator.engine.source_clock import SourceClock
from replicator.engine.statedir import free_bytes, state_reserve
from replicator.engine.unapplied import NotComparable, of_file
from replicator.engine.unapplied import tree as unapplied_tree
from replicator.engine.window import CreditWindow
from replicator.journal import (
    JournalError,
    JournalFull,
    Record,
)
from replicator.journal.errors import READ_ONLY_HINT, BusyError
from replicator.transport import (
    PROTOCOL_VERSION,
    ConnectionClosedError,
    Credit,
    Error,
    FramedConnection,
    Goodbye,
    Handover,
    Manifest,
    ManifestRequest,
    Ping,
    PointFloor,
    Pong,
    Records,
    RemoteProtocolError,
    State,
    Welcome,
)
from replicator.transport.frames import CAP_RECORDS_CHECKED
from replicator.transport.messages import (
    CAP_HANDOVER_REFUSAL,
    DIGEST_SIZE,
    MAX_TREE_PART,
    MessageError,
    Tree,
    TreeEntry,
    TreeRequest,
    encode_tree,
)

log = structlog.get_logger()

# a sender that sent nothing for this long is gone (it pings every 15 s): the connection
# is aborted (``FramedConnection.abort_when_silent``), whatever the session's tasks await
IDLE_TIMEOUT = 120.0
RTT_PING_INTERVAL = 5.0  # the window follows the round trip: measured this often
STALL_SECONDS = 1.0  # credit cut short by the room, no frame since: see _unstaller
DIRECT_LINGER = 0.2  # a first sync's direct writes wait this long for more before a commit


class Session:
    """One connected sender: the asyncio driver of ``ReceiverCore`` (ingest, sync,
    acknowledge) that also answers manifest and tree requests."""

    def __init__(
        self,
        conn: FramedConnection,
        replica: JobReplica,
        config: ReceiverConfig,
        *,
        verifying: bool,
        in_flight: InFlightBudget | None = None,
        clock: SourceClock | None = None,
    ) -> None:
        """``clock``: the source clock's estimate, from a sender whose Pings carry its
        wall clock (Hello capability ``wall-clock``); None: the offset is not known."""
        # a verify session only compares (engine/unapplied.py); any other takes a replica
        # file the sender asks a manifest of as it is
        self.verifying = verifying
        # verify: the records past the last barrier, read for (applied, durable) LSNs
        self._held_past: tuple[tuple[int, int], list[Record]] | None = None
        # what all sessions hold before it is durable (engine/in_flight.py), and this
        # session's part of it: frames taken and not yet synced, a verify's held records
        self._in_flight = in_flight or InFlightBudget(config.in_flight_max)
        self._in_flight_held = 0
        self._held_past_bytes = 0  # of it, ``_held_past``'s records
        self.conn = conn
        self.replica = replica
        self.config = config
        self.clock = clock
        self.core: ReceiverCore  # made by run(), from the position the Welcome announces
        self._sync_wake = asyncio.Event()
        self._sync_lock = asyncio.Lock()
        # how much credit to grant: follows the link (RTT, rate) and the disk (backlog)
        self.window = CreditWindow(
            config.window, cap=config.window_cap, backlog_max=config.backlog_max
        )
        # a planned failover asked the sender for its final point (``request_handover``)
        self._handover: asyncio.Future[int] | None = None
        self.final_lsn: int | None = None  # the sender's final point: nothing may follow it
        self._linger: asyncio.TimerHandle | None = None  # a delayed sync (_wake_syncer)
        self._taking: asyncio.Future[None] | None = None  # the last frame, being taken
        self._state_reserve = state_reserve(replica.state_dir)  # see _journal_room
        self.told: Error | None = None  # the Error that ended the session, as we sent it

    async def run(self) -> None:
        replica = self.replica
        # records a previous session appended but did not sync yet are valid (checksummed):
        # make them durable so the resume point we announce covers them, and let the job
        # take them over (its end does both, unless it failed: _hand_over_the_rest)
        await replica.make_durable()
        await replica.take_durable()
        welcomed = replica.applied_lsn
        self.core = ReceiverCore(welcomed)
        await self.conn.send(
            Welcome(
                protocol_version=PROTOCOL_VERSION,
                received_lsn=replica.received_lsn,
                applied_lsn=welcomed,
                # the first credit, within the journal's room like every grant after it
                # (a restart with a backlog on a small disk: the whole window at once ran
                # the journal into ENOSPC); the applier's progress grants the rest
                window=self._grant(),
                # records-checked: every Records frame goes through ReceiverCore.records,
                # which checks each record's checksum before any is used
                # handover-refusal: a sender that cannot take a final point says so at
                # once, instead of letting `failover --planned` wait out its timeout
                # replica-<id>: which replica this is (engine/replica_id.py)
                capabilities=(
                    "lz4",
                    "manifest",
                    CAP_RECORDS_CHECKED,
                    CAP_HANDOVER_REFUSAL,
                    *([capability(replica.replica_id)] if replica.replica_id else []),
                ),
                generation=replica.state.generation,
            )
        )
        self.conn.abort_when_silent(IDLE_TIMEOUT)  # the reader may wait in a Pong's drain
        self._in_flight.holders.add(self._sync_now)  # another session waits for its bytes
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._syncer())
                tg.create_task(self._applied_acker(welcomed))
                tg.create_task(self._pinger())
                tg.create_task(self._unstaller())
                await self._reader(tg)
                raise _SessionOver  # the reader ended the session: cancel syncer and acker
        except* _SessionOver:
            pass
        finally:
            if self._handover is not None and not self._handover.done():
                self._handover.set_exception(
                    ConnectionClosedError("the sender's session ended before its final point")
                )
            self._in_flight.holders.discard(self._sync_now)
            await self._hand_over_the_rest()
            self._give_back(self._in_flight_held)

    async def _in_flight_take(self, nbytes: int) -> None:
        """Wait until the receiver's in-flight budget gives this session ``nbytes``: no
        more is read from its socket meanwhile, so TCP slows its sender."""
        if nbytes:
            await self._in_flight.take(self, nbytes)
            self._in_flight_held += nbytes

    def _give_back(self, nbytes: int) -> None:
        nbytes = min(nbytes, self._in_flight_held)
        self._in_flight_held -= nbytes
        self._in_flight.give_back(self, nbytes)

    async def _hand_over_the_rest(self) -> None:
        """The session ends: what it appended and did not hand over (its sync had not run,
        or the end cut it short) is made durable and taken over by the job before the job
        is free for anyone else, so the epochs it completes are applied now, and a failover
        through this receiver promotes the point a job opened from the same files would.
        Not acknowledged: the sender hears of it from the next Welcome. When that fails
        (the journal's fsync, a direct write's commit), the session ends as a storage
        failure (StorageFailed): the job's status says so, not "connection lost"."""
        replica = self.replica
        if replica.broken:  # reopened, and recovered from its files, by the next session
            return
        try:
            await replica.make_durable()
            await replica.take_durable()
        except (JournalError, OSError, ApplyError, ReplicaDiverged) as exc:
            reason = storage_reason(exc, (replica.replica_dir, replica.state_dir))
            log.error(
                "receiver.session_end_sync",
                job=replica.job,
                error=reason,
                action="nothing past the last acknowledgement counts: the job's next "
                "session (or a failover) reopens it from its files, and the sender sends "
                "the rest again",
            )
            raise StorageFailed(
                f"{reason} (at the end of the session: what it had not synced was not "
                "acknowledged; the sender sends it again)"
            ) from exc

    async def request_handover(self) -> int:
        """Planned failover: ask the sender to stop capture and ship everything; the LSN
        of its final point (a barrier it waited to see applied). Raises
        ConnectionClosedError when the session ends first, HandoverRefused when the sender
        cannot take a final point now."""
        if self._handover is not None:
            raise BusyError(
                "a planned failover of this job is already under way (another `replicator "
                "failover --planned`)",
                hint="wait for it: its result is the job's (`replicator status --dir DIR` "
                "shows the job promoted once it is done)",
            )
        self._handover = asyncio.get_running_loop().create_future()
        self._handover.add_done_callback(lambda f: f.cancelled() or f.exception())
        await self.conn.send(Handover("request", 0, 0))
        return await asyncio.shield(self._handover)

    async def confirm_handover(self, generation: int) -> None:
        """The replica is promoted at the sender's final point: tell the sender."""
        await self.conn.send(Handover("promoted", 0, generation))

    async def _send_error(self, error: Error) -> None:
        """Tell the sender why the session ends, unless another of its tasks already did
        (the protocol is closed then; the check and the send are one step of the loop)."""
        if self.conn.state is not State.CLOSED:
            await self.conn.send(error)
            self.told = error

    async def _storage_failed(self, exc: BaseException) -> str:
        """Log a failed write or sync of the job's replicas or state and tell the sender
        why (a full disk with the room left where the job's folders are); the reason."""
        replica = self.replica
        reason = storage_reason(exc, (replica.replica_dir, replica.state_dir))
        log.error("receiver.storage", job=replica.job, error=reason)
        await self._send_error(Error("storage", reason))
        return reason

    async def _send_all(self, actions: list[Send]) -> None:
        for action in actions:
            if self.conn.state is State.CLOSED:  # we sent an Error: the session is over
                raise _SessionOver
            await self.conn.send(action.message)

    async def _take(self, records: list[Record], payload: bytes | memoryview) -> None:
        """Hand a Records frame to the replica, then count it as ingested (and wake the
        syncer). Raises _TakeFailed when that failed; the sender was told why."""
        try:
            await self.replica.receive(records, payload)
        except ReplicaDiverged as exc:
            log.error("receiver.replica_diverged", job=self.replica.job, files=[str(exc)])
            await self._send_error(Error("diverged", f"receiver cannot apply: {exc}"))
            raise _TakeFailed from exc
        except (JournalError, OSError, ApplyError) as exc:
            await self._storage_failed(exc)
            raise _TakeFailed from exc
        self.core.ingested(records, len(payload))
        self.window.received(time.monotonic(), len(payload))
        self._wake_syncer()

    async def _taken(self) -> bool:
        """Wait until the last Records frame is in the replica's hands; False when that
        failed (the sender was told why: the session ends)."""
        taking = self._taking
        if taking is None:
            return True
        try:
            # the session ending does not cut a write short; and it stays in ``_taking``
            # until done, so a reader cancelled here still waits for it (``_reader``)
            await asyncio.shield(taking)
        except _TakeFailed:
            return False
        finally:
            if taking.done() and self._taking is taking:
                self._taking = None
        return True

    async def _reader(self, tg: asyncio.TaskGroup) -> None:
        try:
            await self._read(tg)
        finally:
            taking, self._taking = self._taking, None
            # never leave a write running behind the session: the next session announces
            # its resume point from what is durable, and a frame appended after that
            # would stand in the way of the records it resends
            while taking is not None and not taking.done():
                with contextlib.suppress(BaseException):
                    await asyncio.shield(taking)
            if taking is not None and not taking.cancelled():
                # read it, or asyncio logs the task as lost: a _TakeFailed was answered and
                # logged already; anything else is a fault of ours, and said so
                failure = taking.exception()
                if failure is not None and not isinstance(failure, _TakeFailed):
                    log.error("receiver.write_failed", job=self.replica.job, error=repr(failure))

    async def _read(self, tg: asyncio.TaskGroup) -> None:
        while True:
            msg = await self.conn.recv()  # a silent sender: see run
            if isinstance(msg, Ping) and self.clock is not None:
                # read now, not after the frames before it are taken: a later reading only
                # makes the source look further behind (SourceClock)
                offset = self.clock.heard(msg.ts_ns, time.time_ns())
                if offset is not None:
                    self.replica.source_offset_ns = offset
            if isinstance(msg, Records):
                if self.final_lsn is not None:
                    raise RemoteProtocolError(
                        f"Records after the handover's final point (lsn {self.final_lsn})"
                    )
                records = self.core.records(msg)  # the protocol checked count and LSN order
                if not await self._taken():
                    return
                # held until synced, within what all sessions may hold together: the
                # socket is not read while the budget is spent (engine/in_flight.py)
                await self._in_flight_take(len(msg.payload))
                # written while the next frame is read and checked (the write is a thread
                # hop, and a reader waiting for it would stop the socket meanwhile)
                # off the wire: bytes, or a read-only view of the frame's own buffer
                self._taking = asyncio.ensure_future(self._take(records, msg.payload))
                continue
            if not await self._taken():  # everything else comes after the frames before it
                return
            if isinstance(msg, ManifestRequest):
                tg.create_task(self._answer_manifest(msg))
            elif isinstance(msg, TreeRequest):
                tg.create_task(self._answer_tree(msg))
            elif isinstance(msg, Goodbye):
                await self._flush_sync()
                return
            elif isinstance(msg, Error):
                log.warning("receiver.peer_error", code=msg.code, message=msg.message)
                return
            elif isinstance(msg, Pong):  # an answer to our _pinger
                self.window.observe_rtt((time.monotonic_ns() - msg.ts_ns) / 1e9)
            elif isinstance(msg, Ping):
                await self._send_all(self.core.control(msg))
            elif isinstance(msg, PointFloor):  # durable before the next frame is taken
                if not await self._raise_point_floor(msg.lsn):
                    return
            elif isinstance(msg, Handover):
                future = self._handover
                if msg.step == "refused" and future is not None and not future.done():
                    self._handover = None  # asked again later in this session, it may go
                    future.set_exception(HandoverRefused())
                    continue
                if msg.step != "final" or future is None or self.final_lsn is not None:
                    raise RemoteProtocolError(f"unexpected Handover step {msg.step!r}")
                await self._flush_sync()
                self.final_lsn = msg.lsn
                future.set_result(msg.lsn)
            else:
                raise RemoteProtocolError(f"unexpected {type(msg).__name__} from a sender")

    async def _raise_point_floor(self, lsn: int) -> bool:
        """False when it could not be saved (the sender was told why: the session ends)."""
        try:
            await self.replica.raise_point_floor(lsn)
        except OSError as exc:
            await self._storage_failed(exc)
            return False
        return True

    def _sync_now(self) -> None:
        """The in-flight budget is spent and a session waits: sync what this one holds
        now, without lingering for more (only syncs give bytes back)."""
        if self.core.unsynced:
            self._sync_wake.set()

    def _wake_syncer(self) -> None:
        """Sync now, or, when only a few direct writes of a first sync wait (see
        ``JobReplica.commit_can_wait``), a little later with more: each commit costs three
        fsyncs."""
        if not self.replica.commit_can_wait:
            self._sync_wake.set()
        elif self._linger is None:
            self._linger = asyncio.get_running_loop().call_later(DIRECT_LINGER, self._sync_wake.set)

    async def _flush_sync(self) -> None:
        if self.core.unsynced:
            await self._sync_once()

    async def _sync_once(self) -> None:
        async with self._sync_lock:  # hand records over in LSN order
            await self._sync_locked()

    async def _sync_locked(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        records, synced = self.core.take_unsynced()
        started = time.monotonic()
        try:
            await self.replica.make_durable()
        except (JournalError, OSError, ApplyError) as exc:
            raise StorageFailed(await self._storage_failed(exc)) from exc
        self._give_back(synced)  # durable: the applier's memory counts them now, if kept
        self.window.observe_sync(time.monotonic() - started)
        self.replica.note_durable(records)
        replica = self.replica
        granted = self._grant()
        await self._send_all(self.core.synced(replica.received_lsn, replica.applied_lsn, granted))

    def _grant(self) -> int:
        """Credit to grant now (engine/window.py); call it with the sync lock held."""
        replica, journal = self.replica, self.replica.journal
        return self.window.grant(
            time.monotonic(),
            outstanding=self.conn.credit,
            unsynced=self.core.in_hand_bytes,
            backlog=unapplied_bytes(
                journal.bytes_used, journal.first_lsn, journal.last_lsn, replica.applied_lsn
            ),
            # an epoch whose barrier was read is applicable once synced (the sync
            # needs no credit), and its apply will free room: keep its credit within it
            applicable=max(replica.last_barrier, self.core.barrier_read) > replica.applied_lsn,
            room=self._journal_room(),
        )

    def _journal_room(self) -> int | None:
        """Bytes the receive journal may still grow by: its file system's free space less
        what the state files need beside it (None when it cannot be read)."""
        try:
            return max(0, free_bytes(self.replica.state_dir) - self._state_reserve)
        except OSError:
            return None

    async def _pinger(self) -> None:
        """Measure the round trip (the sender answers our Ping with a Pong)."""
        nonce = 0
        while True:
            nonce += 1
            await self.conn.send(Ping(nonce, time.monotonic_ns()))
            await asyncio.sleep(RTT_PING_INTERVAL)

    async def _unstaller(self) -> None:
        """The room cut the credit short with nothing to apply (``CreditWindow.short``)
        and no frame has come for ``STALL_SECONDS``: the sender may be waiting for credit
        for a record larger than the room, and nothing else would grant more. Grant up to
        the base window rather than wait for ever (``CreditWindow.unstall``)."""
        seen = -1
        while True:
            await asyncio.sleep(STALL_SECONDS)
            read, seen = seen, self.core.frames_read
            if not self.window.short or read != seen:
                continue
            async with self._sync_lock:
                if self.core.frames_read != seen:  # a frame came while the lock was held
                    continue
                granted = self.window.unstall(
                    outstanding=self.conn.credit, unsynced=self.core.in_hand_bytes
                )
                if granted:
                    log.warning(
                        "receiver.room_short",
                        job=self.replica.job,
                        room_mib=(self._journal_room() or 0) >> 20,
                        granted_mib=granted >> 20,
                    )
                    await self.conn.send(Credit(granted))

    async def _syncer(self) -> None:
        """Runs until the session's TaskGroup cancels it when the reader ends."""
        while True:
            await self._sync_wake.wait()
            self._sync_wake.clear()
            await self._sync_once()

    async def _applied_acker(self, welcomed: int) -> None:
        """Acknowledge each move of the applied LSN (from ``welcomed``, the Welcome's) and
        grant again what the applier freed of the backlog and the journal's room. It waits
        for the move, not for a notification: one that came while this task was sending,
        or before it started (the Welcome's credit may wait for the first apply), would
        leave the sender waiting for credit with nothing left to apply."""
        replica = self.replica
        seen = welcomed

        def moved() -> bool:
            return replica.failure is not None or replica.applied_lsn != seen

        while True:
            async with replica.applied_changed:
                await replica.applied_changed.wait_for(moved)
            seen = replica.applied_lsn
            failure = replica.failure
            if failure is not None:
                code = "diverged" if isinstance(failure, ReplicaDiverged) else "storage"
                await self._send_error(Error(code, f"receiver cannot apply: {failure}"))
                raise ConnectionClosedError("apply failed")
            await self._send_all(self.core.applied(replica.received_lsn, replica.applied_lsn))
            if self.window.throttled:  # the backlog shrank: the window opens again
                async with self._sync_lock:
                    granted = self._grant()
                    if granted:
                        await self.conn.send(Credit(granted))

    async def _answer_manifest(self, req: ManifestRequest) -> None:
        problem = path_problem(req.volume)
        if problem is not None:
            log.warning("receiver.protocol_error", job=self.replica.job, error=problem)
            await self._send_error(Error("name", problem))
            raise _SessionOver  # whoever sends Error ends the session (docs/PROTOCOL.md)
        if not self.verifying:
            # Everything received is applied first, so the manifest and the sender's view
            # of "what the receiver has" agree (docs/ARCHITECTURE.md, differential sync).
            await self.replica.apply_pending(force=True)
            await self.replica.adopt(req.volume)
            await send_manifest(self.conn, self.replica, req)
            return
        # verify: the replica stays at its consistency point; what it holds past it is
        # worked out, not applied (engine/unapplied.py)
        unapplied = await self._unapplied()
        try:
            mine = of_file(unapplied, req.volume)
            await send_manifest(self.conn, self.replica, req, mine)
        except NotComparable as exc:
            await self._not_comparable(exc, unapplied)

    async def _answer_tree(self, req: TreeRequest) -> None:
        # as for manifests: the listing is of the replica with everything received applied
        # (verify: as what it holds past its consistency point will leave it)
        if not self.verifying:
            await self.replica.apply_pending(force=True)
            entries = await asyncio.to_thread(replica_tree, self.replica.replica_dir)
        else:
            unapplied = await self._unapplied()
            listed = await asyncio.to_thread(replica_tree, self.replica.replica_dir)
            try:
                entries = unapplied_tree(listed, unapplied)
            except NotComparable as exc:
                await self._not_comparable(exc, unapplied)
        parts = tree_parts(entries)
        for i, part in enumerate(parts):
            await self.conn.send(Tree(req.request_id, i == len(parts) - 1, part))

    async def _unapplied(self) -> list[Record]:
        """Apply what the replica holds up to its last barrier; the records after it. The
        applied LSN is acknowledged before the answer: the sender tells from it what was
        compared as not applied (``VerifyResult.unapplied``)."""
        replica = self.replica
        await replica.apply_pending()
        await self._send_all(self.core.applied(replica.received_lsn, replica.applied_lsn))
        # read once per state, not once per volume asked: a verify session appends nothing
        key = (replica.applied_lsn, replica.journal.durable_lsn)
        if self._held_past is None or self._held_past[0] != key:
            # held for the session, within the receiver's in-flight budget: asked for
            # before they are read (the journal's estimate), then counted exactly
            self._held_past = None
            self._give_back(self._held_past_bytes)
            self._held_past_bytes = 0
            journal = replica.journal
            estimate = unapplied_bytes(
                journal.bytes_used, journal.first_lsn, journal.durable_lsn, replica.applied_lsn
            )
            await self._in_flight_take(estimate)
            self._held_past_bytes = estimate
            held = await replica.unapplied()
            size = sum(record.encoded_size for record in held)
            if size > estimate:  # asked anew: a session's share holds any one request
                self._give_back(estimate)
                self._held_past_bytes = 0
                await self._in_flight_take(size)
            else:
                self._give_back(estimate - size)
            self._held_past_bytes = size
            self._held_past = (key, held)
        return self._held_past[1]

    async def _not_comparable(self, exc: NotComparable, unapplied: list[Record]) -> NoReturn:
        """Refuse the verify (Error "unapplied"): its records past the consistency point
        change the replica in a way it does not work out without applying them."""
        replica = self.replica
        message = (
            f"job {replica.job!r}: the replica holds lsn {unapplied[0].lsn}-"
            f"{unapplied[-1].lsn} past the last barrier it applied (lsn {replica.applied_lsn}), "
            f"waiting for the next one; {exc}, which verify does not work out without "
            "applying it, and applying it would take the replica off its consistency point"
        )
        log.warning("receiver.verify_refused", job=replica.job, why=message)
        await self._send_error(Error("unapplied", message))
        raise _SessionOver  # whoever sends Error ends the session (docs/PROTOCOL.md)


def replica_tree_parts(root: Path, part_bytes: int = MAX_TREE_PART // 2) -> list[bytes]:
    """The replica folder ``root`` as Tree listings of about ``part_bytes`` each (at least
    one, empty when the folder does not exist)."""
    return tree_parts(replica_tree(root), part_bytes)


def replica_tree(root: Path) -> list[TreeEntry]:
    """What the replica folder ``root`` holds (nothing when it does not exist). Symlinks
    are listed, never followed; names that could not come from a sender are left out (the
    sender cannot name them either)."""
    entries: list[TreeEntry] = []
    for full in tree_entries(root):  # not os.walk: see tree_entries
        path = full.relative_to(root).as_posix()
        if path_problem(path) is not None:
            continue
        try:
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                entry = TreeEntry(path, "l", 0, os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                entry = TreeEntry(path, "d", st.st_mode & 0o7777, "")
            elif stat.S_ISREG(st.st_mode):
                entry = TreeEntry(path, "f", st.st_mode & 0o7777, "")
            else:
                continue
        except (OSError, MessageError):  # gone meanwhile, or a target we cannot carry
            continue
        entries.append(entry)
    return entries


def tree_parts(entries: list[TreeEntry], part_bytes: int = MAX_TREE_PART // 2) -> list[bytes]:
    """``entries`` as Tree listings of about ``part_bytes`` each (at least one)."""
    parts: list[bytes] = []
    start, size = 0, 0
    for i, entry in enumerate(entries):
        size += len(entry.path) + len(entry.target) + 16
        if size >= part_bytes:
            parts.append(encode_tree(entries[start : i + 1]))
            start, size = i + 1, 0
    parts.append(encode_tree(entries[start:]))
    return parts


class HandoverRefused(Exception):
    """The sender answered a handover request with "refused": it cannot take a final
    point now (its freeze failed, its journal overflowed); replication goes on."""


class _SessionOver(Exception):
    pass


class _TakeFailed(Exception):
    """A Records frame could not be taken; the sender was told (Error)."""


class StorageFailed(Exception):
    """The receiver could not make records durable; the sender was told why."""


class SessionTold(Exception):
    """A session ended with an Error we sent (``error``), whatever came after it: the
    sender's frames already in flight read as out of turn, a closed connection."""

    def __init__(self, error: Error) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.error = error


def storage_reason(exc: BaseException, folders: tuple[Path, ...] = ()) -> str:
    """What a storage failure tells the sender (and logs); a full disk names the room
    left where ``folders`` (the job's replica and state folders) are, so the operator
    knows which file system to free."""
    if isinstance(exc, JournalFull):
        return f"receiver journal is full ({exc}); free space or raise its cap"
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            room = _room_left(folders)
            if not room:
                return "receiver disk is full; free space on the receiver, then send again"
            return f"receiver disk is full ({room}); free space there, then send again"
        if isinstance(cause, OSError) and cause.errno == errno.EDQUOT:
            where = " and ".join(str(folder) for folder in folders) or "the receiver"
            return (
                f"receiver disk quota exceeded (the user the receiver runs as, in {where}); "
                "raise the quota or free space there, then send again"
            )
        if isinstance(cause, OSError) and cause.errno == errno.EROFS:
            if isinstance(exc, JournalError):  # its message says so already (_io_hint)
                break
            return f"receiver file system is read-only: {exc}; {READ_ONLY_HINT}, then send again"
        cause = cause.__cause__
    return f"receiver storage error: {exc}"


def _room_left(folders: tuple[Path, ...]) -> str:
    """'N MiB free for FOLDER' for each file system under ``folders`` (once each); a
    folder not made yet (a new job's) is named by the nearest one above it."""
    seen: set[int] = set()
    parts: list[str] = []
    for folder in folders:
        while not folder.exists() and folder.parent != folder:
            folder = folder.parent
        try:
            device, free = os.stat(folder).st_dev, free_bytes(folder)
        except OSError:
            continue
        if device not in seen:
            seen.add(device)
            parts.append(f"{free // (1024 * 1024)} MiB free for {folder}")
    return "; ".join(parts)


async def send_quietly(conn: FramedConnection, msg: Any) -> None:
    with contextlib.suppress(Exception):
        await conn.send(msg)


async def send_manifest(
    conn: FramedConnection,
    replica: JobReplica,
    req: ManifestRequest,
    unapplied: list[Record] | None = None,
) -> None:
    """Answer ``req`` with the replica's manifest as it is now (as ``unapplied`` will leave
    it: ``JobReplica.replica_manifest``), in Manifest parts (the last marked done); the
    volume name was checked by the caller."""
    chunks = replica.replica_manifest(req.volume, req.extent_size, unapplied)
    first = 0
    part = await asyncio.to_thread(next, chunks)
    while True:
        nxt = await asyncio.to_thread(next, chunks, None)
        exists, size, digests = part
        done = nxt is None
        await conn.send(
            Manifest(
                req.request_id, req.volume, exists, size, req.extent_size, first, digests, done
            )
        )
        if nxt is None:
            return
        first += len(digests) // DIGEST_SIZE
        part = nxt
