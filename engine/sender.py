"""The sending side: capture by snapshot diff into the journal, ship it, wait for durability.

One *cycle* runs the pre-hook (freeze), scans every volume against a basis manifest and
journals the changes as one EPOCH, runs the post-hook (thaw), and saves the manifests.
The link ships the journal concurrently. ``--once`` runs one cycle and waits until the
receiver has applied the EPOCH; otherwise cycles repeat every ``interval`` seconds and
the connection is re-established after any interruption.

The state folder and the choice of a basis (what the replica is assumed to hold) are in
``engine/sender_state.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from collections.abc import Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from replicator.engine import early_hashing, generations, lost_records
from replicator.engine import replica_id as replica_ids
from replicator.engine.checkpoint import TouchedExtents
from replicator.engine.connectors import Connector, TcpConnector
from replicator.engine.direct_intent import IntentLog
from replicator.engine.errors import (
    AuthError,
    BusyError,
    ConfigError,
    ConnectError,
    PeerProtocolError,
    RefusedError,
    ReplicatorError,
    SplitBrainError,
    TargetStorageError,
    VersionMismatch,
    as_user_error,
)
from replicator.engine.handover import TargetLine, hand_over, wait_for_request
from replicator.engine.hooks import HookFailed, Quiesce
from replicator.engine.image_deps import unreplicated
from replicator.engine.link import Link, SessionPurpose, ShippedUnchecked, SilentPeerError
from replicator.engine.manifest import ManifestSet
from replicator.engine.names import check_job_name
from replicator.engine.peer_applied import PeerApplied, save_peer_applied
from replicator.engine.scan import (
    Appender,
    CycleStopped,
    Progress,
    ScanStats,
    append_waiting,
    scan_changes,
    scan_epoch,
)
from replicator.engine.sender_state import (
    JOURNAL_CAP,
    LIVE_JOURNAL_CAP,
    SenderConfig,
    SenderState,
    choose_basis,
    replica_layout,
    unknown_where_journaled,
)
from replicator.engine.served_alone import clear_served_alone, receiver_ahead
from replicator.engine.status import SenderJobStatus, SenderPhase
from replicator.engine.tree import Tree
from replicator.engine.units import human_size
from replicator.engine.volumes import VolumeGone, VolumeKind
from replicator.journal import Journal, JournalFull, Record, RecordType
from replicator.journal.durable import settled

if TYPE_CHECKING:
    from replicator.engine.witness_fence import SourceFence
    from replicator.transport import Welcome

log = structlog.get_logger()
_T = TypeVar("_T")

# What ends an established session but not the job: the link broke, a frame arrived
# damaged (a flipped bit on the path; every frame is checksummed, so it is caught, never
# applied), or the target could not store what it was sent (its disk full, failing or
# remounted read-only: fixed there, while the source goes on). A continuous sender
# reconnects and resumes from the receiver's last ack; a live one keeps capturing meanwhile,
# as DRBD's primary goes on when its peer's disk fails.
MID_SESSION_RETRY = (ConnectError, PeerProtocolError, TargetStorageError)
RETRY_FIRST, RETRY_MOST = 1.0, 60.0  # seconds between tries: doubling from the first
# a scan with a pre hook: passes of the copy before the freeze while each changed more than
# a quarter of the journal's cap, and freezes released because the frozen scan's changes
# did not fit in the journal, before the cycle gives up its point (FreezeOverflow)
COPY_PASSES, MAX_FREEZES = 4, 3
HANDSHAKE_DAMAGE_RETRIES = 2  # then a protocol or version error at connect is believed


@dataclass(slots=True)
class Summary:
    job: str
    epoch: int = 0
    lsn: int = 0
    bytes_scanned: int = 0
    bytes_changed: int = 0
    bytes_zeroed: int = 0
    extents_changed: int = 0
    files_changed: int = 0
    records: int = 0
    payload_bytes: int = 0
    wire_bytes: int = 0
    compression_ratio: float = 1.0
    seconds: float = 0.0
    basis: str = "local"
    volumes: list[str] = field(default_factory=list)
    # the post hook (thaw) failed after the scan: the point stands, the guest may be frozen
    thaw_failed: str | None = None
    # with a pre hook: how long the guest was frozen, and the changes (in bytes_changed)
    # copied before the freeze (engine/hooks.py)
    frozen_seconds: float | None = None
    copied_before_freeze: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Sender:
    def __init__(self, config: SenderConfig, connector: Connector | None = None) -> None:
        """``connector``: where connections come from (default: TCP to the configured
        host and port); it outlives them, so what it owns survives reconnects."""
        check_job_name(config.job)
        self.config = config
        self.connector: Connector = connector or TcpConnector(
            config.host, config.port, timeout=config.connect_timeout
        )
        self.status = SenderJobStatus(config.job, "scan", self.connector.target)
        self.quiesce = Quiesce(config.pre_hook, config.post_hook, config.job, config.hook_timeout)
        self._lsn_floor = 1
        # bytes the last cycle of this run changed (None: no cycle yet): whether the next
        # frozen scan is preceded by a copy (``cycle``)
        self._last_changed: int | None = None
        # the manifests of a copy the receiver holds, made before a freeze that failed:
        # the next cycle's basis (a continuous sender tries again from there)
        self.copied_basis: ManifestSet | None = None
        self._unfrozen_warned: set[Path] = set()  # images scanned while another wrote them
        self._applied_noted = 0  # the applied LSN last written to peer_applied.state
        # set by a continuous run: a first sync waiting on the link gives up when it is set
        self.stopping: asyncio.Event | None = None
        self.replica_tree: Tree | None = None  # the replica folder's layout (folder jobs)
        self.progress: Progress | None = None  # sees every cycle's scan (bars, log lines)
        self._refused_retry = RETRY_FIRST  # the wait after a refusal (refused_pause)
        self._refused_at = -1  # the receiver's durable LSN at the last refusal
        self._gone_retry = RETRY_FIRST  # the wait after a volume went (volume_gone)
        self.reached = False  # a session was established at least once
        # source self-fencing (send --witness): serving alone waits for its first renewal
        self.fence: SourceFence | None = None
        # the replica identity its receiver said (engine/replica_id.py; "" until a session
        # says it): declared to the witness, which promotes no other copy of the job
        self.replica_id = ""
        # set at each session's start: the witness's lease is renewed then, so the replica
        # it reached is declared at once (engine/witness_roles.py), not an interval later
        self.session_began = asyncio.Event()
        self.connect_failure: ReplicatorError | None = None  # the last, while not reached
        # records its sessions shipped for the receiver alone to check (engine/link.py)
        self.unchecked = ShippedUnchecked()

    def bind_log_context(self) -> None:
        """Name the job and the receiver on every log line of the calling task (and of
        the tasks and threads it starts)."""
        structlog.contextvars.bind_contextvars(job=self.config.job, peer=self.connector.target)

    def log_start(self, capture: str) -> None:
        """The start line: what is replicated, to where, how."""
        self.bind_log_context()
        log.info(
            "sender.started",
            capture=capture,
            volumes=[v.name for v in self.config.volumes],
            state_dir=str(self.config.state_dir),
        )
        self.warn_image_dependencies()
        if self.config.pre_hook and not self.config.post_hook:
            log.warning(
                "sender.pre_hook_alone",
                problem="--pre-hook without --post-hook: nothing thaws what the pre hook "
                "froze, after the scan or when it fails",
                hint="add --post-hook (e.g. 'virsh domfsthaw VM'); ignore this if the pre "
                "hook freezes nothing",
            )

    def warn_image_dependencies(self) -> None:
        """Say, before replicating, which backing files, data files or parents the disks
        need and the job leaves out: a replica without them cannot be opened on the target
        (engine/image_deps.py). A folder job keeps relative names working."""
        disks = [v.path for v in self.config.volumes if v.kind is VolumeKind.DISK]
        for problem in unreplicated(disks, tree=self.config.folder):
            log.warning("send.image_dependency", problem=problem)

    def unreached_error(self) -> ReplicatorError | None:
        """Why a sender stopped before any session: the last connect failure, said so."""
        failure = self.connect_failure
        if self.reached or failure is None:
            return None
        return type(failure)(
            f"stopped without having reached the receiver {self.connector.target}; "
            f"last attempt: {failure.message}",
            hint=failure.hint,
        )

    def _sizes(self) -> dict[str, int]:
        """Sizes of the volumes that exist now (a FUSE folder's files come and go)."""
        sizes: dict[str, int] = {}
        for v in self.config.volumes:
            try:
                sizes[v.name] = os.stat(v.path).st_size
            except OSError as exc:  # gone, or a folder on its path is a file or a loop now
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    raise
        return sizes

    async def open_link(
        self,
        state: SenderState,
        *,
        with_basis: bool = True,
        purpose: SessionPurpose | None = None,
    ) -> tuple[Link, str, ManifestSet]:
        """Connect, handshake, start shipping, and (``with_basis``) choose the scan basis.

        ``purpose`` defaults to RESYNC for a ``--resync`` basis, else REPLICATE."""
        if purpose is None:
            resync = with_basis and self.config.resync
            purpose = SessionPurpose.RESYNC if resync else SessionPurpose.REPLICATE
        journal = state.journal
        assert journal is not None
        try:
            conn = await self.connector.connect()
        except AuthError as exc:  # TLS refused: in the status as any refusal (not so a
            self.status.error("auth", str(exc))  # receiver that is simply away)
            raise
        link = Link(conn, journal, unchecked=self.unchecked)
        try:
            state_dir = self.config.state_dir
            known = await asyncio.to_thread(generations.load_peer, state_dir)
            # the mark on each configuration file as it is now (an editor replaces them):
            # the receiver looks for it as the session starts
            await asyncio.to_thread(state.locks.follow_files)
            welcome = await link.handshake(
                self.config.job,
                self.config.volumes,
                self._sizes(),
                purpose=purpose,
                generation=known.generation,
                session=state.locks.session_id(),
            )
            theirs = replica_ids.from_capabilities(welcome.capabilities)
            if theirs and known.replica and theirs != known.replica:
                another_replica(self.config.job, link, purpose)  # raises, unless taken over
            # a new history (first contact, --resync), or a replica taken (verify takes none)
            taking = theirs and purpose is not SessionPurpose.VERIFY
            now = generations.Peer(welcome.generation, theirs if taking else known.replica)
            if now != known:
                await settled(generations.save_peer, state_dir, now)
            self.replica_id = now.replica
            self.status.generation = welcome.generation
            if state.served_alone is not None:  # engine/served_alone.py
                ahead = receiver_ahead(link.received_lsn, state.served_alone)
                if ahead is not None:
                    raise ahead
                await settled(clear_served_alone, state_dir)
                state.served_alone = self.status.served_alone = None
            # the receiver may be ahead of us (our state was lost): never reuse its LSNs
            self._lsn_floor = link.received_lsn + 1
            gap = await lost_records.receiver_gap(journal, link.received_lsn)
            if gap is not None:  # before anything is shipped across it
                await self._receiver_lost(state, link, gap, with_basis)
            resync = purpose is SessionPurpose.RESYNC
            if gap is None and resync and with_basis:  # until its comparison completes
                await state.require_compare("--resync: the replica is compared with the source")
            if resync or (with_basis and state.compare is not None):  # `verify --repair` too
                await link.send_point_floor(self._compare_floor(link))
            self.status.compare_pending = lambda: state.compare
            link.start_reader()
            if with_basis:
                basis, kind = await choose_basis(state, link)
                if self.config.folder:  # before shipping: the listing is at received_lsn
                    self.replica_tree = await replica_layout(state, link)
            else:
                basis, kind = ManifestSet(0, self.config.extent_size), "none"
            link.start_shipper(max(link.received_lsn + 1, journal.first_lsn))
        except BaseException as exc:
            await link.aclose()
            self.status.error(error_kind(exc), str(exc))
            mapped = as_user_error(exc)  # e.g. the receiver went away mid-handshake
            if mapped is not exc:
                raise mapped from exc
            raise
        self.status.journal = journal
        self.status.attach(link)
        self.reached, self.connect_failure = True, None
        self.session_began.set()
        log.info(
            "sender.connected",
            basis=kind,
            received_lsn=link.received_lsn,
            generation=self.status.generation,
        )
        return link, kind, basis

    async def _receiver_lost(
        self, state: SenderState, link: Link, gap: tuple[int, int], with_basis: bool
    ) -> None:
        """The receiver lacks ``gap``, and the journal holds records after it
        (engine/lost_records.py): compare, and tell the receiver which barriers are no
        consistency point; or, for a session that compares nothing, refuse it."""
        await state.require_compare(lost_records.why(gap))
        if not with_basis:
            raise lost_records.refusal(gap)
        floor = self._compare_floor(link)
        log.warning(
            "sender.receiver_lacks_records",
            lsn_from=gap[0],
            lsn_to=gap[1],
            point_floor=floor,
            action="comparing every volume with the replica; the receiver takes no barrier "
            f"below lsn {floor} as a consistency point",
        )

    def _compare_floor(self, link: Link) -> int:
        """The PointFloor of a session that compares (engine/lost_records.py): above every
        LSN journaled here or received there, so only the comparison's epoch (numbered
        after both) ends a consistency point. Sent at every such session, not once: a
        receiver whose state was damaged since has lost the floor it was told."""
        journal = link.journal
        return max(journal.next_lsn, link.received_lsn + 1)

    async def ask_target(self, state: SenderState) -> Welcome:
        """What the receiver says of the job now, from a session that reads and writes
        nothing (a failback session: its Welcome lists ``promoted`` while the job is
        promoted, and gives its applied LSN and generation), closed at once. For a handover
        whose link was lost (engine/handover.py)."""
        journal = state.journal
        assert journal is not None
        link = Link(await self.connector.connect(), journal)
        try:
            known = await asyncio.to_thread(generations.load_peer, self.config.state_dir)
            welcome = await link.handshake(
                self.config.job,
                self.config.volumes,
                self._sizes(),
                purpose=SessionPurpose.FAILBACK,
                generation=known.generation,
                session=state.locks.session_id(),
            )
            await link.goodbye("asked whether the job was handed over")
            return welcome
        except BaseException as exc:
            mapped = as_user_error(exc)
            if mapped is not exc:
                raise mapped from exc
            raise
        finally:
            await link.aclose()

    def target_line(self, state: SenderState) -> TargetLine:
        """How a handover whose link failed reaches the target again (engine/handover.py)."""

        async def join() -> Link:
            link, _, _ = await self.open_link(state, with_basis=False)
            return link

        return TargetLine(ask=lambda: self.ask_target(state), join=join, close=self.close_link)

    async def close_link(self, link: Link) -> None:
        """Close ``link`` and say so in the status (the job is disconnected until the next);
        note what the receiver had applied, for ``status`` at rest (engine/peer_applied.py)."""
        await link.aclose()
        self.status.attach(None)
        applied = link.applied_lsn
        if applied > self._applied_noted:
            noted = PeerApplied(applied, time.time_ns())
            if await save_peer_applied(self.config.state_dir, noted):
                self._applied_noted = applied

    async def append(
        self, journal: Journal, link: Link, records: list[Record], *, wait: bool = True
    ) -> int:
        """Journal records for ``link``, waiting while the journal is full; the last LSN.
        ``wait`` False: JournalFull rather than wait for the link.

        The first record after a reconnect is numbered past what the receiver already
        holds, so its LSNs are never reused (our state may have been lost).
        """
        if journal.next_lsn < self._lsn_floor:
            records = [records[0].with_lsn(self._lsn_floor), *records[1:]]
        last = await append_waiting(
            journal,
            records,
            link.space_freed,
            link.raise_if_failed,
            link.relieve,
            self.stopping,
            wait=wait,
        )
        self.status.changed("lag")  # more journaled than applied (the embedding API's events)
        return last

    async def cycle(
        self,
        state: SenderState,
        link: Link | None,
        basis: ManifestSet,
        progress: Progress | None = None,
        *,
        prelude: list[Record] | None = None,
        save: bool = True,
        unjournaled: bool = False,
        remote: bool = False,
    ) -> tuple[ManifestSet, ScanStats, int]:
        """One scan journaled as an EPOCH; the new manifests are saved unless ``save`` is
        False (the caller then saves them with ``state.save``). Without a ``link`` (a live
        sender serving alone) the journal must hold the whole epoch: JournalFull if not.
        ``unjournaled``: ``basis`` is the local manifests', so a scan with a link may ship
        its records without the journal, noting them first (engine/direct_intent.py).
        ``remote``: ``basis`` is the replica's (the changes may be the whole disk).

        With a pre hook the guest is frozen while the scan runs, so the frozen scan never
        waits for the link: it journals (local disk speed), and whatever may be large (a
        basis from the replica, a first sync, a run's first cycle, after a last cycle that
        changed more than a quarter of the journal's cap) is copied first without the
        freeze, by a pass that makes no consistency point; the frozen scan then finds only
        what changed since. So is a cycle that finds more than a quarter of the cap still
        in the journal (the link paused or slow): the copy waits for the link, unfrozen,
        until the receiver holds it all. A frozen scan that finds no room in the journal
        anyway (the guest outwrote it during the copy) is released: thawed at once, what it
        journaled marked unknown in the basis, the changes copied and the guest frozen again,
        at most MAX_FREEZES times (then FreezeOverflow: no point). The guest stays frozen for
        a read of its images, not for a transfer."""
        journal = state.journal
        assert journal is not None
        hooked = self.quiesce.freezes
        # A first sync from this state folder (no manifests: the basis is the replica's) is
        # shipped without the journal; its EPOCH is journaled once the receiver holds all
        # of it. A failure before that loses the records, and the next cycle compares with
        # the replica again (still no manifests), so nothing is missed. A later scan ships
        # the same way when its basis is the local manifests: what it ships is noted before
        # it goes, and the next basis from those manifests takes it as unknown.
        since = state.manifests.lsn if state.manifests is not None else None
        later = (
            unjournaled and link is not None and since is not None and not prelude and not hooked
        )
        direct = since is None or later
        cap, last = journal.max_bytes, self._last_changed
        big = last is None or (cap is not None and last > cap // 4)  # None: not known yet
        # a backlog the link has not taken (rate 0, a night-only schedule, a slow link):
        # the frozen scan could find the journal full and wait for the link, frozen
        backlog = cap is not None and journal.bytes_used > cap // 4
        precopy = hooked and link is not None and (since is None or remote or big or backlog)
        notes = (
            IntentLog(state.dir, since, basis.extent_size) if later and since is not None else None
        )
        frozen: TouchedExtents | None = None  # while the frozen scan runs: what it journaled
        journaled: TouchedExtents | None = None

        async def append(records: list[Record]) -> int:
            if link is None:
                return await journal.append_many(records)
            if direct and records[-1].type is not RecordType.EPOCH:
                first = link.direct_first(self._lsn_floor)
                if notes is not None:  # durably, before any of them can reach the receiver
                    # settled: a cancelled cycle closes ``notes`` only once the thread that
                    # writes through its descriptor is done (a number reused meanwhile
                    # would have taken the note)
                    await settled(notes.add, first, records)
                last = await self._unless_stopped(link.ship_direct(records, self._lsn_floor))
                if last != first + len(records) - 1:
                    raise RuntimeError(f"records noted from lsn {first} were shipped up to {last}")
                self.status.changed("lag")
                return last
            if direct:
                await self._unless_stopped(link.wait_received(link.direct_lsn))
            if frozen is None:
                return await self.append(journal, link, records)
            try:  # the guest is frozen: never wait for the link
                last = await self.append(journal, link, records, wait=False)
            except JournalFull as exc:
                raise _NoRoomFrozen(str(exc)) from None
            frozen(records)
            return last

        status = self.status

        shown = progress or self.progress

        def seen(done: int, total: int) -> None:
            status.progress = (done, total)
            if shown is not None:
                shown(done, total)

        for path in await asyncio.to_thread(state.locks.follow):
            log.warning(
                "sender.image_replaced",
                path=str(path),
                problem=f"{path} is another file now (replaced at its path): this sender "
                "replicates the new one and let go of the old",
            )
        if not hooked:
            await self._warn_unfrozen_writers(state)
        else:  # what early helpers saw is from before the freeze: never for this epoch
            early_hashing.discard()
        copied: ScanStats | None = None
        try:
            for freeze in range(1, MAX_FREEZES + 1):
                if precopy:
                    assert link is not None
                    basis, copy = await self._copy_before_freeze(
                        journal, link, basis, append, seen, prelude
                    )
                    prelude, direct = None, False
                    if copied is None:
                        copied = copy
                    else:
                        copied.add(copy)
                try:
                    async with self.quiesce.frozen():  # HookFailed if the freeze fails: no epoch
                        scan_began = time.monotonic()  # for the lag: a duration
                        frozen = TouchedExtents(basis.extent_size) if hooked else None
                        try:
                            result = await scan_epoch(
                                self.config.volumes,
                                journal,
                                basis,
                                append=append,
                                progress=seen,
                                prelude=prelude,
                            )
                        finally:
                            journaled, frozen = frozen, None
                    break
                except HookFailed:  # the copy is received: the next try goes on from it
                    self.copied_basis = basis if copied is not None else None
                    raise
                except _NoRoomFrozen as exc:
                    assert journaled is not None
                    # what the frozen scan journaled reaches the replica before any point:
                    # the next pass reads and sends it again (never the older content)
                    basis = unknown_where_journaled(basis, journaled, self.config.volumes)
                    log.warning(
                        "sender.freeze_released",
                        freeze=freeze,
                        journal_max=journal.max_bytes,
                        text=f"the guest changed more than the journal has room for ({exc}) "
                        "while the last changes were copied: thawed at once rather than wait "
                        "for the link frozen; copying those changes first",
                    )
                    if freeze == MAX_FREEZES:
                        self.copied_basis = basis
                        raise FreezeOverflow(journal.max_bytes) from None
                    precopy = True
        finally:
            early_hashing.discard()  # any the scan did not take: no later scan would
            if notes is not None:
                notes.close()
        if copied is not None:  # changed: both passes; scanned: the point's scan alone
            copied.bytes_copied, copied.bytes_scanned = copied.bytes_changed, 0
            result[1].add(copied)
        self._last_changed = result[1].bytes_changed
        if self.quiesce.thaw_failure is not None:  # logged; the epoch was taken frozen
            status.error("hook", self.quiesce.thaw_failure.message)
        if status.progress is not None:  # the scan is complete: all of it was seen
            seen(status.progress[1], status.progress[1])
        if save:
            await state.save(result[0])
        status.last_epoch = result[0].epoch
        status.point_taken(result[2], scan_began)
        return result

    async def _copy_before_freeze(
        self,
        journal: Journal,
        link: Link,
        basis: ManifestSet,
        append: Appender,
        seen: Progress,
        prelude: list[Record] | None,
    ) -> tuple[ManifestSet, ScanStats]:
        """Copy what changed since ``basis`` without the freeze, until the receiver holds it
        all; again while a pass changed more than a quarter of the journal's cap (the guest
        wrote that much while the last pass crossed the link), at most COPY_PASSES times.
        The copy's manifests, as the basis of the same epoch, and what the passes changed."""
        cap = journal.max_bytes
        total: ScanStats | None = None
        for _ in range(COPY_PASSES):
            basis, stats = await scan_changes(
                self.config.volumes, journal, basis, append=append, progress=seen, prelude=prelude
            )
            basis.epoch -= 1  # the copy's manifests, as the basis of the same epoch
            prelude = None
            # the copy is received before the freeze, so the frozen scan's records find the
            # journal empty (and a first sync's shipped ones are held by the receiver before
            # anything is journaled after them). Only durable records ship, and the scan
            # leaves its last ones to the caller's sync (an epoch's comes with its EPOCH):
            # without this one, a copy of a configuration file alone, or whose last batch
            # came while a background sync ran, would wait for its receipt for ever.
            await journal.sync()
            await self._unless_stopped(link.wait_received(journal.last_lsn))
            log.info(
                "sender.copied_before_freeze",
                changed=stats.bytes_changed,
                text=f"copied {human_size(stats.bytes_changed)} of changes before the freeze; "
                "the frozen scan journals what changed since",
            )
            if total is None:
                total = stats
            else:
                total.add(stats)
            if cap is None or stats.bytes_changed <= cap // 4:
                break
        assert total is not None
        return basis, total

    async def _warn_unfrozen_writers(self, state: SenderState) -> None:
        """A scan reads an image while a running VM writes it: its epoch mixes blocks from
        before and after writes, which no moment of the disk ever held. Said once per image
        per run (the VM may start after the sender), since nothing can see inside the guest."""
        for path in await asyncio.to_thread(state.locks.written_by_others):
            if path in self._unfrozen_warned:
                continue
            self._unfrozen_warned.add(path)
            log.warning(
                "sender.scanning_a_running_vm",
                path=str(path),
                problem=f"{path} is open for writing by another program (QEMU's write lock): "
                "a scan copies it while it changes, so a replica point may not be one the "
                "disk ever held (not crash-consistent)",
                hint="freeze the guest around each scan (--pre-hook 'virsh domfsfreeze VM' "
                "--post-hook 'virsh domfsthaw VM'), or capture its writes with --capture nbd "
                "or --capture fuse",
            )

    async def _unless_stopped(self, work: Coroutine[Any, Any, _T]) -> _T:
        """``work``, unless ``stopping`` is set first: then CycleStopped. A cycle shipped
        without the journal waits for the link (a low rate, paused at 0); what it sent is
        not journaled here and needs no shipping on stop (the next run compares with the
        replica, or takes what was noted as unknown: engine/direct_intent.py)."""
        stop = self.stopping
        if stop is None:
            return await work
        task = asyncio.ensure_future(work)
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise CycleStopped("stopped during a cycle shipped without the journal")
        return task.result()

    async def run_once(self, progress: Progress | None = None) -> Summary:
        """One cycle, then wait until the receiver has applied it; ``progress`` sees the scan."""
        started = time.monotonic()
        self.log_start("scan")  # `sender.started`, as every sender says it
        async with SenderState(self.config) as state:
            link, kind, basis = await self.open_link(state)
            self.status.set_state(SenderPhase.REPLICATING)  # not "starting" while it ships
            try:
                manifests, stats, epoch_lsn = await self.cycle(
                    state,
                    link,
                    basis,
                    progress,
                    save=False,
                    unjournaled=kind == "local",
                    remote=kind == "remote",
                )
                # the manifests' fsync overlaps the receiver's apply (neither needs the
                # other); both are done before this returns and the state folder is let go
                saving = asyncio.ensure_future(state.save(manifests))
                try:
                    await link.wait_applied(epoch_lsn)
                finally:
                    await saving
                await link.goodbye()  # the shipper stops first
                # the receiver applied everything and the manifests hold it: the next run
                # opens a journal with no records to read and verify (a cron job's
                # journal otherwise grows a segment's worth, up to 64 MiB, read each start)
                assert state.journal is not None
                await state.journal.trim(link.applied_lsn + 1, retire_active=True)
            finally:
                await self.close_link(link)
        payload, wire = link.conn.stats.payload_sent, link.conn.bytes_sent  # sent: Records only
        return Summary(
            job=self.config.job,
            volumes=[v.name for v in self.config.volumes],
            basis=kind,
            epoch=manifests.epoch,
            lsn=epoch_lsn,
            bytes_scanned=stats.bytes_scanned,
            bytes_changed=stats.bytes_changed,
            bytes_zeroed=stats.bytes_zeroed,
            extents_changed=stats.extents_changed,
            files_changed=stats.files_changed,
            records=stats.records,
            payload_bytes=payload,
            wire_bytes=wire,
            compression_ratio=round(payload / wire, 3) if wire else 1.0,
            seconds=round(time.monotonic() - started, 3),
            thaw_failed=thaw.message if (thaw := self.quiesce.thaw_failure) else None,
            frozen_seconds=self.quiesce.frozen_seconds,
            copied_before_freeze=stats.bytes_copied,
        )

    async def connect_retrying(
        self, state: SenderState, stop: asyncio.Event, *, with_basis: bool = True
    ) -> tuple[Link, str, ManifestSet] | None:
        """``open_link``, retried while the receiver is away or busy with another session
        for the job (1 s, doubling to 60 s).

        None when ``stop`` is set first. Other errors are not retried.
        """
        backoff = RETRY_FIRST
        damaged = 0
        while not stop.is_set():
            try:
                return await self.open_link(state, with_basis=with_basis)
            except TargetStorageError as exc:  # the target's disk: waited on as mid-session
                if not self.reached:
                    self.connect_failure = exc
                await self.refused_pause(exc, None, stop)
                continue
            except (ConnectError, BusyError) as exc:
                log.warning("sender.connect_failed", error=str(exc), retry_in=backoff)
                self.status.error("connect", str(exc))
                if not self.reached:
                    self.connect_failure = exc
            except (PeerProtocolError, VersionMismatch) as exc:
                if isinstance(exc, SilentPeerError) and (
                    self.reached or state.manifests is not None
                ):
                    # the receiver this job synced with, silent now: stopped or overloaded
                    # (the kernel takes connections for a stopped process), not another
                    # service: waited for as a receiver away is, not given up on
                    why = (
                        f"{self.config.host}:{self.config.port} took the connection but "
                        "answered nothing: the receiver runs but is stuck or overloaded "
                        "(stopped? look at it there)"
                    )
                    log.warning("sender.connect_failed", error=why, retry_in=backoff)
                    self.status.error("connect", why)
                else:
                    # a byte damaged on the path in the receiver's first frame looks just
                    # like a peer of another version (or no peer of ours); a real one
                    # answers the same way every time
                    damaged += 1
                    if damaged > HANDSHAKE_DAMAGE_RETRIES:
                        raise
                    log.warning("sender.handshake_damaged", error=str(exc), retry_in=backoff)
            self.status.set_state(SenderPhase.CONNECTING)
            await sleep_or_stop(stop, backoff)
            backoff = min(backoff * 2, RETRY_MOST)
        return None

    async def session_failed(self, exc: ReplicatorError, link: Link, stop: asyncio.Event) -> None:
        """End a continuous sender's session that failed with one of MID_SESSION_RETRY:
        say why (in the status before it shows the link closed) and close the link; after
        a refusal of the target's storage, pause (``refused_pause``)."""
        if isinstance(exc, TargetStorageError):
            await self.refused_pause(exc, link, stop)
            return
        log.warning("sender.link_lost", error=str(exc))
        self.status.error("connection", str(exc))
        await self.close_link(link)

    async def refused_pause(
        self, exc: ReplicatorError, link: Link | None, stop: asyncio.Event
    ) -> None:
        """Say that the receiver refused (with ``link``: in the status too, before the
        link is closed; a refusal at connect, without one, was counted by ``open_link``),
        then wait before the caller tries again: longer at each refusal in a row, until
        the receiver makes something durable again, so a target that cannot take the job
        is not sent the same backlog at once (1 s, doubling to 60 s)."""
        if link is not None and link.received_lsn > self._refused_at:  # progress since
            self._refused_retry = RETRY_FIRST
            self._refused_at = link.received_lsn
        kind = error_kind(exc)
        event = "sender.receiver_storage" if kind == "storage" else "sender.replication_refused"
        log.error(event, error=str(exc), retry_in=self._refused_retry)
        if link is not None:
            self.status.error(kind, str(exc))
            await self.close_link(link)
        self.status.set_state(SenderPhase.REFUSED)  # not "connecting": it was let in no further
        await sleep_or_stop(stop, self._refused_retry)
        self._refused_retry = min(self._refused_retry * 2, RETRY_MOST)

    async def run_forever(self, interval: float, stop: asyncio.Event) -> None:
        """Cycle every ``interval`` seconds until ``stop``; reconnect after interruptions.

        Stopped before any session: the last connect failure, said so (not a silent 0)."""
        self.log_start("scan")
        self.stopping = stop
        self.quiesce.stop = stop
        self.status.interval = interval
        async with SenderState(self.config) as state:
            while not stop.is_set():
                opened = await self.connect_retrying(state, stop)
                if opened is None:
                    break
                link, kind, basis = opened
                self.status.set_state(SenderPhase.REPLICATING)
                try:
                    while not stop.is_set():
                        started = time.monotonic()
                        try:
                            manifests, stats, lsn = await self.cycle(
                                state,
                                link,
                                basis,
                                unjournaled=kind == "local",
                                remote=kind == "remote",
                            )
                        except (HookFailed, FreezeOverflow) as exc:  # no point: tried again
                            basis = self.no_point(exc, basis)
                        else:
                            log_cycle(manifests.epoch, lsn, stats, link, time.monotonic() - started)
                            basis, kind = manifests, "local"  # saved: the next basis is local
                            self._gone_retry = RETRY_FIRST
                            self.status.set_state(SenderPhase.REPLICATING)
                        if await wait_for_request(link, stop, interval):  # planned failover
                            basis = await self.hand_over_scanned(state, link, basis)
                    # bounded at any rate: what is not applied waits in the journal
                    await link.finish("sender stopping")
                except CycleStopped:  # what was journaled waits for the next run
                    await link.finish("sender stopping", grace=0)
                except MID_SESSION_RETRY as exc:
                    await self.session_failed(exc, link, stop)
                except VolumeGone as exc:
                    await self.volume_gone(exc, link, stop)
                finally:
                    await self.close_link(link)
            self.status.set_state(SenderPhase.STOPPED)
        self.log_stop(state)

    async def volume_gone(self, exc: VolumeGone, link: Link, stop: asyncio.Event) -> None:
        """A volume was removed, renamed or replaced by something not a file during a
        cycle (a restore by ``rm`` and ``cp``, say): no point this cycle. The link closes,
        so what the cycle shipped is taken as after a lost link, and the sender tries
        again after a pause (1 s, doubling to 60 s while it stays gone), instead of ending
        replication for every volume of the job."""
        log.error("sender.volume_gone", error=exc.message, hint=exc.hint, retry_in=self._gone_retry)
        self.status.error("volume", exc.message)
        await self.close_link(link)
        self.status.set_state(SenderPhase.VOLUME_GONE)
        await sleep_or_stop(stop, self._gone_retry)
        self._gone_retry = min(self._gone_retry * 2, RETRY_MOST)

    def no_point(self, exc: HookFailed | FreezeOverflow, basis: ManifestSet) -> ManifestSet:
        """A continuous sender's freeze failed (logged by engine/hooks.py) or could not
        hold the changes (FreezeOverflow): no consistency point this cycle, and the status
        says why until one is taken. The next cycle's basis: the copy made before the
        freeze, which the receiver holds, if there was one."""
        if isinstance(exc, HookFailed):
            self.status.error("hook", exc.message)
            self.status.set_state(SenderPhase.HOOK_FAILED)
        else:
            log.error("sender.freeze_overflow", error=exc.message, hint=exc.hint)
            self.status.error("freeze", exc.message)
        copied, self.copied_basis = self.copied_basis, None
        return copied or basis

    async def hand_over_scanned(
        self, state: SenderState, link: Link, basis: ManifestSet
    ) -> ManifestSet:
        """A planned failover of a scanning sender: one last scan, frozen, is the final point.
        Without its freeze there is no such point: the handover is refused (the receiver's
        request times out, nothing is promoted) and replication goes on from the basis
        this returns."""
        try:
            _, _, final = await self.cycle(state, link, basis)  # the last scan
        except (HookFailed, FreezeOverflow) as exc:
            why = "the pre hook failed" if isinstance(exc, HookFailed) else "no room frozen"
            log.error("sender.handover_refused", why=why)
            await link.refuse_handover()
            return self.no_point(exc, basis)
        await hand_over(
            link, final, self.config.state_dir, self.config.job, self.target_line(state)
        )

    def log_stop(self, state: SenderState) -> None:
        """The stop line; raises the connect failure when no session was ever made."""
        unreached = self.unreached_error()
        if unreached is not None:
            log.warning("sender.stopped_unreached", error=unreached.message)
            raise unreached
        journal = state.journal
        log.info(
            "sender.stopped",
            last_epoch=self.status.last_epoch,
            last_lsn=journal.last_lsn if journal is not None else None,
        )


def another_replica(job: str, link: Link, purpose: SessionPurpose) -> None:
    """The receiver holds another replica of ``job`` than this state folder replicated to
    (engine/replica_id.py). A session that builds on it is refused (SplitBrainError); one
    that compares (``--resync``, ``verify``) goes on, and a replica that holds nothing yet
    (a new job folder there) is simply taken."""
    if link.received_lsn == 0 or purpose is not SessionPurpose.REPLICATE:
        log.warning("sender.another_replica", job=job, received_lsn=link.received_lsn)
        return
    raise SplitBrainError(
        f"the receiver at {link.conn.peer} holds another replica of job {job!r} than the one "
        "this state folder replicates to (its history reaches lsn "
        f"{link.received_lsn}): --to may name the wrong receiver, or the job folder there "
        f"was replaced, or its identity (DIR/.replicator/{job}/replica.id) was damaged or "
        "deleted and made anew; nothing was written",
        hint="check --to (and --job); if that replica is the one to use from now on, "
        "`replicator send --resync` compares with it and overwrites what differs with this "
        "source's data",
    )


class _NoRoomFrozen(Exception):
    """The frozen scan found the journal full: it thaws rather than wait for the link."""


class FreezeOverflow(ConfigError):
    """The guest changed more than the journal holds while its changes were copied, at
    each of MAX_FREEZES freezes: no consistency point this cycle."""

    def __init__(self, journal_max: int | None) -> None:
        size = human_size(journal_max) if journal_max is not None else "its cap"
        super().__init__(
            f"no consistency point: at each of {MAX_FREEZES} freezes the guest had changed "
            f"more than the journal holds ({size}) since its changes were copied, and a "
            "frozen scan does not wait for the link (the guest was thawed each time)",
            hint="raise --journal-max (journal_max in a job file) above what the guest writes "
            "while its changes cross the link, or capture with --capture nbd or fuse, which "
            "needs no freeze",
        )


def log_cycle(epoch: int, lsn: int, stats: ScanStats, link: Link, seconds: float) -> None:
    """The one line per sync cycle (what changed, what the link has sent so far)."""
    log.info(
        "sender.cycle",
        epoch=epoch,
        lsn=lsn,
        scanned=stats.bytes_scanned,
        changed=stats.bytes_changed,
        extents=stats.extents_changed,
        files=stats.files_changed,
        seconds=round(seconds, 3),
        wire_total=link.conn.bytes_sent,
        text=f"epoch {epoch} journaled: scanned {human_size(stats.bytes_scanned)}, changed "
        f"{human_size(stats.bytes_changed)} in {stats.extents_changed} extents and "
        f"{stats.files_changed} files in {seconds:.1f} s; "
        f"{human_size(link.conn.bytes_sent)} sent on the wire on this connection",
    )


def error_kind(exc: BaseException) -> str:
    """The ``errors`` kind of the job status for what refused or ended a session."""
    for cls, kind in _ERROR_KINDS:
        if isinstance(exc, cls):
            return kind
    return "connect"


_ERROR_KINDS: tuple[tuple[type[ReplicatorError], str], ...] = (
    (TargetStorageError, "storage"),
    (AuthError, "auth"),
    (VersionMismatch, "version"),
    (PeerProtocolError, "protocol"),
    (RefusedError, "refused"),
)


async def sleep_or_stop(stop: asyncio.Event, seconds: float, link: Link | None = None) -> None:
    """Wait ``seconds`` or until ``stop``; then raise the link's failure, if it has one."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
    if link is not None:
        link.raise_if_failed()


__all__ = [
    "JOURNAL_CAP",
    "LIVE_JOURNAL_CAP",
    "MID_SESSION_RETRY",
    "Sender",
    "SenderConfig",
    "SenderState",
    "Summary",
    "sleep_or_stop",
]
