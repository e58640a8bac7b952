"""``replicator failback`` on the old source: take the job back from a promoted target
without a full copy.

What changed since the divergence (the promoted side's writes since promotion, plus the
old source's writes that never reached the target) is found by comparing blake3 extent
manifests of both sides *now*: the receiver hashes the promoted replica, this side its
volumes, and only extents whose digests differ move (extents that are all zeros on the
target are zeroed here without being carried). That is at most the union of both sides'
changes, needs no tracking on the target while its VM runs (so nothing can be missed,
whatever the VM or a crash did there, and promotion costs no time), and costs one read
of each disk, which a dirty map would save but a manifest at the promotion point would
not. Every extent read is checked against the target's digest: a replica that changes
under the failback (its VM still running) stops it.

Crash safety (``failback.state``, ``engine/failback_state.py``): ``failback`` is recorded
durably before the first volume byte changes, so an interrupted failback leaves ``send``
refusing the volumes and ``status`` saying so; running it again compares again and moves
what still differs. Once the volumes equal the replica (fsynced), this side's state is
set to continue from ``H`` (above every LSN either side used): a barrier journaled at
``H``, the manifests of what both sides now hold as of ``H``, the receiver's generation;
then ``handing-back`` is recorded, the receiver is told (``Handover("handback", H)``: it
makes the job a replica again, applied at ``H``), and the record is removed. A run cut
short after the receiver's hand-back sees it in the Welcome and only removes the record.
Records journaled on either side before the failback all lie at or below ``H``, so none
of them is ever shipped or applied afterwards: a plain ``send`` resumes with a local
basis and moves only new changes.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from replicator.engine import generations
from replicator.engine.connectors import Connector
from replicator.engine.errors import (
    ConfigError,
    PeerProtocolError,
    RefusedError,
    StorageError,
    TargetStorageError,
    as_user_error,
)
from replicator.engine.failback_state import MARKER_FILE, clear_marker, load_marker, save_marker
from replicator.engine.link import Link, SessionPurpose
from replicator.engine.manifest import ExtentManifest, ManifestSet
from replicator.engine.names import check_job_name
from replicator.engine.sender_state import SenderConfig, SenderState
from replicator.engine.verify import compare
from replicator.engine.volumes import (
    VolumeKind,
    VolumeSpec,
    extent_digest,
    pwrite_all,
    zero_digest,
    zero_in_place,
)
from replicator.journal import Record
from replicator.journal.durable import fsync_fd, settled
from replicator.transport.messages import MAX_READ

log = structlog.get_logger()

HANDBACK_TIMEOUT = 120.0
READS_IN_FLIGHT = 8  # ReadRequests outstanding at once (pipelined over a WAN)


@dataclass
class FailbackResult:
    job: str
    volumes: list[str]
    generation: int = 0  # the history both sides follow now (the promoted one)
    lsn: int = 0  # where replication continues
    bytes_moved: int = 0  # payload bytes carried from the target
    bytes_zeroed: int = 0  # extents zeroed here without carrying anything
    bytes_compared: int = 0  # size of the volumes compared
    extents_changed: int = 0
    seconds: float = 0.0
    resumed: bool = False  # an interrupted failback was found and finished
    already_done: bool = False  # only the hand-back's last step was left
    per_volume: dict[str, int] = field(default_factory=dict)  # bytes moved by volume
    # configuration files whose replica differs from this side's: not brought back (the
    # next send replaces the target's copy with this side's), so the operator is told
    files_differing: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _no_other_writer(state: SenderState) -> None:
    """The VM must be stopped here: failback rewrites its disks, and one still running on
    them (QEMU's write lock held) would go on from a disk changed under it, its own
    writes mixed with the target's, and the next send would ship the mix. Refused before
    anything is read, sent or changed."""
    writers = await asyncio.to_thread(state.locks.written_by_others)
    if writers:
        raise ConfigError(
            f"{writers[0]} is open for writing by another program (QEMU's image lock is "
            "held): failback rewrites it, under the VM that runs on it",
            hint="stop the VM on this host (start it again once the failback is done), "
            "then run the same failback again; nothing was changed",
        )


async def failback(config: SenderConfig, connector: Connector) -> FailbackResult:
    """Bring the volumes of ``config`` to the promoted replica's state and hand the job
    back to replication in the original direction (see the module docstring)."""
    check_job_name(config.job)
    started = time.monotonic()
    disks = [v for v in config.volumes if v.kind is VolumeKind.DISK]
    if not disks:
        raise ConfigError("failback needs the job's disk images", hint="name them as for send")
    result = FailbackResult(config.job, [v.name for v in disks])
    async with SenderState(config, failback=True) as state:
        journal = state.journal
        assert journal is not None
        await _no_other_writer(state)
        marker = await asyncio.to_thread(load_marker, config.state_dir)
        result.resumed = marker is not None and marker.phase in ("failback", "handing-back")
        link = Link(await connector.connect(), journal)
        handing_back = False  # the receiver was told to take the job back
        try:
            peer = await asyncio.to_thread(generations.load_peer, config.state_dir)
            sizes = {v.name: os.stat(v.path).st_size for v in config.volumes if v.path.exists()}
            welcome = await link.handshake(
                config.job, config.volumes, sizes, purpose=SessionPurpose.FAILBACK,
                generation=peer.generation,
            )  # fmt: skip
            link.start_reader()
            generation = welcome.generation
            if "promoted" not in welcome.capabilities:
                if (
                    marker is not None
                    and marker.phase == "handing-back"
                    and (welcome.applied_lsn, generation) == (marker.lsn, marker.generation)
                ):  # the receiver took the job back; only our record of it was left
                    await settled(clear_marker, config.state_dir)
                    await link.goodbye("failback done")
                    result.generation, result.lsn, result.already_done = (
                        generation,
                        marker.lsn,
                        True,
                    )
                    result.seconds = round(time.monotonic() - started, 3)
                    return result
                raise RefusedError(
                    f"job {config.job!r} is not promoted on the receiver: there is nothing to "
                    "fail back from",
                    hint="failback follows `replicator failover` on the target; `replicator "
                    "status --dir DIR` there shows the job",
                )
            # from here on the volumes may be half old, half new until the hand-back
            await _record(
                config.state_dir, "failback", generation=generation, resumed=result.resumed
            )
            remote: dict[str, ExtentManifest] = {}
            for spec in disks:
                remote[spec.name] = await _restore(link, spec, config.extent_size, result)
            files = [v for v in config.volumes if v.kind is VolumeKind.FILE]
            compared = await compare(link, files, config.extent_size)
            result.files_differing = [d.volume for d in compared.volumes if not d.identical]
            # both sides continue above every LSN either has used (see the module docstring)
            handback = max(journal.last_lsn, welcome.received_lsn) + 1
            await journal.append(Record.flush().with_lsn(handback))
            await journal.sync()
            epoch = state.manifests.epoch if state.manifests is not None else 0
            manifests = ManifestSet(
                handback, config.extent_size, epoch, dict(remote), compared=True
            )
            await state.save(manifests)  # file volumes are shipped again by the next send
            # the same replica (the promoted one), in the generation it hands back
            handed = replace(peer, generation=generation)
            await settled(generations.save_peer, config.state_dir, handed)
            await _record(config.state_dir, "handing-back", generation=generation, lsn=handback)
            handing_back = True
            await link.send_handover("handback", handback, generation)
            step = await link.handover(HANDBACK_TIMEOUT)
            if step.step != "demoted" or step.lsn != handback:
                raise PeerProtocolError(
                    f"the receiver answered the hand-back at lsn {handback} with {step.step!r} "
                    f"at {step.lsn}"
                )
            await settled(clear_marker, config.state_dir)
            await link.goodbye("failback done")
            result.generation, result.lsn = step.generation, handback
        except BaseException as exc:
            mapped = as_user_error(exc)
            if handing_back and isinstance(mapped, TargetStorageError):
                # not the send's advice ("run send again": send refuses until the failback
                # is done): the target could not record taking the job back
                raise TargetStorageError(mapped.message, hint=_HANDBACK_STORAGE_HINT) from exc
            if mapped is not exc:
                raise mapped from exc
            raise
        finally:
            await link.aclose()
    result.seconds = round(time.monotonic() - started, 3)
    log.warning("failback.done", **{k: v for k, v in result.as_dict().items() if k != "per_volume"})
    return result


_HANDBACK_STORAGE_HINT = (
    "the target could not record taking the job back, so it stays promoted, and the "
    "volumes here equal its replica: fix what the message names there (space, the disk; "
    "the receiver logs it as receiver.storage), then run the same `replicator failback` "
    "again (`send` refuses until it is done)"
)


async def _record(
    state_dir: Path, phase: str, *, generation: int, lsn: int = 0, resumed: bool = False
) -> None:
    """Durably record ``phase`` in failback.state before the step it protects: the first
    volume byte changed ("failback"), the receiver told to take the job back
    ("handing-back"). When that fails, the step does not happen."""
    try:
        await settled(save_marker, state_dir, phase, generation=generation, lsn=lsn)
    except OSError as exc:
        if phase == "handing-back":
            done = "the volumes equal the target's replica, which stays promoted"
        elif resumed:
            done = "the volumes are as the interrupted failback left them (`send` still refuses)"
        else:
            done = "nothing was changed here or on the target"
        raise StorageError(
            f"cannot record the failback's progress in {state_dir / MARKER_FILE} ({exc}); {done}",
            hint="free space on (or repair) that disk, then run the same `replicator "
            "failback` again: it goes on from here",
        ) from exc


async def _restore(
    link: Link, spec: VolumeSpec, extent_size: int, result: FailbackResult
) -> ExtentManifest:
    """Make volume ``spec`` equal to its replica; the replica's manifest (what both hold)."""
    remote = await link.request_manifest(spec.name, extent_size)
    if remote is None:
        raise RefusedError(
            f"the receiver has no replica {spec.name!r} for this job",
            hint="give failback the same volumes the job sends (same names)",
        )
    local = await asyncio.to_thread(ExtentManifest.of_file, spec.path, extent_size)
    fd = await asyncio.to_thread(os.open, spec.path, os.O_RDWR | os.O_CLOEXEC)
    try:
        if local.size != remote.size:
            await asyncio.to_thread(os.ftruncate, fd, remote.size)
            local.resize(remote.size)
        runs = _runs(list(local.differing(remote)), remote, extent_size)
        moved_before = result.bytes_moved
        reads = asyncio.Semaphore(READS_IN_FLIGHT)

        async def one(offset: int, length: int, zero: bool) -> None:
            if zero:
                await asyncio.to_thread(_zero, fd, offset, length)
                result.bytes_zeroed += length
                return
            async with reads:
                data = await link.read(spec.name, offset, length)
            _check_read(spec.name, remote, offset, length, data, extent_size)
            await asyncio.to_thread(pwrite_all, fd, data, offset)
            result.bytes_moved += len(data)

        async with asyncio.TaskGroup() as tg:
            for offset, length, zero in runs:
                tg.create_task(one(offset, length, zero))
        await asyncio.to_thread(fsync_fd, fd)
        result.extents_changed += sum(-(-length // extent_size) for _, length, _ in runs)
        result.bytes_compared += remote.size
        result.per_volume[spec.name] = result.bytes_moved - moved_before
        log.info(
            "failback.volume",
            volume=spec.name,
            moved=result.per_volume[spec.name],
            runs=len(runs),
        )
    finally:
        os.close(fd)
    return remote


def _runs(
    indexes: list[int], remote: ExtentManifest, extent_size: int
) -> list[tuple[int, int, bool]]:
    """Adjacent differing extents as (offset, length, all-zero on the target) runs, each at
    most MAX_READ bytes, cut at the end of the volume."""
    runs: list[tuple[int, int, bool]] = []
    for index in indexes:
        offset = index * extent_size
        length = min(extent_size, remote.size - offset)
        if length <= 0:
            continue
        zero = remote.get(index) == zero_digest(length)
        if runs:
            start, size, was_zero = runs[-1]
            if start + size == offset and was_zero == zero and size + length <= MAX_READ:
                runs[-1] = (start, size + length, zero)
                continue
        runs.append((offset, length, zero))
    return runs


def _check_read(
    volume: str, remote: ExtentManifest, offset: int, length: int, data: bytes, extent_size: int
) -> None:
    """The bytes read must be what the manifest said: otherwise the replica is changing."""
    if len(data) != length:
        raise RefusedError(f"replica {volume!r} is shorter than its manifest said")
    for pos in range(0, length, extent_size):
        index = (offset + pos) // extent_size
        if extent_digest(data[pos : pos + extent_size]) != remote.get(index):
            raise RefusedError(
                f"replica {volume!r} changed during the failback (extent {index}): is the VM "
                "still running on the target?",
                hint="stop the VM on the target, then run `replicator failback` again (it "
                "resumes: what was already copied is not moved again)",
            )


def _zero(fd: int, offset: int, length: int) -> None:
    """Zero a range in place, its blocks kept. The target's manifest says what its extents
    hold, not whether they are allocated there; and the range held data here (it differs
    from the target's zeros), so it keeps the allocation it had: a thick disk stays thick
    (a hole punched here could meet a full disk that the guest was promised it would not)."""
    zero_in_place(fd, offset, length)
