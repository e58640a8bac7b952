"""Online verify: read source and replica afresh, compare blake3 extent manifests.

The receiver hashes its replicas after applying everything it has received; the sender
hashes the sources at the same extent size. ``repair`` journals the differing extents
(current source content) as one EPOCH, ships it like any other epoch, waits until it is
applied, and verifies again.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from replicator.engine.link import Link, SessionPurpose
from replicator.engine.manifest import ExtentManifest
from replicator.engine.sender import Sender, SenderState
from replicator.engine.volumes import VolumeSpec, pread_all
from replicator.journal import Record


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


async def compare(link: Link, volumes: list[VolumeSpec], extent_size: int) -> VerifyResult:
    diffs: list[VolumeDiff] = []
    for spec in volumes:
        # the receiver hashes its replica while we hash the source
        local, remote = await asyncio.gather(
            asyncio.to_thread(ExtentManifest.of_file, spec.path, extent_size),
            link.request_manifest(spec.name, extent_size),
        )
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
    return VerifyResult(diffs)


_REPAIR_BATCH = 4 * 1024 * 1024  # bytes of source content read per journal append


def _repair_batches(volumes: list[VolumeSpec], result: VerifyResult) -> Iterator[list[Record]]:
    """The records that make the replicas equal the sources, a few MiB at a time."""
    by_name = {v.name: v for v in volumes}
    for diff in result.volumes:
        if diff.identical:
            continue
        spec = by_name[diff.volume]
        with spec.path.open("rb") as f:
            content_size = os.fstat(f.fileno()).st_size
            batch: list[Record] = []
            if diff.replica_size != content_size:
                batch.append(Record.resize(spec.name, content_size))
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
    """Journal and ship the differing extents as one epoch; wait until it is applied."""
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


async def verify(sender: Sender, *, repair: bool) -> VerifyResult:
    async with SenderState(sender.config) as state:
        purpose = SessionPurpose.RESYNC if repair else SessionPurpose.VERIFY
        link, _, _ = await sender.open_link(state, with_basis=False, purpose=purpose)
        try:
            result = await compare(link, sender.config.volumes, sender.config.extent_size)
            if repair and not result.identical:
                repaired = await _repair(sender, state, link, result)
                result = await compare(link, sender.config.volumes, sender.config.extent_size)
                result.repaired = repaired
            await link.goodbye("verify done")
        finally:
            await link.aclose()
    return result
