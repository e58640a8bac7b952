"""The sender's configuration, its state folder, and the choice of a basis.

``SenderConfig`` is what a sending job is (the CLI, tests and embedders build it);
``SenderState`` is the state folder a sender owns (locked): its journal and the manifests
of the last epoch. ``choose_basis`` decides what the replica is assumed to hold before a
cycle scans against it.

Choosing the basis (what the replica is assumed to hold):

* the local manifests, when every record journaled after them is still in our journal,
  their LSNs follow each other without a gap, and the receiver's position is consistent
  with that journal (a gap: records were numbered past a receiver found ahead of this
  journal, and what the records in between changed is known nowhere here);
* otherwise the receiver's manifests, read afresh from the replicas after it applied all
  it has received. This covers a first sync onto a seeded replica, a resumed initial
  sync, a wiped sender state folder, a receiver that lost its state, and ``--resync``.

In both cases the records journaled after the basis (they reach the replica before the
next epoch) are folded into it by ``_apply_effect``, so nothing is sent twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import structlog

from replicator.engine import direct_intent, lost_records
from replicator.engine.checkpoint import RANGE_TYPES, TouchedExtents, load_touched
from replicator.engine.direct_intent import IntentDamaged
from replicator.engine.failback_state import refuse_if_marked
from replicator.engine.hooks import HOOK_TIMEOUT
from replicator.engine.imagelock import ImageLocks
from replicator.engine.link import Link
from replicator.engine.manifest import UNKNOWN, ExtentManifest, ManifestSet
from replicator.engine.scan import (
    resize_basis,
)
from replicator.engine.served_alone import load_served_alone
from replicator.engine.statedir import StateDirLock, files_bytes, free_bytes, state_reserve
from replicator.engine.tree import Tree, fold, from_entries
from replicator.engine.volumes import (
    DEFAULT_EXTENT,
    VolumeKind,
    VolumeSpec,
    extent_digest,
    zero_digest,
)
from replicator.journal import Journal, Record, RecordType
from replicator.journal.durable import StateFileError, settled
from replicator.journal.recovery import OnDamage

log = structlog.get_logger()

JOURNAL_CAP = 1024 * 1024 * 1024  # scan capture waits for acks beyond this
# Live capture cannot wait: past the cap, writers get ENOSPC. Sized for a long outage.
LIVE_JOURNAL_CAP = 16 * 1024 * 1024 * 1024
DEFAULT_SEGMENT = 64 * 1024 * 1024
MIN_SEGMENT = 1024 * 1024
Shared = frozenset[int]  # ids of disks' manifests a basis shares with the saved ones


def _source_folder(config: SenderConfig) -> Path | None:
    """A folder job's source folder (its volumes are FOLDER/NAME), None for other jobs and
    an empty folder."""
    if not config.folder or not config.volumes:
        return None
    volume = config.volumes[0]
    return volume.path.parents[volume.name.count("/")]


def journal_cap(state_dir: Path, asked: int) -> int:
    """The journal's cap: ``asked`` (``--journal-max``), or less when the state folder's
    file system has not the room for it: what the journal holds now and half the free
    space beyond ``state_reserve``, the other half left to whatever shares the file system
    (often the VM's own images, which may grow). At the cap a live capture tracks changes
    and resyncs them later (its VM's writes go on) and a scan waits for acks; a journal
    that ran its file system out of space would instead fail the capture and the VM's
    writes with it."""
    held = files_bytes(state_dir / "journal")
    free = free_bytes(state_dir)
    room = held + max(0, free - state_reserve(state_dir)) // 2
    if room >= asked:
        return asked
    cap = max(room, 2 * MIN_SEGMENT)  # the least a journal can trim in; with less room,
    # the file system's own "full" is what the first write meets, and it says so
    log.warning(
        "sender.journal_capped",
        cap=cap,
        asked=asked,
        free=free,
        action=f"the file system of {state_dir} has not the room for --journal-max: the "
        "journal stops at half its free space (then changes are tracked and resynced); "
        "free space there or move --state-dir to a larger one",
    )
    return cap


@dataclass(frozen=True, slots=True)
class SenderConfig:
    host: str
    port: int
    job: str
    volumes: list[VolumeSpec]
    state_dir: Path
    extent_size: int = DEFAULT_EXTENT
    pre_hook: str | None = None
    post_hook: str | None = None
    hook_timeout: float = HOOK_TIMEOUT  # seconds a hook may run (engine/hooks.py)
    resync: bool = False
    journal_max_bytes: int = JOURNAL_CAP
    connect_timeout: float = 10.0
    # what to do with a damaged journal: "cut" it and compare with the replica (the
    # volumes hold every change the lost records made), or "refuse"
    journal_damage: OnDamage = "cut"
    # the volumes are a folder's files (FUSE capture): the replica folder's layout is
    # listed at every connect with a basis, to find what the folder no longer has
    folder: bool = False
    # a live sender not connected after this many seconds at start serves from its own
    # state (engine/served_alone.py); None: it waits for the receiver however long
    wait_for_receiver: float | None = None


class SenderState:
    """The locked state folder: journal and manifests."""

    def __init__(
        self, config: SenderConfig, *, failback: bool = False, manifests: bool = True
    ) -> None:
        """``failback``: opened by ``replicator failback``, the one user allowed while
        ``failback.state`` says the volumes are not ours to send (engine/failback_state.py).
        ``manifests``: load the saved manifests (``verify`` compares with the replica and
        needs none: a 16 TiB raw disk's are 4 GiB in memory)."""
        self.config = config
        self.failback = failback
        self.load_manifests = manifests
        self.dir = config.state_dir
        self._lock = StateDirLock(config.state_dir, f"a sender for job {config.job!r}")
        self.journal: Journal | None = None
        self.manifests: ManifestSet | None = None
        self.damaged = False  # the journal lost synced records: compare with the replica
        # why the replica must be compared until a comparison completes (lost_records.py)
        self.compare: str | None = None
        # the LSN this folder's sender last served from without its receiver, until a
        # session finds the receiver at or below it (engine/served_alone.py)
        self.served_alone: int | None = None
        self.locks = ImageLocks(
            [v.path for v in config.volumes if v.kind is VolumeKind.DISK],
            [v.path for v in config.volumes if v.kind is VolumeKind.FILE],
            _source_folder(config),
        )

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifests.state"

    async def __aenter__(self) -> SenderState:
        self._lock.__enter__()
        try:
            if not self.failback:
                await asyncio.to_thread(refuse_if_marked, self.dir, self.config.job)
            await asyncio.to_thread(self.locks.acquire)
            cap = await asyncio.to_thread(journal_cap, self.dir, self.config.journal_max_bytes)
            self.journal = await Journal.open(
                self.dir / "journal",
                max_bytes=cap,
                # a quarter of the cap at most, so a small cap still trims as acks arrive
                segment_bytes=max(MIN_SEGMENT, min(DEFAULT_SEGMENT, cap // 4)),
                on_damage=self.config.journal_damage,
            )
            if self.load_manifests:
                self.manifests = await asyncio.to_thread(self._load_manifests)
            self.served_alone = await asyncio.to_thread(load_served_alone, self.dir)
            self.compare = await asyncio.to_thread(lost_records.load, self.dir)
        except BaseException:
            if self.journal is not None:
                await self.journal.aclose()
            self.locks.release()
            self._lock.__exit__(None, None, None)
            raise
        recovery = self.journal.recovery
        if recovery is not None and recovery.kind == "damage":
            self.damaged = True
            log.error(
                "sender.journal_damaged",
                job=self.config.job,
                segment=recovery.path,
                offset=recovery.offset,
                lost_from_lsn=recovery.next_lsn,
                action="the next cycle compares the volumes with the replica (basis remote)",
            )
        if self.manifests is not None and self.manifests.extent_size != self.config.extent_size:
            log.info("sender.extent_size_changed", old=self.manifests.extent_size)
            self.manifests = None
        return self

    def _load_manifests(self) -> ManifestSet | None:
        try:
            return ManifestSet.load(self.manifest_path)
        except StateFileError as exc:
            # the manifests only save work: without them the replica itself is compared
            log.error(
                "sender.state_damaged",
                job=self.config.job,
                path=str(self.manifest_path),
                error=str(exc),
                action="comparing with the replica instead (basis remote)",
            )
            return None

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self.journal is not None:
                await self.journal.aclose()
        finally:
            self.locks.release()
            self._lock.__exit__(None, None, None)

    async def save(self, manifests: ManifestSet) -> None:
        await settled(manifests.save, self.manifest_path)
        self.manifests = manifests
        # they hold what cycles shipped without the journal since the older ones
        await settled(direct_intent.drop, self.dir)
        if self.compare is not None and manifests.compared:  # not a checkpoint's, say
            await settled(lost_records.clear, self.dir)
            self.compare = None

    async def require_compare(self, reason: str) -> None:
        """Durably: every basis is the replica's until a cycle's manifests are saved."""
        await settled(lost_records.save, self.dir, reason)
        self.compare = reason


def _apply_effect(basis: ManifestSet, record: Record, shared: Shared = frozenset()) -> None:
    """Update ``basis`` with what ``record`` will do to the replica when it is applied.

    Extents a record covers completely get the digest of their new content; partly
    covered ones become unknown (sent again by the next scan). A disk's manifest in
    ``shared`` is copied before it is changed (``_sharing``).
    """
    if record.type is RecordType.FILE:
        basis.files[record.volume] = extent_digest(record.data)
        basis.modes[record.volume] = record.offset & 0o7777
        return
    if record.type is RecordType.CHMOD:
        basis.modes[record.volume] = record.offset & 0o7777
        return
    if record.type in (RecordType.UNLINK, RecordType.CREATE):
        basis.disks.pop(record.volume, None)
        basis.files.pop(record.volume, None)
        basis.modes.pop(record.volume, None)
        if record.type is RecordType.CREATE:  # an empty file
            basis.disks[record.volume] = ExtentManifest(basis.extent_size, 0)
            basis.files[record.volume] = extent_digest(b"")
            basis.modes[record.volume] = record.offset & 0o7777
        return
    if record.type is RecordType.RENAME:  # content and mode move with the name
        disk = basis.disks.pop(record.volume, None)
        digest = basis.files.pop(record.volume, None)
        mode = basis.modes.pop(record.volume, None)
        basis.disks.pop(record.target, None)
        basis.files.pop(record.target, None)
        basis.modes.pop(record.target, None)
        if disk is not None:
            basis.disks[record.target] = disk
        if digest is not None:
            basis.files[record.target] = digest
        if mode is not None:
            basis.modes[record.target] = mode
        return
    if record.type in RANGE_TYPES or record.type is RecordType.RESIZE:
        # a file known by its whole-file digest (a configuration file, a FUSE folder's
        # small file) has other content once the record is applied: unknown, sent again
        basis.files.pop(record.volume, None)
    if record.type is RecordType.RESIZE:
        basis.disks.setdefault(record.volume, ExtentManifest(basis.extent_size, 0))
        resize_basis(_own(basis, record.volume, shared), record.size)
        return
    if record.type not in (RecordType.WRITE, RecordType.ZERO, RecordType.TRIM):
        return
    if record.volume not in basis.disks:
        return
    disk = _own(basis, record.volume, shared)
    ext = disk.extent_size
    start, end = record.offset, record.offset + record.length
    for index in range(start // ext, min(disk.count, (end + ext - 1) // ext)):
        e_start = index * ext
        e_end = min(e_start + ext, disk.size)
        if start <= e_start and e_end <= end:
            if record.type is RecordType.WRITE:
                digest = extent_digest(record.data[e_start - start : e_end - start])
            else:
                digest = zero_digest(e_end - e_start)
            disk.set(index, digest)
        else:
            disk.set(index, UNKNOWN)


async def choose_basis(state: SenderState, link: Link) -> tuple[ManifestSet, str]:
    """Pick what the replica is assumed to hold (see the module docstring)."""
    journal = state.journal
    assert journal is not None
    local = state.manifests
    received = link.received_lsn
    why = "no sync from this state folder has completed yet" if local is None else None
    if local is not None:
        why = _local_unusable(state)
        if why is None:
            found = await _local_basis(state, local, received)
            if isinstance(found, ManifestSet):
                log.info("sender.basis", kind="local", lsn=found.lsn, received=received)
                return found, "local"
            why = found
            if found.startswith("the journal does not hold"):
                log.warning(
                    "sender.journal_gap",
                    problem=f"{found}: the replica may have got records this state folder "
                    "never held (was it restored from an older copy, or did a send with "
                    "another --state-dir replicate this job since?), so it is compared with "
                    "the source instead",
                )
    epoch = local.epoch if local is not None else 0
    basis = ManifestSet(received, state.config.extent_size, epoch, compared=True)
    for spec in state.config.volumes:
        if spec.kind is VolumeKind.DISK:
            remote = await link.request_manifest(spec.name, state.config.extent_size)
            if remote is not None:
                basis.disks[spec.name] = remote
    await _fold_journal(journal, basis)  # what the receiver lacks reaches it before the scan
    log.info("sender.basis", kind="remote", lsn=basis.lsn, received=received, why=why)
    return basis, "remote"


async def basis_alone(state: SenderState) -> ManifestSet | str:
    """The basis of a scan made without the receiver (a live sender serving alone,
    engine/served_alone.py): the local manifests with every later record of the journal
    folded in. Or why there is none: the receiver's own manifests are then needed."""
    local = state.manifests
    if local is None:
        return "no sync from this state folder has completed yet"
    unusable = _local_unusable(state)
    if unusable is not None:
        return unusable
    found = await _local_basis(state, local, None)
    if isinstance(found, ManifestSet):
        log.info("sender.basis", kind="local", lsn=found.lsn, received=None)
    return found


async def _local_basis(
    state: SenderState, local: ManifestSet, received: int | None
) -> ManifestSet | str:
    """``local`` with what followed it: the records still journaled folded in, and what
    ``direct.intent`` notes made unknown. Or why that is not what the replica will hold.

    Every LSN after the manifests, up to the receiver's position (``received``; None:
    serving alone) and the journal's end, must be a record still journaled here, or one
    a cycle shipped without the journal and noted first (engine/direct_intent.py); serving
    alone, records trimmed since are taken from their marks (``touched.state``) instead."""
    journal = state.journal
    assert journal is not None
    try:
        intent = await asyncio.to_thread(direct_intent.load, state.dir, local.extent_size)
    except IntentDamaged as exc:
        return f"the notes of a cycle shipped without the journal are damaged: {exc}"
    if intent is not None and intent.since != local.lsn:
        intent = None  # made against older manifests: the saved ones hold what they noted
    if local.lsn > max(journal.last_lsn, received or 0):
        return "the manifests are ahead of the journal"
    if received is not None and received < local.lsn and received + 1 < journal.first_lsn:
        return "the receiver lacks records this journal no longer holds"
    basis, shared = _sharing(local)
    held = await _fold_journal(journal, basis, shared)
    after = local.lsn
    if received is None and journal.first_lsn > local.lsn + 1:  # records trimmed since
        touched = await asyncio.to_thread(load_touched, state.dir, local.lsn, local.extent_size)
        if touched is None:
            return "the journal no longer holds every record since the last sync"
        _unknown_where_touched(basis, touched, state.config.volumes, shared)
        after = journal.first_lsn - 1
    upto = max(received or 0, journal.first_lsn - 1, held[-1][1] if held else 0)
    for first, last in _missing(after, upto, held):
        if intent is None or not intent.covers(first, last):
            if received is not None and last < journal.first_lsn and last <= received:
                # this journal held them, and dropped them once the receiver had them (a
                # live sender killed before it saved manifests past them): no gap, but
                # the replica is compared all the same
                return (
                    f"the journal no longer holds lsn {first} to {last} (dropped once the "
                    "receiver had them), after the last sync"
                )
            return f"the journal does not hold lsn {first} to {last}, after the last sync"
    if intent is not None:
        _unknown_where_touched(basis, intent.touched, state.config.volumes, shared)
        for volume in intent.whole:  # its content or mode was sent: unknown now
            basis.files.pop(volume, None)
            basis.modes.pop(volume, None)
    return basis


def _missing(after: int, upto: int, held: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The LSN ranges from ``after + 1`` to ``upto`` that ``held`` (ascending, disjoint
    ranges) leaves out."""
    missing: list[tuple[int, int]] = []
    nxt = after + 1
    for first, last in held:
        if last < nxt:
            continue
        if first > nxt:
            missing.append((nxt, min(first - 1, upto)))
        nxt = max(nxt, last + 1)
        if nxt > upto:
            break
    if nxt <= upto:
        missing.append((nxt, upto))
    return [(first, last) for first, last in missing if first <= last]


def _local_unusable(state: SenderState) -> str | None:
    """Why the local manifests may not be the basis whatever the receiver holds."""
    if state.config.resync:
        return "--resync compares with the replica"
    if state.damaged:
        return "the journal was damaged: the replica must be compared"
    return state.compare


def _unknown_where_touched(
    basis: ManifestSet,
    touched: TouchedExtents,
    volumes: list[VolumeSpec],
    shared: Shared = frozenset(),
) -> None:
    """Mark unknown (read and sent again by the scan) every extent changed by records
    since trimmed (``touched.state``) or shipped without the journal (``direct.intent``).
    A disk whose size changed meanwhile has an unknown size on the replica too: its
    manifest is made one byte longer than the image, so the scan sends a RESIZE to the
    image's size and takes every extent past the manifests' end as unknown, never as the
    zeros a RESIZE leaves (the replica may hold data there from those records)."""
    for spec in volumes:
        if spec.name not in basis.disks or spec.kind is not VolumeKind.DISK:
            continue
        marked = list(touched.indices(spec.name))
        if not marked and spec.name not in touched.resized:
            continue  # unchanged: not copied
        disk = _own(basis, spec.name, shared)
        if spec.name in touched.resized or (marked and marked[-1] >= disk.count):
            with contextlib.suppress(FileNotFoundError):
                disk.resize(os.stat(spec.path).st_size + 1)  # the new extents: UNKNOWN
        for index in marked:
            if index < disk.count:
                disk.set(index, UNKNOWN)


def unknown_where_journaled(
    basis: ManifestSet, journaled: TouchedExtents, volumes: list[VolumeSpec]
) -> ManifestSet:
    """A copy of ``basis`` with everything records journaled since it (by a scan that did
    not end) may change marked unknown, so the next scan reads and sends it again: those
    records reach the replica before any later point, and an extent written back to its
    ``basis`` content since would otherwise never be sent. Configuration files are sent
    again whole; a record this cannot follow makes every volume unknown."""
    marked = _copy(basis)
    if not journaled.valid:
        for disk in marked.disks.values():
            disk.invalidate_all()
        marked.files.clear()
        marked.modes.clear()
        return marked
    _unknown_where_touched(marked, journaled, volumes)
    for name in journaled.files:
        marked.files.pop(name, None)
        marked.modes.pop(name, None)
    return marked


def _sharing(local: ManifestSet) -> tuple[ManifestSet, Shared]:
    """A basis made from ``local`` that shares its disks' manifests (a dense TiB of a raw
    disk is 256 MiB of digests, and a cycle holds the saved manifests and the new ones
    besides; a copy shares their chunks too, copied on write, but even its list of chunks
    is not made for a disk nothing changes), and the ids of those shared: ``_own`` copies
    one before it is changed, so
    ``local`` (``SenderState.manifests``, what was saved) stays as it is whatever the
    cycle does. Nothing changes a basis in place once it is made (``scan_epoch`` does not,
    ``unknown_where_journaled`` copies it)."""
    basis = ManifestSet(local.lsn, local.extent_size, local.epoch)
    basis.disks = dict(local.disks)
    basis.files = dict(local.files)
    basis.modes = dict(local.modes)
    return basis, frozenset(id(disk) for disk in local.disks.values())


def _own(basis: ManifestSet, name: str, shared: Shared) -> ExtentManifest:
    """``basis``'s manifest of ``name``, copied first if it is one it shares. An id in
    ``shared`` is never a copy's: the shared manifests stay alive (the saved ones hold
    them) while the basis is made."""
    disk = basis.disks[name]
    if id(disk) in shared:
        disk = basis.disks[name] = disk.copy()
    return disk


def _copy(local: ManifestSet) -> ManifestSet:
    basis = ManifestSet(local.lsn, local.extent_size, local.epoch)
    basis.disks = {k: v.copy() for k, v in local.disks.items()}
    basis.files = dict(local.files)
    basis.modes = dict(local.modes)
    return basis


async def _fold_journal(
    journal: Journal, basis: ManifestSet, shared: Shared = frozenset()
) -> list[tuple[int, int]]:
    """Fold the records journaled after ``basis.lsn`` into it (they reach the replica
    before the next epoch); returns the LSN ranges they cover, in order. A disk's
    manifest in ``shared`` is copied before it is changed.

    Records are numbered past what the receiver holds when a connect finds it ahead of this
    journal (``Sender.append``), and a cycle shipped without the journal leaves its LSNs
    out of it (``Link.ship_direct``): the ranges may have gaps."""
    since = basis.lsn + 1
    held: list[tuple[int, int]] = []
    if since <= journal.last_lsn:
        # only when there is something to fold: the journal's reader starts at the
        # beginning of the segment holding ``since`` and checks every record up to it
        # (tens of MiB after a sync, all below ``since``), which a cycle with no
        # record after its basis does not need
        async for record in journal.read_from(max(since, journal.first_lsn)):
            lsn = record.lsn
            if held and held[-1][1] == lsn - 1:
                held[-1] = (held[-1][0], lsn)
            else:
                held.append((lsn, lsn))
            _apply_effect(basis, record, shared)
    return held


async def replica_layout(state: SenderState, link: Link) -> Tree:
    """The replica folder as it will be once the records still in our journal after what
    the receiver has are applied: its listing, folded with those records."""
    journal = state.journal
    assert journal is not None
    tree = from_entries(await link.request_tree())
    async for record in journal.read_from(max(link.received_lsn + 1, journal.first_lsn)):
        fold(tree, record)
    return tree
