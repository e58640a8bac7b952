"""Real-time capture (NBD shim or FUSE filter): journal every write, ship continuously.

The order of a run:

1. one snapshot-diff epoch brings the replica up to date with the files as they are
   (initial or differential sync), before any client can write;
2. the capture starts (NBD exports, or the FUSE mount): every write is journaled before it
   is acknowledged, so all volumes of the job share one LSN order;
3. a ticker makes new writes durable and appends a FLUSH barrier every ``tick``
   seconds when there are any (for a block device every prefix of its write stream is a
   crash-consistent state, so the receiver may apply up to any of these barriers);
   configuration files named on the command line are polled and shipped as FILE
   records in the same order;
4. the link ships the journal as it grows and is re-established after interruptions;
   the NBD server keeps serving meanwhile (the journal absorbs the backlog);
5. SIGTERM: the capture stops accepting, finishes in-flight requests and flushes;
   the final records are shipped and applied (bounded wait), then the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from replicator.engine.errors import (
    AuthError,
    ConfigError,
    PeerProtocolError,
    RefusedError,
    ReplicatorError,
    StorageError,
    VersionMismatch,
)

if TYPE_CHECKING:
    from replicator.engine.fuse.capture import FuseCapture
from replicator.engine import lost_records
from replicator.engine.checkpoint import (
    CHECKPOINT_MAX_BYTES,
    TouchedExtents,
    checkpoint_manifests,
    drop_touched,
    save_touched,
)
from replicator.engine.folder_guard import FolderGuard
from replicator.engine.handover import hand_over, wait_for_request
from replicator.engine.journal_first import JournalFirst
from replicator.engine.link import Link, StopWatch
from replicator.engine.manifest import ManifestSet
from replicator.engine.nbd import JournaledFileExport, NbdServer
from replicator.engine.nbd.backend import resync_overflow
from replicator.engine.nbd.gate import WriteGate
from replicator.engine.nbd.images import export_size_for, probe_path
from replicator.engine.peer_applied import load_peer_applied
from replicator.engine.scan import CycleStopped, file_volume
from replicator.engine.sender import (
    MID_SESSION_RETRY,
    Sender,
    SenderState,
    log_cycle,
)
from replicator.engine.sender_state import basis_alone
from replicator.engine.served_alone import SERVED_ALONE_FILE, save_served_alone
from replicator.engine.status import SenderPhase
from replicator.engine.tree import Tree, tree_records
from replicator.engine.volumes import VolumeKind, VolumeSpec
from replicator.journal import Journal, JournalFull, Record
from replicator.journal.durable import settled

log = structlog.get_logger()

# What stops replication but never a live capture once its VM may be writing through it
# (after the first sync): the receiver refused the job (a replica changed on the target,
# the job not allowed, a TLS certificate refused or expired, another version), or lost
# the records it had. The capture goes on, the journal absorbs the writes (tracked past
# its cap), the refusal shows in `status` and the log, and the sender tries again (1 s,
# doubling to 60 s) until it is let in or stopped; only split brain (a promoted replica)
# ends it. Hyper-V Replica likewise leaves the VM running with replication in "critical".
REPLICATION_REFUSED = (RefusedError, AuthError, VersionMismatch, PeerProtocolError)

TICK = 0.02
FILE_POLL = 1.0
CATCH_UP_POLL = 0.5
RESYNC_ROOM_WAIT = 30.0  # a resync waiting longer than this for acks gives up for now
DRAIN_TIMEOUT = 30.0
ALONE_RETRY = 2.0  # at least this long between two tries at serving alone (--witness)
LAG_LOG_INTERVAL = 10.0


@dataclass(frozen=True, slots=True)
class NbdOptions:
    socket: str
    listen: tuple[str, int] | None = None
    export_size: int | None = None


class LiveCapture(Protocol):
    """How writes reach the journal in real time (NBD shim or FUSE filter)."""

    # files the capture does not see itself, polled and shipped whole (NBD: the VM's XML)
    watched: list[VolumeSpec]

    def prelude(self, replica: Tree | None) -> list[Record]:
        """Records the initial sync journals before file contents: the layout changes
        that turn the replica folder (``replica``, listed by the receiver) into ours."""
        ...

    async def check(self, state: SenderState) -> None:
        """Raise what ``start`` would find wrong after the initial sync, if it can be
        found before it: an image another program writes behind the capture's back."""
        ...

    async def start(self, state: SenderState) -> None:
        """Begin capturing into ``state.journal``; return once writers can use it."""
        ...

    async def stop(self, state: SenderState) -> None:
        """Stop capturing after in-flight writes; everything captured is journaled."""
        ...

    def barriers_allowed(self) -> bool:
        """False while changes are tracked outside the journal (it was full) and until
        their resync is complete: a barrier then would describe a state never had."""
        ...

    def sequence(self) -> JournalFirst[Any] | None:
        """What orders the capture's changes with the journal (None before ``start``):
        the ticker's barriers go through it, never between a change's journal append and
        the change itself."""
        ...

    async def resync(self, make_room: Callable[[], Awaitable[bool]]) -> int:
        """Journal what was tracked outside the journal, then a barrier; the bytes sent.
        ``make_room`` is awaited when the journal fills up; JournalFull when it fails."""
        ...


class LiveSender:
    """``replicator send --capture nbd|fuse``: see the module docstring."""

    def __init__(self, sender: Sender, capture: LiveCapture) -> None:
        self.sender = sender
        self.capture = capture
        self.status = sender.status
        self.status.capture = "nbd" if isinstance(capture, NbdCapture) else "fuse"
        self.files = capture.watched
        self._link: Link | None = None
        self._file_digests: dict[str, bytes] = {}
        self._file_modes: dict[str, int] = {}  # as the replica has them (the FILE/CHMOD sent)
        self._handover: Link | None = None  # a planned failover asked on this link
        self._alone_refused = ""  # why serving alone was refused, as last logged
        self._touched: TouchedExtents | None = None  # what the journal changed (NBD)

    async def run(self, stop: asyncio.Event) -> None:
        self.sender.log_start(self.status.capture)
        async with SenderState(self.sender.config) as state:
            journal = state.journal
            assert journal is not None
            # its LSNs and the lag show before any link (serving alone, the receiver away)
            self.status.journal = journal
            heard = await asyncio.to_thread(load_peer_applied, state.dir)
            if heard is not None:
                self.status.heard_applied(heard.lsn)
            await self.capture.check(state)  # before a sync of the whole disks
            if not await self._initial_sync(state, stop):
                self.sender.log_stop(state)  # raises when the receiver was never reached
                return
            if isinstance(self.capture, NbdCapture):  # engine/checkpoint.py
                self._touched = TouchedExtents(self.sender.config.extent_size)
                journal.observer = self._touched
                journal.before_trim = functools.partial(self._note_touched, state)
            try:
                await self.capture.start(state)
                # an HA controller starts the VM on this word: the exports listen by now
                self.status.set_state(
                    SenderPhase.CONNECTING if self._link is None else SenderPhase.REPLICATING
                )
                sequence = self.capture.sequence()
                if sequence is not None:  # an overflow's changes count in the lag
                    sequence.on_resynced = self.status.unapplied_until
                    self.status.tracked_since = lambda: sequence.tracked_since
                    self.status.diverged = lambda: sequence.diverged
                async with asyncio.TaskGroup() as tg:
                    helpers = [
                        tg.create_task(self._ticker(journal, stop)),
                        tg.create_task(self._watch_files(journal, stop)),
                        tg.create_task(self._catch_up(journal, stop)),
                    ]
                    await self._ship_until(state, stop)
                    for task in helpers:
                        task.cancel()
            finally:
                ending = sys.exc_info()[1]  # what ended the run, if it failed
                self.status.set_state(SenderPhase.STOPPING)
                await self._stop_capture(state, ending)  # in-flight writes finish; no new ones
                try:
                    if self._handover is not None:  # raises HandedOver (engine/handover.py)
                        for spec in self.files:  # configuration files as they are now
                            await self._ship_file_if_changed(journal, spec)
                        final = await journal.append(Record.flush())
                        await journal.sync()
                        await hand_over(
                            self._handover,
                            final,
                            state.dir,
                            self.sender.config.job,
                            self.sender.target_line(state),
                        )
                    await self._drain(journal)
                    await self._checkpoint(state, ending)
                finally:
                    if self._link is not None:
                        await self.sender.close_link(self._link)
                    self.status.set_state(SenderPhase.STOPPED)
                log.info("sender.stopped", last_lsn=journal.last_lsn)

    async def _note_touched(self, state: SenderState) -> bool:
        """Before the journal drops records: the extents changed since the manifests made
        durable (engine/checkpoint.py), so a start after a crash, the journal no longer
        reaching back, can still compare with the manifests without the receiver. False
        (the segments kept for now) when that cannot be written."""
        touched, manifests = self._touched, state.manifests
        if touched is None or manifests is None:
            return True
        snapshot = TouchedExtents(
            touched.extent_size,
            {k: bytearray(v) for k, v in touched.extents.items()},
            set(touched.resized),
            touched.valid,
        )
        try:
            await settled(save_touched, state.dir, manifests.lsn, snapshot)
        except OSError as exc:
            log.warning(
                "sender.touched_unsaved",
                error=str(exc),
                action="the journal keeps its acknowledged records until this can be written",
            )
            return False
        return True

    async def _checkpoint(self, state: SenderState, ending: BaseException | None) -> None:
        """A clean stop: the manifests brought up to the journal's last LSN by hashing the
        extents this run changed (engine/checkpoint.py), so the next start compares with
        them, with or without the receiver. Skipped, said why, when they could be wrong."""
        touched, journal, manifests = self._touched, state.journal, state.manifests
        if touched is None or journal is None or manifests is None or ending is not None:
            return
        journal.observer = journal.before_trim = None
        sequence = self.capture.sequence()
        why = None
        if not touched.valid:
            why = "a change this checkpoint cannot follow was journaled"
        elif not self.capture.barriers_allowed():
            why = "changes made while the journal was full are not journaled yet"
        elif sequence is not None and sequence.diverged:
            why = "a volume diverged from its journal"
        elif touched.bytes > CHECKPOINT_MAX_BYTES:
            why = f"{touched.bytes} bytes of extents changed, more than a stop should read"
        if why is not None:
            log.info(  # routine after a run the journal overflowed in
                "sender.checkpoint_skipped",
                why=why,
                action="the next start compares the disks with the receiver's manifests",
            )
            return
        started = time.monotonic()
        try:
            await journal.sync()
            lsn = journal.last_lsn
            volumes = self.sender.config.volumes
            new, read = await asyncio.to_thread(
                checkpoint_manifests, manifests, touched, volumes, lsn
            )
            new.files = dict(self._file_digests)
            new.modes.update(self._file_modes)
            await state.save(new)
            await settled(drop_touched, state.dir)
        except (OSError, ReplicatorError) as exc:
            log.warning(
                "sender.checkpoint_failed",
                error=str(exc),
                action="the next start compares the disks with the receiver's manifests",
            )
            return
        log.info(
            "sender.checkpoint",
            lsn=lsn,
            bytes_read=read,
            seconds=round(time.monotonic() - started, 3),
        )

    async def _stop_capture(self, state: SenderState, ending: BaseException | None) -> None:
        """Stop the capture. If its last flush fails, that is the error the user sees (a
        storage error, not the export's own), unless the run failed already: then that
        first error is what ends it (its cause, often the same), and this one is logged."""
        try:
            await self.capture.stop(state)
        except Exception as exc:
            if ending is not None:
                log.error("sender.capture_stop_failed", error=str(exc))
                return
            cause = exc.__cause__
            if isinstance(cause, ReplicatorError):  # its own cause kept (what failed)
                raise cause from cause.__cause__
            raise StorageError(
                f"the capture could not flush its last writes: {exc}",
                hint="check the disk of the volumes and of --state-dir, then start again: "
                "the next start compares with the replica",
            ) from exc

    async def _initial_sync(self, state: SenderState, stop: asyncio.Event) -> bool:
        """Bring the replica up to date before serving; retry while the receiver is away.
        With ``wait_for_receiver``, serve alone once it has passed (``_serve_alone``)
        without a session, the receiver away or refusing (a refusal otherwise ends the
        run, as it ends ``send --once``). False when stopped first."""
        self.sender.stopping = stop
        wait = self.sender.config.wait_for_receiver
        loop = asyncio.get_running_loop()
        deadline = None if wait is None else loop.time() + wait
        while not stop.is_set():
            try:
                opened = await self._connect_until(state, stop, deadline)
            except REPLICATION_REFUSED as exc:  # the target's trouble: as if away, once
                if deadline is None:  # serving alone is allowed (split brain aside)
                    raise
                await self.sender.refused_pause(exc, None, stop)
                if loop.time() < deadline:
                    continue
                opened = None
            if opened is None:
                if stop.is_set():
                    break
                assert wait is not None
                served = await self._serve_alone(state, wait)
                if served:
                    return True
                # None: not yet (the witness); False: not from this state, the receiver only
                later = loop.time() + max(wait, ALONE_RETRY)
                deadline = later if served is None else None
                continue
            link, kind, basis = opened
            self.status.set_state(SenderPhase.INITIAL_SYNC)
            try:
                prelude = self.capture.prelude(self.sender.replica_tree)
                started = time.monotonic()
                manifests, stats, lsn = await self.sender.cycle(state, link, basis, prelude=prelude)
                log_cycle(manifests.epoch, lsn, stats, link, time.monotonic() - started)
                log.info(
                    "sender.initial_sync",
                    basis=kind,
                    lsn=lsn,
                    changed=stats.bytes_changed,
                    scanned=stats.bytes_scanned,
                )
                self._synced(manifests)
                self._link = link  # "replicating" once the capture serves (run)
                return True
            except CycleStopped:  # stopped while the first sync waited for the link
                with contextlib.suppress(Exception):
                    await link.finish("sender stopping", grace=0)
                await self.sender.close_link(link)
                break
            except MID_SESSION_RETRY as exc:
                await self.sender.session_failed(exc, link, stop)
        return False

    def _synced(self, manifests: ManifestSet) -> None:
        """The configuration files as the sync left them (shipped again when they change)."""
        self._file_digests = dict(manifests.files)
        modes = manifests.modes
        self._file_modes = {k: modes[k] for k in manifests.files if k in modes}
        self.status.progress = None
        self.status.not_served = None

    async def _connect_until(
        self, state: SenderState, stop: asyncio.Event, deadline: float | None
    ) -> tuple[Link, str, ManifestSet] | None:
        """``connect_retrying`` until ``stop``, or until ``deadline`` (loop time) passes
        between two tries (a handshake under way is let finish)."""
        if deadline is None:
            return await self.sender.connect_retrying(state, stop)
        give_up = asyncio.Event()

        async def watch() -> None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await stop.wait()
            give_up.set()

        watcher = asyncio.create_task(watch())
        try:
            return await self.sender.connect_retrying(state, give_up)
        finally:
            watcher.cancel()

    async def _serve_alone(self, state: SenderState, waited: float) -> bool | None:
        """The receiver was not reached in ``--wait-for-receiver`` seconds: compare the
        volumes with this sender's own last manifests (what it journaled since folded in),
        journal what differs as an epoch, and serve; replication starts when the receiver
        is reached (engine/served_alone.py). When it cannot, it says why (once) and the
        sender goes on waiting for the receiver: None while the witness (``--witness``)
        has not confirmed this source as the primary (a target it promoted ends the run,
        split brain) or its note could not be written (tried again later), False for
        good."""
        fence = self.sender.fence
        if fence is not None and not fence.renewals:
            self._cannot_serve_alone(
                "the witness has not confirmed this source as the primary yet", waited
            )
            return None
        if self.sender.config.folder:
            basis: ManifestSet | str = "a folder's layout is compared with the replica's listing"
        else:
            basis = await basis_alone(state)
        if isinstance(basis, str):
            self._cannot_serve_alone(basis, waited)
            return False
        journal = state.journal
        assert journal is not None
        since = state.served_alone  # an earlier run served alone and never reached it
        if since is None:
            since = journal.last_lsn
            try:  # before any record is numbered without the receiver
                await settled(save_served_alone, state.dir, since)
            except OSError as exc:  # nothing numbered yet: tried again later
                self._cannot_serve_alone(f"{SERVED_ALONE_FILE} could not be written: {exc}", waited)
                return None
            state.served_alone = since
        self.status.set_state(SenderPhase.INITIAL_SYNC)
        started = time.monotonic()
        try:
            manifests, stats, lsn = await self.sender.cycle(state, None, basis)
        except JournalFull:
            why = "what changed since the last sync does not fit in the journal (--journal-max)"
            self._cannot_serve_alone(why, waited)
            self.status.set_state(SenderPhase.CONNECTING)
            return False
        await journal.sync()
        self._synced(manifests)
        self.status.served_alone = since  # said once it does: not while it cannot
        self.status.set_state(SenderPhase.CONNECTING)
        log.warning(
            "sender.serving_alone",
            waited=waited,
            since_lsn=since,
            lsn=lsn,
            changed=stats.bytes_changed,
            scanned=stats.bytes_scanned,
            seconds=round(time.monotonic() - started, 3),
            action="the receiver was not reached: serving from this sender's own state; "
            "every write is journaled and shipped once the receiver answers",
        )
        return True

    def _cannot_serve_alone(self, why: str, waited: float) -> None:
        if why == self._alone_refused:
            return
        self._alone_refused = why
        self.status.not_served = why  # status: the log alone said why, once
        log.error(
            "sender.cannot_serve_alone",
            why=why,
            waited=waited,
            action="still waiting for the receiver: the volumes are served once it is "
            "reached and they are synced",
        )

    async def _ship_until(self, state: SenderState, stop: asyncio.Event) -> None:
        """Keep a link shipping until ``stop``; reconnect (without rescanning) when it fails."""
        journal = state.journal
        assert journal is not None
        last_lag_log = 0.0
        while not stop.is_set():
            link = self._link
            if link is None:
                try:
                    opened = await self.sender.connect_retrying(state, stop, with_basis=False)
                except REPLICATION_REFUSED as exc:
                    await self.sender.refused_pause(exc, None, stop)
                    continue
                if opened is None:
                    break
                link = opened[0]
                if link.received_lsn + 1 < journal.first_lsn:
                    await self.sender.refused_pause(_lost_state(link, journal), link, stop)
                    continue
                self._link = link
            try:
                if await wait_for_request(link, stop, 1.0):
                    if not self.capture.barriers_allowed():
                        # changes made while the journal was full are not journaled yet: no
                        # final point can hold them (the receiver's request times out)
                        log.error("sender.handover_refused", why="journal overflow")
                        await link.refuse_handover()
                        continue
                    self._handover = link
                    return
            except MID_SESSION_RETRY as exc:
                self._link = None
                await self.sender.session_failed(exc, link, stop)
                continue
            except REPLICATION_REFUSED as exc:
                self._link = None
                await self.sender.refused_pause(exc, link, stop)
                continue
            now = time.monotonic()
            if now - last_lag_log >= LAG_LOG_INTERVAL:
                last_lag_log = now
                log.info("sender.lag", **link.lag())

    async def _ticker(self, journal: Journal, stop: asyncio.Event) -> None:
        """Turn new writes into a durable consistency point every TICK seconds."""
        barrier_after = journal.last_lsn
        status = self.status
        while not stop.is_set():
            await asyncio.sleep(TICK)
            allowed = self.capture.barriers_allowed()
            if not allowed:
                status.set_state(SenderPhase.OVERFLOW)
            elif self._link is not None and status.state is not SenderPhase.INITIAL_SYNC:
                status.set_state(SenderPhase.REPLICATING)
            if journal.last_lsn > barrier_after and allowed:
                sequence = self.capture.sequence()
                with contextlib.suppress(JournalFull):  # the capture tracks what follows
                    if sequence is None:  # nothing captured yet: configuration files only
                        barrier_after = await journal.append(Record.flush())
                    elif (lsn := await sequence.barrier_now()) is not None:
                        barrier_after = lsn
                await journal.sync()

    async def _catch_up(self, journal: Journal, stop: asyncio.Event) -> None:
        """Resync what the capture tracked while the journal was full, once the receiver
        is back (the resync can be larger than the journal: see ``_make_room``)."""
        while not stop.is_set():
            await asyncio.sleep(CATCH_UP_POLL)
            if self.capture.barriers_allowed() or self._link is None:
                continue
            try:
                sent = await self.capture.resync(self._make_room)
            except JournalFull:
                log.warning("sender.overflow_resync_incomplete", journal_bytes=journal.bytes_used)
                continue
            log.warning("sender.overflow_resynced", bytes=sent, lsn=journal.last_lsn)

    async def _make_room(self) -> bool:
        """The journal is full in the middle of a resync: drop what the receiver holds
        durably, then wait a while for acks. False when the link is gone (or stuck)."""
        link = self._link
        if link is None or link.failed:
            return False
        link.space_freed.clear()  # set by every ack, and when the link fails
        before = link.journal.bytes_used
        await link.relieve()
        if link.journal.bytes_used < before:
            return True
        try:
            async with asyncio.timeout(RESYNC_ROOM_WAIT):
                await link.space_freed.wait()
        except TimeoutError:
            return False
        return link is self._link and not link.failed

    async def _watch_files(self, journal: Journal, stop: asyncio.Event) -> None:
        """Ship configuration files again whenever their content changes."""
        while not stop.is_set() and self.files:
            await asyncio.sleep(FILE_POLL)
            for spec in self.files:
                await self._ship_file_if_changed(journal, spec)

    async def _ship_file_if_changed(self, journal: Journal, spec: VolumeSpec) -> None:
        try:
            record, digest = await asyncio.to_thread(file_volume, spec)
        except FileNotFoundError:
            return  # mid rename-over by an editor; the next poll sees the new file
        mode = record.offset  # a FILE record carries the mode
        if self._file_digests.get(spec.name) != digest:
            try:
                await journal.append(record)
            except JournalFull:
                return  # the next poll tries again
            self._file_digests[spec.name] = digest
            self._file_modes[spec.name] = mode
            log.debug("sender.file_changed", volume=spec.name, bytes=len(record.data))
        elif self._file_modes.get(spec.name) != mode:  # a chmod alone: no bytes to send
            try:
                await journal.append(Record.chmod(spec.name, mode))
            except JournalFull:
                return
            self._file_modes[spec.name] = mode
            log.debug("sender.file_mode_changed", volume=spec.name, mode=oct(mode))

    async def _drain(self, journal: Journal) -> None:
        """Make the last writes durable, ship them and wait (bounded) until applied."""
        with contextlib.suppress(Exception):  # a barrier makes the last writes applicable
            await journal.append(Record.flush())
            await journal.sync()
        link = self._link
        last = journal.last_lsn
        if link is None:
            log.warning(
                "sender.stopped_with_backlog",
                last_lsn=last,
                why="the receiver is not connected",
                next="what it lacks stays in the journal: the next run ships it",
            )
            return
        # while the receiver keeps taking bytes or answering; not for a stalled one
        watch = StopWatch(link.conn)
        if await link.wait_applied_while_there(last, DRAIN_TIMEOUT, watch):
            await link.goodbye("sender stopping")
            log.info("sender.drained", lsn=last)
            return
        await link.goodbye("sender stopping", stalled=watch.stalled)
        link.log_abandoned(last, watch)


class NbdCapture:
    """Serve the disk images over NBD; every write is journaled before it is acknowledged."""

    def __init__(self, volumes: list[VolumeSpec], options: NbdOptions) -> None:
        self.disks = [v for v in volumes if v.kind is VolumeKind.DISK]
        self.watched = [v for v in volumes if v.kind is VolumeKind.FILE]
        if not self.disks:
            raise ConfigError("--capture nbd needs at least one disk image to export")
        for spec in self.disks:  # an image that cannot be served fails now, before any sync
            export_size_for(probe_path(spec.path), str(spec.path), options.export_size)
        self.options = options
        self._exports: list[JournaledFileExport] = []
        self._server: NbdServer | None = None
        self.gate: WriteGate | None = None  # source self-fencing (send --witness)

    def prelude(self, replica: Tree | None) -> list[Record]:
        return []

    async def check(self, state: SenderState) -> None:
        """Refuse now what ``start`` would refuse after the initial sync: an image another
        program (a VM started on the file, ``qemu-io``) has open for writing. Its writes
        would not be journaled, and found only once the whole disk had been synced."""
        for spec in self.disks:
            await asyncio.to_thread(state.locks.check_servable, spec.path)

    async def start(self, state: SenderState) -> None:
        journal = state.journal
        assert journal is not None
        for spec in self.disks:  # nothing may write them behind the shim's back (QEMU's locks)
            await asyncio.to_thread(state.locks.serve, spec.path)
        for spec in self.disks:
            self._exports.append(
                JournaledFileExport(
                    journal, spec.path, spec.name, self.options.export_size, overflow=True
                )
            )
        self._server = NbdServer({e.name: e for e in self._exports}, gate=self.gate)
        await self._server.start_unix(self.options.socket)
        if self.options.listen is not None:
            await self._server.start_tcp(*self.options.listen)
        log.info(
            "sender.nbd_serving",
            socket=self.options.socket,
            exports=[e.name for e in self._exports],
        )

    async def stop(self, state: SenderState) -> None:
        if self._server is not None:
            await self._server.aclose()  # finishes in-flight requests, flushes every export
        if not self.barriers_allowed():
            log.warning(
                "sender.stopped_in_overflow",
                action="changes made while the journal was full are compared and sent by "
                "the next start's initial sync",
            )
        for export in self._exports:
            await export.aclose()

    def barriers_allowed(self) -> bool:
        return not self._exports or self._exports[0].barriers_allowed

    def sequence(self) -> JournalFirst[Any] | None:
        return self._exports[0].capture if self._exports else None

    async def resync(self, make_room: Callable[[], Awaitable[bool]]) -> int:
        return await resync_overflow(self._exports, make_room)


class FuseFolderCapture:
    """Mount the VM folder through the journaling FUSE filter (``--capture fuse``)."""

    def __init__(self, source: Path, mountpoint: Path, tree: Tree) -> None:
        from replicator.engine.fuse.mount import check_mountpoint, check_paths

        self.source = check_paths(source, mountpoint)
        check_mountpoint(mountpoint)  # now, not after the initial sync
        self.mountpoint = mountpoint
        self.tree = tree
        self.watched: list[VolumeSpec] = []  # every change goes through the filter
        self._capture: FuseCapture | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # QEMU's deny-write locks on the folder's images from check() until stop()
        self.guard = FolderGuard(self.source)

    def prelude(self, replica: Tree | None) -> list[Record]:
        if replica is None:
            raise ReplicatorError("the replica folder's layout was not listed")  # a bug
        return tree_records(replica, self.tree)

    async def check(self, state: SenderState) -> None:
        """A VM still running on the folder itself writes its images behind the filter:
        none of its writes would reach the journal or the replica, and the mount would
        serve a second writer beside it. The images' QEMU write lock tells (the image a
        ``qemu-io`` or a running QEMU has open for writing).

        From here until ``stop`` the folder guard keeps any other program from opening
        them for writing (engine/folder_guard.py). It is taken before the check: a QEMU
        takes its own locks before it looks for others', so one of the two sees the other.
        """
        state.locks.keep(self.guard)  # released with the sender's locks, however it ends
        self.guard.gone = state.locks.let_go  # an image removed through the mount
        disks = [v.name for v in state.config.volumes if v.kind is VolumeKind.DISK]
        await asyncio.to_thread(self.guard.hold_all, disks)
        writers = await asyncio.to_thread(state.locks.written_by_others)
        if writers:
            raise ConfigError(
                f"{writers[0]} is open for writing by another program (QEMU's image lock is "
                "held): a VM running on the folder itself writes behind the FUSE filter, and "
                "none of its writes would be replicated",
                hint=f"stop the VM, start the sender, then start the VM on the files under "
                f"{self.mountpoint}",
            )

    async def start(self, state: SenderState) -> None:
        from replicator.engine.fuse.capture import FuseCapture

        journal = state.journal
        assert journal is not None
        await asyncio.to_thread(self.guard.follow)  # the folder as the mount will show it
        capture = self._capture = FuseCapture(
            self.source, self.mountpoint, journal, overflow=True, guard=self.guard
        )
        self._task = asyncio.create_task(capture.run(self._stop), name="fuse")
        mounted = asyncio.create_task(capture.mounted.wait())
        await asyncio.wait({self._task, mounted}, return_when=asyncio.FIRST_COMPLETED)
        mounted.cancel()
        if self._task.done():
            task, self._task = self._task, None  # stop() must not raise it a second time
            task.result()  # raises why the mount failed
            raise ReplicatorError(f"the FUSE mount at {self.mountpoint} ended at once")
        log.info("sender.fuse_serving", source=str(self.source), mount=str(self.mountpoint))

    def barriers_allowed(self) -> bool:
        return self._capture is None or self._capture.filter.barriers_allowed

    def sequence(self) -> JournalFirst[Any] | None:
        return None if self._capture is None else self._capture.filter.journal_first

    async def resync(self, make_room: Callable[[], Awaitable[bool]]) -> int:
        if self._capture is None:
            return 0
        return await self._capture.filter.resync(make_room)

    async def stop(self, state: SenderState) -> None:
        self._stop.set()
        try:
            if self._task is not None:
                await self._task  # syncs the journal and unmounts
        finally:
            self.guard.release()  # nothing writes through the mount any more


def _lost_state(link: Link, journal: Journal) -> RefusedError:
    """The receiver holds less than this journal still has: it lost its state (its job
    folders deleted or restored from an old backup), and what it lacks was trimmed here.
    (With records journaled after the gap, ``Sender.open_link`` refuses it first.)"""
    return lost_records.refusal((link.received_lsn + 1, journal.first_lsn - 1))
