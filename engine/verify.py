"""Online verify: read source and replica afresh, compare blake3 extent manifests.

The receiver hashes its replicas after applying everything it has received; the sender
hashes the sources at the same extent size. ``repair`` journals the differing extents
(current source content) as one EPOCH, ships it like any other epoch, waits until it is
applied, and verifies again.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

from replicator.engine.link import Link
from replicator.engine.manifest import Manifest
from replicator.engine.scan import append_waiting
from replicator.engine.sender import FULL_WAIT_TIMEOUT, Sender, SenderState
from replicator.engine.volumes import VolumeSpec
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


def local_manifest(spec: VolumeSpec, extent_size: int) -> Manifest:
    return Manifest.of_file(spec.path, extent_size)


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
        local = await asyncio.to_thread(local_manifest, spec, extent_size)
        remote = await link.request_manifest(spec.name, extent_size)
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


async def _repair(sender: Sender, state: SenderState, link: Link, result: VerifyResult) -> int:
    journal = state.journal
    assert journal is not None
    sent = 0
    by_name = {v.name: v for v in sender.config.volumes}
    records: list[Record] = []
    for diff in result.volumes:
        if diff.identical:
            continue
        spec = by_name[diff.volume]
        content_size = os.stat(spec.path).st_size
        if diff.replica_size != content_size:
            records.append(Record.resize(spec.name, content_size))
        with spec.path.open("rb") as f:
            for off, length in diff.extents:
                end = min(off + length, content_size)
                pos = off
                while pos < end:
                    n = min(1024 * 1024, end - pos)
                    f.seek(pos)
                    data = f.read(n)
                    records.append(Record.write(spec.name, pos, data))
                    sent += len(data)
                    pos += n
    records.append(Record.epoch(0))
    last = 0
    for i in range(0, len(records), 64):
        batch = records[i : i + 64]
        if i == 0 and journal.next_lsn < link.received_lsn + 1:
            batch = [batch[0].with_lsn(link.received_lsn + 1), *batch[1:]]
        last = await append_waiting(
            journal, batch, link.space_freed, FULL_WAIT_TIMEOUT, link.raise_if_failed
        )
    await journal.sync()
    await link.wait_applied(last)
    return sent


async def verify(sender: Sender, *, repair: bool) -> VerifyResult:
    async with SenderState(sender.config) as state:
        link, _, _ = await sender.open_link(state, with_basis=False)
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
