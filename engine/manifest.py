"""Extent manifests: one blake3-128 digest per fixed-size extent of a volume.

The sender keeps, per volume, the manifest of the source as of a journal LSN (the LSN
of the EPOCH that captured it); the receiver computes one of a replica on request. A
digest of all zero bytes marks an extent whose content is unknown (never equal to a
real digest), so it is always treated as changed.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

import lz4.frame

from replicator.engine.volumes import (
    Holes,
    digest_runs,
    hole_digests,
    iter_runs,
    zero_digest,
    zeros,
)
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


# The digests are held in chunks of CHUNK extents (64 KiB of digests each), not one flat
# array: a flat one cost 256 MiB per TiB of virtual size, holes included, and a sender
# holds several (the saved manifests, a cycle's basis, the new ones). A chunk that is all
# holes (the digest of a whole extent of zeros) or all UNKNOWN is one shared, immutable
# ``bytes`` per extent size, so a sparse disk's manifest costs its data, not its size.
CHUNK: Final = 4096
_CHUNK_BYTES: Final = CHUNK * DIGEST_SIZE
_UNKNOWN_CHUNK: Final = bytes(_CHUNK_BYTES)


@functools.lru_cache(maxsize=8)
def _hole_chunk(extent_size: int) -> bytes:
    """The shared chunk of hole digests of ``extent_size`` extents (a job uses one extent
    size; 64 KiB each). Being that object is only ever a shortcut: a chunk equal to it
    that is another object (two threads made one each, or it left the cache) is compared
    as any chunk is."""
    return zero_digest(extent_size) * CHUNK


class ExtentManifest:
    """The digests of a volume of ``size`` bytes, one per ``extent_size`` bytes.

    Stored as chunks of CHUNK extents, copied on write: a chunk is either ``bytes``
    (immutable: the shared hole and UNKNOWN chunks, a partial UNKNOWN chunk at the end) or
    a ``bytearray`` this manifest may change in place only while it owns it (``_owned``).
    ``copy()`` shares every chunk (neither side owns them afterwards), so a copy costs the
    list of chunks; the first write into a chunk either side shares copies that chunk.
    Made with ``digests`` (DIGEST_SIZE bytes per extent from the first; fewer leaves the
    rest UNKNOWN), or all UNKNOWN.
    """

    __slots__ = ("_chunks", "_owned", "extent_size", "size")

    def __init__(
        self, extent_size: int, size: int, digests: bytes | bytearray | memoryview = b""
    ) -> None:
        self.extent_size = extent_size
        self.size = size
        self._chunks: list[bytes | bytearray] = []
        self._owned = bytearray()  # 1 where ``_chunks`` holds a bytearray only this changes
        self._set_count(self.count)
        if len(digests):
            with memoryview(digests) as view:
                self.put(0, view[: self.count * DIGEST_SIZE])

    @property
    def count(self) -> int:
        return (self.size + self.extent_size - 1) // self.extent_size

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExtentManifest):
            return NotImplemented
        return (self.extent_size, self.size) == (other.extent_size, other.size) and all(
            a is b or a == b for a, b in zip(self._chunks, other._chunks, strict=True)
        )

    def __repr__(self) -> str:
        private = sum(1 for chunk in self._chunks if isinstance(chunk, bytearray))
        return (
            f"ExtentManifest(extent_size={self.extent_size}, size={self.size}, "
            f"chunks={len(self._chunks)}, bytearrays={private})"
        )

    def copy(self) -> ExtentManifest:
        """A copy sharing every chunk: each side copies a chunk before it changes it."""
        new = ExtentManifest.__new__(ExtentManifest)
        new.extent_size, new.size = self.extent_size, self.size
        new._chunks = self._chunks.copy()
        new._owned = bytearray(len(self._chunks))
        self._owned = bytearray(len(self._chunks))  # shared now: no longer changed in place
        return new

    def get(self, index: int) -> bytes:
        if index >= self.count:
            return UNKNOWN
        chunk, at = divmod(index, CHUNK)
        at *= DIGEST_SIZE
        return bytes(self._chunks[chunk][at : at + DIGEST_SIZE])

    def slice(self, first: int, count: int) -> bytes:
        """The digests of ``count`` extents from ``first``: shorter where the volume ends."""
        end = min(first + count, self.count)
        if end <= first:
            return b""
        chunk, at = divmod(first, CHUNK)
        at *= DIGEST_SIZE
        if (end - 1) // CHUNK == chunk:  # within one chunk (the scan's usual case)
            with memoryview(self._chunks[chunk]) as view:
                return bytes(view[at : at + (end - first) * DIGEST_SIZE])
        parts: list[memoryview] = []
        index = first
        while index < end:
            chunk, at = divmod(index, CHUNK)
            n = min(CHUNK - at, end - index)
            parts.append(memoryview(self._chunks[chunk])[at * DIGEST_SIZE : (at + n) * DIGEST_SIZE])
            index += n
        try:
            return b"".join(parts)
        finally:
            for part in parts:
                part.release()

    def set(self, index: int, digest: bytes) -> None:
        if not 0 <= index < self.count:
            raise IndexError(f"extent {index} is outside a manifest of {self.count}")
        if len(digest) != DIGEST_SIZE:
            raise ValueError(f"a digest is {DIGEST_SIZE} bytes, not {len(digest)}")
        chunk, at = divmod(index, CHUNK)
        at *= DIGEST_SIZE
        self._writable(chunk)[at : at + DIGEST_SIZE] = digest

    def put(self, first: int, digests: bytes | bytearray | memoryview) -> None:
        """Set the digests of ``len(digests) // DIGEST_SIZE`` extents from ``first``.

        A whole chunk of hole (or UNKNOWN) digests is stored as the shared chunk: one
        comparison with it, no copy."""
        n, odd = divmod(len(digests), DIGEST_SIZE)
        if odd or first < 0 or first + n > self.count:
            raise ValueError(
                f"{len(digests)} bytes of digests from extent {first} do not fit a manifest "
                f"of {self.count} extents"
            )
        hole = _hole_chunk(self.extent_size)
        chunks, owned = self._chunks, self._owned
        with memoryview(digests) as view:
            pos, index, end = 0, first, first + n
            while index < end:
                chunk, at = divmod(index, CHUNK)
                at *= DIGEST_SIZE
                take = min(len(chunks[chunk]) - at, (end - index) * DIGEST_SIZE)
                piece = view[pos : pos + take]
                pos += take
                index += take // DIGEST_SIZE
                if take == _CHUNK_BYTES:  # the whole chunk
                    if hole.startswith(piece):
                        chunks[chunk], owned[chunk] = hole, 0
                    elif _UNKNOWN_CHUNK.startswith(piece):
                        chunks[chunk], owned[chunk] = _UNKNOWN_CHUNK, 0
                    else:
                        chunks[chunk], owned[chunk] = bytearray(piece), 1
                    continue
                held = chunks[chunk]
                if (held is hole or held is _UNKNOWN_CHUNK) and held.startswith(piece, at):
                    continue  # as it is already: not copied to be written the same
                target = self._writable(chunk)
                target[at : at + take] = piece
                if at + take == _CHUNK_BYTES and target == hole:  # its holes completed
                    chunks[chunk], owned[chunk] = hole, 0

    def put_holes(self, first: int, count: int) -> None:
        """Set ``count`` extents from ``first`` to the digests of holes (zeros; the last
        extent of the volume may be short): whole chunks share the hole chunk, none made."""
        end = min(first + count, self.count)
        hole = _hole_chunk(self.extent_size)
        index = first
        while index < end:
            chunk, at = divmod(index, CHUNK)
            n = min(CHUNK - at, end - index)
            if n == CHUNK and (index + n) * self.extent_size <= self.size:
                self._chunks[chunk], self._owned[chunk] = hole, 0
            else:
                self.put(index, hole_digests(self.size, self.extent_size, index, n))
            index += n

    def hole_runs(
        self, first: int, count: int, size: int, block: int
    ) -> Iterator[tuple[int, int, bool]]:
        """``volumes.digest_runs`` of these digests against those of holes, for ``count``
        extents from ``first`` of a volume of ``size`` bytes (its last extent may be
        short): (lo, hi, same) runs from ``first``, in order, covering them all; past
        this manifest's end nothing is the same. A whole shared hole chunk is the same
        at once (a no-change scan of a 16 TiB sparse disk compared 4 GiB of digests)."""
        hole = _hole_chunk(self.extent_size)
        start, same = 0, True  # the run being built
        index, end = first, first + count
        while index < end:
            chunk, at = divmod(index, CHUNK)
            n = min(CHUNK - at, end - index)
            if (
                index + n <= self.count
                and self._chunks[chunk] is hole
                and (index + n) * self.extent_size <= size  # not the short last extent
            ):
                pieces: Iterable[tuple[int, int, bool]] = ((0, n, True),)
            else:
                digests = hole_digests(size, self.extent_size, index, n)
                pieces = digest_runs(self.slice(index, n), digests, block)
            for lo, _, alike in pieces:
                if alike != same:
                    if index - first + lo > start:
                        yield start, index - first + lo, same
                    start, same = index - first + lo, alike
            index += n
        if count > start:
            yield start, count, same

    def _writable(self, chunk: int) -> bytearray:
        """Chunk ``chunk``, made this manifest's own first if it is shared or immutable."""
        held = self._chunks[chunk]
        if not self._owned[chunk]:
            held = self._chunks[chunk] = bytearray(held)
            self._owned[chunk] = 1
        return cast(bytearray, held)

    def _set_count(self, count: int) -> None:
        """Hold ``count`` digests: those past it dropped, new ones UNKNOWN."""
        chunks, owned = self._chunks, self._owned
        full, tail = divmod(count, CHUNK)
        want = full + (1 if tail else 0)
        del chunks[want:], owned[want:]
        if chunks:  # the last one kept: full when more follow, else the tail's length
            last = len(chunks) - 1
            length = (tail if tail and last == want - 1 else CHUNK) * DIGEST_SIZE
            held = chunks[last]
            if len(held) > length:
                if owned[last]:
                    del cast(bytearray, held)[length:]
                else:
                    chunks[last] = held[:length]  # a slice: a copy of up to 64 KiB
            elif len(held) < length:
                self._writable(last).extend(bytes(length - len(held)))
        while len(chunks) < want:
            chunks.append(_UNKNOWN_CHUNK if len(chunks) < full else bytes(tail * DIGEST_SIZE))
            owned.append(0)

    def resize(self, size: int) -> None:
        """Change the volume size; the last extent's digest is dropped when its length changes."""
        old_count, old_size = self.count, self.size
        self.size = size
        self._set_count(self.count)
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
        index = first
        while index < last:
            chunk, at = divmod(index, CHUNK)
            n = min(CHUNK - at, last - index)
            if n == CHUNK:
                self._chunks[chunk], self._owned[chunk] = _UNKNOWN_CHUNK, 0
            else:
                self._writable(chunk)[at * DIGEST_SIZE : (at + n) * DIGEST_SIZE] = zeros(
                    n * DIGEST_SIZE
                )
            index += n

    def invalidate_all(self) -> None:
        count = self.count
        del self._chunks[:], self._owned[:]
        self._set_count(count)

    def differing(self, other: ExtentManifest) -> Iterator[int]:
        """Indexes of extents whose digests differ (or are unknown on either side).

        Compared a chunk at a time: two chunks that are one object hold the same digests,
        a shared UNKNOWN chunk differs throughout, two others are one memcmp and a search
        for an UNKNOWN digest; one by one only inside a chunk that differs. Extent by
        extent, a 16 TiB sparse image (268 million extents) took ``verify`` three minutes
        of CPU."""
        if other.extent_size != self.extent_size:
            raise ValueError("manifests with different extent sizes cannot be compared")
        hole = _hole_chunk(self.extent_size)
        known = min(self.count, other.count)
        for lo in range(0, known, CHUNK):
            mine, theirs = self._chunks[lo // CHUNK], other._chunks[lo // CHUNK]
            hi = min(known, lo + CHUNK)
            end = (hi - lo) * DIGEST_SIZE
            if mine is _UNKNOWN_CHUNK or theirs is _UNKNOWN_CHUNK:  # unknown: all differ
                yield from range(lo, hi)
                continue
            if mine is theirs and len(mine) == end:
                if mine is hole:
                    continue
                same = True
            else:
                with memoryview(theirs) as view:  # memcmp in place, no copy
                    same = mine.startswith(view[:end])
            if same and (mine is hole or not _holds_unknown(mine, 0, end)):
                continue
            for i in range(lo, hi):
                at = (i - lo) * DIGEST_SIZE
                digest = mine[at : at + DIGEST_SIZE]
                if digest != theirs[at : at + DIGEST_SIZE] or digest == UNKNOWN:
                    yield i
        yield from range(known, max(self.count, other.count))  # one side has none: UNKNOWN

    def to_state(self) -> dict[str, Any]:
        """The manifest as ``manifests.state`` holds it (docs/FORMATS.md): its digests
        lz4-compressed from the chunks a MiB at a time when that halves them at least
        (a sparse image's), else as they are (joined: a dense disk's do not compress)."""
        return {"extent_size": self.extent_size, "size": self.size, **_packed(self._chunks)}

    @classmethod
    def of_file(cls, path: Path, extent_size: int) -> ExtentManifest:
        """The manifest of a file as it is now. Blocking."""
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            manifest, at = cls(extent_size, size), 0
            for chunk in digest_chunks(fd, size, extent_size, 1 << 16):
                manifest.put(at, chunk)
                at += len(chunk) // DIGEST_SIZE
            return manifest
        finally:
            os.close(fd)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ExtentManifest:
        """The manifest ``to_state`` gave (or one saved before compression). Compressed
        digests are decompressed a chunk at a time, hole chunks shared as they come."""
        manifest = cls(int(state["extent_size"]), int(state["size"]))
        if "digests_lz4" in state:
            at = 0
            for piece in _unpacked(state["digests_lz4"], manifest.count * DIGEST_SIZE):
                manifest.put(at, piece)
                at += len(piece) // DIGEST_SIZE
        else:
            digests = state["digests"]
            with memoryview(digests) as view:  # an older file's may be short: UNKNOWN then
                manifest.put(0, view[: manifest.count * DIGEST_SIZE])
        return manifest


def _holds_unknown(digests: bytes | bytearray, start: int, end: int) -> bool:
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
# saved manifests and the new ones. The bytes at rest depend on it: the frame is made of
# the same pieces as before the digests were chunked.
_STEP_CHUNKS = _PACK_STEP // _CHUNK_BYTES


def _packed(chunks: list[bytes | bytearray]) -> dict[str, bytes | bytearray]:
    total = sum(len(chunk) for chunk in chunks)
    if total >= _PACK_MIN_BYTES:
        limit = total // 2
        packer = lz4.frame.LZ4FrameCompressor(return_bytearray=True)
        packed: bytearray = packer.begin(total)  # the size is in the frame's header
        step = bytearray(_PACK_STEP)  # the chunks of a step copied in, one buffer for all
        for at in range(0, len(chunks), _STEP_CHUNKS):
            end = 0
            for chunk in chunks[at : at + _STEP_CHUNKS]:
                step[end : end + len(chunk)] = chunk
                end += len(chunk)
            with memoryview(step) as view:
                packed += packer.compress(view[:end])
            if len(packed) > limit:  # dense: they stay as they are
                break
        else:
            packed += packer.flush()
            if len(packed) <= limit:
                return {"digests_lz4": packed}
    return {"digests": b"".join(chunks)}


_UNPACK_STEP = 1024  # compressed bytes decompressed at once: at most ~256 KiB comes out
# (lz4's ratio is below 255:1), and lz4's decompressor holds about 9 times what comes out
# of a call while it grows its buffer. Given the whole frame with an output limit
# instead, it took ~0.4 ms a call (it keeps the input not used yet, copied): 6 s for a
# 4 TiB sparse disk's 1 GiB of digests a chunk at a time (all at once: 5 s).


def _unpacked(packed: bytes, want: int) -> Iterator[bytearray]:
    """The digests ``_packed`` compressed, a chunk (64 KiB) at a time; ValueError unless
    exactly ``want`` bytes (what follows the frame is not read, as before)."""
    got, pending = 0, bytearray()
    try:
        if lz4.frame.get_frame_info(packed)["content_size"] != want:
            raise ValueError(f"compressed digests do not hold {want} bytes")
        unpacker = lz4.frame.LZ4FrameDecompressor(return_bytearray=True)
        with memoryview(packed) as view:
            for at in range(0, len(view), _UNPACK_STEP):
                if unpacker.eof:
                    break
                pending += unpacker.decompress(view[at : at + _UNPACK_STEP])
                if got + len(pending) > want:
                    raise ValueError(f"compressed digests hold more than {want} bytes")
                while len(pending) >= _CHUNK_BYTES:
                    got += _CHUNK_BYTES
                    yield pending[:_CHUNK_BYTES]
                    del pending[:_CHUNK_BYTES]  # a bytearray drops a prefix in place
    except RuntimeError as exc:  # lz4's error for a damaged frame
        raise ValueError(f"compressed digests cannot be read ({exc})") from exc
    got += len(pending)
    if got != want:
        raise ValueError(f"compressed digests hold {got} bytes, not {want}")
    if pending:
        yield pending


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
        disks = {k: v.to_state() for k, v in self.disks.items()}
        # a dense disk's digests are joined from their chunks here: the packer's buffer
        # made their size at once keeps saving to that one more copy
        hint = sum(len(s.get("digests", s.get("digests_lz4", b""))) for s in disks.values())
        write_state(
            path,
            {
                "kind": "manifests",
                "lsn": self.lsn,
                "epoch": self.epoch,
                "extent_size": self.extent_size,
                "disks": disks,
                "files": dict(self.files),
                "modes": dict(self.modes),
            },
            size_hint=hint + 64 * len(self.files),
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
