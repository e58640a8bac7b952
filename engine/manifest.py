"""Extent manifests: one blake3-128 digest per fixed-size extent of a volume.

The sender keeps, per volume, the manifest of the source as of a journal LSN (the LSN
of the EPOCH that captured it); the receiver computes one of a replica on request. A
digest of all zero bytes marks an extent whose content is unknown (never equal to a
real digest), so it is always treated as changed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lz4.frame

from replicator.engine.volumes import Holes, hole_digests, iter_runs
from replicator.journal.durable import StateFileError, read_state, write_state
from replicator.transport.messages import DIGEST_SIZE

UNKNOWN = b"\0" * DIGEST_SIZE


def digest_chunks(fd: int, size: int, extent_size: int, chunk_extents: int) -> Iterator[bytes]:
    """The digests of every extent of ``fd``, read afresh, ``chunk_extents`` at a time.

    Always yields at least once (an empty file yields b""). Blocking: run it in a thread.
    """
    out = bytearray()
    limit = chunk_extents * DIGEST_SIZE
    for run in iter_runs(fd, size, extent_size):
        if isinstance(run, Holes):
            at, end = run.first, run.first + run.count
            while at < end:  # a hole of a TiB is 16 bytes an extent too: chunk it as well
                n = min(end - at, chunk_extents - len(out) // DIGEST_SIZE)
                out += hole_digests(size, extent_size, at, n)
                at += n
                if len(out) >= limit:
                    yield bytes(out)
                    out.clear()
            continue
        out += run.digest
        if len(out) >= limit:
            yield bytes(out)
            out.clear()
    yield bytes(out)


@dataclass(slots=True)
class ExtentManifest:
    extent_size: int
    size: int
    digests: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        want = self.count * DIGEST_SIZE
        if not self.digests:  # all UNKNOWN (zero bytes), made at once: a TiB is 256 MiB
            self.digests = bytearray(want)
        elif len(self.digests) < want:
            _pad(self.digests, want)
        elif len(self.digests) > want:
            del self.digests[want:]

    @property
    def count(self) -> int:
        return (self.size + self.extent_size - 1) // self.extent_size

    def copy(self) -> ExtentManifest:
        return ExtentManifest(self.extent_size, self.size, bytearray(self.digests))

    def get(self, index: int) -> bytes:
        if index >= self.count:
            return UNKNOWN
        start = index * DIGEST_SIZE
        return bytes(self.digests[start : start + DIGEST_SIZE])

    def set(self, index: int, digest: bytes) -> None:
        start = index * DIGEST_SIZE
        self.digests[start : start + DIGEST_SIZE] = digest

    def resize(self, size: int) -> None:
        """Change the volume size; the last extent's digest is dropped when its length changes."""
        old_count, old_size = self.count, self.size
        self.size = size
        want = self.count * DIGEST_SIZE
        if len(self.digests) < want:
            _pad(self.digests, want)
        else:
            del self.digests[want:]
        if old_count and old_size % self.extent_size and old_count - 1 < self.count:
            self.set(old_count - 1, UNKNOWN)
        if self.count and size % self.extent_size:
            self.set(self.count - 1, UNKNOWN)

    def invalidate(self, offset: int, length: int) -> None:
        """Mark every extent overlapping [offset, offset+length) as unknown."""
        if length <= 0:
            return
        first = offset // self.extent_size
        last = min(self.count, (offset + length + self.extent_size - 1) // self.extent_size)
        for i in range(first, last):
            self.set(i, UNKNOWN)

    def invalidate_all(self) -> None:
        self.digests[:] = UNKNOWN * self.count

    def differing(self, other: ExtentManifest) -> Iterator[int]:
        """Indexes of extents whose digests differ (or are unknown on either side).

        Compared ``_COMPARE_BLOCK`` extents at a time (one memcmp, and a search for an
        UNKNOWN digest), one by one only inside a block that differs: extent by extent,
        a 16 TiB sparse image (268 million extents) took ``verify`` three minutes of CPU."""
        if other.extent_size != self.extent_size:
            raise ValueError("manifests with different extent sizes cannot be compared")
        mine_all, theirs_all = self.digests, other.digests
        known = min(self.count, other.count)
        for lo in range(0, known, _COMPARE_BLOCK):
            hi = min(known, lo + _COMPARE_BLOCK)
            start, end = lo * DIGEST_SIZE, hi * DIGEST_SIZE
            with memoryview(theirs_all) as theirs:  # memcmp in place, no copy
                same = mine_all.startswith(theirs[start:end], start)
            if same and not _holds_unknown(mine_all, start, end):
                continue
            for i in range(lo, hi):
                mine_i, theirs_i = self.get(i), other.get(i)
                if mine_i != theirs_i or mine_i == UNKNOWN:
                    yield i
        yield from range(known, max(self.count, other.count))  # one side has none: UNKNOWN

    def to_state(self) -> dict[str, Any]:
        return {"extent_size": self.extent_size, "size": self.size, **_packed(self.digests)}

    @classmethod
    def of_file(cls, path: Path, extent_size: int) -> ExtentManifest:
        """The manifest of a file as it is now. Blocking."""
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            digests = bytearray()  # grown in place: joined and copied, it was held thrice
            for chunk in digest_chunks(fd, size, extent_size, 1 << 16):
                digests += chunk
            return cls(extent_size, size, digests)
        finally:
            os.close(fd)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ExtentManifest:
        extent_size, size = int(state["extent_size"]), int(state["size"])
        if "digests_lz4" in state:
            want = -(-size // extent_size) * DIGEST_SIZE
            digests = _unpacked(state["digests_lz4"], want)
        else:
            digests = bytearray(state["digests"])
        return cls(extent_size, size, digests)


def _pad(digests: bytearray, want: int) -> None:
    """Grow ``digests`` to ``want`` bytes of UNKNOWN (all zeros), a MiB at a time: the
    zeros of a TiB's growth made at once were 256 MiB more, beside the digests grown."""
    while len(digests) < want:
        digests += bytes(min(want - len(digests), 1 << 20))


_COMPARE_BLOCK = 4096  # extents compared at once by ``differing`` (64 KiB of digests)


def _holds_unknown(digests: bytearray, start: int, end: int) -> bool:
    """Whether an UNKNOWN (all-zero) digest starts at a digest's boundary in
    ``digests[start:end]`` (``start`` is one); searched in place, no copy."""
    at = digests.find(UNKNOWN, start, end)
    while at >= 0:
        if (at - start) % DIGEST_SIZE == 0:
            return True
        at = digests.find(UNKNOWN, at + 1, end)
    return False


# A sparse image's holes all have one digest (a 2 TiB raw image with a few MiB of data has
# a 512 MiB manifest, written and fsynced every cycle): at rest, the digests are lz4-
# compressed when that halves them at least (dense images' digests do not compress).
_PACK_MIN_BYTES = 64 * 1024


_PACK_STEP = 1 << 20  # digests compressed at once: compressed whole, lz4 took a buffer as
# large as them (a TiB's 256 MiB, written all through for a dense disk's), beside the
# saved manifests and the new ones


def _packed(digests: bytearray) -> dict[str, bytes | bytearray]:
    if len(digests) >= _PACK_MIN_BYTES:
        limit = len(digests) // 2
        packer = lz4.frame.LZ4FrameCompressor(return_bytearray=True)
        packed: bytearray = packer.begin(len(digests))  # the size is in the frame's header
        with memoryview(digests) as view:
            for at in range(0, len(digests), _PACK_STEP):
                packed += packer.compress(view[at : at + _PACK_STEP])
                if len(packed) > limit:  # dense: they stay as they are
                    return {"digests": digests}
        packed += packer.flush()
        if len(packed) <= limit:
            return {"digests_lz4": packed}
    return {"digests": digests}


def _unpacked(packed: bytes, want: int) -> bytearray:
    """The digests ``_packed`` compressed; ValueError unless exactly ``want`` bytes."""
    try:
        if lz4.frame.get_frame_info(packed)["content_size"] != want:
            raise ValueError(f"compressed digests do not hold {want} bytes")
        digests: bytearray = lz4.frame.decompress(packed, return_bytearray=True)
    except RuntimeError as exc:  # lz4's error for a damaged frame
        raise ValueError(f"compressed digests cannot be read ({exc})") from exc
    if len(digests) != want:
        raise ValueError(f"compressed digests hold {len(digests)} bytes, not {want}")
    return digests


@dataclass(slots=True)
class ManifestSet:
    """The sender's manifests of all volumes of a job, as of journal LSN ``lsn``."""

    lsn: int
    extent_size: int
    epoch: int = 0
    disks: dict[str, ExtentManifest] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)  # whole-file digests
    # permission bits (0o7777) the replica's volumes have; a volume not here has a mode
    # not known to the sender (state saved before modes were kept, a basis read from the
    # receiver): the next scan sends its mode once
    modes: dict[str, int] = field(default_factory=dict)
    # made by a scan against the replica's own manifests (a basis "remote"), or from them:
    # a comparison completed (engine/lost_records.py). Not saved.
    compared: bool = field(default=False, compare=False)

    def save(self, path: Path) -> None:
        write_state(
            path,
            {
                "kind": "manifests",
                "lsn": self.lsn,
                "epoch": self.epoch,
                "extent_size": self.extent_size,
                "disks": {k: v.to_state() for k, v in self.disks.items()},
                "files": dict(self.files),
                "modes": dict(self.modes),
            },
        )

    @classmethod
    def load(cls, path: Path) -> ManifestSet | None:
        state = read_state(path)
        if state is None:
            return None
        try:
            return cls(
                int(state["lsn"]),
                int(state["extent_size"]),
                int(state["epoch"]),
                {k: ExtentManifest.from_state(v) for k, v in state["disks"].items()},
                {k: bytes(v) for k, v in state["files"].items()},
                {k: int(v) for k, v in state.get("modes", {}).items()},  # absent in older state
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StateFileError(
                f"{path}: manifests do not have the expected fields ({exc})"
            ) from exc
