"""The sending side: capture by snapshot diff into the journal, ship it, wait for durability.

One *cycle* runs the pre-hook (freeze), scans every volume against a basis manifest and
journals the changes as one EPOCH, runs the post-hook (thaw), and saves the manifests.
The link ships the journal concurrently. ``--once`` runs one cycle and waits until the
receiver has applied the EPOCH; otherwise cycles repeat every ``interval`` seconds and
the connection is re-established after any interruption.

Choosing the basis (what the replica is assumed to hold):

* the local manifests, when every record journaled after them is still in our journal
  and the receiver's position is consistent with that journal;
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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

from replicator.engine.connectors import Connector, TcpConnector
from replicator.engine.errors import (
    BusyError,
    ConfigError,
    ConnectError,
    PeerProtocolError,
    as_user_error,
)
from replicator.engine.imagelock import ImageLocks
from replicator.engine.link import Link, SessionPurpose
from replicator.engine.manifest import UNKNOWN, ExtentManifest, ManifestSet
from replicator.engine.names import check_job_name
from replicator.engine.scan import (
    Progress,
    ScanStats,
    append_waiting,
    resize_basis,
    scan_epoch,
)
from replicator.engine.statedir import StateDirLock
from replicator.engine.status import SenderJobStatus, SenderPhase
from replicator.engine.tree import Tree, fold, from_entries
from replicator.engine.volumes import (
    DEFAULT_EXTENT,
    VolumeKind,
    VolumeSpec,
    extent_digest,
    zero_digest,
)
from replicator.journal import Journal, Record, RecordType
from replicator.journal.durable import StateFileError
from replicator.journal.journal import OnDamage

log = structlog.get_logger()

JOURNAL_CAP = 1024 * 1024 * 1024  # scan capture waits for acks beyond this
# Live capture cannot wait: past the cap, writers get ENOSPC. Sized for a long outage.
LIVE_JOURNAL_CAP = 16 * 1024 * 1024 * 1024
FULL_WAIT_TIMEOUT = 600.0
# What ends an established session but not the job: the link broke, or a frame arrived
# damaged (a flipped bit on the path; every frame is checksummed, so it is caught, never
# applied). A continuous sender reconnects and resumes from the receiver's last ack.
MID_SESSION_RETRY = (ConnectError, PeerProtocolError)
DEFAULT_SEGMENT = 64 * 1024 * 1024
MIN_SEGMENT = 1024 * 1024


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
    resync: bool = False
    journal_max_bytes: int = JOURNAL_CAP
    connect_timeout: float = 10.0
    # what to do with a damaged journal: "cut" it and compare with the replica (the
    # volumes hold every change the lost records made), or "refuse"
    journal_damage: OnDamage = "cut"
    # the volumes are a folder's files (FUSE capture): the replica folder's layout is
    # listed at every connect with a basis, to find what the folder no longer has
    folder: bool = False


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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class SenderState:
    """The locked state folder: journal and manifests."""

    def __init__(self, config: SenderConfig) -> None:
        self.config = config
        self.dir = config.state_dir
        self._lock = StateDirLock(config.state_dir, f"a sender for job {config.job!r}")
        self.journal: Journal | None = None
        self.manifests: ManifestSet | None = None
        self.damaged = False  # the journal lost synced records: compare with the replica
        self.locks = ImageLocks([v.path for v in config.volumes if v.kind is VolumeKind.DISK])

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifests.state"

    async def __aenter__(self) -> SenderState:
        self._lock.__enter__()
        try:
            await asyncio.to_thread(self.locks.acquire)
            self.journal = await Journal.open(
                self.dir / "journal",
                max_bytes=self.config.journal_max_bytes,
                # a quarter of the cap at most, so a small cap still trims as acks arrive
                segment_bytes=max(
                    MIN_SEGMENT, min(DEFAULT_SEGMENT, self.config.journal_max_bytes // 4)
                ),
                on_damage=self.config.journal_damage,
            )
            self.manifests = await asyncio.to_thread(self._load_manifests)
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
        await asyncio.to_thread(manifests.save, self.manifest_path)
        self.manifests = manifests


def _apply_effect(basis: ManifestSet, record: Record) -> None:
    """Update ``basis`` with what ``record`` will do to the replica when it is applied.

    Extents a record covers completely get the digest of their new content; partly
    covered ones become unknown (sent again by the next scan).
    """
    if record.type is RecordType.FILE:
        basis.files[record.volume] = extent_digest(record.data)
        return
    if record.type in (RecordType.UNLINK, RecordType.CREATE):
        basis.disks.pop(record.volume, None)
        basis.files.pop(record.volume, None)
        if record.type is RecordType.CREATE:  # an empty file
            basis.disks[record.volume] = ExtentManifest(basis.extent_size, 0)
            basis.files[record.volume] = extent_digest(b"")
        return
    if record.type is RecordType.RENAME:  # content moves with the name
        disk = basis.disks.pop(record.volume, None)
        digest = basis.files.pop(record.volume, None)
        basis.disks.pop(record.target, None)
        basis.files.pop(record.target, None)
        if disk is not None:
            basis.disks[record.target] = disk
        if digest is not None:
            basis.files[record.target] = digest
        return
    if record.type is RecordType.RESIZE:
        resized = basis.disks.setdefault(record.volume, ExtentManifest(basis.extent_size, 0))
        resize_basis(resized, record.size)
        return
    if record.type not in (RecordType.WRITE, RecordType.ZERO, RecordType.TRIM):
        return
    disk = basis.disks.get(record.volume)
    if disk is None:
        return
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
    trusted = (
        local is not None
        and not state.config.resync
        and not state.damaged
        # every record after the manifests is still here to fold in, or the receiver has it
        and journal.first_lsn <= local.lsn + 1
        and local.lsn <= max(journal.last_lsn, received)
        and received + 1 >= journal.first_lsn
        and received <= journal.last_lsn
    )
    if trusted:
        assert local is not None
        basis = ManifestSet(local.lsn, local.extent_size, local.epoch)
        basis.disks = {k: v.copy() for k, v in local.disks.items()}
        basis.files = dict(local.files)
        since = local.lsn + 1
        kind = "local"
    else:
        epoch = local.epoch if local is not None else 0
        basis = ManifestSet(received, state.config.extent_size, epoch)
        for spec in state.config.volumes:
            if spec.kind is VolumeKind.DISK:
                remote = await link.request_manifest(spec.name, state.config.extent_size)
                if remote is not None:
                    basis.disks[spec.name] = remote
        since = received + 1
        kind = "remote"
    async for record in journal.read_from(max(since, journal.first_lsn)):
        _apply_effect(basis, record)
    log.info("sender.basis", kind=kind, lsn=basis.lsn, received=received)
    return basis, kind


async def replica_layout(state: SenderState, link: Link) -> Tree:
    """The replica folder as it will be once the records still in our journal after what
    the receiver has are applied: its listing, folded with those records."""
    journal = state.journal
    assert journal is not None
    tree = from_entries(await link.request_tree())
    async for record in journal.read_from(max(link.received_lsn + 1, journal.first_lsn)):
        fold(tree, record)
    return tree


async def run_hook(command: str | None, what: str) -> None:
    if not command:
        return
    proc = await asyncio.create_subprocess_shell(command)
    rc = await proc.wait()
    if rc != 0:
        raise ConfigError(f"{what} hook failed with exit code {rc}: {command}")


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
        self._lsn_floor = 1
        self.replica_tree: Tree | None = None  # the replica folder's layout (folder jobs)

    def _sizes(self) -> dict[str, int]:
        """Sizes of the volumes that exist now (a FUSE folder's files come and go)."""
        sizes: dict[str, int] = {}
        for v in self.config.volumes:
            with contextlib.suppress(FileNotFoundError):
                sizes[v.name] = os.stat(v.path).st_size
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
        link = Link(await self.connector.connect(), journal)
        try:
            await link.handshake(
                self.config.job,
                self.config.volumes,
                self._sizes(),
                purpose=purpose,
            )
            # the receiver may be ahead of us (our state was lost): never reuse its LSNs
            self._lsn_floor = link.received_lsn + 1
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
            self.status.error("connect", str(exc))
            mapped = as_user_error(exc)  # e.g. the receiver went away mid-handshake
            if mapped is not exc:
                raise mapped from exc
            raise
        self.status.journal = journal
        self.status.attach(link)
        return link, kind, basis

    async def close_link(self, link: Link) -> None:
        """Close ``link`` and say so in the status (the job is disconnected until the next)."""
        await link.aclose()
        self.status.attach(None)

    async def append(self, journal: Journal, link: Link, records: list[Record]) -> int:
        """Journal records for ``link``, waiting while the journal is full; the last LSN.

        The first record after a reconnect is numbered past what the receiver already
        holds, so its LSNs are never reused (our state may have been lost).
        """
        if journal.next_lsn < self._lsn_floor:
            records = [records[0].with_lsn(self._lsn_floor), *records[1:]]
        return await append_waiting(
            journal,
            records,
            link.space_freed,
            FULL_WAIT_TIMEOUT,
            link.raise_if_failed,
            link.relieve,
        )

    async def cycle(
        self,
        state: SenderState,
        link: Link,
        basis: ManifestSet,
        progress: Progress | None = None,
        *,
        prelude: list[Record] | None = None,
    ) -> tuple[ManifestSet, ScanStats, int]:
        journal = state.journal
        assert journal is not None

        async def append(records: list[Record]) -> int:
            return await self.append(journal, link, records)

        status = self.status

        def seen(done: int, total: int) -> None:
            status.progress = (done, total)
            if progress is not None:
                progress(done, total)

        await run_hook(self.config.pre_hook, "pre")
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
            await run_hook(self.config.post_hook, "post")
        await state.save(result[0])
        status.last_epoch = result[0].epoch
        return result

    async def run_once(self, progress: Progress | None = None) -> Summary:
        """One cycle, then wait until the receiver has applied it; ``progress`` sees the scan."""
        started = time.monotonic()
        async with SenderState(self.config) as state:
            link, kind, basis = await self.open_link(state)
            try:
                manifests, stats, epoch_lsn = await self.cycle(state, link, basis, progress)
                await link.wait_applied(epoch_lsn)
                await link.goodbye()
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
        )

    async def connect_retrying(
        self, state: SenderState, stop: asyncio.Event, *, with_basis: bool = True
    ) -> tuple[Link, str, ManifestSet] | None:
        """``open_link``, retried while the receiver is away or busy with another session
        for the job (1 s, doubling to 60 s).

        None when ``stop`` is set first. Other errors are not retried.
        """
        backoff = 1.0
        while not stop.is_set():
            try:
                return await self.open_link(state, with_basis=with_basis)
            except (ConnectError, BusyError) as exc:
                log.warning("sender.connect_failed", error=str(exc), retry_in=backoff)
                self.status.set_state(SenderPhase.CONNECTING)
                await sleep_or_stop(stop, backoff)
                backoff = min(backoff * 2, 60.0)
        return None

    async def run_forever(self, interval: float, stop: asyncio.Event) -> None:
        """Cycle every ``interval`` seconds until ``stop``; reconnect after interruptions."""
        async with SenderState(self.config) as state:
            while not stop.is_set():
                opened = await self.connect_retrying(state, stop)
                if opened is None:
                    break
                link, _, basis = opened
                self.status.set_state(SenderPhase.REPLICATING)
                try:
                    while not stop.is_set():
                        manifests, stats, lsn = await self.cycle(state, link, basis)
                        log.info(
                            "sender.epoch",
                            epoch=manifests.epoch,
                            lsn=lsn,
                            changed=stats.bytes_changed,
                            scanned=stats.bytes_scanned,
                        )
                        basis = manifests
                        await sleep_or_stop(stop, interval, link)
                    with contextlib.suppress(Exception):
                        await link.wait_applied(state.journal.last_lsn if state.journal else 0, 30)
                    await link.goodbye("sender stopping")
                except MID_SESSION_RETRY as exc:
                    log.warning("sender.link_lost", error=str(exc))
                    self.status.error("connection", str(exc))
                finally:
                    await self.close_link(link)
            self.status.set_state(SenderPhase.STOPPED)


async def sleep_or_stop(stop: asyncio.Event, seconds: float, link: Link | None = None) -> None:
    """Wait ``seconds`` or until ``stop``; then raise the link's failure, if it has one."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
    if link is not None:
        link.raise_if_failed()
