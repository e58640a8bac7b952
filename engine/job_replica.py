"""One job on the receiving side: its journal, its replica state and the apply loop.

``JobReplica`` keeps the job's receive journal and ``applied.state`` in the state folder.
Sessions (``receiver_session.Session``) append what arrives and hand over what became
durable; an applier task applies records to the replicas only up to the last received
barrier (EPOCH or FLUSH), so the replica moves from one consistency point to the next. An
epoch interrupted by a crash is completed from the journal when the job is opened, before
anyone is served. After each round it fsyncs the replicas, persists the applied LSN and
trims the journal.

A first sync (a replica that never held a consistency point) skips the journal: its records
are written straight into the replica files as they arrive (the *direct path*), and the
session's sync commits them (fsync of the files, ``files.state``, ``applied.state``) before
acknowledging them as received. There is no earlier point to keep, so nothing is lost by
writing in place, and every byte is written durably once instead of twice. The direct path
ends with the first barrier; from then on every record goes through the journal and the
replica moves from barrier to barrier.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import stat
import time
from collections.abc import AsyncIterator, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from replicator.engine import direct_writes, replica_state
from replicator.engine import replica_id as replica_ids
from replicator.engine.applier import Applier, ApplyError, PendingSync
from replicator.engine.durable_tail import DurableTail, KeptMemory
from replicator.engine.errors import (
    ConfigError,
    ReplicaInconsistent,
    cannot_use_folder,
    unwritable_folder,
)
from replicator.engine.generations import (
    PromotedUnfinished,
    Promotion,
    clear_promotion,
    load_promotion,
    new_promotion,
    save_promotion,
)
from replicator.engine.imagelock import ReplicaGuard, marked_by
from replicator.engine.in_flight import IN_FLIGHT_MAX
from replicator.engine.manifest import digest_chunks
from replicator.engine.replica_files import ReplicaDiverged, ReplicaFiles
from replicator.engine.replica_state import ReplicaState
from replicator.engine.source_clock import on_target_clock
from replicator.engine.status import ReceiverJobStatus
from replicator.engine.unapplied import NotComparable
from replicator.engine.unapplied import manifest as unapplied_manifest
from replicator.engine.volumes import is_disk_image
from replicator.engine.window import BACKLOG_MAX, MAX_WINDOW
from replicator.engine.write_path import WritePathChooser
from replicator.journal import (
    Journal,
    JournalError,
    Record,
    RecordType,
)
from replicator.journal.durable import makedirs_durable, sync_dir
from replicator.journal.durable import settled as _settled  # writes a cancellation waits for
from replicator.journal.locking import held_elsewhere
from replicator.journal.records import NAMESPACE_TYPES

log = structlog.get_logger()

APPLY_BATCH_BYTES = 8 * 1024 * 1024
MANIFEST_CHUNK = 64 * 1024  # digests per Manifest message (1 MiB)
MEM_APPLY_BYTES = 48 * 1024 * 1024  # durable records kept in memory for the applier, at least
KEPT_MAX = 512 * 1024 * 1024  # the same, all of a receiver's jobs together, at most
# a replica that never held a consistency point is written as records arrive, a round per
# this many durable bytes, instead of all at its first barrier (see JobReplica.eager)
EAGER_APPLY_BYTES = 16 * 1024 * 1024
# the direct path (a first sync written straight into the replica) commits this often
DIRECT_COMMIT_BYTES = 32 * 1024 * 1024
# why a replica is not written (``replica_conflicts``): the log, the status, the sender
IN_USE = (
    "is open for writing by another program on the target (a VM started on the replica by "
    "hand?), and replication does not write under it. Stop it (to run the VM on the "
    "target, `replicator failover` first)"
)


@dataclass(frozen=True, slots=True)
class ReceiverConfig:
    replica_root: Path
    state_root: Path
    window: int = 66 * 1024 * 1024  # >= the largest record (64 MiB) plus framing
    # the window grows up to this (memory) and shrinks past this backlog: engine/window.py
    window_cap: int = MAX_WINDOW
    backlog_max: int = BACKLOG_MAX
    journal_max_bytes: int | None = None
    segment_bytes: int = 64 * 1024 * 1024
    authorize: Any = None  # an engine.authz.Authorizer (--allow): who may write which job
    # durable, unapplied records all jobs together keep for their appliers (each job up to
    # ``applier_memory``); beyond it they are read back from the journals
    kept_max: int = KEPT_MAX
    # bytes all sessions together hold before they are durable (frames read, records not
    # synced, a verify's records past the last barrier): engine/in_flight.py
    in_flight_max: int = IN_FLIGHT_MAX
    # jobs open at once (None: as many as the open-file limit covers: engine/descriptors.py)
    max_open_jobs: int | None = None


def applier_memory(config: ReceiverConfig) -> int:
    """Bytes of durable, unapplied records the applier keeps in memory (``DurableTail``).

    The credit window keeps the unapplied backlog under ``backlog_max``, and an epoch
    that completes may add one window more (credit granted while it was still arriving,
    counted here at the Welcome's window: a window grown past it on a long fat link is
    the one case where the oldest records are read back from the journal, which holds
    them all until applied). Kept whole, such a backlog is applied without reading the
    journal back, decoding it and hashing every byte again (22% of the receiver's samples
    in the FUSE 1 MiB job with 48 MiB kept and a 128 MiB backlog: bench/RESULTS.md,
    "2026-12-03, late")."""
    return max(MEM_APPLY_BYTES, config.backlog_max + config.window)


def check_receiver_dirs(config: ReceiverConfig) -> None:
    """Fail early, with a message, when the replica or state folder cannot be used
    (before creating either)."""
    holder = _held_ancestor(config.replica_root)
    if holder is not None:
        raise ConfigError(
            f"replica folder {config.replica_root} is inside {holder}, which another "
            "replicator process holds (another receiver's --dir, or a state folder): a job "
            "there could overwrite or delete this receiver's replicas and state",
            hint="give each receiver a --dir outside every other's",
        )
    for what, path in (("replica", config.replica_root), ("state", config.state_root)):
        try:
            makedirs_durable(path)
        except OSError as exc:
            raise cannot_use_folder(f"{what} folder {path}", exc, doing="create") from exc
        error = unwritable_folder(path, f"{what} folder {path}")
        if error is not None:
            raise error


def _held_ancestor(path: Path) -> Path | None:
    """The nearest folder above ``path`` that another process holds with an exclusive
    flock (every receiver holds its ``--dir``, every sender and receiver its state
    folder); None when there is none (folders that cannot be opened are passed over)."""
    for folder in path.resolve().parents:
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if held_elsewhere(fd):
                return folder
        finally:
            os.close(fd)
    return None


MAX_FOLDERS = 10_000  # folders below a replica folder looked at for a sender's mark


def _folder_marked(path: Path, mark: int) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return marked_by(fd, mark)
    except OSError:
        return False
    finally:
        os.close(fd)


class JobReplica:
    """Receiver-side state of one job: journal, replica state, the applier."""

    def __init__(
        self,
        job: str,
        config: ReceiverConfig,
        journal: Journal,
        state: ReplicaState,
        files: ReplicaFiles | None = None,
        kept: KeptMemory | None = None,
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
        # records made durable by a session, kept so the applier need not read them back
        # from the journal (engine/durable_tail.py): as many as the credit window lets
        # the backlog reach (engine/window.py), so an applier behind never reads back;
        # within the receiver's limit for all its jobs together (``kept``)
        self._tail = DurableTail(
            max(state.applied_lsn, journal.durable_lsn), applier_memory(config), kept
        )
        self._noted = self.received_lsn  # highest LSN handed to note_durable (or applied)
        self._eager_bytes = 0  # durable bytes noted since the last eager round began
        # the direct path: the last LSN written into the replica (committed once it is
        # the applied LSN), the bytes since the last commit, the barrier that ends it
        self._direct_lsn = state.applied_lsn
        self._direct_bytes = 0
        self._direct_point: Record | None = None
        self._direct_failures = 0  # a commit that overlapped a failure claims nothing
        self._write_path = WritePathChooser()
        self._applier: Applier | None = None
        self._wake = asyncio.Event()
        self.applied_changed = asyncio.Condition()
        self._apply_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.failure: BaseException | None = None
        self.promotion: Promotion | None = None  # set by open(): see engine/generations.py
        self.replica_id = ""  # set by open(): which replica this is (engine/replica_id.py)
        # QEMU's "no other writer" locks on the replica disk images while replication keeps
        # them (engine/imagelock.py); ``_guarded``: the ``files.layout`` they last followed
        self.guard = ReplicaGuard()
        self._guarded = -1
        self._state_id = _folder_id(self.state_dir)  # see moved_away
        # the source clock's offset (source - target, ns) its latest session estimated
        # (engine/source_clock.py); None: no session told it (a sender that does not send
        # its clock, or none since this process started)
        self.source_offset_ns: int | None = None
        # monotonic time this process applied the consistency point it holds (None: a
        # point from before it started): the lag is at least the time since
        self.point_applied_mono: float | None = None
        self._closed = False

    @classmethod
    async def open(
        cls, job: str, config: ReceiverConfig, kept: KeptMemory | None = None
    ) -> JobReplica:
        """Open the job's state and bring the replica to its last complete consistency point.
        ``kept``: the receiver's limit for the records all its jobs keep in memory.

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
        replica_id = await asyncio.to_thread(replica_ids.load_or_make, state_dir, job)
        journal = await Journal.open(
            state_dir / "journal",
            segment_bytes=config.segment_bytes,
            max_bytes=config.journal_max_bytes,
            on_damage="cut",
            discard_below=saved.applied_lsn + 1 if saved is not None else 0,
        )
        older = ""
        if saved is not None:
            try:
                runs = await journal.runs_after(saved.applied_lsn)
            except BaseException:
                await journal.aclose()
                raise
            saved, older = replica_state.against_journal(state_dir, saved, journal.first_lsn, runs)
        if older:
            log.error(
                "receiver.state_damaged", job=job, path=str(state_dir / "applied.state"),
                error=older, action="the replica is unknown until a sender compares it",
            )  # fmt: skip
        lost_track = (
            saved is None
            or bool(older)
            or (journal.recovery is not None and journal.recovery.kind == "damage")
        )
        # Damaged or missing: everything below the journal's first record was applied
        # (trim follows the state write), the rest is applied again; unless the job is
        # new, nothing says what the replica holds (replica_state.rebuilt, files_lost)
        loss = replica_state.files_loss(
            state_dir, saved, damaged=files.damaged, found=files.found, lost=files.lost
        )
        state = replica_state.recovered(
            state_dir,
            saved,
            files_damaged=loss,
            first_lsn=journal.first_lsn,
            next_lsn=journal.next_lsn,
        )
        if loss and state.unknown and not files.lost:
            # kept with the stamps taken from now on, until a sender compares the replica
            files.lost = loss
            files.dirty = True
        if state.unknown and (older or saved is None or saved.unknown != state.unknown):
            try:  # durable before files.state is written again: the evidence goes with it
                await asyncio.to_thread(replica_state.save, state_dir, job, state)
            except BaseException:
                await journal.aclose()
                raise
        saved = state
        if saved.unknown:
            log.error(
                "receiver.replica_unknown",
                job=job,
                why=saved.unknown,
                action="sessions are refused until `replicator send --resync` compares "
                "the replica; failover refuses it without --allow-inconsistent",
            )
        if journal.recovery is not None and journal.recovery.kind == "damage":
            log.error(
                "receiver.journal_damaged",
                job=job,
                applied=saved.applied_lsn,
                kept_upto=journal.last_lsn,
                action="records after the kept ones are asked from the sender again",
            )
        self = cls(job, config, journal, saved, files, kept)
        self.replica_id = replica_id
        # from here on a failure or a cancellation (the receiver closing while a job opens)
        # closes what was opened: a journal left open would hold its lock for good
        try:
            self.promotion = promotion = await asyncio.to_thread(load_promotion, state_dir)
            if promotion is not None and saved.generation < promotion.generation:
                # promote() writes promoted.state, then the generation: a crash (or a failed
                # write) between the two is finished here, or, while the disk still fails,
                # by the next failover (or before a demote): the job is promoted either way
                with contextlib.suppress(PromotedUnfinished):  # logged
                    await self._finish_generation(promotion)
        except BaseException:
            await self.journal.aclose()
            raise
        try:
            # the last complete barrier already received (a crash may have cut an apply short)
            pending: set[str] = set()
            async for record in journal.read_from(max(saved.applied_lsn + 1, journal.first_lsn)):
                if record.is_barrier:
                    self.last_barrier = record.lsn
                pending.update(_paths(record))
            if saved.applying:
                # the interrupted round may have written any of these past their stamps
                files.unstamp(files.stamps if lost_track else pending | files.writing)
            if self.last_barrier > saved.applied_lsn:
                log.info(
                    "receiver.recover", job=job, applied=saved.applied_lsn, upto=self.last_barrier
                )
                try:
                    await self.apply_pending()
                except ReplicaDiverged as exc:  # sessions are refused until a --resync
                    log.error("receiver.replica_diverged", job=job, files=[str(exc)])
            elif not saved.consistent and not saved.unknown:
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

    def moved_away(self) -> bool:
        """Whether the job's state folder, or the replica folder it writes, is no longer
        the one it opened (deleted or replaced on the target, to start the job over or to
        free space): its descriptors lead to deleted files. Blocking (a stat or two)."""
        if _folder_id(self.state_dir) != self._state_id:
            return True
        return self._applier is not None and not self._applier.at_its_path()

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

    async def receive(
        self, records: list[Record], encoded: bytes | memoryview | None = None
    ) -> None:
        """Take records from a session (checksum-verified and checked by
        ``ReceiverCore.records``): into the replica files on the direct path (a first
        sync, see the module docstring), into the receive journal otherwise. Neither is
        durable before ``make_durable``. ``encoded`` is their exact encoding (the Records
        payload they were decoded from)."""
        direct = self._direct_count(records)
        if direct:
            await self._write_direct(records[:direct])
        if direct < len(records):
            await self.ingest(records[direct:], None if direct else encoded)

    async def ingest(
        self, records: list[Record], encoded: bytes | memoryview | None = None
    ) -> None:
        """Append records to the receive journal (the path of every record but a first
        sync's): durable after ``make_durable`` (or ``journal.sync()``)."""
        await self.journal.append_many(records, encoded=encoded)

    @property
    def commit_can_wait(self) -> bool:
        """Only direct writes wait to be made durable, fewer than ``DIRECT_COMMIT_BYTES``
        and without their barrier: the sync may wait a little to commit more at once."""
        return (
            self._direct_lsn > self.state.applied_lsn
            and self._direct_point is None
            and self._direct_bytes < DIRECT_COMMIT_BYTES
            and self.journal.last_lsn <= self.journal.durable_lsn
        )

    async def make_durable(self) -> None:
        """Everything ingested so far durable: direct writes committed, the journal synced."""
        if self._direct_lsn > self.state.applied_lsn:
            await self._commit_direct_overlapped()
        await self.journal.sync()
        await self._trim_applied()

    async def _trim_applied(self) -> None:
        """Drop the sealed segments the applier is done with. It trims after each apply,
        but a segment still active then keeps its applied records until the next apply,
        and on a small disk that apply may wait for an epoch the room left cannot hold
        beside them: they go as soon as a roll has sealed them."""
        upto = self.state.applied_lsn + 1
        if self.journal.trimmable(upto):
            await self.journal.trim(upto)

    def _direct_count(self, records: list[Record]) -> int:
        """How many of ``records`` (a prefix) go straight into the replica: all of them up
        to and including the first barrier while the replica never held a point, nothing
        in the journal waits to be applied and no barrier was written directly yet."""
        if (
            not self.eager
            or self.broken
            or self._direct_point is not None
            or self.journal.last_lsn > self.state.applied_lsn
        ):
            return 0
        for count, record in enumerate(records, 1):
            if record.is_barrier:
                return count
        return len(records)

    async def _write_direct(self, records: list[Record]) -> None:
        """Write ``records`` into the replica files (not durable: see ``_commit_direct``).

        The write order keeps recovery exact: ``applying`` is durable before the first byte
        moves and each file is in ``files.state``'s ``writing`` list before it is written
        (recovery unstamps those; no journal tells it what an interrupted round touched);
        before a namespace record everything written is committed, so that a redo (the
        sender sends again from the applied LSN) starts at that record at most, as in
        ``_apply_upto``."""
        async with self._apply_lock:
            try:
                if not self.state.applying:
                    await self._save_state(self.state.replace(applying=True, consistent=False))
                if self.files.will_write(p for record in records for p in _paths(record)):
                    await _settled(self.files.save, self.state_dir)
                start = 0
                for i, record in enumerate(records):
                    if record.type in NAMESPACE_TYPES and (
                        i > start or self._direct_lsn > self.state.applied_lsn
                    ):
                        await self._apply_direct(records[start:i])
                        start = i
                        await self._commit_direct()
                await self._apply_direct(records[start:])
            except BaseException as exc:  # cancelled too: a write may have landed uncounted
                if isinstance(exc, ReplicaDiverged):
                    self.files.mark_diverged(exc.path, exc.why)
                    with contextlib.suppress(OSError):
                        await _settled(self.files.save, self.state_dir)
                self._direct_failed()
                raise

    async def _apply_direct(self, records: list[Record]) -> None:
        if not records:
            return
        # through the page cache or past it: whichever this machine does faster right now
        # (engine/write_path.py); the commit's fsync makes either durable
        past_cache = self._write_path.choose()
        started = time.perf_counter()
        apply = functools.partial(self._get_applier().apply_many, past_cache=past_cache)
        await _settled(apply, records)
        self._write_path.observe(past_cache, time.perf_counter() - started, _direct_bytes(records))
        self._direct_lsn = records[-1].lsn  # counted once written, never before
        self._direct_bytes += sum(record.encoded_size for record in records)
        if records[-1].is_barrier:
            self._direct_point = records[-1]

    def _take_commit(self) -> _DirectCommit | None:
        """What the next commit covers, with the descriptors that make it durable (apply
        lock held); None when every direct write is committed."""
        upto = self._direct_lsn
        if upto <= self.state.applied_lsn:
            return None
        point = self._direct_point
        try:
            # the first sync's bulk leaves the page cache once durable (applier.py)
            pending = self._get_applier().detach_dirty(drop_cache=True)
        except BaseException:
            self._direct_failed()
            raise
        done = point if point is not None and point.lsn == upto else None
        return _DirectCommit(upto, done, self._direct_bytes, pending, self._direct_failures)

    async def _commit_direct(self) -> None:
        """Make the direct writes durable and move the applied LSN to the last of them,
        with the apply lock held throughout. Ends the direct path when they end on its
        barrier."""
        commit = self._take_commit()
        if commit is not None:
            await self._sync_commit(commit, locked=True)
            await self._finish_commit(commit)

    async def _commit_direct_overlapped(self) -> None:
        """``_commit_direct`` for a session's sync: the replica files are fsynced without
        the apply lock, so the session goes on writing the next frames meanwhile (the
        fsync is the long part; without the overlap the network waits for the disk)."""
        async with self._apply_lock:
            commit = self._take_commit()
        if commit is None:
            return
        await self._sync_commit(commit, locked=False)
        async with self._apply_lock:
            if commit.failures != self._direct_failures or commit.upto <= self.state.applied_lsn:
                return  # a write failed meanwhile (sent again), or committed meanwhile
            await self._finish_commit(commit)

    async def _sync_commit(self, commit: _DirectCommit, *, locked: bool) -> None:
        try:
            await _settled(commit.pending.sync)
        except asyncio.CancelledError:
            raise
        except BaseException:
            if locked:
                self._direct_failed()
            else:
                async with self._apply_lock:
                    self._direct_failed()
            raise

    async def _finish_commit(self, commit: _DirectCommit) -> None:
        """The direct writes up to ``commit.upto`` are in the files durably: stamp, save
        the stamps, then the applied LSN (apply lock held)."""
        point = commit.point
        try:
            self._get_applier().stamp_changed()
            if point is not None:
                self.files.written()
            await _settled(self.files.save, self.state_dir)
            # a barrier below the floor (PointFloor) follows lost records: not a point
            ends = point is not None and self.state.ends_point(point.lsn)
            new = self.state.replace(
                applied_lsn=commit.upto, applying=point is None, consistent=ends
            )
            if point is not None:
                self.last_barrier = max(self.last_barrier, point.lsn)
            if ends and point is not None:
                new = self._new_point(new, point)
            await _settled(replica_state.save, self.state_dir, self.job, new)
            self.state = new
            if ends and point is not None:
                self.point_applied_mono = time.monotonic()
        except asyncio.CancelledError:
            raise
        except BaseException:
            self._direct_failed()
            raise
        self._direct_bytes = max(0, self._direct_bytes - commit.size)
        if point is not None:
            self._direct_point = None
            costs = self._write_path.costs  # what the first sync's writes measured each way
            log.info(
                "receiver.first_sync_written",
                job=self.job,
                ms_per_mib_past_cache=_ms_per_mib(costs.get(True)),
                ms_per_mib_page_cache=_ms_per_mib(costs.get(False)),
            )
        await self._follow_layout()
        self._noted = max(self._noted, commit.upto)
        async with self.applied_changed:
            self.applied_changed.notify_all()

    def _direct_failed(self) -> None:
        """A direct write or commit failed: what was written past the applied LSN is
        not trusted (the sender sends it again); the next session starts afresh."""
        self._after_failed_apply()
        self._direct_lsn = self.state.applied_lsn
        self._direct_bytes = 0
        self._direct_point = None
        self._direct_failures += 1

    def note_durable(self, records: list[Record]) -> None:
        """Called once records are durable, in LSN order: barriers become applicable.
        Records the direct path already applied, and those ``take_durable`` took from the
        journal, are passed over."""
        taken = max(self._noted, self.state.applied_lsn)
        if records and records[0].lsn <= taken:
            records = [r for r in records if r.lsn > taken]
        size = 0
        for record in records:
            size += record.encoded_size
            if record.is_barrier:
                self.last_barrier = max(self.last_barrier, record.lsn)
        if records:
            self._noted = max(self._noted, records[-1].lsn)
            self._eager_bytes += size
        self._tail.extend(records)
        self._wake.set()

    async def take_durable(self) -> None:
        """Take over the durable records no session handed over (``note_durable``): a
        session ended between its append and its sync, or while its sync ran, and its end
        or the next session's start made them durable. Their barriers become applicable
        and the applier is woken, as for records handed over, so the running receiver's
        last barrier (what it applies, what status and a failover through it see) is the
        one a job opened from the same files finds. They exist only in the journal: the
        applier reads them from there, and memory starts again after them."""
        if self.journal.durable_lsn <= self._noted:
            return  # all handed over: the usual case, which waits for no apply round
        async with self._apply_lock:  # no apply round trims the journal under the reading
            upto = self.journal.durable_lsn
            start = max(self._noted + 1, self.state.applied_lsn + 1, self.journal.first_lsn)
            size = 0
            if start <= upto:
                async with contextlib.aclosing(self.journal.read_from(start)) as stored:
                    async for record in stored:
                        if record.lsn > upto:
                            break
                        size += record.encoded_size
                        if record.is_barrier:
                            self.last_barrier = max(self.last_barrier, record.lsn)
            self._noted = upto
            self._eager_bytes += size
            self._tail.reset(upto)
        self._wake.set()

    async def _records_upto(self, target: int) -> AsyncIterator[Record]:
        """Durable records after the applied LSN up to ``target``, from memory where it
        holds them (``DurableTail``), from the journal where it does not.

        The tail can drop records while a round awaits between them (records arriving
        faster than they are applied): the round reads those from the journal, which
        holds every durable record until the round ends, and goes back to memory as soon
        as it holds the next one."""
        last = self.state.applied_lsn
        tail = self._tail
        while last < target:
            record = tail.next_after(last)
            if record is not None:
                if record.lsn > target:
                    return
                last = tail.pop().lsn
                yield record
                continue
            moved = False
            start = max(last + 1, self.journal.first_lsn)
            async with contextlib.aclosing(self.journal.read_from(start)) as stored:
                async for record in stored:
                    if record.lsn > target:
                        return
                    last, moved = record.lsn, True
                    yield record
                    if tail.next_after(last) is not None:
                        break  # memory holds the rest
            if not moved:
                return  # nothing durable after ``last``: the caller names the gap

    @property
    def eager(self) -> bool:
        """True while the replica has never been at a consistency point (a first sync):
        there is no earlier point to keep, so records are applied as they become durable
        (rounds of ``EAGER_APPLY_BYTES``) instead of all at the epoch's end. The replica
        writes then overlap the transfer, and the sync ends with a short round, not with a
        write of the whole epoch. Such a replica is "not consistent" until its first
        barrier is applied, exactly as before (promotion refuses it either way)."""
        return self.state.point_lsn == 0 and self.promotion is None

    def _apply_target(self, force: bool) -> int:
        if force:
            return self.journal.durable_lsn
        if self.eager and self._eager_bytes >= EAGER_APPLY_BYTES:
            self._eager_bytes = 0
            return max(self.last_barrier, self.journal.durable_lsn)
        return self.last_barrier

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
            if self.promotion is not None:  # the replica belongs to the target's VM now
                return self.state.applied_lsn
            # direct writes below any journal record: committed first (see ingest)
            await self._commit_direct()
            t0 = time.perf_counter()
            target = self._apply_target(force)
            if target <= self.state.applied_lsn:
                return self.state.applied_lsn
            try:
                applied, point = await self._apply_upto(target)
            except ReplicaDiverged as exc:
                self._after_failed_apply()
                self.files.mark_diverged(exc.path, exc.why)
                self._let_go(exc.path)
                with contextlib.suppress(OSError):  # also refused at the next session start
                    await _settled(self.files.save, self.state_dir)
                raise
            except BaseException:
                self._after_failed_apply()
                raise
            t1 = time.perf_counter()
            if point is not None and not self.state.ends_point(point.lsn):
                point = None  # records before it were lost (PointFloor): not a point
            consistent = point is not None and point.lsn == target
            new = self.state.replace(applied_lsn=applied, consistent=consistent, applying=False)
            if point is not None:
                new = self._new_point(new, point)
            await self._save_state(new)
            if point is not None:
                self.point_applied_mono = time.monotonic()
            await self._follow_layout()
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

    def _new_point(self, state: ReplicaState, point: Record) -> ReplicaState:
        """``state`` at the consistency point ``point``, applied now: its source stamp,
        and its time on this target's clock (engine/source_clock.py)."""
        return state.replace(
            point_lsn=point.lsn,
            point_ts_ns=point.ts_ns,
            point_target_ns=on_target_clock(point.ts_ns, self._points_offset(), time.time_ns()),
        )

    def _points_offset(self) -> int | None:
        """The source clock's offset a point applied now is converted with: this process's
        sessions' estimate; before any (the journal's points applied at a restart), the
        one the last point was converted with, ``point_ts_ns - point_target_ns``: never
        less than the estimate it had (the conversion is at most the apply time), so
        never a lag read short. A source an hour ahead with a backlog otherwise read "0 s"
        after a receiver restart (the stamp, an hour ahead, taken no later than now)."""
        if self.source_offset_ns is not None:
            return self.source_offset_ns
        state = self.state
        if state.point_ts_ns > 0 and state.point_target_ns > 0:
            return state.point_ts_ns - state.point_target_ns
        return None

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
        # applied beside the session: large writes may wait for the device (direct_writes.py)
        apply = functools.partial(applier.apply_many, past_cache=True)
        batch: list[Record] = []
        size = 0
        last = saved = self.state.applied_lsn
        point: Record | None = None
        async for record in self._records_upto(target):
            if record.lsn <= last:
                raise ApplyError(f"record lsn {record.lsn} is not after {last} (internal error)")
            if record.type in NAMESPACE_TYPES and last > saved:
                if batch:
                    await _settled(apply, batch)
                    batch, size = [], 0
                await _settled(applier.barrier)
                await _settled(self.files.save, self.state_dir)
                await self._save_state(self.state.replace(applied_lsn=last))
                saved = last
            last = record.lsn
            if record.is_barrier:
                point = record
            batch.append(record)
            size += record.encoded_size
            if size >= APPLY_BATCH_BYTES:
                await _settled(apply, batch)
                batch, size = [], 0
        if batch:
            await _settled(apply, batch)
        if last != target:  # never call "applied" what was not: the records must all be there
            raise ApplyError(
                f"records up to lsn {target} should be durable here, but they end at {last}"
            )
        await _settled(applier.barrier)
        await _settled(self.files.save, self.state_dir)
        return last, point

    @property
    def fresh(self) -> bool:
        """Nothing was ever received or applied: any history may start this replica."""
        return self.received_lsn == 0

    async def raise_point_floor(self, lsn: int) -> None:
        """No barrier below ``lsn`` ends a consistency point from now on (durably): the
        sender found this replica lacking records it cannot send again (PointFloor,
        docs/PROTOCOL.md). The point already applied stays what it is.

        Only a session that compares sends one, and its comparison's epoch is numbered at
        or after it: so a floor above every LSN received here replaces the one an earlier
        session set, even a higher one. Otherwise a floor no sender's LSNs will reach (a
        peer's bug, a sender whose state was replaced, a hostile peer's 2**64-1) would
        keep every later comparison from making a consistency point, for ever. A floor at
        or below what was received only raises it: records received under the old floor
        wait in the journal, and a new floor must not turn their barriers into points."""
        async with self._apply_lock:
            floor = lsn if lsn > self.received_lsn else max(lsn, self.state.point_floor)
            if self.state.unknown:
                # the sender compares before it ships a barrier at or above ``lsn``
                # (engine/lost_records.py): that comparison's epoch is a point again
                await self._save_state(self.state.replace(point_floor=floor, unknown=""))
                log.warning(
                    "receiver.replica_compared",
                    job=self.job,
                    lsn=floor,
                    why="the sender compares the replica whose state was unknown; its "
                    f"epoch at or after lsn {floor} makes it a consistency point",
                )
            elif floor != self.state.point_floor:
                await self._save_state(self.state.replace(point_floor=floor))
                log.warning(
                    "receiver.point_floor",
                    job=self.job,
                    lsn=floor,
                    why="records this replica acknowledged were lost and the sender cannot "
                    "send them again; the sender compares the replica, and until that "
                    "comparison's epoch it is not a consistency point",
                )

    async def set_generation(self, generation: int) -> None:
        """The replica follows history ``generation`` from now on (durably)."""
        async with self._apply_lock:
            if generation != self.state.generation:
                await self._save_state(self.state.replace(generation=generation))

    async def not_promotable(self) -> str:
        """Why ``promote()`` (without ``allow_inconsistent``) would refuse now, "" when it
        would not: what automatic failover checks before it asks the witness, whose grant
        tells the source it was promoted away."""
        if self.promotion is not None and not self.promotion.damaged:
            return ""
        await self.apply_pending()
        async with self._apply_lock:
            await self._check_stamps()
            state = self.state
            if not state.consistent or state.applying or self.files.diverged:
                return _why_not_a_point(state, self.files.diverged)
            return ""

    async def promote(self, *, allow_inconsistent: bool = False) -> Promotion:
        """Failover: apply every complete epoch received, then make the replica the
        primary copy: durably promoted (``promoted.state`` first), generation bumped.
        Raises ReplicatorError when the replica is not at a consistency point, unless
        ``allow_inconsistent`` (the operator takes the replica as it is: the source is
        gone for good and this is the best copy left)."""
        if self.promotion is not None and not self.promotion.damaged:
            # already promoted: failover is idempotent (and finishes a generation whose
            # save failed after promoted.state, as open() does)
            async with self._apply_lock:
                await self._finish_generation(self.promotion)
            return self.promotion
        await self.apply_pending()
        async with self._apply_lock:
            # a file changed on this target outside replication holds no point's content,
            # whatever the state says (found now, or by a session that was refused for it)
            await self._check_stamps()
            await _settled(self.files.save, self.state_dir)
            state = self.state  # after the check: it may commit a first sync's writes
            inconsistent = not state.consistent or state.applying or bool(self.files.diverged)
            why = _why_not_a_point(state, self.files.diverged)
            if inconsistent and not allow_inconsistent:
                raise ReplicaInconsistent(
                    f"job {self.job!r}: the replica is not at a consistency point "
                    f"({why}); "
                    "promoting it could start a VM on a disk that never existed",
                    hint="let the source finish sending (run `replicator send` again, with "
                    "--resync if the receiver asks for it), then fail over; if the source is "
                    "gone for good, `replicator failover --force --allow-inconsistent` takes "
                    "the replica as it is (check its file systems before trusting it), or "
                    "restore it from a backup",
                )
            if inconsistent:
                log.warning(
                    "receiver.promoting_inconsistent",
                    job=self.job,
                    applied=state.applied_lsn,
                    why=why,
                    action="promoted as asked (--allow-inconsistent): check the file "
                    "systems in the replicas before starting anything on them",
                )
            promotion = new_promotion(
                state.generation,
                state.point_lsn,
                state.point_ts_ns,
                consistent=not inconsistent,
                point_target_ns=state.point_target_ns,
            )
            try:
                await _settled(save_promotion, self.state_dir, promotion)
            except OSError:
                if self.promotion is None:
                    # it may have failed after its rename (the folder's sync): not
                    # promoted here, so not in the file either, or the next start would
                    # find a promotion the operator was told had failed
                    await self._file_says(None)
                raise
            # promoted from here, whatever fails next: what this process does must match
            # what a restarted one would find on disk
            self.promotion = promotion
            self._reset_applier()  # replication writes nothing more
            self._release_guard()  # and the VM may now open the replicas for writing
            log.warning(
                "receiver.promoted",
                job=self.job,
                generation=promotion.generation,
                point_lsn=promotion.point_lsn,
            )
            await self._finish_generation(promotion)  # PromotedUnfinished: promoted all the same
        return promotion

    async def _finish_generation(self, promotion: Promotion) -> None:
        """Record the promotion's generation in ``applied.state`` (with the apply lock
        held), when it is not there yet. ``promoted.state`` decided the promotion already:
        a failure here is PromotedUnfinished (logged), which says so; until the write is
        done the job is promoted with the generation still to record (``open``, the next
        ``promote`` and ``demote`` try again)."""
        if self.state.generation >= promotion.generation:
            return
        try:
            await self._save_state(self.state.replace(generation=promotion.generation))
        except OSError as exc:
            log.error(
                "receiver.generation_unsaved",
                job=self.job,
                generation=promotion.generation,
                error=str(exc),
                action="the job is promoted all the same; fix the disk and run the same "
                "failover again to record it",
            )
            raise PromotedUnfinished(
                self.job,
                promotion,
                f"recording its new generation in {self.state_dir / replica_state.FILE_NAME}",
                exc,
            ) from exc

    async def demote(self) -> None:
        """The replica follows replication again (``replicator demote``)."""
        async with self._apply_lock:
            promotion = self.promotion
            if promotion is not None and self.state.generation < promotion.generation:
                # the promoted history's generation first (its write failed after the
                # promotion): demoted without it, the replica would take the old source's
                # plain `send` into what the promoted side wrote, instead of asking for
                # --resync. A failure here demotes nothing.
                await self._save_state(self.state.replace(generation=promotion.generation))
            try:
                await _settled(clear_promotion, self.state_dir)
            except OSError:
                # the file may be gone with its folder's sync failed: still promoted here,
                # so in the file too, or the next start would find the job demoted and
                # replicate into the replica the operator was told was still promoted
                if self.promotion is not None and not self.promotion.damaged:
                    await self._file_says(self.promotion)
                raise
            self.promotion = None
        log.warning("receiver.demoted", job=self.job, generation=self.state.generation)

    async def _file_says(self, promotion: Promotion | None) -> None:
        """After a failed write of promoted.state: make the file say ``promotion`` (None:
        no file), what this process goes on with; best effort, said when it fails."""
        try:
            if promotion is None:
                await _settled(clear_promotion, self.state_dir)
            else:
                await _settled(save_promotion, self.state_dir, promotion)
        except OSError as exc:
            log.critical(
                "receiver.promotion_unsure",
                job=self.job,
                promoted=promotion is not None,
                error=str(exc),
                action="the job's promoted.state may not say what this receiver does: fix "
                "the disk and run the same failover or demote again before restarting it",
            )

    async def handback(self, lsn: int) -> None:
        """Failback finished: the old source now holds exactly what this promoted replica
        holds, and replication resumes from ``lsn`` (above every LSN either side used, so
        records received before the failback are never applied). Applied and consistent
        at ``lsn``, generation kept (the source takes the promoted history), files taken
        as they are; ``promoted.state`` goes last, so a crash before it leaves the job
        promoted (the failback is run again)."""
        async with self._apply_lock:
            if self.promotion is None or self.promotion.damaged:
                raise ConfigError(
                    f"job {self.job!r} is not promoted: there is nothing to hand back",
                    hint="run `replicator status --dir DIR` on the target",
                )
            if lsn <= self.received_lsn:
                raise ConfigError(
                    f"hand-back at lsn {lsn} is not above lsn {self.received_lsn} received here"
                )
            self.files.forget_all()
            await _settled(self.files.save, self.state_dir)
            now = time.time_ns()  # the point is this target's own data: its clock
            await self._save_state(
                self.state.replace(
                    applied_lsn=lsn,
                    point_lsn=lsn,
                    point_ts_ns=now,
                    point_target_ns=now,
                    consistent=True,
                    applying=False,
                )
            )
            self.point_applied_mono = time.monotonic()
            await _settled(clear_promotion, self.state_dir)
            self.promotion = None
            self.last_barrier = self._noted = lsn
            self._tail.reset(lsn)  # nothing durable lies above the applied LSN
        with contextlib.suppress(JournalError):
            await self.journal.trim(lsn + 1)  # records from before the failback: never applied
        log.warning("receiver.handed_back", job=self.job, lsn=lsn, generation=self.state.generation)

    async def replica_conflicts(
        self, volumes: Collection[str], mark: int | None
    ) -> tuple[list[str], list[str], str]:
        """Before a session writes: guard the job's replica disk images (those replication
        wrote and the session's ``volumes``) against other writers. Returns the replicas
        that are the session's sender's own sources (its lock, session mark ``mark``, is on
        them: the guard lets go of everything, since it would lock the source's VM out),
        and those another program already has open for writing (a VM started on a replica
        by hand); replication must not write into either. Then what the sources are:
        "image", "file" (configuration files, checked when no image is a source) or
        "folder" (a folder job's source folder holds the replica folder or lies in it:
        the sources named are those folders, as paths)."""
        async with self._apply_lock:
            if self.promotion is not None:
                return [], [], "image"
            writers = await asyncio.to_thread(self._cover, volumes)
            sources = self.guard.sources(mark) if mark is not None else []
            if sources:
                self._release_guard()
                return sources, writers, "image"
            if mark is not None:  # its configuration files carry the mark alone
                sources = await asyncio.to_thread(self._marked_files, volumes, mark)
                if sources:
                    return sources, writers, "file"
                folders = await asyncio.to_thread(self._marked_folders, mark)
                if folders:
                    return folders, writers, "folder"
            return [], writers, "file"

    def _marked_folders(self, mark: int) -> list[str]:
        """Blocking: the folders that hold the replica folder, or lie in it, on which the
        sender with session mark ``mark`` holds it (a folder job's source folder,
        ``FileMark``): replicating would write the source into itself, or delete it as
        a file the source lacks. Up to MAX_FOLDERS folders below are looked at."""
        top = self.replica_dir
        found = [str(p) for p in (top, *top.parents) if _folder_marked(p, mark)]
        seen = 0
        for root, dirnames, _ in os.walk(top):  # symlinks to folders are not followed
            for name in dirnames:
                seen += 1
                if seen > MAX_FOLDERS:
                    return found
                if _folder_marked(Path(root, name), mark):
                    found.append(str(Path(root, name)))
        return found

    def _marked_files(self, volumes: Collection[str], mark: int) -> list[str]:
        """Blocking (apply lock held): the replica files the guard does not hold
        (configuration files) on which the sender with session mark ``mark`` holds it:
        its own sources (``FileMark``), sorted."""
        applier = self._get_applier()
        found = []
        for path in sorted(set(self.files.stamps).union(volumes)):
            if self.guard.holds(path):  # an image: ``ReplicaGuard.sources`` checked it
                continue
            fd = applier.open_readonly(path)  # never outside the replica folder
            if fd is None:
                continue
            try:
                if marked_by(fd, mark):
                    found.append(path)
            except OSError:
                pass
            finally:
                os.close(fd)
        return found

    async def _follow_layout(self) -> None:
        """After an apply or commit (apply lock held): guard replica files it created or
        replaced, let go of those it removed. A failure here fails no apply: it is logged."""
        if self._guarded == self.files.layout or self.promotion is not None:
            return
        try:
            writers = await asyncio.to_thread(self._cover, ())
        except (OSError, ApplyError) as exc:
            log.warning("receiver.guard_failed", job=self.job, error=str(exc))
            return
        if writers:
            log.error("receiver.replica_in_use", job=self.job, files=writers, why=IN_USE)

    def _cover(self, volumes: Collection[str]) -> list[str]:
        """Blocking (apply lock held): see ``replica_conflicts``; the writers."""
        layout = self.files.layout
        applier = self._get_applier()
        wanted = set(self.files.stamps).union(volumes)
        self.guard.keep_only(wanted)  # files found deleted or replaced: ``_let_go``
        for path in sorted(wanted):
            stamp = self.files.stamps.get(path)
            if not self.guard.wants(path, stamp[0] if stamp is not None else None):
                continue
            if self.guard.full:
                log.warning("receiver.guard_full", job=self.job, most=ReplicaGuard.MAX_FILES)
                break
            fd = applier.open_readonly(path)  # never outside the replica folder
            if fd is None:
                continue
            try:
                st = os.fstat(fd)
                image = stat.S_ISREG(st.st_mode) and is_disk_image(path, fd)
            except OSError:
                os.close(fd)
                continue
            if image:
                self.guard.hold(path, fd)
            else:
                os.close(fd)
                self.guard.pass_over(path, st.st_ino)
        self._guarded = layout
        return self.guard.writers()

    def _let_go(self, path: str) -> None:
        """Replica ``path`` was found deleted or replaced outside replication: hold no
        descriptor of the old file (the applier's, the guard's), which would keep a
        deleted file's space until the receiver stops."""
        if self._applier is not None:
            self._applier.let_go(path)
        self.guard.drop(path)

    def _release_guard(self) -> None:
        self.guard.release()
        self._guarded = -1

    def stamps_now(self, paths: Collection[str]) -> dict[str, tuple[int, int] | None]:
        """(inode, ctime) of each replica file of ``paths`` as it is now, None when it is
        missing or unreadable as a name. Blocking."""
        applier = self._get_applier()
        now: dict[str, tuple[int, int] | None] = {}
        for path in paths:
            try:
                st = applier.lstat(path)
            except (OSError, ApplyError):
                st = None
            now[path] = None if st is None else (st.st_ino, st.st_ctime_ns)
        return now

    def read_replica(self, volume: str, offset: int, length: int) -> bytes | None:
        """Up to ``length`` bytes of replica ``volume`` at ``offset`` (fewer where it
        ends), or None when there is no such replica file. Blocking."""
        fd = self._get_applier().open_readonly(volume)  # never reads outside the replica
        if fd is None:
            return None
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    async def _save_state(self, state: ReplicaState) -> None:
        # settled: a cancelled apply round (a close) must not leave its write running while
        # the next one writes the same file (both through one temporary name: the second
        # rename failed, ENOENT, or the older state could land last)
        await _settled(replica_state.save, self.state_dir, self.job, state)
        self.state = state

    def _get_applier(self) -> Applier:
        if self._applier is None:
            self._applier = Applier(self.replica_dir, self.files)
        return self._applier

    def _after_failed_apply(self) -> None:
        # the round may have taken records from memory without applying them
        self._tail.reset(self.journal.durable_lsn)
        if self._applier is not None:
            self.files.unstamp(self._applier.unstamped)  # our own writes moved past them
        self._reset_applier()

    async def check_replica(self, *, adopt: bool) -> list[str]:
        """Replica files not as replication left them (see ``replica_files.py``); with
        ``adopt`` (the sender compares with the replica) they are all taken as they are."""
        async with self._apply_lock:
            if adopt:  # the sender's PointFloor then settles an unknown state
                await self._commit_ended_first_sync()
                self.files.forget_all()
            else:
                await self._check_stamps()
            await _settled(self.files.save, self.state_dir)
            found = [f"{path!r} {why}" for path, why in sorted(self.files.diverged.items())]
            if self.state.unknown and not adopt:
                found.insert(0, f"the replica is not known: {self.state.unknown}")
            return found

    async def _commit_ended_first_sync(self) -> None:
        """A first sync's writes an ended session left uncommitted are ours, not an edit."""
        with contextlib.suppress(Exception):  # failed: unstamped, so taken as they are
            await self._commit_direct()

    async def _check_stamps(self) -> None:
        """Mark diverged every replica file not as its stamp says (under the apply lock)."""
        await self._commit_ended_first_sync()
        # one thread hop for every file, not one each
        found = await asyncio.to_thread(self.files.changed, self._get_applier().lstat)
        for path, why in found.items():
            self.files.mark_diverged(path, why)
            self._let_go(path)

    async def adopt(self, path: str) -> None:
        """The sender is about to compare with replica file ``path`` as it is now."""
        async with self._apply_lock:
            await asyncio.to_thread(self._get_applier().adopt, path)
            await _settled(self.files.save, self.state_dir)

    def _reset_applier(self) -> None:
        """After a failed write or fsync nothing about the open files can be trusted (the
        kernel may have dropped dirty pages): the next apply starts with fresh ones."""
        if self._applier is not None:
            with contextlib.suppress(OSError):
                self._applier.close()
            self._applier = None

    def replica_manifest(
        self, volume: str, extent_size: int, unapplied: list[Record] | None = None
    ) -> Iterator[tuple[bool, int, bytes]]:
        """(exists, size, digests of up to MANIFEST_CHUNK extents) of a replica, read afresh;
        with ``unapplied`` (``unapplied.of_file``'s records), of the replica as they will
        leave it (engine/unapplied.py: NotComparable before the first chunk).

        A generator, so a huge replica is hashed and sent a chunk at a time, never held
        whole in memory. Blocking: drive it from a worker thread.
        """
        fd = self._get_applier().open_readonly(volume)  # never reads outside the replica
        try:
            if unapplied:
                if fd is None and not self._absent(volume):  # the applier refuses it
                    raise NotComparable(f"replica {volume!r} is not a file (a symlink?)")
                yield from unapplied_manifest(fd, unapplied, extent_size, MANIFEST_CHUNK)
            elif fd is None:
                yield False, 0, b""
            else:
                size = os.fstat(fd).st_size
                for digests in digest_chunks(fd, size, extent_size, MANIFEST_CHUNK):
                    yield True, size, digests
        finally:
            if fd is not None:
                os.close(fd)

    def _absent(self, path: str) -> bool:
        """Nothing is under replica name ``path`` (not even a symlink). Blocking."""
        try:
            return self._get_applier().lstat(path) is None
        except (OSError, ApplyError):
            return False

    async def unapplied(self) -> list[Record]:
        """The durable records after the applied LSN, in order: once ``apply_pending`` ran,
        those past the last barrier, which wait for the next one (engine/unapplied.py).
        Nothing for a promoted replica: they are never applied to it."""
        if self.promotion is not None:
            return []
        records: list[Record] = []
        upto = self.journal.durable_lsn
        start = max(self.state.applied_lsn + 1, self.journal.first_lsn)
        if start > upto:
            return records
        async with contextlib.aclosing(self.journal.read_from(start)) as stored:
            async for record in stored:
                if record.lsn > upto:
                    break
                records.append(record)
        return records

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
                # what a session left appended counts, as when the job is opened again
                await self.journal.sync()
                await self.take_durable()
            with contextlib.suppress(Exception):
                await self.apply_pending()
        self._reset_applier()
        self._release_guard()
        self._tail.reset(self.state.applied_lsn)  # its memory goes back to the receiver
        with contextlib.suppress(JournalError):
            await self.journal.aclose()


@dataclass(frozen=True, slots=True)
class _DirectCommit:
    """One commit of direct writes: up to ``upto``; ``point``: the first barrier, when the
    writes end on it (the commit ends the direct path); ``size``: the bytes it covers;
    ``failures``: ``JobReplica._direct_failures`` when it was taken."""

    upto: int
    point: Record | None
    size: int
    pending: PendingSync
    failures: int


def _why_not_a_point(state: ReplicaState, diverged: dict[str, str]) -> str:
    """Why a promotion now would not take a consistency point ("" when it would)."""
    whys = [_why_inconsistent(state)] if not state.consistent or state.applying else []
    whys += [f"replica file {path!r} {why}" for path, why in sorted(diverged.items())]
    return "; ".join(whys)


def _why_inconsistent(state: ReplicaState) -> str:
    if state.unknown:
        return state.unknown
    why = f"an epoch or a --resync comparison was cut short after lsn {state.applied_lsn}"
    floor = state.floor_ahead
    if floor is None:
        return why
    return (
        f"{why}, or records it had acknowledged were lost and no epoch at or after lsn "
        f"{floor} has been applied since"
    )


def _ms_per_mib(seconds_per_byte: float | None) -> float | None:
    return None if seconds_per_byte is None else round(seconds_per_byte * 1e3 * (1 << 20), 2)


def _direct_bytes(records: list[Record]) -> int:
    """Bytes of ``records`` that may go past the page cache (large aligned WRITEs)."""
    total = 0
    for record in records:
        size = len(record.data)
        if record.type is RecordType.WRITE and direct_writes.eligible(record.offset, size):
            total += size
    return total


def _folder_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return st.st_dev, st.st_ino


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
