"""Online verify: read source and replica afresh, compare blake3 extent manifests.

The receiver hashes its replicas as everything it has received will leave them: what
follows the last consistency point it holds is worked out, not applied, so the replica
keeps that point (engine/unapplied.py); the sender hashes the sources at the same extent
size. The result says which LSNs were compared so (``VerifyResult.unapplied``).
``repair`` journals the differing extents (current source content) as one EPOCH, ships it
like any other epoch, waits until it is applied, and verifies again. A FUSE job's folder
is compared whole: its files, and the replica folder's layout (the receiver's listing
against the folder walked now), which ``repair`` makes the same with the records the FUSE
capture's own sync uses.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from replicator.engine.link import Link, SessionPurpose
from replicator.engine.manifest import ExtentManifest, digest_chunks
from replicator.engine.reconcile import range_records
from replicator.engine.scan import Progress, file_volume
from replicator.engine.sender import Sender, SenderState
from replicator.engine.tree import Tree, from_entries, tree_records
from replicator.engine.volumes import VolumeKind, VolumeSpec
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
    # a folder's job (FUSE capture): how the replica folder's layout differs, in words
    layout: list[str] = field(default_factory=list)
    # (first, last) LSN the receiver holds past the consistency point its replica is at:
    # compared as they will leave the replica, which they reach with the next point a
    # send ships (None: the replica holds all it received)
    unapplied: tuple[int, int] | None = None

    @property
    def identical(self) -> bool:
        return all(v.identical for v in self.volumes) and not self.layout


def _ranges(indexes: Iterable[int], extent_size: int, size: int) -> list[tuple[int, int]]:
    """Coalesce extent indexes into (offset, length) byte ranges clipped to ``size``; taken
    as they come (a list of every index of a 16 TiB disk is 268 million ints)."""
    out: list[tuple[int, int]] = []
    for i in indexes:
        off = i * extent_size
        length = min(extent_size, size - off)  # only the last extent is short
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((off, length))
    return out


# extents hashed between progress reports: a 64th of the image, from 64 (4 MiB at 64 KiB,
# so a small image still shows its progress) to 4096 (256 MiB: 64 each made a 16 TiB
# sparse image four million chunks of digests and as many calls into the event loop)
_PROGRESS_EXTENTS = (64, 4096)


def _source_manifest(
    path: Path, extent_size: int, seen: Callable[[int], None] | None
) -> ExtentManifest:
    """``ExtentManifest.of_file``, telling ``seen`` the bytes hashed so far. Blocking."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        # filled in place: parts joined, then copied, held the digests three times over
        # (16 bytes per extent: 12 GiB at once for a 16 TiB image); a chunk of holes is
        # the shared one, so a sparse image's costs its data
        manifest = ExtentManifest(extent_size, size)
        hashed = 0
        least, most = _PROGRESS_EXTENTS
        step = min(most, max(least, manifest.count // 64))
        for chunk in digest_chunks(fd, size, extent_size, step):
            manifest.put(hashed, chunk)
            hashed += len(chunk) // DIGEST_SIZE
            if seen is not None:
                seen(min(size, hashed * extent_size))
        return manifest  # the file shrank meanwhile: the rest UNKNOWN, as it was not read
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
                    [(0, local.size)] if local.size else [],  # all of it
                )
            )
            continue
        indexes = local.differing(remote)
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
                # data as WRITEs, zeros as the source holds them: ZERO where allocated,
                # TRIM where a hole (the replica's allocation follows the source's)
                for record in range_records(f.fileno(), spec.name, off, length, 1 << 20):
                    batch.append(record)
                    batch_bytes += len(record.data) or 4096  # a zero record: a little
                    if batch_bytes >= _REPAIR_BATCH:
                        yield batch
                        batch, batch_bytes = [], 0
            if batch:
                yield batch


def _layout(replica: Tree, source: Tree) -> tuple[list[str], list[Record]]:
    """How the replica folder's layout differs from the source folder's, in words, and
    the records that make it the same (before any file's content)."""
    words: list[str] = []
    for path in sorted(replica.files.keys() - source.files.keys()):
        words.append(f"{path}: a file on the replica only")
    for path in sorted(replica.dirs.keys() - source.dirs.keys()):
        words.append(f"{path}/: a folder on the replica only")
    for path in sorted(source.dirs):
        if path not in replica.dirs:
            words.append(f"{path}/: folder missing on the replica")
        elif replica.dirs[path] != source.dirs[path]:
            words.append(f"{path}/: mode {source.dirs[path]:04o}, replica {replica.dirs[path]:04o}")
    for path in sorted(source.links.keys() | replica.links.keys()):
        mine, theirs = source.links.get(path), replica.links.get(path)
        if mine != theirs:
            have = "missing" if theirs is None else f"-> {theirs}"
            words.append(
                f"{path}: a symlink on the replica only ({have})"
                if mine is None
                else f"{path}: symlink -> {mine}, replica {have}"
            )
    records = tree_records(replica, source)
    for path in sorted(source.files.keys() & replica.files.keys()):
        if replica.files[path] != source.files[path]:
            words.append(
                f"{path}: mode {source.files[path]:04o}, replica {replica.files[path]:04o}"
            )
            records.append(Record.chmod(path, source.files[path]))
    return words, records


async def _repair(
    sender: Sender, state: SenderState, link: Link, result: VerifyResult, layout: list[Record]
) -> int:
    """Journal and ship what makes the layout and the content the same (nothing: an empty
    epoch) as one epoch; wait until it is applied."""
    journal = state.journal
    assert journal is not None
    sent = 0
    if layout:
        await sender.append(journal, link, layout)
    gen = _repair_batches(sender.config.volumes, result)
    while (batch := await asyncio.to_thread(next, gen, None)) is not None:
        await sender.append(journal, link, batch)
        sent += sum(len(r.data) for r in batch)
    last = await sender.append(journal, link, [Record.epoch(0)])
    await journal.sync()
    await link.wait_applied(last)
    return sent


async def verify(
    sender: Sender, *, repair: bool, progress: Progress | None = None, folder: Tree | None = None
) -> VerifyResult:
    """Compare (and with ``repair`` make equal) the sources and their replicas; with
    ``folder`` (the source folder's tree: a FUSE-captured job), the replica folder's
    layout too (files, folders and symlinks on one side only, modes, link targets)."""
    sender.bind_log_context()
    # the saved manifests are not read: what is compared is the replica's (and none are
    # saved here: a repair's records are journaled, and the next send folds them in)
    async with SenderState(sender.config, manifests=False) as state:
        purpose = SessionPurpose.RESYNC if repair else SessionPurpose.VERIFY
        link, _, _ = await sender.open_link(state, with_basis=False, purpose=purpose)
        try:
            volumes, extent_size = sender.config.volumes, sender.config.extent_size
            # what this sender journaled and the receiver lacks ships first, as a send
            # would ship it: compared while it was on its way, the first answer said
            # "differs" and the next "identical" (the receiver applies what it has before
            # it hashes)
            journal = state.journal
            assert journal is not None
            shipped = min(journal.durable_lsn, journal.last_record_lsn)  # what can ship
            if journal.first_lsn <= shipped:  # none when the journal holds no record
                await link.wait_received(shipped)

            async def both() -> tuple[VerifyResult, list[Record]]:
                words: list[str] = []
                records: list[Record] = []
                if folder is not None:
                    replica = from_entries(await link.request_tree())
                    words, records = _layout(replica, folder)
                result = await compare(link, volumes, extent_size, progress)
                result.layout = words
                return result, records

            result, layout = await both()
            if repair:
                # an epoch even when nothing differs: this session raised the receiver's
                # point floor (Sender.open_link), and only an epoch at or above it makes
                # the replica a consistency point again
                repaired = await _repair(sender, state, link, result, layout)
                if not result.identical:
                    result, _ = await both()
                result.repaired = repaired
            elif link.received_lsn > link.applied_lsn:  # known before the last manifest
                result.unapplied = (link.applied_lsn + 1, link.received_lsn)
            await link.goodbye("verify done")
        finally:
            await sender.close_link(link)  # the status: disconnected again
    return result
