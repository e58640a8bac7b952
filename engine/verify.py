"""Online verify: read source and replica afresh, compare blake3 extent manifests.

The receiver hashes its replicas after applying everything it has received; the sender
hashes the sources at the same extent size. ``repair`` journals the differing extents
(current source content) as one EPOCH, ships it like any other epoch, waits until it is
applied, and verifies again.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from replicator.engine.link import Link, SessionPurpose
from replicator.engine.manifest import ExtentManifest, digest_chunks
from replicator.engine.scan import Progress, file_volume
from replicator.engine.sender import Sender, SenderState
from replicator.engine.volumes import VolumeKind, VolumeSpec, pread_all
from replicator.journal import Record
from replicator.transport.messages import DIGEST_SIZE


@dataclass(slots=True)
class VolumeDiff:
    volume: str
    source_size: int
    replica_size: int | None  # None: the replica does not exist
    extents: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) ranges

    @property
    def identical(self) -> bool:
        return self.replica_size == self.source_size and not self.extents

    @property
    def differing_bytes(self) -> int:
        return sum(length for _, length in self.extents)


@dataclass(slots=True)
class VerifyResult:
    volumes: list[VolumeDiff]
    repaired: int = 0  # bytes sent by --repair

    @property
    def identical(self) -> bool:
        return all(v.identical for v in self.volumes)


def _ranges(indexes: list[int], extent_size: int, size: int) -> list[tuple[int, int]]:
    """Coalesce extent indexes into (offset, length) byte ranges clipped to ``size``."""
    out: list[tuple[int, int]] = []
    for i in indexes:
        off = i * extent_size
        length = min(extent_size, size - off)  # only the last extent is short
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((off, length))
    return out


_PROGRESS_EXTENTS = 64  # extents hashed between progress reports (4 MiB at 64 KiB)


def _source_manifest(
    path: Path, extent_size: int, seen: Callable[[int], None] | None
) -> ExtentManifest:
    """``ExtentManifest.of_file``, telling ``seen`` the bytes hashed so far. Blocking."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        parts: list[bytes] = []
        hashed = 0
        for chunk in digest_chunks(fd, size, extent_size, _PROGRESS_EXTENTS):
            parts.append(chunk)
            hashed += len(chunk) // DIGEST_SIZE
            if seen is not None:
                seen(min(size, hashed * extent_size))
        return ExtentManifest(extent_size, size, bytearray(b"".join(parts)))
    finally:
        os.close(fd)


async def compare(
    link: Link, volumes: list[VolumeSpec], extent_size: int, progress: Progress | None = None
) -> VerifyResult:
    """Compare every volume with its replica; ``progress`` sees the bytes of the sources
    hashed (the receiver hashes its replicas at the same time)."""
    diffs: list[VolumeDiff] = []
    loop = asyncio.get_running_loop()
    total = sum(os.stat(spec.path).st_size for spec in volumes)
    before = 0

    def seen_from(base: int) -> Callable[[int], None]:
        def seen(done: int) -> None:  # called in the hashing thread
            if progress is not None:
                loop.call_soon_threadsafe(progress, base + done, total)

        return seen

    for spec in volumes:
        # the receiver hashes its replica while we hash the source
        local, remote = await asyncio.gather(
            asyncio.to_thread(_source_manifest, spec.path, extent_size, seen_from(before)),
            link.request_manifest(spec.name, extent_size),
        )
        before += local.size
        if remote is None:
            diffs.append(
                VolumeDiff(
                    spec.name,
                    local.size,
                    None,
                    _ranges(list(range(local.count)), extent_size, local.size),
                )
            )
            continue
        indexes = list(local.differing(remote))
        diffs.append(
            VolumeDiff(
                spec.name,
                local.size,
                remote.size,
                _ranges(indexes, extent_size, max(local.size, remote.size)),
            )
        )
    if progress is not None:
        progress(total, total)  # done: the display ends
    return VerifyResult(diffs)


_REPAIR_BATCH = 4 * 1024 * 1024  # bytes of source content read per journal append


def _repair_batches(volumes: list[VolumeSpec], result: VerifyResult) -> Iterator[list[Record]]:
    """The records that make the replicas equal the sources, a few MiB at a time."""
    by_name = {v.name: v for v in volumes}
    for diff in result.volumes:
        if diff.identical:
            continue
        spec = by_name[diff.volume]
        if spec.kind is VolumeKind.FILE:  # whole, with its mode, as a scan sends it
            yield [file_volume(spec)[0]]
            continue
        with spec.path.open("rb") as f:
            st = os.fstat(f.fileno())
            content_size = st.st_size
            batch: list[Record] = []
            if diff.replica_size != content_size:
                batch.append(Record.resize(spec.name, content_size))
            if diff.replica_size is None:  # made anew (0600): the source's mode, as a scan
                batch.append(Record.chmod(spec.name, st.st_mode & 0o777))
            batch_bytes = 0
            for off, length in diff.extents:
                pos, end = off, min(off + length, content_size)
                while pos < end:
                    data = pread_all(f.fileno(), min(1024 * 1024, end - pos), pos)
                    batch.append(Record.write(spec.name, pos, data))
                    batch_bytes += len(data)
                    pos += len(data)
                    if batch_bytes >= _REPAIR_BATCH:
                        yield batch
                        batch, batch_bytes = [], 0
            if batch:
                yield batch


async def _repair(sender: Sender, state: SenderState, link: Link, result: VerifyResult) -> int:
    """Journal and ship the differing extents (none: an empty epoch) as one epoch; wait
    until it is applied."""
    journal = state.journal
    assert journal is not None
    sent = 0
    gen = _repair_batches(sender.config.volumes, result)
    while (batch := await asyncio.to_thread(next, gen, None)) is not None:
        await sender.append(journal, link, batch)
        sent += sum(len(r.data) for r in batch)
    last = await sender.append(journal, link, [Record.epoch(0)])
    await journal.sync()
    await link.wait_applied(last)
    return sent


async def verify(sender: Sender, *, repair: bool, progress: Progress | None = None) -> VerifyResult:
    """Compare (and with ``repair`` make equal) the sources and their replicas."""
    sender.bind_log_context()
    async with SenderState(sender.config) as state:
        purpose = SessionPurpose.RESYNC if repair else SessionPurpose.VERIFY
        link, _, _ = await sender.open_link(state, with_basis=False, purpose=purpose)
        try:
            volumes, extent_size = sender.config.volumes, sender.config.extent_size
            result = await compare(link, volumes, extent_size, progress)
            if repair:
                # an epoch even when nothing differs: this session raised the receiver's
                # point floor (Sender.open_link), and only an epoch at or above it makes
                # the replica a consistency point again
                repaired = await _repair(sender, state, link, result)
                if not result.identical:
                    result = await compare(link, volumes, extent_size, progress)
                result.repaired = repaired
            await link.goodbye("verify done")
        finally:
            await sender.close_link(link)  # the status: disconnected again
    return result
